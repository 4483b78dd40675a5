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
from espquant.simulator.layout import blocked_session, keep_blocked


def _model(channels: int, tail: list[tuple[str, list]], seed: int) -> onnx.ModelProto:
    """x -> Conv 3x3 -> ``tail`` (op, constant inputs: None for the running tensor, "skip" for the first Conv's
    output) -> Conv 1x1 -> y; integer weights."""
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
        nodes.append(helper.make_node(op, inputs, [f"t{index}"]))
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


def test_the_edit_drops_the_reorders_around_the_rounding(tmp_path):
    edited = _edited(_model(12, ROUNDING, 0), tmp_path)
    assert edited is not None
    ops = [node.op_type for node in edited.graph.node]
    assert "ReorderInput" not in ops[1:]  # only the graph input is reordered
    # the rounded tensor is a graph output: one ReorderOutput after the Clip, one for y
    assert ops.count("ReorderOutput") == 2


@pytest.mark.parametrize(
    "tail",
    [
        [("Floor", []), ("Add", [np.arange(12).reshape(1, 12, 1, 1)]), ("Round", [])],  # per-channel: not moved
        [("Floor", []), ("Add", ["skip"]), ("Clip", [0.0, 6.0])],  # a residual Add of two blocked tensors
        [("Abs", []), ("Sqrt", []), ("Floor", [])],  # Sqrt may make NaN from padding lanes: not moved
    ],
)
def test_only_elementwise_ops_on_blocked_inputs_move(tail, tmp_path):
    model = _model(12, tail, 3)
    _check(model, np.random.default_rng(3).integers(-20, 21, (2, 5, 9, 9)).astype(np.float32))
    edited = _edited(model, tmp_path)
    moved = {n.op_type for n in edited.graph.node if n.output[0].endswith("::blocked")} if edited else set()
    if tail[2][0] == "Round":
        assert moved == {"Floor"}
    elif tail[1][0] == "Add":
        assert moved == {"Floor", "Add", "Clip"}
    else:
        assert "Sqrt" not in moved and "Floor" not in moved
