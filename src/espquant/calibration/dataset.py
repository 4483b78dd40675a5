"""Data for a model: arrays, dicts of arrays, or an iterable of batches, validated batch by batch, and fed to
the model in runs of the size it accepts.

A large set streams from disk as an iterable (a generator over ``np.load(..., mmap_mode="r")`` slices, for
example); nothing here keeps more than one batch. Every problem names the input, the expected shape and
the first offending sample's index in the whole set.

Fixed batch: every TFLite-converted model, and many PyTorch exports, declare their input ``[1, ...]``, and
onnxruntime refuses any other batch ("index: 0 Got: 8 Expected: 1"); the integer simulator would fail too,
since such models usually reshape to ``[1, K]``. :class:`Chunking` is the one place that decides how data
reaches a model: a model whose inputs declare a fixed first dimension B is run B samples at a time and the
outputs are concatenated; a model with a dynamic batch gets each batch in one run, as before. Calibration,
evaluation, the layer report and the QDQ comparison all go through it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from espquant.errors import DatasetError, ModelError
from espquant.graph import tensor_shape

# Hints about the user's data, shown on the command line (cli/app.py lets this logger through).
data_logger = logging.getLogger("espquant.data")

__all__ = ["InputSpec", "Chunking", "DYNAMIC_BATCH", "iterate_batches", "model_inputs", "validated_feeds"]

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """A model input: its name and shape (ints for static dims, None for dynamic ones)."""

    name: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class Chunking:
    """How many samples one run of a model takes: any number (``fixed`` None, a dynamic batch), or exactly
    the B its inputs declare (``fixed`` B).

    A data set whose size is not a multiple of B is refused with a :class:`DatasetError` rather than padded:
    padded samples would enter calibration statistics and accuracy counts, and a model with a fixed batch may
    mix samples in ways padding cannot undo. For B = 1, the usual case, every size is a multiple.
    """

    fixed: int | None = None

    @classmethod
    def of(cls, model: onnx.ModelProto | None) -> Chunking:
        """The chunking the model's declared inputs ask for (a dynamic batch when there is no model).

        Raises:
            ModelError: inputs that fix different batch sizes (espquant feeds every input batch first).
        """
        if model is None:
            return cls()
        initializers = {t.name for t in model.graph.initializer}
        fixed: dict[str, int] = {}
        for info in model.graph.input:
            shape = tensor_shape(info)
            if info.name not in initializers and shape and isinstance(shape[0], int) and shape[0] > 0:
                fixed[info.name] = shape[0]
        if len(set(fixed.values())) > 1:
            raise ModelError(
                f"the model's inputs fix different batch sizes ({fixed}); espquant feeds every input batch first: "
                "export the model with one batch dimension shared by all inputs."
            )
        return cls(next(iter(fixed.values()), None))

    def step(self, batch_size: int) -> int:
        """Samples per slice for a caller that slices its data in batches of about ``batch_size``: a multiple
        of B (at least B) for a fixed batch, so that every slice splits into whole runs."""
        if self.fixed is None:
            return batch_size
        return max(self.fixed, batch_size - batch_size % self.fixed)

    def check_total(self, total: int, what: str = "the data") -> None:
        """Refuse a number of samples that does not split into runs of B (class docstring)."""
        if self.fixed is not None and total % self.fixed:
            raise DatasetError(
                f"{what} holds {total} samples, but the model fixes its batch to {self.fixed} (its input's first "
                f"dimension): give a multiple of {self.fixed} samples, or export the model with a dynamic batch."
            )

    def split(self, feeds: Batch, what: str = "the data") -> Iterator[Batch]:
        """``feeds`` in the runs the model takes: itself for a dynamic batch, else slices of B samples."""
        if self.fixed is None:
            yield feeds
            return
        total = _batch_length(feeds)
        self.check_total(total, what)
        if total == self.fixed:
            yield feeds
            return
        for start in range(0, total, self.fixed):
            yield {name: value[start : start + self.fixed] for name, value in feeds.items()}

    def run(
        self, run_once: Callable[[Batch], Sequence[np.ndarray]], feeds: Batch, what: str = "the data"
    ) -> list[np.ndarray]:
        """``run_once`` over ``feeds`` in runs the model takes, its outputs joined along the batch.

        One call for a dynamic batch (the outputs are returned as they are). For a fixed batch B each run's
        outputs are concatenated along their first axis; an output whose first dimension is not B has no
        batch axis (a squeezed ``[1000]`` logits vector of a batch-1 model) and is stacked along a new one,
        so every output has one entry per sample (per run of B samples, for such outputs of B > 1).
        """
        if self.fixed is None:  # one run as the caller's batch is (most calls: no split to walk)
            return list(run_once(feeds))
        parts = [list(run_once(chunk)) for chunk in self.split(feeds, what)]
        if len(parts) == 1:
            return parts[0]
        return [self._join([np.asarray(p[i]) for p in parts]) for i in range(len(parts[0]))]

    def _join(self, values: list[np.ndarray]) -> np.ndarray:
        """The runs' values of one output along the batch (see :meth:`run`)."""
        if all(v.ndim and v.shape[0] == self.fixed for v in values):
            return np.concatenate(values, axis=0)
        return np.stack(values, axis=0)


DYNAMIC_BATCH = Chunking()  # every batch in one run


def _batch_length(feeds: Batch) -> int:
    """The number of samples in a batch whose inputs agree on it."""
    sizes = {len(value) for value in feeds.values()}
    if len(sizes) != 1:
        raise DatasetError(f"the inputs hold different numbers of samples: {sorted(sizes)}.")
    return sizes.pop()


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


def _warn_raw_pixels(name: str, array: np.ndarray) -> None:
    """Integer data from 0 to 255 is almost always raw image pixels; ESP-DL models expect the normalised inputs
    the float model was trained on (the calibrated exponents would describe the wrong range)."""
    if array.dtype.kind in "iu" and array.size and int(array.min()) >= 0 and int(array.max()) > 1:
        data_logger.warning(
            "input %r: the data is %s from %d to %d, which looks like raw pixels; the float model usually "
            "expects normalised values (e.g. pixels / 255): normalise the data as in training",
            name,
            array.dtype,
            int(array.min()),
            int(array.max()),
        )


def _validate(name: str, value: object, spec: InputSpec, start: int) -> np.ndarray:
    array = np.asarray(value)
    if start == 0:
        _warn_raw_pixels(name, array)
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


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (initializers excluded) as the shapes data must match."""
    initializers = {t.name for t in model.graph.initializer}
    return [
        InputSpec(i.name, tuple(d if isinstance(d, int) else None for d in (tensor_shape(i) or [])))
        for i in model.graph.input
        if i.name not in initializers
    ]


def validated_feeds(model: onnx.ModelProto, data: object, what: str = "the data") -> dict[str, np.ndarray]:
    """``data`` (an array for a one-input model, or a dict by input name) checked against the model's inputs
    before onnxruntime or the simulator sees it: names, rank, static dimensions, a numeric dtype, finite values,
    at least one sample. The one check every command that feeds a model uses (evaluate, report, export)."""
    inputs = model_inputs(model)
    specs = {i.name: i for i in inputs}
    feeds = {name: _validate(name, value, specs[name], 0) for name, value in _as_dict(data, inputs, what).items()}
    if any(len(value) == 0 for value in feeds.values()):
        raise DatasetError(f"{what} is empty: give at least one sample.")
    return feeds


def iterate_batches(
    data: object, inputs: list[InputSpec], batch_size: int = 32, chunking: Chunking = DYNAMIC_BATCH
) -> Iterator[Batch]:
    """Validated float32 batches ``{input name: array}`` from any accepted form of calibration data:
    ``batch_size`` samples from an array (rounded down to a multiple of the model's fixed batch B, if any);
    iterables keep their batches, which must then hold a multiple of B samples (``chunking``).

    Raises:
        DatasetError: an empty set, a wrong shape or dtype, NaN/Inf (naming the first bad sample), inputs
            that do not match the model's, or a number of samples the model's fixed batch does not divide.
    """
    if batch_size < 1:
        raise DatasetError(f"batch size {batch_size}: must be at least 1.")
    batch_size = chunking.step(batch_size)
    if isinstance(data, (np.ndarray, Mapping)):
        whole = _as_dict(data, inputs, "calibration data")
        arrays = {name: np.asarray(value) for name, value in whole.items()}
        sizes = {name: (a.shape[0] if a.ndim else 0) for name, a in arrays.items()}
        if len(set(sizes.values())) > 1:
            raise DatasetError(f"calibration data: inputs hold different numbers of samples: {sizes}.")
        total = next(iter(sizes.values()))
        if total == 0:
            raise DatasetError("calibration data is empty: give at least one sample.")
        chunking.check_total(total, "the calibration data")  # before the first run, not after most of them
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
        chunking.check_total(size, f"the calibration batch starting at sample {seen}")
        yield validated
        seen += size
    if seen == 0:
        raise DatasetError("calibration data is empty: give at least one sample.")
