"""Target profiles: the arithmetic facts of each chip family, as data.

ESP-DL v3 has three arithmetic families (spec ARITHMETIC.md section 0): ESP32-S3 (PIE v1), ESP32-P4 /
ESP32-S31 (PIE v2) and the plain-C chips. Everything that differs between them (rounding, accumulator and
bias widths, per-channel weights) lives here, so kernels, the calibrator and the checker read a profile
instead of testing chip names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from espquant.errors import TargetError

__all__ = ["TargetProfile", "TARGETS", "LEGACY_TARGETS", "LIBRARIES", "get_target", "target_names"]

Family = Literal["s3", "p4", "c"]
Rounding = Literal["half_up", "half_even"]


@dataclass(frozen=True)
class TargetProfile:
    """Arithmetic facts of one target chip (ARITHMETIC.md section 0).

    Attributes:
        name: the ESP-PPQ / ESP-IDF target name, e.g. ``"esp32s3"``.
        family: ``"s3"``, ``"p4"`` or ``"c"``: chips of one family compute identically.
        rounding: rounding of every right shift and float->int conversion.
        per_channel_weights: whether Conv/ConvTranspose/Gemm weights may carry one exponent per output channel.
        conv_acc_bits: accumulator width of Conv/Gemm/MatMul per activation width (8, 16) for the SIMD
            lanes (S3 int8: 20-bit saturating lanes), or the C type width on plain-C chips.
        tail_acc_bits: accumulator width for the channels left over after the 16 (int8) / 8 (int16) lane
            blocks (S3 ACCX / P4 XACC: 40 bits); equals ``conv_acc_bits`` on plain-C chips.
        bias_bits: bias payload width per activation width, as ESP-PPQ clips it.
        simd: whether the chip has PIE SIMD kernels (S3, P4).
        requant_multiplier_bits: per activation width, the width in which the SIMD RequantizeLinear
            broadcasts a left shift's multiplier ``2^-d`` (tensors above 50 elements): on the S3 an int8 left
            shift by 7 multiplies by -128 and by 8 or more by 0 (ARITHMETIC.md 6). Absent: exact.
    """

    name: str
    family: Family
    rounding: Rounding
    per_channel_weights: bool
    conv_acc_bits: dict[int, int]
    tail_acc_bits: dict[int, int]
    bias_bits: dict[int, int]
    simd: bool
    description: str
    requant_multiplier_bits: dict[int, int] = field(default_factory=dict)

    def requant_multiplier(self, bits: int, shift: int) -> int | None:
        """The multiplier a RequantizeLinear left shift (``shift < 0``) really applies when it differs from
        ``2^-shift`` (the broadcast wraps it), else None."""
        width = self.requant_multiplier_bits.get(bits)
        if shift >= 0 or width is None:
            return None
        exact = 1 << -shift
        wrapped = exact & ((1 << width) - 1)
        wrapped -= (1 << width) if wrapped >= 1 << (width - 1) else 0
        return None if wrapped == exact else wrapped


_S3 = dict(
    family="s3",
    rounding="half_up",
    per_channel_weights=False,
    conv_acc_bits={8: 20, 16: 40},
    tail_acc_bits={8: 40, 16: 40},
    bias_bits={8: 20, 16: 40},
    simd=True,
    requant_multiplier_bits={8: 8},
)
_P4 = dict(
    family="p4",
    rounding="half_even",
    per_channel_weights=True,
    conv_acc_bits={8: 32, 16: 64},
    tail_acc_bits={8: 40, 16: 40},
    bias_bits={8: 32, 16: 40},
    simd=True,
    requant_multiplier_bits={8: 16},
)
_C = dict(
    family="c",
    rounding="half_up",
    per_channel_weights=False,
    conv_acc_bits={8: 32, 16: 64},
    tail_acc_bits={8: 32, 16: 64},
    bias_bits={8: 32, 16: 64},
    simd=False,
)

TARGETS: dict[str, TargetProfile] = {
    "esp32s3": TargetProfile(name="esp32s3", description="ESP32-S3 (PIE v1 SIMD)", **_S3),
    "esp32p4": TargetProfile(name="esp32p4", description="ESP32-P4 (PIE v2 SIMD)", **_P4),
    "esp32s31": TargetProfile(name="esp32s31", description="ESP32-S31 (PIE v2 SIMD, as ESP32-P4)", **_P4),
    **{
        name: TargetProfile(name=name, description=f"{label} (plain C kernels)", **_C)
        for name, label in [
            ("esp32", "ESP32"),
            ("esp32s2", "ESP32-S2"),
            ("esp32c2", "ESP32-C2"),
            ("esp32c3", "ESP32-C3"),
            ("esp32c5", "ESP32-C5"),
            ("esp32c6", "ESP32-C6"),
        ]
    },
}


# The runtimes espquant simulates: ESP-DL v3 (every target above), and the legacy C++ library (v1.1 / v2.0, the
# layers ``export_coefficient_to_cpp`` writes) on the chips it served (simulator/legacy.py).
LIBRARIES = ("v3", "legacy")
LEGACY_TARGETS = ("esp32", "esp32s2", "esp32c3", "esp32s3")


def target_names() -> list[str]:
    """Every valid target name."""
    return list(TARGETS)


def get_target(name: str | TargetProfile) -> TargetProfile:
    """The profile of target ``name`` (case-insensitive, dashes ignored, e.g. ``ESP32-S3``).

    Raises:
        TargetError: an unknown name, listing the valid ones.
    """
    if isinstance(name, TargetProfile):
        return name
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    if key not in TARGETS:
        raise TargetError(f"unknown target chip {name!r}; valid targets: {', '.join(TARGETS)}.")
    return TARGETS[key]
