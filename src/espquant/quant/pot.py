"""Power-of-two quantization arithmetic shared by the calibrator, the quantizer and the simulator.

ESP-DL numbers are ``real = q * 2**e`` with ``q`` a signed integer of ``bits`` bits, symmetric, no zero
point (ARITHMETIC.md section 1).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "qmin",
    "qmax",
    "exponent_for_max_abs",
    "EXPONENT_LIMIT",
    "DEFAULT_EMPTY_EXPONENT",
    "MAX_RIGHT_SHIFT",
    "EXACT_FLOAT32",
    "EXACT_FLOAT64",
    "simd_lanes",
]

# Every integer of smaller magnitude is exact in float32 / float64, and so is every sum of such integers that
# stays below it, in any order: the bound that lets float BLAS and onnxruntime compute integer sums exactly.
EXACT_FLOAT32 = 2.0**24
EXACT_FLOAT64 = 2.0**53

# The largest right shift the runtime's kernels can apply: ESP-DL shifts int32 accumulators and products with C
# shifts (``tool::shift_and_round``, ``DL_RIGHT_SHIFT``), undefined from 32 on, and the ESP32-P4 SIMD shift's
# behaviour there is not documented. Every exponent rule keeps ``e_out - e_in - e_w`` (and the other shifts)
# at or below this.
MAX_RIGHT_SHIFT = 31


def simd_lanes(bits: int) -> int:
    """Elements per 128-bit SIMD register of the ESP32-S3 / -P4 (16 int8, 8 int16): their weight blocks."""
    return 16 if bits == 8 else 8


def qmax(bits: int) -> int:
    """Largest integer of a signed ``bits``-bit value (127 for int8)."""
    return (1 << (bits - 1)) - 1


def qmin(bits: int) -> int:
    """Smallest integer of a signed ``bits``-bit value (-128 for int8)."""
    return -(1 << (bits - 1))


# ESP-DL scales activations by DL_SCALE(e) / DL_RESCALE(e) = 1 << |e| (dl_define.hpp): a C int shift, defined
# for |e| <= 30. Activation and weight exponents stay in that range (a tensor below 2^-30 is zero at int8).
EXPONENT_LIMIT = 30


def DEFAULT_EMPTY_EXPONENT(bits: int) -> int:  # noqa: N802 - reads as the constant it is
    """Exponent for an all-zero tensor: any exponent is exact; this one represents [-1, 1) as a neutral choice."""
    return -(bits - 1)


def exponent_for_max_abs(max_abs: float | np.ndarray, bits: int) -> int:
    """The smallest exponent ``e`` with ``max_abs <= qmax(bits) * 2**e``, kept within ``±EXPONENT_LIMIT``.

    A value exactly on the boundary (``max_abs == qmax * 2**e``) takes that ``e``: it is representable
    without clipping. ``max_abs == 0`` gives :func:`DEFAULT_EMPTY_EXPONENT`.
    """
    value = float(max_abs)
    if not math.isfinite(value):
        raise ValueError(f"cannot choose an exponent for a non-finite range {value}")
    if value <= 0.0:
        return DEFAULT_EMPTY_EXPONENT(bits)
    limit = qmax(bits)
    exponent = math.ceil(math.log2(value / limit))
    # log2 rounding can be off by one near exact powers: settle it with exact float comparisons.
    while value > limit * 2.0**exponent:
        exponent += 1
    while exponent > -1074 and value <= limit * 2.0 ** (exponent - 1):
        exponent -= 1
    return min(max(exponent, -EXPONENT_LIMIT), EXPONENT_LIMIT)
