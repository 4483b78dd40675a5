"""ESP-DL's integer kernels, in numpy, following ARITHMETIC.md operation by operation.

Every kernel takes integer arrays in the layout the chip holds them (NHWC around conv-like ops, as the
file stores them) and a ``TargetProfile``; it never tests a chip name. Integer accumulation is exact:
float64 BLAS where the bound ``sum |w||x| + |b| < 2**53`` is checked, int64 otherwise. Where a
saturating accumulator lane (ESP32-S3 int8: 20 bits) could overflow, the products are accumulated one tap
at a time in filter-memory order with saturation after each, as the SIMD instruction does.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from espquant.ops.broadcast import merged_broadcast_shapes
from espquant.quant.pot import EXACT_FLOAT32, EXACT_FLOAT64, simd_lanes
from espquant.quant.profiles import TargetProfile
from espquant.quant.rounding import round_float, saturate, shift_round, wrap
from espquant.simulator.libm import expf

__all__ = [
    "conv2d_nhwc",
    "matmul_slices",
    "add",
    "sub",
    "mul",
    "average_pool_nhwc",
    "max_pool_nhwc",
    "resize_nearest_nhwc",
    "lut_int8",
    "softmax_float",
    "softmax_table",
    "quantize_float",
]

F32 = np.float32


def _max_abs(values: np.ndarray) -> int:
    return max(int(values.max(initial=0)), -int(values.min(initial=0))) if values.size else 0


def _exact_matmul(a: np.ndarray, b: np.ndarray, bound: float) -> np.ndarray:
    """``a @ b`` for integers, exactly: float32 BLAS when every partial sum stays below 2**24, float64 below
    2**53 (``bound`` = max |a| * max column sum |b|), int64 otherwise."""
    if bound < EXACT_FLOAT32:
        return (a.astype(np.float32) @ b.astype(np.float32)).astype(np.int64)
    if bound < EXACT_FLOAT64:
        return (a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)
    return a.astype(np.int64) @ b.astype(np.int64)


_TAP_BLOCK = 32  # taps added at once when no running sum inside the block can reach the rail


def _saturating_accumulate(cols: np.ndarray, weight: np.ndarray, start: np.ndarray, bits: int) -> np.ndarray:
    """``start + sum_t cols[:, t] * weight[t, :]`` with the running value clamped to ``bits`` after every tap."""
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    acc = np.broadcast_to(start, (cols.shape[0], weight.shape[1])).astype(np.int64).copy()
    columns = cols.astype(np.int64)
    weights = weight.astype(np.int64)
    for first in range(0, weights.shape[0], _TAP_BLOCK):
        products = columns[:, first : first + _TAP_BLOCK, None] * weights[None, first : first + _TAP_BLOCK]
        # No running sum inside the block can reach a rail when |acc| + sum |products| stays below 2^(bits-1):
        # then the block adds at once (exactly what tap-by-tap clamping would give).
        if int((np.abs(acc) + np.abs(products).sum(axis=1)).max(initial=0)) < (1 << (bits - 1)):
            acc += products.sum(axis=1)
            continue
        for tap in range(products.shape[1]):
            acc += products[:, tap]
            np.minimum(acc, high, out=acc)
            np.maximum(acc, low, out=acc)
    return acc


def _lane_start(bias: np.ndarray | None, n: int, bits: int, profile: TargetProfile, blocked: int) -> np.ndarray:
    start = np.zeros(n, np.int64) if bias is None else bias.astype(np.int64).copy()
    if profile.family == "s3" and bits == 8 and blocked:
        start[:blocked] = wrap(start[:blocked], profile.conv_acc_bits[bits])  # 20-bit lanes wrap the bias
    return start


def _accumulate(
    cols: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, bits: int, profile: TargetProfile
) -> np.ndarray:
    """Accumulators ``(rows, N)`` for ``cols (rows, taps)`` and ``weight (taps, N)``, starting from the bias,
    with the profile's lane width and saturation (16/8-lane blocks vs the tail channels)."""
    n = weight.shape[1]
    blocked = (n // simd_lanes(bits)) * simd_lanes(bits) if profile.simd else 0
    start = _lane_start(bias, n, bits, profile, blocked)
    x_max = float(_max_abs(cols))
    column_sums = np.abs(weight.astype(np.int64)).sum(axis=0)
    out = np.empty((cols.shape[0], n), np.int64)
    for low, high, width in ((0, blocked, profile.conv_acc_bits[bits]), (blocked, n, profile.tail_acc_bits[bits])):
        if low == high:
            continue
        products = x_max * float(column_sums[low:high].max())
        part, part_start = weight[:, low:high], start[low:high]
        limit = 2.0 ** (width - 1)
        out[:, low:high] = _exact_matmul(cols, part, products) + part_start
        if profile.simd and products + float(_max_abs(part_start)) >= limit:
            _emulate_risky(out[:, low:high], cols, part, part_start, products, width)
    return out


def _emulate_risky(
    acc: np.ndarray, cols: np.ndarray, weight: np.ndarray, start: np.ndarray, products: float, width: int
) -> None:
    """Overwrite, in ``acc`` (the exact sums), the outputs whose lane can reach its rail on this data with the
    tap-by-tap saturating accumulation. A lane's running sum is bounded by ``|start| + sum_t |x_t w_t|``
    (computed exactly per output), so every other output never saturates and its exact sum is the chip's."""
    magnitude = _exact_matmul(np.abs(cols.astype(np.int64)), np.abs(weight.astype(np.int64)), products)
    risky = magnitude + np.abs(start) >= 2.0 ** (width - 1)
    if not risky.any():
        return
    rows, columns = np.flatnonzero(risky.any(axis=1)), np.flatnonzero(risky.any(axis=0))
    acc[np.ix_(rows, columns)] = _saturating_accumulate(cols[rows], weight[:, columns], start[columns], width)


def _accumulate_depthwise(
    cols: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, bits: int, profile: TargetProfile
) -> np.ndarray:
    """Depthwise accumulators ``(rows, C)`` for ``cols (rows, taps, C)``, ``weight (taps, C)``; every channel
    runs in the SIMD lanes (no tail path for depthwise, ARITHMETIC.md 4.3)."""
    n = weight.shape[1]
    lane_bits = profile.conv_acc_bits[bits]
    start = _lane_start(bias, n, bits, profile, n if profile.simd else 0)
    products = float(_max_abs(cols)) * float(np.abs(weight.astype(np.int64)).sum(axis=0).max(initial=0))
    kind = np.float32 if products < EXACT_FLOAT32 else (np.float64 if products < EXACT_FLOAT64 else np.int64)
    limit = 2.0 ** (lane_bits - 1)
    safe = not profile.simd or products + float(_max_abs(start)) < limit
    if not safe:  # the tight, data-dependent bound of every lane's running sum
        magnitude = np.einsum("rtc,tc->rc", np.abs(cols).astype(kind), np.abs(weight).astype(kind))
        safe = float((magnitude.astype(np.int64) + np.abs(start)).max(initial=0)) < limit
    if safe:
        acc = np.einsum("rtc,tc->rc", cols.astype(kind), weight.astype(kind))
        return acc.astype(np.int64) + start
    low, high = -(1 << (lane_bits - 1)), (1 << (lane_bits - 1)) - 1
    acc = np.broadcast_to(start, (cols.shape[0], n)).astype(np.int64).copy()
    columns, weights = cols.astype(np.int64), weight.astype(np.int64)
    for tap in range(weights.shape[0]):
        acc += columns[:, tap, :] * weights[tap]
        np.clip(acc, low, high, out=acc)
    return acc


def _finish(acc: np.ndarray, shift: np.ndarray | int, relu: bool, bits: int, profile: TargetProfile) -> np.ndarray:
    """Shift with the profile's rounding, fused ReLU, saturate (ARITHMETIC.md 4.1 steps 3-4)."""
    y = shift_round(acc, shift, profile.rounding)
    if relu:
        y = np.maximum(y, 0)
    return saturate(y, bits)


def conv_taps(
    padded: np.ndarray, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> list[np.ndarray]:
    """The ``KH * KW`` strided views of a padded NHWC tensor, one per kernel tap, in row-major tap order: the
    inputs every output position multiplies by that tap's weight (the order the runtimes accumulate in)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    out_h = (padded.shape[1] - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded.shape[2] - dw * (kw - 1) - 1) // sw + 1
    return [
        padded[:, i * dh : i * dh + sh * (out_h - 1) + 1 : sh, j * dw : j * dw + sw * (out_w - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]


def conv2d_nhwc(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    *,
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
    depthwise: bool,
    shift: np.ndarray | int,
    relu: bool,
    bits: int,
    profile: TargetProfile,
) -> np.ndarray:
    """Conv / depthwise Conv on NHWC integers; ``weight`` is ``(N, KH, KW, C)`` (depthwise: ``(N, KH, KW)``).

    ``pads`` in ONNX order ``[top, left, bottom, right]``; padding taps contribute nothing (zero padding).
    """
    batch, height, width, channels = x.shape
    kh, kw = weight.shape[1], weight.shape[2]
    sh, sw = strides
    dh, dw = dilations
    top, left, bottom, right = pads
    compact = np.int16 if bits <= 16 and _max_abs(x) < 2**15 else np.int64
    padded = np.zeros((batch, height + top + bottom, width + left + right, channels), compact)
    padded[:, top : top + height, left : left + width, :] = x
    taps = conv_taps(padded, (kh, kw), (sh, sw), (dh, dw))
    out_h, out_w = taps[0].shape[1:3]
    if depthwise:
        n = weight.shape[0]
        cols = np.stack(taps, axis=-2).reshape(-1, kh * kw, channels)  # (rows, taps, C)
        acc = _accumulate_depthwise(cols, weight.reshape(n, kh * kw).T, bias, bits, profile)
    else:
        n = weight.shape[0]
        cols = np.stack(taps, axis=3).reshape(-1, kh * kw * channels)  # (kh, kw, c) filter-memory order
        acc = _accumulate(cols, weight.reshape(n, -1).T, bias, bits, profile)
    return _finish(acc, shift, relu, bits, profile).reshape(batch, out_h, out_w, n)


def matmul_slices(
    a: np.ndarray, b: np.ndarray, *, shift: int, relu: bool, bits: int, profile: TargetProfile
) -> np.ndarray:
    """MatMul as 1x1 convolutions without bias per batch slice (``a (..., M, K)``, ``b (..., K, N)``)."""
    a2 = a if a.ndim > 1 else a[None, :]
    b2 = b if b.ndim > 1 else b[:, None]
    batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    a3 = np.broadcast_to(a2, (*batch, *a2.shape[-2:])).reshape(-1, *a2.shape[-2:])
    b3 = np.broadcast_to(b2, (*batch, *b2.shape[-2:])).reshape(-1, *b2.shape[-2:])
    out = np.stack(
        [_finish(_accumulate(sa, sb, None, bits, profile), shift, relu, bits, profile) for sa, sb in zip(a3, b3)]
    )
    out = out.reshape(*batch, a2.shape[-2], b2.shape[-1])
    if a.ndim == 1 and b.ndim == 1:
        return out.reshape(1)
    if a.ndim == 1:
        return out[..., 0, :]
    if b.ndim == 1:
        return out[..., 0]
    return out


def add(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    """Raw-integer saturating addition: no exponent alignment in the runtime (ARITHMETIC.md 5)."""
    return saturate(a.astype(np.int64) + b.astype(np.int64), bits)


def sub(a: np.ndarray, b: np.ndarray, bits: int) -> np.ndarray:
    return saturate(a.astype(np.int64) - b.astype(np.int64), bits)


def mul(
    a: np.ndarray, b: np.ndarray, *, e_a: int, e_b: int, e_out: int, bits: int, profile: TargetProfile
) -> np.ndarray:
    """Mul: integer SIMD rule when the merged innermost length fills the lanes on S3/P4, else float32."""
    merged_a, merged_b, merged_out = merged_broadcast_shapes(a.shape, b.shape)
    shape = np.broadcast_shapes(a.shape, b.shape)
    if profile.simd and merged_out[-1] >= simd_lanes(bits):
        product = a.astype(np.int64) * b.astype(np.int64)
        return saturate(shift_round(product, e_out - e_a - e_b, profile.rounding), bits).reshape(shape)
    k = F32(F32(F32(2.0**e_a) * F32(2.0**e_b)) * F32(2.0**-e_out))
    a2 = np.broadcast_to(a.reshape(merged_a), merged_out).astype(np.int64)
    b2 = np.broadcast_to(b.reshape(merged_b), merged_out).astype(np.int64)
    if merged_b[-1] == 1 and merged_a[-1] != 1:  # vector x scalar: k' = f32(b * k)
        scaled = a2.astype(F32) * (b2.astype(F32) * k).astype(F32)
    elif merged_a[-1] == 1 and merged_b[-1] != 1:
        scaled = b2.astype(F32) * (a2.astype(F32) * k).astype(F32)
    else:
        scaled = (a2 * b2).astype(F32) * k
    return saturate(round_float(scaled.astype(F32), profile.rounding), bits).reshape(shape)


def pool_arguments(attrs: dict[str, Any], spatial: Sequence[int], global_pool: bool) -> dict[str, Any]:
    """Kernel, strides and ``[top, left, bottom, right]`` pads of a 2-D pool (global: the whole plane)."""
    if global_pool:
        return {"kernel": tuple(spatial), "strides": (1, 1), "pads": (0, 0, 0, 0)}
    return {
        "kernel": attrs["kernel_shape"],
        "strides": attrs.get("strides", [1, 1]),
        "pads": attrs.get("pads", [0, 0, 0, 0]),
    }


def _pool_windows(x: np.ndarray, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int], fill: float):
    batch, height, width, channels = x.shape
    kh, kw = kernel
    sh, sw = strides
    top, left, bottom, right = pads
    padded = np.full((batch, height + top + bottom, width + left + right, channels), fill)
    padded[:, top : top + height, left : left + width, :] = x
    out_h = (height + top + bottom - kh) // sh + 1
    out_w = (width + left + right - kw) // sw + 1
    windows = [
        padded[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return np.stack(windows, axis=0)


def average_pool_nhwc(
    x: np.ndarray,
    *,
    kernel: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[int],
    e_in: int,
    e_out: int,
    bits: int,
    profile: TargetProfile,
) -> np.ndarray:
    """Integer sum of the taps inside the input, divided by the full kernel area in float32 steps (7)."""
    total = _pool_windows(x.astype(np.int64), kernel, strides, pads, 0).sum(axis=0)
    area = kernel[0] * kernel[1]
    inverse = F32(1.0) / F32(area)
    k = F32(F32(F32(2.0**e_in) * inverse) * F32(2.0**-e_out))
    return saturate(round_float((total.astype(F32) * k).astype(F32), profile.rounding), bits)


def max_pool_nhwc(x: np.ndarray, *, kernel: Sequence[int], strides: Sequence[int], pads: Sequence[int]) -> np.ndarray:
    """Max of raw integers over the taps inside the input (padding never wins)."""
    low = np.iinfo(np.int64).min
    return _pool_windows(x.astype(np.int64), kernel, strides, pads, low).max(axis=0)


def nearest_indices(size: int, scale: float) -> np.ndarray:
    """The source index of each output position of a nearest resize along one axis of ``size``: ``int(size *
    scale)`` outputs, ``min(trunc(i * f32(1 / f32(scale))), size - 1)`` (asymmetric + floor, float32 steps)."""
    return np.minimum((np.arange(int(size * scale)) * F32(1.0 / F32(scale))).astype(np.int64), size - 1)


def resize_nearest_nhwc(
    x: np.ndarray, *, scale_h: float, scale_w: float, e_in: int, e_out: int, bits: int, profile: TargetProfile
) -> np.ndarray:
    """Nearest (asymmetric + floor) resize of NHWC integers, rescaled when exponents differ (9)."""
    batch, height, width, channels = x.shape
    y = x[:, nearest_indices(height, scale_h)][:, :, nearest_indices(width, scale_w)]
    if e_in == e_out:
        return y
    shift, mult = max(0, e_out - e_in), 2 ** max(0, e_in - e_out)
    return saturate(round_float(y.astype(F32) * F32(mult) / F32(2**shift), profile.rounding), bits)


def lut_int8(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``out = T[q + 128]``: an int8 activation by its stored table (8.1)."""
    return table.reshape(-1)[x.astype(np.int64) + 128]


@functools.lru_cache(maxsize=64)
def softmax_table(e_in: int) -> np.ndarray:
    """The int8 Softmax's exp table (read only): inf where the chip's expf overflows (then NaN)."""
    table = expf((np.arange(256) - 128) * 2.0**e_in)
    table.flags.writeable = False
    return table


def softmax_float(x: np.ndarray, *, axis: int, e_in: int | None, bits: int | None) -> np.ndarray:
    """Softmax with float32 output: int8 via the exp table without max subtraction, else float (10)."""
    axis = axis % x.ndim
    moved = x if axis == x.ndim - 1 else np.moveaxis(x, axis, -1)
    if bits == 8 and e_in is not None:
        e = softmax_table(e_in)[moved.astype(np.int64) + 128]
    else:
        values = moved.astype(F32) * F32(2.0**e_in) if e_in is not None else moved.astype(F32)
        e = expf((values - values.max(axis=-1, keepdims=True)).astype(F32))
    # The sequential float32 sum the runtime takes: ufunc accumulate adds strictly left to right.
    total = np.add.accumulate(e, axis=-1, dtype=F32)[..., -1:]
    with np.errstate(invalid="ignore"):
        out = (e / total).astype(F32)
    return out if axis == x.ndim - 1 else np.moveaxis(out, -1, axis)


def requantize(x: np.ndarray, shift: int, bits: int, profile: TargetProfile) -> np.ndarray:
    """int -> int at another exponent: ``sat(SR(q, d))``, ``d = e_out - e_in`` (a left shift when negative),
    with the SIMD broadcast of a left shift's multiplier in the profile's width (ARITHMETIC.md 6: on the
    ESP32-S3 an int8 left shift by 7 multiplies by -128 and by 8 or more by 0; tensors above 50 elements)."""
    multiplier = profile.requant_multiplier(bits, shift)
    if multiplier is not None and x[0].size > 50:
        return saturate(x.astype(np.int64) * multiplier, bits)
    return saturate(shift_round(x, shift, profile.rounding), bits)


def quantize_float(x: np.ndarray, *, e_out: int, bits: int, profile: TargetProfile) -> np.ndarray:
    """QuantizeLinear: ``q = sat(R(x * f32(2**-e)))`` (6)."""
    return saturate(round_float((x.astype(F32) * F32(2.0**-e_out)).astype(F32), profile.rounding), bits)


def div(
    a: np.ndarray, b: np.ndarray, *, e_a: int, e_b: int, e_out: int, bits: int, profile: TargetProfile
) -> np.ndarray:
    """Div in float32 steps (ARITHMETIC.md 5): ``r = f32(f32(2^-e_out) 2^e_a) / 2^e_b``; vector / scalar
    ``sat(R(f32(a f32(r / b))))``, otherwise ``sat(R(f32(f32(a r) / b)))``; a = 0 gives 0 and b = 0 the type's
    extreme by the sign of a, except in the int8 scalar / vector table, whose b = 0 entry is 127 when
    ``a r > 0`` and -128 otherwise (so 0 / 0 gives -128 there)."""
    r = F32(F32(F32(2.0**-e_out) * F32(2.0**e_a)) / F32(2.0**e_b))
    shape = np.broadcast_shapes(a.shape, b.shape)
    a_full = np.broadcast_to(a.astype(np.int64), shape)
    b_full = np.broadcast_to(b.astype(np.int64), shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        if b.size == 1 and a.size > 1:
            values = (a_full.astype(F32) * F32(r / F32(b.reshape(-1)[0]))).astype(F32)
        else:
            values = ((a_full.astype(F32) * r).astype(F32) / b_full.astype(F32)).astype(F32)
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    values = np.nan_to_num(values, nan=0.0, posinf=float(high) + 1, neginf=float(low) - 1)
    out = saturate(round_float(values, profile.rounding), bits)
    if bits == 8 and a.size == 1 and b.size > 1:  # the scalar / vector table
        out[b_full == 0] = high if float(a.reshape(-1)[0]) * float(r) > 0 else low
    else:
        out[b_full == 0] = np.where(a_full[b_full == 0] > 0, high, low)
        out[a_full == 0] = 0
    return out


def pow_float(a: np.ndarray, b: np.ndarray, *, e_a: int, e_b: int, e_out: int, bits: int, profile: TargetProfile):
    """Pow: ``sat(R(f32(powf(a 2^e_a, b 2^e_b)) 2^-e_out))`` (5)."""
    with np.errstate(all="ignore"):
        base = (a.astype(F32) * F32(2.0**e_a)).astype(F32)
        exponent = (b.astype(F32) * F32(2.0**e_b)).astype(F32)
        value = (np.power(base, exponent).astype(F32) * F32(2.0**-e_out)).astype(F32)
    value = np.nan_to_num(value, nan=0.0, posinf=2.0**bits, neginf=-(2.0**bits))
    return saturate(round_float(value, profile.rounding), bits)


def mod_float(a: np.ndarray, b: np.ndarray, *, e_a: int, e_b: int, e_out: int, bits: int, profile: TargetProfile):
    """Mod: ``sat(R(fmodf(a 2^e_a, b 2^e_b) 2^-e_out))``, 0 where the divisor is 0 (``dl_base_mod.cpp``). fmod of
    two floats is exact, so numpy's and the chip's agree."""
    dividend = (a.astype(F32) * F32(2.0**e_a)).astype(F32)
    divisor = (b.astype(F32) * F32(2.0**e_b)).astype(F32)
    with np.errstate(invalid="ignore", divide="ignore"):
        remainder = np.where(divisor != 0, np.fmod(dividend, divisor), F32(0)).astype(F32)
    return saturate(round_float((remainder * F32(2.0**-e_out)).astype(F32), profile.rounding), bits)


def prelu_rescales_positives(profile: TargetProfile, bits: int) -> bool:
    """Whether the chip's per-channel PRelu rescales positive values from ``e_in`` to ``e_out``: the SIMD
    kernels do (ESP32-S3 at both widths; ESP32-P4 at int8, ``dl_esp32p4_prelu.S``: "pos part, *scale, right
    shift", with the half-even rounding ``prelu<int8_t>`` configures); the C reference (plain-C chips, P4
    int16) copies them unchanged, right only when ``e_in = e_out``."""
    return profile.family == "s3" or (profile.family == "p4" and bits == 8)


def prelu_rounds_negatives(profile: TargetProfile) -> bool:
    """Whether the chip's per-channel PRelu rounds ``q alpha`` to e_out with its rounding (ESP32-S3,
    ``dl_tie728_s8/s16_prelu``), rather than flooring it as the C reference does (``DL_RIGHT_SHIFT``), which
    espquant also takes for ESP32-P4 int8, whose ``esp.vprelu`` rounding is not documented."""
    return profile.family == "s3"


def prelu_per_channel(
    q: np.ndarray, slope: np.ndarray, *, e_in: int, e_out: int, e_slope: int, bits: int, profile: TargetProfile
) -> np.ndarray:
    """PRelu with one slope per channel (8.4), ``sh = e_out - e_in - e_alpha``.

    Negatives: ESP32-S3 (``dl_tie728_s8/s16_prelu``) ``SR(q alpha, sh)``; elsewhere, as the C reference
    (``prelu_11c``, ``esp-dl/dl/base/dl_base_prelu.cpp``) computes them and espquant also takes for ESP32-P4
    int8 (its ``esp.vprelu`` rounding is not documented), ``DL_RIGHT_SHIFT(q alpha, sh)``: a floor shift right
    or a plain shift left (``dl_define.hpp``). Positives: rescaled to e_out with the profile's rounding where
    :func:`prelu_rescales_positives`, else copied.
    """
    q64 = q.astype(np.int64)
    product = q64 * slope.astype(np.int64)
    if prelu_rounds_negatives(profile):
        negative = shift_round(product, e_out - e_in - e_slope, profile.rounding)
    else:
        shift = e_out - e_in - e_slope
        negative = product >> shift if shift > 0 else product << -shift
    if prelu_rescales_positives(profile, bits):
        up, down = max(0, e_in - e_out), max(0, e_out - e_in)
        positive = shift_round(q64 << up, down, profile.rounding) if down else q64 << up
    else:
        positive = q64
    return saturate(np.where(q64 > 0, positive, np.where(q64 < 0, negative, 0)), bits)


def lut_int16(x: np.ndarray, table: np.ndarray, *, interpolate: bool, half_even: bool) -> np.ndarray:
    """An int16 activation by its stored table of ``M = 65536 / step + 1`` entries (ARITHMETIC.md 8.2).

    ESP-DL 3.1 and later (``lut_s16_nearest_neighbor``, ``esp-dl/dl/base/dl_base_lut.cpp``): ``v = q + 32768``,
    ``i = v >> log2(step)``, ``r = v mod step``; the index moves up when ``r >= step / 2`` (ESP32-P4: ``r >
    step / 2``, or equal and ``i`` odd). 3.0.0-rc.2 (``interpolate``): ``T[i] + trunc((r (T[i+1] - T[i])) /
    step)`` with ``i = v / step``.
    """
    table = table.reshape(-1).astype(np.int64)
    v = x.astype(np.int64) + 32768
    step = 65536 // (table.size - 1) if table.size > 1 else 1
    if step <= 1:
        return table[v]
    index, remainder = v // step, v % step
    if interpolate:
        following = table[np.minimum(index + 1, table.size - 1)]
        delta = remainder * (following - table[index])
        return table[index] + np.where(delta < 0, -((-delta) // step), delta // step)
    half = step // 2
    up = (remainder > half) | ((remainder == half) & (index % 2 == 1)) if half_even else remainder >= half
    return table[index + up.astype(np.int64)]


def insert_zeros_channels_last(x: np.ndarray, stride: Sequence[int], output_padding: Sequence[int]) -> np.ndarray:
    """ESP-DL's InsertZeros (the first half of a ConvTranspose): ``stride - 1`` zeros between the pixels of each
    spatial axis of ``(N, *spatial, C)``, plus ``output_padding`` zeros at the end (``dl_module_insert_zeros.hpp``)."""
    spatial = x.ndim - 2
    strides = list(stride) * spatial if len(stride) == 1 else list(stride)
    extra = list(output_padding) * spatial if len(output_padding) == 1 else list(output_padding)
    if not extra:
        extra = [0] * spatial
    shape = [x.shape[0]]
    index: list[slice] = [slice(None)]
    for axis in range(spatial):
        size = x.shape[1 + axis]
        shape.append(size + (strides[axis] - 1) * (size - 1) + extra[axis])
        index.append(slice(0, (size - 1) * strides[axis] + 1, strides[axis]))
    out = np.zeros([*shape, x.shape[-1]], dtype=x.dtype)
    out[(*index, slice(None))] = x
    return out


def linear_axis(size_in: int, scale: float, align_corners: bool) -> tuple[np.ndarray, np.ndarray]:
    """Source index and weight of each of the ``int(size_in * scale)`` output coordinates along one axis
    (ARITHMETIC.md 9, linear)."""
    size_out = int(size_in * scale)
    out = np.arange(size_out, dtype=F32)
    if align_corners:
        inverse = F32((size_in - 1) / (size_out - 1)) if size_out > 1 else F32(0.0)
        position = (out * inverse).astype(F32)
    else:
        inverse = F32(1.0) / F32(scale)
        position = ((out + F32(0.5)) * inverse - F32(0.5)).astype(F32)
    index = np.floor(position).astype(np.int64)
    weight = (position - index.astype(F32)).astype(F32)
    low = index < 0
    index[low], weight[low] = 0, F32(0.0)
    high = index >= size_in - 1
    index[high], weight[high] = max(size_in - 2, 0), F32(1.0)
    if size_in == 1:
        index[:], weight[:] = 0, F32(0.0)
    return index, weight


def resize_linear_nhwc(
    x: np.ndarray,
    *,
    scale_h: float,
    scale_w: float,
    align_corners: bool,
    e_in: int,
    e_out: int,
    bits: int,
    profile: TargetProfile,
) -> np.ndarray:
    """Bilinear resize: rows blended first, then columns, in float32 from dequantized values (9)."""
    batch, height, width, channels = x.shape
    rows, row_w = linear_axis(height, scale_h, align_corners)
    cols, col_w = linear_axis(width, scale_w, align_corners)
    values = (x.astype(F32) * F32(2.0**e_in)).astype(F32)
    next_rows = np.minimum(rows + 1, height - 1)
    wr = row_w[None, :, None, None]
    blended = (values[:, rows] * (F32(1.0) - wr) + values[:, next_rows] * wr).astype(F32)
    next_cols = np.minimum(cols + 1, width - 1)
    wc = col_w[None, None, :, None]
    result = (blended[:, :, cols] * (F32(1.0) - wc) + blended[:, :, next_cols] * wc).astype(F32)
    return saturate(round_float((result * F32(2.0**-e_out)).astype(F32), profile.rounding), bits)
