"""Weight byte orders of ``.espdl`` files (ESPDL_FORMAT.md 5.2): decoded to plain arrays, and encoded back.

PIE targets (ESP32-S3, -P4) store Conv / Gemm / constant-MatMul weights in blocks of ``A`` output channels
(16 for int8, 8 for int16) interleaved per tap, then the tail channels plainly; plain-C targets store
NHWC (Conv), HWCN (depthwise) and ``[N][K]`` (Gemm). The dims written in the file are only a label.
"""

from __future__ import annotations

import numpy as np

from espquant.quant.pot import simd_lanes

__all__ = [
    "decode_conv_weight",
    "decode_depthwise_weight",
    "decode_kn_matrix",
    "encode_conv_weight",
    "encode_depthwise_weight",
    "encode_kn_matrix",
]


def decode_conv_weight(flat: np.ndarray, n: int, kh: int, kw: int, c: int, bits: int, blocked: bool) -> np.ndarray:
    """Conv weights as ``(N, KH, KW, C)``."""
    flat = flat.reshape(-1)
    if not blocked:
        return flat.reshape(n, kh, kw, c)
    lanes = simd_lanes(bits)
    head_n = (n // lanes) * lanes
    head_size = head_n * kh * kw * c
    head = flat[:head_size].reshape(head_n // lanes, kh, kw, c, lanes).transpose(0, 4, 1, 2, 3)
    tail = flat[head_size:].reshape(n - head_n, kh, kw, c)
    return np.concatenate([head.reshape(head_n, kh, kw, c), tail])


def decode_depthwise_weight(flat: np.ndarray, n: int, kh: int, kw: int, bits: int, blocked: bool) -> np.ndarray:
    """Depthwise weights as ``(N, KH, KW)``."""
    flat = flat.reshape(-1)
    if not blocked:
        return flat.reshape(kh, kw, n).transpose(2, 0, 1)
    lanes = simd_lanes(bits)
    head_n = (n // lanes) * lanes
    head_size = head_n * kh * kw
    head = flat[:head_size].reshape(head_n // lanes, kh, kw, lanes).transpose(0, 3, 1, 2).reshape(head_n, kh, kw)
    tail = flat[head_size:].reshape(kh, kw, n - head_n).transpose(2, 0, 1)
    return np.concatenate([head, tail])


def decode_kn_matrix(flat: np.ndarray, k: int, n: int, bits: int, blocked: bool) -> np.ndarray:
    """A Gemm / MatMul ``K x N`` slice as ``(K, N)``: blocked like a 1x1 conv with C = K, or ``[N][K]``."""
    return decode_conv_weight(flat, n, 1, 1, k, bits, blocked).reshape(n, k).T


def encode_conv_weight(weight: np.ndarray, bits: int, blocked: bool) -> np.ndarray:
    """``(N, KH, KW, C)`` weights in the file's byte order (flat): blocks of ``A`` output channels interleaved
    per tap, then the tail channels plainly (PIE), or NHWC (plain C)."""
    n, kh, kw, c = weight.shape
    if not blocked:
        return weight.reshape(-1)
    lanes = simd_lanes(bits)
    head_n = (n // lanes) * lanes
    head = weight[:head_n].reshape(head_n // lanes, lanes, kh, kw, c).transpose(0, 2, 3, 4, 1)
    return np.concatenate([head.reshape(-1), weight[head_n:].reshape(-1)])


def encode_depthwise_weight(weight: np.ndarray, bits: int, blocked: bool) -> np.ndarray:
    """``(N, KH, KW)`` depthwise weights in the file's byte order: blocked head then ``HWN`` tail, or ``HWN``."""
    n, kh, kw = weight.shape
    if not blocked:
        return weight.transpose(1, 2, 0).reshape(-1)
    lanes = simd_lanes(bits)
    head_n = (n // lanes) * lanes
    head = weight[:head_n].reshape(head_n // lanes, lanes, kh, kw).transpose(0, 2, 3, 1)
    return np.concatenate([head.reshape(-1), weight[head_n:].transpose(1, 2, 0).reshape(-1)])


def encode_kn_matrix(matrix: np.ndarray, bits: int, blocked: bool) -> np.ndarray:
    """A ``(K, N)`` Gemm / MatMul matrix in the file's byte order (a 1x1 conv with C = K)."""
    k, n = matrix.shape
    return encode_conv_weight(np.ascontiguousarray(matrix.T).reshape(n, 1, 1, k), bits, blocked)
