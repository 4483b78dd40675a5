"""The model checker: tiny models per op and per rejected attribute, the light models pinned, bad input."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from conftest import ONNX_TEST_DATA
from espquant import Calibrator, Evaluator, check_model
from espquant.checker import parse_bits
from espquant.cli import main
from espquant.errors import OptionError, TargetError, UnsupportedModelError
from espquant.optimizer import optimize_model
from helpers import make_model, tensor

F = np.float32


def _rng():
    return np.random.default_rng(3)


def conv(**attrs):
    w_shape = attrs.pop("w_shape", (4, 3, 3, 3))
    x_shape = attrs.pop("x_shape", [1, 3, 8, 8])
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv", **attrs)
    return make_model([node], [tensor("x", x_shape)], [tensor("y", None)], {"W": _rng().random(w_shape, F)})


def unary(op, x_shape=(1, 4, 6, 6), inputs=(), inits=None, opset=17, outputs=("y",), **attrs):
    node = helper.make_node(op, ["x", *inputs], list(outputs), name=op.lower(), **attrs)
    return make_model(
        [node], [tensor("x", list(x_shape))], [tensor(o, None) for o in outputs], inits or {}, opset=opset
    )


def binary(op, a_shape, b_shape):
    node = helper.make_node(op, ["a", "b"], ["y"], name=op.lower())
    return make_model([node], [tensor("a", a_shape), tensor("b", b_shape)], [tensor("y", None)])


def gemm(**attrs):
    node = helper.make_node("Gemm", ["a", "B", "C"], ["y"], name="gemm", **attrs)
    inits = {"B": _rng().random((5, 3), F), "C": _rng().random(3, F)}
    return make_model([node], [tensor("a", [2, 5])], [tensor("y", [2, 3])], inits)


I64 = np.int64
CASES = {
    # supported forms
    "conv": (conv(pads=[1, 1, 1, 1]), None),
    "conv-1d": (conv(w_shape=(4, 3, 3), x_shape=[1, 3, 16]), None),
    "conv-depthwise": (conv(group=3, w_shape=(3, 1, 3, 3)), None),
    "gemm": (gemm(transB=0), None),
    "matmul-runtime-b": (binary("MatMul", [2, 3, 4], [1, 4, 5]), None),  # any width: see test_espdl_host.py
    "add-broadcast": (binary("Add", [1, 4, 6, 6], [1, 4, 1, 1]), None),
    "maxpool": (unary("MaxPool", kernel_shape=[2, 2], strides=[2, 2]), None),
    "avgpool-include-pad": (unary("AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1), None),
    "sigmoid": (unary("Sigmoid"), None),
    "prelu-per-channel-s3": (unary("PRelu", inputs=["s"], inits={"s": np.full((4, 1, 1), 0.1, F)}), None),
    "pad-reflect": (
        unary("Pad", inputs=["p"], inits={"p": np.array([0, 0, 1, 1, 0, 0, 1, 1], I64)}, mode="reflect"),
        None,
    ),
    "resize-nearest": (
        unary(
            "Resize",
            inputs=["", "sc"],
            inits={"sc": np.array([1, 1, 2, 2], F)},
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        ),
        None,
    ),
    "reshape-constant": (unary("Reshape", inputs=["t"], inits={"t": np.array([1, -1], I64)}), None),
    "softmax": (unary("Softmax", x_shape=(1, 10), axis=-1), None),
    # rejected: (expected field, reason fragment)
    "conv-3d": (conv(w_shape=(4, 3, 3, 3, 3), x_shape=[1, 3, 6, 6, 6]), ("input X", "rank 5")),
    "conv-grouped": (conv(group=2, w_shape=(4, 2, 3, 3), x_shape=[1, 4, 8, 8]), ("attribute group", "grouped")),
    "conv-auto-pad": (conv(auto_pad="SAME_UPPER"), ("attribute auto_pad", "SAME_UPPER")),
    "gemm-trans-a": (gemm(transA=1), ("attribute transA", "transA=1")),
    "gemm-alpha": (gemm(alpha=0.5), ("attribute alpha", "alpha=0.5")),
    "gemm-beta": (gemm(beta=2.0), ("attribute beta", "beta=2.0")),
    "matmul-5d": (binary("MatMul", [1, 2, 2, 3, 4], [1, 2, 2, 4, 5]), ("input shapes", "up to 4-D")),
    "add-5-merged-axes": (binary("Add", [2, 1, 3, 1, 5], [1, 4, 1, 6, 1]), ("input shapes", "5 merged axes")),
    "maxpool-ceil": (unary("MaxPool", kernel_shape=[2, 2], ceil_mode=1), ("attribute ceil_mode", "ceil_mode=1")),
    "maxpool-dilation": (unary("MaxPool", kernel_shape=[2, 2], dilations=[2, 2]), ("attribute dilations", "dilation")),
    "maxpool-indices": (unary("MaxPool", outputs=("y", "i"), kernel_shape=[2, 2]), ("outputs", "Indices")),
    "avgpool-exclude-pad": (
        unary("AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        ("attribute count_include_pad", "full kernel area"),
    ),
    "pad-wrap": (
        unary("Pad", inputs=["p"], inits={"p": np.array([0, 0, 1, 1, 0, 0, 1, 1], I64)}, opset=19, mode="wrap"),
        ("attribute mode", "'wrap'"),
    ),
    "pad-reflect-too-wide": (
        unary("Pad", inputs=["p"], inits={"p": np.array([0, 0, 6, 0, 0, 0, 0, 0], I64)}, mode="reflect"),
        ("input pads", "exceed size - 1"),
    ),
    "resize-cubic": (
        unary("Resize", inputs=["", "sc"], inits={"sc": np.array([1, 1, 2, 2], F)}, mode="cubic"),
        ("attribute mode", "'cubic'"),
    ),
    "resize-half-pixel-nearest": (
        unary("Resize", inputs=["", "sc"], inits={"sc": np.array([1, 1, 2, 2], F)}, mode="nearest"),
        ("attribute coordinate_transformation_mode", "asymmetric"),
    ),
    "resize-channels": (
        unary(
            "Resize",
            inputs=["", "sc"],
            inits={"sc": np.array([1, 2, 2, 2], F)},
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
        ),
        ("input scales", "two spatial axes"),
    ),
    "reshape-allowzero": (
        unary("Reshape", inputs=["t"], inits={"t": np.array([1, -1], I64)}, allowzero=1),
        ("attribute allowzero", "allowzero=1"),
    ),
    "prelu-odd-slope": (
        unary("PRelu", inputs=["s"], inits={"s": np.full((6,), 0.1, F)}, x_shape=(1, 4, 6, 6)),
        ("input slope", "neither one value"),
    ),
    "batchnorm": (
        unary("BatchNormalization", inputs=["g", "b", "m", "v"], inits={k: np.ones(4, F) for k in "gbmv"}),
        ("op type", "no BatchNormalization"),
    ),
    "lrn": (unary("LRN", size=3), ("op type", "no LRN")),
    "mod": (binary("Mod", [2, 3], [2, 3]), None),
    "reduce-l2": (unary("ReduceL2", keepdims=1), None),
    "layernorm-mean-output": (
        unary("LayerNormalization", inputs=["g"], inits={"g": np.ones(6, F)}, outputs=("y", "mean")),
        ("outputs", "first output only"),
    ),
    "layernorm-scale-shape": (
        unary("LayerNormalization", inputs=["g"], inits={"g": np.ones((4, 6, 1), F)}),
        ("input scale", "does not broadcast"),
    ),
    "lpnorm-p3": (unary("LpNormalization", p=3), ("attribute p", "3")),
    "xor-unregistered": (binary("Xor", [2, 3], [2, 3]), ("op type", "no Xor operator")),
    "nan-weights": (
        unary("Mul", inputs=["m"], inits={"m": np.array([1.0, np.nan, np.inf, 2.0], F).reshape(1, 4, 1, 1)}),
        ("values", "2 of its 4 values are NaN or infinite"),
    ),
    "zero-dimension": (unary("Relu", x_shape=(1, 0, 6, 6)), ("shape", "dimension of 0")),
    "opset-99": (unary("Relu", opset=99), ("opset", "newer than this onnxruntime knows")),
    "reduce-five-alternating-runs": (
        unary("ReduceMean", x_shape=(1, 2, 3, 4, 5), inputs=["a"], inits={"a": np.array([0, 2, 4], I64)}, opset=18),
        ("input axes", "at most 4 alternating runs"),
    ),
    "reduce-nothing": (
        unary("ReduceSum", inputs=["a"], inits={"a": np.array([], I64)}, noop_with_empty_axes=1),
        ("input axes", "reduces no axis"),
    ),
    "gelu-old-opset": (unary("Gelu", opset=20), None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_checker_cases(name):
    model, expected = CASES[name]
    report = check_model(model, target="esp32s3", bits="int8", strict=False)
    if expected is None:
        assert report.ok, [str(p) for p in report.problems]
        return
    field, fragment = expected
    assert not report.ok
    assert any(p.field == field and fragment in p.reason for p in report.problems), [str(p) for p in report.problems]


def test_repeated_names_and_cycles_are_refused():
    relu = helper.make_node("Relu", ["x"], ["a"], name="same")
    neg = helper.make_node("Neg", ["a"], ["y"], name="same")
    report = check_model(make_model([relu, neg], [tensor("x", [1, 4])], [tensor("y", [1, 4])]), strict=False)
    assert [p.field for p in report.problems] == ["node names"]
    first = helper.make_node("Add", ["x", "b"], ["a"], name="first")
    second = helper.make_node("Relu", ["a"], ["b"], name="second")
    graph = helper.make_graph([first, second], "g", [tensor("x", [1, 4])], [tensor("b", [1, 4])])
    cyclic = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])  # onnx's checker refuses it
    report = check_model(cyclic, strict=False)
    assert "graph" in [p.field for p in report.problems]
    with pytest.raises(UnsupportedModelError, match="cycle"):
        check_model(cyclic)


def test_resize_is_int8_only_and_falls_back_to_int8_in_an_int16_model():
    # The runtime's int16 Resize is an empty function: in an int16 model the node runs at int8 (a warning),
    # unless fallback is off (--strict), which refuses it as before.
    model = CASES["resize-nearest"][0]
    report = check_model(model, bits="int16", strict=False)
    assert report.ok and [(f.op_type, f.field) for f in report.fallbacks] == [("Resize", "bits")]
    assert "runs at int8" in report.fallbacks[0].reason
    assert report.to_dict()["int8_fallback"][0]["op_type"] == "Resize" and report.to_dict()["compatible"]
    strict = check_model(model, bits="int16", strict=False, fallback=False)
    assert [p.field for p in strict.problems] == ["bits"] and not strict.fallbacks
    assert "without --strict" in strict.problems[0].hint
    with pytest.raises(UnsupportedModelError, match="for int8 only, not int16"):
        check_model(model, bits="int16", fallback=False)
    assert not check_model(model, bits="int8", strict=False).fallbacks


def test_per_channel_prelu_runs_on_every_target():
    """ESP32-P4 int8 runs its negative part through esp.vprelu, whose rounding is not documented: espquant takes
    ESP-DL's C reference there and says so when it lowers the model (not a refusal)."""
    model = CASES["prelu-per-channel-s3"][0]
    for target in ("esp32s3", "esp32c3", "esp32p4", None):
        assert check_model(model, target=target, strict=False).ok


def test_runtime_reshape_target_gets_the_optimizer_hint():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Reshape", ["x", "s"], ["y"], name="reshape"),
    ]
    model = make_model(nodes, [tensor("x", ["N", 3, 4])], [tensor("y", None)])
    report = check_model(model, strict=False)
    reshape = [p for p in report.problems if p.op_type == "Reshape"]
    assert reshape and "fold the shape chain" in reshape[0].hint
    assert any(p.op_type == "Shape" and "shape computation" in p.hint for p in report.problems)


def test_strict_check_raises_one_error_listing_every_problem():
    model = CASES["lrn"][0]
    nodes = [
        helper.make_node("LRN", ["x"], ["l"], size=3, name="lrn1"),
        helper.make_node("MaxPool", ["l"], ["y"], kernel_shape=[2, 2], ceil_mode=1, name="pool1"),
    ]
    model = make_model(nodes, [tensor("x", [1, 4, 6, 6])], [tensor("y", None)])
    with pytest.raises(UnsupportedModelError) as info:
        check_model(model)
    text = str(info.value)
    assert "2 problem(s)" in text
    assert "node 'lrn1' (LRN)" in text and "node 'pool1' (MaxPool): attribute ceil_mode" in text


# --- model-level problems -----------------------------------------------------------------------------------


def test_unknown_domain_control_flow_dynamic_shapes_and_non_float_inputs():
    then = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [], [tensor("t", [1, 2])])
    nodes = [
        helper.make_node("Custom", ["x"], ["c"], domain="com.vendor", name="custom"),
        helper.make_node("If", ["flag"], ["z"], then_branch=then, else_branch=then, name="branch"),
        helper.make_node("Relu", ["d"], ["r"], name="relu"),
        helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT, name="cast"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            tensor("x", [1, 2]),
            tensor("flag", [], TensorProto.BOOL),
            tensor("d", ["N", 3, "H", "W"]),
            tensor("ids", [1, 4], TensorProto.INT64),
        ],
        [tensor("c", None), tensor("z", [1, 2]), tensor("r", None), tensor("f", None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.vendor", 1)])
    report = check_model(model, strict=False)
    text = [str(p) for p in report.problems]
    assert any("custom domain 'com.vendor'" in t for t in text)
    assert any("node 'branch' (If)" in t and "control flow" in t for t in text)
    assert any("graph input 'd'" in t and "not static beyond the batch" in t for t in text)
    assert any("graph input 'flag'" in t and "BOOL" in t for t in text)
    assert any("graph input 'ids'" in t and "INT64" in t for t in text)
    assert any("node 'cast' (Cast)" in t for t in text)


def test_initializer_listed_as_graph_input_and_old_opset():
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [tensor("x", [1, 2]), tensor("w", [1, 2])],
        [tensor("y", [1, 2])],
        [onnx.numpy_helper.from_array(np.ones((1, 2), F), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    report = check_model(model, strict=False)
    fields = {p.field for p in report.problems}
    assert {"graph inputs", "opset"} <= fields
    assert check_model(optimize_model(model), strict=False).ok


def test_batch_dimension_may_be_dynamic():
    model = unary("Relu", x_shape=("N", 4, 6, 6))
    assert check_model(model, strict=False).ok


def test_bad_target_and_bits():
    model = unary("Relu")
    with pytest.raises(TargetError, match="valid targets: esp32s3, esp32p4"):
        check_model(model, target="esp8266")
    with pytest.raises(OptionError, match="int8' or 'int16"):
        check_model(model, bits="int4")
    assert parse_bits("INT16") == 16 and parse_bits(8) == 8


# --- legacy contract ------------------------------------------------------------------------------------------


def test_calibrator_and_evaluator_check_model_return_legacy_codes(caplog):
    good, bad = unary("Relu"), CASES["lrn"][0]
    calibrator = Calibrator("int8", "per-channel", "entropy")
    evaluator = Evaluator("int8", "per-tensor", "esp32p4")
    with caplog.at_level(logging.ERROR, logger="espquant.checker"):
        assert calibrator.check_model(good) == 0
        assert evaluator.check_model(good) == 0
        assert calibrator.check_model(bad) == -1
        assert evaluator.check_model(bad) == -1
    assert "no LRN operator" in caplog.text
    resize = CASES["resize-nearest"][0]
    assert Evaluator("int8", "esp32p4").check_model(resize) == 0
    assert Evaluator("int16", "esp32p4").check_model(resize) == 0  # the runtime's int16 Resize is empty: int8
    assert Calibrator("int16").check_model(resize) == 0
    assert Calibrator("int16", strict=True).check_model(resize) == -1


def test_calibrator_and_evaluator_configuration():
    assert Evaluator("int16", "esp32p4").target_chip == "esp32p4"
    assert Evaluator("int16", "esp32p4").granularity is None
    with pytest.raises(OptionError, match="per-tensor only"):
        Calibrator("int16", "per-channel", "minmax")
    with pytest.raises(OptionError, match="calibration method 'kl'"):
        Calibrator("int8", "per-tensor", "kl")
    with pytest.raises(OptionError, match="use 'int8' or 'int16'"):
        Calibrator("int4")
    calibrator = Calibrator("int8")
    calibrator.set_method("per-channel", "mse")
    assert (calibrator.granularity, calibrator.method) == ("per-channel", "mse")
    with pytest.raises(OptionError, match="not available"):
        calibrator.set_providers(["NoSuchExecutionProvider"])
    evaluator = Evaluator("int8", "per-tensor", "ESP32-S3")
    evaluator.set_target_chip("esp32c6")
    assert evaluator.target.family == "c"
    with pytest.raises(TargetError):
        evaluator.set_target_chip("esp8266")


def test_per_channel_on_a_per_tensor_chip_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="espquant.api.evaluator"):
        Evaluator("int8", "per-channel", "esp32s3")
    assert "per-tensor weights only" in caplog.text


# --- the light models, pinned ----------------------------------------------------------------------------------

# Which light models ESP-DL can run after `espquant optimize`, and the (op type, field) of every reason
# for the others. A change here is a change in support: make it on purpose.
LIGHT_EXPECTED = {
    "light_bvlc_alexnet": {("Conv", "attribute group"), ("LRN", "op type")},
    "light_densenet121": set(),
    "light_inception_v1": {("AveragePool", "attribute count_include_pad"), ("LRN", "op type")},
    "light_inception_v2": {("AveragePool", "attribute count_include_pad")},
    "light_resnet50": set(),
    "light_shufflenet": {("AveragePool", "attribute count_include_pad"), ("Conv", "attribute group")},
    "light_squeezenet": set(),
    # Their first fully connected weight is a ConstantOfShape of 103M / 75M values: more than the optimizer
    # materialises (constants.MAX_FOLDED_ELEMENTS, and more than any ESP32 holds), so it stays a run-time op.
    "light_vgg19": {("ConstantOfShape", "op type"), ("Gemm", "input B")},
    "light_zfnet512": {("ConstantOfShape", "op type"), ("Gemm", "input B"), ("LRN", "op type")},
}


@pytest.fixture(scope="module")
def optimized_light_models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = optimize_model(onnx.load(ONNX_TEST_DATA / "light" / f"{name}.onnx"))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(LIGHT_EXPECTED))
@pytest.mark.parametrize("target", ["esp32s3", "esp32p4", "esp32c3"])
@pytest.mark.parametrize("bits", ["int8", "int16"])
def test_light_models_support_is_pinned(optimized_light_models, name, target, bits):
    report = check_model(optimized_light_models(name), target=target, bits=bits, strict=False)
    assert {(p.op_type, p.field) for p in report.problems} == LIGHT_EXPECTED[name]


# --- CLI --------------------------------------------------------------------------------------------------------


def test_cli_check_table_json_and_exit_codes(tmp_path):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(unary("Relu"), good)
    onnx.save(CASES["conv-grouped"][0], bad)
    result = CliRunner().invoke(main, ["check", str(good)])
    assert result.exit_code == 0 and "compatible" in result.output and "Relu" in result.output
    result = CliRunner().invoke(main, ["check", str(bad), "--target", "esp32p4"])
    assert result.exit_code == 1
    assert "grouped" in result.output and "node 'conv' (Conv)" in result.output
    result = CliRunner().invoke(main, ["check", str(bad), "--json", "--bits", "int16"])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["compatible"] is False and report["bits"] == 16
    assert report["ops"][0] == {
        "op_type": "Conv",
        "count": 1,
        "supported": False,
        "reasons": report["ops"][0]["reasons"],
    }
    result = CliRunner().invoke(main, ["check", str(good), "--target", "esp8266"])
    assert result.exit_code == 1 and "unknown target chip 'esp8266'" in result.output
    result = CliRunner().invoke(main, ["check", str(tmp_path / "missing.onnx")])
    assert result.exit_code == 1 and "no such file" in result.output


def test_cli_check_all_targets_prints_a_support_matrix(tmp_path):
    path = tmp_path / "resize.onnx"
    onnx.save(CASES["resize-nearest"][0], path)
    # Resize has no int16 kernel on any chip: it runs at int8 in an int16 model, or --strict refuses it.
    result = CliRunner().invoke(main, ["check", str(path), "--target", "all"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("│ esp32")}
    for target in ("esp32s3", "esp32c6", "esp32p4", "esp32s31"):
        int8, int16 = lines[target].split("│")[2:4]
        assert "yes" in int8 and "at int8" not in int8 and "yes (1 node(s) at int8)" in int16, lines[target]
    assert "runs at int8" in result.output and "esp32p4/int16" in result.output
    result = CliRunner().invoke(main, ["check", str(path), "--target", "all", "--strict"])
    assert result.exit_code == 1
    lines = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("│ esp32")}
    for target in ("esp32s3", "esp32c6", "esp32p4", "esp32s31"):
        int8, int16 = lines[target].split("│")[2:4]
        assert "yes" in int8 and "no" in int16, lines[target]
    assert "(every target" not in result.output and "esp32p4/int16" in result.output


def test_cli_check_int16_reports_the_int8_fallback_as_a_warning(tmp_path):
    path = tmp_path / "resize.onnx"
    onnx.save(CASES["resize-nearest"][0], path)
    args = ["check", str(path), "--target", "esp32p4", "--bits", "int16"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "int8 fallback" in result.output and "node(s) at int8" in result.output and "compatible" in result.output
    report = json.loads(CliRunner().invoke(main, [*args, "--json"]).output)
    assert report["compatible"] and report["problems"] == [] and len(report["int8_fallback"]) == 1
    assert report["ops"][0]["supported"] and "runs at int8" in report["ops"][0]["reasons"][0]
    result = CliRunner().invoke(main, [*args, "--strict", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert not report["compatible"] and report["int8_fallback"] == [] and report["problems"][0]["field"] == "bits"


@pytest.mark.parametrize("reader", ["MatMul", "Reshape -> MatMul"])
def test_a_float_softmax_output_read_by_an_integer_op_is_quantized_for_it(reader):
    """PP-OCRv4's recognizer (paddle2onnx): attention scores -> Softmax -> Reshape -> MatMul(., V). The Softmax
    output is float32 on the chip; the plan gives it an integer copy (the lowering's QuantizeLinear) that the
    MatMul (or the Reshape before it) reads, and the checker accepts the model."""
    from espquant.calibration.plan import plan_calibration

    n = helper.make_node
    nodes = [n("Softmax", ["scores"], ["p"], axis=-1, name="softmax")]
    if reader == "MatMul":
        nodes.append(n("MatMul", ["p", "v"], ["y"], name="attend"))
    else:
        nodes += [n("Reshape", ["p", "shape"], ["p2"], name="restore"), n("MatMul", ["p2", "v"], ["y"], name="attend")]
    inits = {"v": np.ones((6, 4), np.float32), "shape": np.array([1, 2, 6], np.int64)}
    model = make_model(nodes, [tensor("scores", [1, 2, 6])], [tensor("y", [1, 2, 4])], inits, opset=13)
    assert check_model(model, strict=False).ok
    plan = plan_calibration(model)
    assert plan.quantized_copies == {"p": "p__quantized"} and "p" in plan.observed
    assert plan.float_tensors == ["p"]  # the Reshape moves the integer copy


def test_a_float_softmax_output_through_reshape_to_the_output_is_fine():
    nodes = [
        helper.make_node("Softmax", ["x"], ["p"], axis=-1, name="softmax"),
        helper.make_node("Reshape", ["p", "shape"], ["y"], name="restore"),
    ]
    model = make_model(
        nodes, [tensor("x", [1, 6])], [tensor("y", [1, 2, 3])], {"shape": np.array([1, 2, 3], np.int64)}, opset=13
    )
    assert check_model(model, strict=False).ok
