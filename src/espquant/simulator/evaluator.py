"""The legacy-compatible ``Evaluator``: its configuration (bit width, granularity, target chip),
providers and the per-target model check. Simulation builds on this class."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import onnx

from espquant.calibration.calibrator import GRANULARITIES
from espquant.checker import legacy_check, parse_bits
from espquant.errors import OptionError
from espquant.providers import validate_providers
from espquant.quant.profiles import TARGETS, TargetProfile, get_target

__all__ = ["Evaluator"]

logger = logging.getLogger(__name__)


class Evaluator:
    """Simulates what the chip computes (legacy ESP-DL toolkit API).

    Both legacy forms are accepted: ``Evaluator("int8", "per-channel", "esp32s3")`` and
    ``Evaluator("int16", "esp32s3")`` (granularity then comes from the quantization table).
    """

    def __init__(self, quantization_bit: str, granularity: str | None = None, target_chip: str = "esp32s3") -> None:
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
        self.target: TargetProfile = get_target(target_chip)
        self.providers = ["CPUExecutionProvider"]
        self._warn_per_channel()

    def _warn_per_channel(self) -> None:
        if self.granularity == "per-channel" and not self.target.per_channel_weights:
            logger.warning(
                "per-channel weights on %s: simulated as asked, but that chip's ESP-DL runtime supports "
                "per-tensor weights only",
                self.target.name,
            )

    @property
    def target_chip(self) -> str:
        return self.target.name

    def set_target_chip(self, target_chip: str) -> None:
        """Switch the target chip (an unknown name lists the valid ones)."""
        self.target = get_target(target_chip)
        self._warn_per_channel()

    def set_providers(self, providers: Sequence[str]) -> None:
        """onnxruntime execution providers used for the float reference."""
        self.providers = validate_providers(providers)

    def check_model(self, model_proto: onnx.ModelProto) -> int:
        """Legacy contract: log every problem on this target and return -1 if incompatible, else 0."""
        return legacy_check(model_proto, target=self.target, bits=self.bits)
