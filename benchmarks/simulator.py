"""Simulated integer inference against onnxruntime float inference, measured in the same run.

Cases (all built here with onnx.helper, random weights, dynamic batch):

* ``mlp``: a tiny MLP (64 -> 128 -> 128 -> 10, Gemm + Relu): per-call overhead dominates.
* ``tf_mlp``: Keras' MNIST MLP as tf2onnx writes it (Reshape, MatMul + Add, Softmax; 0.1M MACs), trained here on
  the bundled digits: 784-tap sums on ESP32-S3's 20-bit lanes, a Softmax after the last layer.
* ``mobilenet_v2``: the MobileNetV2-style network of benchmarks/calibration.py (width 0.35, 96x96x3);
  ``mobilenet_v2_normal`` the same on signed N(0, 1) inputs.
* ``blazeface``: a BlazeFace-like detector (128x128x3, 5x5 depthwise blocks with residual adds, two anchor
  heads reshaped and concatenated): the batch-1 latency case.
* ``rail``: random-weight 3x3 convolutions with 1152 taps on signed activations (no ReLU): on ESP32-S3 the
  static bound and this data's magnitude bound reach the 20-bit accumulator rail, so every layer needs a data
  check.
* ``rail_sat``: random-weight convolutions whose inputs carry a per-image offset and whose weights lean one
  way in 32 of 96 channels: those ESP32-S3 accumulator lanes really saturate, so they are emulated.
* ``tdnn``: 1-D convolutions over 100 frames (dilated), ReduceMean over time: a keyword / speaker model.
* ``attention``: two self-attention blocks over 49 tokens (MatMul of two activations, Softmax in between).

Real models (``--cases mnist_cnn dsconv ppocr_cls ppocr_det mtcnn_onet blazeface_real hand_landmarks palm``, not
run by default: they come from ``benchmarks/accuracy.py``'s cache, filled on its first run): espquant's demo MNIST
CNN, a depthwise-separable ReLU6 CNN trained on the bundled digits, PP-OCR's MobileNetV3 text classifier
(squeeze-excite Mul, HardSwish), the PP-OCRv4 DB text detector (ConvTranspose, Resize), MTCNN's O-Net (PRelu),
MediaPipe's BlazeFace (channel Pad), its hand-landmark model (lite) and its palm detector (lite: PRelu, an
upsampling FPN), on their real images.

Each case runs at int8 and int16 (``rail*`` at int8 only: the 40-bit int16 lanes are never reached), on
ESP32-S3 and ESP32-P4, at batch 1 (``--calls`` single-image calls) and batch 64 (``--images`` images). One
thread everywhere (onnxruntime intra-op threads and the BLAS numpy uses; ``--threads 0`` gives onnxruntime its
default on both sides, as a user who sets nothing gets it). Times are per image, best of
``--repeats`` rounds in which onnxruntime and the simulators alternate (the machine is shared, so both sides
see the same load); the ratio is the simulator's time over onnxruntime's float32 time on the same images,
through ``Evaluator.evaluate_quantized_model``. Targets (issue 15): int8 <= 2x, int16 <= 4x.

Run by hand: ``python benchmarks/simulator.py [--images 256] [--calls 64] [--cases mlp blazeface]``; the last
line printed is one JSON object with every row.
"""

from __future__ import annotations

import os

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from calibration import mobilenet_v2  # noqa: E402

from espquant import Calibrator, Evaluator  # noqa: E402

SYNTHETIC = (
    "mlp",
    "tf_mlp",
    "mobilenet_v2",
    "mobilenet_v2_normal",
    "blazeface",
    "rail",
    "rail_sat",
    "tdnn",
    "attention",
)
# Real pretrained models and real images of benchmarks/accuracy.py (its cache, ~/.cache/espquant-accuracy):
# the demo CNN, a depthwise-separable ReLU6 CNN, a MobileNetV3 with squeeze-excite blocks, a DB text detector
# (ConvTranspose, Resize), MTCNN's O-Net (PRelu), MediaPipe's BlazeFace (Pad) and hand landmarks (MobileNetV2
# blocks) and its palm detector.
REAL = {
    "mnist_cnn": "mnist_demo",
    "dsconv": "dsconv_mnist",
    "ppocr_cls": "ppocr_cls",
    "ppocr_det": "ppocr_det",
    "mtcnn_onet": "mtcnn_onet",
    "blazeface_real": "blazeface",
    "hand_landmarks": "hand_landmarks",
    "palm": "palm_detector",
}
CASES = (*SYNTHETIC, *REAL)
TARGETS = ("esp32s3", "esp32p4")
TARGET_RATIO = {"int8": 2.0, "int16": 4.0}


class _Graph:
    """A small helper to write random-weight test networks node by node."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}{self.count}"

    def const(self, value: np.ndarray, hint: str) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1, weights=None) -> str:
        shape = (cout, cin // group, k, k)
        w = weights if weights is not None else self.rng.normal(0, np.sqrt(2.0 / (cin // group * k * k)), shape)
        b = self.rng.normal(0, 0.05, cout)
        return self.node(
            "Conv",
            [x, self.const(w.astype(np.float32), "w"), self.const(b.astype(np.float32), "b")],
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[k // 2] * 4,
            group=group,
        )

    def model(self, name: str, x_shape: list, outputs: list[tuple[str, list]]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def mlp() -> onnx.ModelProto:
    g = _Graph(1)
    x = "input"
    for k, n, relu in ((64, 128, True), (128, 128, True), (128, 10, False)):
        w = g.const(g.rng.normal(0, np.sqrt(2.0 / k), (n, k)).astype(np.float32), "w")
        x = g.node("Gemm", [x, w, g.const(g.rng.normal(0, 0.05, n).astype(np.float32), "b")], transB=1)
        x = g.node("Relu", [x]) if relu else x
    g.nodes[-1].output[0] = "logits"
    return g.model("mlp", ["N", 64], [("logits", ["N", 10])])


def tf_mlp(images: np.ndarray, labels: np.ndarray) -> onnx.ModelProto:
    """Keras' MNIST MLP as tf2onnx writes it: Reshape to 784, Dense layers as MatMul + Add, ReLU, Softmax (0.1M
    MACs). Trained here for a few epochs of plain SGD on the bundled digits, so that its weights (and the
    magnitudes its 784-tap sums reach on ESP32-S3's 20-bit lanes) are a trained model's, not random ones."""
    rng = np.random.default_rng(3)
    x = images.reshape(len(images), -1).astype(np.float32) / 255
    w1, b1 = rng.normal(0, np.sqrt(2 / 784), (784, 128)), np.zeros(128)
    w2, b2 = rng.normal(0, np.sqrt(2 / 128), (128, 10)), np.zeros(10)
    onehot = np.eye(10)[labels]
    for _ in range(8):
        for first in range(0, len(x), 32):
            xb, yb = x[first : first + 32], onehot[first : first + 32]
            h = np.maximum(xb @ w1 + b1, 0)
            z = h @ w2 + b2
            p = np.exp(z - z.max(axis=1, keepdims=True))
            dz = (p / p.sum(axis=1, keepdims=True) - yb) / len(xb)
            dh = (dz @ w2.T) * (h > 0)
            w2, b2 = w2 - 0.5 * h.T @ dz, b2 - 0.5 * dz.sum(axis=0)
            w1, b1 = w1 - 0.5 * xb.T @ dh, b1 - 0.5 * dh.sum(axis=0)
    g = _Graph(1)
    flat = g.node("Reshape", ["input", g.const(np.array([-1, 784], np.int64), "shape")])
    hidden = g.node(
        "Add", [g.node("MatMul", [flat, g.const(w1.astype(np.float32), "w")]), g.const(b1.astype(np.float32), "b")]
    )
    logits = g.node(
        "Add",
        [
            g.node("MatMul", [g.node("Relu", [hidden]), g.const(w2.astype(np.float32), "w")]),
            g.const(b2.astype(np.float32), "b"),
        ],
    )
    g.node("Softmax", [logits], axis=-1)
    g.nodes[-1].output[0] = "probabilities"
    return g.model("tf_mlp", ["N", 28, 28], [("probabilities", ["N", 10])])


def blazeface() -> onnx.ModelProto:
    """BlazeFace-like: 5x5 stem, single and double blaze blocks (5x5 depthwise + 1x1), 2 heads, 2 scales."""
    g = _Graph(2)
    x = g.node("Relu", [g.conv("input", 3, 24, 5, 2)])  # 64x64
    channels = 24

    def block(x: str, cin: int, cout: int, stride: int) -> str:
        y = g.conv(x, cin, cin, 5, stride, group=cin)
        y = g.conv(y, cin, cout, 1)
        skip = x
        if stride == 2:
            skip = g.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        if cin != cout:
            skip = g.conv(skip, cin, cout, 1)
        return g.node("Relu", [g.node("Add", [y, skip])])

    stages = ((24, 1), (28, 1), (32, 2), (36, 1), (42, 1), (48, 2), (56, 1), (64, 1), (72, 1), (80, 1), (88, 1))
    for cout, stride in stages:
        x = block(x, channels, cout, stride)
        channels = cout
    scale16 = x  # 16x16
    for cout, stride in ((96, 2), (96, 1), (96, 1), (96, 1), (96, 1)):
        x = block(x, channels, cout, stride)
        channels = cout
    scale8 = x  # 8x8
    heads: dict[str, list[str]] = {"scores": [], "boxes": []}
    for feature, cin, anchors in ((scale16, 88, 2), (scale8, 96, 6)):
        for head, width in (("scores", 1), ("boxes", 16)):
            y = g.conv(feature, cin, anchors * width, 1)
            y = g.node("Transpose", [y], perm=[0, 2, 3, 1])
            shape = g.const(np.array([0, -1, width], np.int64), "shape")
            heads[head].append(g.node("Reshape", [y, shape]))
    g.nodes.append(helper.make_node("Concat", heads["scores"], ["scores"], axis=1, name="scores"))
    g.nodes.append(helper.make_node("Concat", heads["boxes"], ["boxes"], axis=1, name="boxes"))
    return g.model("blazeface", ["N", 3, 128, 128], [("scores", ["N", 896, 1]), ("boxes", ["N", 896, 16])])


def rail(saturating: bool) -> onnx.ModelProto:
    """3x3 convolutions with uniform random weights (576 / 864 taps). ``rail``: signed activations, no ReLU: on
    ESP32-S3 the static bound and this data's magnitude bound reach the 20-bit accumulator rail although the
    running sums stay far from it. ``rail_sat``: ReLU activations and 32 of 96 channels whose weights are all
    positive (or three quarters positive), so their lanes really saturate and must be emulated."""
    g = _Graph(3 if saturating else 4)
    channels = 96 if saturating else 64
    x = g.conv("input", 8, channels, 3)
    for _ in range(2 if saturating else 3):
        x = g.node("Relu", [x]) if saturating else x
        w = g.rng.uniform(-1, 1, (channels, channels, 3, 3)) / np.sqrt(channels * 9)
        if saturating:  # 16 channels of positive weights, 16 of three quarters positive
            w[:16] = np.abs(w[:16])
            w[16:32] = np.abs(w[16:32]) * g.rng.choice([1.0, 1.0, 1.0, -1.0], size=w[16:32].shape)
        x = g.conv(x, channels, channels, 3, weights=w)
    g.nodes[-1].output[0] = "features"
    name = "rail_sat" if saturating else "rail"
    return g.model(name, ["N", 8, 24, 24], [("features", ["N", channels, 24, 24])])


def tdnn() -> onnx.ModelProto:
    """A TDNN keyword / speaker model as PyTorch exports it: 1-D convolutions over 100 frames of 40 filterbank
    energies (dilations 2 and 3), ReLU, a 1x1 layer, ReduceMean over time, a Gemm."""
    g = _Graph(5)
    x, cin = "input", 40
    for cout, kernel, dilation in ((64, 5, 1), (64, 3, 2), (64, 3, 3), (128, 1, 1)):
        w = g.rng.normal(0, np.sqrt(2.0 / (cin * kernel)), (cout, cin, kernel)).astype(np.float32)
        b = g.rng.normal(0, 0.05, cout).astype(np.float32)
        pad = dilation * (kernel // 2)
        x = g.node("Conv", [x, g.const(w, "w"), g.const(b, "b")], dilations=[dilation], pads=[pad, pad])
        x = g.node("Relu", [x])
        cin = cout
    pooled = g.node("ReduceMean", [x], axes=[2], keepdims=0)
    g.node("Gemm", [pooled, g.const(g.rng.normal(0, 0.1, (12, cin)).astype(np.float32), "w")], transB=1)
    g.nodes[-1].output[0] = "logits"
    return g.model("tdnn", ["N", 40, 100], [("logits", ["N", 12])])


def attention() -> onnx.ModelProto:
    """Two self-attention blocks over 49 tokens of 32 values (a 7x7 feature map's, as in YOLO11's C2PSA):
    projections, ``Q K^T``, Softmax, its weights times ``V``, an output projection and a residual Add."""
    g = _Graph(6)
    x, d = "input", 32
    for _ in range(2):
        q, k, v = (
            g.node("MatMul", [x, g.const(g.rng.normal(0, d**-0.5, (d, d)).astype(np.float32), "w")]) for _ in "qkv"
        )
        scores = g.node("MatMul", [q, g.node("Transpose", [k], perm=[0, 2, 1])])
        mixed = g.node("MatMul", [g.node("Softmax", [scores], axis=-1), v])
        out = g.node("MatMul", [mixed, g.const(g.rng.normal(0, d**-0.5, (d, d)).astype(np.float32), "w")])
        x = g.node("Add", [x, out])
    g.nodes[-1].output[0] = "tokens"
    return g.model("attention", ["N", 49, d], [("tokens", ["N", 49, d])])


def case(name: str, images: int, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    """The model of case ``name`` and ``images`` inputs drawn for it."""
    rng = np.random.default_rng(seed)
    if name in REAL:
        import accuracy

        cache = Path.home() / ".cache" / "espquant-accuracy"
        if REAL[name] == "blazeface":
            accuracy._converted(cache, cache / "venv" / "bin" / "python")
        real = accuracy.CASES[REAL[name]](cache, rng)
        pool = np.concatenate([real.calib, real.test]).astype(np.float32)
        return real.model, pool[np.arange(images) % len(pool)]
    if name == "mlp":
        return mlp(), rng.normal(0, 1, (images, 64)).astype(np.float32)
    if name == "tf_mlp":  # trained on the first 1000 bundled test digits, run on the other 1000
        from importlib.resources import files

        digits = np.load(str(files("espquant") / "data" / "demo_mnist.npz"))
        pictures, labels = digits["test_images"], digits["test_labels"]
        inputs = pictures[1000:].astype(np.float32) / 255
        return tf_mlp(pictures[:1000], labels[:1000]), inputs[np.arange(images) % len(inputs)]
    if name == "mobilenet_v2":
        return mobilenet_v2(), rng.random((images, 3, 96, 96), dtype=np.float32)
    if name == "mobilenet_v2_normal":  # signed N(0, 1) inputs: ESP32-S3's 20-bit lanes come near their rails
        return mobilenet_v2(), rng.normal(0, 1, (images, 3, 96, 96)).astype(np.float32)
    if name == "blazeface":
        return blazeface(), rng.random((images, 3, 128, 128), dtype=np.float32) * 2 - 1
    if name == "tdnn":
        return tdnn(), rng.normal(0, 1, (images, 40, 100)).astype(np.float32)
    if name == "attention":
        return attention(), rng.normal(0, 1, (images, 49, 32)).astype(np.float32)
    data = rng.normal(0, 1, (images, 8, 24, 24)).astype(np.float32)
    if name == "rail_sat":
        data += rng.uniform(-2, 2, (images, 1, 1, 1)).astype(np.float32)
    return rail(name == "rail_sat"), data


def _interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The best time of each run over ``repeats`` rounds, the runs alternating within a round so that the float
    baseline and the simulator see the same machine load (this machine is shared)."""
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _batches(inputs: np.ndarray, batch: int, calls: int) -> list[np.ndarray]:
    if batch == 1:
        return [inputs[i : i + 1] for i in range(min(calls, len(inputs)))]
    return [inputs[i : i + batch] for i in range(0, len(inputs), batch)]


def measure(name: str, bits_list: list[str], args: argparse.Namespace) -> list[dict]:
    """Rows of one case: onnxruntime float and the simulator, per width, target and batch size."""
    model, inputs = case(name, max(args.images, args.calls))
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    rows = []
    for bits in bits_list:
        table = Calibrator(bits).calibrate(model, inputs[:128]).table
        evaluators = {}
        for target in args.targets:
            evaluator = Evaluator(bits, "per-tensor", target)
            evaluator.generate_quantized_model(model, table).threads = args.threads or None
            evaluators[target] = evaluator
        for batch in args.batches:
            batches = _batches(inputs[: args.images], batch, args.calls)
            count = sum(len(b) for b in batches)
            runs: dict[str, Callable[[], object]] = {
                "float": lambda bs=batches: [session.run(None, {input_name: b}) for b in bs]
            }
            for target, evaluator in evaluators.items():
                evaluator.evaluate_quantized_model(batches[0])  # compile (and settle guards) outside the timing
                runs[target] = lambda ev=evaluator, bs=batches: [ev.evaluate_quantized_model(b) for b in bs]
            best = _interleaved(runs, args.repeats)
            for target in args.targets:
                rows.append(
                    {
                        "case": name,
                        "bits": bits,
                        "target": target,
                        "batch": batch,
                        "onnxruntime_ms": round(1000 * best["float"] / count, 3),
                        "simulator_ms": round(1000 * best[target] / count, 3),
                        "ratio": round(best[target] / best["float"], 2),
                        "target_ratio": TARGET_RATIO[bits],
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="images per pass at batch 64")
    parser.add_argument("--calls", type=int, default=64, help="single-image calls per pass at batch 1")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=list(SYNTHETIC), choices=CASES, help="also: " + ", ".join(REAL))
    parser.add_argument("--bits", nargs="+", default=["int8", "int16"], choices=["int8", "int16"])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="onnxruntime intra-op threads on both sides (0: onnxruntime's default, what a user gets without "
        "setting QuantizedModel.threads; numpy's BLAS stays at one thread)",
    )
    args = parser.parse_args()
    rows = []
    for name in args.cases:
        bits = [b for b in args.bits if not (name.startswith("rail") and b == "int16")]
        rows += measure(name, bits, args)

    from rich.console import Console
    from rich.table import Table

    load = os.getloadavg()[0]
    table = Table(
        title=f"simulator vs onnxruntime float ({args.threads or 'default'} thread(s), best of {args.repeats} "
        f"interleaved rounds, load {load:.2f})",
        title_justify="left",
    )
    for column in rows[0]:
        table.add_column(column, justify="left" if column in ("case", "bits", "target") else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console(width=200).print(table)
    print(json.dumps({"benchmark": "simulator", "load": round(load, 2), "threads": args.threads, "rows": rows}))


if __name__ == "__main__":
    main()
