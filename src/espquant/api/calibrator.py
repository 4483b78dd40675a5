"""The legacy-compatible ``Calibrator``: the original toolkit's names and arguments on top of the calibration
engine (:func:`espquant.calibration.engine.calibrate_model`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx

from espquant.calibration.engine import (
    CalibrationResult,
    calibrate_model,
    sample_count,
    validate_method,
    with_factors_applied,
)
from espquant.checker import legacy_check, parse_bits
from espquant.errors import OptionError
from espquant.model_io import save_model
from espquant.progress import progress_bar
from espquant.runtime import validate_providers
from espquant.simulator.legacy import original_table_scales
from espquant.table import QuantTable

__all__ = ["Calibrator", "save_calibration", "calibrated_model_path"]

logger = logging.getLogger(__name__)


class Calibrator:
    """Chooses the power-of-two exponent of every tensor (legacy ESP-DL toolkit API).

    Args:
        quantization_bit: ``"int8"`` or ``"int16"``.
        granularity: ``"per-tensor"`` or ``"per-channel"`` (int8 only) for weights.
        calib_method: ``"minmax"``, ``"entropy"``, ``"percentile"``, ``"mse"`` or ``"auto"`` (per tensor, the
            exponent of those four that the simulated chip measures best; ``calibration/auto.py``).
        strict: at int16, refuse a model with ops the chip has no int16 kernel for (Resize) instead of running
            those nodes at int8 with a warning each (the default; see ``checker.runs_at``).
        cle: cross-layer equalization before calibration (off unless True).
        bias_correction: compensate weight rounding in the float biases (``auto``: on unless False, kept in
            the table's ``bias_shifts`` and only when it measures better; the fixed methods: off unless True,
            and the table then belongs to the corrected model).
        weight_rounding: round each Conv / Gemm weight down or up by the layer's output error on the
            calibration data instead of to nearest (``calibration/weight_rounding.py``; off unless True; with
            ``auto`` kept only when it measures better).

    With CLE, a fixed method's bias correction or weight rounding the table belongs to a changed float model
    (``result.model``); ``generate_quantization_table`` writes it next to the table as ``<table>_model.onnx``.
    """

    def __init__(
        self,
        quantization_bit: str,
        granularity: str = "per-tensor",
        calib_method: str = "minmax",
        *,
        strict: bool = False,
        cle: bool | None = None,
        bias_correction: bool | None = None,
        weight_rounding: bool | None = None,
    ) -> None:
        self.bits = parse_bits(quantization_bit)
        validate_method(self.bits, granularity, calib_method)
        self.granularity = granularity
        self.method = calib_method
        self.strict = strict
        self.cle = cle
        self.bias_correction = bias_correction
        self.weight_rounding = weight_rounding
        self.providers = ["CPUExecutionProvider"]
        self.int16_layers: list[str] = []

    def set_int16_layers(self, layers: Sequence[str]) -> None:
        """Mixed precision: compute these layers (node names or output tensors) at int16, the rest at int8.

        ESP-DL v3 runs each layer at its own width and converts between widths with RequantizeLinear; an int16
        layer costs twice the memory and more time but gives 256x finer steps (``calibration/precision.py``).
        """
        if self.bits != 8 and layers:
            raise OptionError("int16 layers only make sense in an int8 model (this calibrator is int16 already).")
        self.int16_layers = list(layers)

    def set_method(self, granularity: str, calib_method: str) -> None:
        """Change granularity and method together (validated as a pair)."""
        validate_method(self.bits, granularity, calib_method)
        self.granularity, self.method = granularity, calib_method

    def set_providers(self, providers: Sequence[str]) -> None:
        """onnxruntime execution providers used to run the float model."""
        self.providers = validate_providers(providers)

    def check_model(self, model_proto: onnx.ModelProto) -> int:
        """Legacy contract: log every problem and return -1 if ESP-DL cannot run the model, else 0.

        Calibration is target-independent, so only the rules that hold on every target are checked.
        """
        return legacy_check(model_proto, target=None, bits=self.bits, fallback=not self.strict)

    def calibrate(
        self,
        model_proto: onnx.ModelProto,
        calib_dataset: object,
        batch_size: int = 32,
        on_batch: Callable[[int], None] | None = None,
        threads: int | None = None,
    ) -> CalibrationResult:
        """Measure the model on the data and choose every exponent; nothing is written (see
        :func:`~espquant.calibration.engine.calibrate_model`)."""
        return calibrate_model(
            model_proto,
            calib_dataset,
            self.bits,
            self.granularity,
            self.method,
            providers=self.providers,
            int16_layers=self.int16_layers,
            batch_size=batch_size,
            on_batch=on_batch,
            threads=threads,
            strict=self.strict,
            cle=self.cle,
            bias_correction=self.bias_correction,
            weight_rounding=self.weight_rounding,
        )

    def export_coefficient_to_cpp(
        self,
        model_proto: onnx.ModelProto,
        pickle_file_path: str | os.PathLike[str],
        target_chip: str,
        output_path: str | os.PathLike[str],
        file_name: str,
        print_model_info: bool = False,
    ) -> list[Path]:
        """Legacy API: C++ coefficient files for the legacy ESP-DL library (v1.1 / v2.0 layer classes).

        Writes ``<file_name>.cpp`` / ``.hpp`` (every layer's filter, bias and activation as constant arrays with
        ``get_<layer>_filter()`` ... getters) and ``<file_name>_model.hpp`` (a model class that builds and calls
        the layers in order) into ``output_path``, for ``target_chip`` 'esp32', 'esp32s2', 'esp32c3' or
        'esp32s3'. See :mod:`espquant.export.cpp` for the layouts and what is assumed of the legacy runtime.
        """
        from espquant.export.cpp import export_coefficient_to_cpp

        return export_coefficient_to_cpp(
            model_proto, pickle_file_path, target_chip, output_path, file_name, print_model_info, bits=self.bits
        )

    def generate_quantization_table(
        self,
        model_proto: onnx.ModelProto,
        calib_dataset: object,
        pickle_file_path: str | os.PathLike[str],
        batch_size: int = 32,
        table_format: str = "legacy",
    ) -> QuantTable:
        """Legacy API: calibrate and write the table to ``pickle_file_path`` (plus its ``.json`` twin).

        The pickle holds what the original toolkit wrote, each tensor's scale ``2 ** exponent`` (float64, arrays
        per channel), so its ``Evaluator`` and ``export_coefficient_to_cpp`` read espquant's tables too; the
        metadata is in the twin. ``table_format="exponents"`` writes espquant's integer form. A progress bar
        shows on an interactive terminal (stderr), as the legacy toolkit's users expect.
        """
        with progress_bar("calibrating", sample_count(calib_dataset)) as advance:
            result = self.calibrate(model_proto, calib_dataset, batch_size, on_batch=advance)
        save_calibration(result, pickle_file_path, table_format)
        return result.table


def calibrated_model_path(table_path: str | os.PathLike[str]) -> Path:
    """Where the float model a table belongs to is written when calibration changed it: ``t.pickle`` ->
    ``t_model.onnx``, beside the table."""
    path = Path(table_path)
    return path.with_name(f"{path.stem}_model.onnx")


def save_calibration(
    result: CalibrationResult, table_path: str | os.PathLike[str], table_format: str = "exponents"
) -> tuple[Path, Path, Path | None]:
    """Write the table (pickle + JSON twin) and, when CLE or bias correction changed the float model, that
    model beside it (``calibrated_model_path``), named in the table's metadata so a mismatch says which
    model to use. Returns the pickle, the twin and the model path (None when the model is unchanged)."""
    if table_format == "legacy":  # the original toolkit reads the pickle's scales with the model's own weights
        result = with_factors_applied(result)
    model_path = None
    if result.transforms and result.model is not None:
        model_path = calibrated_model_path(table_path)
        result.table.metadata["calibrated_model"] = model_path.name
        logger.warning(
            "calibration changed the float weights (%s): the table is for %s; evaluate and export that model",
            ", ".join(result.transforms),
            model_path,
        )
        save_model(result.model, model_path)
    scales = None
    if table_format == "legacy" and result.model is not None:  # what the original toolkit's Evaluator reads
        scales = original_table_scales(result.model, result.table, int(result.table.metadata.get("bits", 8)))
    table_file, twin = result.table.save(table_path, table_format, legacy_scales=scales)
    return table_file, twin, model_path
