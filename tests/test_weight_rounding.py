"""Weight rounding by layer output (issue 14, ``calibration/weight_rounding.py``).

Hand-worked: two taps that always see the same input, ``w = (0.6, 0.6)`` on a grid of 1. Nearest rounding
gives ``(1, 1)``, an output off by ``0.8 x``; ``(0, 1)`` is off by ``-0.2 x``, the best the two integers can do
(``(1, 0)`` ties), and the first sweep finds it. Properties: every integer is the weight rounded down or up,
and the quadratic never exceeds nearest rounding's. The Conv patches are checked against onnxruntime's Conv.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from espquant.calibration.engine import calibrate_model
from espquant.calibration.weight_rounding import choose_rounding, layer_patches
from espquant.cli import main
from espquant.graph import opset_version
from espquant.quant.profiles import get_target
from espquant.simulator.lowering import build_quantized_model
from espquant.simulator.simulate import simulate
from espquant.table import QuantTable, graph_hash
from helpers import make_model, run, tensor


def _quadratic(q, weights, step, hessian, linear):
    delta = q * step - weights
    value = np.einsum("gok,gkl,gol->", delta, hessian, delta)
    return value - (2 * np.einsum("gok,gok->", delta, linear) if linear is not None else 0.0)


def test_two_taps_seeing_the_same_input_round_apart():
    weights = np.array([[[0.6, 0.6]]])
    hessian = np.array([[[1.0, 1.0], [1.0, 1.0]]])
    q = choose_rounding(weights, np.ones((1, 1, 1)), hessian, None, -128, 127)
    np.testing.assert_array_equal(q, [[[0, 1]]])
    assert _quadratic(q, weights, 1.0, hessian, None) == pytest.approx(0.04)
    assert _quadratic(np.ones((1, 1, 2)), weights, 1.0, hessian, None) == pytest.approx(0.64)


def test_the_integer_range_bounds_the_choice():
    """127.4 may round down to 127 but never up to 128 at int8."""
    weights = np.array([[[127.4, -0.6]]])
    hessian = np.array([[[1.0, -1.0], [-1.0, 1.0]]])  # the taps see opposite inputs: both want to go up
    q = choose_rounding(weights, np.ones((1, 1, 1)), hessian, None, -128, 127)
    assert q[0, 0, 0] == 127 and q[0, 0, 1] in (-1, 0)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    groups=st.integers(1, 3),
    rows=st.integers(1, 4),
    taps=st.integers(1, 12),
    exponent=st.integers(-8, 2),
    with_linear=st.booleans(),
)
def test_rounding_is_down_or_up_and_never_worse_than_nearest(seed, groups, rows, taps, exponent, with_linear):
    rng = np.random.default_rng(seed)
    step = np.full((groups, rows, 1), 2.0**exponent)
    weights = rng.normal(0, 40 * 2.0**exponent, (groups, rows, taps))
    factor = rng.normal(0, 1, (groups, taps + 2, taps))
    hessian = factor.transpose(0, 2, 1) @ factor  # a covariance: positive semi-definite
    linear = rng.normal(0, 2.0**exponent, (groups, rows, taps)) if with_linear else None
    q = choose_rounding(weights, step, hessian, linear, -128, 127)
    ratio = weights / step
    assert np.all((q == np.clip(np.floor(ratio), -128, 127)) | (q == np.clip(np.ceil(ratio), -128, 127)))
    assert np.all((q >= -128) & (q <= 127))
    nearest = np.clip(np.round(ratio), -128, 127)
    chosen = _quadratic(q, weights, step, hessian, linear)
    assert chosen <= _quadratic(nearest, weights, step, hessian, linear) + 1e-9 * (1 + abs(chosen))


@pytest.mark.parametrize(
    "attrs",
    [
        {"pads": [1, 1, 1, 1]},
        {"pads": [0, 2, 1, 0], "strides": [2, 1]},
        {"pads": [2, 2, 2, 2], "dilations": [2, 2]},
        {"pads": [1, 1, 1, 1], "group": 6},
        {"group": 2, "strides": [2, 2]},
    ],
)
def test_patches_reproduce_onnxruntime_conv(rng, attrs):
    groups = attrs.get("group", 1)
    weight = rng.normal(0, 1, (6, 6 // groups, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], **attrs)
    model = make_model([node], [tensor("x", ["N", 6, 9, 8])], [tensor("y", None)], {"w": weight})
    x = rng.normal(0, 1, (2, 6, 9, 8)).astype(np.float32)
    (expected,) = run(model, {"x": x})
    (patches,) = layer_patches([x], node, opset_version(model), rows=10**6)  # [G, N * Ho * Wo, taps]
    rows = weight.reshape(groups, 6 // groups, -1)
    got = patches @ rows.transpose(0, 2, 1)  # [G, positions, O / G]
    n, _, height, width = expected.shape
    got = got.transpose(1, 0, 2).reshape(n, height, width, 6).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _model(rng) -> onnx.ModelProto:
    """x -> Conv 3x3 -> Relu -> depthwise 3x3 (channels of very different ranges) -> Flatten -> Gemm -> y."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["d"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Flatten", ["d"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"]),
    ]
    inits = {
        "w1": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.1, 8).astype(np.float32),
        "w2": (rng.normal(0, 0.3, (8, 1, 3, 3)) * rng.uniform(0.02, 1.0, (8, 1, 1, 1))).astype(np.float32),
        "w3": rng.normal(0, 0.05, (8 * 6 * 6, 10)).astype(np.float32),
        "b3": rng.normal(0, 0.1, 10).astype(np.float32),
    }
    return make_model(nodes, [tensor("x", ["N", 3, 6, 6])], [tensor("y", ["N", 10])], inits)


def test_calibration_rounds_weights_onto_the_grid_and_the_layers_gain(rng):
    model = _model(rng)
    x = rng.normal(0.5, 1.0, (256, 3, 6, 6)).astype(np.float32)
    plain = calibrate_model(model, x, 8, "per-tensor", "minmax")
    rounded = calibrate_model(model, x, 8, "per-tensor", "minmax", weight_rounding=True)
    assert rounded.transforms == ["weight_rounding"] and rounded.table.metadata["weight_rounding"] is True
    assert rounded.table.metadata["graph_hash"] == graph_hash(rounded.model) != graph_hash(model)
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in rounded.model.graph.initializer}
    # The Gemm reads 288 inputs per output and sees 32 search samples: fewer than 4 per tap, so it is left as is.
    np.testing.assert_array_equal(after["w3"], before["w3"])
    moved = 0
    for name in ("w1", "w2"):
        exponent = rounded.table.exponents[name]
        assert exponent == plain.table.exponents[name]
        grid = after[name] / 2.0**exponent
        np.testing.assert_array_equal(grid, np.round(grid))  # on the chip's grid: the chip keeps these integers
        assert np.all(np.abs(after[name] - before[name]) < 2.0**exponent)  # down or up, never further
        moved += int((grid != np.round(before[name] / 2.0**exponent)).sum())
    assert moved > 0

    def first_layer_error(result) -> float:
        """The depthwise layer's output on the calibration samples, simulated against the float model."""
        quantized = build_quantized_model(result.model, result.table, get_target("esp32s3"), 8)
        quantized.outputs = ["d"]
        (simulated,), _ = simulate(quantized, result.model, x[:32], to_float=True)
        exposed = onnx.ModelProto()
        exposed.CopyFrom(model)
        exposed.graph.output.append(helper.make_tensor_value_info("d", onnx.TensorProto.FLOAT, None))
        reference = run(exposed, {"x": x[:32]})[1]
        return float(np.mean((simulated - reference) ** 2))

    assert first_layer_error(rounded) < first_layer_error(plain)


def test_auto_keeps_the_rounding_only_when_the_outputs_gain(rng):
    model = _model(rng)
    x = rng.normal(0.5, 1.0, (128, 3, 6, 6)).astype(np.float32)
    result = calibrate_model(model, x, 8, "per-tensor", "auto", weight_rounding=True)
    kept = "weight_rounding" in result.transforms
    assert result.table.metadata["weight_rounding"] is kept
    assert (graph_hash(result.model) != graph_hash(model)) is kept
    assert result.table.metadata["graph_hash"] == graph_hash(result.model)


def test_cli_weight_rounding_writes_the_model_the_table_is_for(rng, tmp_path):
    onnx.save(_model(rng), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", rng.normal(0.5, 1.0, (128, 3, 6, 6)).astype(np.float32))
    args = ["calibrate", tmp_path / "m.onnx", "--data", tmp_path / "x.npy", "--method", "minmax", "--weight-rounding"]
    result = CliRunner().invoke(main, [str(a) for a in [*args, "-o", tmp_path / "t.pickle"]])
    assert result.exit_code == 0, result.output
    written = tmp_path / "t_model.onnx"
    table = QuantTable.load(tmp_path / "t.pickle")
    assert table.metadata["model_transforms"] == ["weight_rounding"]
    assert table.metadata["graph_hash"] == graph_hash(onnx.load(written))


def test_bias_correction_after_rounding_corrects_only_the_layers_left_at_nearest(rng):
    """With both asked for a fixed method, rounding goes first: its layers keep the bias it chose (their weights
    are on the grid, nothing left to correct) and bias correction moves only the Gemm rounding left alone."""
    model = _model(rng)
    x = rng.normal(0.5, 1.0, (256, 3, 6, 6)).astype(np.float32)
    rounded = calibrate_model(model, x, 8, "per-tensor", "minmax", weight_rounding=True)
    both = calibrate_model(model, x, 8, "per-tensor", "minmax", weight_rounding=True, bias_correction=True)
    assert both.transforms == ["weight_rounding", "bias_correction"]
    alone = {t.name: numpy_helper.to_array(t) for t in rounded.model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in both.model.graph.initializer}
    assert alone.keys() == after.keys()
    for name in alone:
        if name == "b3":
            assert not np.array_equal(after[name], alone[name])  # the Gemm's mean shift, taken out
        else:
            np.testing.assert_array_equal(after[name], alone[name])
