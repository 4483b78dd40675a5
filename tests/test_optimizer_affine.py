"""Constant affine steps folded into the Conv / Gemm beside them (optimizer/affine.py), checked in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from espquant.optimizer import optimize_model
from espquant.optimizer.affine import fold_affine
from helpers import assert_same_outputs, make_model, op_types, tensor

n = helper.make_node


def _x(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _lcnet_block(rng, second_pads: int) -> onnx.ModelProto:
    """PP-LCNet / PP-OCRv4's learnable affine blocks, as paddle2onnx writes them (scalar first operands):
    Conv -> Mul(a) -> Add(b) -> HardSwish -> Mul(c) -> Add(d) -> Conv."""
    nodes = [
        n("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        n("Mul", ["a", "c1"], ["m1"], name="mul1"),
        n("Add", ["m1", "b"], ["a1"], name="add1"),
        n("HardSwish", ["a1"], ["h"], name="hswish"),
        n("Mul", ["c", "h"], ["m2"], name="mul2"),
        n("Add", ["m2", "d"], ["a2"], name="add2"),
        n("Conv", ["a2", "W2", "B2"], ["y"], pads=[second_pads] * 4, name="conv2"),
    ]
    k = 2 * second_pads + 1
    inits = {
        "W1": _x(rng, 6, 3, 3, 3),
        "B1": _x(rng, 6),
        "W2": _x(rng, 5, 6, k, k),
        "B2": _x(rng, 5),
        "a": np.array([0.507], np.float32),
        "b": np.array([-1.18], np.float32),
        "c": np.array([4.77], np.float32),
        "d": np.array([1.36], np.float32),
    }
    return make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", None)], inits, opset=14)


def test_affine_blocks_around_a_hardswish_fold_into_both_convs(rng):
    model = _lcnet_block(rng, second_pads=0)
    optimized = optimize_model(model)
    assert op_types(optimized) == ["Conv", "HardSwish", "Conv"]
    assert_same_outputs(model, optimized, {"x": _x(rng, 2, 3, 8, 8)})


def test_before_a_padded_conv_the_scale_folds_and_the_shift_stays(rng):
    # zero padding of x + d would read 0 where the float model reads d: the shift stays, as d / c, before the
    # scale, so the scale still folds into the padded Conv
    model = _lcnet_block(rng, second_pads=1)
    optimized = optimize_model(model)
    assert op_types(optimized) == ["Conv", "HardSwish", "Add", "Conv"]
    assert_same_outputs(model, optimized, {"x": _x(rng, 2, 3, 8, 8)})


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_div_and_sub_after_and_a_mul_before(rng, trans_b):
    weight = _x(rng, 4, 5) if trans_b else _x(rng, 5, 4)
    nodes = [
        n("Mul", ["x", "s"], ["xs"], name="scale_in"),
        n("Add", ["xs", "t"], ["xt"], name="shift_in"),
        n("Gemm", ["xt", "W", "C"], ["g"], transB=trans_b, name="fc"),
        n("Div", ["g", "q"], ["gd"], name="div"),
        n("Sub", ["gd", "r"], ["y"], name="sub"),
    ]
    inits = {
        "W": weight,
        "C": _x(rng, 4),
        "s": rng.uniform(0.5, 2, 5).astype(np.float32),
        "t": _x(rng, 5),
        "q": rng.uniform(0.5, 2, (1, 4)).astype(np.float32),
        "r": _x(rng, 4),
    }
    model = make_model(nodes, [tensor("x", ["N", 5])], [tensor("y", ["N", 4])], inits)
    optimized = optimize_model(model)
    assert op_types(optimized) == ["Gemm"]
    assert_same_outputs(model, optimized, {"x": _x(rng, 3, 5)})


def test_input_normalisation_folds_into_a_grouped_first_conv(rng):
    # a network's own (x - mean) / std before an unpadded grouped Conv: per input channel, through the groups
    nodes = [
        n("Sub", ["x", "mean"], ["centred"], name="sub"),
        n("Div", ["centred", "std"], ["normed"], name="div"),
        n("Conv", ["normed", "W"], ["y"], group=2, name="conv"),
    ]
    inits = {
        "mean": rng.uniform(0, 1, (1, 4, 1, 1)).astype(np.float32),
        "std": rng.uniform(0.2, 0.5, (1, 4, 1, 1)).astype(np.float32),
        "W": _x(rng, 6, 2, 3, 3),
    }
    model = make_model(nodes, [tensor("x", ["N", 4, 7, 7])], [tensor("y", None)], inits)
    optimized = optimize_model(model)
    assert op_types(optimized) == ["Conv"]
    assert_same_outputs(model, optimized, {"x": _x(rng, 2, 4, 7, 7)})


def test_what_does_not_fold_is_left_alone(rng):
    nodes = [
        n("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        n("Mul", ["c", "spatial"], ["m"], name="mul_spatial"),  # varies over H, W: not per channel
        n("Add", ["m", "d"], ["a"], name="add_before_padded"),  # no scale before it, and the next Conv pads
        n("Conv", ["a", "W2"], ["y1"], pads=[1, 1, 1, 1], name="conv2"),
        n("Mul", ["a", "k"], ["y2"], name="mul_read_twice"),  # its input is also read by conv2
    ]
    inits = {
        "W": _x(rng, 3, 3, 3, 3),
        "spatial": _x(rng, 1, 1, 6, 6),
        "d": _x(rng, 3, 1, 1),
        "W2": _x(rng, 2, 3, 3, 3),
        "k": np.array([2.0], np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 3, 6, 6])], [tensor("y1", None), tensor("y2", None)], inits)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    assert fold_affine(copy).changes == 0
    assert op_types(copy) == op_types(model)


def test_a_weight_shared_with_another_conv_is_not_changed_behind_its_back(rng):
    nodes = [
        n("Conv", ["x", "W"], ["c"], name="conv_a"),
        n("Mul", ["c", "s"], ["y1"], name="mul"),
        n("Conv", ["x", "W"], ["y2"], name="conv_b"),
    ]
    inits = {"W": _x(rng, 3, 2, 1, 1), "s": rng.uniform(0.5, 2, (3, 1, 1)).astype(np.float32)}
    model = make_model(nodes, [tensor("x", ["N", 2, 4, 4])], [tensor("y1", None), tensor("y2", None)], inits)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    assert fold_affine(copy).changes == 1
    assert op_types(copy) == ["Conv", "Conv"] and copy.graph.node[0].input[1] != "W"
    assert_same_outputs(model, copy, {"x": _x(rng, 2, 2, 4, 4)})


@settings(max_examples=25, deadline=None)
@given(
    group=st.sampled_from([1, 2, 4]),
    pads=st.integers(0, 1),
    scale_shape=st.sampled_from(["scalar", "channel", "batch_channel"]),
    negative=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_folding_scale_and_shift_before_a_conv_keeps_the_float_result(group, pads, scale_shape, negative, seed):
    rng = np.random.default_rng(seed)
    channels = 4
    shape = {"scalar": (1,), "channel": (channels, 1, 1), "batch_channel": (1, channels, 1, 1)}[scale_shape]
    scale = rng.uniform(0.3, 3.0, shape).astype(np.float32) * (-1 if negative else 1)
    nodes = [
        n("Relu", ["x"], ["r"], name="relu"),
        n("Mul", ["r", "s"], ["m"], name="mul"),
        n("Add", ["m", "d"], ["a"], name="add"),
        n("Conv", ["a", "W", "B"], ["y"], group=group, pads=[pads] * 4, name="conv"),
    ]
    inits = {
        "s": scale,
        "d": _x(rng, channels, 1, 1),
        "W": _x(rng, 4, channels // group, 3, 3),
        "B": _x(rng, 4),
    }
    model = make_model(nodes, [tensor("x", ["N", channels, 6, 6])], [tensor("y", None)], inits)
    optimized = optimize_model(model)
    assert "Mul" not in op_types(optimized)
    assert op_types(optimized).count("Add") == pads  # the shift stays only before a padded Conv
    assert_same_outputs(model, optimized, {"x": _x(rng, 2, channels, 6, 6)}, rtol=1e-4)
