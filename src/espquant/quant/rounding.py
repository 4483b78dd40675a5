"""The chip's rounding and saturation primitives (ARITHMETIC.md sections 1 and 3), on numpy integers.

``shift_round`` is ``SR(a, s)``: an integer accumulator divided by ``2**s`` with the profile's rounding
(half-up = floor(x + 1/2) on ESP32-S3 and the plain-C chips, half-to-even on ESP32-P4), computed exactly in
int64. ``round_float`` is ``R(v)`` for the float32 paths. ``saturate`` clamps to a signed width.
"""

from __future__ import annotations

import numpy as np

from espquant.quant.pot import qmax, qmin

__all__ = ["shift_round", "round_float", "saturate", "wrap"]


def shift_round(acc: np.ndarray, shift: int | np.ndarray, rounding: str) -> np.ndarray:
    """``SR(acc, shift)``: exact rounded division of int64 ``acc`` by ``2**shift`` (broadcast per channel).

    A shift of 0 leaves ``acc`` unchanged; a negative shift multiplies (the plain-C left shift).
    """
    acc = np.asarray(acc, dtype=np.int64)
    shift_array = np.asarray(shift, dtype=np.int64)
    if rounding not in ("half_up", "half_even"):
        raise ValueError(f"unknown rounding {rounding!r}")
    positive = np.maximum(shift_array, 1)
    half = np.int64(1) << (positive - 1)
    if rounding == "half_up":
        rounded = (acc + half) >> positive  # floor((a + 2^(s-1)) / 2^s)
    else:
        floor = acc >> positive
        remainder = acc & ((np.int64(1) << positive) - 1)
        # Round up when the remainder passes one half, or equals it and the floor is odd: r + (q & 1) > half.
        remainder += floor & 1
        rounded = floor + (remainder > half)
    if shift_array.size and shift_array.min() > 0:  # the common case: a right shift everywhere
        return rounded
    left = acc << np.maximum(-shift_array, 0)
    return np.where(shift_array > 0, rounded, np.where(shift_array == 0, acc, left)).astype(np.int64)


def round_float(values: np.ndarray, rounding: str) -> np.ndarray:
    """``R(v)``: float -> integer with the profile's rounding (half-up: floor(v + 0.5) in double). Values beyond
    +-2**62 become +-2**62 first: every width saturates them anyway, and converting them to int64 as they are
    would wrap (1e30 came out as the lowest int64, an input saturating to -128 instead of 127)."""
    values = np.clip(np.asarray(values), -(2.0**62), 2.0**62)
    if rounding == "half_up":
        return np.floor(values.astype(np.float64) + 0.5).astype(np.int64)
    if rounding == "half_even":
        return np.rint(values).astype(np.int64)
    raise ValueError(f"unknown rounding {rounding!r}")


def saturate(values: np.ndarray, bits: int) -> np.ndarray:
    """Clamp to the signed ``bits``-bit range."""
    return np.clip(values, qmin(bits), qmax(bits))


def wrap(values: np.ndarray, bits: int) -> np.ndarray:
    """Two's-complement wrap to ``bits`` bits (how the ESP32-S3 loads a bias into a 20-bit lane)."""
    values = np.asarray(values, dtype=np.int64)
    mask = (np.int64(1) << bits) - 1
    low = values & mask
    return np.where(low >= (np.int64(1) << (bits - 1)), low - (mask + 1), low)
