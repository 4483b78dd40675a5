"""The compiled simulation (onnxruntime float32 segments) against the numpy interpreter and hand-worked cases.

Every lowering must reproduce the interpreter's integers exactly, on every target and width, including data
that saturates, ties under both roundings and accumulator lanes that reach ESP32-S3's 20-bit rail.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import onnx
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from onnx import helper

from espquant import Calibrator, Evaluator, runtime
from espquant.demo import demo_model_path, load_demo_data
from espquant.optimizer import optimize_model
from espquant.quant.pot import qmax
from espquant.quant.profiles import get_target
from espquant.quant.rounding import shift_round
from espquant.simulator import compiled as compiled_module
from espquant.simulator import layout
from espquant.simulator.quantized_model import QNode, QuantizedModel
from helpers import make_model, tensor


@pytest.fixture(autouse=True)
def _blocked_from_the_first_run(monkeypatch):
    """Every program here runs its segments on blocked tensors (simulator/layout.py) from its first run, the
    path repeated runs take; ``test_a_program_takes_blocked_sessions_from_its_third_run`` keeps the default."""
    monkeypatch.setattr(compiled_module, "BLOCKED_FROM_RUN", 1)
    monkeypatch.setattr(layout, "STRICT", True)


TARGETS = ["esp32s3", "esp32p4", "esp32c3"]


def _cnn(rng):
    """Every lowered operator in one graph, plus a Softmax whose float probabilities are an output."""
    c = 16
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "wd", "bd"], ["c2"], pads=[1, 1, 1, 1], group=c, name="dw"),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name="relu6"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="pw"),
        helper.make_node("Add", ["c3", "r1"], ["s"], name="skip"),
        helper.make_node("Mul", ["s", "scale"], ["m"], name="mul"),
        helper.make_node("MaxPool", ["m"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="max"),
        helper.make_node(
            "AveragePool", ["p1"], ["p2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1, name="avg"
        ),
        helper.make_node("Sub", ["p2", "p1"], ["d"], name="sub"),
        helper.make_node("Sigmoid", ["d"], ["g"], name="sigmoid"),
        helper.make_node("Transpose", ["g"], ["t"], perm=[0, 1, 3, 2], name="transpose"),
        helper.make_node("Concat", ["t", "p1"], ["cat"], axis=1, name="concat"),
        helper.make_node("GlobalAveragePool", ["cat"], ["gap"], name="gap"),
        helper.make_node("Squeeze", ["gap", "axes"], ["sq"], name="squeeze"),
        helper.make_node("Unsqueeze", ["sq", "axes"], ["un"], name="unsqueeze"),
        helper.make_node("Flatten", ["un"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["logits"], transB=1, name="fc"),
        helper.make_node("Reshape", ["logits", "shape"], ["y"], name="reshape"),
        helper.make_node("Softmax", ["y"], ["prob"], axis=-1, name="softmax"),
    ]
    inits = {
        "w1": rng.normal(0, 0.4, (c, 3, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.2, c).astype(np.float32),
        "wd": rng.normal(0, 0.5, (c, 1, 3, 3)).astype(np.float32),
        "bd": rng.normal(0, 0.2, c).astype(np.float32),
        "lo": np.array(0.0, np.float32),
        "hi": np.array(6.0, np.float32),
        "w3": rng.normal(0, 0.3, (c, c, 1, 1)).astype(np.float32),
        "scale": rng.uniform(0.5, 2.0, (1, c, 1, 1)).astype(np.float32),
        "axes": np.array([3], np.int64),
        "wg": rng.normal(0, 0.3, (10, 2 * c)).astype(np.float32),
        "bg": rng.normal(0, 0.1, 10).astype(np.float32),
        "shape": np.array([-1, 10], np.int64),
    }
    return make_model(
        nodes, [tensor("x", ["N", 3, 12, 12])], [tensor("y", ["N", 10]), tensor("prob", ["N", 10])], inits
    )


def _both(quantized: QuantizedModel, data: np.ndarray) -> tuple[dict, dict]:
    quantized.compiled = True
    fast = quantized.run_float({quantized.inputs[0]: data})
    quantized.compiled = False
    slow = quantized.run_float({quantized.inputs[0]: data})
    quantized.compiled = True
    return fast, slow


@pytest.mark.parametrize("bits", ["int8", "int16"])
@pytest.mark.parametrize("target", TARGETS)
def test_compiled_equals_the_interpreter_on_every_lowered_operator(rng, bits, target):
    model = _cnn(rng)
    calibration = rng.normal(0, 1, (16, 3, 12, 12)).astype(np.float32)
    table = Calibrator(bits).calibrate(model, calibration).table
    quantized = Evaluator(bits, "per-tensor", target).generate_quantized_model(model, table)
    data = 3 * rng.normal(0, 1, (8, 3, 12, 12)).astype(np.float32)  # wider than calibrated: saturation
    fast, slow = _both(quantized, data)
    for name in quantized.outputs:
        np.testing.assert_array_equal(fast[name], slow[name], err_msg=name)
        assert fast[name].dtype == slow[name].dtype
    program = quantized._programs[(True, None)]
    interpreted = {n.op_type for n in program.interpreted_nodes}
    # int16 Mul on ESP32-S3 / -P4 leaves the graph where its SIMD and float paths differ (see the SE-block test)
    assert interpreted <= ({"Conv", "Gemm", "Mul"} if bits == "int16" else set()), interpreted
    assert "Softmax" not in {n.op_type for n in program.native_nodes}
    assert program.compiled_nodes >= (19 if bits == "int8" else 12)


def test_per_channel_shifts_on_the_p4(rng):
    model = _cnn(rng)
    calibration = rng.normal(0, 1, (16, 3, 12, 12)).astype(np.float32)
    table = Calibrator("int8", "per-channel").calibrate(model, calibration).table
    quantized = Evaluator("int8", "per-channel", "esp32p4").generate_quantized_model(model, table)
    assert any(isinstance(e, list) for e in quantized.exponents.values())
    fast, slow = _both(quantized, 2 * rng.normal(0, 1, (8, 3, 12, 12)).astype(np.float32))
    for name in quantized.outputs:
        np.testing.assert_array_equal(fast[name], slow[name])


def _saturating_gemm(rng):
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="fc")]
    weight = np.abs(rng.normal(1.0, 0.05, (20, 200))).astype(np.float32)  # 16 SIMD lanes + a 4-channel tail
    return make_model(nodes, [tensor("x", ["N", 200])], [tensor("y", ["N", 20])], {"w": weight})


def test_a_lane_that_saturates_on_the_s3_trips_the_guard_and_matches_the_interpreter(rng):
    model = _saturating_gemm(rng)
    calibration = rng.uniform(-1, 1, (32, 200)).astype(np.float32)
    table = Calibrator("int8").calibrate(model, calibration).table
    quantized = Evaluator("int8", "per-tensor", "esp32s3").generate_quantized_model(model, table)
    gentle = rng.uniform(-1, 1, (4, 200)).astype(np.float32)
    fast, slow = _both(quantized, gentle)
    np.testing.assert_array_equal(fast["y"], slow["y"])
    assert not quantized._guarded  # sums of mixed signs stay far from the rail
    hot = np.ones((4, 200), np.float32)  # every product positive: the 20-bit running sums hit the rail
    fast, slow = _both(quantized, hot)
    np.testing.assert_array_equal(fast["y"], slow["y"])
    assert quantized._guarded == {"y"}
    program = quantized._programs[(True, None)]
    assert program.interpreted_nodes == []  # the Gemm stays compiled: a rail step emulates its saturating lanes
    assert [n.op_type for n in program.rail_nodes] == ["Gemm"]
    # The same data on the P4 (32-bit lanes) needs no guard at all.
    p4 = Evaluator("int8", "per-tensor", "esp32p4").generate_quantized_model(model, table)
    fast, slow = _both(p4, hot)
    np.testing.assert_array_equal(fast["y"], slow["y"])
    assert not p4._guarded


def test_the_s3_guard_tries_cauchy_schwarz_before_the_exact_magnitude(rng, monkeypatch):
    """A guard first bounds ``sum |x w|`` by ``||x|| * ||w_n||`` (no second contraction); only when that bound
    reaches the 20-bit rail does its ``If`` compute the exact magnitude. 256 taps: weights 127 on the first half,
    4 on the second (the static bound, 2.1M, needs a guard). Small inputs pass the cheap bound; inputs at 127 on
    the small weights reach it (2.06M) but not the exact check (130k): no trip; inputs at 127 on the large
    weights saturate (2.06M): the guard trips and a rail step emulates them."""
    weight = np.where(np.arange(256) < 128, 127.0, 4.0)[None, :].repeat(16, axis=0) / 128
    model = make_model(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
        [tensor("x", ["N", 256])],
        [tensor("y", ["N", 16])],
        {"w": weight.astype(np.float32)},
    )
    table = Calibrator("int8").calibrate(model, rng.uniform(-1, 1, (16, 256)).astype(np.float32)).table
    graphs = _segment_graphs(monkeypatch)
    quantized = Evaluator("int8", "per-tensor", "esp32s3").generate_quantized_model(model, table)
    assert set(np.unique(quantized.constants["w"])) == {4, 127}
    small = rng.uniform(-0.05, 0.05, (3, 256)).astype(np.float32)
    loose = np.where(np.arange(256) < 128, 0.0, 1.0)[None, :].repeat(3, axis=0).astype(np.float32)
    for data in (small, loose):
        fast, slow = _both(quantized, data)
        np.testing.assert_array_equal(fast["y"], slow["y"])
        assert not quantized._guarded
    assert any(node.op_type == "If" for graph in graphs for node in graph.graph.node)
    fast, slow = _both(quantized, 1.0 - loose)
    np.testing.assert_array_equal(fast["y"], slow["y"])
    assert quantized._guarded == {"y"}


@pytest.mark.parametrize("bits", ["int8", "int16"])
@pytest.mark.parametrize("blocked_layout", [True, False])
def test_a_program_takes_blocked_sessions_from_its_third_run(rng, monkeypatch, bits, blocked_layout):
    """A program run once or twice keeps onnxruntime's own sessions; from its third run its segments run the
    elementwise steps on blocked tensors, unless the model says not to (``blocked_layout``: a candidate table of
    ``auto``, run a few times): the same integers on every run."""
    monkeypatch.setattr(compiled_module, "BLOCKED_FROM_RUN", 3)
    model = _cnn(rng)
    calibration = rng.normal(0, 1, (16, 3, 12, 12)).astype(np.float32)
    table = Calibrator(bits).calibrate(model, calibration).table
    quantized = Evaluator(bits, "per-tensor", "esp32p4").generate_quantized_model(model, table)
    quantized.blocked_layout = blocked_layout
    data = 2 * rng.normal(0, 1, (6, 3, 12, 12)).astype(np.float32)
    quantized.compiled = False
    slow = quantized.run_float({quantized.inputs[0]: data})
    quantized.compiled = True
    for run in range(1, 5):
        fast = quantized.run_float({quantized.inputs[0]: data})
        for name in quantized.outputs:
            np.testing.assert_array_equal(fast[name], slow[name], err_msg=f"run {run}: {name}")
        segments = [s for s in quantized._programs[(True, None)].steps if isinstance(s, compiled_module._Segment)]
        assert segments and all((s.proto is None) == (run >= 3 and blocked_layout) for s in segments)


def _requantize_model(target: str, e_in: int, e_out: int, bits: int = 8) -> QuantizedModel:
    return QuantizedModel(
        nodes=[QNode("RequantizeLinear", "r", ["x"], ["y"], {}, bits=bits)],
        constants={},
        exponents={"x": e_in, "y": e_out},
        inputs=["x"],
        outputs=["y"],
        profile=get_target(target),
        bits=bits,
    )


@pytest.mark.parametrize(
    ("target", "expected"),
    [("esp32s3", [-1, -1, 0, 1, 2, 3]), ("esp32p4", [-2, -1, 0, 0, 2, 2])],
)
def test_requantize_ties_hand_worked(target, expected):
    """SR(x, 1) of odd x: every value is a tie; half-up rounds toward +inf, half-even to the even neighbour."""
    model = _requantize_model(target, -4, -3)
    x = np.array([[-3, -2, -1, 1, 3, 5, 127]])
    got = model.run({"x": x})["y"]
    assert model._programs[(False, None)].compiled_nodes == 1
    np.testing.assert_array_equal(got[0, :6], expected)
    assert got[0, 6] == 64  # 63.5 rounds up under both rules and stays inside int8


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.integers(-(2**15), 2**15 - 1), min_size=1, max_size=40),
    shift=st.integers(-6, 20),
    target=st.sampled_from(["esp32s3", "esp32p4"]),
)
def test_requantize_matches_python_integers(values, shift, target):
    model = _requantize_model(target, 0, shift, bits=16)
    rounding = get_target(target).rounding
    expected = [min(max(int(v), -(2**15)), 2**15 - 1) for v in shift_round(np.array(values), shift, rounding)]
    got = model.run({"x": np.array(values)})["y"]
    assert got.tolist() == expected


@pytest.mark.parametrize(("target", "expected"), [("esp32s3", [1, 2, 0, -1, 0, 3]), ("esp32p4", [0, 2, 0, -2, 0, 2])])
def test_input_quantization_ties_and_the_float32_half_trap(target, expected):
    """0.49999997 (the float32 just below one half) plus 0.5 rounds up to 1.0 in float32; the chip rounds in
    double and gets 0. The compiled graph must too."""
    model = _requantize_model(target, 0, 0)
    just_below_half = float(np.nextafter(np.float32(0.5), np.float32(0)))
    x = np.array([[0.5, 1.5, -0.5, -1.5, just_below_half, 2.5]], np.float32)
    got = model.run_float({"x": x})["y"]
    assert model._programs[(True, None)].compiled_nodes == 2
    np.testing.assert_array_equal(got[0], expected)
    np.testing.assert_array_equal(got, model.run({"x": model.quantize_input("x", x)})["y"])


@settings(max_examples=60, deadline=None)
@given(
    target=st.sampled_from(TARGETS),
    bits=st.sampled_from([8, 16]),
    exponent=st.integers(-12, 12),
    integers=st.lists(st.integers(-(2**16), 2**16), min_size=1, max_size=16),
    offsets=st.lists(st.sampled_from([0.0, 0.5, -0.5, 0.25, 0.49999997, -0.49999997, 0.5000001]), min_size=16),
    scale=st.sampled_from([1.0, 2.0**-20, 2.0**10]),
)
def test_input_quantization_rounds_like_the_chip_on_any_float32(target, bits, exponent, integers, offsets, scale):
    """The compiled input quantization (half-up as half-even plus the ties it sent down, in float32) equals the
    interpreter's ``round_float`` on ties, the neighbours of ties, the values whose float32 ``v + 0.5`` rounds
    up to 1, tiny and huge values, at any exponent."""
    values = [(i + o) * scale for i, o in zip(integers, offsets)]
    traps = [0.49999997, -0.49999997, 0.5]  # float32 0.49999997 + 0.5 rounds up to 1 (scaled to land there)
    values = np.array(values + [t * 2.0**exponent for t in traps], np.float32).reshape(1, -1)
    model = _requantize_model(target, exponent, exponent, bits)
    got = model.run_float({"x": values})["y"]
    assert model._programs[(True, None)].compiled_nodes == 2
    np.testing.assert_array_equal(got, model.run({"x": model.quantize_input("x", values)})["y"])


def test_inputs_beyond_float32_integers_use_the_interpreter():
    model = _requantize_model("esp32s3", 0, 30, bits=16)
    x = np.array([[2**40 + 1, -(2**40)]])
    np.testing.assert_array_equal(model.run({"x": x})["y"], [[1024, -1024]])
    assert not model._programs


def test_the_demo_model_compiles_entirely_at_int8():
    model = optimize_model(onnx.load(demo_model_path()))
    data = load_demo_data().test_inputs[:64]
    table = Calibrator("int8").calibrate(model, data).table
    for target in TARGETS:
        quantized = Evaluator("int8", "per-tensor", target).generate_quantized_model(model, table)
        fast, slow = _both(quantized, data)
        np.testing.assert_array_equal(fast[quantized.outputs[0]], slow[quantized.outputs[0]])
        program = quantized._programs[(True, None)]
        assert program.interpreted_nodes == [] and program.compiled_nodes == len(quantized.nodes) + 1


@pytest.mark.parametrize("elements", [64, 40])
def test_s3_int8_left_shift_by_seven_or_more_uses_a_one_byte_multiplier(elements):
    """ARITHMETIC.md 6: the S3 SIMD requantize (above 50 elements) broadcasts 2^7 as the byte -128 and 2^8 as
    0; the P4 (16-bit broadcast) and small tensors (float path) compute the exact left shift."""
    x = np.arange(-elements // 2, elements - elements // 2).reshape(1, elements)
    for shift, s3_multiplier in ((-7, -128), (-8, 0), (-6, 64)):
        s3 = _requantize_model("esp32s3", 0, shift).run({"x": x})["y"]
        p4 = _requantize_model("esp32p4", 0, shift).run({"x": x})["y"]
        exact = np.clip(x * 2**-shift, -128, 127)
        np.testing.assert_array_equal(p4, exact)
        expected = np.clip(x * s3_multiplier, -128, 127) if elements > 50 else exact
        np.testing.assert_array_equal(s3, expected)


def test_non_negative_inputs_halve_the_lane_bound_without_a_guard(rng):
    """After a ReLU the running sums of a 16-lane block lie in [127 * sum(w < 0), 127 * sum(w > 0)]: here
    516,128 < 2^19 while the signed bound (128 * sum |w| = 1,040,384) would need a data guard. Inputs
    pinned at the int8 maximum on the positive taps reach that bound exactly and stay unsaturated."""
    weight = np.where(np.arange(64) % 2 == 0, 1.0, -1.0)[None, :] * np.full((16, 64), 127 / 64)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Gemm", ["r", "w"], ["y"], transB=1)]
    model = make_model(nodes, [tensor("x", ["N", 64])], [tensor("y", ["N", 16])], {"w": weight.astype(np.float32)})
    table = Calibrator("int8").calibrate(model, rng.uniform(-1, 1, (16, 64)).astype(np.float32)).table
    quantized = Evaluator("int8", "per-tensor", "esp32s3").generate_quantized_model(model, table)
    assert np.abs(quantized.constants["w"]).min() == 127
    extreme = np.where(np.arange(64) % 2 == 0, 10.0, -10.0)[None, :].repeat(3, axis=0).astype(np.float32)
    fast, slow = _both(quantized, extreme)
    np.testing.assert_array_equal(fast["y"], slow["y"])
    program = quantized._programs[(True, None)]
    assert program.compiled_nodes == 3 and not any(step.guards for step in program.steps)


def test_one_step_past_the_non_negative_bound_saturates_and_is_guarded(rng):
    """The same block with 127 * sum(w > 0) = 524,510 >= 2^19: the rail is reached, the guard trips and the
    interpreter's tap-by-tap saturation decides (a bound that undercounted by one would miss it)."""
    row = np.where(np.arange(64) % 2 == 0, 127, -127)
    row[1] = 66  # one negative tap turned into a small positive one
    weight = np.repeat(row[None, :] / 64, 16, axis=0).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Gemm", ["r", "w"], ["y"], transB=1)]
    model = make_model(nodes, [tensor("x", ["N", 64])], [tensor("y", ["N", 16])], {"w": weight})
    table = Calibrator("int8").calibrate(model, rng.uniform(-1, 1, (16, 64)).astype(np.float32)).table
    quantized = Evaluator("int8", "per-tensor", "esp32s3").generate_quantized_model(model, table)
    extreme = np.where(row > 0, 10.0, -10.0)[None, :].repeat(3, axis=0).astype(np.float32)
    fast, slow = _both(quantized, extreme)
    np.testing.assert_array_equal(fast["y"], slow["y"])
    assert quantized._guarded == {"y"}


# --- int16 on float32 kernels, S3 rail steps, digit splits ------------------------------------------------------


@pytest.fixture
def digit_splits(monkeypatch):
    """Wide sums as digit splits in the graph (the path without numba), not in simulator/native.py."""
    monkeypatch.setattr(compiled_module, "NATIVE", False)


def _accumulating_model(
    target: str, bits: int, op: str, weight: np.ndarray, bias: np.ndarray | None, shifts: tuple[int, int, int], **attrs
) -> QuantizedModel:
    """One hand-made Conv / Gemm / MatMul node (integers given, no calibration): ``shifts = (e_in, e_w, e_out)``.

    x --[op(w, b)]--> y
    """
    e_in, e_w, e_out = shifts
    inputs = ["x", "w"] + (["b"] if bias is not None else [])
    constants = {"w": weight} | ({"b": bias} if bias is not None else {})
    exponents = {"x": e_in, "w": e_w, "y": e_out} | ({"b": e_in + e_w} if bias is not None else {})
    relu = bool(attrs.pop("relu", False))
    node = QNode(op, op.lower(), inputs, ["y"], attrs, relu=relu, bits=bits)
    return QuantizedModel([node], constants, exponents, ["x"], ["y"], get_target(target), bits)


def _compiled_and_interpreted(model: QuantizedModel, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    model.compiled = True
    fast = model.run({"x": x})["y"]
    model.compiled = False
    slow = model.run({"x": x})["y"]
    model.compiled = True
    return fast, slow


def _int(rng, bits: int, shape, scale: float = 1.0) -> np.ndarray:
    high = 2 ** (bits - 1)
    return np.clip(np.round(rng.normal(0, scale * high / 3, shape)), -high, high - 1).astype(np.int64)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    bits=st.sampled_from([8, 16]),
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    axis=st.integers(-3, 2),
    exponent=st.integers(-14, 6),
    long_axis=st.booleans(),
)
def test_a_softmax_runs_in_the_graph_as_the_interpreter_computes_it(seed, bits, shape, axis, exponent, long_axis):
    """int8 / int16 Softmax in the graph (exp lookups, CumSum, one division) equals ``kernels.softmax_float``: any
    axis and input exponent, rows of 1,500 values (a float32 sum in another order differs there), full-range
    integers, NaN where int8's exp table overflows (2**6 steps reach past 88.7)."""
    rng = np.random.default_rng(seed)
    axis %= len(shape)
    if long_axis:
        shape[axis] = 1500
    x = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), shape)
    x.reshape(-1)[:2] = [-(2 ** (bits - 1)), 2 ** (bits - 1) - 1][: x.size]
    node = QNode("Softmax", "softmax", ["x"], ["y"], {"axis": axis - len(shape) * (seed % 2)}, bits=bits)
    model = QuantizedModel([node], {}, {"x": exponent}, ["x"], ["y"], get_target("esp32s3"), bits)
    model.float_tensors.add("y")
    fast, slow = _compiled_and_interpreted(model, x)
    program = model._programs[(False, None)]
    assert not program.interpreted_nodes and not program.native_nodes
    assert fast.dtype == slow.dtype == np.float32
    np.testing.assert_array_equal(fast, slow)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("mover", ["Reshape", "Flatten", "Transpose", "Squeeze", "Concat"])
def test_floats_a_softmax_gives_are_moved_in_its_segment(rng, bits, mover):
    """A Reshape (or other data movement) of a Softmax's probabilities, as classifiers end, runs in the segment
    that computes them, not in the interpreter; the floats it hands on are the interpreter's, bit for bit. A move
    that mixes floats with integers stays in the interpreter."""
    x = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (3, 1, 10))
    softmax = QNode("Softmax", "softmax", ["x"], ["p"], {"axis": -1}, bits=bits)
    constants = {"shape": np.array([-1, 10]), "axes": np.array([1])}
    inputs, attrs = {
        "Reshape": (["p", "shape"], {}),
        "Flatten": (["p"], {"axis": 1}),
        "Transpose": (["p"], {"perm": [2, 0, 1]}),
        "Squeeze": (["p", "axes"], {}),
        "Concat": (["p", "p"], {"axis": 1}),
    }[mover]
    move = QNode(mover, "move", inputs, ["y"], attrs, bits=bits)
    model = QuantizedModel([softmax, move], constants, {"x": -3}, ["x"], ["y"], get_target("esp32s3"), bits)
    model.float_tensors.update({"p", "y"})
    fast, slow = _compiled_and_interpreted(model, x)
    program = model._programs[(False, None)]
    assert not program.interpreted_nodes and not program.native_nodes
    assert fast.dtype == slow.dtype == np.float32 and fast.shape == slow.shape
    np.testing.assert_array_equal(fast, slow)

    mixed = QNode("Concat", "mixed", ["p", "x"], ["y"], {"axis": 1}, bits=bits)
    model = QuantizedModel([softmax, mixed], {}, {"x": -3}, ["x"], ["y"], get_target("esp32s3"), bits)
    model.float_tensors.update({"p", "y"})
    model.run({"x": x})
    assert [n.name for n in model._programs[(False, None)].interpreted_nodes] == ["mixed"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    ("kind", "attrs"),
    [
        ("conv", {"pads": [1, 1, 1, 1], "strides": [1, 1]}),
        ("conv", {"pads": [0, 2, 1, 0], "strides": [2, 1], "dilations": [1, 2]}),
        ("depthwise", {"pads": [2, 2, 2, 2], "strides": [2, 2]}),
        ("pointwise", {}),
        ("gemm", {"transB": 1}),
        ("matmul", {}),
    ],
)
@pytest.mark.parametrize("native_on", [True, False], ids=["native", "digit-splits"])
def test_int16_accumulating_nodes_compile_exactly(rng, target, kind, attrs, native_on, monkeypatch):
    """int16 sums reach 2^30 * taps: they run in double (simulator/native.py), or the compiled graph splits
    activations (and weights) into balanced digits whose float32 contractions are exact (Conv) or contracts in
    double (Gemm, MatMul, 1x1 Conv), adds in double and shifts there; every integer equals the interpreter's,
    with ReLU, ties (small shifts) and saturation."""
    monkeypatch.setattr(compiled_module, "NATIVE", native_on)
    channels = 12
    if kind == "pointwise":
        weight, x = _int(rng, 16, (channels, 30, 1, 1)), _int(rng, 16, (3, 30, 5, 7), 2.0)
    elif kind == "conv":
        weight, x = _int(rng, 16, (channels, 6, 3, 3)), _int(rng, 16, (3, 6, 9, 8), 2.0)
    elif kind == "depthwise":
        weight, x = _int(rng, 16, (channels, 1, 5, 5)), _int(rng, 16, (3, channels, 9, 9), 2.0)
        attrs = {**attrs, "group": channels}
    else:
        weight, x = _int(rng, 16, (40, channels)), _int(rng, 16, (2, 3, 40) if kind == "matmul" else (5, 40), 2.0)
        weight = weight.T.copy() if kind == "gemm" else weight
    bias = None if kind == "matmul" else rng.integers(-(2**36), 2**36, channels)
    op = {"conv": "Conv", "pointwise": "Conv", "depthwise": "Conv", "gemm": "Gemm", "matmul": "MatMul"}[kind]
    for shifts, relu in (((-12, -14, -11), False), ((-12, -14, -25), True), ((-12, -14, -30), False)):
        model = _accumulating_model(target, 16, op, weight, bias, shifts, relu=relu, **attrs)
        fast, slow = _compiled_and_interpreted(model, np.clip(x, -(2**15), 2**15 - 1))
        np.testing.assert_array_equal(fast, slow)
        assert fast.dtype == slow.dtype == np.int64
        program = model._programs[(False, None)]
        assert program.interpreted_nodes == [] and program.compiled_nodes == 1
        assert len(program.native_nodes) == int(native_on)


def _segment_graphs(monkeypatch) -> list[onnx.ModelProto]:
    """The ONNX graphs of the compiled segments built from now on (filled as sessions are created; the graphs
    onnxruntime optimized, which blocked sessions load, are not the segments': left out)."""
    real, graphs = runtime.create_session, []

    def create(proto, **kw):
        if kw.get("optimize", True) and all(proto is not seen for seen in graphs):
            graphs.append(proto)
        return real(proto, **kw)

    monkeypatch.setattr(runtime, "create_session", create)
    return graphs


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    target=st.sampled_from(TARGETS),
    shift=st.integers(0, 22),
    depthwise=st.booleans(),
    relu=st.booleans(),
    bias_bits=st.integers(0, 38),
)
@mock.patch.object(compiled_module, "NATIVE", False)  # the digit splits (hypothesis takes no function fixture)
def test_int16_split_sums_round_in_float32_exactly(seed, target, shift, depthwise, relu, bias_bits):
    """A digit-split int16 Conv rounds its parts in float32 (integer and fraction of each, the bias cut the same
    way) instead of adding them in double: equal to the interpreter for every shift (small ones make many ties,
    large ones saturate), bias size and rounding rule (half-up on S3 / C3, half-even on P4)."""
    rng = np.random.default_rng(seed)
    channels = 6
    if depthwise:
        weight, x = _int(rng, 16, (channels, 1, 3, 3)), _int(rng, 16, (2, channels, 6, 6), 2.0)
        attrs = {"pads": [1, 1, 1, 1], "group": channels}
    else:
        weight, x = _int(rng, 16, (channels, 4, 3, 3)), _int(rng, 16, (2, 4, 6, 6), 2.0)
        attrs = {"pads": [1, 0, 1, 0]}
    bias = rng.integers(-(2**bias_bits), 2**bias_bits + 1, channels)
    model = _accumulating_model(target, 16, "Conv", weight, bias, (-12, -14, shift - 26), relu=relu, **attrs)
    fast, slow = _compiled_and_interpreted(model, np.clip(x, -(2**15), 2**15 - 1))
    np.testing.assert_array_equal(fast, slow)


@pytest.mark.parametrize("target", TARGETS)
def test_int16_split_conv_has_no_double_pass(rng, target, monkeypatch, digit_splits):
    """The usual int16 3x3 Conv (weights up to a third of the range, a bias) is built without any double
    tensor: its split sums are rounded in float32."""
    weight, x = _int(rng, 16, (8, 8, 3, 3)), _int(rng, 16, (2, 8, 6, 6), 2.0)
    graphs = _segment_graphs(monkeypatch)
    model = _accumulating_model(target, 16, "Conv", weight, rng.integers(-(2**30), 2**30, 8), (-12, -14, -10))
    fast, slow = _compiled_and_interpreted(model, np.clip(x, -(2**15), 2**15 - 1))
    np.testing.assert_array_equal(fast, slow)
    casts = [n for g in graphs for n in g.graph.node if n.op_type == "Cast"]
    assert graphs and not any(a.i == onnx.TensorProto.DOUBLE for n in casts for a in n.attribute)


def test_int16_models_compile_their_convolutions_and_gemm(rng):
    """The whole-model int16 path: every Conv and the Gemm run in onnxruntime (only the Mul and the table-less
    int16 Sigmoid may stay in the interpreter), on every target, equal to the interpreter."""
    model = _cnn(rng)
    calibration = rng.normal(0, 1, (16, 3, 12, 12)).astype(np.float32)
    table = Calibrator("int16").calibrate(model, calibration).table
    data = 3 * rng.normal(0, 1, (8, 3, 12, 12)).astype(np.float32)
    for target in TARGETS:
        quantized = Evaluator("int16", "per-tensor", target).generate_quantized_model(model, table)
        fast, slow = _both(quantized, data)
        for name in quantized.outputs:
            np.testing.assert_array_equal(fast[name], slow[name], err_msg=name)
        program = quantized._programs[(True, None)]
        assert {n.op_type for n in program.interpreted_nodes} <= {"Mul", "Sigmoid"}


@pytest.mark.parametrize("target", ["esp32s3", "esp32p4"])
def test_wide_int16_layers_take_four_contractions(rng, target, digit_splits):
    """1152 taps of full-range int16 weights: no split of the activation alone keeps 2^24, so both operands are
    split (2 x 2 digits); the sums and their double recombination stay exact. At 2304 taps no split of cost 4
    is exact: the node runs in the interpreter (float64 BLAS), still exact."""
    from espquant.simulator.compiled import _split_plan

    for channels, compiled in ((128, True), (256, False)):
        weight = rng.integers(-(2**15), 2**15, (8, channels, 3, 3))
        plan = _split_plan(weight.reshape(8, -1), 16)
        assert (plan is not None and plan[:2] == (2, 2)) == compiled
        x = rng.integers(-(2**15), 2**15, (2, channels, 5, 5))
        bias = rng.integers(-(2**30), 2**30, 8)
        model = _accumulating_model(target, 16, "Conv", weight, bias, (-10, -15, -8), pads=[1, 1, 1, 1])
        fast, slow = _compiled_and_interpreted(model, x)
        np.testing.assert_array_equal(fast, slow)
        assert model._programs[(False, None)].compiled_nodes == int(compiled)


@pytest.mark.parametrize("target", ["esp32p4", "esp32c3"])
def test_wide_int16_layers_beyond_every_digit_split_run_natively(rng, target):
    """2304 taps of full-range int16 weights: no digit split is exact in float32, but the sums stay below 2^53,
    so the node runs in double (simulator/native.py) instead of the interpreter, with the same integers.
    (ESP32-S3's 40-bit int16 lanes could saturate here: its guards take over, as for int8.)"""
    weight = rng.integers(-(2**15), 2**15, (8, 256, 3, 3))
    x = rng.integers(-(2**15), 2**15, (2, 256, 5, 5))
    bias = rng.integers(-(2**30), 2**30, 8)
    model = _accumulating_model(target, 16, "Conv", weight, bias, (-10, -15, -8), pads=[1, 1, 1, 1])
    fast, slow = _compiled_and_interpreted(model, x)
    np.testing.assert_array_equal(fast, slow)
    program = model._programs[(False, None)]
    assert [n.op_type for n in program.native_nodes] == ["Conv"] and not program.interpreted_nodes


def _rail_conv(rng, depthwise: bool, channels: int = 20, one_d: bool = False) -> tuple[np.ndarray, dict]:
    """Random int8 weights whose static bound (128 * sum |w|) is far beyond ESP32-S3's 20-bit lanes: 64 input
    channels of 3x3, or a 9x9 depthwise (81 taps; a 3x3 depthwise cannot reach 2^19 at all); 1-D: 64 channels of
    9 taps, or a depthwise kernel of 81. Channels 0-2 lean positive and 3-4 negative, so that one-signed patches
    drive them into the rail."""
    if one_d:
        shape = (channels, 1, 81) if depthwise else (channels, 64, 9)
    else:
        shape = (channels, 1, 9, 9) if depthwise else (channels, 64, 3, 3)
    weight = rng.integers(-128, 128, shape)
    weight[:3], weight[3:5] = np.abs(weight[:3]), -np.abs(weight[3:5])
    pads = [weight.shape[-1] // 2] * (2 if one_d else 4)
    attrs = {"pads": pads, "group": channels} if depthwise else {"pads": pads}
    return weight, attrs


@pytest.mark.parametrize("one_d", [False, True], ids=["2-D", "1-D"])
@pytest.mark.parametrize("depthwise", [False, True])
def test_s3_rail_steps_emulate_only_the_outputs_that_can_saturate(rng, depthwise, one_d):
    """Mild inputs with a few one-signed patches: the guard trips, the node becomes a rail step (not an
    interpreter node), and its outputs (16 lane channels and, for the normal conv, a 4-channel 40-bit tail)
    equal the interpreter's tap-by-tap emulation, on this batch and on the next ones."""
    weight, attrs = _rail_conv(rng, depthwise, one_d=one_d)
    channels = weight.shape[0]
    bias = rng.integers(-(2**17), 2**17, channels)
    model = _accumulating_model("esp32s3", 8, "Conv", weight, bias, (-4, -7, 0), **attrs)
    c_in = channels if depthwise else weight.shape[1]
    plane = (100,) if one_d else (12, 12)
    mild = rng.integers(-20, 21, (2, c_in, *plane))
    fast, slow = _compiled_and_interpreted(model, mild)
    np.testing.assert_array_equal(fast, slow)
    hot = mild.copy()
    hot[0, :, 2:90] = 127
    hot[1, :, :5] = -128
    hot[1, :, 6:] = rng.integers(-128, 128, (c_in, *hot.shape[2:]))[:, 6:]
    for batch in (hot, np.concatenate([hot, mild]), mild):
        fast, slow = _compiled_and_interpreted(model, batch)
        np.testing.assert_array_equal(fast, slow)
    program = model._programs[(False, None)]
    assert model._guarded == {"y"} and program.interpreted_nodes == []
    assert [n.name for n in program.rail_nodes] == ["conv"]


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_s3_rail_steps_for_gemm_and_matmul(rng, op):
    """Rows of one sign against leaning weights saturate some lanes and not others: a rail step, exact."""
    weight = rng.integers(-128, 128, (300, 24))
    weight[:, :8] = np.abs(weight[:, :8])
    weight[:, 8:12] = -np.abs(weight[:, 8:12])
    x = rng.integers(-128, 128, (6, 300))
    x[:2] = np.abs(x[:2])
    x[2] = 127
    bias = rng.integers(-(2**18), 2**18, 24) if op == "Gemm" else None
    node_weight = weight.T.copy() if op == "Gemm" else weight
    attrs = {"transB": 1} if op == "Gemm" else {}
    model = _accumulating_model("esp32s3", 8, op, node_weight, bias, (-3, -7, -2), relu=op == "Gemm", **attrs)
    for batch in (x, x[3:], x[:3]):
        fast, slow = _compiled_and_interpreted(model, batch)
        np.testing.assert_array_equal(fast, slow)
    assert [n.op_type for n in model._programs[(False, None)].rail_nodes] == [op]


def test_relu6_after_a_convolution_is_fused_into_its_saturation(rng):
    """Conv -> Clip(0, 6) (same exponent): the Clip's range joins the Conv's saturation, one node less in the
    graph, the same integers (and a Clip whose input other nodes read stays separate)."""
    model = _cnn(rng)
    calibration = rng.normal(0, 1, (16, 3, 12, 12)).astype(np.float32)
    for bits in ("int8", "int16"):
        table = Calibrator(bits).calibrate(model, calibration).table
        quantized = Evaluator(bits, "per-tensor", "esp32s3").generate_quantized_model(model, table)
        from espquant.simulator.compiled import _clamp_fusions, _readers

        fused = _clamp_fusions(quantized, quantized.nodes, _readers(quantized.nodes))
        assert [f.name for f in fused.values()] == ["relu6"]  # relu1's input feeds only it, but "r1" feeds the Add
        fast, slow = _both(quantized, 3 * rng.normal(0, 1, (8, 3, 12, 12)).astype(np.float32))
        for name in quantized.outputs:
            np.testing.assert_array_equal(fast[name], slow[name])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("follower", ["Relu", "Clip"])
def test_a_relu_after_a_residual_add_is_fused_into_its_saturation(rng, target, bits, follower, monkeypatch):
    """Add -> Relu / Clip(-3, 5) (same exponent): the Add saturates to the intersection of both ranges and writes
    the follower's output; the integers are the interpreter's, saturated sums included."""
    graphs = _segment_graphs(monkeypatch)
    add = QNode("Add", "add", ["a", "b"], ["s"], {}, bits=bits)
    if follower == "Relu":
        clamp = QNode("Relu", "relu", ["s"], ["y"], {}, bits=bits)
        constants = {}
    else:
        clamp = QNode("Clip", "clip", ["s", "lo", "hi"], ["y"], {}, bits=bits)
        constants = {"lo": np.array(-3), "hi": np.array(5)}
    exponents = {"a": -4, "b": -4, "s": -4, "y": -4}
    model = QuantizedModel([add, clamp], constants, exponents, ["a", "b"], ["y"], get_target(target), bits)
    a, c = _int(rng, bits, (2, 3, 4, 4), 2.0), _int(rng, bits, (2, 3, 4, 4), 2.0)
    model.compiled = True
    fast = model.run({"a": a, "b": c})["y"]
    model.compiled = False
    slow = model.run({"a": a, "b": c})["y"]
    np.testing.assert_array_equal(fast, slow)
    assert np.any(np.abs(a + c) > qmax(bits))  # some sums saturate
    assert [n.op_type for g in graphs for n in g.graph.node] == ["Add", "Clip"]


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(-(2**15), 2**15 - 1), min_size=1, max_size=64),
    count=st.integers(1, 4),
)
def test_split_digits_add_up_and_stay_within_their_bounds(values, count):
    from espquant.simulator.compiled import _digit_bounds, _digit_shifts, split_digits

    array = np.array(values)
    digits = split_digits(array, 16, count)
    np.testing.assert_array_equal(sum(digits), array)
    for digit, shift, bound in zip(digits, _digit_shifts(16, count), _digit_bounds(16, count)):
        assert np.all(digit % (1 << shift) == 0)
        assert np.abs(digit >> shift).max() <= bound


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.integers(-(2**15), 2**15 - 1), min_size=1, max_size=64),
    count=st.integers(2, 4),
)
def test_the_graph_digits_of_an_activation_add_up_within_their_bounds(values, count):
    """The float32 Add / Sub steps of ``_activation_digits`` (rounding to a multiple of each digit's place with a
    magic constant), run by onnxruntime, on any int16 values: the digits add up and each stays within its bound."""
    from espquant.runtime import create_session
    from espquant.simulator.compiled import _activation_digits, _Builder, _digit_bounds

    model = _requantize_model("esp32s3", 0, 0, bits=16)
    builder = _Builder(model)
    builder.bits = 16
    digits = _activation_digits(builder, "x", count, "d")
    graph = helper.make_graph(
        builder.nodes,
        "digits",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for _, name in digits],
        builder.initializers,
    )
    session = create_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    array = np.array(values, np.float32)
    outputs = session.run([name for _, name in digits], {"x": array})
    total = sum(out.astype(np.int64) for out in outputs)
    np.testing.assert_array_equal(total, array.astype(np.int64))
    bounds = dict(zip(sorted(place for place, _ in digits), _digit_bounds(16, count)))
    for (place, _), out in zip(digits, outputs):
        digit = out / 2.0**place
        assert np.all(digit == np.round(digit)) and np.abs(digit).max() <= bounds[place]


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    taps=st.integers(1, 300),
    target=st.sampled_from(TARGETS),
    shift=st.integers(-3, 31),
    scale=st.sampled_from([0.05, 1.0, 3.0]),
)
@mock.patch.object(compiled_module, "NATIVE", False)  # the digit splits (hypothesis takes no function fixture)
def test_int16_gemm_split_and_recombine_matches_the_interpreter(seed, taps, target, shift, scale):
    """Any int16 weights and inputs, any shift: the digit-split float32 sums recombined in double give the
    interpreter's integers (float64 BLAS there)."""
    rng = np.random.default_rng(seed)
    weight = _int(rng, 16, (5, taps), scale)
    x = _int(rng, 16, (3, taps), scale)
    bias = rng.integers(-(2**39), 2**39, 5)
    model = _accumulating_model(target, 16, "Gemm", weight, bias, (-10, -14, -24 + shift), transB=1)
    fast, slow = _compiled_and_interpreted(model, x)
    np.testing.assert_array_equal(fast, slow)


def _squeeze_excite(channels: int, plane: int, rng) -> onnx.ModelProto:
    """MobileNetV3's block as exporters write it: Pad, Conv, HardSwish, GlobalAveragePool, HardSigmoid, and the
    Mul of two activations broadcast over the plane (``x[N, C, H, W] * s[N, C, 1, 1]``), then a Sigmoid."""
    c = channels
    nodes = [
        helper.make_node("Pad", ["x", "pads", "zero"], ["padded"], mode="constant"),
        helper.make_node("Conv", ["padded", "w", "b"], ["c1"], group=1),
        helper.make_node("HardSwish", ["c1"], ["h"]),
        helper.make_node("GlobalAveragePool", ["h"], ["g"]),
        helper.make_node("HardSigmoid", ["g"], ["s"], alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["h", "s"], ["m"]),
        helper.make_node("Sigmoid", ["m"], ["y"]),
    ]
    inits = {
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
        "zero": np.array(0.0, np.float32),
        "w": rng.normal(0, 0.5, (c, 3, 3, 3)).astype(np.float32),
        "b": rng.normal(0, 0.2, c).astype(np.float32),
    }
    return make_model(nodes, [tensor("x", ["N", 3, plane, plane])], [tensor("y", ["N", c, plane, plane])], inits)


@pytest.mark.parametrize("bits", ["int8", "int16"])
@pytest.mark.parametrize("target", TARGETS)
def test_squeeze_excite_blocks_compile_and_equal_the_interpreter(rng, bits, target):
    """Pad, the Mul of two activations, and activations without an int8 table (int16: their float32 path as a
    65,536-entry table) run in onnxruntime; a 40x40 plane at int16 sums beyond float32's integers in the
    GlobalAveragePool (taken in double). int16 Mul on the SIMD chips may leave the graph (its two paths
    differ beyond 2^24 and the shape picks one), never its integers."""
    model = _squeeze_excite(8, 40, rng)
    calibration = rng.normal(0, 1, (8, 3, 40, 40)).astype(np.float32)
    table = Calibrator(bits).calibrate(model, calibration).table
    quantized = Evaluator(bits, "per-tensor", target).generate_quantized_model(model, table)
    fast, slow = _both(quantized, 2 * rng.normal(0, 1, (4, 3, 40, 40)).astype(np.float32))
    np.testing.assert_array_equal(fast["y"], slow["y"])
    program = quantized._programs[(True, None)]
    interpreted = {n.op_type for n in program.interpreted_nodes}
    simd_int16 = bits == "int16" and get_target(target).simd
    assert interpreted <= ({"Mul"} if simd_int16 else set()), interpreted


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("known", [None, [None, 5, 40, 41], [None, 5, 1700], [None, 5, 7, 7]])
def test_global_average_pool_with_and_without_a_known_plane(rng, target, bits, known, monkeypatch):
    """GlobalAveragePool takes its area from the float model's shapes when they fix the plane (a constant) and
    from the tensor at run time when not (a ``.espdl`` file's nodes carry no shapes): both equal the
    interpreter, 2-D and 1-D planes, with sums beyond float32's integers at int16; a known plane whose sums stay
    below 2**24 is summed in float32, without a double pass."""
    graphs = _segment_graphs(monkeypatch)
    shape = (3, 5, *(known[2:] if known else (40, 41)))
    node = QNode("GlobalAveragePool", "gap", ["x"], ["y"], {}, bits=bits)
    node.input_shapes = [known] if known else None
    model = QuantizedModel([node], {}, {"x": -7, "y": -9}, ["x"], ["y"], get_target(target), bits)
    x = _int(rng, bits, shape, 2.0)
    fast, slow = _compiled_and_interpreted(model, np.clip(x, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
    np.testing.assert_array_equal(fast, slow)
    assert model._programs[(False, None)].interpreted_nodes == []
    casts = [a.i for g in graphs for n in g.graph.node if n.op_type == "Cast" for a in n.attribute]
    float_sum = known is not None and 2 ** (bits - 1) * np.prod(shape[2:]) < 2**24
    if target == "esp32p4":  # its half-even rounding stays in float32: a cast to double is the sum's
        assert (onnx.TensorProto.DOUBLE in casts) == (not float_sum)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bits", [8, 16])
def test_mul_hand_worked(target, bits):
    """``sat(R(a b 2^-s))`` at s = 1: 3 * 5 is 7.5 (a tie), -3 * 5 is -7.5, 127 * 127 is 8064.5 (saturates at int8)."""
    rounding = get_target(target).rounding
    nodes = [QNode("Mul", "mul", ["a", "b"], ["y"], {}, bits=bits)]
    model = QuantizedModel(nodes, {}, {"a": -2, "b": -3, "y": -4}, ["a", "b"], ["y"], get_target(target), bits)
    a = np.array([3, -3, 127, 0], dtype=np.int64)
    b = np.array([5, 5, 127, 9], dtype=np.int64)
    model.compiled = True
    fast = model.run({"a": a, "b": b})["y"]
    model.compiled = False
    slow = model.run({"a": a, "b": b})["y"]
    tie_up, tie_down = (8, -7) if rounding == "half_up" else (8, -8)
    expected = [tie_up, tie_down, qmax(bits) if bits == 8 else 8065 if rounding == "half_up" else 8064, 0]
    np.testing.assert_array_equal(slow, expected)
    np.testing.assert_array_equal(fast, expected)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize(("e_in", "e_out"), [(-4, -4), (-5, -4), (-3, -4)])
@pytest.mark.parametrize("e_slope", [-7, 1])
def test_prelu_per_channel_compiles_exactly(rng, target, bits, e_in, e_out, e_slope, monkeypatch):
    """Per-channel slopes over NCHW, every sign, positives rescaled or copied as each chip does, negatives
    shifted right (rounded) or left, int16 products beyond 2^24: the compiled node equals the interpreter's
    integers, as the sum of its two branches (no Where)."""
    graphs = _segment_graphs(monkeypatch)
    slope = rng.integers(-qmax(bits), qmax(bits) + 1, (1, 6, 1, 1))
    nodes = [QNode("PRelu", "prelu", ["x", "slope"], ["y"], {}, bits=bits)]
    exponents = {"x": e_in, "slope": e_slope, "y": e_out}
    model = QuantizedModel(nodes, {"slope": slope}, exponents, ["x"], ["y"], get_target(target), bits)
    x = rng.integers(-qmax(bits) - 1, qmax(bits) + 1, (3, 6, 5, 5))
    model.compiled = True
    fast = model.run({"x": x})["y"]
    model.compiled = False
    slow = model.run({"x": x})["y"]
    np.testing.assert_array_equal(fast, slow)
    assert not model._programs[(False, None)].interpreted_nodes
    assert "Where" not in {n.op_type for g in graphs for n in g.graph.node}


def _pooled_model(target: str, bits: int, rng, producer: str, shared: bool) -> QuantizedModel:
    """``x -> Conv (fused ReLU) | PRelu -> t -> MaxPool 3x3/2 (padded) -> y``; ``shared``: ``t`` is also an output.

    Integers given, no calibration."""
    if producer == "conv":
        weight = _int(rng, bits, (8, 4, 3, 3), 0.3)
        first = QNode("Conv", "conv", ["x", "w", "b"], ["t"], {"pads": [1, 1, 1, 1]}, relu=True, bits=bits)
        constants = {"w": weight, "b": _int(rng, bits, (8,))}
        exponents = {"x": -4, "w": -5, "b": -9, "t": -3, "y": -3}
    else:
        first = QNode("PRelu", "prelu", ["x", "slope"], ["t"], {}, bits=bits)
        constants = {"slope": rng.integers(0, qmax(bits) + 1, (1, 4, 1, 1))}
        exponents = {"x": -4, "slope": -7, "t": -4, "y": -4}
    pool = QNode("MaxPool", "pool", ["t"], ["y"], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]})
    pool.bits = bits
    outputs = ["y", "t"] if shared else ["y"]
    return QuantizedModel([first, pool], constants, exponents, ["x"], outputs, get_target(target), bits)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("producer", ["conv", "prelu"])
@pytest.mark.parametrize("shared", [False, True], ids=["pooled-only", "also-an-output"])
def test_max_pool_moves_before_the_rounding_it_commutes_with(
    rng, target, bits, producer, shared, monkeypatch, digit_splits
):
    """A MaxPool that alone reads a node's output pools the values before that node's final rounding and clamp
    (non-decreasing, so they commute with a maximum): the integers are the interpreter's, and a convolution's
    clamp stays fused in it while its rounding moves after the pool. An output that something else also reads
    keeps its own rounding first."""
    graphs = _segment_graphs(monkeypatch)
    model = _pooled_model(target, bits, rng, producer, shared)
    x = _int(rng, bits, (2, 4, 9, 9))
    model.compiled = True
    fast = model.run({"x": x})
    model.compiled = False
    slow = model.run({"x": x})
    for name in model.outputs:
        np.testing.assert_array_equal(fast[name], slow[name])
    nodes = [n for g in graphs for n in g.graph.node]
    pool = next(n for n in nodes if n.op_type == "MaxPool")
    feeding = next(n for n in nodes if pool.input[0] in n.output)
    if shared:
        assert pool.input[0] == "t"
    elif feeding.op_type == "Clip":  # a convolution's clamp, which onnxruntime computes inside the Conv
        assert any(feeding.input[0] in n.output and n.op_type == "Conv" for n in nodes)
    else:
        assert feeding.op_type not in ("Floor", "Round")


@pytest.mark.parametrize("bits", ["int8", "int16"])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    "attrs",
    [
        {"strides": [2, 2]},
        {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]},
        {"strides": [3, 2], "pads": [0, 2, 1, 0]},
        {"pads": [1, 1, 1, 1]},
    ],
    ids=["s2", "s2-pad-outpad", "s3x2-crop", "s1"],
)
def test_conv_transpose_compiles_exactly(rng, bits, target, attrs):
    """ESP-DL's ConvTranspose (zeros inserted, padded or cropped, flipped kernel) runs in onnxruntime and gives
    the interpreter's integers, with signed inputs wide enough to reach ESP32-S3's accumulator checks."""
    weight = rng.normal(0, 0.5, (24, 6, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w", "b"], ["t"], kernel_shape=[3, 3], **attrs),
        helper.make_node("Relu", ["t"], ["r"]),  # a DB head's ConvTranspose -> Relu: fused into the saturation
        helper.make_node("ConvTranspose", ["r", "w2"], ["y"], kernel_shape=[2, 2], strides=[2, 2]),
    ]
    inits = {
        "w": weight,
        "b": rng.normal(0, 0.2, 6).astype(np.float32),
        "w2": rng.normal(0, 0.5, (6, 2, 2, 2)).astype(np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 24, 5, 5])], [tensor("y", None)], inits)
    table = Calibrator(bits).calibrate(model, rng.normal(0, 1, (16, 24, 5, 5)).astype(np.float32)).table
    quantized = Evaluator(bits, "per-tensor", target).generate_quantized_model(model, table)
    fast, slow = _both(quantized, 3 * rng.normal(0, 1, (4, 24, 5, 5)).astype(np.float32))
    np.testing.assert_array_equal(fast["y"], slow["y"])
    assert not quantized._programs[(True, None)].interpreted_nodes


def test_s3_rail_step_of_a_conv_transpose_reads_its_zero_inserted_input(rng):
    """A ConvTranspose whose lanes reach ESP32-S3's rail: the rail step emulates the flipped-kernel Conv on the
    zero-inserted, padded input the segment hands on, and equals the interpreter."""
    weight = rng.integers(-128, 128, (64, 20, 3, 3))  # ConvTranspose layout (C_in, C_out, KH, KW)
    weight[:, :3], weight[:, 3:5] = np.abs(weight[:, :3]), -np.abs(weight[:, 3:5])
    bias = rng.integers(-(2**17), 2**17, 20)
    attrs = {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}
    model = _accumulating_model("esp32s3", 8, "ConvTranspose", weight, bias, (-4, -7, 0), **attrs)
    hot = rng.integers(-20, 21, (2, 64, 6, 6))
    hot[0, :, 1:5, 1:5] = 127
    hot[1, :, :3, :] = -128
    for batch in (hot, hot[:1]):
        fast, slow = _compiled_and_interpreted(model, batch)
        np.testing.assert_array_equal(fast, slow)
    program = model._programs[(False, None)]
    assert model._guarded == {"y"} and program.interpreted_nodes == []
    assert [n.name for n in program.rail_nodes] == ["convtranspose"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(
    "mode",
    [{"mode": "nearest"}, {"mode": "linear"}, {"mode": "linear", "coordinate_transformation_mode": "align_corners"}],
    ids=["nearest", "linear", "linear-align-corners"],
)
@pytest.mark.parametrize(
    ("scales", "sizes", "e_out"),
    [([1, 1, 2, 2], None, -4), ([1, 1, 3, 1.5], None, -5), (None, [2, 5, 13, 7], -3), ([1, 1, 2, 2], None, -2)],
    ids=["x2", "x3-x1.5-rescaled-right", "sizes-rescaled-left", "x2-rescaled-right-by-2"],
)
def test_resize_compiles_exactly(rng, target, mode, scales, sizes, e_out):
    """Resize from the float model's plane size: nearest as the kernel's indices (two Gathers, or a broadcast
    copy for integer factors), rescaled (with the profile's rounding and saturation) where the output exponent
    differs; bilinear as the kernel's float32 steps (rows, then columns, each as a row blend between
    Transposes) with its weights."""
    inputs = ["x", "", "scales"] if scales is not None else ["x", "", "", "sizes"]
    constants = {"scales": np.array(scales, np.float32)} if scales is not None else {"sizes": np.array(sizes)}
    node = QNode("Resize", "resize", inputs, ["y"], dict(mode), bits=8)
    node.input_shapes = [["N", 5, 6, 5], None, [4] if scales is not None else None, [4] if sizes else None]
    model = QuantizedModel([node], constants, {"x": -4, "y": e_out}, ["x"], ["y"], get_target(target), 8)
    x = rng.integers(-128, 128, (2, 5, 6, 5))
    fast, slow = _compiled_and_interpreted(model, x)
    np.testing.assert_array_equal(fast, slow)
    assert not model._programs[(False, None)].interpreted_nodes


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("factors", [(2, 2), (8, 8), (3, 1), (1, 4)])
@pytest.mark.parametrize("plane", ["known", "unknown"])
def test_integer_nearest_upsampling_is_a_broadcast_copy(rng, monkeypatch, target, factors, plane):
    """Nearest Resize by integer factors (the FPN case) repeats every pixel: onnxruntime's own Resize for powers
    of two (floor(i / f) however it computes it), Reshape / Expand for the others, never the per-element
    Gathers of the general case, and equal to the interpreter. Powers of two need no plane size (a ``.espdl``
    file's nodes carry none); the other factors then stay with the interpreter."""
    graphs = _segment_graphs(monkeypatch)
    scales = np.array([1, 1, *factors], np.float32)
    node = QNode("Resize", "resize", ["x", "", "scales"], ["y"], {"mode": "nearest"}, bits=8)
    node.input_shapes = [["N", 3, 4, 5], None, [4]] if plane == "known" else None
    model = QuantizedModel([node], {"scales": scales}, {"x": -4, "y": -5}, ["x"], ["y"], get_target(target), 8)
    fast, slow = _compiled_and_interpreted(model, rng.integers(-128, 128, (2, 3, 4, 5)))
    np.testing.assert_array_equal(fast, slow)
    assert fast.shape == (2, 3, 4 * factors[0], 5 * factors[1])
    doubling = all(f in (1, 2, 4, 8) for f in factors)
    ops = {n.op_type for g in graphs for n in g.graph.node}
    if plane == "unknown" and not doubling:
        assert [n.op_type for n in model._programs[(False, None)].interpreted_nodes] == ["Resize"]
        return
    assert ("Resize" if doubling else "Expand") in ops and "Gather" not in ops


def _batch_one_model(tail: list[onnx.NodeProto], tail_inits: dict, out_shape: list[int]) -> onnx.ModelProto:
    """``x [1, 3, 8, 8] -> Conv -> Relu -> MaxPool -> h [1, 8, 4, 4]`` and then ``tail`` to ``y``: a model that fixes
    its batch to 1, as TFLite and Paddle exports do."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["h"], kernel_shape=[2, 2], strides=[2, 2]),
        *tail,
    ]
    inits = {"w": rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "b": rng.normal(0, 0.1, 8).astype(np.float32)}
    model = make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", out_shape)], {**inits, **tail_inits})
    return optimize_model(model)  # as users prepare a model: shapes inferred


_FLAT = {"flat": np.array([1, -1], np.int64)}
_BATCH_TAILS = {
    "reshape-gemm-softmax": (
        [
            helper.make_node("Reshape", ["h", "flat"], ["f"]),
            helper.make_node("Gemm", ["f", "g", "gb"], ["l"], transB=1),
            helper.make_node("Softmax", ["l"], ["y"], axis=-1),
        ],
        {**_FLAT, "g": np.linspace(-1, 1, 5 * 128).reshape(5, 128).astype(np.float32), "gb": np.zeros(5, np.float32)},
        [1, 5],
        True,
    ),
    "concat-on-the-batch": (
        [helper.make_node("Concat", ["h", "h"], ["y"], axis=0)],
        {},
        [2, 8, 4, 4],
        False,
    ),
    "transpose-moving-the-batch": (
        [helper.make_node("Transpose", ["h"], ["y"], perm=[1, 0, 2, 3])],
        {},
        [8, 1, 4, 4],
        False,
    ),
    "reshape-without-the-batch": (
        [helper.make_node("Reshape", ["h", "rows"], ["y"])],
        {"rows": np.array([-1, 4], np.int64)},
        [32, 4],
        False,
    ),
}


@pytest.mark.parametrize("case", list(_BATCH_TAILS))
@pytest.mark.parametrize("target", ["esp32s3", "esp32p4"])
def test_batch_one_models_run_many_samples_at_once_with_the_same_integers(rng, case, target):
    """A model that fixes its batch to 1 is simulated many samples per run when every node computes each sample
    on its own (its Reshape to ``[1, -1]`` made batch-free): every sample gets exactly the integers of its own
    run. A graph that could mix samples keeps the runs one by one, with the same results."""
    from espquant.simulator.batching import batch_free, samples_per_run
    from espquant.simulator.simulate import simulate

    tail, inits, out_shape, separable = _BATCH_TAILS[case]
    model = _batch_one_model(tail, inits, out_shape)
    data = rng.normal(0, 1, (12, 3, 8, 8)).astype(np.float32)
    table = Calibrator("int8").calibrate(model, data).table
    quantized = Evaluator("int8", "per-tensor", target).generate_quantized_model(model, table)
    assert (batch_free(quantized) is not None) == separable
    assert samples_per_run(quantized) == 64  # a small model: many samples per run
    together, _ = simulate(quantized, model, data)
    one_by_one = [simulate(quantized, model, data[i : i + 1])[0] for i in range(len(data))]
    for k, value in enumerate(together):
        parts = [outputs[k] for outputs in one_by_one]  # joined as simulate joins runs of a fixed batch
        joined = np.concatenate(parts) if all(p.shape[0] == 1 for p in parts) else np.stack(parts)
        np.testing.assert_array_equal(value, joined)
    assert (quantized._batch_free[0][0] is not None) == separable


def test_large_batch_one_models_keep_running_sample_by_sample():
    """Past ``TENSOR_BUDGET`` values in one tensor a bigger batch costs memory traffic, not calls: one per run."""
    from espquant.simulator.batching import TENSOR_BUDGET, samples_per_run

    big = QNode("Relu", "relu", ["x"], ["y"], {}, bits=8)
    big.input_shapes = [[1, 64, 128, 128]]
    model = QuantizedModel([big], {}, {"x": -4, "y": -4}, ["x"], ["y"], get_target("esp32s3"), 8)
    assert TENSOR_BUDGET < 64 * 128 * 128 and samples_per_run(model) == 1
    big.input_shapes = [[1, 64, 8, 8]]
    assert samples_per_run(model) == 64
    big.input_shapes = [None]
    assert samples_per_run(model) == 1


# --- value ranges: tighter static bounds after tables and products -----------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    bits=st.sampled_from([8, 16]),
    target=st.sampled_from(["esp32s3", "esp32p4", "esp32c3"]),
    exponents=st.tuples(st.integers(-12, -2), st.integers(-12, -2), st.integers(-14, 2)),
)
def test_a_products_range_holds_every_product_the_kernel_makes(seed, bits, target, exponents):
    """``_product_range`` bounds ``kernels.mul`` over every pair of operand values in their ranges, on the SIMD
    path (a long innermost axis) and the float32 path (innermost length 1), any exponents."""
    from espquant.quant.pot import qmin
    from espquant.simulator import kernels

    rng = np.random.default_rng(seed)
    ranges = {}
    for name in ("a", "b"):
        ends = np.sort(rng.integers(qmin(bits), qmax(bits) + 1, 2))
        ranges[name] = (int(ends[0]), int(ends[1]))
    e_a, e_b, e_out = exponents
    node = QNode("Mul", "mul", ["a", "b"], ["y"], {}, bits=bits)
    model = QuantizedModel([node], {}, {"a": e_a, "b": e_b, "y": e_out}, ["a", "b"], ["y"], get_target(target), bits)
    lowest, highest = compiled_module._product_range(model, node, ranges)
    a = np.linspace(*ranges["a"], 97).round().astype(np.int64)
    b = np.linspace(*ranges["b"], 89).round().astype(np.int64)
    pairs_a, pairs_b = np.meshgrid(a, b)
    for shape in ((1, -1), (-1, 1)):
        out = kernels.mul(
            pairs_a.reshape(shape), pairs_b.reshape(shape), e_a=e_a, e_b=e_b, e_out=e_out, bits=bits,
            profile=get_target(target),
        )  # fmt: skip
        assert lowest <= out.min() and out.max() <= highest


@pytest.mark.parametrize("target", TARGETS)
def test_a_gate_made_by_convolutions_multiplies_its_map_in_the_plain_layout(rng, target):
    """MobileNetV3's squeeze-excite as PaddlePaddle writes it: the gate ``[N, C, 1, 1]`` comes out of two 1x1
    Convs, so onnxruntime holds it blocked like the ``[N, C, H, W]`` map it multiplies. A blocked tensor keeps its
    plain shape while its values lie block by block, so a broadcasting Mul of the two would pair values of
    different channels (PP-OCR's classifier and detector gave other integers from a program's third run): the
    Mul is not marked ``SAME_SHAPE`` and stays plain, the residual Add of two maps of one shape is and moves."""
    c = 16
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c1"], ["h"]),
        helper.make_node("GlobalAveragePool", ["h"], ["g"]),
        helper.make_node("Conv", ["g", "w2", "b2"], ["r"]),
        helper.make_node("Relu", ["r"], ["rr"]),
        helper.make_node("Conv", ["rr", "w3", "b3"], ["e"]),
        helper.make_node("HardSigmoid", ["e"], ["s"], alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["h", "s"], ["m"]),
        helper.make_node("Conv", ["m", "w4"], ["p"]),
        helper.make_node("Add", ["p", "c1"], ["a"]),
        helper.make_node("Conv", ["a", "w5"], ["y"]),
    ]
    weights = {
        "w1": rng.normal(0, 0.4, (c, 3, 3, 3)).astype(np.float32),
        "w2": rng.normal(0, 0.4, (c // 2, c, 1, 1)).astype(np.float32),
        "b2": rng.normal(0, 0.2, c // 2).astype(np.float32),
        "w3": rng.normal(0, 0.4, (c, c // 2, 1, 1)).astype(np.float32),
        "b3": rng.normal(0, 0.5, c).astype(np.float32),
        "w4": rng.normal(0, 0.3, (c, c, 1, 1)).astype(np.float32),
        "w5": rng.normal(0, 0.3, (8, c, 1, 1)).astype(np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 3, 6, 6])], [tensor("y", ["N", 8, 6, 6])], weights)
    data = rng.normal(0, 1, (16, 3, 6, 6)).astype(np.float32)
    table = Calibrator("int8").calibrate(model, data).table
    quantized = Evaluator("int8", "per-tensor", target).generate_quantized_model(model, table)
    fast, slow = _both(quantized, data)
    np.testing.assert_array_equal(fast["y"], slow["y"])
    marked = {
        node.op_type
        for step in quantized._programs[(True, None)].steps
        if isinstance(step, compiled_module._Segment) and step.proto is not None
        for node in step.proto.graph.node
        if node.name.startswith(layout.SAME_SHAPE)
    }
    assert marked <= {"Add"}


def test_a_squeeze_excite_gate_after_hardswish_needs_no_s3_guard(rng):
    """MobileNetV3's block on ESP32-S3 at int8: HardSwish (a table barely below 0) times a HardSigmoid gate (a
    table in [0, 1]) feeds a 1x1 Conv of 200 channels. The signed bound (128 sum |w|) reaches the 20-bit lanes'
    rail, so a guard would check the data on every batch; the product's range halves the bound and proves the
    lanes safe: no guard, the interpreter's integers."""
    c = 200
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"]),
        helper.make_node("HardSwish", ["c1"], ["h"]),
        helper.make_node("GlobalAveragePool", ["h"], ["g"]),
        helper.make_node("HardSigmoid", ["g"], ["s"], alpha=1 / 6, beta=0.5),
        helper.make_node("Mul", ["h", "s"], ["m"]),
        helper.make_node("Conv", ["m", "w2"], ["y"]),
    ]
    weights = {
        "w1": rng.normal(0, 0.5, (c, 8, 1, 1)).astype(np.float32),
        "w2": rng.normal(0, 0.05, (32, c, 1, 1)).astype(np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 8, 4, 4])], [tensor("y", ["N", 32, 4, 4])], weights)
    data = rng.normal(0, 1, (16, 8, 4, 4)).astype(np.float32)
    table = Calibrator("int8").calibrate(model, data).table
    quantized = Evaluator("int8", "per-tensor", "esp32s3").generate_quantized_model(model, table)
    ranges = compiled_module._value_ranges(quantized, quantized.nodes)
    assert ranges["h"][0] > -64 and ranges["s"][0] >= 0 and "m" in ranges
    fast, slow = _both(quantized, 3 * data)
    np.testing.assert_array_equal(fast["y"], slow["y"])
    program = quantized._programs[(True, None)]
    assert not any(step.guards for step in program.steps if isinstance(step, compiled_module._Segment))


def test_value_ranges_pass_only_through_ops_that_keep_the_scale():
    """A table's range passes through a pool at the same exponent (with 0 for an average's padding), but a
    rescaling pool or a RequantizeLinear keeps only the sign: a finer exponent multiplies every integer."""
    table = np.clip(np.arange(-128, 128) // 3, -5, 127)  # a HardSwish-like table: [-5, 42]
    nodes = [
        QNode("HardSwish", "h", ["x"], ["h"], {}, table=table, bits=8),
        QNode("MaxPool", "same", ["h"], ["p"], {"kernel_shape": [2, 2]}, bits=8),
        QNode("GlobalAveragePool", "finer", ["h"], ["g"], {}, bits=8),
        QNode("Relu", "r", ["h"], ["r"], {}, bits=8),
        QNode("GlobalAveragePool", "finer_relu", ["r"], ["q"], {}, bits=8),
    ]
    exponents = {"x": -4, "h": -3, "p": -3, "g": -5, "r": -3, "q": -5}
    model = QuantizedModel(nodes, {}, exponents, ["x"], ["p", "g", "q"], get_target("esp32s3"), 8)
    ranges = compiled_module._value_ranges(model, nodes)
    assert ranges["h"] == (-5, 42) and ranges["p"] == (-5, 42)
    assert "g" not in ranges  # -5 at exponent -3 is -20 at exponent -5
    assert ranges["r"] == (0, 127) and ranges["q"] == (0, 127)


def _one_node_model(target: str, bits: int, node: QNode, exponents: dict, constants: dict | None = None):
    return QuantizedModel([node], constants or {}, exponents, ["x"], node.outputs, get_target(target), bits)


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    target=st.sampled_from(TARGETS),
    bits=st.sampled_from([8, 16]),
    op=st.sampled_from(["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"]),
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    axes=st.lists(st.integers(-4, 3), max_size=3),
    keepdims=st.booleans(),
    as_input=st.booleans(),
    shifts=st.tuples(st.integers(-12, 2), st.integers(-4, 6)),
    long_axis=st.booleans(),
)
def test_reductions_run_in_the_graph_as_the_interpreter_computes_them(
    seed, target, bits, op, shape, axes, keepdims, as_input, shifts, long_axis
):
    """ReduceMean / Sum / Max / Min in the graph equal ``reductions.reduce_integer``: any axes (negative or
    none), keepdims or not, axes as input or attribute, sums beyond float32's integers (a 3,000-long axis at
    int16), ReduceSum shifted right (both roundings) and left, full-range integers that saturate, with the
    input's shape known or not."""
    rng = np.random.default_rng(seed)
    axes = list({a % len(shape): a for a in axes if -len(shape) <= a < len(shape)}.values())  # ONNX: no repeats
    if long_axis:
        shape[(axes or [0])[0] % len(shape)] = 3000
    x = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), shape)
    x.reshape(-1)[:2] = [2 ** (bits - 1) - 1, -(2 ** (bits - 1))][: x.size]
    e_in, offset = shifts
    inputs, constants, attrs = ["x"], {}, {"keepdims": int(keepdims)}
    if axes and as_input:
        inputs.append("axes")
        constants["axes"] = np.array(axes, np.int64)
    elif axes:
        attrs["axes"] = axes
    node = QNode(op, "reduce", inputs, ["y"], attrs, bits=bits)
    if seed % 3 == 0:  # no shapes (a ``.espdl`` file's nodes): the count is taken at run time
        node.input_shapes = None
    elif axes and min(a % len(shape) for a in axes) > 0:
        node.input_shapes = [[None, *shape[1:]]]  # the batch unknown, as the float model gives it
    else:
        node.input_shapes = [list(shape)]
    e_out = e_in if op in ("ReduceMax", "ReduceMin") else e_in + offset
    model = _one_node_model(target, bits, node, {"x": e_in, "y": e_out}, constants)
    fast, slow = _compiled_and_interpreted(model, x)
    assert model._programs[(False, None)].interpreted_nodes == []
    assert fast.shape == slow.shape
    np.testing.assert_array_equal(fast, slow)


@pytest.mark.parametrize(("target", "expected"), [("esp32s3", [3, -2, 127, -128]), ("esp32p4", [2, -2, 127, -128])])
def test_reduce_sum_hand_worked(target, expected):
    """Row sums 5, -5 (ties at a shift of 1: half-up 3 / -2, half-even 2 / -2), then 300 and -300 saturated."""
    node = QNode("ReduceSum", "sum", ["x"], ["y"], {"axes": [1], "keepdims": 0}, bits=8)
    node.input_shapes = [["N", 2]]
    model = _one_node_model(target, 8, node, {"x": -3, "y": -2})
    x = np.array([[2, 3], [-2, -3], [150, 150], [-150, -150]])
    fast, slow = _compiled_and_interpreted(model, x)
    np.testing.assert_array_equal(slow, expected)
    np.testing.assert_array_equal(fast, expected)


def test_an_int8_sum_that_could_wrap_in_int32_stays_with_the_interpreter():
    node = QNode("ReduceSum", "sum", ["x"], ["y"], {"keepdims": 0}, bits=8)
    node.input_shapes = [[1 << 12, 1 << 12]]
    model = _one_node_model("esp32p4", 8, node, {"x": 0, "y": 0})
    model.run({"x": np.ones((2, 2), np.int64)})
    assert [n.op_type for n in model._programs[(False, None)].interpreted_nodes] == ["ReduceSum"]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    axis=st.integers(-4, 3),
    parts=st.integers(1, 4),
    sizes_as=st.sampled_from(["input", "attribute", "equal"]),
)
def test_split_runs_in_the_graph_as_the_interpreter_computes_it(seed, shape, axis, parts, sizes_as):
    """Split into given sizes (input or attribute) or into ceil(n / parts) each, along any axis."""
    rng = np.random.default_rng(seed)
    axis = axis % len(shape) - len(shape) * (seed % 2)
    length = shape[axis]
    cuts = sorted(rng.choice(np.arange(1, length), size=min(parts, length) - 1, replace=False)) if length > 1 else []
    sizes = np.diff([0, *cuts, length]).tolist()
    chunk = -(-length // parts)
    if sizes_as == "equal" and chunk * (parts - 1) >= length:
        return  # a part would be empty: np.split and ONNX disagree there, and no exporter writes it
    outputs = [f"y{i}" for i in range(len(sizes) if sizes_as != "equal" else parts)]
    inputs, constants, attrs = ["x"], {}, {"axis": axis}
    if sizes_as == "input":
        inputs.append("sizes")
        constants["sizes"] = np.array(sizes, np.int64)
    elif sizes_as == "attribute":
        attrs["split"] = sizes
    node = QNode("Split", "split", inputs, outputs, attrs, bits=8)
    node.input_shapes = [list(shape)]
    model = _one_node_model("esp32s3", 8, node, {"x": -3} | dict.fromkeys(outputs, -3), constants)
    x = rng.integers(-128, 128, shape)
    model.compiled = True
    fast = model.run({"x": x})
    model.compiled = False
    slow = model.run({"x": x})
    assert model._programs[(False, None)].interpreted_nodes == []
    for name in outputs:
        np.testing.assert_array_equal(fast[name], slow[name])


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    bounds=st.lists(
        st.tuples(st.integers(-12, 12), st.integers(-12, 12), st.integers(-4, 3), st.integers(1, 3)),
        min_size=1,
        max_size=3,
    ),
    with_axes=st.booleans(),
)
def test_slice_runs_in_the_graph_as_the_interpreter_computes_it(seed, shape, bounds, with_axes):
    """Slice with out-of-range, negative and empty bounds and positive steps: normalised as Python does."""
    rng = np.random.default_rng(seed)
    if with_axes:
        chosen = {b[2] % len(shape): b for b in bounds}  # one bound per axis
        bounds = list(chosen.values())
        axes = [b[2] % len(shape) - len(shape) * (seed % 2) for b in bounds]
    else:
        bounds = bounds[: len(shape)]
        axes = None
    constants = {
        "starts": np.array([b[0] for b in bounds], np.int64),
        "ends": np.array([b[1] for b in bounds], np.int64),
        "steps": np.array([b[3] for b in bounds], np.int64),
    }
    inputs = ["x", "starts", "ends"]
    if axes is not None:
        constants["axes"] = np.array(axes, np.int64)
        inputs.append("axes")
    else:
        inputs.append("")
    inputs.append("steps")
    node = QNode("Slice", "slice", inputs, ["y"], {}, bits=16)
    node.input_shapes = [list(shape)]
    model = _one_node_model("esp32p4", 16, node, {"x": -9, "y": -9}, constants)
    x = rng.integers(-(2**15), 2**15, shape)
    fast, slow = _compiled_and_interpreted(model, x)
    assert model._programs[(False, None)].interpreted_nodes == []
    assert fast.shape == slow.shape
    np.testing.assert_array_equal(fast, slow)


def test_an_int8_sum_of_unknown_length_is_guarded_against_int32_wrap(monkeypatch):
    """Without shapes the int8 sum's count is read at run time; 2**24 values or more could wrap the runtime's
    int32 accumulator, so the guard trips and the node moves to the interpreter (a lower bound here, to test
    the trip without a 16M-value tensor)."""
    node = QNode("ReduceMean", "mean", ["x"], ["y"], {"axes": [1], "keepdims": 0}, bits=8)
    model = _one_node_model("esp32s3", 8, node, {"x": -3, "y": -3})
    fast, slow = _compiled_and_interpreted(model, np.full((2, 100), 127))
    np.testing.assert_array_equal(fast, slow)
    assert model._programs[(False, None)].interpreted_nodes == []
    real_const = compiled_module._Builder.const

    def small_limit(self, value, hint, dtype=np.float32):
        return real_const(self, 64 if np.asarray(value).tolist() == 1 << 24 else value, hint, dtype)

    monkeypatch.setattr(compiled_module._Builder, "const", small_limit)
    model = _one_node_model("esp32s3", 8, node, {"x": -3, "y": -3})
    fast, slow = _compiled_and_interpreted(model, np.full((2, 100), 127))
    np.testing.assert_array_equal(fast, slow)
    assert model._guarded == {"y"}
    assert [n.op_type for n in model._programs[(False, None)].interpreted_nodes] == ["ReduceMean"]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    target=st.sampled_from(TARGETS),
    bits=st.sampled_from([8, 16]),
    op=st.sampled_from(["Pow", "Div", "Mod", "Neg"]),
    constant=st.integers(-5, 5),
    exponents=st.tuples(st.integers(-10, 2), st.integers(-3, 1), st.integers(-10, 2)),
)
def test_elementwise_nodes_by_a_constant_scalar_are_tables(seed, target, bits, op, constant, exponents):
    """Pow, Div and Mod by a constant scalar (a LayerNorm's square, a division by a constant) and Neg depend on
    their one integer input alone: the graph looks them up in the interpreter's own step over every input value,
    zero divisors and saturation included."""
    rng = np.random.default_rng(seed)
    e_x, e_c, e_y = exponents
    inputs, constants = ["x"], {}
    if op != "Neg":
        inputs.append("c")
        constants["c"] = np.array(constant, np.int64)
    node = QNode(op, op.lower(), inputs, ["y"], {}, bits=bits)
    node.input_shapes = [["N", 3, 5], [] if op != "Neg" else None]
    model = _one_node_model(target, bits, node, {"x": e_x, "c": e_c, "y": e_y}, constants)
    x = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (2, 3, 5))
    x.reshape(-1)[:3] = [0, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1]
    fast, slow = _compiled_and_interpreted(model, x)
    assert model._programs[(False, None)].interpreted_nodes == []
    np.testing.assert_array_equal(fast, slow)


def test_a_division_of_one_value_per_sample_stays_with_the_interpreter():
    """``kernels.div`` divides a lone dividend by another path than a vector's: a table made on a vector would
    be wrong for it, so a Div whose samples hold one value each is not tabled."""
    node = QNode("Div", "div", ["x", "c"], ["y"], {}, bits=8)
    node.input_shapes = [["N", 1], []]
    model = _one_node_model("esp32s3", 8, node, {"x": -4, "c": -2, "y": -4}, {"c": np.array(3)})
    fast, slow = _compiled_and_interpreted(model, np.array([[7]]))
    np.testing.assert_array_equal(fast, slow)
    assert [n.op_type for n in model._programs[(False, None)].interpreted_nodes] == ["Div"]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    target=st.sampled_from(TARGETS),
    bits=st.sampled_from([8, 16]),
    kind=st.sampled_from(["conv", "depthwise", "pointwise"]),
    kernel=st.integers(1, 5),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 3),
    pads=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    relu=st.booleans(),
    native_on=st.booleans(),
    out_shift=st.integers(-3, 12),
)
def test_one_dimensional_convolutions_compile_as_the_interpreter_computes_them(
    seed, target, bits, kind, kernel, stride, dilation, pads, relu, native_on, out_shift
):
    """A 1-D convolution (a TDNN's dilated layers, a speech model's depthwise ones) runs as the 2-D one of
    height 1 that the interpreter computes: in the graph (float32, digit splits, S3 guards) or natively in
    double, with ReLU, strides, dilations, uneven pads, ties and saturation; nothing left to the interpreter."""
    rng = np.random.default_rng(seed)
    channels, inputs, length = 10, 6, 23
    if kind == "pointwise":
        kernel, stride, dilation, pads = 1, 1, 1, (0, 0)
    if dilation * (kernel - 1) + 1 > length + sum(pads):
        return
    attrs = {"strides": [stride], "dilations": [dilation], "pads": list(pads)}
    if kind == "depthwise":
        weight, x = _int(rng, bits, (channels, 1, kernel)), _int(rng, bits, (3, channels, length), 2.0)
        attrs["group"] = channels
    else:
        weight, x = _int(rng, bits, (channels, inputs, kernel)), _int(rng, bits, (3, inputs, length), 2.0)
    bias = rng.integers(-(2 ** (2 * bits)), 2 ** (2 * bits), channels)
    e_in, e_w = -7 if bits == 8 else -12, -6 if bits == 8 else -14
    with mock.patch.object(compiled_module, "NATIVE", native_on):
        model = _accumulating_model(
            target, bits, "Conv", weight, bias, (e_in, e_w, e_in + e_w + out_shift), relu=relu, **attrs
        )
        fast, slow = _compiled_and_interpreted(model, np.clip(x, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
    np.testing.assert_array_equal(fast, slow)
    assert fast.shape == slow.shape and fast.dtype == slow.dtype
    assert model._programs[(False, None)].interpreted_nodes == []


@pytest.mark.parametrize("bits", ["int8", "int16"])
@pytest.mark.parametrize("target", TARGETS)
def test_a_one_dimensional_network_compiles_entirely(rng, bits, target):
    """A small TDNN as PyTorch exports it (dilated 1-D convolutions, a depthwise one, ReLU, ReduceMean over time,
    Gemm), calibrated and quantized: every node compiled, every integer the interpreter's."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], dilations=[2], pads=[2, 2], name="tdnn1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "wd"], ["c2"], group=16, pads=[1, 1], strides=[2], name="depthwise"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="pointwise"),
        helper.make_node("ReduceMean", ["c3"], ["m"], axes=[2], keepdims=0, name="pool"),
        helper.make_node("Gemm", ["m", "wg"], ["y"], transB=1, name="fc"),
    ]
    inits = {
        "w1": rng.normal(0, 0.3, (16, 8, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.1, 16).astype(np.float32),
        "wd": rng.normal(0, 0.5, (16, 1, 3)).astype(np.float32),
        "w3": rng.normal(0, 0.3, (24, 16, 1)).astype(np.float32),
        "b3": rng.normal(0, 0.1, 24).astype(np.float32),
        "wg": rng.normal(0, 0.3, (5, 24)).astype(np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 8, 40])], [tensor("y", ["N", 5])], inits)
    table = Calibrator(bits).calibrate(model, rng.normal(0, 1, (16, 8, 40)).astype(np.float32)).table
    quantized = Evaluator(bits, "per-tensor", target).generate_quantized_model(model, table)
    fast, slow = _both(quantized, 3 * rng.normal(0, 1, (6, 8, 40)).astype(np.float32))
    np.testing.assert_array_equal(fast["y"], slow["y"])
    assert quantized._programs[(True, None)].interpreted_nodes == []


@settings(max_examples=80, deadline=None)
@example(  # ESP32-S3's 20-bit lanes reached: the guard trips (once: the node then stays with the interpreter)
    seed=0, target="esp32s3", bits=8, batch=(2,), sizes=(4, 300, 16), shift=8, relu=False, full_range=True
)
@given(
    seed=st.integers(0, 2**31),
    target=st.sampled_from(TARGETS),
    bits=st.sampled_from([8, 16]),
    batch=st.sampled_from([(), (2,), (2, 3), "broadcast"]),
    sizes=st.tuples(st.integers(1, 6), st.sampled_from([1, 5, 32, 300]), st.sampled_from([1, 7, 16, 40])),
    shift=st.integers(-2, 14),
    relu=st.booleans(),
    full_range=st.booleans(),
)
def test_a_matmul_of_two_activations_compiles_as_the_interpreter_computes_it(
    seed, target, bits, batch, sizes, shift, relu, full_range
):
    """Attention's products of two activations, batched and broadcast, with ties, ReLU and saturation; where an
    ESP32-S3 / -P4 lane could reach its rail the guard checks this data, and a batch that trips it moves the node
    to the interpreter: either way every integer is the interpreter's."""
    rng = np.random.default_rng(seed)
    rows, depth, columns = sizes
    a_batch, b_batch = ((2, 3), (3,)) if batch == "broadcast" else (batch, batch)
    high = 2 ** (bits - 1)
    scale = 1.0 if full_range else 0.05
    a = np.clip(np.round(rng.normal(0, scale * high, (*a_batch, rows, depth))), -high, high - 1).astype(np.int64)
    c = np.clip(np.round(rng.normal(0, scale * high, (*b_batch, depth, columns))), -high, high - 1).astype(np.int64)
    if full_range:
        a[..., :] = np.abs(a)  # one-signed rows against one-signed columns: the largest sums
        c[..., :] = np.abs(c)
    node = QNode("MatMul", "attention", ["x", "k"], ["y"], {}, relu=relu, bits=bits)
    node.input_shapes = [["N", *a_batch[1:], rows, depth] if a_batch else [rows, depth], [*b_batch, depth, columns]]
    exponents = {"x": -7, "k": -5, "y": -12 + shift}
    model = QuantizedModel([node], {}, exponents, ["x", "k"], ["y"], get_target(target), bits)
    model.compiled = True
    fast = model.run({"x": a, "k": c})["y"]
    model.compiled = False
    slow = model.run({"x": a, "k": c})["y"]
    np.testing.assert_array_equal(fast, slow)
    assert fast.shape == slow.shape
    interpreted = [n.name for n in model._programs[(False, None)].interpreted_nodes]
    assert interpreted == (["attention"] if "y" in model._guarded else [])


@pytest.mark.parametrize("bits", ["int8", "int16"])
@pytest.mark.parametrize("target", TARGETS)
def test_an_attention_block_compiles_entirely(rng, bits, target):
    """Self-attention as exporters write it (projections, ``Q K^T``, Softmax, its quantized weights times ``V``):
    every node in the graph, every integer the interpreter's."""
    d = 16
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk"),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"], name="pv"),
        helper.make_node("MatMul", ["o", "wo"], ["y"]),
    ]
    inits = {n: rng.normal(0, 0.3, (d, d)).astype(np.float32) for n in ("wq", "wk", "wv", "wo")}
    model = make_model(nodes, [tensor("x", ["N", 10, d])], [tensor("y", ["N", 10, d])], inits)
    table = Calibrator(bits).calibrate(model, rng.normal(0, 1, (16, 10, d)).astype(np.float32)).table
    quantized = Evaluator(bits, "per-tensor", target).generate_quantized_model(model, table)
    fast, slow = _both(quantized, 2 * rng.normal(0, 1, (4, 10, d)).astype(np.float32))
    np.testing.assert_array_equal(fast["y"], slow["y"])
    assert quantized._programs[(True, None)].interpreted_nodes == []


def test_the_attention_guard_checks_magnitudes_only_where_cauchy_schwarz_reaches_the_rail():
    """ESP32-S3 int8, 128-long products: rows whose norms alone would reach the 20-bit lanes (Cauchy-Schwarz
    trips) but whose large values never meet (the exact magnitudes stay small) keep the node compiled; values
    that do meet send it to the interpreter. Both give the interpreter's integers."""
    node = QNode("MatMul", "attention", ["x", "k"], ["y"], {}, bits=8)
    node.input_shapes = [["N", 3, 128], ["N", 128, 16]]
    exponents = {"x": -7, "k": -5, "y": -3}
    a, c = np.zeros((2, 3, 128), np.int64), np.zeros((2, 128, 16), np.int64)
    a[..., :64], c[:, 64:] = 127, 127  # norms 127 * 8 each: their product 2^20 reaches 2^19; every sum is 0
    for meet in (False, True):
        if meet:
            c[:, :64] = 127
        model = QuantizedModel([node], {}, exponents, ["x", "k"], ["y"], get_target("esp32s3"), 8)
        model.compiled = True
        fast = model.run({"x": a, "k": c})["y"]
        model.compiled = False
        np.testing.assert_array_equal(fast, model.run({"x": a, "k": c})["y"])
        assert model._guarded == ({"y"} if meet else set())
