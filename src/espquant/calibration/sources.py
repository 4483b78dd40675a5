"""Data the way people have it, as batches a model takes: the one place ``calibrate``, ``evaluate`` and
``quantize`` turn ``--data`` (or a Python object) into samples.

Accepted forms:

- a ``.npy`` / ``.npz`` file (through :mod:`espquant.arrays`, memory-mapped);
- a folder of images (``.png .jpg .jpeg .bmp``), decoded and preprocessed one by one
  (:mod:`espquant.calibration.preprocess`), in sorted file-name order;
- a folder of ``.npy`` files, each one sample (the model input's rank minus one) or one batch;
- in Python: an array, a dict of arrays, or any iterable of such batches, ``(inputs, labels)`` pairs included,
  so a torch ``DataLoader`` works as it is. Tensors are recognised by duck typing (``.detach().cpu().numpy()``):
  torch is never imported here.

Memory stays flat in the number of files: a folder is a sorted list of paths and a generator reads one batch at
a time. :meth:`DataSource.split` holds out the last part of the data for evaluation (``quantize``): by sample
index for arrays, by file for folders, by batch for sized iterables; a one-shot iterable (a generator) is read
once, and the batches at its end are held back as it goes, since its length is unknown until it ends.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from espquant.calibration.dataset import InputSpec
from espquant.calibration.preprocess import IMAGE_SUFFIXES, Preprocess, load_image, parse_preprocess, require_pillow
from espquant.errors import DatasetError

__all__ = ["DataSource", "ArraySource", "FileSource", "IterableSource", "open_data", "to_numpy", "as_feeds"]

Inputs = Any  # np.ndarray | dict[str, np.ndarray]
Labelled = tuple[Inputs, "np.ndarray | None"]
STREAM_HOLDOUT_CAP = 2048  # samples a one-shot iterable may keep back in memory for evaluation


def to_numpy(value: Any) -> Any:
    """An array (or a dict of arrays) from numpy data or anything tensor-like, without importing torch."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, Mapping):
        return {str(k): to_numpy(v) for k, v in value.items()}
    if hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _count(inputs: Inputs) -> int:
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
    return int(first.shape[0]) if getattr(first, "ndim", 0) else 0


def _take(inputs: Inputs, start: int, stop: int) -> Inputs:
    if isinstance(inputs, dict):
        return {k: v[start:stop] for k, v in inputs.items()}
    return inputs[start:stop]


def as_feeds(inputs: Inputs, names: list[str]) -> dict[str, np.ndarray]:
    """One batch as ``{input name: float32 array}`` (a bare array feeds a single-input model)."""
    if isinstance(inputs, dict):
        return {k: np.asarray(v, dtype=np.float32) for k, v in inputs.items()}
    if len(names) != 1:
        raise DatasetError(f"the model has {len(names)} inputs ({names}); give one array per input name.")
    return {names[0]: np.asarray(inputs, dtype=np.float32)}


class DataSource(ABC):
    """Samples in a fixed order, read batch by batch; ``labels`` (one per sample, optional) ride along."""

    def __init__(self, label: str, labels: np.ndarray | None = None) -> None:
        self.label = label
        self.labels = labels

    @property
    @abstractmethod
    def samples(self) -> int | None:
        """The number of samples when known without reading the data (None for a generator)."""

    @abstractmethod
    def batches(self) -> Iterator[Labelled]:
        """``(inputs, labels or None)`` batches, in order."""

    @abstractmethod
    def split(self, fraction: float, multiple: int = 1) -> tuple[DataSource, DataSource]:
        """(calibration part, held-out part): the last ``fraction`` of the data (at least one sample, or one
        ``multiple``: a model's fixed batch) is held out. A set too small to split is used for both (the
        second is the same data), rather than refused: a one-image smoke test should still run."""

    @property
    def ready(self) -> bool:
        """Whether :meth:`batches` can be read now (a generator's held-out end only once the rest was read)."""
        return True

    def calibration_data(self) -> object:
        """What the calibration engine takes: the inputs of every batch (a lazy generator)."""
        return (inputs for inputs, _ in self.batches())

    def with_labels(self, labels: np.ndarray) -> DataSource:
        """Attach ``labels`` (one per sample, in order); the number must match a known sample count."""
        if self.samples is None:
            raise DatasetError(f"{self.label}: its length is unknown up front; labels cannot be matched to it.")
        if len(labels) != self.samples:
            raise DatasetError(f"--labels: {len(labels)} labels for {self.samples} samples in {self.label}.")
        self.labels = labels
        return self

    def _labels_for(self, start: int, stop: int) -> np.ndarray | None:
        return None if self.labels is None else self.labels[start:stop]


def _holdout(total: int, fraction: float, multiple: int) -> int:
    """Held-out samples of ``total``: ``ceil(fraction * total)``, at least 1, rounded up to ``multiple``."""
    count = max(1, math.ceil(fraction * total))
    return math.ceil(count / multiple) * multiple


class ArraySource(DataSource):
    """An array ``(N, ...)`` or a dict of them (memory-mapped from a file, or in memory), sliced lazily."""

    def __init__(
        self,
        inputs: Inputs,
        label: str,
        batch_size: int = 32,
        labels: np.ndarray | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        super().__init__(label, labels)
        self.inputs = inputs
        self.batch_size = batch_size
        sizes = {_count(v) for v in inputs.values()} if isinstance(inputs, dict) else {_count(inputs)}
        if len(sizes) != 1:
            raise DatasetError(f"{label}: the inputs hold different numbers of samples: {sorted(sizes)}.")
        self.start, self.stop = start, sizes.pop() if stop is None else stop

    @property
    def samples(self) -> int:
        return self.stop - self.start

    def view(self) -> Inputs:
        """This part of the arrays (a view: nothing is copied)."""
        return _take(self.inputs, self.start, self.stop)

    def batches(self) -> Iterator[Labelled]:
        for at in range(self.start, self.stop, self.batch_size):
            end = min(at + self.batch_size, self.stop)
            yield _take(self.inputs, at, end), self._labels_for(at, end)

    def calibration_data(self) -> object:
        """The arrays themselves: the engine slices them as `espquant calibrate --data part.npy` would."""
        return self.view()

    def with_labels(self, labels: np.ndarray) -> DataSource:
        if len(labels) != self.samples:
            raise DatasetError(f"--labels: {len(labels)} labels for {self.samples} samples in {self.label}.")
        self.labels = np.concatenate([np.zeros(self.start, labels.dtype), labels]) if self.start else labels
        return self

    def split(self, fraction: float, multiple: int = 1) -> tuple[DataSource, DataSource]:
        held = _holdout(self.samples, fraction, multiple)
        if held >= self.samples:
            return self, self
        cut = self.stop - held
        make = ArraySource
        return (
            make(self.inputs, self.label, self.batch_size, self.labels, self.start, cut),
            make(self.inputs, f"{self.label} (held-out last {held})", self.batch_size, self.labels, cut, self.stop),
        )


class FileSource(DataSource):
    """A folder of images or ``.npy`` files, read one file at a time in sorted name order."""

    def __init__(
        self,
        files: list[Path],
        read: Callable[[Path], np.ndarray],
        label: str,
        batch_size: int = 32,
        counts: Callable[[Path], int] | None = None,
        labels: np.ndarray | None = None,
        first: int = 0,
    ) -> None:
        super().__init__(label, labels)
        self.files, self.read, self.batch_size, self.counts, self.first = files, read, batch_size, counts, first
        self._samples: int | None = None

    @property
    def samples(self) -> int:
        if self._samples is None:
            self._samples = len(self.files) if self.counts is None else sum(self.counts(f) for f in self.files)
        return self._samples

    def with_labels(self, labels: np.ndarray) -> DataSource:
        super().with_labels(labels)
        self.labels = np.concatenate([np.zeros(self.first, labels.dtype), labels]) if self.first else labels
        return self

    def batches(self) -> Iterator[Labelled]:
        pending: list[np.ndarray] = []
        waiting = 0
        position = self.first
        for path in self.files:
            value = self.read(path)  # a batch: read() gives single samples a batch axis of 1
            pending.append(value)
            waiting += len(value)
            if waiting >= self.batch_size:
                batch = np.concatenate(pending) if len(pending) > 1 else pending[0]
                pending, waiting = [], 0
                yield batch, self._labels_for(position, position + len(batch))
                position += len(batch)
        if pending:
            batch = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield batch, self._labels_for(position, position + len(batch))

    def split(self, fraction: float, multiple: int = 1) -> tuple[DataSource, DataSource]:
        if self.counts is None:  # one sample per file
            held = _holdout(len(self.files), fraction, multiple)
            if held >= len(self.files):
                return self, self
            cut = len(self.files) - held
        else:  # batch files: hold out whole files from the end until the fraction is reached
            sizes = [self.counts(f) for f in self.files]
            want, held, cut = _holdout(sum(sizes), fraction, multiple), 0, len(self.files)
            while cut > 1 and held < want:
                cut -= 1
                held += sizes[cut]
            if held < want or cut == 0:
                return self, self
        before = len(self.files[:cut]) if self.counts is None else sum(self.counts(f) for f in self.files[:cut])
        return (
            FileSource(self.files[:cut], self.read, self.label, self.batch_size, self.counts, self.labels, self.first),
            FileSource(
                self.files[cut:],
                self.read,
                f"{self.label} (held-out last {len(self.files) - cut} file(s))",
                self.batch_size,
                self.counts,
                self.labels,
                self.first + before,
            ),
        )


def _split_item(item: Any) -> Labelled:
    """A batch from an iterable: inputs, or ``(inputs, labels)`` as a DataLoader over labelled data yields."""
    if isinstance(item, (tuple, list)) and len(item) in (1, 2) and not isinstance(item[0], (int, float)):
        labels = to_numpy(item[1]).reshape(-1) if len(item) == 2 and item[1] is not None else None
        return to_numpy(item[0]), labels
    return to_numpy(item), None


class IterableSource(DataSource):
    """Any iterable of batches (a list, a generator, a torch DataLoader)."""

    def __init__(self, iterable: Iterable[Any], label: str = "the data") -> None:
        super().__init__(label)
        self.iterable = iterable

    @property
    def samples(self) -> int | None:
        return None

    def batches(self) -> Iterator[Labelled]:
        for item in self.iterable:
            yield _split_item(item)

    def split(self, fraction: float, multiple: int = 1) -> tuple[DataSource, DataSource]:
        # Sized and not an iterator (a list, a DataLoader): each part iterates it anew, nothing is kept.
        sized = hasattr(self.iterable, "__len__") and not isinstance(self.iterable, Iterator)
        if sized and len(self.iterable) >= 2:  # type: ignore[arg-type]
            total = len(self.iterable)  # type: ignore[arg-type]
            cut = total - max(1, math.ceil(fraction * total))
            return _Slice(self.iterable, 0, cut, self.label), _Slice(self.iterable, cut, total, self.label)
        holdback = _Holdback(self.batches(), fraction, multiple, self.label)
        return holdback.calibration_source(), holdback.held_source()


class _Slice(DataSource):
    """Batches ``start:stop`` of a re-iterable sized iterable (each part iterates it anew)."""

    def __init__(self, iterable: Iterable[Any], start: int, stop: int, label: str) -> None:
        super().__init__(f"{label} (batches {start}..{stop - 1})")
        self.iterable, self.start, self.stop = iterable, start, stop

    @property
    def samples(self) -> int | None:
        return None

    def batches(self) -> Iterator[Labelled]:
        for index, item in enumerate(self.iterable):
            if index >= self.stop:
                break
            if index >= self.start:
                yield _split_item(item)

    def split(self, fraction: float, multiple: int = 1) -> tuple[DataSource, DataSource]:
        return self, self


class _Holdback:
    """A one-shot iterable read once: batches go to calibration while the last ``fraction`` of the batches seen
    so far (at most :data:`STREAM_HOLDOUT_CAP` samples) is kept back; what is kept at the end is the held-out
    part. A single batch is split by samples."""

    def __init__(self, batches: Iterator[Labelled], fraction: float, multiple: int, label: str) -> None:
        self.source, self.fraction, self.multiple, self.label = batches, fraction, multiple, label
        self.held: deque[Labelled] = deque()
        self.finished = False
        self.same = False

    def _stream(self) -> Iterator[Labelled]:
        released = held_samples = 0
        for seen, item in enumerate(self.source, start=1):
            self.held.append(item)
            held_samples += _count(item[0])
            while len(self.held) > 1 and (
                len(self.held) > max(1, math.ceil(self.fraction * seen)) or held_samples > STREAM_HOLDOUT_CAP
            ):
                out = self.held.popleft()
                held_samples -= _count(out[0])
                released += 1
                yield out
        if released == 0 and len(self.held) == 1:
            inputs, labels = self.held.pop()
            total = _count(inputs)
            keep = _holdout(total, self.fraction, self.multiple)
            if keep >= total:
                self.same = True
                self.held.append((inputs, labels))
                yield inputs, labels
            else:
                cut = total - keep
                self.held.append((_take(inputs, cut, total), None if labels is None else labels[cut:]))
                yield _take(inputs, 0, cut), None if labels is None else labels[:cut]
        self.finished = True

    def calibration_source(self) -> DataSource:
        return _Once(self._stream(), self.label)

    def held_source(self) -> DataSource:
        return _Held(self, f"{self.label} (held-out end)")


class _Once(DataSource):
    """A stream that can be read once."""

    def __init__(self, stream: Iterator[Labelled], label: str) -> None:
        super().__init__(label)
        self.stream = stream

    @property
    def samples(self) -> int | None:
        return None

    def batches(self) -> Iterator[Labelled]:
        return self.stream

    def split(self, fraction: float, multiple: int = 1) -> tuple[DataSource, DataSource]:
        return self, self


class _Held(DataSource):
    """The batches a :class:`_Holdback` kept: readable once calibration has read the stream to its end."""

    def __init__(self, holdback: _Holdback, label: str) -> None:
        super().__init__(label)
        self.holdback = holdback

    @property
    def samples(self) -> int | None:
        return sum(_count(i) for i, _ in self.holdback.held) if self.holdback.finished else None

    @property
    def ready(self) -> bool:
        return self.holdback.finished

    def batches(self) -> Iterator[Labelled]:
        if not self.holdback.finished:
            raise DatasetError(f"{self.label}: read the calibration part to its end first.")
        return iter(list(self.holdback.held))

    def split(self, fraction: float, multiple: int = 1) -> tuple[DataSource, DataSource]:
        return self, self


def _folder_source(folder: Path, inputs: list[InputSpec], preprocess: Preprocess, batch_size: int) -> DataSource:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    arrays = [p for p in files if p.suffix.lower() == ".npy"]
    if images and arrays:
        raise DatasetError(f"{folder}: holds both images and .npy files; keep one kind of data per folder.")
    if not images and not arrays:
        raise DatasetError(
            f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) and no .npy files in it; give a folder of data."
        )
    if len(inputs) != 1:
        raise DatasetError(f"{folder}: a folder feeds one input, but the model has {len(inputs)}; give an .npz file.")
    rank = len(inputs[0].shape) if inputs[0].shape else None
    if images:
        require_pillow()
        settled = preprocess.for_input(inputs[0].shape or None)
        return FileSource(images, lambda p: load_image(p, settled)[None], str(folder), batch_size)
    from espquant.arrays import load_arrays

    def read(path: Path) -> np.ndarray:
        value = load_arrays(path, "--data", mmap=True)
        if isinstance(value, dict):  # load_arrays reads .npy files only here
            raise DatasetError(f"--data {path}: expected one array.")
        if rank is not None and value.ndim == rank - 1:
            return np.asarray(value)[None]
        if rank is not None and value.ndim != rank:
            raise DatasetError(
                f"--data {path}: rank {value.ndim}; the model's input {inputs[0].name!r} takes rank {rank} batches "
                f"(or rank {rank - 1} samples)."
            )
        return value

    def count(path: Path) -> int:
        value = read(path)
        return int(value.shape[0])

    return FileSource(arrays, read, str(folder), batch_size, counts=count)


def _say_archive_key(path: Path, inputs: list[Any]) -> None:
    """An ``.npz`` with one array feeds a one-input model whatever its key: when the key is not the input's
    name, say which array is used (a file saved for another model would otherwise pass silently)."""
    if path.suffix != ".npz" or len(inputs) != 1:
        return
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
    except Exception:  # noqa: BLE001 - load_arrays reports a damaged file properly
        return
    name = getattr(inputs[0], "name", str(inputs[0]))
    if len(keys) == 1 and keys[0] != name:
        logging.getLogger("espquant.data").warning(
            "%s: its one array %r feeds the model's input %r", path, keys[0], name
        )


def open_data(
    data: object,
    inputs: list[InputSpec],
    *,
    preprocess: str | Preprocess | None = None,
    batch_size: int = 32,
    what: str = "--data",
) -> DataSource:
    """Any accepted form of data (module docstring) as a :class:`DataSource` for a model with ``inputs``.

    Raises:
        DatasetError: a missing path, a folder without data, an unreadable file (named), a bad form.
        OptionError: a bad ``preprocess`` spec.
    """
    if isinstance(data, DataSource):
        return data
    spec = preprocess if isinstance(preprocess, Preprocess) else parse_preprocess(preprocess)
    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.is_dir():
            return _folder_source(path, inputs, spec, batch_size)
        from espquant.arrays import load_arrays

        _say_archive_key(path, inputs)
        return ArraySource(load_arrays(path, what, mmap=True), f"{what} {path}", batch_size)
    if isinstance(data, (np.ndarray, Mapping)):
        return ArraySource(to_numpy(data), "the data", batch_size)
    if hasattr(data, "detach") and hasattr(data, "numpy"):  # one tensor holding the whole set
        return ArraySource(to_numpy(data), "the data", batch_size)
    if isinstance(data, bytes) or not isinstance(data, Iterable):
        raise DatasetError(
            f"data of type {type(data).__name__}: give a .npy / .npz file, a folder of images or .npy files, an "
            "array, a dict of arrays, or an iterable of batches (a torch DataLoader works)."
        )
    return IterableSource(data)
