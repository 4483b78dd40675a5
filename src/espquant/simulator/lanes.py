"""Saturating accumulator lanes, emulated only where they can saturate (the compiled path's rail steps).

ESP32-S3 runs int8 Conv / Gemm / MatMul in 20-bit QACC lanes that saturate after every product, in the
kernel's tap order (ARITHMETIC.md 4.3): ``acc = start; for each tap: acc = clamp(acc + x * w, low, high)``.
:func:`espquant.simulator.kernels._saturating_accumulate` is the reference; here the same integers come from
three steps that each settle most outputs cheaply:

1. From the exact sum ``S`` and the exact (or a larger) magnitude ``M = sum |x w|`` of an output, every running
   sum lies in ``[start - (M - S) / 2, start + (M + S) / 2]`` (the negative and the positive products); an
   output whose interval stays inside the rails never saturates and its exact sum is the chip's
   (:func:`risky`). An output whose products all have one sign saturates at most once, at the end it runs
   to: ``clamp(start + S)`` (:func:`settle_single_sign`).
2. The remaining outputs are walked block by block. Within a block of taps whose total magnitude is below the
   rails' span ``2**width``, the unclamped path cannot touch both rails, so the block's effect is closed-form:
   with ``P`` the block sum and ``hi`` / ``lo`` the highest / lowest prefix sum, ``a -> H + P - hi`` when
   ``a + hi > H``, ``a -> L + P - lo`` when ``a + lo < L``, else ``a + P`` (:func:`walk_blocks`). That is the
   tap-by-tap result, computed with whole-array operations over the outputs.

Products are gathered only for the outputs that reach step 2, in chunks, so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from espquant.quant.pot import simd_lanes
from espquant.quant.profiles import TargetProfile
from espquant.quant.rounding import wrap

__all__ = [
    "LaneRails",
    "lane_rails",
    "risky",
    "settle_single_sign",
    "walk_blocks",
    "conv_products",
    "rows_products",
    "emulate",
]

_CHUNK_ELEMENTS = 1 << 22  # products held at once (taps x outputs), about 32 MB of int64


@dataclass(frozen=True)
class LaneRails:
    """Per output channel: the lane's start value (the bias as the lane holds it) and its saturation rails."""

    start: np.ndarray  # int64 (N,)
    low: np.ndarray  # int64 (N,)
    high: np.ndarray  # int64 (N,)
    width: np.ndarray  # int64 (N,): lane bits

    @property
    def reachable(self) -> bool:
        """Whether any lane saturates at all (plain-C profiles have none)."""
        return bool(self.width.size) and int(self.width.min()) < 63


def lane_rails(bias: np.ndarray | None, channels: int, bits: int, profile: TargetProfile, depthwise: bool) -> LaneRails:
    """The lanes of ``kernels._accumulate`` / ``_accumulate_depthwise``: on SIMD profiles the 16 (int8) / 8 (int16)
    channel blocks use ``conv_acc_bits`` and the tail ``tail_acc_bits`` (depthwise: every channel in the blocks);
    ESP32-S3 int8 blocks hold the bias wrapped to 20 bits. Plain-C profiles never saturate (width 63 marks it)."""
    start = np.zeros(channels, np.int64) if bias is None else np.broadcast_to(bias.astype(np.int64), (channels,)).copy()
    width = np.full(channels, 63, np.int64)
    if profile.simd:
        blocked = channels if depthwise else (channels // simd_lanes(bits)) * simd_lanes(bits)
        width[:blocked] = profile.conv_acc_bits[bits]
        width[blocked:] = profile.tail_acc_bits[bits]
        if profile.family == "s3" and bits == 8 and blocked:
            start[:blocked] = wrap(start[:blocked], profile.conv_acc_bits[bits])
    high = (np.int64(1) << (width - 1)) - 1
    return LaneRails(start, -high - 1, high, width)


def risky(acc: np.ndarray, magnitude: np.ndarray, start: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Outputs whose running sum may leave ``[low, high]``: ``acc = start + S`` exactly, ``magnitude >= sum |x w|``;
    the per-channel arrays broadcast against ``acc``. Every other output's exact sum is the chip's."""
    u = acc.astype(np.float64) + start
    m = magnitude.astype(np.float64)
    return (u + m > 2.0 * high) | (u - m < 2.0 * low)


def settle_single_sign(
    acc: np.ndarray, magnitude: np.ndarray, start: np.ndarray, low: np.ndarray, high: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For outputs whose products all have one sign (exact ``magnitude == |S|``), the running sum is monotone:
    the chip's value is ``clamp(start + S)``. Returns ``(settled mask, clamped values)`` (exact magnitudes only)."""
    s = acc.astype(np.float64) - start
    m = magnitude.astype(np.float64)
    one_sign = (m == s) | (m == -s)
    return one_sign, np.clip(acc.astype(np.float64), low, high)


def walk_blocks(products: np.ndarray, start: np.ndarray, low: np.ndarray, high: np.ndarray, block: int) -> np.ndarray:
    """The saturating sums of ``products (E, taps)`` (one row per lane, taps in the kernel's order) for lanes
    starting at ``start`` with rails ``low`` / ``high`` (each ``(E,)``), exactly as tap-by-tap clamping gives them.
    ``block`` taps must never carry a total magnitude of ``high - low + 1`` or more: then the unclamped path
    touches at most one rail per block, and the block's effect is closed-form in its sum and extreme prefixes."""
    taps = products.shape[1]
    prefix = np.cumsum(products, axis=1, dtype=np.int64 if products.dtype != np.int32 else np.int32)
    starts = np.arange(0, taps, block)
    tops = np.maximum.reduceat(prefix, starts, axis=1).astype(np.int64)
    bottoms = np.minimum.reduceat(prefix, starts, axis=1).astype(np.int64)
    ends = prefix[:, np.minimum(starts + block, taps) - 1].astype(np.int64)
    acc = start.astype(np.int64).copy()
    base = np.zeros_like(acc)
    for j in range(starts.size):
        total, top, bottom = ends[:, j] - base, tops[:, j] - base, bottoms[:, j] - base
        up = acc + top > high
        down = acc + bottom < low
        acc += total
        acc[up] = (high + total - top)[up]
        acc[down] = (low + total - bottom)[down]
        base = ends[:, j]
    return acc


def _product_type(x: np.ndarray, weight: np.ndarray, taps: int) -> type:
    """int32 when every prefix sum of ``taps`` products fits it (int8 layers), else int64: half the memory."""
    bound = float(np.abs(x).max(initial=0)) * float(np.abs(weight).max(initial=0)) * taps
    return np.int32 if bound < 2**31 else np.int64


def conv_products(
    x: np.ndarray,
    weight: np.ndarray,
    *,
    strides: Sequence[int],
    pads: Sequence[int],
    dilations: Sequence[int],
    depthwise: bool,
) -> Callable[[np.ndarray], np.ndarray]:
    """``products(elements)``: the tap products ``(E, taps)`` of output elements (flat indices into ``(B, N, OH,
    OW)``) of a 2-D convolution on NCHW integers, in filter-memory order (kh, kw, c) (depthwise: (kh, kw)). The
    input patch of each distinct output position is gathered once."""
    batch, channels, height, width = x.shape
    n, _, kh, kw = weight.shape
    sh, sw = strides
    dh, dw = dilations
    top, left, bottom, right = pads
    kind = _product_type(x, weight, weight[0].size)
    padded = np.zeros((batch, height + top + bottom, width + left + right, channels), kind)
    padded[:, top : top + height, left : left + width, :] = np.moveaxis(x, 1, -1)
    out_h = (height + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + left + right - dw * (kw - 1) - 1) // sw + 1
    rows_w = np.ascontiguousarray(np.moveaxis(weight, 1, -1).reshape(n, -1)).astype(kind)  # (N, kh*kw*C)
    offsets = [(i * dh, j * dw) for i in range(kh) for j in range(kw)]

    def products(elements: np.ndarray) -> np.ndarray:
        b, nn, oh, ow = np.unravel_index(elements, (batch, n, out_h, out_w))
        rows, cols = oh * sh, ow * sw
        if depthwise:
            patch = np.stack([padded[b, rows + i, cols + j, nn] for i, j in offsets], axis=1)
            return patch * rows_w[nn]
        position = (b * out_h + oh) * out_w + ow
        unique, inverse = np.unique(position, return_inverse=True)
        ub, rest = np.divmod(unique, out_h * out_w)
        uh, uw = np.divmod(rest, out_w)
        patches = np.concatenate([padded[ub, uh * sh + i, uw * sw + j, :] for i, j in offsets], axis=1)
        return patches[inverse] * rows_w[nn]

    return products


def rows_products(x: np.ndarray, weight: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``products(elements)`` for ``x (..., K) @ weight (K, N)`` (Gemm / MatMul): elements index ``(..., N)``."""
    kind = _product_type(x, weight, weight.shape[0])
    rows = x.reshape(-1, x.shape[-1]).astype(kind)
    columns = np.ascontiguousarray(weight.T).astype(kind)
    n = columns.shape[0]

    def products(elements: np.ndarray) -> np.ndarray:
        row, column = np.divmod(elements, n)
        return rows[row] * columns[column]

    return products


def emulate(
    acc: np.ndarray,
    magnitude: np.ndarray,
    rails: LaneRails,
    channel_axis: int,
    products: Callable[[np.ndarray], np.ndarray],
    *,
    taps: int,
    max_product: int,
    magnitude_exact: bool,
) -> np.ndarray:
    """The chip's accumulators: ``acc`` (``start + S`` exactly, any float or integer dtype) with every output that
    may saturate replaced by its saturating sum. ``magnitude`` bounds ``sum |x w|`` from above; ``max_product``
    bounds one ``|x w|``; ``channel_axis`` is the output channel's axis of ``acc``."""
    shape = [1] * acc.ndim
    shape[channel_axis] = -1
    start, low, high = (v.reshape(shape) for v in (rails.start, rails.low, rails.high))
    mask = risky(acc, magnitude, start, low, high)
    if not mask.any():
        return acc
    out = acc.astype(np.float64) if acc.dtype != np.float64 else acc.copy()
    if magnitude_exact:
        one_sign, clamped = settle_single_sign(acc, magnitude, start, low, high)
        settled = mask & one_sign
        out[settled] = clamped[settled]
        mask &= ~one_sign
    elements = np.flatnonzero(mask)
    if elements.size:
        channel = np.unravel_index(elements, acc.shape)[channel_axis % acc.ndim]
        span = int((rails.high[channel] - rails.low[channel]).min()) + 1
        block = max(1, min(taps, (span - 1) // max(max_product, 1)))

        chunk = max(1, _CHUNK_ELEMENTS // max(taps, 1))
        flat = out.reshape(-1)
        for first in range(0, elements.size, chunk):
            part, lanes = elements[first : first + chunk], channel[first : first + chunk]
            walked = walk_blocks(products(part), rails.start[lanes], rails.low[lanes], rails.high[lanes], block)
            flat[part] = walked
    return out.astype(acc.dtype) if acc.dtype != np.float64 else out
