"""The embedded demo: a small real MNIST CNN and real digits that ship inside the package.

``espquant demo`` runs the toolkit's main job on them, so a fresh install shows what espquant does
without any file of the user's. Preprocessing of the demo data is ``pixels / 256`` (uint8 -> [0, 1)),
done outside the model, as ESP-DL expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = ["DemoData", "demo_model_path", "load_demo_data", "preprocess"]

_MODEL = "demo_mnist_cnn.onnx"
_DATA = "demo_mnist.npz"


def _data_file(name: str) -> Path:
    return Path(str(resources.files("espquant") / "data" / name))


def demo_model_path() -> Path:
    """Path of the packaged float demo model (read it, never write to it)."""
    return _data_file(_MODEL)


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 digits ``(N, 28, 28)`` -> the model's float input ``(N, 1, 28, 28)``: ``pixels / 256``."""
    return (images.astype(np.float32) / np.float32(256.0))[:, None, :, :]


@dataclass(frozen=True)
class DemoData:
    """The packaged digits: calibration images (from MNIST train) and labelled test images."""

    calib_images: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def calib_inputs(self) -> np.ndarray:
        return preprocess(self.calib_images)

    @property
    def test_inputs(self) -> np.ndarray:
        return preprocess(self.test_images)


def load_demo_data() -> DemoData:
    """Load the packaged MNIST subset (plain arrays; ``allow_pickle`` stays off)."""
    with np.load(_data_file(_DATA), allow_pickle=False) as archive:
        return DemoData(
            calib_images=archive["calib_images"],
            test_images=archive["test_images"],
            test_labels=archive["test_labels"],
        )


def float_accuracy(model_bytes: bytes, inputs: np.ndarray, labels: np.ndarray, batch: int = 500) -> float:
    """Top-1 accuracy of a float model under onnxruntime, in percent."""
    from espquant.runtime import create_session

    session = create_session(model_bytes)
    name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(inputs), batch):
        logits = session.run(None, {name: inputs[start : start + batch]})[0]
        correct += int((logits.argmax(axis=1) == labels[start : start + batch]).sum())
    return 100.0 * correct / len(inputs)
