"""The legacy-compatible ``Evaluator``: configuration (bit width, granularity, target chip), providers, the
per-target model check, and the simulation itself: ``generate_quantized_model`` builds the integer model
from the float model and the quantization table, ``evaluate_quantized_model`` runs it like the chip."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from espquant.calibration.engine import GRANULARITIES
from espquant.checker import legacy_check, parse_bits
from espquant.errors import OptionError, QuantTableError, UnsupportedOpError
from espquant.quant.profiles import LIBRARIES, TARGETS, TargetProfile, get_target
from espquant.runtime import validate_providers
from espquant.simulator.interpreter import missing_kernels
from espquant.simulator.legacy import build_legacy_model, legacy_profile
from espquant.simulator.lowering import build_quantized_model
from espquant.simulator.quantized_model import QuantizedModel
from espquant.simulator.simulate import simulate
from espquant.table import QuantTable

__all__ = ["Evaluator"]

logger = logging.getLogger(__name__)


class Evaluator:
    """Simulates what the chip computes (legacy ESP-DL toolkit API).

    Both legacy forms are accepted: ``Evaluator("int8", "per-channel", "esp32s3")`` and
    ``Evaluator("int16", "esp32s3")`` (granularity then comes from the quantization table).

    ``library`` picks the runtime simulated: ``"v3"`` (ESP-DL v3, the default) or ``"legacy"``, the C++ library
    ``export_coefficient_to_cpp`` writes for (ESP-DL v1.1 / v2.0 on esp32, esp32s2, esp32c3, esp32s3), whose
    integer rules differ (docs/LEGACY_ARITHMETIC.md, :mod:`espquant.simulator.legacy`).
    """

    def __init__(
        self,
        quantization_bit: str,
        granularity: str | None = None,
        target_chip: str = "esp32s3",
        library: str = "v3",
    ) -> None:
        if library not in LIBRARIES:
            raise OptionError(f"library {library!r}: use one of {', '.join(LIBRARIES)}.")
        self.library = library
        self.bits = parse_bits(quantization_bit)
        if granularity is not None and granularity not in GRANULARITIES:
            if granularity.lower().replace("-", "") in TARGETS:
                granularity, target_chip = None, granularity
            else:
                raise OptionError(
                    f"granularity {granularity!r}: use one of {', '.join(GRANULARITIES)} "
                    f"(or pass the target chip as the second argument)."
                )
        if self.bits == 16 and granularity == "per-channel":
            raise OptionError("int16 quantization is per-tensor only (ESP-DL has no per-channel int16 weights).")
        self.granularity = granularity
        self.target: TargetProfile = self._profile(target_chip)
        self.providers = ["CPUExecutionProvider"]
        self.quantized: QuantizedModel | None = None
        self._float_model: onnx.ModelProto | None = None
        self._table: QuantTable | None = None
        self._warn_per_channel()

    def _warn_per_channel(self) -> None:
        if self.granularity == "per-channel" and not self.target.per_channel_weights:
            logger.warning(
                "per-channel weights on %s: simulated as asked, but that chip's ESP-DL runtime supports "
                "per-tensor weights only",
                self.target.name,
            )

    def _profile(self, target_chip: str) -> TargetProfile:
        """The chip's profile; for the legacy library only the chips it served."""
        return legacy_profile(target_chip) if self.library == "legacy" else get_target(target_chip)

    def _build(self, model: onnx.ModelProto, table: QuantTable) -> QuantizedModel:
        if self.library == "legacy":
            return build_legacy_model(model, table, self.target, self.bits)
        return build_quantized_model(model, table, self.target, self.bits)

    @property
    def target_chip(self) -> str:
        return self.target.name

    def set_target_chip(self, target_chip: str) -> None:
        """Switch the target chip (an unknown name lists the valid ones); a built model is rebuilt for it."""
        self.target = self._profile(target_chip)
        self._warn_per_channel()
        if self._float_model is not None and self._table is not None:
            self.quantized = self._build(self._float_model, self._table)

    def set_providers(self, providers: Sequence[str]) -> None:
        """onnxruntime execution providers used for the float reference."""
        self.providers = validate_providers(providers)

    def check_model(self, model_proto: onnx.ModelProto) -> int:
        """Legacy contract: log every problem on this target and return -1 if incompatible, else 0."""
        return legacy_check(model_proto, target=self.target, bits=self.bits)

    def generate_quantized_model(
        self, model_proto: onnx.ModelProto, pickle_file_path: str | os.PathLike[str] | QuantTable
    ) -> QuantizedModel:
        """Build the integer model the chip would hold from the float model and its quantization table.

        Raises:
            QuantTableError: a table of another model, of another bit width, or missing tensors.
            UnsupportedModelError / UnsupportedOpError: something the chip or the simulator cannot run.
        """
        table = pickle_file_path if isinstance(pickle_file_path, QuantTable) else QuantTable.load(pickle_file_path)
        table_bits = table.metadata.get("bits")
        if table_bits is not None and table_bits != self.bits:
            raise QuantTableError(f"the table was calibrated for int{table_bits}, this Evaluator is int{self.bits}.")
        if self.granularity is None:
            self.granularity = table.metadata.get("granularity", "per-tensor")
            self._warn_per_channel()
        missing = missing_kernels(model_proto)
        if missing:
            raise UnsupportedOpError(f"the simulator has no kernel yet for: {', '.join(missing)}.")
        self._float_model, self._table = model_proto, table
        self.quantized = self._build(model_proto, table)
        return self.quantized

    def export_espdl(self, path: str | os.PathLike[str], test_inputs: Any = None, force: bool = False) -> Path:
        """Write the quantized model as an ESP-DL v3 ``.espdl`` file for this target (atomically).

        Args:
            path: the output file; an existing one is only replaced with ``force``.
            test_inputs: float inputs (an array, or a dict per input); the first sample and the outputs the
                simulator computes for it are embedded as the file's test values. Default: fixed
                pseudo-random integers over the input's whole range.

        Raises:
            TargetError: per-channel exponents for a chip that runs per-tensor weights only.
            UnsupportedOpError: an operator the exporter cannot write yet (nothing is written).
        """
        from espquant.export.espdl_export import export_espdl

        if self.library != "v3":
            raise OptionError("export_espdl writes ESP-DL v3 files: use an Evaluator with library='v3'.")
        if self.quantized is None or self._float_model is None:
            raise OptionError("call generate_quantized_model(model, table) before export_espdl.")
        return export_espdl(self.quantized, self._float_model, path, test_inputs=test_inputs, force=force)

    def evaluate_quantized_model(
        self, batch_fp_input: np.ndarray | dict[str, np.ndarray], to_float: bool = False
    ) -> tuple[list[np.ndarray], list[str]]:
        """Quantize the float inputs as the chip does, run the integer model, return its outputs.

        Returns:
            ``(outputs, output_names)`` in the ONNX model's order and layout: the integers the chip
            produces, or with ``to_float`` those integers times ``2**exponent``.
        """
        if self.quantized is None:
            raise OptionError("call generate_quantized_model(model, table) before evaluate_quantized_model.")
        return simulate(self.quantized, self._float_model, batch_fp_input, to_float)

    # The legacy toolkit spelled it so, and Espressif's own example (tools/quantization_tool/examples/example.py)
    # calls it by that name: kept so the example runs with only its imports changed.
    evalute_quantized_model = evaluate_quantized_model
