"""The BLAS thread count while a model simulates, so that ``QuantizedModel.threads`` bounds every thread it uses.

``threads`` has always set onnxruntime's intra-op threads; the double products of int16 layers
(simulator/native.py, the interpreter's wide sums) run through numpy's BLAS, which starts its own pool of one
thread per core. With ``threads = 1`` a batch-1 int16 model then kept a second core busy: measured on PP-OCR's
MobileNetV3 direction classifier (ESP32-S3, int16, batch 1, 64 single-image calls on this project's 2-core
machine) 0.81 s of CPU for 0.41 s of wall time with OpenBLAS's two threads, 0.34 s for 0.34 s with one (its
products are too small for a second thread to pay its synchronisation). So the BLAS pool is set to ``threads``
for the run and restored after it; ``threads = None`` leaves it alone. The pool is the process's: two Python
threads simulating at once with different ``threads`` would each see the other's setting while both run.

threadpoolctl finds the BLAS numpy loaded (OpenBLAS, MKL, BLIS); the library's own setter is called directly
(about 1 us) rather than through threadpoolctl's context manager (16 us, as much as a small model's run).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

__all__ = ["blas_threads"]


@functools.cache
def _libraries() -> tuple[Any, ...]:
    """The BLAS libraries loaded in this process (numpy's), each with ``get_num_threads`` / ``set_num_threads``."""
    from threadpoolctl import ThreadpoolController

    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


def blas_threads(count: int | None) -> AbstractContextManager[None]:
    """Run the block with at most ``count`` BLAS threads (``None``: as the BLAS library chose). Nothing to set
    (no count, or no BLAS found) gives a context that does nothing: a small model at batch 1 enters one per run."""
    libraries = _libraries() if count else ()
    return _limited(libraries, count) if libraries and count else contextlib.nullcontext()


@contextlib.contextmanager
def _limited(libraries: tuple[Any, ...], count: int) -> Iterator[None]:
    previous = [library.get_num_threads() for library in libraries]
    for library, threads in zip(libraries, previous):
        if threads != count:
            library.set_num_threads(count)
    try:
        yield
    finally:
        for library, threads in zip(libraries, previous):
            if threads != count:
                library.set_num_threads(threads)
