"""simulator/layout.py: elementwise ops moved onto onnxruntime's blocked (NCHWc) tensors give the same numbers.

The graphs hold small integers (exact in float32 in any summation order), so the blocked session, the plain
optimized one and an unoptimized one must agree bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from espquant.runtime import create_session
from espquant.simulator import layout
from espquant.simulator.layout import blocked_session, keep_blocked


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    """An edited graph onnxruntime refuses fails the test instead of falling back to the optimized one."""
    monkeypatch.setattr(layout, "STRICT", True)


def _model(channels: int, tail: list[tuple[str, list]], seed: int, marked: bool = True) -> onnx.ModelProto:
    """x -> Conv 3x3 -> ``tail`` (op, constant inputs: None for the running tensor, "skip" for the first Conv's
    output, an op that reads it named ``layout.SAME_SHAPE`` when ``marked``, as compiled.py names an op of two
    activations of one shape) -> Conv 1x1 -> y; integer weights."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.integers(-3, 4, (channels, 5, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.integers(-3, 4, (channels, channels, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.integers(-8, 9, channels).astype(np.float32), "b1"),
    ]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1])]
    last = "c1"
    for index, (op, constants) in enumerate(tail):
        inputs = [last]
        for k, value in enumerate(constants):
            if isinstance(value, str):
                inputs.append("c1")
            else:
                inits.append(numpy_helper.from_array(np.asarray(value, np.float32), f"k{index}_{k}"))
                inputs.append(f"k{index}_{k}")
        name = layout.SAME_SHAPE + f"t{index}" if marked and "c1" in inputs[1:] else None
        nodes.append(helper.make_node(op, inputs, [f"t{index}"], name=name))
        last = f"t{index}"
    nodes.append(helper.make_node("Conv", [last, "w2"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 5, 9, 9])],
        [
            helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None),
            helper.make_tensor_value_info(last, onnx.TensorProto.FLOAT, None),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


ROUNDING = [("Mul", [0.25]), ("Floor", []), ("Clip", [-6.0, 6.0])]


def _check(model: onnx.ModelProto, x: np.ndarray) -> None:
    names = [o.name for o in model.graph.output]
    plain = create_session(model, threads=1, optimize=False).run(names, {"x": x})
    blocked = blocked_session(model, threads=1, what="a test graph").run(names, {"x": x})
    for a, b in zip(plain, blocked):
        np.testing.assert_array_equal(a, b)


def _edited(model: onnx.ModelProto, tmp_path) -> onnx.ModelProto | None:
    path = str(tmp_path / "optimized.onnx")
    create_session(model, threads=1, optimized_path=path)
    optimized = onnx.load(path)
    if not any(node.op_type == "ReorderInput" for node in optimized.graph.node):
        pytest.skip("onnxruntime did not block these convolutions on this CPU")
    return keep_blocked(optimized)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), channels=st.sampled_from([4, 12, 16, 20, 40]))
def test_rounding_between_convolutions_runs_blocked_and_equal(seed, channels):
    """Scale, Floor and Clip between two Convs (channel counts that fill their blocks or leave padding lanes),
    the rounded tensor also a graph output: equal to the unoptimized graph."""
    x = np.random.default_rng(seed).integers(-20, 21, (2, 5, 9, 9)).astype(np.float32)
    _check(_model(channels, ROUNDING, seed), x)


def test_the_edit_leaves_the_graph_it_reads_as_it_was(tmp_path):
    path = str(tmp_path / "optimized.onnx")
    create_session(_model(12, ROUNDING, 0), threads=1, optimized_path=path)
    optimized = onnx.load(path)
    before = optimized.SerializeToString()
    if keep_blocked(optimized) is None:
        pytest.skip("onnxruntime did not block these convolutions on this CPU")
    assert optimized.SerializeToString() == before


def test_the_edit_drops_the_reorders_around_the_rounding(tmp_path):
    edited = _edited(_model(12, ROUNDING, 0), tmp_path)
    assert edited is not None
    ops = [node.op_type for node in edited.graph.node]
    assert "ReorderInput" not in ops[1:]  # only the graph input is reordered
    # the rounded tensor is a graph output: one ReorderOutput after the Clip, one for y
    assert ops.count("ReorderOutput") == 2


@pytest.mark.parametrize(
    ("tail", "marked"),
    [
        ([("Floor", []), ("Add", [np.arange(12).reshape(1, 12, 1, 1)]), ("Round", [])], True),  # per-channel
        ([("Floor", []), ("Add", ["skip"]), ("Clip", [0.0, 6.0])], True),  # a residual Add of one shape
        ([("Floor", []), ("Add", ["skip"]), ("Clip", [0.0, 6.0])], False),  # two tensors that may broadcast
        ([("Abs", []), ("Sqrt", []), ("Floor", [])], True),  # Sqrt may make NaN from padding lanes: not moved
    ],
)
def test_only_elementwise_ops_on_blocked_inputs_move(tail, marked, tmp_path):
    model = _model(12, tail, 3, marked)
    _check(model, np.random.default_rng(3).integers(-20, 21, (2, 5, 9, 9)).astype(np.float32))
    edited = _edited(model, tmp_path)
    moved = {n.op_type for n in edited.graph.node if n.output[0].endswith("::blocked")} if edited else set()
    if tail[2][0] == "Round":  # Floor alone could move, but no reorder would go: the graph stays as it is
        assert moved == set()
    elif tail[1][0] == "Add" and marked:
        assert moved == {"Floor", "Add", "Clip"}
    elif tail[1][0] == "Add":
        assert "Add" not in moved
    else:
        assert "Sqrt" not in moved and "Floor" not in moved


def _lookup_model(channels: int, constant_shape: bool = False) -> onnx.ModelProto:
    """x -> Conv -> Floor -> an int8 table looked up as compiled.py's ``_gather`` does (Cast to int32 indices,
    Reshape to one axis, GatherElements from the table rolled by half, Reshape back to Shape(x)) -> Conv -> y."""
    rng = np.random.default_rng(5)
    table = rng.integers(-128, 128, 256).astype(np.float32)
    inits = [
        numpy_helper.from_array(rng.integers(-1, 2, (channels, 5, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.integers(-3, 4, (channels, channels, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.float32(0.5), "half"),
        numpy_helper.from_array(np.float32(-128), "low"),
        numpy_helper.from_array(np.float32(127), "high"),
        numpy_helper.from_array(np.roll(table, -128), "table"),
        numpy_helper.from_array(np.array([-1], np.int64), "flat"),
        numpy_helper.from_array(np.array([-1, channels, 9, 9], np.int64), "plane"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c1", "half"], ["scaled"]),
        helper.make_node("Clip", ["scaled", "low", "high"], ["clipped"]),
        helper.make_node("Floor", ["clipped"], ["q"]),
        helper.make_node("Cast", ["q"], ["index"], to=onnx.TensorProto.INT32),
        helper.make_node("Reshape", ["index", "flat"], ["flat_index"]),
        helper.make_node("GatherElements", ["table", "flat_index"], ["looked_up"], axis=0),
        helper.make_node("Shape", ["q"], ["shape"]),
        helper.make_node("Reshape", ["looked_up", "plane" if constant_shape else "shape"], ["t"]),
        helper.make_node("Conv", ["t", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 5, 9, 9])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("channels", [12, 16])
def test_a_table_lookup_between_convolutions_runs_blocked(channels, tmp_path):
    """The table lookup reads each value on its own: on the blocked tensor (padding lanes included, which hold
    0 and look up a finite entry) it needs only the blocked shape to reshape back to. Equal, and no reorder
    between the two Convs."""
    model = _lookup_model(channels)
    _check(model, np.random.default_rng(6).integers(-20, 21, (2, 5, 9, 9)).astype(np.float32))
    edited = _edited(model, tmp_path)
    assert edited is not None
    assert "ReorderInput" not in [n.op_type for n in edited.graph.node]


def test_a_lookup_reshaped_to_a_constant_shape_stays_plain(tmp_path):
    """A constant shape back could come from a Reshape of the plane that onnxruntime merged into the lookup's:
    only ``Shape`` of the lookup's own input says the blocked shape is the one to restore."""
    model = _lookup_model(12, constant_shape=True)
    _check(model, np.random.default_rng(6).integers(-20, 21, (2, 5, 9, 9)).astype(np.float32))
    edited = _edited(model, tmp_path)
    assert edited is None or "ReorderInput" in [n.op_type for n in edited.graph.node]


def test_what_an_if_branch_reads_stays_in_the_plain_layout(tmp_path):
    """An ``If`` branch (the ESP32-S3 guard's exact check) reads the rounded tensor between the Convs: the
    blocked graph keeps a plain copy of it for the branch (a branch is not edited), so the graph loads and every
    output, the branch's flag included, equals the unoptimized graph's, whichever way the condition goes."""
    model = _model(12, ROUNDING, 7)
    graph = model.graph
    then_flag = helper.make_node("GreaterOrEqual", ["then_max", "five"], ["then_flag"])
    then_branch = helper.make_graph(
        [helper.make_node("ReduceMax", ["t2"], ["then_max"], keepdims=0), then_flag],
        "then",
        [],
        [helper.make_tensor_value_info("then_flag", onnx.TensorProto.BOOL, [])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["else_flag"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_flag", onnx.TensorProto.BOOL, [])],
    )
    graph.initializer.extend([numpy_helper.from_array(np.float32(v), n) for n, v in (("five", 5), ("limit", 40))])
    graph.node.extend(
        [
            helper.make_node("ReduceMax", ["c1"], ["peak"], keepdims=0),
            helper.make_node("GreaterOrEqual", ["peak", "limit"], ["cond"]),
            helper.make_node("If", ["cond"], ["flag"], then_branch=then_branch, else_branch=else_branch),
        ]
    )
    del graph.output[1:]
    graph.output.append(helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, None))
    rng = np.random.default_rng(8)
    edited = _edited(model, tmp_path)
    assert edited is not None and "ReorderInput" not in [n.op_type for n in edited.graph.node]
    loaded = create_session(edited, threads=1, optimize=False)  # no fallback: the edited graph itself
    names = [o.name for o in model.graph.output]
    for scale in (1, 30):  # small inputs: the branch is not taken; large ones: it is
        x = rng.integers(-scale, scale + 1, (2, 5, 9, 9)).astype(np.float32)
        _check(model, x)
        plain = create_session(model, threads=1, optimize=False).run(names, {"x": x})
        for a, b in zip(plain, loaded.run(names, {"x": x})):
            np.testing.assert_array_equal(a, b)


def test_a_failing_edit_keeps_the_working_session(monkeypatch):
    """No temporary folder (a read-only disk; a graph too large for protobuf fails the same way): the session
    that already runs the graph stays, and under STRICT (the tests) the failure is an error instead."""
    model = _model(12, ROUNDING, 9)
    current = create_session(model, threads=1)

    def unwritable(*args, **kwargs):
        raise OSError("read-only file system")

    monkeypatch.setattr(layout.tempfile, "TemporaryDirectory", unwritable)
    with pytest.raises(OSError):
        blocked_session(model, threads=1, what="a test graph", current=current)
    monkeypatch.setattr(layout, "STRICT", False)
    assert blocked_session(model, threads=1, what="a test graph", current=current) is current
