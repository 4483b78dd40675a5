#!/usr/bin/env python3
"""When int8 disappoints: the layer report and mixed precision on two real models.

Runs on the bundled MNIST demo CNN and on the Fashion-MNIST depthwise-separable CNN from
``examples/train_fashion_model.py`` (train it first). For each: int8 calibration on 1,000 training images,
accuracy of the simulated ESP32-S3 on the test images, the worst layers by the error they add on their own,
the HTML report (``examples/.cache/<name>_report/index.html``; needs the ``plot`` extra), and mixed precision:
int16 layers added worst-first until the accuracy is within ``--budget`` points of float.

    python examples/train_fashion_model.py      # torch, once
    python examples/fashion_mnist_report.py [--budget 0.1] [--target esp32s3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

from espquant import Calibrator
from espquant.demo import demo_model_path, load_demo_data
from espquant.optimizer import optimize_model
from espquant.report import analyze
from espquant.report.mixed import suggest_int16
from espquant.report.render import COLUMNS, layer_row, write_report

CACHE = Path(__file__).resolve().parent / ".cache"
console = Console(width=160)


def _cases() -> list[tuple[str, onnx.ModelProto, np.ndarray, np.ndarray, np.ndarray]]:
    demo = load_demo_data()
    cases = [("demo_mnist", onnx.load(demo_model_path()), demo.calib_inputs, demo.test_inputs, demo.test_labels)]
    fashion = CACHE / "fashion_dsconv.onnx"
    if fashion.is_file():
        data = np.load(CACHE / "fashion_data.npz")
        scale = lambda images: images[:, None].astype(np.float32) / 256.0  # noqa: E731
        cases.append(
            (
                "fashion_dsconv",
                onnx.load(fashion),
                scale(data["calib_images"]),
                scale(data["test_images"]),
                data["test_labels"],
            )
        )
    else:
        console.print(f"[yellow]{fashion} not found: run examples/train_fashion_model.py first (needs torch).")
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.1, help="accuracy drop allowed against float (points)")
    parser.add_argument("--target", default="esp32s3")
    parser.add_argument("--report-images", type=int, default=1000, help="test images the layer analysis uses")
    args = parser.parse_args()
    summary = []
    for name, model, calibration, images, labels in _cases():
        start = time.time()
        model = optimize_model(model)
        table = Calibrator("int8").calibrate(model, calibration).table
        analysis = analyze(model, table, images[: args.report_images], args.target)
        worst = Table(title=f"{name}: worst layers first ({args.target}, int8)", title_justify="left")
        for column in COLUMNS:
            worst.add_column(column, justify="left" if column in ("tensor", "op") else "right")
        for layer in analysis.worst(8):
            worst.add_row(*layer_row(layer))
        console.print(worst)
        written = write_report(analysis, CACHE / f"{name}_report")
        console.print(f"report: {written['html']}")
        mixed = suggest_int16(
            model, table, images, args.target, budget=args.budget, labels=labels, calibration_data=calibration
        )
        steps = Table(title=f"{name}: mixed precision, budget {args.budget} points", title_justify="left")
        for column in ("int16 layers", "accuracy", "vs float", "weights + biases"):
            steps.add_column(column, justify="left" if column == "int16 layers" else "right")
        for step in mixed.steps:
            layers = f"{len(step.int16_layers)}: " + ", ".join(step.int16_layers) if step.int16_layers else "none"
            steps.add_row(
                layers,
                f"{step.accuracy:.2f}%",
                f"{step.accuracy - mixed.float_accuracy:+.2f}",
                f"{step.weight_bytes:,} B",
            )
        console.print(f"float accuracy {mixed.float_accuracy:.2f}% on {len(images)} test images")
        console.print(steps)
        first, last = mixed.steps[0], mixed.steps[-1]
        summary.append(
            {
                "model": name,
                "float": round(mixed.float_accuracy, 2),
                "int8": round(first.accuracy, 2),
                "mixed": round(last.accuracy, 2),
                "int16_layers": len(last.int16_layers),
                "int8_bytes": first.weight_bytes,
                "mixed_bytes": last.weight_bytes,
                "seconds": round(time.time() - start, 1),
            }
        )
    print(json.dumps({"example": "layer_report_and_mixed_precision", "target": args.target, "models": summary}))


if __name__ == "__main__":
    main()
