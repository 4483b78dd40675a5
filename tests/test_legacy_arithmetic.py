"""The legacy ESP-DL library's arithmetic (``Evaluator(..., library="legacy")``, docs/LEGACY_ARITHMETIC.md).

Two halves: hand-worked integer examples, one per rule, that run everywhere; and side-by-side runs of the
original toolkit's Evaluator (shared/legacy-toolkit, CPython 3.7 in a cached venv, see ``legacy_reference.py``)
on the demo CNN, Espressif's example MLP, a depthwise-separable CNN and small models with hand-set exponents,
skipped with the reason when the original cannot run here.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from conftest import shared_dir
from espquant import Calibrator, Evaluator
from espquant.cli.app import main
from espquant.demo import demo_model_path, load_demo_data
from espquant.errors import OptionError, TargetError, UnsupportedModelError
from espquant.optimizer import optimize_model
from espquant.simulator import legacy
from espquant.simulator.legacy import (
    LEGACY_RUN,
    build_legacy_model,
    finish_accumulator,
    legacy_bias,
    legacy_slope,
    quantize_half_even,
    shift_floor,
)
from espquant.table import QuantTable
from helpers import make_model, tensor

# --- hand-worked rules ---------------------------------------------------------------------------------------


def test_shift_truncates_toward_minus_infinity():
    # -5 / 2 = -2.5 -> -3 (floor, not -2 as half-up would give); 5 / 2 -> 2; -1 / 2 -> -1; left shift by 2: * 4.
    assert shift_floor(np.array([-5, 5, -1, 3]), 1).tolist() == [-3, 2, -1, 1]
    assert shift_floor(np.array([-5, 3]), -2).tolist() == [-20, 12]
    assert shift_floor(np.array([[-5], [-5]]), np.array([[1], [2]])).tolist() == [[-3], [-2]]


def test_constants_and_inputs_round_half_to_even():
    # k + 1/2 at exponent -3: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0, -1.5 -> -2, -2.5 -> -2; then saturate.
    halves = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 127.5, -128.5]) * 2.0**-3
    assert quantize_half_even(halves, -3, 8).tolist() == [0, 2, 2, 0, -2, -2, 127, -128]
    # Per channel: one exponent per slice along the axis.
    assert quantize_half_even(np.array([[0.75], [0.75]]), [-1, -2], 8, axis=0).tolist() == [[2], [3]]


def test_bias_lives_at_the_output_exponent_or_per_channel_at_e_in_plus_e_w_plus_4():
    bias = np.array([0.3, -0.3, 100.0])
    values, exponent = legacy_bias(bias, e_in=-6, e_w=-7, e_out=-4, bits=8)  # 0.3 * 16 = 4.8 -> 5; 1600 -> 127
    assert (values.tolist(), exponent) == ([5, -5, 127], -4)
    values, exponent = legacy_bias(bias, e_in=-6, e_w=[-7, -8, -5], e_out=-4, bits=8)
    # int16 at -9, -10, -7: 0.3 * 512 = 153.6 -> 154; -0.3 * 1024 = -307.2 -> -307; 100 * 128 = 12800.
    assert (values.tolist(), exponent) == ([154, -307, 12800], [-9, -10, -7])


def test_slopes_are_truncated_to_bits_minus_one_fraction_bits():
    # 0.1 * 128 = 12.8 -> 12; -0.2 * 128 = -25.6 -> -25 (toward zero); 1.7 * 128 = 217.6 -> 217, not saturated.
    values, exponent = legacy_slope(np.array([0.1, -0.2, 1.7]), 8)
    assert (values.tolist(), exponent) == ([12, -25, 217], -7)
    values, exponent = legacy_slope(np.array([0.1, 1.7]), 16)
    assert (values.tolist(), exponent) == ([3276, 55705], -15)


def _conv1x1(weights, bias=None, group: int = 1, pads=(0, 0, 0, 0), kernel: int = 1):
    """x (N, C, 1, W) -> y through one Conv with the given float weights (N_out, C/group, k, k)."""
    weights = np.asarray(weights, np.float32)
    inits = {"W": weights}
    inputs = ["x", "W"]
    if bias is not None:
        inits["B"] = np.asarray(bias, np.float32)
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["y"], group=group, pads=list(pads), name="conv")
    channels = weights.shape[1] * group
    return make_model([node], [tensor("x", ["N", channels, kernel, 1])], [tensor("y", None)], inits)


def _run(model, exponents, x, bits=8, target="esp32s3"):
    evaluator = Evaluator(f"int{bits}", "per-tensor", target, library="legacy")
    evaluator.generate_quantized_model(model, QuantTable(exponents))
    return evaluator.evaluate_quantized_model(np.asarray(x, np.float32))[0][0]


def test_conv_shifts_by_floor_then_adds_the_bias_then_saturates():
    # x = [3, -5] at 2^-2, w = [1, 1] at 2^-1 (float 0.5): acc = -2 at 2^-3; e_out = -1 -> shift 2:
    # floor(-2 / 4) = -1, + bias 1 (0.5 at 2^-1) = 0. (ESP-DL v3: round(-2 + 4 * 1) / 4 = 1 / half-up.)
    model = _conv1x1([[[[0.5]], [[0.5]]]], bias=[0.5])
    exps = {"x": -2, "W": -1, "B": -1, "y": -1}
    y = _run(model, exps, np.array([3, -5], np.float32).reshape(1, 2, 1, 1) / 4)
    assert y.reshape(-1).tolist() == [0]
    # A left shift: e_out = -4 < e_in + e_w = -3: acc -2 -> -4, + bias 0.5 * 16 = 8 -> 4.
    y = _run(model, {**exps, "B": -4, "y": -4}, np.array([3, -5], np.float32).reshape(1, 2, 1, 1) / 4)
    assert y.reshape(-1).tolist() == [4]


def test_int8_accumulator_saturates_at_20_bits_on_esp32s3_only():
    # 72 taps of 127 * 127 = 1161288 > 2^19 - 1: the S3's QACC clips to 524287, >> 13 = 63; esp32 keeps 32 bits:
    # 1161288 >> 13 = 141 -> saturated to 127.
    weights = np.full((1, 8, 3, 3), 127 / 128, np.float32)
    model = make_model(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="conv")],
        [tensor("x", ["N", 8, 3, 3])],
        [tensor("y", None)],
        {"W": weights},
    )
    exps = {"x": -7, "W": -7, "y": -1}
    x = np.full((1, 8, 3, 3), 127 / 128, np.float32)
    assert _run(model, exps, x).reshape(-1).tolist() == [63]
    assert _run(model, exps, x, target="esp32").reshape(-1).tolist() == [127]


def test_per_channel_goes_through_int16():
    # e_in = -2, e_w = [-1, -3], e_out = 0; x = 13, w = [1, 3]: acc = [13, 39]; >> 4 (floor): [0, 2].
    # int16 bias at e_in + e_w + 4 = [1, -1]: 0.25 * 2^-1 = 0.125 -> 0, 1.75 * 2 = 3.5 -> 4 (half to even);
    # t = [0, 6]; then shift by e_out - e_in - e_w - 4 = [-1, 1]: [0 << 1, 6 >> 1] = [0, 3].
    w = np.array([1 * 0.5, 3 * 0.125], np.float32).reshape(2, 1, 1, 1)
    model = _conv1x1(w, bias=[0.25, 1.75])
    evaluator = Evaluator("int8", "per-channel", "esp32s3", library="legacy")
    evaluator.generate_quantized_model(model, QuantTable({"x": -2, "W": [-1, -3], "B": -2, "y": 0}))
    y = evaluator.evaluate_quantized_model(np.full((1, 1, 1, 1), 13 / 4, np.float32))[0][0]
    assert y.reshape(-1).tolist() == [0, 3]
    q = evaluator.quantized
    assert q.constants["B__legacy"].tolist() == [0, 4] and q.exponents["B__legacy"] == [1, -1]


def _add_model():
    nodes = [
        helper.make_node("Conv", ["x", "Wa"], ["a"], name="ca"),
        helper.make_node("Conv", ["x", "Wb"], ["b"], name="cb"),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    one = np.ones((1, 1, 1, 1), np.float32)
    return make_model(nodes, [tensor("x", ["N", 1, 1, 1])], [tensor("y", None)], {"Wa": one, "Wb": -one})


def test_add_floors_the_finer_input_then_shifts_the_sum():
    # a = 5 at 2^-3 (0.625), b = -0.625 at 2^-5 = -20: b to 2^-3: floor(-20 / 4) = -5; sum 0;
    # x = 0.65: a = rint(5.2) = 5, b = -rint(20.8) = -21 -> floor(-21 / 4) = -6, sum -1 at 2^-3; e_out = -4: << 1.
    exps = {"x": -6, "Wa": 0, "Wb": 0, "a": -3, "b": -5, "y": -4}
    assert _run(_add_model(), exps, np.full((1, 1, 1, 1), 0.65)).reshape(-1).tolist() == [-2]
    # e_out = -1 coarser than both: sum -1 at 2^-3 >> 2 = floor(-0.25) = -1.
    assert _run(_add_model(), {**exps, "y": -1}, np.full((1, 1, 1, 1), 0.65)).reshape(-1).tolist() == [-1]


@pytest.mark.parametrize("bits", [8, 16])
def test_leaky_and_prelu_floor_the_product(bits):
    # x = -69 (int8) / -69 * 256 (int16) at the same exponent; alpha 0.1 -> 12 / 2^7 or 3276 / 2^15:
    # int8: floor(-69 * 12 / 128) = floor(-6.47) = -7; int16: floor(-17664 * 3276 / 32768) = floor(-1765.98) = -1766.
    nodes = [
        helper.make_node("LeakyRelu", ["x"], ["l"], alpha=0.1, name="leaky"),
        helper.make_node("PRelu", ["l", "slope"], ["y"], name="prelu"),
    ]
    slope = np.array([0.5, -0.2], np.float32).reshape(2, 1, 1)
    model = make_model(nodes, [tensor("x", ["N", 2, 1, 1])], [tensor("y", None)], {"slope": slope})
    scale = 1 if bits == 8 else 256
    exps = {"x": 0, "l": 0, "y": 0, "slope": -3}  # the slope's own exponent is not used: bits - 1 fraction bits
    y = _run(model, exps, np.full((1, 2, 1, 1), -69 * scale), bits=bits)
    leaky = -7 if bits == 8 else -1766
    # PRelu: 0.5 -> 64 / 2^7 (32768 / 2^16 at int16); -0.2 -> -25 / 2^7 (-6553 / 2^15).
    expected = [leaky // 2, (leaky * (-25 if bits == 8 else -6553)) >> (bits - 1)]
    assert y.reshape(-1).tolist() == expected


def test_passthrough_layers_keep_the_exponent_and_unknown_rules_are_named():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("AveragePool", ["r"], ["p"], kernel_shape=[2, 2], name="avg"),
        helper.make_node("Sub", ["p", "p"], ["s"], name="sub"),
        helper.make_node("Sigmoid", ["s"], ["y"], name="gate"),
    ]
    model = make_model(nodes, [tensor("x", ["N", 1, 4, 4])], [tensor("y", None)])
    table = QuantTable({"x": -4, "r": -3, "p": -3, "s": -3, "y": -7})
    with pytest.raises(UnsupportedModelError) as info:
        build_legacy_model(model, table, "esp32", 8)
    message = str(info.value)
    assert "node 'relu' (Relu): input exponent(s) [-4] differ from output exponent -3" in message
    assert "node 'avg' (AveragePool): the original toolkit's Evaluator averages in float" in message
    assert "node 'sub' (Sub)" in message and "node 'gate' (Sigmoid)" in message and "4 problem(s)" in message


def test_options_are_checked():
    with pytest.raises(OptionError, match="library 'v2'"):
        Evaluator("int8", "per-tensor", "esp32s3", library="v2")
    with pytest.raises(TargetError, match="esp32, esp32s2, esp32c3, esp32s3"):
        Evaluator("int8", "per-tensor", "esp32p4", library="legacy")
    evaluator = Evaluator("int8", "per-tensor", "esp32", library="legacy")
    with pytest.raises(TargetError):
        evaluator.set_target_chip("esp32c6")
    with pytest.raises(OptionError, match="ESP-DL v3 files"):
        evaluator.export_espdl("x.espdl")


# --- real models ---------------------------------------------------------------------------------------------


def _ds_cnn() -> onnx.ModelProto:
    """A depthwise-separable CNN: stem, dw + pw twice, a residual Add (three exponents), MaxPool, Gemm."""
    rng = np.random.default_rng(7)

    def w(*shape):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)

    def b(n):
        return (rng.standard_normal(n) * 0.1).astype(np.float32)

    inits = {"c1w": w(8, 1, 3, 3), "c1b": b(8), "d1w": w(8, 1, 3, 3), "d1b": b(8), "p1w": w(16, 8, 1, 1)}
    inits |= {"p1b": b(16), "d2w": w(16, 1, 3, 3), "d2b": b(16), "p2w": w(16, 16, 1, 1), "p2b": b(16)}
    inits |= {"fcw": w(10, 16 * 7 * 7), "fcb": b(10)}
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "c1w", "c1b"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="stem"),
        node("Relu", ["c1"], ["r1"], name="stem_relu"),
        node("Conv", ["r1", "d1w", "d1b"], ["d1"], pads=[1, 1, 1, 1], group=8, name="dw1"),
        node("Relu", ["d1"], ["rd1"], name="dw1_relu"),
        node("Conv", ["rd1", "p1w", "p1b"], ["p1"], name="pw1"),
        node("Relu", ["p1"], ["a1"], name="pw1_relu"),
        node("Conv", ["a1", "d2w", "d2b"], ["d2"], pads=[1, 1, 1, 1], group=16, name="dw2"),
        node("Relu", ["d2"], ["rd2"], name="dw2_relu"),
        node("Conv", ["rd2", "p2w", "p2b"], ["p2"], name="pw2"),
        node("Add", ["p2", "a1"], ["s"], name="residual"),
        node("Relu", ["s"], ["rs"], name="res_relu"),
        node("MaxPool", ["rs"], ["mp"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], name="pool"),
        node("Flatten", ["mp"], ["f"], name="flat"),
        node("Gemm", ["f", "fcw", "fcb"], ["logits"], transB=1, name="fc"),
    ]
    return make_model(nodes, [tensor("x", ["N", 1, 28, 28])], [tensor("logits", ["N", 10])], inits, opset=13)


def _espressif_mlp() -> onnx.ModelProto | None:
    path = shared_dir() / "legacy-toolkit" / "examples" / "mnist_model_example.onnx"
    return optimize_model(onnx.load(path)) if path.is_file() else None


def _models() -> dict:
    data = load_demo_data()
    images = data.test_images[:300]
    return {
        "demo_cnn": (
            lambda: optimize_model(onnx.load(demo_model_path())),
            data.calib_inputs[:200],
            data.test_inputs[:300],
        ),
        "espressif_mlp": (_espressif_mlp, data.calib_images[:200] / np.float32(255), images / np.float32(255)),
        "ds_cnn": (_ds_cnn, data.calib_inputs[:200], data.test_inputs[:300]),
    }


CONFIGS = [(8, "per-tensor"), (8, "per-channel"), (16, "per-tensor")]


@pytest.fixture(scope="module")
def original():
    from legacy_reference import legacy_python

    python, reason = legacy_python()
    if python is None:
        pytest.skip(reason)
    return python


def _scales(lm, table: QuantTable) -> dict[str, tuple[list[int], bool]]:
    """The table the original reads, from the same exponents: weights as arrays, biases at the legacy
    exponent (the output's per tensor, ``e_in + e_w[n] + 4`` per channel), as the original's own tables hold."""
    weights = {n.inputs[1] for n in lm.nodes if n.op_type in ("Conv", "Gemm", "MatMul")}
    scales = {}
    for source in (table.exponents, lm.exponents):
        for name, e in source.items():
            if name.endswith("__legacy_slope"):  # the original takes the slope from the model, not the table
                continue
            name = name.removesuffix("__legacy")
            scales[name] = ([e] if isinstance(e, int) else list(e), isinstance(e, list) or name in weights)
    return scales


def _compare(python, tmp_path, model, table, bits, granularity, x, target="esp32s3"):
    """Our legacy run and the original's, every tensor of ours by name."""
    from legacy_reference import run_original

    lm = build_legacy_model(model, table, target, bits)
    theirs = run_original(python, model, _scales(lm, table), bits, granularity, x, tmp_path / "original")
    name = lm.inputs[0]
    ours = lm.run({name: lm.quantize_input(name, x)}, keep=True)
    np.testing.assert_array_equal(ours[name], theirs[f"{name}::quantized"], err_msg="input quantization")
    return lm, ours, theirs


def _linear_sums(lm, node, env) -> np.ndarray:
    x, w = env[node.inputs[0]].astype(np.int64), lm.constants[node.inputs[1]]
    if node.op_type == "Conv":
        return legacy._conv_sums(x, w, node.attrs, int(node.attrs.get("group", 1)) > 1)
    w = w.T if node.attrs.get("transB", 0) else w
    return legacy._exact_sums(x.reshape(-1, x.shape[-1]), w.astype(np.int64)).reshape(*x.shape[:-1], w.shape[1])


def _layer_local(lm, theirs) -> dict[str, float]:
    """Each layer of ours on the original's own inputs: equal everywhere, except where the original's float32
    accumulator (``<out>/QACC``) is not the exact integer sum; there our rule must still give the original's
    output from the original's accumulator. Returns the share of exact accumulators per linear layer."""
    exact_share = {}
    theirs = {**theirs, lm.inputs[0]: theirs[lm.inputs[0] + "::quantized"]}
    for node in lm.nodes:
        env = {**lm.constants, **{t: theirs[t].astype(np.int64) for t in node.inputs if t in theirs}}
        ours = LEGACY_RUN[node.op_type](lm, node, env)[0]
        reference = theirs[node.outputs[0]]
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            np.testing.assert_array_equal(ours, reference, err_msg=node.name)
            continue
        accumulator = theirs[node.outputs[0] + "/QACC"]
        axis = 1 if node.op_type == "Conv" else -1
        np.testing.assert_array_equal(finish_accumulator(lm, node, accumulator.astype(np.int64), axis), reference)
        exact = _linear_sums(lm, node, env) == accumulator
        np.testing.assert_array_equal(ours[exact], reference[exact], err_msg=node.name)
        exact_share[node.name] = float(exact.mean())
    return exact_share


@pytest.mark.parametrize("bits,granularity", CONFIGS)
@pytest.mark.parametrize("name", ["demo_cnn", "espressif_mlp", "ds_cnn"])
def test_equals_the_original_evaluator(original, tmp_path, name, bits, granularity):
    build, calib, x = _models()[name]
    model = build()
    if model is None:
        pytest.skip("shared/legacy-toolkit/examples/mnist_model_example.onnx is not available")
    table = Calibrator(f"int{bits}", granularity, "minmax").calibrate(model, calib).table
    lm, ours, theirs = _compare(original, tmp_path, model, table, bits, granularity, x)
    output = lm.outputs[0]
    if bits == 8:  # every sum stays far below 2^24: the original's float32 graph is exact, so is the match
        for node in lm.nodes:
            np.testing.assert_array_equal(ours[node.outputs[0]], theirs[node.outputs[0]], err_msg=node.name)
        # The plain-C chips (32-bit accumulators) compute the same here: no S3 20-bit accumulator saturates.
        esp32 = build_legacy_model(model, table, "esp32", bits)
        np.testing.assert_array_equal(esp32.run({lm.inputs[0]: ours[lm.inputs[0]]})[output], theirs[output])
        return
    # int16: the original sums in float32 (products reach 2^30); layer by layer its rules are ours, and the
    # only differences come from its rounded accumulators.
    shares = _layer_local(lm, theirs)
    assert min(shares.values()) < 1.0  # the float32 rounding is real on these models ...
    agree = float(np.mean(ours[output] == theirs[output]))
    assert agree >= 0.95 and np.abs(ours[output] - theirs[output]).max() <= 2  # ... and stays within an LSB or so


def _zoo(bits: int) -> tuple[onnx.ModelProto, QuantTable]:
    """Every rule in one model with hand-set exponents: Add with finer / coarser inputs and output, LeakyRelu,
    PRelu, a padded MaxPool, Concat, Flatten and a Gemm; int16 exponents are the int8 ones minus 8."""
    rng = np.random.default_rng(3)
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "Wa", "Ba"], ["a"], name="ca"),
        node("Conv", ["x", "Wb", "Bb"], ["b"], pads=[1, 1, 1, 1], name="cb"),
        node("Add", ["a", "b"], ["s"], name="add_fine"),
        node("Add", ["b", "s"], ["t"], name="add_coarse"),
        node("LeakyRelu", ["t"], ["l"], alpha=0.1, name="leaky"),
        node("PRelu", ["l", "slope"], ["p"], name="prelu"),
        node("MaxPool", ["p"], ["m"], kernel_shape=[2, 2], pads=[0, 0, 1, 1], name="pool"),
        node("Concat", ["m", "t"], ["c"], axis=1, name="cat"),
        node("Flatten", ["c"], ["f"], name="flat"),
        node("Gemm", ["f", "Wy", "By"], ["y"], name="fc"),
    ]
    inits = {
        "Wa": rng.normal(0, 0.4, (6, 4, 1, 1)),
        "Ba": rng.normal(0, 0.2, 6),
        "Wb": rng.normal(0, 0.2, (6, 4, 3, 3)),
        "Bb": rng.normal(0, 0.2, 6),
        "slope": rng.uniform(-0.3, 0.9, (6, 1, 1)),
        "Wy": rng.normal(0, 0.1, (300, 7)),
        "By": rng.normal(0, 0.5, 7),
    }
    model = make_model(
        nodes,
        [tensor("x", ["N", 4, 5, 5])],
        [tensor("y", ["N", 7])],
        {k: v.astype(np.float32) for k, v in inits.items()},
        opset=13,
    )
    shift = 0 if bits == 8 else 8
    exps = {"x": -5, "Wa": -7, "Wb": -8, "a": -4, "b": -3, "s": -5, "t": -2, "Wy": -9, "y": -3}
    exps |= {"l": exps["t"], "p": exps["t"], "m": exps["t"], "c": exps["t"], "f": exps["t"], "slope": -7}
    exps |= {"Ba": exps["a"], "Bb": exps["b"], "By": exps["y"]}
    return model, QuantTable({k: v - shift for k, v in exps.items()})


def _per_channel_zoo() -> tuple[onnx.ModelProto, QuantTable]:
    """int8 per-channel Conv (with a left shift in one channel), depthwise Conv and Gemm."""
    rng = np.random.default_rng(5)
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "W1", "B1"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        node("Conv", ["c", "Wd", "Bd"], ["d"], pads=[1, 1, 1, 1], group=4, name="dw"),
        node("Flatten", ["d"], ["f"], name="flat"),
        node("Gemm", ["f", "Wy", "By"], ["y"], transB=1, name="fc"),
    ]
    inits = {
        "W1": rng.normal(0, 0.3, (4, 3, 3, 3)),
        "B1": rng.normal(0, 0.3, 4),
        "Wd": rng.normal(0, 0.3, (4, 1, 3, 3)),
        "Bd": rng.normal(0, 0.3, 4),
        "Wy": rng.normal(0, 0.1, (5, 64)),
        "By": rng.normal(0, 0.3, 5),
    }
    model = make_model(
        nodes,
        [tensor("x", ["N", 3, 4, 4])],
        [tensor("y", ["N", 5])],
        {k: v.astype(np.float32) for k, v in inits.items()},
        opset=13,
    )
    exps = {"x": -5, "W1": [-6, -7, -9, -14], "c": -4, "Wd": [-6, -7, -8, -6], "d": -3}
    exps |= {"f": -3, "Wy": [-8, -9, -7, -8, -10], "y": -3, "B1": -4, "Bd": -3, "By": -3}
    return model, QuantTable(exps)


@pytest.mark.parametrize("bits", [8, 16])
def test_every_rule_equals_the_original_evaluator(original, tmp_path, bits):
    model, table = _zoo(bits)
    x = np.random.default_rng(4).normal(0, 1.5, (40, 4, 5, 5)).astype(np.float32)
    lm, ours, theirs = _compare(original, tmp_path, model, table, bits, "per-tensor", x)
    _layer_local(lm, theirs)  # int16: its float32 accumulators / products are the only possible difference
    if bits == 8:
        for node in lm.nodes:
            np.testing.assert_array_equal(ours[node.outputs[0]], theirs[node.outputs[0]], err_msg=node.name)


def test_per_channel_rules_equal_the_original_evaluator(original, tmp_path):
    model, table = _per_channel_zoo()
    x = np.random.default_rng(6).normal(0, 1, (40, 3, 4, 4)).astype(np.float32)
    lm, ours, theirs = _compare(original, tmp_path, model, table, 8, "per-channel", x)
    for node in lm.nodes:
        np.testing.assert_array_equal(ours[node.outputs[0]], theirs[node.outputs[0]], err_msg=node.name)


# --- the CLI ---------------------------------------------------------------------------------------------------


@pytest.fixture
def demo_files(tmp_path):
    """The optimized demo model, an int8 table and 64 test inputs, as files."""
    data = load_demo_data()
    model = optimize_model(onnx.load(demo_model_path()))
    onnx.save(model, tmp_path / "m.onnx")
    table = Calibrator("int8", "per-tensor", "minmax").calibrate(model, data.calib_inputs[:64]).table
    table.save(tmp_path / "t.pickle")
    np.save(tmp_path / "x.npy", data.test_inputs[:64])
    return tmp_path / "m.onnx", tmp_path / "t.pickle", tmp_path / "x.npy"


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_evaluate_with_the_legacy_library(demo_files):
    import json

    model, table, x = demo_files
    options = ["--target", "esp32", "--library", "legacy", "--json"]
    result = _cli("evaluate", model, "--table", table, "--data", x, *options)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["library"] == "legacy" and report["target"] == "esp32" and report["top1_agreement"] > 0.9


def test_cli_cpp_export_prints_the_legacy_simulation_next_to_v3(demo_files, tmp_path):
    model, table, x = demo_files
    result = _cli("export", model, "--table", table, "--format", "cpp", "-o", tmp_path / "cpp", "--test-input", x)
    assert result.exit_code == 0, result.output
    assert "ESP-DL v3 on esp32s3" in result.output and "legacy ESP-DL (C++ files) on esp32s3" in result.output
    assert (tmp_path / "cpp" / "m_coefficient.cpp").is_file()


_READ_TABLE = r"""
import sys, numpy as np, onnx
toolkit, model_path, table_path, x_path, bits = sys.argv[1:6]
sys.path[:0] = [toolkit + '/linux', toolkit]
from evaluator import Evaluator
evaluator = Evaluator(bits, 'per-tensor', 'esp32s3')
evaluator.generate_quantized_model(onnx.load(model_path), table_path)
outputs, names = evaluator.evalute_quantized_model(np.load(x_path), False)
np.save(x_path + '.out.npy', np.asarray(outputs[0]))
"""


@pytest.mark.parametrize("bits", ["int8", "int16"])
def test_the_original_evaluator_reads_tables_espquant_writes(original, tmp_path, bits):
    """generate_quantization_table writes what the original calibrator pickled (scales, weights as arrays,
    biases at the legacy exponent, numpy-1 readable); the original Evaluator runs it and computes what the
    legacy profile simulates."""
    import subprocess

    from legacy_reference import toolkit_dir

    model = _ds_cnn()
    x = np.random.default_rng(5).normal(0, 1, (16, *_input_shape(model))).astype(np.float32)
    model.ir_version = min(model.ir_version, 7)  # what the original's onnxruntime 1.7 loads (README_FIRST.md)
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", x)
    table = Calibrator(bits, "per-tensor", "minmax").generate_quantization_table(model, x, tmp_path / "t.pickle")
    args = [str(toolkit_dir()), str(tmp_path / "m.onnx"), str(tmp_path / "t.pickle"), str(tmp_path / "x.npy"), bits]
    result = subprocess.run([str(original), "-c", _READ_TABLE, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    theirs = np.load(tmp_path / "x.npy.out.npy")
    lm = build_legacy_model(model, table, "esp32s3", int(bits[3:]))
    ours = lm.run({lm.inputs[0]: lm.quantize_input(lm.inputs[0], x)})[lm.outputs[0]]
    if bits == "int8":
        np.testing.assert_array_equal(ours.reshape(theirs.shape), theirs)
    else:  # the original sums int16 products in float32 (docs/LEGACY_ARITHMETIC.md)
        assert np.abs(ours.reshape(theirs.shape).astype(np.int64) - theirs.astype(np.int64)).max() <= 1


def _input_shape(model: onnx.ModelProto) -> tuple[int, ...]:
    return tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
