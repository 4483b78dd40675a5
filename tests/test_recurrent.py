"""GRU and LSTM as ESP-DL v3.3.9 runs them: checker, exponent rules, the integer kernels (hand-worked examples of
the gate tables, the rounding and the two dot-product paths), ONNX + table vs ``.espdl`` simulation, onnxruntime
float, and Espressif's own runtime built for this machine (``../shared/tools/espdl-host``).

The test models::

    x [1, T, I] --Transpose(1, 0, 2)--> X [T, 1, I] --GRU / LSTM--> Y [T, D, 1, H], Y_h [D, 1, H] (, Y_c [D, 1, H])
                                             W, R, B, initial_h, initial_c --^

with initial states as graph inputs (one direction: all inputs then share batch 1) or as constants
(bidirectional).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import math
import struct
import subprocess
import warnings

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import shared_dir
from espquant import Calibrator, Evaluator, check_model, load_espdl
from espquant.calibration.recurrent import GateBound, gate_exponent
from espquant.export.qdq import export_qdq
from espquant.ops import Role, get_op_spec
from espquant.ops.recurrent import gate_exponent_key
from espquant.quant.profiles import get_target
from espquant.simulator import recurrent
from espquant.simulator.recurrent import (
    RecurrentExponents,
    RecurrentInputs,
    c_round,
    dotprod,
    gate_tables,
    gru,
    lstm,
)
from espquant.table import QuantTable
from helpers import make_model, run, tensor

HOST = shared_dir() / "tools" / "espdl-host" / "bin"
HAS_HOST = (HOST / "espdl_host_run").is_file()
TARGETS = ("esp32c3", "esp32s3", "esp32p4")
RUNNERS = {
    "esp32c3": ("espdl_host_run", []),
    "esp32s3": ("espdl_host_run", ["--relayout", "s3"]),
    "esp32p4": ("espdl_host_run_p4round", ["--relayout", "p4"]),
}
F32 = np.float32
SEQ = 5


# --- models --------------------------------------------------------------------------------------------------------


def rnn_model(
    op: str,
    *,
    inputs: int = 8,
    hidden: int = 16,
    directions: int = 1,
    bias: bool = True,
    states: str | None = "input",  # "input": graph inputs, "constant": initializers, None: absent
    seed: int = 0,
    **attrs,
) -> onnx.ModelProto:
    """The module docstring's model; weights ~ N(0, 0.4) / N(0, 0.3), biases ~ N(0, 0.3)."""
    rng = np.random.default_rng(seed)
    gates = 3 if op == "GRU" else 4
    inits = {
        "W": rng.normal(0, 0.4, (directions, gates * hidden, inputs)).astype(F32),
        "R": rng.normal(0, 0.3, (directions, gates * hidden, hidden)).astype(F32),
    }
    names = ["X", "W", "R", "B" if bias else ""]
    if bias:
        inits["B"] = rng.normal(0, 0.3, (directions, 2 * gates * hidden)).astype(F32)
    graph_inputs = [tensor("x", [1, SEQ, inputs])]
    state_names = ["h0", "c0"][: 1 if op == "GRU" else 2]
    if states:
        names += ["", *state_names]
        for name in state_names:
            if states == "input":
                graph_inputs.append(tensor(name, [directions, 1, hidden]))
            else:
                inits[name] = rng.uniform(-0.5, 0.5, (directions, 1, hidden)).astype(F32)
    while names[-1] == "":
        names.pop()
    outputs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    attrs = {"hidden_size": hidden, "direction": "bidirectional" if directions == 2 else "forward", **attrs}
    if op == "GRU":
        attrs.setdefault("linear_before_reset", 1)
    nodes = [
        helper.make_node("Transpose", ["x"], ["X"], perm=[1, 0, 2], name="to_seq_first"),
        helper.make_node(op, names, outputs, name="rnn", **attrs),
    ]
    shapes = {"Y": [SEQ, directions, 1, hidden], "Y_h": [directions, 1, hidden], "Y_c": [directions, 1, hidden]}
    return make_model(nodes, graph_inputs, [tensor(o, shapes[o]) for o in outputs], inits, opset=14)


def float_data(model: onnx.ModelProto, samples: int, seed: int = 1) -> dict[str, np.ndarray]:
    """Calibration / test data: x ~ N(0, 1), initial states ~ U(-0.5, 0.5), samples first."""
    rng = np.random.default_rng(seed)
    data = {}
    for info in model.graph.input:
        shape = [d.dim_value for d in info.type.tensor_type.shape.dim]
        if info.name == "x":
            data["x"] = rng.normal(0, 1, (samples, *shape[1:])).astype(F32)
        else:
            data[info.name] = rng.uniform(-0.5, 0.5, (samples, *shape[1:])).astype(F32)
    return data


def onnxruntime_outputs(model: onnx.ModelProto, data: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime float, one sample at a time (the model's batch is 1), stacked like the simulator's output."""
    count = len(next(iter(data.values())))
    per_sample = [run(model, {k: v[i : i + 1] for k, v in data.items()}) for i in range(count)]
    return [np.concatenate(outputs, axis=0) for outputs in zip(*per_sample)]


VARIANTS = {
    # name: (builder arguments); the sizes make every dot-product path appear: rows of 16 / 8 columns take the
    # ESP32-S3 / -P4 assembly (int8 / int16), others the C kernel.
    "forward, states as inputs": dict(inputs=8, hidden=16, directions=1, bias=True, states="input"),
    "bidirectional, constant states": dict(inputs=6, hidden=12, directions=2, bias=True, states="constant"),
    "no bias, states as inputs": dict(inputs=16, hidden=8, directions=1, bias=False, states="input"),
    "no states": dict(inputs=8, hidden=8, directions=1, bias=True, states=None),
}

# Largest |simulated - onnxruntime float| of Y, Y_h (and Y_c). int8: inputs are quantized in steps of 2^-5 and
# weights of 2^-6 (these N(0, 0.4) weights), so one step's pre-activations are off by up to
# sum|W| 2^-6 + sum|x| 2^-7, about 0.05-0.1; the gates have slopes <= 1 and keep that order over the 5 steps
# (measured: at most 0.065, 4 output steps of 2^-6). int16: inputs and weights are 256x finer, and the error is
# the gate grid 2^-9 of ESP-PPQ's gate exponent: the tanh input is rounded to 2^-10, the tables sample sigmoid /
# tanh there (measured: at most 0.006).
TOLERANCE = {8: 0.1, 16: 0.01}


def _sample(data: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    return {name: value[index : index + 1] for name, value in data.items()}


# --- registry and checker ----------------------------------------------------------------------------------------


def test_registry_entries_say_what_the_runtime_reads():
    for op in ("GRU", "LSTM"):
        spec = get_op_spec(op)
        assert spec.status == "supported" and spec.bits == {8, 16} and spec.category == "recurrent"
        roles = [s.role for s in spec.inputs]
        assert roles[:6] == [Role.ACTIVATION, Role.WEIGHT, Role.WEIGHT, Role.BIAS, Role.PARAM, Role.STATE]
        assert spec.inputs[1].channel_axis is None and spec.inputs[2].channel_axis is None  # one exponent each
        assert any("gate exponent" in note for note in spec.notes)
    assert get_op_spec("LSTM").inputs[6].role is Role.STATE and get_op_spec("LSTM").outputs == 3


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("op", ["GRU", "LSTM"])
def test_checker_accepts_what_the_runtime_runs(op, variant):
    model = rnn_model(op, **VARIANTS[variant])
    for target in TARGETS:
        for bits in ("int8", "int16"):
            check_model(model, target, bits, strict=True)


REFUSED = {
    # name: (op, builder changes, refused field, words of the reason)
    "reverse": ("GRU", dict(direction="reverse"), "attribute direction", "forward"),
    "linear_before_reset 0": ("GRU", dict(linear_before_reset=0), "attribute linear_before_reset", "must be 1"),
    "other activations": ("GRU", dict(activations=["Sigmoid", "Relu"]), "attribute activations", "tables"),
    "clip": ("LSTM", dict(clip=3.0), "attribute clip", "clip"),
    "input_forget": ("LSTM", dict(input_forget=1), "attribute input_forget", "must be 0"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_checker_refuses_what_the_runtime_computes_otherwise(name):
    op, attrs, field, words = REFUSED[name]
    report = check_model(rnn_model(op, states=None, **attrs), "esp32c3", "int8", strict=False)
    problems = [p for p in report.problems if p.field == field]
    assert len(problems) == 1, report.problems
    problem = problems[0]
    assert problem.node == "rnn" and problem.op_type == op and words in problem.reason and problem.hint
    assert f"dl_module_{op.lower()}.hpp" in problem.reason


def _raw_rnn(op: str, x_shape: list[int], extra: dict[int, np.ndarray], **attrs) -> onnx.ModelProto:
    """A bare GRU / LSTM on a graph input X, with extra constant inputs by position (sequence_lens, P)."""
    rng = np.random.default_rng(0)
    gates, hidden = (3 if op == "GRU" else 4), 4
    inits = {
        "W": rng.normal(0, 0.3, (1, gates * hidden, x_shape[-1])).astype(F32),
        "R": rng.normal(0, 0.3, (1, gates * hidden, hidden)).astype(F32),
    }
    names = ["X", "W", "R"] + [""] * (max(extra, default=2) - 2)
    for position, value in extra.items():
        names[position] = f"in{position}"
        inits[f"in{position}"] = value
    outputs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    attrs = {"hidden_size": hidden, **({"linear_before_reset": 1} if op == "GRU" else {}), **attrs}
    node = helper.make_node(op, names, outputs, name="rnn", **attrs)
    return make_model([node], [tensor("X", x_shape)], [tensor(o, None) for o in outputs], inits, opset=14)


@pytest.mark.parametrize(
    "op, x_shape, extra, attrs, field",
    [
        ("GRU", [5, 2, 3], {}, {}, "input X"),  # batch 2
        ("GRU", [1, 5, 3], {}, {"layout": 1}, "attribute layout"),
        ("GRU", [5, 1, 3], {4: np.array([3], np.int32)}, {}, "input sequence_lens"),  # shorter than 5 steps
        ("LSTM", [5, 1, 3], {7: np.ones((1, 12), F32)}, {}, "input P"),  # peepholes
    ],
)
def test_checker_refuses_shapes_and_inputs_the_runtime_ignores(op, x_shape, extra, attrs, field):
    report = check_model(_raw_rnn(op, x_shape, extra, **attrs), "esp32s3", "int16", strict=False)
    assert [p.field for p in report.problems] == [field], report.problems
    assert report.problems[0].hint


def test_checker_accepts_full_sequence_lens_and_zero_peepholes():
    assert check_model(_raw_rnn("GRU", [5, 1, 3], {4: np.array([5], np.int32)}), "esp32p4", "int8", strict=False).ok
    assert check_model(_raw_rnn("LSTM", [5, 1, 3], {7: np.zeros((1, 12), F32)}), "esp32p4", "int8", strict=False).ok


# --- hand-worked integer examples ----------------------------------------------------------------------------------


def test_gate_tables_at_esp_ppqs_gate_exponent():
    """SigmoidLUT(-9, -6.3, 6.3) / TanhLUT(-9, -3.5, 3.5) (dl_math.hpp): 6.3f = 6.30000019 -> 6.30000019 * 512 =
    3225.6 -> (int) 3225 + 1 = 3226, so 3227 entries (i = 0..3226); 3.5 * 512 = 1792 + 1: 1794 entries."""
    tables = gate_tables(-9)
    assert len(tables.sigmoid_table) == 3227 and len(tables.tanh_table) == 1794
    sigmoid_1 = F32(1 / (1 + math.exp(-1.0)))  # 0.7310586: index 512 is x = 1.0
    tanh_1 = F32(F32(2) * F32(1 / (1 + math.exp(-2.0))) - F32(1))  # tanh(x) = 2 sigmoid(2x) - 1 = 0.7615942
    assert tables.sigmoid(np.array([0]))[0] == F32(0.5)
    assert tables.sigmoid(np.array([512]))[0] == sigmoid_1
    assert tables.sigmoid(np.array([-512]))[0] == F32(F32(1) - sigmoid_1)  # get(i < 0) = 1 - table[-i]
    assert tables.tanh(np.array([512, -512])).tolist() == [tanh_1, -tanh_1]  # get(i < 0) = -table[-i]
    last = F32(1 / (1 + math.exp(-3226 / 512)))  # beyond the table: its last entry, x = 6.30078125
    assert tables.sigmoid(np.array([3226, 40000, -40000])).tolist() == [last, last, F32(F32(1) - last)]


def test_c_round_is_tool_round():
    """``round_half_up(float) = (int)floorf(value + 0.5)`` narrows the sum to float32: 0.49999997 + 0.5 =
    0.99999997 is a tie in float32 and becomes 1.0 (dl_tool.cpp). The ESP32-P4's fcvt.w.s rounds half to even."""
    values = np.array([0.49999997, 2.5, -2.5, 3.5, -0.5, 1.4999999], dtype=F32)
    assert c_round(values, "half_up").tolist() == [1, 3, -2, 4, 0, 1]
    assert c_round(values, "half_even").tolist() == [0, 2, -2, 4, 0, 1]


def test_dot_product_paths():
    """``dotprod`` (dl_base_dotprod.cpp): 8 int16 columns take the assembly on ESP32-S3 / -P4, an exact 40-bit sum;
    the C kernel converts the int64 sum to float32 first.

    sum = 32767 * (7 * 32767 - 32739) = 6 442 975 210, shift 20: exactly 6144.49998 -> 6144 on S3 (half-up) and P4;
    float32(sum) = 6 442 975 232 = 6144.5 * 2^20 exactly -> 6145 on the C chips (half-up)."""
    s3, c3, p4 = get_target("esp32s3"), get_target("esp32c3"), get_target("esp32p4")
    row = np.full((1, 8), 32767)
    vector = np.array([[32767] * 7 + [-32739]])
    assert [int(dotprod(row, vector, 20, 16, p)[0, 0]) for p in (s3, c3, p4)] == [6144, 6145, 6144]
    # A negative shift (a left shift) is always the C kernel, 16 columns or not: 3 * 7 - 5 * 11 = -34, times 2^2.
    row16, vector16 = np.array([[3, -5] + [0] * 14]), np.array([[7, 11] + [0] * 14])
    assert int(dotprod(row16, vector16, -2, 8, s3)[0, 0]) == -136
    # 1024 columns of 32767^2 reach ACCX's 40-bit rail: S3 loads 2^29 (rounding) and saturates at 2^39 - 1,
    # >> 30 = 511; P4 sums from 0 to 2^39 - 1, /2^30 = 511.99999 -> 512; C: float32(1024 * 32767^2) / 2^30 =
    # 1023.9375 -> 1024.
    big = np.full((1, 1024), 32767)
    assert [int(dotprod(big, big, 30, 16, p)[0, 0]) for p in (s3, p4, c3)] == [511, 512, 1024]


def test_int8_assembly_equals_the_c_kernel_below_2_24():
    """int8 sums stay far below 2^24: the C kernel's float32 is exact and both paths round the same value."""
    rng = np.random.default_rng(0)
    matrix, vectors = rng.integers(-128, 128, (48, 32)), rng.integers(-128, 128, (64, 32))
    for simd, plain in (("esp32s3", "esp32c3"), ("esp32p4", "esp32p4")):
        twin = dataclasses.replace(get_target(plain), simd=False)
        for shift in (0, 3, 9):
            np.testing.assert_array_equal(
                dotprod(matrix, vectors, shift, 8, get_target(simd)), dotprod(matrix, vectors, shift, 8, twin)
            )


def _one_unit(w: list[int], r: list[int], h0: int, c0: int | None = None) -> RecurrentInputs:
    gates = len(w)
    return RecurrentInputs(
        x=np.array([[[64]]]),  # one step, x = 64 * 2^-6 = 1.0
        w=np.array(w).reshape(1, gates, 1),
        r=np.array(r).reshape(1, gates, 1),
        b=None,
        h0=np.array([[[h0]]]),
        c0=None if c0 is None else np.array([[[c0]]]),
    )


def test_gru_step_by_hand():
    """One GRU unit, one step, gate exponent -9, int8, half-up (dl_module_gru.hpp forward_template):

    x = 64 (e -6: 1.0); W = (32, -32, 64) (e -6: 0.5, -0.5, 1.0): W shift = -9 - (-12) = 3, so the input cache is
    (64 * 32, -64 * 32, 64 * 64) / 8 = (256, -256, 512), exact. h0 = 64 (e -7: 0.5); R = (0, 0, 64) (e -6): R shift
    = -9 - (-13) = 4, hidden cache (0, 0, 64 * 64 / 16 = 256).
    z = sigmoid table[256 + 0] = sigmoid(0.5) = 0.62245935; r = 1 - table[256] = 0.37754065;
    n index = round(512 + r * 256) = round(512 + 96.650406) = round(608.6504) = 609: n = tanh(609 / 512) =
    0.83040917; h = round((1 - z) * n * 2^7 + z * 64) = round(40.129692 + 39.8374) = round(79.96709) = 80."""
    e = RecurrentExponents(x=-6, w=-6, r=-6, y=-7, h=-7, gate=-9)
    y, y_h = gru(_one_unit([32, -32, 64], [0, 0, 64], h0=64), e, 1, 8, get_target("esp32c3"))
    assert y.tolist() == [[[[80]]]] and y_h.tolist() == [[[80]]]
    z, n = F32(1 / (1 + math.exp(-0.5))), F32(math.tanh(609 / 512))
    assert (z, n) == (F32(0.62245935), F32(0.83040917))  # the float values quoted above


def test_lstm_step_by_hand():
    """One LSTM unit, one step, gate exponent -9, int8, half-up (dl_module_lstm.hpp forward_template):

    x = 64 (1.0), W = (32, 32, -32, 64) for i, o, f, c (e -6): gate sums (256, 256, -256, 512); R = 0, h0 = 0.
    i = o = sigmoid(0.5) = 0.62245935, f = 1 - 0.62245935 = 0.37754065, g = tanh(1.0) = 0.7615942.
    c = round(f * c0 + i * g * 2^9) with c0 = 100: round(37.754066 + 242.71945) = round(280.4735) = 280 (e -9:
    0.547); h = round(o * tanh table[280] * 2^7) = round(0.62245935 * 0.49817443 * 128) = round(39.691948) = 40."""
    e = RecurrentExponents(x=-6, w=-6, r=-6, y=-7, h=-7, gate=-9, c=-9)
    y, y_h, y_c = lstm(_one_unit([32, 32, -32, 64], [0, 0, 0, 0], h0=0, c0=100), e, 1, 8, get_target("esp32c3"))
    assert y_c.tolist() == [[[280]]] and y.tolist() == [[[[40]]]] and y_h.tolist() == [[[40]]]


def test_gate_exponent_rule():
    """The finest exponent down to -9 whose int16 range (32767 steps, two steps of slack) holds the bound."""
    assert gate_exponent(GateBound(0.0)) == -9
    assert gate_exponent(GateBound(63.99)) == -9  # 63.99 + 2 * 2^-9 <= 32767 * 2^-9 = 63.998
    assert gate_exponent(GateBound(64.0)) == -8
    assert gate_exponent(GateBound(1000.0)) == -5  # 1000 <= 32767 * 2^-5 = 1023.97


# --- calibration -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["GRU", "LSTM"])
def test_exponent_rules_in_the_table(op):
    model = rnn_model(op, **VARIANTS["forward, states as inputs"])
    data = float_data(model, 32)
    exps = Calibrator("int8").calibrate(model, data).table.exponents
    gate = exps[gate_exponent_key(["Y"])]
    assert gate == -9 and exps["B"] == gate
    assert exps["Y"] == exps["Y_h"] == exps["h0"]  # one exponent for h, the graph input takes it
    if op == "LSTM":
        assert exps["Y_c"] == exps["c0"] == gate


def test_large_weights_get_a_coarser_gate_exponent_and_never_wrap():
    """Weights 20x larger: the worst-case gate sum passes 64 (int16 at -9), so the gate exponent rises until no
    sum can wrap. At ESP-PPQ's fixed -9 the same model wraps: a saturated gate flips from open to closed and h
    jumps from +1 to -1 (an error of 2) where onnxruntime stays put; with the rule the gates saturate at most
    (these near-step gates still amplify input rounding, hence the wider bound)."""
    model = rnn_model("GRU", states=None)
    for init in model.graph.initializer:
        if init.name == "W":
            init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 20, "W"))
    data = float_data(model, 32)
    table = Calibrator("int8").calibrate(model, data).table
    key = gate_exponent_key(["Y"])
    assert table.exponents[key] > -9
    reference = onnxruntime_outputs(model, data)[0]
    errors = {}
    for gate in (table.exponents[key], -9):
        evaluator = Evaluator("int8", "per-tensor", "esp32c3")
        evaluator.generate_quantized_model(model, QuantTable({**table.exponents, key: gate}, table.metadata))
        outputs, _ = evaluator.evaluate_quantized_model(data, to_float=True)
        errors[gate] = float(np.abs(np.asarray(outputs[0]).reshape(reference.shape) - reference).max())
    assert errors[table.exponents[key]] < 1.0 and errors[-9] > 1.9, errors


# --- end to end -----------------------------------------------------------------------------------------------------


def _host(target: str, path, *args: str) -> subprocess.CompletedProcess:
    binary, extra = RUNNERS[target]
    return subprocess.run([str(HOST / binary), str(path), *extra, *args], capture_output=True, text=True, timeout=60)


def _extreme_inputs(espdl, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Integers over each input's whole range (saturated gates, clamped table indices)."""
    feeds = {}
    for value in espdl.inputs:
        dtype = np.int8 if value.dtype == "INT8" else np.int16
        feeds[value.name] = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max + 1, value.shape).astype(dtype)
    return feeds


def _host_outputs(target: str, path, feeds: dict[str, np.ndarray], folder) -> dict[str, np.ndarray]:
    """Run the file on the host with ``feeds`` and read back every graph output it dumps."""
    args = []
    for name, value in feeds.items():
        file = folder / f"{name}.npy"
        np.save(file, value)
        args += ["--input", f"{name}={file}"]
    result = _host(target, path, *args, "--dump", str(folder / "out"))
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-500:]
    return {f.stem: np.load(f) for f in (folder / "out").glob("*.npy")}


# --- what the host binary computes where it is not the chip ---------------------------------------------------------
# The host binary is ESP-DL's C++ compiled for x86-64 with -O3 -ffast-math (its build.sh), and there GCC does two
# things no ESP chip does with the same source (read from its disassembly and reproduced with g++ 12):
# - SigmoidLUT / TanhLUT compute ``bound / input_scale`` with rcpps and one Newton step: 3.5 * 2^9 comes out just
#   below 1792, so TanhLUT's m_quant_max is 1792 instead of 1793 (any exact division gives 1793);
# - the table loops call libmvec's 4-lane expf (_ZGVbN4v_expf), which differs from the scalar expf in the last bit
#   of about 6 % of the entries.
# The simulator keeps the chip's arithmetic; these helpers give the host's, to compare with it exactly.


@functools.cache
def _libmvec_expf():
    try:
        function = ctypes.CDLL("libmvec.so.1")._ZGVbN4v_expf
    except (OSError, AttributeError):
        return None
    # An __m128 argument and result live in xmm0; a double covers its two low lanes, all we read back.
    function.restype, function.argtypes = ctypes.c_double, [ctypes.c_double]
    return function


def _vector_expf(x: np.ndarray) -> np.ndarray:
    function = _libmvec_expf()
    out = np.empty_like(x)
    for k in range(0, len(x), 2):
        pair = [float(v) for v in x[k : k + 2]] + [0.0]
        packed = struct.unpack("<d", struct.pack("<ff", *pair[:2]))[0]
        out[k : k + 2] = struct.unpack("<ff", struct.pack("<d", function(packed)))[: len(x[k : k + 2])]
    return out


@functools.cache
def _host_gate_tables(gate: int) -> recurrent.GateTables:
    """The tables of the x86 host build: entry 0 constant, entries 1..4k through libmvec, the rest scalar expf."""
    scale = recurrent.dl_scale(gate)

    def exps(count: int, argument) -> np.ndarray:
        x = (np.arange(count + 1).astype(F32) * scale).astype(F32)
        values = argument(x)
        vectorised = 1 + (count // 4) * 4
        out = recurrent.expf(values)
        out[1:vectorised] = _vector_expf(values[1:vectorised])
        return out

    def sigmoid_of(e: np.ndarray) -> np.ndarray:
        return (1.0 / (1.0 + e.astype(np.float64))).astype(F32)

    sigmoid = sigmoid_of(exps(recurrent._table_size(gate, 6.3), lambda x: -x))
    tanh_bound = recurrent._table_size(gate, 3.5) - 1  # rcpps: 3.5 / 2^gate truncates one lower
    doubled = (F32(2) * sigmoid_of(exps(tanh_bound, lambda x: -(F32(2) * x).astype(F32)))).astype(F32)
    return recurrent.GateTables(gate, sigmoid, (doubled - F32(1)).astype(F32))


@contextlib.contextmanager
def _as_the_host_build(espdl, target: str):
    """Simulate ``espdl`` as the host binary runs it: its tables, and for an S3 / P4 file the generic C kernels
    (the host has no SIMD) with the target's rounding."""
    original_tables, original_profile = recurrent.gate_tables, espdl.profile
    recurrent.gate_tables = _host_gate_tables
    if target != "esp32c3":
        espdl.profile = dataclasses.replace(get_target(target), simd=False)
    try:
        yield espdl
    finally:
        recurrent.gate_tables = original_tables
        espdl.profile = original_profile


def test_host_tables_differ_from_the_chips_only_where_said():
    if _libmvec_expf() is None:
        pytest.skip("no libmvec")
    chip, host = gate_tables(-9), _host_gate_tables(-9)
    assert len(host.tanh_table) == len(chip.tanh_table) - 1 and len(host.sigmoid_table) == len(chip.sigmoid_table)
    differ = np.count_nonzero(host.sigmoid_table != chip.sigmoid_table)
    assert 0 < differ < 0.1 * len(chip.sigmoid_table)  # last-bit differences of the vector expf only
    assert np.abs(host.sigmoid_table - chip.sigmoid_table).max() < 1e-6


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("op", ["GRU", "LSTM"])
def test_end_to_end(op, variant, bits, tmp_path):
    """check -> calibrate -> simulate (close to onnxruntime float) -> .espdl for every family -> the file's
    simulation gives the same integers as ONNX + table on several samples -> ESP-DL's runtime on this machine."""
    model = rnn_model(op, **VARIANTS[variant])
    data = float_data(model, 48)
    table = Calibrator(f"int{bits}").calibrate(model, data).table
    test = {k: v[:16] for k, v in data.items()}
    reference = onnxruntime_outputs(model, test)
    rng = np.random.default_rng(2)
    for target in TARGETS:
        check_model(model, target, f"int{bits}", strict=True)
        evaluator = Evaluator(f"int{bits}", "per-tensor", target)
        evaluator.generate_quantized_model(model, table)
        outputs, names = evaluator.evaluate_quantized_model(test, to_float=True)
        assert names == [o.name for o in model.graph.output]
        for name, ours, theirs in zip(names, outputs, reference):
            error = float(np.abs(np.asarray(ours).reshape(theirs.shape) - theirs).max())
            assert error <= TOLERANCE[bits], f"{op} {variant} int{bits} {target} {name}: {error}"

        path = evaluator.export_espdl(tmp_path / f"{target}.espdl", test_inputs=test)
        espdl = load_espdl(path)
        assert espdl.profile.name == target
        node = next(n for n in espdl.file.nodes if n.op_type == op)
        assert node.attributes["gate_exponent"] == table.exponents[gate_exponent_key(["Y"])]
        assert espdl.file.initializers["W"].dtype == f"INT{bits}"
        if "B" in espdl.file.initializers:
            assert espdl.file.initializers["B"].dtype == "INT16"
        quantized = evaluator.quantized
        for index in range(4):  # the same integers from the file as from ONNX + table
            ints = {k: quantized.quantize_input(k, v) for k, v in _sample(test, index).items()}
            from_onnx = quantized.run(ints)
            from_file = espdl.run(ints)
            for name in names:
                np.testing.assert_array_equal(from_file[name], from_onnx[name].reshape(from_file[name].shape))

        if not HAS_HOST or _libmvec_expf() is None:
            continue
        embedded, expected = espdl.test_values
        with _as_the_host_build(espdl, target):
            as_host = espdl.run(embedded)
            # Full-range integers through ESP-DL's own code: what the simulator says the host computes.
            for trial in range(2):
                feeds = _extreme_inputs(espdl, rng)
                folder = tmp_path / f"{target}_{trial}"
                folder.mkdir()
                host = _host_outputs(target, path, feeds, folder)
                for name, value in espdl.run(feeds).items():
                    np.testing.assert_array_equal(host[name].reshape(value.shape), value, err_msg=f"{target} {name}")
        # The file's own test passes on the host wherever the host computes what the chip does (everywhere in
        # these tests but where an assembly sum or a table entry of the chip differs from the host's).
        if all(np.array_equal(as_host[name], expected[name]) for name in expected):
            result = _host(target, path)
            assert result.returncode == 0, f"{op} {variant} int{bits} {target}:\n{result.stdout[-1500:]}"
        else:  # not the case with these seeds; say so if a change of data makes it happen
            warnings.warn(f"{op} {variant} int{bits} {target}: the host computes otherwise", stacklevel=1)


@pytest.mark.skipif(not HAS_HOST, reason=f"ESP-DL's host runtime not found at {HOST} (see its README)")
@pytest.mark.parametrize("op", ["GRU", "LSTM"])
def test_wrapping_gate_sums_and_cell_state_as_the_runtime(op, tmp_path):
    """A gate exponent finer than the rule allows (-13: int16 holds +-4 only) makes the int16 gate sums wrap on
    full-range inputs, the cell state overflow, and the table indices run past the tables' ends; ESP-DL's own
    code does exactly what the simulator says."""
    if _libmvec_expf() is None:
        pytest.skip("the host build's vector expf (libmvec) cannot be called here")
    model = rnn_model(op, **VARIANTS["forward, states as inputs"])
    table = Calibrator("int8").calibrate(model, float_data(model, 32)).table
    forced = QuantTable({**table.exponents, gate_exponent_key(["Y"]): -13}, table.metadata)
    if op == "LSTM":
        forced.exponents.update(Y_c=-13, c0=-13)
    evaluator = Evaluator("int8", "per-tensor", "esp32c3")
    evaluator.generate_quantized_model(model, forced)
    path = evaluator.export_espdl(tmp_path / "wrap.espdl")
    espdl = load_espdl(path)
    rng = np.random.default_rng(4)
    with _as_the_host_build(espdl, "esp32c3"):
        for trial in range(3):
            feeds = _extreme_inputs(espdl, rng)
            folder = tmp_path / str(trial)
            folder.mkdir()
            host = _host_outputs("esp32c3", path, feeds, folder)
            for name, value in espdl.run(feeds).items():
                np.testing.assert_array_equal(host[name].reshape(value.shape), value, err_msg=name)
    # The inputs really wrap: a gate sum of the first step passes int16 before the store (dl_module_*.hpp).
    constants, e = evaluator.quantized.constants, evaluator.quantized.exponents
    w, r, b = constants["W"][0], constants["R"][0], constants["B"][0].astype(np.int64)
    rows = w.shape[0]
    c3 = get_target("esp32c3")
    x_part = dotprod(w, feeds["x"][:, 0], -13 - (e["x"] + e["W"]), 8, c3)[0] + b[:rows]
    h_part = dotprod(r, feeds["h0"][0], -13 - (e["Y"] + e["R"]), 8, c3)[0] + b[rows:]
    sums = x_part if op == "GRU" else x_part + h_part
    assert np.abs(sums).max() > 32767


@pytest.mark.parametrize("op", ["GRU", "LSTM"])
def test_qdq_export_runs_in_onnxruntime(op):
    """W / R / B as DequantizeLinear'd integers, Y / Y_h paired; the LSTM's int16 cell state stays float (a QDQ
    model has one width)."""
    model = rnn_model(op, **VARIANTS["forward, states as inputs"])
    data = float_data(model, 16)
    table = Calibrator("int8").calibrate(model, data).table
    qdq = export_qdq(model, table)
    quantized_inputs = {n.input[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    assert "c0" not in quantized_inputs and not any(i.startswith("Y_c") for i in quantized_inputs)
    for ours, theirs in zip(onnxruntime_outputs(qdq, data), onnxruntime_outputs(model, data)):
        assert np.abs(ours - theirs).max() <= TOLERANCE[8]


def _graph(op: str, nodes, outputs: list[str], inits: dict, hidden: int = 8) -> onnx.ModelProto:
    shapes = {name: ([SEQ, 1, 1, hidden] if name.startswith("Y") else [1, 1, hidden]) for name in outputs}
    return make_model(nodes, [tensor("x", [1, SEQ, 6])], [tensor(o, shapes[o]) for o in outputs], inits, opset=14)


def _weights(op: str, rng: np.random.Generator, columns: int, scale: float = 0.4, hidden: int = 8, tag: str = ""):
    gates = 3 if op == "GRU" else 4
    return {
        f"W{tag}": rng.normal(0, scale, (1, gates * hidden, columns)).astype(F32),
        f"R{tag}": rng.normal(0, 0.3, (1, gates * hidden, hidden)).astype(F32),
    }


def _attrs(op: str) -> dict:
    return {"hidden_size": 8, **({"linear_before_reset": 1} if op == "GRU" else {})}


def _exported_runs_on_the_host(model: onnx.ModelProto, bits: int, tmp_path) -> Evaluator:
    data = float_data(model, 16, seed=5)
    table = Calibrator(f"int{bits}").calibrate(model, data).table
    evaluator = Evaluator(f"int{bits}", "per-tensor", "esp32c3")
    evaluator.generate_quantized_model(model, table)
    path = evaluator.export_espdl(tmp_path / f"{bits}.espdl", test_inputs=data)
    if HAS_HOST:
        result = _host("esp32c3", path)
        assert result.returncode == 0, result.stdout[-1500:]
    return evaluator


@pytest.mark.parametrize("op, outputs", [("GRU", ["", "Y_h"]), ("LSTM", ["Y", "", "Y_c"])])
def test_unnamed_outputs_are_still_written(op, outputs, tmp_path):
    """ONNX may leave an output unnamed (only Y_h used); the module writes all of them, so the file names every
    one (``<node>::Y`` ...) and the graph outputs stay the model's."""
    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("Transpose", ["x"], ["X"], perm=[1, 0, 2]),
        helper.make_node(op, ["X", "W", "R"], outputs, name="rnn", **_attrs(op)),
    ]
    model = _graph(op, nodes, [o for o in outputs if o], _weights(op, rng, 6))
    evaluator = _exported_runs_on_the_host(model, 8, tmp_path)
    node = next(n for n in evaluator.quantized.nodes if n.op_type == op)
    assert len(node.outputs) == (2 if op == "GRU" else 3) and all(node.outputs)
    assert evaluator.quantized.outputs == [o for o in outputs if o]


def test_stacked_lstms_requantize_the_cell_state(tmp_path):
    """x -> LSTM 1 -> Squeeze -> LSTM 2, whose initial states are LSTM 1's final ones. LSTM 2's larger weights need
    the coarser gate exponent -8, so LSTM 1's cell state (int16 at -9) reaches it through a RequantizeLinear."""
    rng = np.random.default_rng(3)
    inits = {**_weights("LSTM", rng, 6), **_weights("LSTM", rng, 8, scale=1.2, tag="2"), "axes": np.array([1])}
    nodes = [
        helper.make_node("Transpose", ["x"], ["X"], perm=[1, 0, 2]),
        helper.make_node("LSTM", ["X", "W", "R"], ["Y1", "H1", "C1"], name="lstm1", **_attrs("LSTM")),
        helper.make_node("Squeeze", ["Y1", "axes"], ["X2"]),
        helper.make_node("LSTM", ["X2", "W2", "R2", "", "", "H1", "C1"], ["Y", "Y_h", "Y_c"], name="lstm2",
                         **_attrs("LSTM")),
    ]  # fmt: skip
    model = _graph("LSTM", nodes, ["Y", "Y_h", "Y_c"], inits)
    evaluator = _exported_runs_on_the_host(model, 16, tmp_path)
    exps = evaluator.quantized.exponents
    assert (exps[gate_exponent_key(["Y1"])], exps[gate_exponent_key(["Y"])]) == (-9, -8)
    requantize = [n for n in evaluator.quantized.nodes if n.op_type == "RequantizeLinear"]
    assert [(n.inputs[0], exps[n.outputs[0]], n.bits) for n in requantize] == [("C1", -8, 16)]


@pytest.mark.parametrize("op", ["GRU", "LSTM"])
def test_an_int16_recurrent_layer_in_an_int8_model(op, tmp_path):
    """Mixed precision: the layer named int16 computes at int16 (X widened by a RequantizeLinear), and the module
    writes Y_h (and the initial state it reads) at its width too, though the table names only Y as the layer."""
    model = rnn_model(op, **VARIANTS["bidirectional, constant states"] | {"directions": 1, "states": "input"})
    data = float_data(model, 32)
    calibrator = Calibrator("int8")
    calibrator.set_int16_layers(["rnn"])
    table = calibrator.calibrate(model, data).table
    evaluator = Evaluator("int8", "per-tensor", "esp32c3")
    evaluator.generate_quantized_model(model, table)
    quantized = evaluator.quantized
    assert [quantized.width(t) for t in ("Y", "Y_h", "h0")] == [16, 16, 16]
    assert table.exponents["Y"] == table.exponents["Y_h"] == table.exponents["h0"] <= -14
    outputs, _ = evaluator.evaluate_quantized_model(data, to_float=True)
    for ours, theirs in zip(outputs, onnxruntime_outputs(model, data)):
        assert np.abs(np.asarray(ours).reshape(theirs.shape) - theirs).max() <= TOLERANCE[8]  # int8 input steps
    path = evaluator.export_espdl(tmp_path / "mixed.espdl", test_inputs=data)
    if HAS_HOST:
        result = _host("esp32c3", path)
        assert result.returncode == 0, result.stdout[-1500:]
