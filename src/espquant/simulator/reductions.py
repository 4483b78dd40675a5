"""ESP-DL v3.3.9's Reduce modules on integers, as their C code computes them (``dl_module_reduce_*.hpp``).

``ReduceBase::forward_template`` visits the reduced elements of one output in row-major order over the reduced
axes, so a float accumulation (ReduceProd, ReduceLogSumExp) is a sequential fold in that order here too:
float addition and multiplication are not associative. Integer sums accumulate in int32 for int8 inputs
(wrapping as C does) and in int64 for int16 inputs. The float steps keep C's types: ``float`` times
``float`` in float32; an ``int64_t`` or ``double`` operand promotes to double.

The chip converts float to int with saturation (RISC-V ``fcvt.w.s``, Xtensa ``round.s``); the result is then
clamped to int8 / int16 by ``tool::truncate``. So an infinite or huge value lands on the largest integer of
its sign, and NaN (the log of a negative sum) on the largest positive one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from espquant.quant.rounding import round_float, saturate, shift_round, wrap
from espquant.simulator.libm import expf

__all__ = ["REDUCE_KINDS", "reduce_integer", "sqrt_newton"]

F32 = np.float32
F64 = np.float64

# op type -> kind
REDUCE_KINDS = {
    "ReduceMean": "mean",
    "ReduceSum": "sum",
    "ReduceSumSquare": "sum_square",
    "ReduceMax": "max",
    "ReduceMin": "min",
    "ReduceL1": "l1",
    "ReduceL2": "l2",
    "ReduceProd": "prod",
    "ReduceLogSum": "log_sum",
    "ReduceLogSumExp": "log_sum_exp",
}

_INT32_LIMIT = 2.0**31
_NEWTON_EPSILON = F32(0.00001)  # dl::math::EN
_NEWTON_MAX_STEPS = 200  # the C loop has no bound; a value that never settles would hang the chip


def _scale(exponent: int) -> F32:
    """``DL_SCALE(e)`` (dl_define.hpp): 2^e as a float32."""
    return F32(2.0**exponent)


def sqrt_newton(x: np.ndarray) -> np.ndarray:
    """``dl::math::sqrt_newton`` (esp-dl/dl/math/include/dl_math.hpp): Newton steps in float32 from ``x``
    until two steps differ by at most 1e-5; 0 for 0."""
    shape = np.shape(x)
    x = np.asarray(x, dtype=F32).reshape(-1)
    result = x.copy()
    active = x != 0
    for _ in range(_NEWTON_MAX_STEPS):
        if not active.any():
            break
        last = result[active]
        # (last + x / last) * 0.5: the float sum times a double 0.5, stored back to float (exact halving)
        step = ((last + (x[active] / last).astype(F32)).astype(F32) * F32(0.5)).astype(F32)
        result[active] = step
        settled = np.abs((step - last).astype(F32)) <= _NEWTON_EPSILON
        index = np.flatnonzero(active)
        active[index[settled]] = False
    return np.where(x == 0, F32(0), result).astype(F32).reshape(shape)


def _to_int(values: np.ndarray, bits: int, rounding: str) -> np.ndarray:
    """``tool::truncate(ret, tool::round(v))`` with the chip's saturating float -> int conversion."""
    values = np.nan_to_num(np.asarray(values, dtype=F64), nan=_INT32_LIMIT, posinf=_INT32_LIMIT, neginf=-_INT32_LIMIT)
    return saturate(round_float(np.clip(values, -_INT32_LIMIT, _INT32_LIMIT), rounding), bits)


def _reduced_last(x: np.ndarray, axis: Sequence[int]) -> np.ndarray:
    """``x`` with its reduced axes moved last and flattened into one: the order ReduceBase visits them."""
    kept = [a for a in range(x.ndim) if a not in axis]
    moved = np.transpose(x, [*kept, *axis])
    return moved.reshape(*[x.shape[a] for a in kept], -1)


def _fold(values: np.ndarray, start: float, dtype: type, step: Callable[[np.ndarray, np.ndarray], np.ndarray]):
    """A sequential fold over the last axis, one output element per leading index, in ``dtype``."""
    acc = np.full(values.shape[:-1], start, dtype=dtype)
    for k in range(values.shape[-1]):
        acc = step(acc, values[..., k]).astype(dtype)
    return acc


def _integer_sum(x: np.ndarray, axis: tuple[int, ...], bits: int, term: Callable[[np.ndarray], np.ndarray]):
    """The runtime's integer accumulator: int32 for int8 inputs (C wraps), int64 for int16."""
    total = term(x.astype(np.int64)).sum(axis=axis)
    return wrap(total, 32) if bits == 8 else total


def reduce_integer(
    kind: str,
    x: np.ndarray,
    axis: tuple[int, ...],
    *,
    keepdims: bool,
    e_in: int,
    e_out: int,
    bits: int,
    rounding: str,
) -> np.ndarray:
    """One ESP-DL Reduce module on the integers ``x`` (``kind`` from :data:`REDUCE_KINDS`)."""
    shape = np.zeros(x.shape, dtype=np.int8).sum(axis=axis, keepdims=keepdims).shape
    if kind in ("max", "min"):  # passive: the output shares the input's exponent
        return (x.max if kind == "max" else x.min)(axis=axis, keepdims=keepdims)
    if kind in ("sum", "sum_square", "l1"):  # tool::shift_and_round, then truncate (dl_module_reduce_sum*.hpp)
        term = {"sum": lambda v: v, "sum_square": lambda v: v * v, "l1": np.abs}[kind]
        shift = e_out - (2 * e_in if kind == "sum_square" else e_in)
        total = _integer_sum(x, axis, bits, term)
        return saturate(shift_round(total, shift, rounding), bits).reshape(shape)
    out_scale = _scale(-e_out)
    if kind == "mean":  # tmp * input_scale / count * output_scale, in float32
        count = int(np.prod([x.shape[a] for a in axis]))
        mean = ((_integer_sum(x, axis, bits, lambda v: v).astype(F32) * _scale(e_in)).astype(F32) / F32(count)).astype(
            F32
        )
        return _to_int((mean * out_scale).astype(F32), bits, rounding).reshape(shape)
    if kind == "l2":  # sqrt_newton(tmp * DL_SCALE(2 e_in)) * output_scale
        squares = _integer_sum(x, axis, bits, lambda v: v * v).astype(F32)
        root = sqrt_newton((squares * _scale(2 * e_in)).astype(F32))
        return _to_int((root * out_scale).astype(F32), bits, rounding).reshape(shape)
    if kind == "log_sum":  # log(tmp * input_scale) * output_scale, in float32
        total = _integer_sum(x, axis, bits, lambda v: v).astype(F32)
        with np.errstate(divide="ignore", invalid="ignore"):
            logged = np.log((total * _scale(e_in)).astype(F32)).astype(F32)
        return _to_int((logged * out_scale).astype(F32), bits, rounding).reshape(shape)
    values = _reduced_last(x, axis)
    real = (values.astype(F32) * _scale(e_in)).astype(F32)  # (*ptr) * input_scale, float32
    if kind == "prod":  # a float32 product at int8, a double product at int16 (dl_module_reduce_prod.hpp)
        if bits == 8:
            product = _fold(real, 1.0, F32, lambda acc, v: acc * v)
            scaled = (product * out_scale).astype(F32)
        else:
            product = _fold(real, 1.0, F64, lambda acc, v: acc * v.astype(F64))
            scaled = product * F64(out_scale)
        return _to_int(scaled, bits, rounding).reshape(shape)
    if kind == "log_sum_exp":  # int8: the 256-entry exp table of the input exponent; int16: expf per element
        if bits == 8:
            table = expf((_scale(e_in) * np.arange(-128, 128, dtype=F32)).astype(F32))
            exps = table[values.astype(np.int64) + 128]
        else:
            exps = expf(real)
        total = _fold(exps, 0.0, F32, lambda acc, v: acc + v)
        with np.errstate(divide="ignore", invalid="ignore"):
            logged = np.log(total).astype(F32)
        return _to_int((logged * out_scale).astype(F32), bits, rounding).reshape(shape)
    raise ValueError(f"unknown reduction {kind!r}")
