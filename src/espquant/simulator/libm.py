"""The C library's float32 ``expf`` as the runtime calls it, vectorised.

ESP-DL computes Softmax's exp table, int16 Sigmoid / Swish / Exp and the like with ``expf`` at run time on the
chip. newlib's and glibc's ``expf`` (ARM's optimized routines) are correctly rounded but for rare inputs;
numpy's float32 ``exp`` is not: it differs by one ulp on about 100 of the 256 entries of an int8 Softmax table,
enough to flip roundings after it (a Softmax read by a MatMul through its QuantizeLinear). The float64 ``exp``
rounded once to float32 is the correctly rounded value.
"""

from __future__ import annotations

import numpy as np

__all__ = ["expf"]

F32 = np.float32


def expf(x: np.ndarray) -> np.ndarray:
    """float32 ``exp`` of every element, correctly rounded (module docstring); inf above ~88.7, as in C."""
    with np.errstate(over="ignore"):
        return np.exp(np.asarray(x, dtype=F32).astype(np.float64)).astype(F32)
