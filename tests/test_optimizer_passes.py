"""Unit tests for each optimizer pass, on tiny models built with onnx.helper and checked under onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from espquant.errors import OptionError
from espquant.graph import GraphView
from espquant.optimizer import optimize_model, optimize_model_with_report
from espquant.optimizer.batchnorm import batchnorm_to_mul_add, fold_batchnorm
from espquant.optimizer.cleanup import (
    eliminate_inference_dropout,
    name_nodes,
    reshape_prelu_slopes,
    sum_to_add,
    upgrade_opset,
)
from espquant.optimizer.constants import constants_to_initializers, fold_constants, remove_initializer_inputs
from espquant.optimizer.shapes import infer_shapes
from helpers import (
    assert_same_outputs,
    bn_node,
    bn_params,
    make_model,
    op_types,
    run,
    tensor,
)


def _x(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# --- BatchNormalization -------------------------------------------------------------------------------


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_batchnorm_into_gemm(rng, trans_b, with_bias):
    #   x(2,5) -> Gemm(W, [C], alpha=0.7, beta=1.3) -> BatchNormalization -> y(2,4)
    weight = _x(rng, 4, 5) if trans_b else _x(rng, 5, 4)
    inits = {"W": weight, **bn_params(rng, 4)}
    gemm_inputs = ["x", "W"]
    if with_bias:
        inits["C"] = _x(rng, 4)
        gemm_inputs.append("C")
    nodes = [
        helper.make_node("Gemm", gemm_inputs, ["g"], transB=trans_b, alpha=0.7, beta=1.3, name="gemm"),
        bn_node("g", "y"),
    ]
    model = make_model(nodes, [tensor("x", [2, 5])], [tensor("y", [2, 4])], inits)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    result = fold_batchnorm(folded)
    assert result.changes == 1
    assert op_types(folded) == ["Gemm"]
    assert_same_outputs(model, folded, {"x": _x(rng, 2, 5)})


def test_fold_batchnorm_into_grouped_conv_transpose(rng):
    #   x(1,4,5,5) -> ConvTranspose(group=2, W(4,3,3,3)) -> BatchNormalization(6) -> y
    inits = {"W": _x(rng, 4, 3, 3, 3), "B": _x(rng, 6), **bn_params(rng, 6)}
    nodes = [
        helper.make_node("ConvTranspose", ["x", "W", "B"], ["c"], group=2, strides=[2, 2], name="deconv"),
        bn_node("c", "y"),
    ]
    model = make_model(nodes, [tensor("x", [1, 4, 5, 5])], [tensor("y", None)], inits)
    optimized = optimize_model(model)
    assert op_types(optimized) == ["ConvTranspose"]
    assert_same_outputs(model, optimized, {"x": _x(rng, 1, 4, 5, 5)})


def test_fold_batchnorm_keeps_a_shared_weight_intact(rng):
    #   x -> Conv(W) -> BN -> y1 ;  x -> Conv(W) -> y2   (W shared: folding must not change y2)
    inits = {"W": _x(rng, 3, 2, 3, 3), **bn_params(rng, 3)}
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv_a"),
        bn_node("c", "y1"),
        helper.make_node("Conv", ["x", "W"], ["y2"], name="conv_b"),
    ]
    model = make_model(nodes, [tensor("x", [1, 2, 6, 6])], [tensor("y1", None), tensor("y2", None)], inits)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert fold_batchnorm(folded).changes == 1
    assert "BatchNormalization" not in op_types(folded)
    assert_same_outputs(model, folded, {"x": _x(rng, 1, 2, 6, 6)})


def test_batchnorm_not_folded_when_layer_output_has_other_readers(rng):
    inits = {"W": _x(rng, 3, 2, 1, 1), **bn_params(rng, 3)}
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        bn_node("c", "y1"),
        helper.make_node("Relu", ["c"], ["y2"], name="relu"),
    ]
    model = make_model(nodes, [tensor("x", [1, 2, 4, 4])], [tensor("y1", None), tensor("y2", None)], inits)
    optimized = optimize_model(model)
    # The Conv output feeds Relu too, so the BatchNormalization becomes Mul + Add instead of vanishing.
    assert "BatchNormalization" not in op_types(optimized)
    assert op_types(optimized).count("Conv") == 1
    assert_same_outputs(model, optimized, {"x": _x(rng, 1, 2, 4, 4)})


def test_lone_batchnorm_becomes_mul_add(rng):
    #   x(2,3,4,4) -> BatchNormalization -> y
    model = make_model([bn_node("x", "y")], [tensor("x", [2, 3, 4, 4])], [tensor("y", [2, 3, 4, 4])], bn_params(rng, 3))
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    infer_shapes(rewritten)
    assert batchnorm_to_mul_add(rewritten).changes == 1
    assert op_types(rewritten) == ["Mul", "Add"]
    scale = numpy_helper.to_array(next(t for t in rewritten.graph.initializer if t.name.endswith("_scale")))
    assert scale.shape == (3, 1, 1)
    assert_same_outputs(model, rewritten, {"x": _x(rng, 2, 3, 4, 4)})


def test_lone_batchnorm_with_unknown_rank_warns(rng):
    model = make_model([bn_node("x", "y")], [tensor("x", None)], [tensor("y", None)], bn_params(rng, 3))
    result = batchnorm_to_mul_add(model)
    assert result.changes == 0
    assert result.warnings and "rank unknown" in result.warnings[0]


# --- constants ------------------------------------------------------------------------------------------


def test_constants_to_initializers_handles_every_attribute_form():
    nodes = [
        helper.make_node("Constant", [], ["a"], value=numpy_helper.from_array(np.ones((2,), np.float32))),
        helper.make_node("Constant", [], ["b"], value_float=2.0),
        helper.make_node("Constant", [], ["c"], value_floats=[1.0, 2.0]),
        helper.make_node("Constant", [], ["d"], value_int=3),
        helper.make_node("Constant", [], ["e"], value_ints=[4, 5]),
        helper.make_node("Add", ["x", "a"], ["s1"]),
        helper.make_node("Mul", ["s1", "b"], ["s2"]),
        helper.make_node("Add", ["s2", "c"], ["y"]),
        helper.make_node("Add", ["d", "e"], ["z"]),
    ]
    model = make_model(nodes, [tensor("x", [2])], [tensor("y", [2]), tensor("z", [2], TensorProto.INT64)])
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    result = constants_to_initializers(converted)
    assert result.changes == 5
    assert "Constant" not in op_types(converted)
    x = np.array([1.0, -1.0], np.float32)
    for got, want in zip(run(converted, {"x": x}), run(model, {"x": x})):
        np.testing.assert_array_equal(got, want)


def test_fold_constants_turns_a_shape_chain_into_a_constant_target(rng):
    model = _view_chain_model(0, [2, 3, 4], [2, 12])
    optimized = optimize_model(model)
    assert op_types(optimized) == ["Reshape"]
    target = GraphView(optimized.graph).array(optimized.graph.node[0].input[1])
    np.testing.assert_array_equal(target, [2, -1])
    assert_same_outputs(model, optimized, {"x": _x(rng, 2, 3, 4)})


def test_fold_constants_skips_random_ops_and_graph_outputs():
    nodes = [
        helper.make_node("RandomUniform", [], ["r"], shape=[2], seed=1.0),
        helper.make_node("Add", ["x", "r"], ["y"]),
        helper.make_node("Mul", ["two", "two"], ["four"]),
    ]
    model = make_model(
        nodes,
        [tensor("x", [2])],
        [tensor("y", [2]), tensor("four", [1])],
        {"two": np.array([2.0], np.float32)},
    )
    result = fold_constants(model)
    assert result.changes == 0
    assert op_types(model) == ["RandomUniform", "Add", "Mul"]


def test_remove_initializer_inputs():
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [tensor("x", [2]), tensor("w", [2])],
        [tensor("y", [2])],
        [numpy_helper.from_array(np.ones(2, np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert remove_initializer_inputs(model).changes == 1
    assert [i.name for i in model.graph.input] == ["x"]
    assert remove_initializer_inputs(model).changes == 0


# --- cleanup ----------------------------------------------------------------------------------------------


def test_upgrade_opset_converts_old_models(rng):
    #   opset 11: Unsqueeze takes axes as an attribute; after conversion (13) as an input
    nodes = [helper.make_node("Unsqueeze", ["x"], ["u"], axes=[0]), helper.make_node("Relu", ["u"], ["y"])]
    model = make_model(nodes, [tensor("x", [3])], [tensor("y", [1, 3])], opset=11)
    upgraded = onnx.ModelProto()
    upgraded.CopyFrom(model)
    assert upgrade_opset(upgraded).changes == 1
    assert upgraded.opset_import[0].version == 13
    unsqueeze = next(n for n in upgraded.graph.node if n.op_type == "Unsqueeze")
    assert len(unsqueeze.input) == 2
    assert_same_outputs(model, upgraded, {"x": _x(rng, 3)})
    assert upgrade_opset(upgraded).changes == 0


def test_inference_dropout_is_removed_even_when_it_feeds_the_output(rng):
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Dropout", ["r", "ratio"], ["d"]),
        helper.make_node("Dropout", ["d"], ["y"]),
    ]
    model = make_model(nodes, [tensor("x", [4])], [tensor("y", [4])], {"ratio": np.array(0.5, np.float32)})
    cleaned = onnx.ModelProto()
    cleaned.CopyFrom(model)
    assert eliminate_inference_dropout(cleaned).changes == 2
    assert op_types(cleaned) == ["Relu"]
    assert cleaned.graph.node[0].output[0] == "y"
    assert_same_outputs(model, cleaned, {"x": _x(rng, 4)})


def test_training_dropout_is_kept():
    nodes = [helper.make_node("Dropout", ["x", "ratio", "train"], ["y"])]
    model = make_model(
        nodes,
        [tensor("x", [4]), tensor("train", [], TensorProto.BOOL)],
        [tensor("y", [4])],
        {"ratio": np.array(0.5, np.float32)},
    )
    assert eliminate_inference_dropout(model).changes == 0


def test_sum_of_two_becomes_add(rng):
    nodes = [helper.make_node("Sum", ["x", "x2"], ["y"]), helper.make_node("Sum", ["x", "x2", "x"], ["z"])]
    model = make_model(nodes, [tensor("x", [3]), tensor("x2", [3])], [tensor("y", [3]), tensor("z", [3])])
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    assert sum_to_add(changed).changes == 1
    assert op_types(changed) == ["Add", "Sum"]
    assert_same_outputs(model, changed, {"x": _x(rng, 3), "x2": _x(rng, 3)})


def test_prelu_slope_gets_channel_shape(rng):
    model = make_model(
        [helper.make_node("PRelu", ["x", "slope"], ["y"])],
        [tensor("x", [1, 3, 4, 5])],
        [tensor("y", [1, 3, 4, 5])],
        {"slope": rng.uniform(0, 1, (1, 3, 1, 1)).astype(np.float32)},
    )
    reshaped = onnx.ModelProto()
    reshaped.CopyFrom(model)
    infer_shapes(reshaped)
    assert reshape_prelu_slopes(reshaped).changes == 1
    assert GraphView(reshaped.graph).array("slope").shape == (3, 1, 1)
    assert_same_outputs(model, reshaped, {"x": _x(rng, 1, 3, 4, 5)})


def test_prelu_flat_per_channel_slope_is_repaired(rng):
    # A (C,) slope on NCHW broadcasts over W in ONNX; with W != C it cannot run, so it is meant per channel.
    slope = rng.uniform(0, 1, 3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("PRelu", ["x", "slope"], ["y"])],
        "g",
        [tensor("x", [1, 3, 4, 5])],
        [tensor("y", [1, 3, 4, 5])],
        [numpy_helper.from_array(slope, "slope")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    infer_shapes(model)
    assert reshape_prelu_slopes(model).changes == 1
    x = _x(rng, 1, 3, 4, 5)
    expected = np.where(x >= 0, x, x * slope[None, :, None, None])
    np.testing.assert_allclose(run(model, {"x": x})[0], expected, rtol=1e-6)


def test_prelu_ambiguous_flat_slope_is_left_with_a_warning(rng):
    model = make_model(
        [helper.make_node("PRelu", ["x", "slope"], ["y"])],
        [tensor("x", [1, 3, 4, 3])],
        [tensor("y", [1, 3, 4, 3])],
        {"slope": rng.uniform(0, 1, 3).astype(np.float32)},
    )
    infer_shapes(model)
    result = reshape_prelu_slopes(model)
    assert result.changes == 0
    assert result.warnings and "same size as the channel axis" in result.warnings[0]


def test_name_nodes_is_unique_stable_and_idempotent():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"], name="r"),
        helper.make_node("Relu", ["b"], ["y"], name="r"),
    ]
    model = make_model(nodes, [tensor("x", [2])], [tensor("y", [2])])
    assert name_nodes(model).changes == 2
    names = [n.name for n in model.graph.node]
    assert len(set(names)) == 3 and all(names) and names[1] == "r"
    assert name_nodes(model).changes == 0
    assert [n.name for n in model.graph.node] == names


# --- onnxoptimizer passes through the pipeline -----------------------------------------------------------


def test_pad_bias_matmul_and_transpose_fusions(rng):
    #   x -> Pad(zeros) -> Conv(W) -> Add(bias c) -> Flatten -> MatMul(M) -> Add(b) -> y
    #   x2 -> Transpose -> Gemm(K) -> z
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], mode="constant"),
        helper.make_node("Conv", ["p", "W"], ["c"]),
        helper.make_node("Add", ["c", "cb"], ["cba"]),
        helper.make_node("Flatten", ["cba"], ["f"]),
        helper.make_node("MatMul", ["f", "M"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["y"]),
        helper.make_node("Transpose", ["x2"], ["t"], perm=[1, 0]),
        helper.make_node("Gemm", ["t", "K"], ["z"]),
    ]
    inits = {
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
        "W": _x(rng, 2, 3, 3, 3),
        "cb": _x(rng, 1, 2, 1, 1),
        "M": _x(rng, 2 * 4 * 4, 5),
        "b": _x(rng, 5),
        "K": _x(rng, 3, 4),
    }
    model = make_model(
        nodes,
        [tensor("x", [1, 3, 4, 4]), tensor("x2", [3, 2])],
        [tensor("y", [1, 5]), tensor("z", [2, 4])],
        inits,
    )
    optimized, report = optimize_model_with_report(model)
    assert op_types(optimized) == ["Conv", "Flatten", "Gemm", "Gemm"]
    for name in (
        "fuse_pad_into_conv",
        "fuse_add_bias_into_conv",
        "fuse_matmul_add_bias_into_gemm",
        "fuse_transpose_into_gemm",
        "eliminate_deadend",
    ):
        assert report.changes_of(name) > 0, name
    assert_same_outputs(model, optimized, {"x": _x(rng, 1, 3, 4, 4), "x2": _x(rng, 3, 2)})


def test_duplicate_large_initializers_are_merged_with_their_real_values(rng):
    weight = _x(rng, 8, 4, 3, 3)  # 288 elements; the copy makes a duplicate of > 1024 bytes' worth
    big = _x(rng, 64, 64)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["a"]),
        helper.make_node("Conv", ["x", "W2"], ["b"]),
        helper.make_node("MatMul", ["m", "B1"], ["c"]),
        helper.make_node("MatMul", ["m", "B2"], ["d"]),
    ]
    model = make_model(
        nodes,
        [tensor("x", [1, 4, 5, 5]), tensor("m", [2, 64])],
        [tensor(n, None) for n in "abcd"],
        {"W1": weight, "W2": weight.copy(), "B1": big, "B2": big.copy()},
    )
    optimized, report = optimize_model_with_report(model)
    assert len(optimized.graph.initializer) == 2
    assert report.changes_of("eliminate_duplicate_initializer") == 2
    assert_same_outputs(model, optimized, {"x": _x(rng, 1, 4, 5, 5), "m": _x(rng, 2, 64)})


# --- the pipeline -------------------------------------------------------------------------------------------


def test_optimizing_twice_changes_nothing(rng):
    inits = {"W": _x(rng, 4, 3, 3, 3), "B": _x(rng, 4), **bn_params(rng, 4)}
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        bn_node("c", "bn"),
        helper.make_node("Relu", ["bn"], ["y"]),
    ]
    model = make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", None)], inits)
    once = optimize_model(model)
    twice, report = optimize_model_with_report(once)
    assert report.total_changes == 0
    assert twice.SerializeToString() == once.SerializeToString()


def test_optimize_model_leaves_its_argument_alone(rng):
    inits = {"W": _x(rng, 4, 3, 1, 1), **bn_params(rng, 4)}
    model = make_model(
        [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y")],
        [tensor("x", [1, 3, 2, 2])],
        [tensor("y", None)],
        inits,
    )
    before = model.SerializeToString()
    optimize_model(model)
    assert model.SerializeToString() == before


def test_unknown_pass_name_is_an_option_error():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", [2])], [tensor("y", [2])])
    with pytest.raises(OptionError, match="fold_everything.*Valid passes: upgrade_opset"):
        optimize_model(model, passes=["fold_everything"])


def test_selected_passes_only(rng):
    inits = {"W": _x(rng, 4, 3, 1, 1), **bn_params(rng, 4)}
    model = make_model(
        [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y")],
        [tensor("x", [1, 3, 2, 2])],
        [tensor("y", None)],
        inits,
    )
    untouched = optimize_model(model, passes=["name_nodes"])
    assert "BatchNormalization" in op_types(untouched)
    folded = optimize_model(model, passes=["fold_batchnorm"])
    assert op_types(folded) == ["Conv"]


def test_input_normalisation_is_warned_about(rng):
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["s"], name="sub_mean"),
        helper.make_node("Div", ["s", "std"], ["n"]),
        helper.make_node("Relu", ["n"], ["y"]),
    ]
    model = make_model(
        nodes,
        [tensor("x", [1, 3])],
        [tensor("y", [1, 3])],
        {"mean": np.full(3, 0.5, np.float32), "std": np.full(3, 0.2, np.float32)},
    )
    _, report = optimize_model_with_report(model)
    assert any("sub_mean" in w and "normalis" in w for w in report.warnings)


def _view_chain_model(axis: int, input_shape, output_shape) -> onnx.ModelProto:
    """x -> Shape -> Gather(axis) -> Unsqueeze -> Concat(., [-1]) -> Reshape(x, .) -> y

    With axis 0 this is PyTorch's ``x.view(x.size(0), -1)``."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "index"], ["dim"], axis=0),
        helper.make_node("Unsqueeze", ["dim", "axes"], ["dim1"]),
        helper.make_node("Concat", ["dim1", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = {
        "index": np.array(axis, np.int64),
        "axes": np.array([0], np.int64),
        "minus_one": np.array([-1], np.int64),
    }
    return make_model(nodes, [tensor("x", input_shape)], [tensor("y", output_shape)], inits)


def test_dynamic_batch_view_chain_folds_to_a_copy_target(rng):
    model = _view_chain_model(0, ["N", 3, 4], ["N", 12])
    optimized, report = optimize_model_with_report(model)
    assert op_types(optimized) == ["Reshape"]
    assert report.changes_of("reshape_copy_dims") == 1
    np.testing.assert_array_equal(GraphView(optimized.graph).array(optimized.graph.node[0].input[1]), [0, -1])
    for batch in (1, 5):
        assert_same_outputs(model, optimized, {"x": _x(rng, batch, 3, 4)})


def test_reshape_target_from_another_axis_is_left_alone(rng):
    # Position 0 of the target takes x.shape[1]: a 0 there would copy axis 0 instead, so no rewrite.
    model = _view_chain_model(1, ["N", 3, 4], [3, "M"])
    optimized, report = optimize_model_with_report(model)
    assert report.changes_of("reshape_copy_dims") == 0
    assert_same_outputs(model, optimized, {"x": _x(rng, 2, 3, 4)})
