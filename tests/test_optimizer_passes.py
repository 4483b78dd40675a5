"""Unit tests for each optimizer pass, on tiny models built with onnx.helper and checked under onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from espquant.checker import check_model
from espquant.errors import OptionError
from espquant.graph import GraphView
from espquant.optimizer import optimize_model, optimize_model_with_report
from espquant.optimizer.activations import fuse_hard_sigmoid
from espquant.optimizer.batchnorm import batchnorm_to_mul_add, fold_batchnorm
from espquant.optimizer.cleanup import (
    eliminate_inference_dropout,
    name_nodes,
    reshape_prelu_slopes,
    sum_to_add,
    upgrade_opset,
)
from espquant.optimizer.constants import constants_to_initializers, fold_constants, remove_initializer_inputs
from espquant.optimizer.pooling import rewrite_ceil_mode_pools
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


@pytest.mark.parametrize("taken", ["10", "11", "12", "13", "14"])
def test_batchnorm_folds_when_the_graph_uses_numbered_names(rng, taken):
    """torch names tensors "82", "83" ...; onnxoptimizer's batch-norm fusion names its copies of the parameters
    "10" ... "14" whatever the graph holds: a clash made an invalid graph. Its result is refused and our own
    fold does the work."""
    inits = {"W": _x(rng, 3, 2, 3, 3), **bn_params(rng, 3)}
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", kernel_shape=[3, 3]),
        bn_node("c", "b"),
        helper.make_node("Relu", ["b"], [taken], name="relu"),
    ]
    model = make_model(nodes, [tensor("x", ["N", 2, 6, 6])], [tensor(taken, None)], inits)
    optimized, report = optimize_model_with_report(model)
    assert op_types(optimized) == ["Conv", "Relu"]
    assert_same_outputs(model, optimized, {"x": _x(rng, 2, 2, 6, 6)})


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


def test_skl2onnx_cast_of_a_float_input_to_float_is_removed(rng):
    # skl2onnx: X(?, 64) -> Cast(to=FLOAT) -> MatMul -> Add -> Softmax; a Cast to INT64 would change values: kept.
    nodes = [
        helper.make_node("Cast", ["X"], ["cast_input"], to=TensorProto.FLOAT, name="Cast"),
        helper.make_node("MatMul", ["cast_input", "coefficient"], ["mul_result"], name="MatMul"),
        helper.make_node("Add", ["mul_result", "intercepts"], ["add_result"], name="Add"),
        helper.make_node("Softmax", ["add_result"], ["probabilities"], name="Softmax"),
        helper.make_node("Cast", ["probabilities"], ["rounded"], to=TensorProto.INT64, name="ToInt"),
    ]
    inits = {"coefficient": _x(rng, 64, 10), "intercepts": _x(rng, 10)}
    outputs = [tensor("probabilities", [None, 10]), tensor("rounded", [None, 10], TensorProto.INT64)]
    model = make_model(nodes, [tensor("X", [None, 64])], outputs, inits)
    optimized, report = optimize_model_with_report(model)
    assert report.changes_of("nop_cast_to_identity") == 1
    assert op_types(optimized) == ["Gemm", "Softmax", "Cast"]
    assert_same_outputs(model, optimized, {"X": _x(rng, 3, 64)})


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
    ):
        assert report.changes_of(name) > 0, name
    assert_same_outputs(model, optimized, {"x": _x(rng, 1, 3, 4, 4), "x2": _x(rng, 3, 2)})


def test_dead_nodes_are_removed(rng):
    #   x -> Relu -> y ;  x -> Sigmoid -> (read by nothing)
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Sigmoid", ["x"], ["unused"])]
    model = make_model(nodes, [tensor("x", [2, 3])], [tensor("y", [2, 3])])
    optimized, report = optimize_model_with_report(model)
    assert op_types(optimized) == ["Relu"]
    assert report.changes_of("eliminate_deadend") == 1


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


def test_pytorch_view_with_constant_nodes_keeps_its_scalar_index(rng):
    # torch.onnx's x.view(x.shape[0], -1) after a permute (MTCNN's RNet / ONet): the Gather index is a scalar
    # Constant node and the Unsqueeze axes a [0] one. Turned into initializers, the scalar must stay a scalar
    # (it became shape (1,), then the Concat of ranks 2 and 1 made the optimized model invalid).
    n = helper.make_node
    nodes = [
        n("Transpose", ["x"], ["t"], perm=[0, 3, 2, 1], name="permute"),
        n("Shape", ["t"], ["shape"], name="shape"),
        n("Constant", [], ["index"], value=numpy_helper.from_array(np.array(0, np.int64)), name="c0"),
        n("Gather", ["shape", "index"], ["batch"], axis=0, name="gather"),
        n("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([0], np.int64)), name="c1"),
        n("Unsqueeze", ["batch", "axes"], ["batch1"], name="unsqueeze"),
        n("Constant", [], ["minus_one"], value=numpy_helper.from_array(np.array([-1], np.int64)), name="c2"),
        n("Concat", ["batch1", "minus_one"], ["target"], axis=0, name="concat"),
        n("Reshape", ["t", "target"], ["y"], name="view"),
    ]
    model = make_model(nodes, [tensor("x", ["batch", 4, 3, 3])], [tensor("y", ["batch", 36])])
    optimized, report = optimize_model_with_report(model)
    assert report.changes_of("reshape_copy_dims") == 1
    assert op_types(optimized) == ["Transpose", "Reshape"]
    assert check_model(optimized, target="esp32s3", bits="int8", strict=False).ok
    for batch in (1, 3):
        assert_same_outputs(model, optimized, {"x": _x(rng, batch, 4, 3, 3)})


def test_constants_to_initializers_keeps_scalars_scalar():
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(7.0, np.float32))),
        helper.make_node("Add", ["x", "c"], ["y"]),
    ]
    model = make_model(nodes, [tensor("x", [2])], [tensor("y", [2])])
    constants_to_initializers(model)
    assert [list(t.dims) for t in model.graph.initializer] == [[]]


def test_reshape_target_from_another_axis_gets_its_value_not_a_copy(rng):
    # Position 0 of the target takes x.shape[1] (3, static): a 0 there would copy axis 0 instead.
    model = _view_chain_model(1, ["N", 3, 4], [3, "M"])
    optimized, report = optimize_model_with_report(model)
    assert report.changes_of("reshape_copy_dims") == 1
    np.testing.assert_array_equal(GraphView(optimized.graph).array(optimized.graph.node[0].input[1]), [3, -1])
    for batch in (1, 2):
        assert_same_outputs(model, optimized, {"x": _x(rng, batch, 3, 4)})


def test_reshape_target_from_a_symbolic_axis_elsewhere_is_left_alone(rng):
    # Target [x.shape[2], -1] with a dynamic axis 2: neither a copy (axis 0 differs) nor the one unknown (-1 taken).
    model = _view_chain_model(2, [2, 3, "W"], ["W", "M"])
    optimized, report = optimize_model_with_report(model)
    assert report.changes_of("reshape_copy_dims") == 0
    assert_same_outputs(model, optimized, {"x": _x(rng, 2, 3, 5)})


def _paddle_flatten_model() -> onnx.ModelProto:
    """paddle2onnx's ``reshape(x, [x.shape[0], -1])`` and its opset-11 Softmax (``Reshape(s, Shape(logits))``):

    x(N, 4, 1, 1) -> Shape -> Cast(int32) -> Slice[0:1] -> Cast(int64) -> Concat(., [-1]) -> Reshape(x, .) -> f
    f -> Gemm -> logits(N, 2) -> Softmax -> s ; Reshape(s, Shape(logits)) -> y"""
    n = helper.make_node
    nodes = [
        n("Shape", ["x"], ["shape"], name="shape"),
        n("Cast", ["shape"], ["shape32"], to=TensorProto.INT32, name="cast32"),
        n("Slice", ["shape32", "zero", "one", "zero", "one"], ["batch32"], name="slice"),
        n("Cast", ["batch32"], ["batch"], to=TensorProto.INT64, name="cast64"),
        n("Concat", ["batch", "minus_one"], ["target"], axis=0, name="concat"),
        n("Reshape", ["x", "target"], ["f"], name="flatten"),
        n("Gemm", ["f", "W", "B"], ["logits"], transB=1, name="fc"),
        n("Softmax", ["logits"], ["s"], axis=1, name="softmax"),
        n("Shape", ["logits"], ["logits_shape"], name="logits_shape"),
        n("Reshape", ["s", "logits_shape"], ["y"], name="restore"),
    ]
    rng = np.random.default_rng(5)
    inits = {
        "zero": np.array([0], np.int64),
        "one": np.array([1], np.int64),
        "minus_one": np.array([-1], np.int64),
        "W": rng.standard_normal((2, 4)).astype(np.float32),
        "B": rng.standard_normal(2).astype(np.float32),
    }
    return make_model(nodes, [tensor("x", ["N", 4, 1, 1])], [tensor("y", ["N", 2])], inits)


def test_paddle2onnx_shape_chains_under_a_dynamic_batch_become_constant_targets(rng):
    model = _paddle_flatten_model()
    optimized, report = optimize_model_with_report(model)
    assert report.changes_of("reshape_copy_dims") == 2
    assert sorted(op_types(optimized)) == ["Gemm", "Reshape", "Reshape", "Softmax"]
    view = GraphView(optimized.graph)
    targets = {n.name: view.array(n.input[1]).tolist() for n in optimized.graph.node if n.op_type == "Reshape"}
    assert targets == {"flatten": [0, -1], "restore": [0, 2]}
    assert check_model(optimized, target="esp32s3", bits="int8", strict=False).ok
    for batch in (1, 3):
        assert_same_outputs(model, optimized, {"x": _x(rng, batch, 4, 1, 1)})


def test_reshape_back_from_a_flattened_softmax_gets_minus_one_for_the_batch(rng):
    # paddle2onnx's attention: scores (N, 2, 3) -> Reshape(., [-1, 3]) -> Softmax -> Reshape(., Shape(scores)):
    # the batch is no axis of the 2-D data, so it becomes the one unknown, -1; the 2 and 3 are read off Shape.
    n = helper.make_node
    nodes = [
        n("Reshape", ["x", "flat"], ["x2"], name="flatten"),
        n("Softmax", ["x2"], ["s"], axis=1, name="softmax"),
        n("Shape", ["x"], ["shape"], name="shape"),
        n("Reshape", ["s", "shape"], ["y"], name="restore"),
    ]
    model = make_model(
        nodes, [tensor("x", ["N", 2, 3])], [tensor("y", ["N", 2, 3])], {"flat": np.array([-1, 3], np.int64)}
    )
    optimized, report = optimize_model_with_report(model)
    assert report.changes_of("reshape_copy_dims") == 1
    restore = next(node for node in optimized.graph.node if node.name == "restore")
    np.testing.assert_array_equal(GraphView(optimized.graph).array(restore.input[1]), [-1, 2, 3])
    assert "Shape" not in op_types(optimized)
    for batch in (1, 4):
        assert_same_outputs(model, optimized, {"x": _x(rng, batch, 2, 3)})


# --- MatMul + Add -> Gemm, with a symbolic batch ------------------------------------------------------------


@pytest.mark.parametrize(
    "bias_shape, bias_first",
    [((8,), False), ((8,), True), ((1, 8), False), ((), False)],
    ids=["bias-right", "bias-left", "bias-1xM", "bias-scalar"],
)
def test_matmul_add_with_symbolic_batch_becomes_gemm(rng, bias_shape, bias_first):
    #   x(unk__9, 16) -> MatMul(W 16x8) -> Add(b) -> y(unk__9, 8), as tf2onnx writes a Dense layer
    add_inputs = ["b", "m"] if bias_first else ["m", "b"]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", add_inputs, ["y"])]
    inits = {"W": _x(rng, 16, 8), "b": rng.standard_normal(bias_shape).astype(np.float32)}
    model = make_model(nodes, [tensor("x", ["unk__9", 16])], [tensor("y", ["unk__9", 8])], inits)
    optimized, report = optimize_model_with_report(model)
    assert op_types(optimized) == ["Gemm"]
    assert report.changes_of("fuse_matmul_add_bias_into_gemm") == 1
    for batch in (1, 5):
        assert_same_outputs(model, optimized, {"x": _x(rng, batch, 16)})


def test_matmul_add_with_a_full_static_bias_becomes_gemm(rng):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    model = make_model(nodes, [tensor("x", [3, 5])], [tensor("y", [3, 4])], {"W": _x(rng, 5, 4), "b": _x(rng, 3, 4)})
    optimized = optimize_model(model)
    assert op_types(optimized) == ["Gemm"]
    assert_same_outputs(model, optimized, {"x": _x(rng, 3, 5)})


@pytest.mark.parametrize(
    "case", ["rank-3-input", "product-is-an-output", "bias-grows-the-rank", "per-row-bias", "runtime-b"]
)
def test_matmul_add_left_alone_when_gemm_would_differ(rng, case):
    # (a runtime B would fuse exactly, but ESP-DL's Gemm takes constant weights only, its MatMul both)
    x_shape, bias, outputs = ["N", 16], _x(rng, 8), [tensor("y", None)]
    if case == "rank-3-input":
        x_shape = ["N", 4, 16]
    elif case == "product-is-an-output":
        outputs.append(tensor("m", None))
    elif case == "bias-grows-the-rank":
        bias = _x(rng, 1, 1, 8)
    elif case == "per-row-bias":  # one bias row per batch row: the model runs at batch 3 only, N stays symbolic
        bias = _x(rng, 3, 8)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    inputs, inits = [tensor("x", x_shape)], {"W": _x(rng, 16, 8), "b": bias}
    if case == "runtime-b":
        inputs.append(tensor("W", [16, 8]))
        del inits["W"]
    model = make_model(nodes, inputs, outputs, inits)
    optimized, report = optimize_model_with_report(model)
    assert "MatMul" in op_types(optimized) and "Gemm" not in op_types(optimized)
    assert report.changes_of("fuse_matmul_add_bias_into_gemm") == 0
    batch = 3 if case == "per-row-bias" else 2
    feeds = {"x": _x(rng, batch, *x_shape[1:])}
    if case == "runtime-b":
        feeds["W"] = _x(rng, 16, 8)
    assert_same_outputs(model, optimized, feeds)


# --- ceil_mode pools -----------------------------------------------------------------------------------------


def _pool_model(op_type: str, spatial, attrs: dict, indices: bool = False, batch="N") -> onnx.ModelProto:
    outputs = [tensor("y", None)] + ([tensor("i", None, TensorProto.INT64)] if indices else [])
    node = helper.make_node(op_type, ["x"], [o.name for o in outputs], name="pool", **attrs)
    return make_model([node], [tensor("x", [batch, 3, *spatial])], outputs, opset=19)


def _ceil_kept(model: onnx.ModelProto) -> bool:
    return any(a.name == "ceil_mode" and a.i for n in model.graph.node for a in n.attribute)


@st.composite
def _ceil_pools(draw) -> tuple[str, list[tuple[int, int, int, int, int, int]], int | None, bool]:
    """A ceil-mode pool ONNX allows: per spatial axis (size, kernel, stride, pad begin, pad end, dilation)."""
    axes = []
    for _ in range(draw(st.integers(1, 2))):
        # strides above 1 and kernels above 1 are where ceil and floor mode differ: drawn more often
        kernel, dilation = draw(st.sampled_from([1, 2, 2, 3, 3, 4])), draw(st.integers(1, 2))
        stride = draw(st.sampled_from([1, 2, 2, 3, 3, 4]))
        begin, end = draw(st.integers(0, kernel - 1)), draw(st.integers(0, kernel - 1))
        size = draw(st.integers(max(1, dilation * (kernel - 1) + 1 - begin - end), 11))
        axes.append((size, kernel, stride, begin, end, dilation))
    op_type = draw(st.sampled_from(["MaxPool", "AveragePool"]))
    count_include_pad = draw(st.sampled_from([0, 1])) if op_type == "AveragePool" else None
    indices = op_type == "MaxPool" and draw(st.booleans())
    return op_type, axes, count_include_pad, indices


@settings(max_examples=400, deadline=None)
@given(case=_ceil_pools(), seed=st.integers(0, 2**16))
def test_ceil_mode_rewrite_matches_onnxruntime(case, seed):
    op_type, axes, count_include_pad, indices = case
    rank = len(axes)
    attrs = {
        "kernel_shape": [a[1] for a in axes],
        "strides": [a[2] for a in axes],
        "pads": [a[3] for a in axes] + [a[4] for a in axes],
        "dilations": [a[5] for a in axes],
        "ceil_mode": 1,
    }
    if count_include_pad is not None:
        attrs["count_include_pad"] = count_include_pad
    spatial = [a[0] for a in axes]
    model = _pool_model(op_type, spatial, attrs, indices, batch=2)
    feeds = {"x": np.random.default_rng(seed).standard_normal((2, 3, *spatial)).astype(np.float32)}
    expected = run(model, feeds)
    # What an exact rewrite needs, from onnxruntime's own output size: floor mode with `extra` more end padding
    # has the same windows; onnxruntime refuses pads >= kernel; count_include_pad=1 divides an overhanging last
    # window by fewer cells than a padded one.
    extra = [
        max(0, (expected[0].shape[2 + i] - 1) * s + d * (k - 1) + 1 - (n + b + e))
        for i, (n, k, s, b, e, d) in enumerate(axes)
    ]
    fits = all(axes[i][4] + extra[i] < axes[i][1] for i in range(rank))
    exact = fits and not (count_include_pad and any(extra))

    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    infer_shapes(rewritten)
    result = rewrite_ceil_mode_pools(rewritten)
    assert result.changes == int(exact)
    event(f"{op_type} cip={count_include_pad} rewritten={exact} extra={any(extra)}")
    assert _ceil_kept(rewritten) != exact
    if not exact:
        assert result.warnings and "ceil_mode=1 kept" in result.warnings[0]
        if count_include_pad and fits and all(a[5] == 1 for a in axes):
            # the refusal is needed: with the pads enlarged, onnxruntime divides the last window by more cells
            # (its dilated AveragePool counts differently; refusing those too is merely cautious)
            naive = _pool_model(
                op_type,
                spatial,
                {
                    **attrs,
                    "ceil_mode": 0,
                    "pads": attrs["pads"][:rank] + [e + x for e, x in zip(attrs["pads"][rank:], extra)],
                },
                batch=2,
            )
            assert not np.allclose(run(naive, feeds)[0], expected[0], rtol=1e-6, atol=1e-6)
        return
    written = {a.name: helper.get_attribute_value(a) for a in rewritten.graph.node[0].attribute}
    assert list(written.get("pads", [0] * (2 * rank))) == attrs["pads"][:rank] + [
        e + x for e, x in zip(attrs["pads"][rank:], extra)
    ]
    for want, got in zip(expected, run(rewritten, feeds)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_mtcnn_rnet_ceil_mode_pools_are_rewritten_and_accepted_by_the_checker(rng):
    #   MTCNN's RNet (PyTorch, ceil_mode=True pools): 24x24 -> Conv3 -> PRelu -> MaxPool(3, 2, ceil) -> Conv3 ->
    #   PRelu -> MaxPool(3, 2, ceil) -> Conv2 -> PRelu -> y(1, 64, 3, 3)
    nodes, inits, previous, channels = [], {}, "x", 3
    for index, (out, kernel, pool) in enumerate([(28, 3, True), (48, 3, True), (64, 2, False)]):
        inits[f"w{index}"] = (_x(rng, out, channels, kernel, kernel) * 0.2).astype(np.float32)
        inits[f"b{index}"] = _x(rng, out)
        inits[f"a{index}"] = np.full((out, 1, 1), 0.25, np.float32)
        nodes += [
            helper.make_node("Conv", [previous, f"w{index}", f"b{index}"], [f"c{index}"], name=f"conv{index}"),
            helper.make_node("PRelu", [f"c{index}", f"a{index}"], [f"p{index}"], name=f"prelu{index}"),
        ]
        previous, channels = f"p{index}", out
        if pool:
            nodes.append(
                helper.make_node("MaxPool", [previous], [f"m{index}"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
            )
            previous = f"m{index}"
    nodes[-1].output[0] = "y"
    model = make_model(nodes, [tensor("x", [1, 3, 24, 24])], [tensor("y", [1, 64, 3, 3])], inits)
    before = check_model(model, target="esp32s3", bits="int8", strict=False)
    ceil_problems = [p for p in before.problems if p.field == "attribute ceil_mode"]
    assert len(ceil_problems) == 2 and all("rewrites this node exactly" in str(p) for p in ceil_problems)
    optimized, report = optimize_model_with_report(model)
    assert report.changes_of("rewrite_ceil_mode_pools") == 2 and not _ceil_kept(optimized)
    check_model(optimized, target="esp32s3", bits="int8")  # strict: raises on any problem
    assert_same_outputs(model, optimized, {"x": _x(rng, 1, 3, 24, 24)}, rtol=1e-6)


@pytest.mark.parametrize(
    "attrs, spatial, reason",
    [
        ({"count_include_pad": 1, "pads": [1, 1, 1, 1]}, [10, 10], "count_include_pad=1"),
        ({"count_include_pad": 0}, ["H", "W"], "not static"),
    ],
    ids=["include-pad-overhang", "dynamic-size"],
)
def test_ceil_mode_average_pool_that_cannot_be_rewritten_is_kept_and_refused(rng, attrs, spatial, reason):
    # 10 + 2 pads, kernel 3, stride 2: the ceil-mode last window overhangs the end pad by one cell.
    model = _pool_model("AveragePool", spatial, {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1, **attrs})
    optimized, report = optimize_model_with_report(model)
    assert _ceil_kept(optimized) and report.changes_of("rewrite_ceil_mode_pools") == 0
    assert any("ceil_mode=1 kept" in w and reason in w for w in report.warnings)
    problems = [p for p in check_model(optimized, strict=False).problems if p.field == "attribute ceil_mode"]
    assert len(problems) == 1 and "cannot be rewritten exactly" in problems[0].reason and reason in problems[0].reason
    if spatial == [10, 10]:
        assert_same_outputs(model, optimized, {"x": _x(rng, 2, 3, 10, 10)})


# --- auto_pad SAME (tflite2onnx, TensorFlow's 'same' padding) -----------------------------------------------


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize(
    "op_type, attrs",
    [
        ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}),  # BlazeFace's pools (odd and even sizes below)
        ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
        ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2]}),
        ("AveragePool", {"kernel_shape": [3, 2], "strides": [1, 2], "count_include_pad": 1}),
        ("Conv", {"strides": [2, 2]}),
        ("Conv", {"kernel_shape": [3, 3]}),
    ],
    ids=["maxpool-2s2", "maxpool-3s2-ceil", "avgpool-3s2", "avgpool-include-pad", "conv-s2", "conv-s1"],
)
@pytest.mark.parametrize("spatial", [[8, 8], [7, 9]])
def test_same_auto_pad_becomes_explicit_pads(rng, mode, op_type, attrs, spatial):
    if op_type == "Conv":
        node = helper.make_node("Conv", ["x", "w"], ["y"], name="pool", auto_pad=mode, **attrs)
        model = make_model([node], [tensor("x", ["N", 3, *spatial])], [tensor("y", None)], {"w": _x(rng, 4, 3, 3, 3)})
    else:
        model = _pool_model(op_type, spatial, {"auto_pad": mode, **attrs})
    assert any(p.field == "attribute auto_pad" for p in check_model(model, strict=False).problems)
    optimized, report = optimize_model_with_report(model)
    assert report.changes_of("resolve_same_auto_pad") == 1
    written = {a.name for a in optimized.graph.node[0].attribute}
    assert "auto_pad" not in written and "ceil_mode" not in written
    # (an AveragePool that pads with count_include_pad=0 stays refused for what it is: the chip divides by k*k)
    assert not any(p.field == "attribute auto_pad" for p in check_model(optimized, strict=False).problems)
    feeds = {"x": _x(rng, 2, 3, *spatial)}
    for want, got in zip(run(model, feeds), run(optimized, feeds)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_same_auto_pad_with_dynamic_sizes_is_left_to_the_checker():
    model = _pool_model("MaxPool", ["H", "W"], {"auto_pad": "SAME_UPPER", "kernel_shape": [2, 2], "strides": [2, 2]})
    optimized, report = optimize_model_with_report(model)
    assert report.changes_of("resolve_same_auto_pad") == 0
    assert any(p.field == "attribute auto_pad" for p in check_model(optimized, strict=False).problems)


# --- written-out hard-sigmoid / hard-swish -------------------------------------------------------------------

_C = {"three": 3.0, "zero": 0.0, "six": 6.0, "one": 1.0, "half": 0.5, "sixth": 1 / 6, "approx_sixth": 0.1666}


def _hard_nodes(spelling: str) -> tuple[list[onnx.NodeProto], str]:
    """The nodes of one exporter spelling (reading x, writing y) and the single op it must become."""
    n = helper.make_node
    clip6 = [n("Add", ["x", "three"], ["a"]), n("Clip", ["a", "zero", "six"], ["c"])]
    spellings = {
        # PyTorch x * F.relu6(x + 3) / 6, paddle2onnx hard_swish below opset 14
        "x*relu6(x+3)/6": (clip6 + [n("Mul", ["x", "c"], ["m"]), n("Div", ["m", "six"], ["y"])], "HardSwish"),
        # Keras: x * relu6(3 + x) * (1/6), constants on the left
        "(3+x)relu6*x*(1/6)": (
            [n("Add", ["three", "x"], ["a"]), n("Clip", ["a", "zero", "six"], ["c"])]
            + [n("Mul", ["c", "x"], ["m"]), n("Mul", ["sixth", "m"], ["y"])],
            "HardSwish",
        ),
        "x*(relu6(x+3)/6)": (clip6 + [n("Div", ["c", "six"], ["h"]), n("Mul", ["x", "h"], ["y"])], "HardSwish"),
        "x*(relu6(x+3)*(1/6))": (clip6 + [n("Mul", ["c", "sixth"], ["h"]), n("Mul", ["h", "x"], ["y"])], "HardSwish"),
        "x*HardSigmoid(x)": (
            [n("HardSigmoid", ["x"], ["h"], alpha=1 / 6, beta=0.5), n("Mul", ["x", "h"], ["y"])],
            "HardSwish",
        ),
        "x*clip(x/6+0.5,0,1)": (
            [n("Div", ["x", "six"], ["d"]), n("Add", ["d", "half"], ["a"]), n("Clip", ["a", "zero", "one"], ["h"])]
            + [n("Mul", ["h", "x"], ["y"])],
            "HardSwish",
        ),
        "clip(x/6+0.5,0,1)": (
            [n("Div", ["x", "six"], ["d"]), n("Add", ["half", "d"], ["a"]), n("Clip", ["a", "zero", "one"], ["y"])],
            "HardSigmoid",
        ),
        "clip(x*0.1666+0.5,0,1)": (
            [n("Mul", ["approx_sixth", "x"], ["d"]), n("Add", ["d", "half"], ["a"])]
            + [n("Clip", ["a", "zero", "one"], ["y"])],
            "HardSigmoid",
        ),
        "clip((x+3)/6,0,1)": (
            [n("Add", ["x", "three"], ["a"]), n("Div", ["a", "six"], ["d"]), n("Clip", ["d", "zero", "one"], ["y"])],
            "HardSigmoid",
        ),
        "relu6(x+3)/6": (clip6 + [n("Div", ["c", "six"], ["y"])], "HardSigmoid"),
        "relu6(x+3)*(1/6)": (clip6 + [n("Mul", ["sixth", "c"], ["y"])], "HardSigmoid"),
    }
    return spellings[spelling]


def _hard_model(nodes: list[onnx.NodeProto], opset: int, shape=(2, 4, 5, 5), **constants: np.ndarray):
    used = {name for node in nodes for name in node.input}
    inits = {k: np.array(v, np.float32) for k, v in _C.items() if k in used}
    inits.update(constants)
    return make_model(nodes, [tensor("x", list(shape))], [tensor("y", list(shape))], inits, opset=opset)


def _hard_feeds(rng, shape=(2, 4, 5, 5)) -> dict[str, np.ndarray]:
    return {"x": (rng.standard_normal(shape) * 4).astype(np.float32)}  # both sides of both clamps


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize(
    "spelling",
    [
        "x*relu6(x+3)/6",
        "(3+x)relu6*x*(1/6)",
        "x*(relu6(x+3)/6)",
        "x*(relu6(x+3)*(1/6))",
        "x*HardSigmoid(x)",
        "x*clip(x/6+0.5,0,1)",
        "clip(x/6+0.5,0,1)",
        "clip(x*0.1666+0.5,0,1)",
        "clip((x+3)/6,0,1)",
        "relu6(x+3)/6",
        "relu6(x+3)*(1/6)",
    ],
)
def test_written_out_hard_activations_are_fused(rng, spelling, opset):
    nodes, fused = _hard_nodes(spelling)
    model = _hard_model(nodes, opset)
    optimized, report = optimize_model_with_report(model)
    assert op_types(optimized) == [fused]
    assert report.changes_of("fuse_hard_swish" if fused == "HardSwish" else "fuse_hard_sigmoid") == 1
    node = optimized.graph.node[0]
    attrs = {a.name: a.f for a in node.attribute}
    if fused == "HardSigmoid":
        alpha = 0.1666 if "0.1666" in spelling else 1 / 6
        assert attrs["alpha"] == pytest.approx(alpha, rel=1e-6) and attrs["beta"] == pytest.approx(0.5, rel=1e-6)
    # HardSwish needs opset 14: an opset-13 model is raised to it, a newer one keeps its opset.
    want_opset = max(opset, 14) if fused == "HardSwish" else opset
    assert [o.version for o in optimized.opset_import if o.domain in ("", "ai.onnx")] == [want_opset]
    assert_same_outputs(model, optimized, _hard_feeds(rng), rtol=1e-5)
    again, second = optimize_model_with_report(optimized)
    assert second.total_changes == 0 and again.SerializeToString() == optimized.SerializeToString()


def test_hard_sigmoid_with_opset_6_clip_attributes(rng):
    # Clip(min, max) as attributes, before opset 11; the pass reads them without the opset upgrade.
    nodes = [
        helper.make_node("Add", ["x", "three"], ["a"]),
        helper.make_node("Clip", ["a"], ["c"], min=0.0, max=6.0),
        helper.make_node("Div", ["c", "six"], ["y"]),
    ]
    model = _hard_model(nodes, opset=10)
    fused = onnx.ModelProto()
    fused.CopyFrom(model)
    infer_shapes(fused)
    assert fuse_hard_sigmoid(fused).changes == 1
    assert op_types(fused) == ["HardSigmoid"]
    assert_same_outputs(model, fused, _hard_feeds(rng), rtol=1e-5)
    assert op_types(optimize_model(model)) == ["HardSigmoid"]


def test_hard_swish_in_a_network_keeps_shared_inputs(rng):
    #   x -> Conv -> h ; h -> hard-swish -> Conv -> y1 ; h -> Relu -> y2   (h read by three nodes)
    nodes, _ = _hard_nodes("x*relu6(x+3)/6")
    for node in nodes:
        node.input[:] = ["h" if name == "x" else name for name in node.input]
        node.output[:] = ["s" if name == "y" else name for name in node.output]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["h"], pads=[1, 1, 1, 1]),
        *nodes,
        helper.make_node("Conv", ["s", "w1"], ["y1"]),
        helper.make_node("Relu", ["h"], ["y2"]),
    ]
    inits = {k: np.array(_C[k], np.float32) for k in ("three", "zero", "six")}
    inits |= {"w0": _x(rng, 4, 3, 3, 3), "w1": _x(rng, 2, 4, 1, 1)}
    model = make_model(nodes, [tensor("x", [1, 3, 6, 6])], [tensor("y1", None), tensor("y2", None)], inits)
    optimized = optimize_model(model)
    assert op_types(optimized) == ["Conv", "HardSwish", "Conv", "Relu"]
    assert_same_outputs(model, optimized, {"x": _x(rng, 1, 3, 6, 6) * 3}, rtol=1e-5)


@pytest.mark.parametrize(
    "case",
    ["clip-is-an-output", "offset-3.1", "low-bound-0.5", "per-channel-offset", "offset-grows-rank", "default-alpha"],
)
def test_hard_activations_not_fused_when_not_exact(rng, case):
    nodes, _ = _hard_nodes("x*HardSigmoid(x)" if case == "default-alpha" else "x*relu6(x+3)/6")
    constants: dict[str, np.ndarray] = {}
    outputs = [tensor("y", None)]
    if case == "clip-is-an-output":
        outputs.append(tensor("c", None))
    elif case == "offset-3.1":
        constants["three"] = np.array(3.1, np.float32)
    elif case == "low-bound-0.5":
        constants["zero"] = np.array(0.5, np.float32)
    elif case == "per-channel-offset":
        constants["three"] = np.array([3.0, 2.0, 3.0, 3.0], np.float32).reshape(1, 4, 1, 1)
    elif case == "offset-grows-rank":
        constants["three"] = np.full((1, 1, 1, 1, 1), 3.0, np.float32)
    else:
        del nodes[0].attribute[:]  # HardSigmoid's defaults, alpha 0.2: not x * hard_sigmoid(x)
    model = _hard_model(nodes, 17, **constants)
    model.graph.output.pop()
    model.graph.output.extend(outputs)
    optimized, report = optimize_model_with_report(model)
    assert "HardSwish" not in op_types(optimized)
    assert report.changes_of("fuse_hard_swish") == 0 and report.changes_of("fuse_hard_sigmoid") == 0
    assert_same_outputs(model, optimized, _hard_feeds(rng))


def test_hard_swish_kept_with_a_warning_when_the_opset_cannot_be_raised(rng, monkeypatch):
    from espquant.optimizer import activations

    def refuse(model, version):
        raise RuntimeError("no adapter")

    monkeypatch.setattr(activations.version_converter, "convert_version", refuse)
    nodes, _ = _hard_nodes("x*relu6(x+3)/6")
    model = _hard_model(nodes, 13)
    optimized, report = optimize_model_with_report(model)
    assert "HardSwish" not in op_types(optimized) and optimized.opset_import[0].version == 13
    assert any("hard-swish(es) kept: HardSwish needs opset 14" in w and "no adapter" in w for w in report.warnings)
    assert_same_outputs(model, optimized, _hard_feeds(rng))
