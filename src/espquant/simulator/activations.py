"""Float definitions of ESP-DL's activations and how they become integers (ARITHMETIC.md 8).

At int8 an activation is a 256-entry table built like ESP-PPQ's exporter: ``x_i = (i - 128) 2^e_in``,
``T[i] = sat8(R(f(x_i) / 2^e_out))`` with the float32 function. At int16 the chip computes in float32:
``out = sat(R(f32(f(q 2^e_in)) 2^-e_out))``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from espquant.quant.rounding import round_float, saturate
from espquant.simulator.libm import expf

__all__ = [
    "FLOAT_FUNCTIONS",
    "TABLE_ONLY",
    "INT16_LUT_STEP",
    "float_function",
    "lut_table",
    "lut_table_int16",
    "float_path",
]

# Ops ESP-DL runs only through a stored table, at int16 too (``dl_module_creator.hpp`` registers them to LUT).
TABLE_ONLY = frozenset({"Gelu"})
# The input step of the int16 tables espquant writes (ESP-PPQ's default): 65536 / 32 + 1 = 2049 entries.
INT16_LUT_STEP = 32

F32 = np.float32


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + expf(-x.astype(F32)).astype(np.float64))).astype(F32)  # 1 / (1 + inf) = 0 below -88


def _hard_sigmoid(alpha: float, beta: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: np.clip(F32(alpha) * x + F32(beta), 0, 1).astype(F32)


def float_function(op_type: str, attrs: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    """The float32 function ``f`` of an activation node (ONNX attributes with their defaults)."""
    if op_type == "Sigmoid":
        return _sigmoid
    if op_type == "Tanh":
        return lambda x: (2.0 * _sigmoid(2.0 * x) - 1.0).astype(F32)
    if op_type == "HardSigmoid":
        return _hard_sigmoid(attrs.get("alpha", 0.2), attrs.get("beta", 0.5))
    if op_type == "HardSwish":
        return lambda x: (np.clip(0.166667 * x.astype(np.float64) + 0.5, 0, 1) * x).astype(F32)
    if op_type == "Swish":
        return lambda x: (_sigmoid(x) * x).astype(F32)
    if op_type == "LeakyRelu":
        alpha = F32(attrs.get("alpha", 0.01))
        return lambda x: np.where(x >= 0, x, x * alpha).astype(F32)
    if op_type == "Elu":
        alpha = F32(attrs.get("alpha", 1.0))
        return lambda x: np.where(x >= 0, x, alpha * (expf(x) - 1)).astype(F32)
    if op_type == "Relu":
        return lambda x: np.maximum(x, 0).astype(F32)
    if op_type in ("Exp", "Log", "Sqrt"):
        fn = {"Exp": expf, "Log": np.log, "Sqrt": np.sqrt}[op_type]

        def safe(x: np.ndarray) -> np.ndarray:
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                return fn(x.astype(F32)).astype(F32)

        return safe
    if op_type == "Gelu":
        from math import erf, sqrt

        erf_v = np.vectorize(erf)
        return lambda x: (0.5 * x * (1 + erf_v(x.astype(np.float64) / sqrt(2.0)))).astype(F32)
    raise KeyError(op_type)


FLOAT_FUNCTIONS = ("Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Swish", "LeakyRelu", "Elu", "Relu", "Exp", "Log",
                   "Sqrt", "Gelu")  # fmt: skip


def _to_int(y: np.ndarray, e_out: int, bits: int, rounding: str) -> np.ndarray:
    scaled = (y.astype(F32) * F32(2.0**-e_out)).astype(F32)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=2.0**bits, neginf=-(2.0**bits))
    return saturate(round_float(scaled, rounding), bits)


def lut_table(fn: Callable[[np.ndarray], np.ndarray], e_in: int, e_out: int, rounding: str) -> np.ndarray:
    """The int8 table of ``fn`` for exponents ``e_in -> e_out``."""
    x = ((np.arange(256) - 128) * 2.0**e_in).astype(F32)
    return _to_int(fn(x), e_out, 8, rounding).astype(np.int64)


def lut_table_int16(
    fn: Callable[[np.ndarray], np.ndarray], e_in: int, e_out: int, rounding: str, step: int = INT16_LUT_STEP
) -> np.ndarray:
    """The int16 table of ``fn``: ``65536 / step + 1`` entries at ``x_i = (-32768 + i step) 2^e_in`` (the last at
    +32768 when step > 1), ``T[i] = sat16(R(f(x_i) / 2^e_out))`` (ARITHMETIC.md 8.2)."""
    x = ((np.arange(65536 // step + 1) * step - 32768) * 2.0**e_in).astype(F32)
    return _to_int(fn(x), e_out, 16, rounding).astype(np.int64)


def float_path(
    fn: Callable[[np.ndarray], np.ndarray], q: np.ndarray, e_in: int, e_out: int, bits: int, rounding: str
) -> np.ndarray:
    """The float32 fall-back: dequantize, ``f``, requantize with the profile's rounding."""
    x = (q.astype(F32) * F32(2.0**e_in)).astype(F32)
    return _to_int(fn(x), e_out, bits, rounding)
