"""Calibration speed and memory against plain onnxruntime inference, measured in the same run.

Models: the bundled MNIST demo CNN, and a MobileNetV2-style network (width 0.35, 96x96x3 input, random
He-initialised weights, built here with onnx.helper). For 1,000 and 10,000 samples, with one onnxruntime
thread: the time of a plain forward pass over the samples (the baseline), and of calibration with min-max
and with entropy, as ratios to that baseline; and the peak resident memory of each run, measured in a
fresh process so runs do not share memory. Samples are generated batch by batch (as a user streams them
from disk), so memory should not grow with the number of samples. Targets from the issue: min-max <= 1.5x,
entropy <= 2.5x, peak memory at 10,000 samples within 20% of 1,000.

Run by hand: ``python benchmarks/calibration.py [--samples 1000 10000] [--batch 32]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _make_divisible(value: float, divisor: int = 8) -> int:
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


def mobilenet_v2(width: float = 0.35, resolution: int = 96, classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """A MobileNetV2 (inverted residuals, ReLU6 as Clip, BN already folded) with random weights."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    counter = [0]

    def conv(x: str, cin: int, cout: int, k: int, stride: int, group: int = 1, relu6: bool = True) -> str:
        counter[0] += 1
        name = f"conv{counter[0]}"
        w = rng.normal(0, np.sqrt(2.0 / (cin // group * k * k)), (cout, cin // group, k, k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{name}.w"))
        inits.append(numpy_helper.from_array(rng.normal(0, 0.05, cout).astype(np.float32), f"{name}.b"))
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.w", f"{name}.b"],
                [f"{name}.out"],
                name=name,
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[k // 2] * 4,
                group=group,
            )
        )
        if not relu6:
            return f"{name}.out"
        nodes.append(helper.make_node("Clip", [f"{name}.out", "zero", "six"], [f"{name}.act"], name=f"{name}_relu6"))
        return f"{name}.act"

    inits += [
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),
    ]
    channels = _make_divisible(32 * width)
    x = conv("input", 3, channels, 3, 2)
    settings = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]
    for expansion, c, repeats, first_stride in settings:
        out_channels = _make_divisible(c * width)
        for i in range(repeats):
            stride = first_stride if i == 0 else 1
            hidden = channels * expansion
            y = conv(x, channels, hidden, 1, 1) if expansion != 1 else x
            y = conv(y, hidden, hidden, 3, stride, group=hidden)
            y = conv(y, hidden, out_channels, 1, 1, relu6=False)
            if stride == 1 and channels == out_channels:
                nodes.append(helper.make_node("Add", [x, y], [f"{y}.res"], name=f"add{counter[0]}"))
                y = f"{y}.res"
            x, channels = y, out_channels
    x = conv(x, channels, 1280, 1, 1)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"))
    inits.append(numpy_helper.from_array(rng.normal(0, 0.02, (classes, 1280)).astype(np.float32), "fc.w"))
    inits.append(numpy_helper.from_array(np.zeros(classes, np.float32), "fc.b"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], transB=1, name="fc"))
    graph = helper.make_graph(
        nodes,
        "mobilenet_v2_035_96",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, resolution, resolution])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model


def _model(name: str) -> onnx.ModelProto:
    from espquant.demo import demo_model_path
    from espquant.optimizer import optimize_model

    return optimize_model(onnx.load(demo_model_path())) if name == "demo" else mobilenet_v2()


def _batches(model: onnx.ModelProto, samples: int, batch: int):
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    rng = np.random.default_rng(1)
    for start in range(0, samples, batch):
        size = min(batch, samples - start)
        yield rng.random((size, *shape), dtype=np.float32)


def child(name: str, samples: int, batch: int, mode: str, repeats: int) -> dict:
    """One measurement in this (fresh) process: the best time of ``repeats`` runs (more for short ones, at
    least 2 s in all), and the peak memory.

    Both the forward baseline and calibration include creating their onnxruntime session, and the
    generation of the random samples, which is the same work on both sides."""
    import onnxruntime as ort

    from espquant.api import Calibrator

    model = _model(name)
    times: list[float] = []
    # Short runs (the demo on 1,000 samples takes 30 ms) repeat for at least 2 s: the best of a few
    # 30 ms runs still carries this machine's scheduling noise.
    while len(times) < repeats or sum(times) < 2.0:
        start = time.perf_counter()
        if mode == "forward":
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            input_name = session.get_inputs()[0].name
            for data in _batches(model, samples, batch):
                session.run(None, {input_name: data})
        else:
            Calibrator("int8", "per-tensor", mode).calibrate(model, _batches(model, samples, batch), threads=1)
        times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": min(times), "peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--models", nargs="+", default=["demo", "mobilenet_v2_035_96"])
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best time is kept")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "SAMPLES", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.batch, args.child[2], args.repeats)))
        return

    def run(name: str, samples: int, mode: str) -> dict:
        command = [
            sys.executable,
            __file__,
            "--batch",
            str(args.batch),
            "--repeats",
            str(args.repeats),
            "--child",
            name,
            str(samples),
            mode,
        ]
        return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])

    from rich.console import Console
    from rich.table import Table

    rows = []
    for name in args.models:
        for samples in args.samples:
            base = run(name, samples, "forward")
            row = {
                "model": name,
                "samples": samples,
                "forward_s": round(base["seconds"], 2),
                "forward_peak_mb": round(base["peak_mb"]),
            }
            for mode in ("minmax", "entropy"):
                result = run(name, samples, mode)
                row[f"{mode}_s"] = round(result["seconds"], 2)
                row[f"{mode}_ratio"] = round(result["seconds"] / base["seconds"], 2)
                row[f"{mode}_peak_mb"] = round(result["peak_mb"])
            rows.append(row)
    title = f"calibration vs onnxruntime forward (1 thread, batch {args.batch}, best of {args.repeats}+ runs)"
    table = Table(title=title, title_justify="left")
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console(width=200).print(table)
    memory = {}
    for name in args.models:
        mine = [r for r in rows if r["model"] == name]
        if len(mine) >= 2:
            small, large = mine[0], mine[-1]
            memory[name] = {m: round(large[f"{m}_peak_mb"] / small[f"{m}_peak_mb"], 3) for m in ("minmax", "entropy")}
    print(json.dumps({"benchmark": "calibration", "rows": rows, "peak_memory_growth": memory}))


if __name__ == "__main__":
    main()
