"""Calibration data: arrays, dicts of arrays, or an iterable of batches, validated batch by batch.

A large set streams from disk as an iterable (a generator over ``np.load(..., mmap_mode="r")`` slices, for
example); nothing here keeps more than one batch. Every problem names the input, the expected shape and
the first offending sample's index in the whole set.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from espquant.errors import DatasetError

__all__ = ["InputSpec", "iterate_batches"]

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """A model input: its name and shape (ints for static dims, None for dynamic ones)."""

    name: str
    shape: tuple[int | None, ...]


def _as_dict(batch: object, inputs: list[InputSpec], where: str) -> dict[str, object]:
    if isinstance(batch, Mapping):
        unknown = [k for k in batch if k not in {i.name for i in inputs}]
        if unknown:
            raise DatasetError(
                f"{where}: unknown input(s) {unknown}; the model's inputs are {[i.name for i in inputs]}."
            )
        missing = [i.name for i in inputs if i.name not in batch]
        if missing:
            raise DatasetError(f"{where}: no data for input(s) {missing}.")
        return dict(batch)
    if len(inputs) != 1:
        raise DatasetError(
            f"{where}: the model has {len(inputs)} inputs ({[i.name for i in inputs]}); pass a dict name -> array."
        )
    return {inputs[0].name: batch}


def _validate(name: str, value: object, spec: InputSpec, start: int) -> np.ndarray:
    array = np.asarray(value)
    expected = "(N, " + ", ".join("?" if d is None else str(d) for d in spec.shape[1:]) + ")"
    if array.dtype.kind not in "fiu":
        raise DatasetError(f"input {name!r}: data of dtype {array.dtype} is not numeric; expected float32 {expected}.")
    if array.ndim != len(spec.shape):
        raise DatasetError(
            f"input {name!r}: data of shape {tuple(array.shape)} starting at sample {start} does not match the "
            f"model's {expected} (rank {array.ndim} instead of {len(spec.shape)})."
        )
    for axis, (got, want) in enumerate(zip(array.shape[1:], spec.shape[1:]), start=1):
        if want is not None and got != want:
            raise DatasetError(
                f"input {name!r}: data of shape {tuple(array.shape)} starting at sample {start} does not match the "
                f"model's {expected} (axis {axis} is {got}, expected {want})."
            )
    array = array.astype(np.float32, copy=False)
    finite = np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1) if array.size else np.ones(0, bool)
    if not finite.all():
        first = start + int(np.argmin(finite))
        raise DatasetError(f"input {name!r}: sample {first} contains NaN or Inf; clean or drop it.")
    return array


def iterate_batches(data: object, inputs: list[InputSpec], batch_size: int = 32) -> Iterator[Batch]:
    """Validated float32 batches ``{input name: array}`` from any accepted form of calibration data.

    Raises:
        DatasetError: an empty set, a wrong shape or dtype, NaN/Inf (naming the first bad sample), or
            inputs that do not match the model's.
    """
    if batch_size < 1:
        raise DatasetError(f"batch size {batch_size}: must be at least 1.")
    if isinstance(data, (np.ndarray, Mapping)):
        whole = _as_dict(data, inputs, "calibration data")
        arrays = {name: np.asarray(value) for name, value in whole.items()}
        sizes = {name: (a.shape[0] if a.ndim else 0) for name, a in arrays.items()}
        if len(set(sizes.values())) > 1:
            raise DatasetError(f"calibration data: inputs hold different numbers of samples: {sizes}.")
        total = next(iter(sizes.values()))
        if total == 0:
            raise DatasetError("calibration data is empty: give at least one sample.")
        source: Iterable[object] = (
            {name: a[start : start + batch_size] for name, a in arrays.items()} for start in range(0, total, batch_size)
        )
    elif isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise DatasetError(
            f"calibration data of type {type(data).__name__}: pass an array (N, ...), a dict of arrays, "
            "or an iterable of such batches."
        )
    else:
        source = data
    specs = {i.name: i for i in inputs}
    seen = 0
    for batch in source:
        as_dict = _as_dict(batch, inputs, f"calibration batch starting at sample {seen}")
        validated = {name: _validate(name, value, specs[name], seen) for name, value in as_dict.items()}
        counts = {a.shape[0] for a in validated.values()}
        if len(counts) > 1:
            raise DatasetError(f"calibration batch starting at sample {seen}: inputs hold different batch sizes.")
        size = counts.pop()
        if size == 0:
            continue
        yield validated
        seen += size
    if seen == 0:
        raise DatasetError("calibration data is empty: give at least one sample.")
