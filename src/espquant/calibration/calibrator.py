"""The legacy-compatible ``Calibrator``: its configuration (bit width, granularity, method), providers,
and the model check. Calibration itself builds on this class."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnx

from espquant.checker import legacy_check, parse_bits
from espquant.errors import OptionError
from espquant.providers import validate_providers

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
