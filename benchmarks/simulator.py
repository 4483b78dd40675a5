"""Simulated integer inference against onnxruntime float inference, measured in the same run.

Models: the bundled MNIST demo CNN and the MobileNetV2-style network of benchmarks/calibration.py (width
0.35, 96x96x3). One thread everywhere (onnxruntime intra-op threads and the BLAS numpy uses), batch 64:
time per image of ``Evaluator.evaluate_quantized_model`` at int8 and int16 on ESP32-S3 and ESP32-P4, as
a ratio to onnxruntime's float32 time per image. Target from the issue: int8 <= 3x.

Run by hand: ``python benchmarks/simulator.py [--images 512]``.
"""

from __future__ import annotations

import os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from calibration import mobilenet_v2  # noqa: E402

from espquant import Calibrator, Evaluator  # noqa: E402
from espquant.demo import demo_model_path, load_demo_data  # noqa: E402
from espquant.optimizer import optimize_model  # noqa: E402


def _data(name: str, images: int) -> tuple[onnx.ModelProto, np.ndarray]:
    if name == "demo":
        data = load_demo_data()
        return optimize_model(onnx.load(demo_model_path())), data.test_inputs[:images]
    model = mobilenet_v2()
    return model, np.random.default_rng(0).random((images, 3, 96, 96), dtype=np.float32)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for name in ("demo", "mobilenet_v2_035_96"):
        model, inputs = _data(name, args.images)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        batches = [inputs[i : i + args.batch] for i in range(0, len(inputs), args.batch)]
        float_s = _best(lambda s=session, n=input_name, bs=batches: [s.run(None, {n: b}) for b in bs], args.repeats)
        row = {"model": name, "images": len(inputs), "onnxruntime_ms_per_image": round(1000 * float_s / len(inputs), 3)}
        for bits in ("int8", "int16"):
            table = Calibrator(bits).calibrate(model, inputs[:256]).table
            for target in ("esp32s3", "esp32p4"):
                evaluator = Evaluator(bits, "per-tensor", target)
                evaluator.generate_quantized_model(model, table).threads = 1
                seconds = _best(
                    lambda ev=evaluator, bs=batches: [ev.evaluate_quantized_model(b) for b in bs], args.repeats
                )
                row[f"{bits}_{target}_ms"] = round(1000 * seconds / len(inputs), 3)
                row[f"{bits}_{target}_ratio"] = round(seconds / float_s, 2)
        rows.append(row)
    table = Table(
        title=f"simulator vs onnxruntime float (1 thread, batch {args.batch}, best of {args.repeats})",
        title_justify="left",
    )
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console(width=240).print(table)
    print(json.dumps({"benchmark": "simulator", "rows": rows}))


if __name__ == "__main__":
    main()
