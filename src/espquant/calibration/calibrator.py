"""The legacy-compatible ``Calibrator``: configuration (bit width, granularity, method), providers, the
model check, and ``generate_quantization_table``, which measures every activation on the calibration set
and writes the quantization table."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from espquant._version import __version__
from espquant.calibration.collector import collect
from espquant.calibration.dataset import InputSpec, iterate_batches
from espquant.calibration.exponents import Requantize, assign_exponents
from espquant.calibration.observers import Observer, make_observer
from espquant.calibration.plan import plan_calibration
from espquant.calibration.precision import resolve_int16_layers, tensor_widths
from espquant.checker import check_model, legacy_check, parse_bits
from espquant.errors import OptionError
from espquant.graph import tensor_shape
from espquant.optimizer.shapes import batch_pinning_reshapes, convert_model_batch_to_dynamic
from espquant.progress import progress_bar
from espquant.runtime import validate_providers
from espquant.table import FORMAT_VERSION, QuantTable, graph_hash

__all__ = ["Calibrator", "CALIBRATION_METHODS", "GRANULARITIES"]

logger = logging.getLogger(__name__)

GRANULARITIES = ("per-tensor", "per-channel")
# Methods per bit width: the legacy set (int8 minmax/entropy, int16 minmax) plus percentile and mse.
CALIBRATION_METHODS: dict[int, tuple[str, ...]] = {
    8: ("minmax", "entropy", "percentile", "mse"),
    16: ("minmax", "entropy", "percentile", "mse"),
}


def validate_method(bits: int, granularity: str, method: str) -> None:
    """Reject a combination the calibrator cannot honour, naming the valid choices."""
    if granularity not in GRANULARITIES:
        raise OptionError(f"granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}.")
    if bits == 16 and granularity != "per-tensor":
        raise OptionError("int16 quantization is per-tensor only (ESP-DL has no per-channel int16 weights).")
    if method not in CALIBRATION_METHODS[bits]:
        raise OptionError(
            f"calibration method {method!r} for int{bits}: use one of {', '.join(CALIBRATION_METHODS[bits])}."
        )


def _sample_count(data: object) -> int | None:
    """The number of samples when the data says it up front (arrays, dicts of arrays), else None."""
    if isinstance(data, dict):
        data = next(iter(data.values()), None)
    shape = getattr(data, "shape", None)
    return int(shape[0]) if shape else None


def _batchable(model: onnx.ModelProto, batch_size: int) -> tuple[onnx.ModelProto, int]:
    """A model that accepts batches: a static batch dimension is made dynamic, unless a constant Reshape
    pins it, in which case the data is fed in batches of that static size."""
    initializers = {t.name for t in model.graph.initializer}
    static = {
        shape[0]
        for info in model.graph.input
        if info.name not in initializers and (shape := tensor_shape(info)) and isinstance(shape[0], int)
    }
    if not static:
        return model, batch_size
    if not batch_pinning_reshapes(model):
        return convert_model_batch_to_dynamic(model), batch_size
    if len(static) > 1:
        raise OptionError(f"the model's inputs have different static batch sizes {sorted(static)}.")
    fixed = static.pop()
    logger.info("a Reshape pins the batch to %d: calibrating in batches of %d", fixed, fixed)
    return model, fixed


@dataclass
class CalibrationResult:
    """The table plus what the terminal report shows: ranges, observers and needed requantizations."""

    table: QuantTable
    observers: dict[str, Observer]
    samples: int
    requantize: list[Requantize]
    range_from: dict[str, str] = field(default_factory=dict)  # Conv output -> the reader output it takes its range of


class Calibrator:
    """Chooses the power-of-two exponent of every tensor (legacy ESP-DL toolkit API).

    Args:
        quantization_bit: ``"int8"`` or ``"int16"``.
        granularity: ``"per-tensor"`` or ``"per-channel"`` (int8 only) for weights.
        calib_method: ``"minmax"``, ``"entropy"``, ``"percentile"`` or ``"mse"``.
    """

    def __init__(self, quantization_bit: str, granularity: str = "per-tensor", calib_method: str = "minmax") -> None:
        self.bits = parse_bits(quantization_bit)
        validate_method(self.bits, granularity, calib_method)
        self.granularity = granularity
        self.method = calib_method
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
        return legacy_check(model_proto, target=None, bits=self.bits)

    def calibrate(
        self,
        model_proto: onnx.ModelProto,
        calib_dataset: object,
        batch_size: int = 32,
        on_batch: Callable[[int], None] | None = None,
        threads: int | None = None,
    ) -> CalibrationResult:
        """Measure the model on the data and choose every exponent; nothing is written.

        Args:
            batch_size: samples per onnxruntime run when the data is an array (iterables keep their batches).
            on_batch: called with the number of samples after each batch (progress bars).
            threads: onnxruntime intra-op threads (None: onnxruntime's default).

        Raises:
            UnsupportedModelError: the model uses something ESP-DL cannot run (every problem listed).
            DatasetError: empty data, wrong shape or dtype, NaN/Inf (naming the first bad sample).
        """
        check_model(model_proto, target=None, bits=self.bits, strict=True)
        plan = plan_calibration(model_proto)
        runnable, batch_size = _batchable(model_proto, batch_size)
        initializers = {t.name for t in runnable.graph.initializer}
        inputs = [
            InputSpec(i.name, tuple(d if isinstance(d, int) else None for d in (tensor_shape(i) or [])))
            for i in runnable.graph.input
            if i.name not in initializers
        ]
        observers = {name: make_observer(self.method) for name in dict.fromkeys(plan.observed)}
        batches = iterate_batches(calib_dataset, inputs, batch_size)
        samples = collect(runnable, observers, batches, self.providers, on_batch, threads)
        int16 = resolve_int16_layers(plan, self.int16_layers)
        widths = tensor_widths(model_proto, plan, self.bits, int16)
        observed = {name: o.exponent(widths.get(name, self.bits)) for name, o in observers.items()} | plan.fixed
        for conv_output, reader_output in plan.range_from.items():  # at the Conv's own width (mixed precision)
            observed[conv_output] = observers[reader_output].exponent(widths.get(conv_output, self.bits))
        per_channel = self.granularity == "per-channel"
        weight_method = "mse" if self.method == "mse" else "minmax"  # the weights are known exactly: no histogram
        assignment = assign_exponents(model_proto, plan, observed, self.bits, per_channel, widths, weight_method)
        metadata = {
            "format_version": FORMAT_VERSION,
            "bits": self.bits,
            "granularity": self.granularity,
            "method": self.method,
            "target_independent": True,
            "graph_hash": graph_hash(model_proto),
            "samples": samples,
            "espquant_version": __version__,
            "float_tensors": plan.float_tensors,
            "requantize": [vars(r) for r in assignment.requantize],
            "int16_layers": int16,
        }
        table = QuantTable(assignment.exponents, metadata)
        return CalibrationResult(table, observers, samples, assignment.requantize, dict(plan.range_from))

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
    ) -> QuantTable:
        """Legacy API: calibrate and write the table to ``pickle_file_path`` (plus its ``.json`` twin).

        A progress bar shows on an interactive terminal (stderr), as the legacy toolkit's users expect.
        """
        with progress_bar("calibrating", _sample_count(calib_dataset)) as advance:
            result = self.calibrate(model_proto, calib_dataset, batch_size, on_batch=advance)
        result.table.save(pickle_file_path)
        return result.table
