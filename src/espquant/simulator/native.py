"""Wide exact accumulations (int16 layers) in double, compiled with numba: one pass per layer, not a dozen.

An int16 Conv's sums pass 2**24, so onnxruntime's float32 Conv alone cannot hold them exactly. The compiled
graph (compiled.py) then splits the activation into digits and rounds the digit sums in float32: two
contractions and about ten elementwise passes per layer, 6-10x onnxruntime's float time on int16 models. Here the
sums are taken in double instead, where every product of two int16 values (below 2**30) and every partial sum
of integers (checked below 2**53 by the caller, whatever the order of the additions) is exact; the shift,
rounding and saturation follow in the same loop (depthwise) or in one pass after a BLAS product (other
convolutions through im2col, Gemm, MatMul): exact in any summation order, so BLAS may block and reorder freely.

The result equals the interpreter's ``sat(R((S + start + half) * 2**-shift))`` bit for bit: ``start`` and the
half are integers, ``2**-shift`` is a power of two (exact), floor and round-half-even (``np.rint``) are exact on
doubles. numba is a dependency; where it cannot be imported (a Python it does not support yet) ``AVAILABLE`` is
False and the compiled graph keeps its digit splits (same integers, slower).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from espquant.ops.broadcast import merged_broadcast_shapes

try:  # pragma: no cover - exercised by which environment runs the tests
    import numba

    AVAILABLE = True
except ImportError:  # pragma: no cover
    numba = None
    AVAILABLE = False

__all__ = [
    "AVAILABLE",
    "Activation",
    "Conv",
    "Product",
    "Requantize",
    "Rows",
    "lookup",
    "max_pool_2x2",
    "max_pool_2x2_channels_last",
]

F32 = np.float32
F64 = np.float64
# Which kernel takes a layer (measured on this project's benchmark layers, one thread):
# im2col columns are built for as many samples at once as fit this many bytes (they stay in L2).
COLUMN_BYTES = 1 << 16
# Output planes at least this wide run plane by plane (long vector loops); narrower depthwise ones pixel by pixel,
# channels last (``Conv.layout``).
WIDE_PLANE = 12
# Convolutions of at most this many taps per output (input channels x kernel) sum plane by plane (_conv_planes)
# instead of through BLAS: the product is too thin for BLAS to win back its im2col matrix, its double tensor and
# the extra pass over it. 1x1 convolutions sum row by row (_pointwise) when their weights are at most
# FEW_WEIGHTS and their planes at least LONG_ROWS pixels (shorter rows do not vectorize well).
FEW_TAPS = 64
FEW_WEIGHTS = 2048
LONG_ROWS = 64
# Gemm / MatMul inputs of at most this many rows are summed row by row (_few_rows) instead of through BLAS.
FEW_ROWS = 4


def _jit(function: Any) -> Any:
    """numba's compiled function (bounds unchecked: the callers size every array), or the Python function itself
    where numba is missing (never called then: ``AVAILABLE`` keeps the callers away).

    Compiling all the kernels takes about 15 s, so they are cached on disk (beside this file, or in numba's
    per-user folder when the installation is read-only); where no folder is writable they compile once per
    process instead of failing the import. Division follows IEEE (``error_model="numpy"``): a Softmax row whose
    sum is infinite gives NaN, as in C, instead of raising.

    Multiplies and adds may fuse (``contract``: fused multiply-adds): every product and every partial sum here is
    an exact integer in double, so a fused one rounds nothing either and the integers stay the same."""
    if numba is None:  # pragma: no cover
        return function
    options = {"boundscheck": False, "nogil": True, "fastmath": {"contract"}, "error_model": "numpy"}
    try:
        return numba.njit(cache=True, **options)(function)
    except RuntimeError:  # pragma: no cover - "cannot cache function ...: no locator available"
        return numba.njit(**options)(function)


@dataclass(frozen=True)
class Requantize:
    """What follows the sums of an accumulating node: ``sat(R((S + start) * scale))``.

    ``start`` (per output channel) holds the bias as the lanes start from it plus the rounding half of
    half-up; ``scale`` is ``2**-shift``; ``half_even`` picks round-half-even (ESP32-P4) over floor (the half
    is then in ``start``); ``low`` / ``high`` are the saturation bounds (a fused ReLU / Clip included)."""

    start: np.ndarray
    scale: np.ndarray
    half_even: bool
    low: float
    high: float


@_jit
def _saturate(value: float, low: float, high: float) -> float:
    """``value`` within ``[low, high]``, by explicit selects: ``min(max(...))`` kept the loops around it from
    vectorizing (3-5x slower, measured on a 56x56 plane)."""
    value = value if value > low else low
    return value if value < high else high


@_jit
def _requantize_row(sums: np.ndarray, begin: float, factor: float, half_even: bool, low: float, high: float,
                    out: np.ndarray) -> None:  # fmt: skip
    """``out[k] = sat(R((sums[k] + begin) * factor))``: one output channel's row. Plain 1-D loops vectorize;
    2-D indexing ran slower."""
    if half_even:
        for k in range(out.shape[0]):
            out[k] = _saturate(np.rint((sums[k] + begin) * factor), low, high)
    else:
        for k in range(out.shape[0]):
            out[k] = _saturate(np.floor((sums[k] + begin) * factor), low, high)


@_jit
def _requantize_plane(acc: np.ndarray, wq: int, factor: float, half_even: bool, low: float, high: float,
                      out: np.ndarray) -> None:  # fmt: skip
    """``out[i, j] = sat(R(acc[i * wq + j] * factor))``: an output plane from sums laid out at the buffer's width
    (the start is already in the sums)."""
    width = out.shape[1]
    for i in range(out.shape[0]):
        _requantize_row(acc[i * wq : i * wq + width], 0.0, factor, half_even, low, high, out[i])


@_jit
def _finish(acc: np.ndarray, start: np.ndarray, scale: np.ndarray, half_even: bool, low: float, high: float,
            out: np.ndarray) -> None:  # fmt: skip
    """``out[a, c, k] = sat(R((acc[a, c, k] + start[c]) * scale[c]))`` (acc: exact integer sums in double)."""
    for a in range(acc.shape[0]):
        for c in range(acc.shape[1]):
            _requantize_row(acc[a, c], start[c], scale[c], half_even, low, high, out[a, c])


@_jit
def _finish_rows(acc: np.ndarray, start: np.ndarray, scale: np.ndarray, half_even: bool, low: float, high: float,
                 out: np.ndarray) -> None:  # fmt: skip
    """``out[a, c] = sat(R((acc[a, c] + start[c]) * scale[c]))``: channels last (Gemm / MatMul rows)."""
    for a in range(acc.shape[0]):
        sums, row = acc[a], out[a]
        if half_even:
            for c in range(acc.shape[1]):
                row[c] = _saturate(np.rint((sums[c] + start[c]) * scale[c]), low, high)
        else:
            for c in range(acc.shape[1]):
                row[c] = _saturate(np.floor((sums[c] + start[c]) * scale[c]), low, high)


@_jit
def _tap_row(acc: np.ndarray, buffer: np.ndarray, offsets: np.ndarray, taps: np.ndarray) -> None:
    """``acc[j] += sum_t buffer[offsets[t] + j] * taps[t]``: one kernel row of taps over one output row. Three
    and five taps (the usual kernels) are written out, so that each output takes all its products in registers
    and the loop over outputs vectorizes; other widths add one tap at a time."""
    count = acc.shape[0]
    if taps.shape[0] == 3:
        a, b, c = buffer[offsets[0] :], buffer[offsets[1] :], buffer[offsets[2] :]
        ta, tb, tc = taps[0], taps[1], taps[2]
        for j in range(count):
            acc[j] += a[j] * ta + b[j] * tb + c[j] * tc
    elif taps.shape[0] == 5:
        a, b, c, d, e = (buffer[offsets[0] :], buffer[offsets[1] :], buffer[offsets[2] :], buffer[offsets[3] :],
                         buffer[offsets[4] :])  # fmt: skip
        ta, tb, tc, td, te = taps[0], taps[1], taps[2], taps[3], taps[4]
        for j in range(count):
            acc[j] += a[j] * ta + b[j] * tb + c[j] * tc + d[j] * td + e[j] * te
    else:
        for t in range(taps.shape[0]):
            source, tap = buffer[offsets[t] :], taps[t]
            for j in range(count):
                acc[j] += source[j] * tap


@_jit
def _tap_plane(acc: np.ndarray, buffer: np.ndarray, offsets: np.ndarray, taps: np.ndarray) -> None:
    """``acc[j] += sum_{di, dj} buffer[offsets[di, dj] + j] * taps[di, dj]``: a whole kernel over one plane. 3x3
    and 5x5 kernels take all their products per output in registers (one pass over ``acc``); other shapes go row
    by row (:func:`_tap_row`)."""
    kh, kw = taps.shape
    count = acc.shape[0]
    if kh == 3 and kw == 3:
        a0, a1, a2 = buffer[offsets[0, 0] :], buffer[offsets[0, 1] :], buffer[offsets[0, 2] :]
        b0, b1, b2 = buffer[offsets[1, 0] :], buffer[offsets[1, 1] :], buffer[offsets[1, 2] :]
        c0, c1, c2 = buffer[offsets[2, 0] :], buffer[offsets[2, 1] :], buffer[offsets[2, 2] :]
        t = taps
        for j in range(count):
            acc[j] += (
                (a0[j] * t[0, 0] + a1[j] * t[0, 1] + a2[j] * t[0, 2])
                + (b0[j] * t[1, 0] + b1[j] * t[1, 1] + b2[j] * t[1, 2])
                + (c0[j] * t[2, 0] + c1[j] * t[2, 1] + c2[j] * t[2, 2])
            )
    elif kh == 5 and kw == 5:
        for first in range(0, 5, 2):  # rows two at a time (ten products in registers)
            if first == 4:
                _tap_row(acc, buffer, offsets[4], taps[4])
                continue
            u, v = offsets[first], offsets[first + 1]
            p0, p1, p2, p3, p4 = buffer[u[0] :], buffer[u[1] :], buffer[u[2] :], buffer[u[3] :], buffer[u[4] :]
            q0, q1, q2, q3, q4 = buffer[v[0] :], buffer[v[1] :], buffer[v[2] :], buffer[v[3] :], buffer[v[4] :]
            t, r = taps[first], taps[first + 1]
            for j in range(count):
                acc[j] += (p0[j] * t[0] + p1[j] * t[1] + p2[j] * t[2] + p3[j] * t[3] + p4[j] * t[4]) + (
                    q0[j] * r[0] + q1[j] * r[1] + q2[j] * r[2] + q3[j] * r[3] + q4[j] * r[4]
                )
    else:
        for di in range(kh):
            _tap_row(acc, buffer, offsets[di], taps[di])


@_jit
def _phase_layout(
    height: int, width: int, kh: int, kw: int, oh: int, ow: int, geometry: np.ndarray
) -> tuple[int, int, int]:
    """``(wq, phase, size)`` of the phase buffers of :func:`_fill_phases`: row width, phase size, buffer size."""
    sh, sw, pt, pl, dh, dw = geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5]
    hq = (max(height + pt, (oh - 1) * sh + (kh - 1) * dh + 1) + sh - 1) // sh
    wq = (max(width + pl, (ow - 1) * sw + (kw - 1) * dw + 1) + sw - 1) // sw
    # The tail is slack for the dropped columns of the last output row.
    return wq, hq * wq, sh * sw * hq * wq + wq + kw * dw + 1


@_jit
def _phase_maps(height: int, width: int, geometry: np.ndarray, wq: int, phase: int) -> tuple[np.ndarray, np.ndarray]:
    """Where :func:`_fill_phases` puts an input plane's pixels: pixel ``(i, j)`` of the plane lands at
    ``rows[i] + columns[j]`` of the phase buffers (the pixel ``(r, s)`` of the padded plane, ``r = i + pad_top``,
    ``s = j + pad_left``, goes to phase ``(r mod stride_h, s mod stride_w)`` at row ``r // stride_h``, column
    ``s // stride_w``). Computed once per layer call, not per plane."""
    sh, sw, pt, pl = geometry[0], geometry[1], geometry[2], geometry[3]
    rows = np.empty(height, np.int64)
    for i in range(height):
        r = i + pt
        rows[i] = (r % sh) * sw * phase + (r // sh) * wq
    columns = np.empty(width, np.int64)
    for j in range(width):
        s = j + pl
        columns[j] = (s % sw) * phase + s // sw
    return rows, columns


@_jit
def _fill_phases(plane: np.ndarray, rows: np.ndarray, columns: np.ndarray, buffer: np.ndarray) -> None:
    """Copy one input plane into a zero-padded double buffer split into its ``stride_h x stride_w`` phases (the
    pixels of the padded plane with the same ``r mod stride_h`` and ``s mod stride_w``), at the places
    :func:`_phase_maps` gives: there every tap of a strided or dilated kernel reads one phase at a fixed offset,
    contiguously. The padding is never written, so it stays zero across planes.

    A row whose columns stay side by side (horizontal stride 1) is a plain copy that vectorizes; with a
    horizontal stride each pixel goes to its own place, by index: slicing the buffer per row and phase cost more
    than the copies on small planes (a stride-2 depthwise layer on 64 x 16 planes of 28x28 took 0.64-0.72x the
    time this way, 48 planes of 48x48 0.74-0.80x, both kernels timed alternately in one process)."""
    height, width = plane.shape
    if width > 1 and columns[width - 1] - columns[0] != width - 1:
        for i in range(height):
            at, source = rows[i], plane[i]
            for j in range(width):
                buffer[at + columns[j]] = source[j]
        return
    for i in range(height):
        at = rows[i] + columns[0]
        source, target = plane[i], buffer[at : at + width]
        for j in range(width):
            target[j] = source[j]


@_jit
def _tap_offsets(kh: int, kw: int, geometry: np.ndarray, wq: int, phase: int) -> np.ndarray:
    """Where tap ``(di, dj)`` of output ``(0, 0)`` reads in the phase buffer (output ``(i, j)`` adds ``i wq + j``)."""
    sh, sw, dh, dw = geometry[0], geometry[1], geometry[4], geometry[5]
    offsets = np.empty((kh, kw), np.int64)
    for di in range(kh):
        for dj in range(kw):
            rr, cc = di * dh, dj * dw
            offsets[di, dj] = ((rr % sh) * sw + cc % sw) * phase + (rr // sh) * wq + cc // sw
    return offsets


@_jit
def _depthwise_planes(x: np.ndarray, w: np.ndarray, start: np.ndarray, scale: np.ndarray, half_even: bool,
                      low: float, high: float, geometry: np.ndarray, out: np.ndarray) -> None:  # fmt: skip
    """A depthwise convolution (one filter per channel) with its requantization, plane by plane: for wide planes.

    ``geometry`` is ``[stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w]``. Each input plane goes
    once into phase buffers (:func:`_fill_phases`); each output row then sums its kernel rows with
    :func:`_tap_row` over all its rows at once, at the buffer's width (the columns beyond the output's are computed
    and dropped): a few long loops per plane."""
    batch, channels, height, width = x.shape
    kh, kw = w.shape[1], w.shape[2]
    oh, ow = out.shape[2], out.shape[3]
    wq, phase, size = _phase_layout(height, width, kh, kw, oh, ow, geometry)
    offsets = _tap_offsets(kh, kw, geometry, wq, phase)
    rows, columns = _phase_maps(height, width, geometry, wq, phase)
    buffer = np.zeros(size, F64)
    acc = np.empty(oh * wq, F64)
    for n in range(batch):
        for c in range(channels):
            _fill_phases(x[n, c], rows, columns, buffer)
            acc[:] = start[c]
            _tap_plane(acc, buffer, offsets, w[c])
            _requantize_plane(acc, wq, scale[c], half_even, low, high, out[n, c])


@_jit
def _depthwise_channels_last(x: np.ndarray, taps: np.ndarray, start: np.ndarray, scale: np.ndarray, half_even: bool,
                             low: float, high: float, geometry: np.ndarray, out: np.ndarray) -> None:  # fmt: skip
    """The same depthwise convolution on channels-last tensors, ``x (N, H, W, C)`` into ``out (N, OH, OW, C)``,
    ``taps (KH, KW, C)``: each output pixel adds its taps' pixels channel by channel in vectorized loops over all
    the channels (a 3x3 window inside the plane in one loop, its nine products in registers; elsewhere one loop
    per tap, the padding skipped by its rows and columns, no padded copy). For small planes with many
    channels (MobileNet's later layers: 7x7 or 14x14, 32 to 960 channels), whose planes are too short to vectorize:
    there the channels-first pixel kernel spent most of its time transposing into a padded grid and writing
    every output channel apart (a 32-channel 14x14 stride-2 layer at batch 1: 15.5 against 4.4 us)."""
    batch, height, width, channels = x.shape
    kh, kw = taps.shape[0], taps.shape[1]
    oh, ow = out.shape[1], out.shape[2]
    sh, sw, pt, pl, dh, dw = geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5]
    acc = np.empty(channels, F64)
    t = taps
    for n in range(batch):
        for i in range(oh):
            r0 = i * sh - pt
            rows_inside = r0 >= 0 and r0 + (kh - 1) * dh < height
            for j in range(ow):
                s0 = j * sw - pl
                if kh == 3 and kw == 3 and rows_inside and s0 >= 0 and s0 + 2 * dw < width:
                    # The whole window inside the plane: its nine products per channel in registers, one pass.
                    a0, a1, a2 = x[n, r0, s0], x[n, r0, s0 + dw], x[n, r0, s0 + 2 * dw]
                    b0, b1, b2 = x[n, r0 + dh, s0], x[n, r0 + dh, s0 + dw], x[n, r0 + dh, s0 + 2 * dw]
                    c0, c1, c2 = x[n, r0 + 2 * dh, s0], x[n, r0 + 2 * dh, s0 + dw], x[n, r0 + 2 * dh, s0 + 2 * dw]
                    for c in range(channels):
                        acc[c] = start[c] + (
                            (a0[c] * t[0, 0, c] + a1[c] * t[0, 1, c] + a2[c] * t[0, 2, c])
                            + (b0[c] * t[1, 0, c] + b1[c] * t[1, 1, c] + b2[c] * t[1, 2, c])
                            + (c0[c] * t[2, 0, c] + c1[c] * t[2, 1, c] + c2[c] * t[2, 2, c])
                        )
                else:
                    _window_sums(x[n], taps, start, r0, s0, dh, dw, acc)
                target = out[n, i, j]
                if half_even:
                    for c in range(channels):
                        target[c] = _saturate(np.rint(acc[c] * scale[c]), low, high)
                else:
                    for c in range(channels):
                        target[c] = _saturate(np.floor(acc[c] * scale[c]), low, high)


@_jit
def _window_sums(x: np.ndarray, taps: np.ndarray, start: np.ndarray, r0: int, s0: int, dh: int, dw: int,
                 acc: np.ndarray) -> None:  # fmt: skip
    """``acc[c] = start[c] + sum x[r0 + di dh, s0 + dj dw, c] taps[di, dj, c]`` over the taps inside the plane
    ``x (H, W, C)`` (the padding adds nothing), one tap at a time."""
    height, width, channels = x.shape
    acc[:] = start
    for di in range(taps.shape[0]):
        r = r0 + di * dh
        if r < 0 or r >= height:
            continue
        for dj in range(taps.shape[1]):
            s = s0 + dj * dw
            if s < 0 or s >= width:
                continue
            pixel, tap = x[r, s], taps[di, dj]
            for c in range(channels):
                acc[c] += pixel[c] * tap[c]


@_jit
def _pointwise(x: np.ndarray, w: np.ndarray, start: np.ndarray, scale: np.ndarray, half_even: bool, low: float,
               high: float, out: np.ndarray) -> None:  # fmt: skip
    """A 1x1 convolution of few input channels with its requantization: ``x (N, C, P)``, ``w (M, C)``; each output
    row is the weighted sum of the input rows, one vectorized loop per input channel, no double tensor stored."""
    batch, channels, size = x.shape
    acc = np.empty(size, F64)
    for n in range(batch):
        for m in range(w.shape[0]):
            acc[:] = start[m]
            for c in range(channels):
                line, weight = x[n, c], w[m, c]
                for k in range(size):
                    acc[k] += line[k] * weight
            _requantize_row(acc, 0.0, scale[m], half_even, low, high, out[n, m])


@_jit
def _im2col(x: np.ndarray, kh: int, kw: int, geometry: np.ndarray, cols: np.ndarray, oh: int, ow: int) -> None:
    """``cols[(c, di, dj), n * oh * ow + (i, j)] = x[n, c, i*sh + di*dh - pt, j*sw + dj*dw - pl]`` (0 outside):
    every sample's columns side by side, so that one BLAS product covers them all. Each plane goes once into
    phase buffers (:func:`_fill_phases`), where every tap's output row is a contiguous run: plain copies, no
    test per element for the padding."""
    batch, channels, height, width = x.shape
    wq, phase, size = _phase_layout(height, width, kh, kw, oh, ow, geometry)
    offsets = _tap_offsets(kh, kw, geometry, wq, phase)
    rows, columns = _phase_maps(height, width, geometry, wq, phase)
    buffer = np.zeros(size, F64)
    positions = oh * ow
    for n in range(batch):
        for c in range(channels):
            _fill_phases(x[n, c], rows, columns, buffer)
            for di in range(kh):
                for dj in range(kw):
                    column = cols[(c * kh + di) * kw + dj, n * positions : (n + 1) * positions]
                    source = buffer[offsets[di, dj] :]
                    for i in range(oh):
                        line, row = column[i * ow : (i + 1) * ow], source[i * wq : i * wq + ow]
                        for j in range(ow):
                            line[j] = row[j]


@_jit
def _conv_planes(x: np.ndarray, w: np.ndarray, start: np.ndarray, scale: np.ndarray, half_even: bool, low: float,
                 high: float, geometry: np.ndarray, out: np.ndarray) -> None:  # fmt: skip
    """A group-1 convolution of few taps per output (``C * KH * KW``, the first layer on an image) with its
    requantization: every input plane of a sample goes once into phase buffers (:func:`_fill_phases`), then
    each output plane sums the kernel rows of every input channel (:func:`_tap_row`, all output rows at once):
    no im2col matrix, no double tensor."""
    batch, channels, height, width = x.shape
    kh, kw = w.shape[2], w.shape[3]
    oh, ow = out.shape[2], out.shape[3]
    wq, phase, size = _phase_layout(height, width, kh, kw, oh, ow, geometry)
    offsets = _tap_offsets(kh, kw, geometry, wq, phase)
    rows, columns = _phase_maps(height, width, geometry, wq, phase)
    buffers = np.zeros((channels, size), F64)
    acc = np.empty(oh * wq, F64)
    for n in range(batch):
        for c in range(channels):
            _fill_phases(x[n, c], rows, columns, buffers[c])
        for m in range(w.shape[0]):
            acc[:] = start[m]
            for c in range(channels):
                _tap_plane(acc, buffers[c], offsets, w[m, c])
            _requantize_plane(acc, wq, scale[m], half_even, low, high, out[n, m])


def _output_size(size: int, kernel: int, stride: int, before: int, after: int, dilation: int) -> int:
    return (size + before + after - dilation * (kernel - 1) - 1) // stride + 1


# The layouts a convolution kernel computes in: ONNX's channels first ``(N, C, H, W)``, channels last
# ``(N, H, W, C)``, or either (a 1x1 convolution through BLAS: a product of the pixels' rows, or of the channels').
FIRST, LAST, EITHER = "channels first", "channels last", "either"


class Conv:
    """A 2-D convolution (group 1, or depthwise) by constant integer weights ``(M, C or 1, KH, KW)``, requantized:
    called on integer activations ``x (N, C, H, W)``, returns float32 integers ``(N, M, OH, OW)``. The weights
    are converted to double once, here (per call they would cost more than a batch-1 layer's sums).

    ``takes_last`` / ``gives_last`` make it read ``(N, H, W, C)`` / write ``(N, OH, OW, M)`` instead: the compiled
    program sets them on a tensor that passes from one native convolution to another
    (``compiled._chain_channels_last``), so that kernels that compute channels last (``layout``) chain without
    transposing in between; a kernel whose layout differs from its tensors' transposes them itself (numpy's
    transposes cost 1-3 ns a value here, more than a layer's sums on large planes)."""

    def __init__(
        self,
        weight: np.ndarray,
        strides: list[int],
        pads: list[int],
        dilations: list[int],
        depthwise: bool,
        requantize: Requantize,
    ) -> None:
        self.kernel = weight.shape[2:]
        self.strides, self.pads, self.dilations = list(strides), list(pads), list(dilations)
        self.geometry = np.array([*self.strides, pads[0], pads[1], *self.dilations], np.int64)
        self.depthwise, self.requantize = depthwise, requantize
        self.channels = weight.shape[0]
        if depthwise:
            self.filters = np.ascontiguousarray(weight[:, 0], dtype=F64)
            self.taps = np.ascontiguousarray(self.filters.transpose(1, 2, 0))  # (KH, KW, C): channels last
        else:
            self.weight = np.ascontiguousarray(weight, dtype=F64)
            self.matrix = self.weight.reshape(weight.shape[0], -1)
        self.pointwise = not depthwise and self.kernel == (1, 1) and self.strides == [1, 1] and not any(pads)
        if self.pointwise:
            self.columns = np.ascontiguousarray(self.matrix.T)  # (C, M): the rows of channels-last pixels times it
        # The layouts of the tensors read and written, and the one computed in (None: chosen per call), as the
        # compiled program sets them (``compiled._chain_channels_last``).
        self.takes_last = self.gives_last = False
        self.computes_last: bool | None = None

    def output_plane(self, height: int, width: int) -> tuple[int, int]:
        """The output plane's size for an input plane of ``height x width``."""
        (kh, kw), strides, pads, dilations = self.kernel, self.strides, self.pads, self.dilations
        oh = _output_size(height, kh, strides[0], pads[0], pads[2], dilations[0])
        return oh, _output_size(width, kw, strides[1], pads[1], pads[3], dilations[1])

    def layout(self, height: int, width: int) -> str:
        """The layout this layer computes fastest in for an input plane of ``height x width`` when its tensors are
        in it already: a depthwise layer channels last when its output plane is narrow (short plane loops do not
        vectorize) or, for a 3x3 kernel (whose nine products per channel the pixel kernel keeps in registers),
        strided (the plane kernel splits every input plane into phases first) or of at least 48 channels on
        planes up to 16 wide; a 1x1 layer through BLAS either way (a product of pixel rows or of channel rows);
        the others channels first. Measured on depthwise layers of 24-192 channels, batch 1 and
        32, both kernels alternated in one process (channels last / first): 3x3 stride 2 0.27-0.60; 3x3 stride 1
        on 12-wide planes 0.5-0.7 from 48 channels, on 16-wide 0.6-0.85 (1.06 with 24 channels), on 20-wide
        0.7-0.9 (1.2-1.3 with 24); 5x5 stride 2 on 8-wide planes 0.55-0.84, on 16-wide or more 0.9-1.4."""
        ow = self.output_plane(height, width)[1]
        if self.depthwise:
            three = self.kernel == (3, 3)
            wide = ow >= WIDE_PLANE and not (three and (self.strides[1] > 1 or (self.channels >= 48 and ow <= 16)))
            return FIRST if wide else LAST
        if self._by_rows(height * width):
            return FIRST  # row by row (_pointwise): a 16 -> 32 layer on 14x14 at batch 1 took 21 us, 35 through BLAS
        return EITHER if self.pointwise else FIRST

    def _by_rows(self, positions: int) -> bool:
        """Whether a 1x1 layer on planes of ``positions`` pixels sums row by row (``_pointwise``): few weights,
        long rows."""
        return self.pointwise and self.matrix.size <= FEW_WEIGHTS and positions >= LONG_ROWS

    def computes_last_by_default(self, height: int, width: int) -> bool:
        """Whether the layer computes channels last given the layouts of its tensors, where that is the faster
        choice or transposes nothing: a layer whose ``layout`` is channels last when its input is too, or when its
        output plane is narrow (transposing a narrow depthwise layer's input and output costs less than the plane
        kernel's short loops); a 1x1 layer through BLAS when its input or output is channels last. What a call
        takes when the compiled program did not choose (``computes_last`` None), and what the program chooses
        but for a 1x1 layer whose readers all compute channels last (``compiled._chain_channels_last``)."""
        layout = self.layout(height, width)
        if layout == EITHER:
            return self.takes_last or self.gives_last
        return layout == LAST and (self.takes_last or self.output_plane(height, width)[1] < WIDE_PLANE)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=F32)
        height, width = x.shape[1:3] if self.takes_last else x.shape[2:]
        oh, ow = self.output_plane(height, width)
        last = self.computes_last
        if last is None:
            last = self.computes_last_by_default(height, width)
        last = last and (self.depthwise or self.pointwise)  # the layers with a channels-last kernel
        if last != self.takes_last:
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1) if last else x.transpose(0, 3, 1, 2))
        out = self._channels_last(x, oh, ow) if last else self._channels_first(x, oh, ow)
        if last != self.gives_last:
            out = np.ascontiguousarray(out.transpose(0, 3, 1, 2) if last else out.transpose(0, 2, 3, 1))
        return out

    def _channels_last(self, x: np.ndarray, oh: int, ow: int) -> np.ndarray:
        """The depthwise pixel kernel, or a 1x1 layer as one BLAS product per chunk of pixel rows."""
        r = self.requantize
        out = np.empty((x.shape[0], oh, ow, self.channels), F32)
        if self.depthwise:
            _depthwise_channels_last(x, self.taps, r.start, r.scale, r.half_even, r.low, r.high, self.geometry, out)
            return out
        rows, flat = x.reshape(-1, x.shape[3]), out.reshape(-1, self.channels)
        chunk = max(1, COLUMN_BYTES // (8 * x.shape[3]))
        for first in range(0, len(rows), chunk):
            sums = rows[first : first + chunk].astype(F64) @ self.columns
            _finish_rows(sums, r.start, r.scale, r.half_even, r.low, r.high, flat[first : first + chunk])
        return out

    def _channels_first(self, x: np.ndarray, oh: int, ow: int) -> np.ndarray:
        """The plane kernels, or the columns of several samples (im2col) through BLAS."""
        batch, channels, height, width = x.shape
        out = np.empty((batch, self.channels, oh, ow), F32)
        r = self.requantize
        if self.depthwise:
            _depthwise_planes(x, self.filters, r.start, r.scale, r.half_even, r.low, r.high, self.geometry, out)
            return out
        taps = self.matrix.shape[1]
        flat = out.reshape(batch, self.channels, oh * ow)
        if self._by_rows(oh * ow):
            planes = x.reshape(batch, channels, height * width)
            _pointwise(planes, self.matrix, r.start, r.scale, r.half_even, r.low, r.high, flat)
            return out
        if not self.pointwise and taps <= FEW_TAPS and ow >= WIDE_PLANE:
            _conv_planes(x, self.weight, r.start, r.scale, r.half_even, r.low, r.high, self.geometry, out)
            return out
        # BLAS: the columns of as many samples as fit COLUMN_BYTES side by side, one product per chunk.
        (kh, kw), positions = self.kernel, oh * ow
        chunk = max(1, COLUMN_BYTES // (8 * taps * positions))
        for first in range(0, batch, chunk):
            part = x[first : first + chunk]
            count = len(part)
            if self.pointwise:
                cols = part.reshape(count, channels, positions).transpose(1, 0, 2).reshape(channels, -1).astype(F64)
            else:
                cols = np.empty((taps, count * positions), F64)
                _im2col(part, kh, kw, self.geometry, cols, oh, ow)
            sums = (self.matrix @ cols).reshape(self.channels, count, positions).transpose(1, 0, 2)
            _finish(sums, r.start, r.scale, r.half_even, r.low, r.high, flat[first : first + count])
        return out


@_jit
def _few_rows(x: np.ndarray, w: np.ndarray, start: np.ndarray, scale: np.ndarray, half_even: bool, low: float,
              high: float, out: np.ndarray) -> None:  # fmt: skip
    """``x (R, K) @ w (K, M)`` for a few rows, requantized: each row adds ``x[r, k] * w[k]`` for the nonzero inputs
    (ReLU outputs are often zero) into a double row. ``w`` is float32 (integers, exact): half the bytes of a
    double matrix, which is what a matrix-vector product is bound by."""
    acc = np.empty((1, w.shape[1]), F64)
    sums = acc[0]
    for r in range(x.shape[0]):
        sums[:] = 0.0
        for k in range(w.shape[0]):
            value = np.float64(x[r, k])
            if value != 0.0:
                line = w[k]
                for m in range(sums.shape[0]):
                    sums[m] += value * line[m]
        _finish_rows(acc, start, scale, half_even, low, high, out[r : r + 1])


class Rows:
    """``x (..., K) @ weight (K, M)`` of integers by a constant weight, requantized per output column: float32
    integers ``(..., M)`` (Gemm, MatMul). A few rows (batch 1) go through :func:`_few_rows`, more through BLAS."""

    def __init__(self, weight: np.ndarray, requantize: Requantize) -> None:
        self.matrix = np.ascontiguousarray(weight, dtype=F64)
        narrow = bool(np.abs(weight).max(initial=0) < 2**24)  # float32 holds every weight exactly
        self.narrow = np.ascontiguousarray(weight, dtype=F32) if narrow else None
        self.requantize = requantize

    def __call__(self, x: np.ndarray) -> np.ndarray:
        taps, columns = self.matrix.shape
        flat = np.asarray(x).reshape(-1, taps)
        out = np.empty((flat.shape[0], columns), F32)
        r = self.requantize
        if self.narrow is not None and flat.shape[0] <= FEW_ROWS:
            _few_rows(np.ascontiguousarray(flat, dtype=F32), self.narrow, r.start, r.scale, r.half_even, r.low,
                      r.high, out)  # fmt: skip
        else:
            sums = flat.astype(F64) @ self.matrix
            _finish_rows(sums, r.start, r.scale, r.half_even, r.low, r.high, out)
        return out.reshape(*x.shape[:-1], columns)


@_jit
def _products(a: np.ndarray, b: np.ndarray, begin: float, factor: float, half_even: bool, low: float, high: float,
              out: np.ndarray) -> None:  # fmt: skip
    """``out = sat(R((a b + begin) * factor))`` on merged 3-D shapes, ``a`` or ``b`` of length 1 on the axes they are
    broadcast along: row by row, each row elementwise or scaled by one value (vectorized 1-D loops)."""
    rows = np.empty(out.shape[2], F64)
    for i in range(out.shape[0]):
        ia, ib = min(i, a.shape[0] - 1), min(i, b.shape[0] - 1)
        for j in range(out.shape[1]):
            left, right = a[ia, min(j, a.shape[1] - 1)], b[ib, min(j, b.shape[1] - 1)]
            if left.shape[0] == 1:
                value = np.float64(left[0])
                for k in range(rows.shape[0]):
                    rows[k] = value * right[k]
            elif right.shape[0] == 1:
                value = np.float64(right[0])
                for k in range(rows.shape[0]):
                    rows[k] = left[k] * value
            else:
                for k in range(rows.shape[0]):
                    rows[k] = np.float64(left[k]) * right[k]
            _requantize_row(rows, begin, factor, half_even, low, high, out[i, j])


class Product:
    """``sat(R(a b 2**-shift))`` of two integer tensors, broadcast as ONNX broadcasts: an int16 Mul on the SIMD
    rule of ``kernels.mul`` (a squeeze-excite gate times its feature map). Each product of two int16 values is
    below 2**30, exact in double; ``requantize`` holds one channel (the rounding half of half-up in ``start``).
    The axes are merged as the runtime merges them (``merged_broadcast_shapes``); patterns of more than three
    merged axes take numpy's broadcasting instead."""

    def __init__(self, requantize: Requantize) -> None:
        self.requantize = requantize
        self.start, self.scale = float(requantize.start[0]), float(requantize.scale[0])

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        r = self.requantize
        shape, merged = _product_plan(a.shape, b.shape)
        out = np.empty(shape, F32)
        if merged is None:
            product = np.multiply(a, b, dtype=F64).reshape(-1)
            _requantize_row(product, self.start, self.scale, r.half_even, r.low, r.high, out.reshape(-1))
            return out
        merged_a, merged_b, merged_out = merged
        _products(np.ascontiguousarray(a, dtype=F32).reshape(merged_a),
                  np.ascontiguousarray(b, dtype=F32).reshape(merged_b), self.start, self.scale, r.half_even,
                  r.low, r.high, out.reshape(merged_out))  # fmt: skip
        return out


@functools.lru_cache(maxsize=256)
def _product_plan(
    a: tuple[int, ...], b: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None]:
    """The output shape of ``a * b`` and the three merged 3-D shapes :func:`_products` runs on (None beyond three
    merged axes), per pair of shapes: worked out once, not on every call (it cost a batch-1 squeeze-excite gate
    about as much as its products)."""
    merged_a, merged_b, merged_out = merged_broadcast_shapes(a, b)
    shape = tuple(np.broadcast_shapes(a, b))
    if len(merged_out) > 3:
        return shape, None
    pad = (1,) * (3 - len(merged_out))
    return shape, (pad + tuple(merged_a), pad + tuple(merged_b), pad + tuple(merged_out))


@_jit
def _max_pool_2x2(x: np.ndarray, out: np.ndarray) -> None:
    """``out[n, c, i, j] = max(x[n, c, 2i : 2i + 2, 2j : 2j + 2])``: the 2x2 MaxPool of stride 2 without padding, in
    one loop per output row with the stride written out (it vectorizes; a general kernel with the window's
    bounds in variables ran 4x slower than onnxruntime's own)."""
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            plane, target = x[n, c], out[n, c]
            for i in range(out.shape[2]):
                a, b, row = plane[2 * i], plane[2 * i + 1], target[i]
                for j in range(out.shape[3]):
                    row[j] = max(max(a[2 * j], a[2 * j + 1]), max(b[2 * j], b[2 * j + 1]))


def max_pool_2x2(x: np.ndarray) -> np.ndarray:
    """The 2x2 MaxPool of stride 2 without padding of float32 integers ``(N, C, H, W)`` (odd sizes drop their last
    row or column, as ONNX's floor mode does): what a native step that computed the pooled tensor pools it with,
    instead of ending for a one-node onnxruntime segment (about 35 us a call at batch 1 on an MNIST CNN)."""
    out = np.empty((x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2), F32)
    _max_pool_2x2(np.ascontiguousarray(x, dtype=F32), out)
    return out


@_jit
def _max_pool_2x2_last(x: np.ndarray, out: np.ndarray) -> None:
    """:func:`_max_pool_2x2` on channels-last tensors ``(N, H, W, C)``: the four pixels' channels, one vector loop."""
    for n in range(out.shape[0]):
        for i in range(out.shape[1]):
            a, b = x[n, 2 * i], x[n, 2 * i + 1]
            for j in range(out.shape[2]):
                p, q, r, s, target = a[2 * j], a[2 * j + 1], b[2 * j], b[2 * j + 1], out[n, i, j]
                for c in range(out.shape[3]):
                    target[c] = max(max(p[c], q[c]), max(r[c], s[c]))


def max_pool_2x2_channels_last(x: np.ndarray) -> np.ndarray:
    """:func:`max_pool_2x2` of a channels-last tensor ``(N, H, W, C)`` (a native convolution's output that the
    next native convolution reads channels last, ``Conv.gives_last``)."""
    out = np.empty((x.shape[0], x.shape[1] // 2, x.shape[2] // 2, x.shape[3]), F32)
    _max_pool_2x2_last(np.ascontiguousarray(x, dtype=F32), out)
    return out


# The activations :class:`Activation` computes value by value (``activations.float_function``'s definitions), and
# the identity: the device's input quantization (``Activation.quantizer``).
HARD_SWISH, HARD_SIGMOID, LEAKY_RELU, RELU, IDENTITY = 0, 1, 2, 3, 4
ACTIVATION_KINDS = {"HardSwish": HARD_SWISH, "HardSigmoid": HARD_SIGMOID, "LeakyRelu": LEAKY_RELU, "Relu": RELU}


def _jit_exact(function: Any) -> Any:
    """numba's compiled function with every float operation rounded on its own, as numpy rounds it: no fused
    multiply-adds (``_jit``'s ``contract`` would fuse HardSwish's ``0.166667 x + 0.5`` and round once, where the
    chip's float32 path rounds twice)."""
    if numba is None:  # pragma: no cover
        return function
    options = {"boundscheck": False, "nogil": True, "error_model": "numpy"}
    try:
        return numba.njit(cache=True, **options)(function)
    except RuntimeError:  # pragma: no cover - no cache locator
        return numba.njit(**options)(function)


@_jit_exact
def _activate(values: np.ndarray, kind: int, alpha: float, beta: float, scale_in: float, scale_out: float,
              half_even: bool, low: float, high: float, out: np.ndarray) -> None:  # fmt: skip
    """``out = sat(R(f32(f(f32(q 2**e_in))) 2**-e_out))`` per value, the int16 float path (``activations.float_path``)
    with ``f`` one of the ``ACTIVATION_KINDS``, each operation in the precision numpy takes it in there; or the
    identity on float inputs (``e_out = 0``: the input quantization ``kernels.quantize_float``)."""
    a, b = np.float32(alpha), np.float32(beta)
    for k in range(values.shape[0]):
        x = np.float32(values[k] * np.float32(scale_in))
        if kind == HARD_SWISH:
            t = 0.166667 * np.float64(x) + 0.5
            t = t if t > 0.0 else 0.0
            t = t if t < 1.0 else 1.0
            y = np.float32(t * np.float64(x))
        elif kind == HARD_SIGMOID:
            u = np.float32(np.float32(a * x) + b)
            u = u if u > np.float32(0.0) else np.float32(0.0)
            y = u if u < np.float32(1.0) else np.float32(1.0)
        elif kind == LEAKY_RELU:
            y = x if x >= np.float32(0.0) else np.float32(x * a)
        elif kind == RELU:
            y = x if x > np.float32(0.0) else np.float32(0.0)
        else:
            y = x
        scaled = np.float32(y * np.float32(scale_out))
        r = np.float64(np.rint(scaled)) if half_even else np.floor(np.float64(scaled) + 0.5)
        r = r if r > low else low  # NaN (an unchecked input) saturates low, as the reference's int64 conversion
        out[k] = r if r < high else high


@dataclass(frozen=True)
class Activation:
    """An activation after a native step computed value by value instead of looked up in its table over every
    input value (65,536 float32 entries at int16, 256 KB: cold in the cache after the layer's own sums, the
    lookups cost PP-OCR's classifier a fifth of its int16 time at batch 1; computing them took 13 % off the
    whole run, measured alternately in one process). :meth:`verified` builds one only where it equals that
    table on every input value; :meth:`quantizer` is the identity that quantizes a float input."""

    kind: int
    alpha: float
    beta: float
    scale_in: float  # 2**e_in
    scale_out: float  # 2**-e_out
    half_even: bool
    low: float
    high: float

    def __call__(self, values: np.ndarray) -> np.ndarray:
        out = np.empty(values.shape, F32)
        _activate(np.ascontiguousarray(values, dtype=F32).reshape(-1), self.kind, self.alpha, self.beta,
                  self.scale_in, self.scale_out, self.half_even, self.low, self.high, out.reshape(-1))  # fmt: skip
        return out

    @classmethod
    def verified(cls, op_type: str, attrs: dict[str, Any], exponents: tuple[int, int], half_even: bool,
                 table: np.ndarray, lowest: int) -> Activation | None:  # fmt: skip
        """The activation ``op_type`` (ONNX attributes) from exponent ``e_in`` to ``e_out``, when it gives
        ``table`` (float32 outputs from input ``lowest`` up) on every input value; else None (an op it does not
        compute, or numba missing)."""
        kind = ACTIVATION_KINDS.get(op_type)
        if kind is None or not AVAILABLE:
            return None
        e_in, e_out = exponents
        alpha = float(attrs.get("alpha", 0.2 if kind == HARD_SIGMOID else 0.01))
        beta = float(attrs.get("beta", 0.5))
        low, high = float(lowest), float(-lowest - 1)
        found = cls(kind, alpha, beta, 2.0**e_in, 2.0**-e_out, half_even, low, high)
        values = np.arange(lowest, lowest + table.size, dtype=F32)
        return found if np.array_equal(found(values), table) else None

    @classmethod
    def quantizer(cls, exponent: int, half_even: bool, bits: int) -> Activation:
        """The device's input quantization ``q = sat(R(f32(x) f32(2**-e)))`` of float inputs (``kernels.
        quantize_float``): a model whose first layer is a native step quantizes its input so, not in a one-node
        onnxruntime segment (its fixed cost, about 30-40 us a call at batch 1, was a tenth of a small int16
        model's run)."""
        high = float(2 ** (bits - 1) - 1)
        return cls(IDENTITY, 0.0, 0.0, 2.0**-exponent, 1.0, half_even, -high - 1, high)


@_jit
def _lookup(values: np.ndarray, table: np.ndarray, lowest: int, out: np.ndarray) -> None:
    for k in range(values.shape[0]):
        out[k] = table[np.int64(values[k]) - lowest]


def lookup(values: np.ndarray, table: np.ndarray, lowest: int) -> np.ndarray:
    """``table[values - lowest]`` for float32 integers (an activation computed as a table), in one pass."""
    out = np.empty(values.shape, F32)
    _lookup(np.ascontiguousarray(values).reshape(-1), table, lowest, out.reshape(-1))
    return out
