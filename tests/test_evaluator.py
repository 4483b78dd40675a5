"""The Evaluator end to end: float model + table -> what the chip computes, and its bad inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import helper

from espquant import Calibrator, Evaluator
from espquant.errors import (
    DatasetError,
    OptionError,
    QuantTableError,
    TargetError,
    UnsupportedModelError,
    UnsupportedOpError,
)
from espquant.runtime import create_session
from espquant.table import QuantTable
from helpers import make_model, tensor


def _mixed_model(rng):
    #   x -> Conv -> Relu -> MaxPool --+--> Concat -> Sigmoid -> GlobalAveragePool -> Flatten -> Gemm -> y
    #   x -> Conv2 ---------> MaxPool2 +-> Add(., MaxPool) -^
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("Conv", ["x", "W2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("MaxPool", ["c2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2], name="pool2"),
        helper.make_node("Add", ["p2", "p1"], ["a"], name="add"),
        helper.make_node("Concat", ["p1", "a"], ["cat"], axis=1, name="concat"),
        helper.make_node("Sigmoid", ["cat"], ["s"], name="sigmoid"),
        helper.make_node("GlobalAveragePool", ["s"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "Wf", "Bf"], ["y"], transB=1, name="fc"),
    ]
    inits = {
        "W1": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
        "B1": rng.normal(0, 0.1, 4).astype(np.float32),
        "W2": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
        "Wf": rng.normal(0, 0.5, (5, 8)).astype(np.float32),
        "Bf": rng.normal(0, 0.1, 5).astype(np.float32),
    }
    return make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 5])], inits)


@pytest.fixture
def mixed(rng):
    model = _mixed_model(rng)
    data = rng.normal(0, 1, (64, 3, 8, 8)).astype(np.float32)
    return model, data


def _float(model, data):
    return create_session(model).run(None, {"x": data})[0]


@pytest.mark.parametrize("target", ["esp32s3", "esp32p4", "esp32c3"])
def test_int16_matches_the_float_model_closely_and_int8_roughly(tmp_path, mixed, target):
    model, data = mixed
    expected = _float(model, data)
    for bits, tolerance in (("int16", 2e-3), ("int8", 0.15)):
        path = tmp_path / f"{bits}.pickle"
        Calibrator(bits).generate_quantization_table(model, data, str(path))
        evaluator = Evaluator(bits, "per-tensor", target)
        quantized = evaluator.generate_quantized_model(model, str(path))
        assert quantized.requantized >= 1  # Add / Concat inputs brought to a shared exponent
        outputs, names = evaluator.evaluate_quantized_model(data, to_float=True)
        assert names == ["y"]
        error = np.abs(outputs[0] - expected).max() / np.abs(expected).max()
        assert error < tolerance, (bits, error)
        ints, _ = evaluator.evaluate_quantized_model(data)
        limit = 2 ** (int(bits[3:]) - 1)
        assert ints[0].dtype.kind == "i" and -limit <= ints[0].min() and ints[0].max() < limit


def test_per_channel_table_and_target_switch(tmp_path, mixed, caplog):
    model, data = mixed
    path = tmp_path / "pc.pickle"
    Calibrator("int8", "per-channel").generate_quantization_table(model, data, str(path))
    evaluator = Evaluator("int8", "esp32p4")  # granularity read from the table
    evaluator.generate_quantized_model(model, str(path))
    assert evaluator.granularity == "per-channel"
    p4 = evaluator.evaluate_quantized_model(data)[0][0]
    assert p4.shape[0] == len(data)
    with pytest.raises(QuantTableError, match="esp32s3 cannot run"):  # as export refuses it: the same rule
        evaluator.set_target_chip("esp32s3")


def test_bad_inputs(tmp_path, mixed, rng):
    model, data = mixed
    path = tmp_path / "t.pickle"
    Calibrator("int8").generate_quantization_table(model, data, str(path))
    evaluator = Evaluator("int8", "per-tensor", "esp32s3")
    with pytest.raises(OptionError, match="call generate_quantized_model"):
        evaluator.evaluate_quantized_model(data)
    with pytest.raises(QuantTableError, match="int8, this Evaluator is int16"):
        Evaluator("int16", "esp32s3").generate_quantized_model(model, str(path))
    other = _mixed_model(np.random.default_rng(99))
    with pytest.raises(QuantTableError, match="another model"):
        evaluator.generate_quantized_model(other, str(path))
    evaluator.generate_quantized_model(model, QuantTable.load(path))
    with pytest.raises(DatasetError, match="shape"):
        evaluator.evaluate_quantized_model(data[:, :2])
    with pytest.raises(DatasetError, match="do not match"):
        evaluator.evaluate_quantized_model({"image": data})
    broken = np.array(data[:4], dtype=np.float32)
    broken[2].flat[5] = np.nan
    with pytest.raises(DatasetError, match="sample 2 holds NaN"):
        evaluator.evaluate_quantized_model(broken)
    broken[2].flat[5], broken[3].flat[0] = 0.0, -np.inf
    with pytest.raises(DatasetError, match="sample 3 holds NaN or Inf"):
        evaluator.evaluate_quantized_model(broken)
    # Finite values whose squares overflow float32 (the quick check's sum) are data, not an error: they saturate.
    huge = np.full_like(data[:2], 3e38)
    assert evaluator.evaluate_quantized_model(huge)[0][0].shape[0] == 2
    with pytest.raises(TargetError, match="valid targets"):
        Evaluator("int8", "per-tensor", "esp8266")


def test_reverse_sequence_and_ops_without_a_kernel(tmp_path, rng):
    node = helper.make_node("ReverseSequence", ["x", "lens"], ["y"], batch_axis=1, time_axis=0, name="reverse")
    model = make_model([node], [tensor("x", [4, 2, 3])], [tensor("y", [4, 2, 3])], {"lens": np.array([4, 2], np.int64)})
    data = rng.normal(0, 1, (4, 2, 3)).astype(np.float32)
    table = Calibrator("int8").calibrate(model, data, batch_size=4).table
    evaluator = Evaluator("int8", "esp32s3")
    evaluator.generate_quantized_model(model, table)
    got = evaluator.evaluate_quantized_model(data, to_float=True)[0][0]
    step = 2.0 ** evaluator.quantized.exponent("x")
    np.testing.assert_allclose(got, _float_named(model, {"x": data}), atol=step / 2 + 1e-7)
    # An op the checker accepts but the simulator cannot run yet is named, not crashed on.
    from espquant.simulator.interpreter import RUN as _RUN

    kernel = _RUN.pop("ReverseSequence")
    try:
        with pytest.raises(UnsupportedOpError, match="no kernel yet for: ReverseSequence"):
            Evaluator("int8", "esp32s3").generate_quantized_model(model, table)
    finally:
        _RUN["ReverseSequence"] = kernel


def _float_named(model, feeds):
    return create_session(model).run(None, feeds)[0]


@pytest.mark.parametrize(
    "attrs",
    [
        {},
        {"strides": [2, 2]},
        {"strides": [2, 2], "pads": [1, 1, 1, 1]},
        {"strides": [2, 2], "output_padding": [1, 1]},
        {"strides": [2, 1], "pads": [0, 1, 2, 1]},
    ],
)
def test_conv_transpose_follows_the_float_model(rng, attrs):
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="deconv", **attrs)
    inits = {"w": rng.normal(0, 0.5, (3, 4, 3, 3)).astype(np.float32), "b": rng.normal(0, 0.1, 4).astype(np.float32)}
    graph = helper.make_graph(
        [node],
        "g",
        [tensor("x", ["N", 3, 5, 5])],
        [tensor("y", None)],
        [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = rng.normal(0, 1, (2, 3, 5, 5)).astype(np.float32)
    expected = _float(model, data)
    table = Calibrator("int16").calibrate(model, data).table
    evaluator = Evaluator("int16", "per-tensor", "esp32s3")
    evaluator.generate_quantized_model(model, table)
    got = evaluator.evaluate_quantized_model(data, to_float=True)[0][0]
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 2.0**-10 * np.abs(expected).max() + 2.0 ** evaluator.quantized.exponent("y")


def test_resize_pad_slice_run_like_the_float_model(tmp_path, rng):
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect", name="pad"),
        helper.make_node("Slice", ["p", "starts", "ends", "axes"], ["s"], name="slice"),
        helper.make_node(
            "Resize",
            ["s", "", "scales"],
            ["y"],
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
            name="up",
        ),
    ]
    inits = {
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
        "starts": np.array([1], np.int64),
        "ends": np.array([5], np.int64),
        "axes": np.array([3], np.int64),
        "scales": np.array([1, 1, 2, 2], np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 2, 4, 4])], [tensor("y", ["N", 2, 12, 8])], inits)
    data = rng.normal(0, 1, (6, 2, 4, 4)).astype(np.float32)
    Calibrator("int8").generate_quantization_table(model, data, str(tmp_path / "t.pickle"))
    evaluator = Evaluator("int8", "esp32s3")  # Resize is int8-only on ESP-DL
    evaluator.generate_quantized_model(model, str(tmp_path / "t.pickle"))
    got = evaluator.evaluate_quantized_model(data, to_float=True)[0][0]
    # Pure data movement: only the input's quantization (half a step) separates it from the float model.
    step = 2.0 ** evaluator.quantized.exponent("x")
    np.testing.assert_allclose(got, _float(model, data), atol=step / 2 + 1e-7)


def test_cli_evaluate(tmp_path, mixed, rng):
    import json

    from click.testing import CliRunner

    from espquant.cli import main

    model, data = mixed
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", data)
    labels = _float(model, data).argmax(1)
    np.save(tmp_path / "y.npy", labels)
    Calibrator("int16").generate_quantization_table(model, data, str(tmp_path / "t.pickle"))
    args = [
        "evaluate",
        str(tmp_path / "m.onnx"),
        "--table",
        str(tmp_path / "t.pickle"),
        "--data",
        str(tmp_path / "x.npy"),
        "--labels",
        str(tmp_path / "y.npy"),
        "--target",
        "esp32p4",
        "--batch-size",
        "16",
    ]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["bits"] == 16 and report["samples"] == len(data) and report["float_accuracy"] == 1.0
    assert report["outputs"][0]["sqnr_db"] > 40 and report["top1_agreement"] > 0.95
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "SQNR" in result.output and "int16 accuracy (simulated)" in result.output


def test_a_real_architecture_at_int16(tmp_path):
    # SqueezeNet from the onnx package (random He weights instead of its constant 0.02 ones), optimized,
    # calibrated and simulated: int16 must track the float model closely. Its final Reshape (from the opset
    # upgrade of Softmax) pins batch 1 and follows a float Softmax: both paths are exercised.
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import ONNX_TEST_DATA
    from espquant.optimizer import optimize_model
    from test_optimizer_equivalence import randomize_light_weights

    model = optimize_model(randomize_light_weights(onnx.load(ONNX_TEST_DATA / "light" / "light_squeezenet.onnx"), 7))
    name = model.graph.input[0].name
    x = np.random.default_rng(0).normal(0, 1, (4, 3, 224, 224)).astype(np.float32)
    session = create_session(model)
    expected = np.concatenate([session.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])
    table = Calibrator("int16").calibrate(model, x).table
    evaluator = Evaluator("int16", "per-tensor", "esp32p4")
    evaluator.generate_quantized_model(model, table)
    got = np.concatenate([evaluator.evaluate_quantized_model(x[i : i + 1], to_float=True)[0][0] for i in range(len(x))])
    sqnr = 10 * np.log10(np.sum(expected.astype(np.float64) ** 2) / np.sum((got - expected) ** 2))
    assert sqnr > 50, sqnr
    assert (got.argmax(-1) == expected.argmax(-1)).all()


OPS_AGAINST_FLOAT = {
    # name: (nodes, initializers, output shape)
    "div": ([helper.make_node("Div", ["x", "d"], ["y"])], {"d": np.full((1, 3, 1, 1), 2.5, np.float32)}, [2, 3, 4, 4]),
    "pow": ([helper.make_node("Pow", ["x", "p"], ["y"])], {"p": np.array(2.0, np.float32)}, [2, 3, 4, 4]),
    "prelu": (
        [helper.make_node("PRelu", ["x", "s"], ["y"])],
        {"s": np.array([0.1, 0.2, 0.3], np.float32).reshape(3, 1, 1)},
        [2, 3, 4, 4],
    ),
    "neg": ([helper.make_node("Neg", ["x"], ["y"])], {}, [2, 3, 4, 4]),
    "split": (
        [helper.make_node("Split", ["x", "sz"], ["y", "z"], axis=1)],
        {"sz": np.array([1, 2], np.int64)},
        [2, 1, 4, 4],
    ),
    "gather": (
        [helper.make_node("Gather", ["x", "i"], ["y"], axis=1)],
        {"i": np.array([2, 0], np.int64)},
        [2, 2, 4, 4],
    ),
    "log_softmax": ([helper.make_node("LogSoftmax", ["x"], ["y"], axis=1)], {}, [2, 3, 4, 4]),
}


@pytest.mark.parametrize("name", list(OPS_AGAINST_FLOAT))
def test_more_kernels_follow_the_float_model_at_int16(tmp_path, rng, name):
    nodes, inits, out_shape = OPS_AGAINST_FLOAT[name]
    outputs = [tensor(o, None) for o in nodes[0].output]
    model = make_model(nodes, [tensor("x", ["N", 3, 4, 4])], outputs, inits)
    data = rng.normal(0, 1, (2, 3, 4, 4)).astype(np.float32)
    table = Calibrator("int16").calibrate(model, data).table
    evaluator = Evaluator("int16", "per-tensor", "esp32s3")
    evaluator.generate_quantized_model(model, table)
    got = evaluator.evaluate_quantized_model(data, to_float=True)[0]
    expected = create_session(model).run(None, {"x": data})
    for g, e, output in zip(got, expected, nodes[0].output):
        if name == "log_softmax":  # a float32 output: the chip's float arithmetic, not a quantized value
            np.testing.assert_allclose(g, e, atol=1e-3)
            continue
        step = 2.0 ** evaluator.quantized.exponent(output)
        assert np.abs(g - e).max() <= 3 * step + 2 * 2.0 ** evaluator.quantized.exponent("x"), (name, output)


def test_depth_to_space_and_space_to_depth_round_trip(tmp_path, rng):
    """The forms ESP-DL computes like ONNX (the checker refuses the others): SpaceToDepth of one channel,
    DepthToSpace CRD, and DCR with blocksize output channels."""
    nodes = [
        helper.make_node("SpaceToDepth", ["x"], ["s"], blocksize=2),
        helper.make_node("DepthToSpace", ["s"], ["y"], blocksize=2, mode="CRD"),
        helper.make_node("DepthToSpace", ["w"], ["z"], blocksize=2, mode="DCR"),
    ]
    inputs = [tensor("x", ["N", 1, 4, 4]), tensor("w", ["N", 8, 2, 2])]
    model = make_model(nodes, inputs, [tensor("y", None), tensor("z", None)])
    data = {
        "x": rng.normal(0, 1, (2, 1, 4, 4)).astype(np.float32),
        "w": rng.normal(0, 1, (2, 8, 2, 2)).astype(np.float32),
    }
    table = Calibrator("int8").calibrate(model, data).table
    evaluator = Evaluator("int8", "per-tensor", "esp32s3")
    evaluator.generate_quantized_model(model, table)
    got = evaluator.evaluate_quantized_model(data, to_float=True)[0]
    expected = create_session(model).run(None, data)
    for g, e, source in zip(got, expected, ("x", "w")):
        np.testing.assert_allclose(g, e, atol=2.0 ** evaluator.quantized.exponent(source) / 2 + 1e-7)


def test_div_special_cases_from_the_spec():
    from espquant.quant.profiles import get_target
    from espquant.simulator import kernels

    s3 = get_target("esp32s3")
    a = np.array([10, -10, 0, 7], np.int64)
    b = np.array([0, 0, 0, 2], np.int64)
    out = kernels.div(a, b, e_a=-4, e_b=-4, e_out=-4, bits=8, profile=s3)
    # b = 0: the extreme by the sign of a; a = 0: 0; (7/16) / (2/16) = 3.5, at exponent -4 -> 56
    assert out.tolist() == [127, -128, 0, 56]
    table_path = kernels.div(np.array([0]), np.array([0, 3]), e_a=-4, e_b=-4, e_out=-4, bits=8, profile=s3)
    assert table_path.tolist() == [-128, 0]  # the int8 scalar / vector table: 0 / 0 -> -128


@pytest.mark.parametrize("transform", ["half_pixel", "align_corners"])
def test_linear_resize_follows_the_float_model(rng, transform):
    node = helper.make_node("Resize", ["x", "", "s"], ["y"], mode="linear", coordinate_transformation_mode=transform)
    model = make_model(
        [node],
        [tensor("x", ["N", 2, 5, 6])],
        [tensor("y", ["N", 2, 10, 12])],
        {"s": np.array([1, 1, 2, 2], np.float32)},
    )
    data = rng.normal(0, 1, (2, 2, 5, 6)).astype(np.float32)
    table = Calibrator("int8").calibrate(model, data).table
    evaluator = Evaluator("int8", "per-tensor", "esp32p4")
    evaluator.generate_quantized_model(model, table)
    got = evaluator.evaluate_quantized_model(data, to_float=True)[0][0]
    step = 2.0 ** evaluator.quantized.exponent("y")
    # The input's own quantization (half a step) plus the output rounding (half a step) separate them.
    np.testing.assert_allclose(got, _float(model, data), atol=step + 1e-6)


def test_unnamed_nodes_are_not_mistaken_for_fused_relus(rng):
    # Exported models may leave every node name empty: only the Relu that the Conv absorbs may vanish.
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Sigmoid", ["r"], ["y"]),
    ]
    model = make_model(
        nodes,
        [tensor("x", ["N", 2, 4, 4])],
        [tensor("y", ["N", 3, 4, 4])],
        {"w": rng.normal(0, 0.5, (3, 2, 1, 1)).astype(np.float32)},
    )
    data = rng.normal(0, 1, (4, 2, 4, 4)).astype(np.float32)
    table = Calibrator("int16").calibrate(model, data).table
    evaluator = Evaluator("int16", "per-tensor", "esp32s3")
    quantized = evaluator.generate_quantized_model(model, table)
    assert [n.op_type for n in quantized.nodes] == ["Conv", "Sigmoid"] and quantized.nodes[0].relu
    got = evaluator.evaluate_quantized_model(data, to_float=True)[0][0]
    np.testing.assert_allclose(got, _float(model, data), atol=2e-3)


def test_unnamed_convolutions_keep_their_own_weights(rng):
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("Conv", ["a", "w2"], ["y"])]
    inits = {
        "w1": rng.normal(0, 0.5, (2, 2, 1, 1)).astype(np.float32),
        "w2": rng.normal(0, 0.5, (2, 2, 1, 1)).astype(np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 2, 3, 3])], [tensor("y", ["N", 2, 3, 3])], inits)
    data = rng.normal(0, 1, (4, 2, 3, 3)).astype(np.float32)
    table = Calibrator("int8").calibrate(model, data).table
    evaluator = Evaluator("int8", "per-tensor", "esp32p4")
    evaluator.generate_quantized_model(model, table)
    compiled = evaluator.evaluate_quantized_model(data, to_float=True)[0][0]
    evaluator.quantized.compiled = False
    got = evaluator.evaluate_quantized_model(data, to_float=True)[0][0]
    assert len(evaluator.quantized._sessions) == 2  # one exact float32 session per convolution
    np.testing.assert_allclose(got, _float(model, data), atol=0.1)
    np.testing.assert_array_equal(compiled, got)


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_one_dimensional_convolutions_follow_the_float_model(rng, op):
    attrs = {"strides": [2], "pads": [1, 0]}
    shape = (3, 4, 3) if op == "Conv" else (4, 3, 3)  # Conv: (out, in, k); ConvTranspose: (in, out, k)
    node = helper.make_node(op, ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [tensor("x", ["N", 4, 9])],
        [tensor("y", None)],
        [onnx.numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = rng.normal(0, 1, (2, 4, 9)).astype(np.float32)
    table = Calibrator("int16").calibrate(model, data).table
    evaluator = Evaluator("int16", "per-tensor", "esp32p4")
    evaluator.generate_quantized_model(model, table)
    got = evaluator.evaluate_quantized_model(data, to_float=True)[0][0]
    expected = _float_named(model, {"x": data})
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=2.0 ** evaluator.quantized.exponent("y") + 1e-3)


def _qdq_model(scale=2.0**-5, zero_point=0, reader="Relu"):
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant"),
        helper.make_node(reader, ["q"], ["r"], name="reader"),
        helper.make_node("DequantizeLinear", ["r", "s", "z"], ["y"], name="dequant"),
    ]
    inits = {"s": np.array(scale, np.float32), "z": np.array(zero_point, np.int8)}
    return make_model(nodes, [tensor("x", ["N", 64])], [tensor("y", ["N", 64])], inits)


@pytest.mark.parametrize(("target", "rounding"), [("esp32s3", np.floor), ("esp32p4", np.rint)])
def test_quantize_and_dequantize_linear_follow_the_runtime(rng, target, rounding):
    """The input stays float up to the QuantizeLinear, which quantizes it once at the exponent of its
    power-of-two scale (ties included); DequantizeLinear gives q * 2^e as float32."""
    model = _qdq_model()
    data = rng.normal(0, 1, (8, 64)).astype(np.float32)
    data[0, :8] = (np.arange(8) - 4 + 0.5) / 32  # exact ties at 2^-5
    table = Calibrator("int8").calibrate(model, data).table
    assert table.exponents["q"] == -5 and "x" not in table.exponents
    evaluator = Evaluator("int8", "per-tensor", target)
    quantized = evaluator.generate_quantized_model(model, table)
    got = evaluator.evaluate_quantized_model(data, to_float=True)[0][0]
    shifted = data.astype(np.float64) * 32
    integers = np.clip(np.floor(shifted + 0.5) if rounding is np.floor else np.rint(shifted), -128, 127)
    np.testing.assert_array_equal(got, np.maximum(integers, 0) / 32)
    assert got.dtype == np.float32 and "y" in quantized.float_tensors
    quantized.compiled = False
    np.testing.assert_array_equal(evaluator.evaluate_quantized_model(data, to_float=True)[0][0], got)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (_qdq_model(scale=0.3), "not one power of two"),
        (_qdq_model(zero_point=3), "zero point is not 0"),
    ],
)
def test_qdq_scales_that_are_not_esp_dl_numbers_are_refused(rng, model, message):
    with pytest.raises(UnsupportedModelError, match=message):
        Calibrator("int8").calibrate(model, rng.normal(0, 1, (4, 64)).astype(np.float32))


def test_a_dequantized_tensor_feeding_a_quantized_op_is_refused(rng):
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s"], ["q"], name="quant"),
        helper.make_node("DequantizeLinear", ["q", "s"], ["d"], name="dequant"),
        helper.make_node("Gemm", ["d", "w"], ["y"], name="fc"),
    ]
    inits = {"s": np.array(0.25, np.float32), "w": rng.normal(0, 1, (64, 4)).astype(np.float32)}
    model = make_model(nodes, [tensor("x", ["N", 64])], [tensor("y", ["N", 4])], inits)
    with pytest.raises(UnsupportedModelError, match="'dequant' gives float32 on the chip, but Gemm 'fc'"):
        Calibrator("int8").calibrate(model, rng.normal(0, 1, (4, 64)).astype(np.float32))


def test_a_clip_bound_shared_by_layers_of_different_exponents(rng):
    """torch exports one Clip-bound constant for every ReLU6; each Clip compares raw integers at its own input
    exponent, so each needs its own integer copy of the bound (here 6.0 at two exponents)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1"),
        helper.make_node("Clip", ["a", "lo", "hi"], ["b"], name="relu6_1"),
        helper.make_node("Conv", ["b", "w2"], ["c"], name="conv2"),
        helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="relu6_2"),
    ]
    inits = {
        "w1": rng.normal(0, 2.0, (4, 2, 1, 1)).astype(np.float32),  # reaches 6: exponent -4
        "w2": rng.normal(0, 0.02, (4, 4, 1, 1)).astype(np.float32),  # stays below 1: a finer exponent
        "lo": np.array([0.0], np.float32),
        "hi": np.array([6.0], np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 2, 3, 3])], [tensor("y", ["N", 4, 3, 3])], inits)
    data = 4 * rng.normal(0, 1, (16, 2, 3, 3)).astype(np.float32)
    table = Calibrator("int8").calibrate(model, data).table
    evaluator = Evaluator("int8", "per-tensor", "esp32p4")
    quantized = evaluator.generate_quantized_model(model, table)
    assert quantized.exponent("a") == -4 and quantized.exponent("c") < -4
    values = quantized.run({"x": quantized.quantize_input("x", data)}, keep=True)
    # One copy at the last reader's exponent would saturate 6.0 there and let the first ReLU6 pass 7.9.
    assert values["b"].max() * 2.0 ** quantized.exponent("b") == 6.0


def test_the_legacy_misspelling_runs_the_same_simulation(rng):
    """Espressif's legacy example calls ``eva.evalute_quantized_model(...)`` (sic)."""
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    model = make_model(nodes, [tensor("x", ["N", 8])], [tensor("y", ["N", 8])])
    data = rng.normal(0, 1, (4, 8)).astype(np.float32)
    evaluator = Evaluator("int8", "per-tensor", "esp32s3")
    evaluator.generate_quantized_model(model, Calibrator("int8").calibrate(model, data).table)
    spelled, names = evaluator.evalute_quantized_model(data, False)
    expected, _ = evaluator.evaluate_quantized_model(data)
    assert names == ["y"] and np.array_equal(spelled[0], expected[0])


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        st.sampled_from([np.float16, np.float32, np.float64]),
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
        elements=st.floats(allow_nan=True, allow_infinity=True, width=16),
    ),
    st.floats(-1e38, 1e38),
)
def test_quick_finite_check_agrees_with_isfinite(values, scale):
    """The evaluator's input check (one dot product, then value by value only when that is not finite) says
    exactly what ``isfinite(x).all()`` says, huge finite values and NaN / Inf anywhere included."""
    from espquant.simulator.simulate import _all_finite

    with np.errstate(over="ignore", invalid="ignore"):
        scaled = (values * values.dtype.type(scale)) if np.isfinite(values.dtype.type(scale)) else values
    for array in (values, scaled):
        assert _all_finite(array) == bool(np.isfinite(array).all())


def test_a_bare_array_for_a_model_of_two_inputs_is_refused(rng):
    nodes = [helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    model = make_model(nodes, [tensor("a", [None, 4]), tensor("b", [None, 4])], [tensor("y", [None, 4])], {})
    data = {"a": rng.normal(0, 1, (8, 4)).astype(np.float32), "b": rng.normal(0, 1, (8, 4)).astype(np.float32)}
    evaluator = Evaluator("int8", "esp32s3")
    evaluator.generate_quantized_model(model, Calibrator("int8").calibrate(model, data).table)
    with pytest.raises(DatasetError, match=r"takes the inputs \['a', 'b'\]: give them as a dict"):
        evaluator.evaluate_quantized_model(data["a"])
    assert evaluator.evaluate_quantized_model(data)[0][0].shape == (8, 4)
