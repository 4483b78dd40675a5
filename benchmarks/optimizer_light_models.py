"""Optimizer speed and effect on the model zoo that ships with the ``onnx`` package.

For each model in ``onnx/backend/test/data/light``: the optimizer's wall time, the node counts before and
after, the BatchNormalization nodes removed, and, as the baseline measured in the same run, the time
onnxruntime needs to load the optimized model and run one inference on it. Prints a table, then one JSON
line with all figures.

Run by hand: ``python benchmarks/optimizer_light_models.py [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from espquant.optimizer import optimize_model_with_report

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _ort_load_and_run(model: onnx.ModelProto) -> float:
    start = time.perf_counter()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {
        i.name: np.random.default_rng(0)
        .standard_normal([d if isinstance(d, int) else 1 for d in i.shape])
        .astype(np.float32)
        for i in session.get_inputs()
    }
    session.run(None, feeds)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="optimizer runs per model; the best is kept")
    args = parser.parse_args()
    rows = []
    for path in sorted(LIGHT.glob("*.onnx")):
        model = onnx.load(path)
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            optimized, report = optimize_model_with_report(model)
            times.append(time.perf_counter() - start)
        weights = sum(int(np.prod(t.dims)) for t in optimized.graph.initializer)
        rows.append(
            {
                "model": path.stem,
                "parameters": weights,
                "nodes_before": sum(report.nodes_before.values()),
                "nodes_after": sum(report.nodes_after.values()),
                "bn_removed": report.nodes_before.get("BatchNormalization", 0)
                - report.nodes_after.get("BatchNormalization", 0),
                "optimize_s": round(min(times), 3),
                "ort_load_and_run_s": round(_ort_load_and_run(optimized), 3),
            }
        )
    table = Table(title=f"optimizer on {len(rows)} light models (best of {args.repeat})", title_justify="left")
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table.add_row(*(f"{v:,}" if isinstance(v, int) else str(v) for v in row.values()))
    Console(width=160).print(table)
    largest = max(rows, key=lambda r: r["parameters"])
    summary = {
        "benchmark": "optimizer_light_models",
        "models": len(rows),
        "bn_removed": sum(r["bn_removed"] for r in rows),
        "largest_model": largest["model"],
        "largest_optimize_s": largest["optimize_s"],
        "largest_ort_load_and_run_s": largest["ort_load_and_run_s"],
        "rows": rows,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
