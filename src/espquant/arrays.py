"""Reading the user's numpy files (data, labels, inputs): one place that turns every way a file can be wrong
into a :class:`~espquant.errors.DatasetError` naming the file and what to do, never a traceback.

A header is read and checked before the data: its shape must match the bytes the file really holds, so a
damaged or hostile header cannot make numpy allocate gigabytes from a few bytes.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import IO

import numpy as np

from espquant.errors import DatasetError

__all__ = ["load_arrays", "load_labels", "check_labels", "classes_of"]

# Deflate cannot expand more than about 1032:1; an archive member claiming more is damaged.
_MAX_EXPANSION = 1100


def load_arrays(path: str | Path, what: str = "data", mmap: bool = False) -> np.ndarray | dict[str, np.ndarray]:
    """The array of a ``.npy`` file, or the arrays of an ``.npz`` file by name (one array: that array).

    ``what`` says what the file is for in messages (``"--labels"``). With ``mmap`` a ``.npy`` file is
    memory-mapped, so large sets stream from disk. Pickled object arrays are refused (``allow_pickle=False``)."""
    source = Path(path)
    if not source.is_file():
        raise DatasetError(f"{what} {source}: no such data file.")
    if source.suffix not in (".npy", ".npz"):
        raise DatasetError(f"{what} {source}: give a .npy array or an .npz archive of arrays.")
    try:
        if source.suffix == ".npy":
            with source.open("rb") as stream:
                _check_header(stream, source.stat().st_size, f"{what} {source}")
            array = np.load(source, mmap_mode="r" if mmap else None, allow_pickle=False)
            return _checked(array, f"{what} {source}")
        arrays = _load_archive(source, what)
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy's parsers raise ValueError, SyntaxError, TokenError, ...
        raise DatasetError(f"{what} {source}: cannot read it as numpy data ({type(exc).__name__}: {exc}).") from exc
    if not arrays:
        raise DatasetError(f"{what} {source}: the archive holds no arrays.")
    return next(iter(arrays.values())) if len(arrays) == 1 else arrays


def _load_archive(source: Path, what: str) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(source) as archive:
        for info in archive.infolist():
            where = f"{what} {source} [{info.filename}]"
            if info.file_size > _MAX_EXPANSION * max(info.compress_size, 1) + (1 << 20):
                raise DatasetError(f"{where}: claims {info.file_size} bytes from {info.compress_size}: damaged.")
            with archive.open(info) as stream:
                _check_header(stream, info.file_size, where)
    with np.load(source, allow_pickle=False) as archive:
        return {name: _checked(archive[name], f"{what} {source} [{name}]") for name in archive.files}


def _check_header(stream: IO[bytes], size: int, where: str) -> None:
    """The ``.npy`` header's shape and dtype must describe at most the bytes that follow it."""
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(stream)
    if dtype.hasobject:
        raise DatasetError(f"{where}: an array of Python objects; save numbers (pickles are not loaded).")
    count = 1
    for dim in shape:
        count *= int(dim)
    if count * dtype.itemsize > size:
        raise DatasetError(f"{where}: the header declares shape {list(shape)[:8]} but the file is {size} bytes.")


def _checked(array: np.ndarray, where: str) -> np.ndarray:
    if array.ndim == 0:
        raise DatasetError(f"{where}: a single number (0-d array); give an array of samples (N, ...).")
    if array.dtype.kind not in "biuf":
        raise DatasetError(f"{where}: {array.dtype} values are not numbers.")
    return array


def load_labels(path: str | Path, samples: int) -> np.ndarray:
    """Class indices for ``samples`` samples: a 1-D integer array (or ``(N, 1)``) of that length
    (:func:`check_labels` holds them against the model's classes)."""
    labels = load_arrays(path, "--labels")
    where = f"--labels {path}"
    if isinstance(labels, dict):
        raise DatasetError(f"{where}: an archive of {len(labels)} arrays; give one array of class indices.")
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DatasetError(f"{where}: shape {list(labels.shape)}; give one class index per sample (N,).")
    if labels.dtype.kind not in "iu" and not (labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0)):
        raise DatasetError(f"{where}: {labels.dtype} values; give integer class indices.")
    if len(labels) != samples:
        raise DatasetError(f"{where}: {len(labels)} labels for {samples} samples.")
    return labels.astype(np.int64)


def check_labels(labels: np.ndarray, classes: int | None, path: str | Path) -> None:
    """Labels must index the classes of a first output of shape ``(N, classes)``."""
    where = f"--labels {path}"
    if classes is None:
        raise DatasetError(f"{where}: accuracy needs a first output of shape (N, classes); this model has none.")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise DatasetError(
            f"{where}: labels {int(labels.min())}..{int(labels.max())} for {classes} classes (0..{classes - 1})."
        )


def classes_of(scores: np.ndarray) -> int | None:
    """The class count of a first output of shape ``(N, classes)``; None for anything else (no top-1 there)."""
    return int(scores.shape[1]) if scores.ndim == 2 and scores.shape[1] > 1 else None
