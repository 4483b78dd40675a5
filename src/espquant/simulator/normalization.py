"""ESP-DL v3.3.9's normalisation modules on integers, as their C code computes them.

- LayerNormalization (``dl_module_layer_normalization.hpp``): an int32 sum for the mean, a float32 variance
  accumulated element by element, ``1 / sqrt_newton(var + eps)``; Scale and B are integers with their own
  exponents.
- RMSNormalization (``dl_module_rms_normalization.hpp``, ``dl/base/dl_base_norm.cpp``): an exact integer sum of
  squares, ``1 / sqrtf(mean + eps)``, a float32 scale per element. The ESP32-S3 / ESP32-P4 assembly
  (``dl_tie728_rms_normalization.S``, ``dl_esp32p4_rms_normalization.S``) multiplies in the same order and
  rounds by the target's rule, so one kernel serves every target.
- LpNormalization (``dl_module_lp_normalization.hpp``): ``1 / sum|x|`` (p = 1) or ``1 / sqrtf(sum x^2)``
  (p = 2) of the integers; the input exponent cancels. Normalising the last axis folds the output scale into
  the factor first; another axis multiplies by it after: the two round differently, and so does this kernel.

Every reduction runs over ``x.shape[axis:]`` (Layer / RMS) or along ``axis`` (Lp). The float steps keep C's
types; the chip's compiler may contract ``a * b + c`` into a fused multiply-add where the host's does not
(LayerNormalization's ``normalized * scale + bias``), which can move a result by one step at a tie.
"""

from __future__ import annotations

import numpy as np

from espquant.quant.rounding import round_float, saturate, wrap
from espquant.simulator.reductions import sqrt_newton

__all__ = ["layer_normalization", "rms_normalization", "lp_normalization"]

F32 = np.float32


def _scale(exponent: int) -> F32:
    """``DL_SCALE(e)`` (dl_define.hpp): 2^e as a float32."""
    return F32(2.0**exponent)


def _rows(x: np.ndarray, axis: int) -> np.ndarray:
    """``x`` as (outer, inner) rows: the runtime's view for a normalisation over ``x.shape[axis:]``."""
    axis %= x.ndim
    return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)


def _per_element(operand: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    """A Scale / B operand as one row of the normalised shape (ONNX broadcasts it; the file stores it whole)."""
    return np.broadcast_to(np.asarray(operand), x.shape[axis % x.ndim :]).reshape(1, -1)


def _to_int(values: np.ndarray, bits: int, rounding: str) -> np.ndarray:
    """``tool::truncate(out, tool::round(v))``."""
    return saturate(round_float(np.asarray(values, dtype=F32), rounding), bits)


def layer_normalization(
    x: np.ndarray,
    scale: np.ndarray | None,
    bias: np.ndarray | None,
    *,
    axis: int,
    epsilon: float,
    e_in: int,
    e_scale: int,
    e_bias: int,
    e_out: int,
    bits: int,
    rounding: str,
) -> np.ndarray:
    """LayerNormalization's Y on integers (scale and bias as integers of the normalised shape, or None)."""
    rows = _rows(x.astype(np.int64), axis)
    inner = rows.shape[1]
    total = wrap(rows.sum(axis=1), 32)  # int sum_val
    mean = (total.astype(np.float64) * 1.0 / inner).astype(F32)  # sum_val * 1.0 / inner_dim, stored as float
    variance = np.zeros(rows.shape[0], dtype=F32)
    for j in range(inner):  # float diff = x - mean; variance += diff * diff, in order
        diff = (rows[:, j].astype(F32) - mean).astype(F32)
        variance = (variance + (diff * diff).astype(F32)).astype(F32)
    input_scale = _scale(e_in)
    mean = (mean * input_scale).astype(F32)
    variance = (variance * F32(input_scale * input_scale)).astype(F32)
    variance = (variance / F32(inner)).astype(F32)
    inv_std = (F32(1.0) / sqrt_newton((variance + F32(epsilon)).astype(F32))).astype(F32)
    values = (rows.astype(F32) * input_scale).astype(F32)
    normalized = ((values - mean[:, None]).astype(F32) * inv_std[:, None]).astype(F32)
    if scale is not None:
        factor = (_per_element(scale, x, axis).astype(F32) * _scale(e_scale)).astype(F32)
        normalized = (normalized * factor).astype(F32)
    if bias is not None:
        offset = (_per_element(bias, x, axis).astype(F32) * _scale(e_bias)).astype(F32)
        normalized = (normalized + offset).astype(F32)
    else:  # bias_val = 0.0f is still added (a no-op but for -0.0)
        normalized = (normalized + F32(0.0)).astype(F32)
    return _to_int((normalized * _scale(-e_out)).astype(F32), bits, rounding).reshape(x.shape)


def rms_normalization(
    x: np.ndarray, scale: np.ndarray, *, axis: int, epsilon: float, e_in: int, e_out: int, bits: int, rounding: str
) -> np.ndarray:
    """RMSNormalization's Y on integers; ``scale`` is float32 of the normalised shape (the file stores it so)."""
    rows = _rows(x.astype(np.int64), axis)
    inner = rows.shape[1]
    squares = (rows * rows).sum(axis=1)  # base::reduce_l2: exact (int32 / int64, the SIMD parts in chunks)
    if bits == 8:
        squares = wrap(squares, 32)
    input_scale = _scale(e_in)
    mean_sq = ((squares.astype(F32) * F32(input_scale * input_scale)).astype(F32) / F32(inner)).astype(F32)
    rms = (F32(1.0) / np.sqrt((mean_sq + F32(epsilon)).astype(F32)).astype(F32)).astype(F32)  # fast_inv_sqrt
    rms = (rms * F32(input_scale * _scale(-e_out))).astype(F32)
    result = (rows.astype(F32) * rms[:, None]).astype(F32)
    result = (result * _per_element(scale, x, axis).astype(F32)).astype(F32)
    return _to_int(result, bits, rounding).reshape(x.shape)


def lp_normalization(x: np.ndarray, *, axis: int, p: int, e_out: int, bits: int, rounding: str) -> np.ndarray:
    """LpNormalization on integers along ``axis`` (p = 1 or 2)."""
    axis %= x.ndim
    moved = np.moveaxis(x.astype(np.int64), axis, -1)
    if p == 1:  # float sum_abs, element by element
        norm = np.zeros(moved.shape[:-1], dtype=F32)
        for k in range(moved.shape[-1]):
            norm = (norm + np.abs(moved[..., k]).astype(F32)).astype(F32)
        inv = np.where(norm > 0, (F32(1.0) / np.where(norm > 0, norm, F32(1))).astype(F32), F32(0))
    else:  # reduce_l2 in integers, then fast_inv_sqrt (1.0f / sqrtf) of its float
        squares = (moved * moved).sum(axis=-1)
        norm = (wrap(squares, 32) if bits == 8 else squares).astype(F32)
        with np.errstate(divide="ignore"):
            inv = np.where(norm > 0, (F32(1.0) / np.sqrt(np.where(norm > 0, norm, F32(1)))).astype(F32), F32(0))
    inv = inv.astype(F32)[..., None]
    output_scale = _scale(-e_out)
    values = moved.astype(F32)
    if axis == x.ndim - 1:  # inv_norm *= output_scale; round(x * inv_norm)
        result = (values * (inv * output_scale).astype(F32)).astype(F32)
    else:  # round((x * inv_norm) * output_scale)
        result = ((values * inv).astype(F32) * output_scale).astype(F32)
    out = np.where(inv > 0, _to_int(result, bits, rounding), 0)
    return np.moveaxis(out, -1, axis)
