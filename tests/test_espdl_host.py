"""Files espquant writes, run by Espressif's own ESP-DL runtime code (``../shared/tools/espdl-host``).

One tiny model per operator the exporter writes beyond the demo's, at int8 and int16, for a plain-C chip, the
ESP32-S3 and the ESP32-P4: calibrated on random data, exported with one test input, then loaded and run by
ESP-DL v3.3.9's C++ (its generic kernels; the S3 / P4 weight layouts re-ordered by the harness). Every output
must equal what espquant embedded. Skipped when the host binaries are absent.

The host runs the generic C kernels, so where a chip's assembly computes otherwise (the ESP32-S3 PRelu rounds
half-up, the C reference floors) only the C chip is compared; the operator vectors hold the S3 rule.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from onnx import TensorProto, helper

from conftest import shared_dir
from espquant import Calibrator, Evaluator
from espquant.calibration.engine import calibrate_model
from helpers import make_model, relu6_block, tensor

HOST = shared_dir() / "tools" / "espdl-host" / "bin"
needs_host = pytest.mark.skipif(
    not (HOST / "espdl_host_run").is_file(), reason=f"ESP-DL's host runtime not found at {HOST} (see its README)"
)
RUNNERS = {
    "esp32c3": ("espdl_host_run", []),
    "esp32s3": ("espdl_host_run", ["--relayout", "s3"]),
    "esp32p4": ("espdl_host_run_p4round", ["--relayout", "p4"]),
}
SHAPE = ["N", 4, 6, 6]


def _unary(op, opset=17, **attrs):
    return make_model([helper.make_node(op, ["x"], ["y"], name="n", **attrs)], [tensor("x", SHAPE)],
                      [tensor("y", SHAPE)], opset=opset)


def _binary(op, constant=None):
    inits = {} if constant is None else {"b": constant}
    inputs = [tensor("x", SHAPE)] + ([tensor("b", SHAPE)] if constant is None else [])
    return make_model([helper.make_node(op, ["x", "b"], ["y"], name="n")], inputs, [tensor("y", SHAPE)], inits)


def _reduce(op, axes, keepdims=1):
    shape = [d for k, d in enumerate(SHAPE) if k not in axes] if not keepdims else [
        1 if k in axes else d for k, d in enumerate(SHAPE)
    ]
    node = helper.make_node(op, ["x", "axes"], ["y"], name="n", keepdims=keepdims)
    return make_model([node], [tensor("x", SHAPE)], [tensor("y", shape)], {"axes": np.array(axes)}, opset=18)


def _recurrent(op):
    """x [1, 5, 6] -> Transpose -> GRU / LSTM (12 hidden, bias, batch 1: ESP-DL runs one sequence) -> Y, Y_h (, Y_c).
    6 and 12 columns keep the S3 / P4 dot products on the C kernel the host runs. The host's x86 -ffast-math build
    also computes the module's sigmoid / tanh tables a little differently from the chips (last bits, the tanh
    table's end: tests/test_recurrent.py compares with those exactly); these weights and this test sample do not
    reach an entry where that shows."""
    rng = np.random.default_rng(12)
    gates, outputs = (3, ["Y", "Y_h"]) if op == "GRU" else (4, ["Y", "Y_h", "Y_c"])
    weights = {
        "W": rng.normal(0, 0.4, (1, gates * 12, 6)).astype(np.float32),
        "R": rng.normal(0, 0.3, (1, gates * 12, 12)).astype(np.float32),
        "B": rng.normal(0, 0.3, (1, 2 * gates * 12)).astype(np.float32),
    }
    attrs = {"hidden_size": 12, **({"linear_before_reset": 1} if op == "GRU" else {})}
    nodes = [
        helper.make_node("Transpose", ["x"], ["X"], name="t", perm=[1, 0, 2]),
        helper.make_node(op, ["X", "W", "R", "B"], outputs, name="n", **attrs),
    ]
    shapes = {"Y": [5, 1, 1, 12], "Y_h": [1, 1, 12], "Y_c": [1, 1, 12]}
    return make_model(nodes, [tensor("x", [1, 5, 6])], [tensor(o, shapes[o]) for o in outputs], weights, opset=14)


def _models():
    rng = np.random.default_rng(3)
    return {
        "Sigmoid": _unary("Sigmoid"),
        "Tanh": _unary("Tanh"),
        "HardSwish": _unary("HardSwish"),
        "HardSigmoid": _unary("HardSigmoid"),
        "Elu": _unary("Elu"),
        "Exp": _unary("Exp"),
        "Neg": _unary("Neg"),
        "Gelu": _unary("Gelu", opset=20),
        "Div by a constant": _binary("Div", np.full((1,), 3.0, np.float32)),
        "Div": _binary("Div"),
        "Pow": _binary("Pow", np.array([2.0], np.float32)),
        "Mod": make_model(
            [helper.make_node("Mod", ["x", "b"], ["y"], name="n", fmod=1)],
            [tensor("x", SHAPE)],
            [tensor("y", SHAPE)],
            {"b": np.array([0.75], np.float32)},
        ),
        "Sub": _binary("Sub"),
        "Mul": _binary("Mul"),
        "PRelu per channel": make_model(
            [helper.make_node("PRelu", ["x", "s"], ["y"], name="n")],
            [tensor("x", SHAPE)],
            [tensor("y", SHAPE)],
            {"s": rng.uniform(0.05, 0.5, (4, 1, 1)).astype(np.float32)},
        ),
        # MTCNN's RNet / ONet: Gemm -> PRelu over (N, C) rows; written as (N, 1, 1, C) between two Reshapes
        "PRelu per channel over rows": make_model(
            [
                helper.make_node("Gemm", ["x", "w"], ["h"], name="fc"),
                helper.make_node("PRelu", ["h", "s"], ["y"], name="n"),
            ],
            [tensor("x", ["N", 6])],
            [tensor("y", ["N", 10])],
            {"w": rng.normal(0, 0.5, (6, 10)).astype(np.float32), "s": rng.uniform(0.05, 0.5, 10).astype(np.float32)},
        ),
        "ReduceMean": make_model(
            [helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="n", keepdims=1)],
            [tensor("x", SHAPE)],
            [tensor("y", ["N", 4, 1, 1])],
            {"axes": np.array([2, 3])},
            opset=18,
        ),
        "ReduceSum": make_model(
            [helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="n", keepdims=0)],
            [tensor("x", SHAPE)],
            [tensor("y", ["N", 4])],
            {"axes": np.array([2, 3])},
        ),
        "ReduceSumSquare": make_model(
            [helper.make_node("ReduceSumSquare", ["x", "axes"], ["y"], name="n", keepdims=1)],
            [tensor("x", SHAPE)],
            [tensor("y", ["N", 1, 6, 6])],
            {"axes": np.array([1])},
            opset=18,
        ),
        "ReduceMax": make_model(
            [helper.make_node("ReduceMax", ["x"], ["y"], name="n", keepdims=0, axes=[1])],
            [tensor("x", SHAPE)],
            [tensor("y", ["N", 6, 6])],
        ),
        "ReduceL1": _reduce("ReduceL1", [2, 3], keepdims=0),
        "ReduceL2": _reduce("ReduceL2", [1]),
        "ReduceProd": _reduce("ReduceProd", [1]),
        "ReduceLogSumExp": _reduce("ReduceLogSumExp", [1, 3]),
        "ReduceLogSum of a Relu": make_model(  # a positive sum: the log of a negative one is NaN (see below)
            [
                helper.make_node("Relu", ["x"], ["r"], name="relu"),
                helper.make_node("ReduceLogSum", ["r", "axes"], ["y"], name="n", keepdims=1),
            ],
            [tensor("x", SHAPE)],
            [tensor("y", ["N", 4, 1, 1])],
            {"axes": np.array([2, 3])},
            opset=18,
        ),
        "ScatterND": make_model(
            [helper.make_node("ScatterND", ["x", "i", "u"], ["y"], name="n")],
            [tensor("x", [1, 4, 6, 6]), tensor("u", [1, 2, 6])],
            [tensor("y", [1, 4, 6, 6])],
            {"i": np.array([[[0, 1, 2], [0, -1, 0]]])},  # indices that name the batch entry: batch 1
        ),
        "ScatterND add of a constant": make_model(
            [helper.make_node("ScatterND", ["x", "i", "u"], ["y"], name="n", reduction="add")],
            [tensor("x", SHAPE)],
            [tensor("y", SHAPE)],
            {"i": np.array([[0, 3], [0, 1]]), "u": rng.normal(0, 1, (2, 6, 6)).astype(np.float32)},
            opset=18,
        ),
        "LayerNormalization": make_model(
            [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], name="n", axis=-1, epsilon=1e-5)],
            [tensor("x", SHAPE)],
            [tensor("y", SHAPE)],
            {"g": rng.uniform(0.5, 1.5, (6,)).astype(np.float32), "b": rng.normal(0, 0.3, (6,)).astype(np.float32)},
        ),
        "LayerNormalization over CHW": make_model(
            [helper.make_node("LayerNormalization", ["x", "g"], ["y"], name="n", axis=1)],
            [tensor("x", SHAPE)],
            [tensor("y", SHAPE)],
            {"g": rng.uniform(0.5, 1.5, (4, 6, 6)).astype(np.float32)},
        ),
        "RMSNormalization": make_model(
            [helper.make_node("RMSNormalization", ["x", "g"], ["y"], name="n", axis=2)],
            [tensor("x", SHAPE)],
            [tensor("y", SHAPE)],
            {"g": rng.uniform(0.5, 1.5, (1, 6)).astype(np.float32)},
            opset=23,
        ),
        "LpNormalization p2": _unary("LpNormalization", axis=1, p=2),
        "LpNormalization p1 last axis": _unary("LpNormalization", axis=-1, p=1),
        "Split": make_model(
            [helper.make_node("Split", ["x", "sizes"], ["y", "z"], name="n", axis=1)],
            [tensor("x", SHAPE)],
            [tensor("y", ["N", 1, 6, 6]), tensor("z", ["N", 3, 6, 6])],
            {"sizes": np.array([1, 3])},
        ),
        "DepthToSpace": _unary("DepthToSpace", blocksize=2, mode="CRD"),
        "DepthToSpace DCR": make_model(  # ESP-DL's DCR is ONNX's with blocksize output channels (the checker)
            [helper.make_node("DepthToSpace", ["x"], ["y"], name="n", blocksize=2)],
            [tensor("x", ["N", 8, 3, 3])],
            [tensor("y", ["N", 2, 6, 6])],
        ),
        "SpaceToDepth": make_model(  # ... and its SpaceToDepth is ONNX's with one input channel
            [helper.make_node("SpaceToDepth", ["x"], ["y"], name="n", blocksize=2)],
            [tensor("x", ["N", 1, 6, 6])],
            [tensor("y", ["N", 4, 3, 3])],
        ),
        "LogSoftmax": make_model(
            [helper.make_node("LogSoftmax", ["x"], ["y"], name="n", axis=1)], [tensor("x", SHAPE)], [tensor("y", SHAPE)]
        ),
        # The float output of PP-OCR's classifier and MTCNN's face scores: the module reads the input's width.
        "Softmax": _unary("Softmax", axis=-1),
        "Softmax over channels": _unary("Softmax", axis=1),
        # x.view(x.size(0), -1) with a dynamic batch, as the optimizer writes it: a 0 copies the batch
        "Reshape copying the batch": make_model(
            [helper.make_node("Reshape", ["x", "shape"], ["y"], name="n")],
            [tensor("x", SHAPE)],
            [tensor("y", ["N", 144])],
            {"shape": np.array([0, -1])},
        ),
        "ReverseSequence": make_model(
            [helper.make_node("ReverseSequence", ["x", "lengths"], ["y"], name="n", batch_axis=0, time_axis=1)],
            [tensor("x", [4, 6, 5])],
            [tensor("y", [4, 6, 5])],
            {"lengths": np.array([6, 3, 1, 4])},
        ),
        "Conv 1-D": make_model(  # a Conv over (N, C, W) tensors, as in streaming and speech models
            [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="n", pads=[1, 1], dilations=[2], strides=[1])],
            [tensor("x", ["N", 4, 16])],
            [tensor("y", ["N", 8, 14])],
            {"w": rng.normal(0, 0.3, (8, 4, 3)).astype(np.float32), "b": rng.normal(0, 0.1, 8).astype(np.float32)},
        ),
        "Conv 1-D depthwise": make_model(
            [helper.make_node("Conv", ["x", "w"], ["y"], name="n", pads=[1, 1], group=4)],
            [tensor("x", ["N", 4, 16])],
            [tensor("y", ["N", 4, 16])],
            {"w": rng.normal(0, 0.3, (4, 1, 3)).astype(np.float32)},
        ),
        "MaxPool 1-D": make_model(
            [helper.make_node("MaxPool", ["x"], ["y"], name="n", kernel_shape=[3], strides=[2], pads=[1, 1])],
            [tensor("x", ["N", 4, 16])],
            [tensor("y", ["N", 4, 8])],
        ),
        "AveragePool 1-D": make_model(
            [helper.make_node("AveragePool", ["x"], ["y"], name="n", kernel_shape=[3], strides=[1], pads=[1, 1],
                              count_include_pad=1)],
            [tensor("x", ["N", 4, 16])],
            [tensor("y", ["N", 4, 16])],
        ),
        "GlobalAveragePool 1-D": make_model(
            [helper.make_node("GlobalAveragePool", ["x"], ["y"], name="n")],
            [tensor("x", ["N", 4, 16])],
            [tensor("y", ["N", 4, 1])],
        ),
        "ConvTranspose": make_model(
            [helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="n", strides=[2, 2], pads=[1, 1, 0, 0],
                              output_padding=[1, 1])],
            [tensor("x", SHAPE)],
            [tensor("y", ["N", 3, 12, 12])],
            {"w": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "b": rng.normal(0, 0.1, 3).astype(np.float32)},
        ),
        "ConvTranspose 1-D": make_model(
            [helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="n", strides=[3])],
            [tensor("x", ["N", 4, 16])],
            [tensor("y", ["N", 2, 48])],
            {"w": rng.normal(0, 0.3, (4, 2, 3)).astype(np.float32)},
        ),
        "MatMul by a run-time B": make_model(  # attention-style: both operands computed (16 columns: whole blocks)
            [helper.make_node("MatMul", ["x", "w"], ["y"], name="n")],
            [tensor("x", ["N", 4, 6]), tensor("w", ["N", 6, 16])],
            [tensor("y", ["N", 4, 16])],
        ),
        "MatMul by a run-time B with tail columns": make_model(  # 21 = 16 + 5 (int8), 2 * 8 + 5 (int16)
            [helper.make_node("MatMul", ["x", "w"], ["y"], name="n")],
            [tensor("x", ["N", 4, 6]), tensor("w", ["N", 6, 21])],
            [tensor("y", ["N", 4, 21])],
        ),
        "MatMul by a narrow run-time B": make_model(  # 5 columns: only a tail
            [helper.make_node("MatMul", ["x", "w"], ["y"], name="n")],
            [tensor("x", ["N", 3, 4, 6]), tensor("w", ["N", 3, 6, 5])],
            [tensor("y", ["N", 3, 4, 5])],
        ),
        # YOLO's SiLU, x * Sigmoid(x): the chip's one Swish module (int8 table / int16 float), as ESP-PPQ writes it
        "SiLU written out": make_model(
            [
                helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                helper.make_node("Sigmoid", ["c"], ["s"], name="gate"),
                helper.make_node("Mul", ["s", "c"], ["y"], name="n"),
            ],
            [tensor("x", SHAPE)],
            [tensor("y", SHAPE)],
            {"w": rng.normal(0, 0.4, (4, 4, 3, 3)).astype(np.float32)},
        ),
        # PP-OCR's recognizer: attention scores through Softmax (float32 on the chip), moved by a Reshape, then
        # read by a MatMul: espquant inserts the QuantizeLinear ESP-PPQ writes there; the scores stay an output.
        "Softmax read by a MatMul": make_model(
            [
                helper.make_node("Softmax", ["x"], ["p"], name="softmax", axis=-1),
                helper.make_node("Reshape", ["p", "shape"], ["r"], name="reshape"),
                helper.make_node("MatMul", ["r", "v"], ["y"], name="n"),
            ],
            [tensor("x", [1, 2, 4, 6]), tensor("v", [1, 2, 6, 16])],
            [tensor("y", [1, 2, 4, 16]), tensor("p", [1, 2, 4, 6])],
            {"shape": np.array([1, 2, 4, 6])},
        ),
        # Logits far beyond +-88: the int8 exp table would overflow, so calibration runs the Softmax at int16.
        "Softmax of wide logits": make_model(
            [
                helper.make_node("Gemm", ["x", "w"], ["l"], name="fc"),
                helper.make_node("Softmax", ["l"], ["y"], name="n"),
            ],
            [tensor("x", ["N", 16])],
            [tensor("y", ["N", 24])],
            {"w": rng.normal(0, 12, (16, 24)).astype(np.float32)},
        ),
        "Greater": make_model(
            [helper.make_node("Greater", ["x", "b"], ["y"], name="n")],
            [tensor("x", SHAPE), tensor("b", SHAPE)],
            [tensor("y", SHAPE, TensorProto.BOOL)],
        ),
        "LessOrEqual by a constant": make_model(
            [helper.make_node("LessOrEqual", ["x", "b"], ["y"], name="n")],
            [tensor("x", SHAPE)],
            [tensor("y", SHAPE, TensorProto.BOOL)],
            {"b": np.full((1, 4, 1, 1), 0.25, np.float32)},
        ),
        "Gather": make_model(
            [helper.make_node("Gather", ["x", "i"], ["y"], name="n", axis=1)],
            [tensor("x", SHAPE)],
            [tensor("y", ["N", 2, 6, 6])],
            {"i": np.array([3, 0])},
        ),
        "GRU": _recurrent("GRU"),
        "LSTM": _recurrent("LSTM"),
    }


MODELS = _models()
# The host runs the C reference where the S3 assembly rounds otherwise (module docstring).
C_ONLY = {"PRelu per channel": {"esp32s3"}, "PRelu per channel over rows": {"esp32s3"}}


@needs_host
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_espressif_runtime_reproduces_the_exported_file(name, bits, tmp_path):
    model = MODELS[name]
    rng = np.random.default_rng(7)
    shapes = {i.name: [d.dim_value or 16 for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    data = {name: rng.normal(0, 1.5, shape).astype(np.float32) for name, shape in shapes.items()}
    feeds = data if len(data) > 1 else next(iter(data.values()))
    table = Calibrator(f"int{bits}").calibrate(model, feeds).table
    for target in RUNNERS:
        if target in C_ONLY.get(name, set()):
            continue
        _runs_on_the_runtime(model, table, "per-tensor", target, feeds, tmp_path, bits, f"{name} int{bits} {target}")


@needs_host
def test_espressif_runtime_runs_a_saturated_depthwise_weight_as_simulated(tmp_path):
    """auto's finer exponent for a widely spread per-tensor depthwise weight saturates its largest weights:
    the exported integers are those the simulator used, and ESP-DL computes the embedded outputs from them."""
    rng = np.random.default_rng(3)
    dw = rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32)
    dw[0] *= 60
    model = make_model(
        [
            helper.make_node("Conv", ["x", "dw", "db"], ["d"], name="dw", kernel_shape=[3, 3], pads=[1] * 4, group=4),
            helper.make_node("Clip", ["d", "lo", "hi"], ["c"], name="clip"),
            helper.make_node("Conv", ["c", "pw", "pb"], ["y"], name="pw", kernel_shape=[1, 1]),
        ],
        [tensor("x", SHAPE)],
        [tensor("y", ["N", 2, 6, 6])],
        {
            "dw": dw,
            "db": np.full(4, 0.5, np.float32),
            "lo": np.array(0.0, np.float32),
            "hi": np.array(6.0, np.float32),
            "pw": np.array([[0.02, 1.0, -1.0, 1.0], [0.02, -1.0, 1.0, 1.0]], np.float32).reshape(2, 4, 1, 1),
            "pb": np.zeros(2, np.float32),
        },
    )
    data = rng.normal(0, 1, (128, 4, 6, 6)).astype(np.float32)
    result = calibrate_model(model, data, 8, "per-tensor", "auto")
    assert result.table.metadata["auto"]["narrowed_weights"], "the walk should narrow the depthwise weight"
    for target in ("esp32c3", "esp32s3"):
        _runs_on_the_runtime(result.model, result.table, "per-tensor", target, data[:1], tmp_path)


@needs_host
@pytest.mark.parametrize(
    "granularity, targets", [("per-tensor", ("esp32c3", "esp32s3")), ("per-channel", ("esp32p4",))]
)
def test_espressif_runtime_runs_the_weights_equalization_gives(granularity, targets, tmp_path):
    """auto's cross-layer equalization (ReLU6 pair included) lives in the table as weight factors: the file
    written from the user's model holds the rescaled integers, and ESP-DL computes the embedded outputs."""
    rng = np.random.default_rng(7)
    model = relu6_block(rng)
    data = rng.normal(0.5, 1.0, (96, 3, 12, 12)).astype(np.float32)
    result = calibrate_model(model, data, 8, granularity, "auto")
    assert result.table.weight_factors and result.model is model
    for target in targets:
        _runs_on_the_runtime(model, result.table, granularity, target, data[:1], tmp_path)


def _runs_on_the_runtime(model, table, granularity, target, sample, folder, bits=8, what=None):
    """Export an ``int{bits}`` ``.espdl`` for ``target`` with ``sample`` embedded; ESP-DL's runtime must compute its
    outputs (``what`` names the case in the failure message, default the target)."""
    binary, extra = RUNNERS[target]
    evaluator = Evaluator(f"int{bits}", granularity, target)
    evaluator.generate_quantized_model(model, table)
    path = evaluator.export_espdl(folder / f"{target}.espdl", test_inputs=sample)
    run = subprocess.run([str(HOST / binary), str(path), *extra], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"{what or target}:\n{run.stdout[-1500:]}{run.stderr[-500:]}"


@needs_host
@pytest.mark.parametrize("bits", [8, 16])
def test_espressif_runtime_runs_a_prelu_with_a_finer_output_on_a_plain_c_chip(bits, tmp_path):
    """auto gives a PRelu whose negatives shrink a finer output exponent than its input's. The C kernel copies
    positive values, so the ESP32-C3 file computes the PRelu at the input's exponent and requantizes after; ESP-DL
    computes the embedded outputs from it. (The ESP32-S3 / -P4 int8 kernels rescale in the PRelu itself: their
    assembly, which this host does not run; the operator vectors hold that rule.)"""
    rng = np.random.default_rng(5)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["a"], name="c", kernel_shape=[3, 3], pads=[1] * 4),
            helper.make_node("PRelu", ["a", "slope"], ["y"], name="prelu"),
        ],
        [tensor("x", SHAPE)],
        [tensor("y", SHAPE)],
        {
            "w": rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32),
            "b": np.full(4, -3.0, np.float32),
            "slope": rng.uniform(0.05, 0.2, (4, 1, 1)).astype(np.float32),
        },
    )
    data = rng.normal(0, 1, (128, 4, 6, 6)).astype(np.float32)
    result = calibrate_model(model, data, bits, "per-tensor", "auto")
    assert result.table.exponents["y"] < result.table.exponents["a"]
    _runs_on_the_runtime(result.model, result.table, "per-tensor", "esp32c3", data[:1], tmp_path, bits, f"int{bits}")


@needs_host
@pytest.mark.parametrize(
    "granularity, target", [("per-tensor", "esp32c3"), ("per-tensor", "esp32s3"), ("per-channel", "esp32p4")]
)
def test_espressif_runtime_runs_the_biases_auto_corrects(granularity, target, tmp_path):
    """auto's bias correction lives in the table as bias shifts, a layer without a bias getting one: the file
    written from the user's bias-free model holds the corrected biases, and ESP-DL computes the embedded
    outputs."""
    rng = np.random.default_rng(3)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", kernel_shape=[3, 3], pads=[1] * 4),
            helper.make_node("Relu", ["a"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "w2"], ["y"], name="c2", kernel_shape=[1, 1]),
        ],
        [tensor("x", SHAPE)],
        [tensor("y", ["N", 8, 6, 6])],
        {
            "w1": rng.normal(0, 0.4, (8, 4, 3, 3)).astype(np.float32),
            "w2": (rng.normal(0, 0.5, (8, 8, 1, 1)) * rng.uniform(0.02, 1.0, (1, 8, 1, 1))).astype(np.float32),
        },
    )
    data = rng.normal(0.3, 1.0, (96, 4, 6, 6)).astype(np.float32)
    result = calibrate_model(model, data, 8, granularity, "auto")
    assert result.model is model and result.table.bias_shifts, "the search should keep the corrected biases"
    _runs_on_the_runtime(model, result.table, granularity, target, data[:1], tmp_path)
