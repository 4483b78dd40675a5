"""The QDQ exporter: a float model plus its quantization table -> QuantizeLinear/DequantizeLinear at 2^e.

Checked here: the result is valid ONNX that onnxruntime runs with near-float accuracy; every scale is the
table's power of two with a zero point 0 of the activation width; the integer weights and biases are the
simulator's; per-channel axes; the chip's RequantizeLinear edges, fused Relu and float tensors; agreement
with the simulator; and the clear errors for bad tables and existing outputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from espquant import Calibrator, Evaluator
from espquant.demo import demo_model_path, float_accuracy, load_demo_data
from espquant.errors import OptionError, QuantTableError
from espquant.export.qdq import QDQ_OPSET, export_qdq, qdq_agreement, save_qdq
from espquant.graph import opset_version
from espquant.optimizer import optimize_model
from espquant.runtime import create_session
from espquant.simulator.lowering import lower_for_target
from espquant.table import QuantTable
from helpers import make_model, run, tensor

CONFIGS = [("int8", "per-tensor"), ("int8", "per-channel"), ("int16", "per-tensor")]
ZERO_DTYPE = {8: np.int8, 16: np.int16}


@pytest.fixture(scope="module")
def demo():
    model = optimize_model(onnx.load(str(demo_model_path())))
    return model, load_demo_data()


@pytest.fixture(scope="module")
def tables(demo):
    model, data = demo
    calib = data.calib_inputs  # all 1000 digits: then the residual Add needs the chip's RequantizeLinear
    return {config: Calibrator(*config, "minmax").calibrate(model, calib).table for config in CONFIGS}


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _axis(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "axis"), None)


def _weight_dq(qdq: onnx.ModelProto, node_name: str, position: int) -> onnx.NodeProto:
    """The DequantizeLinear feeding input ``position`` of the node called ``node_name``."""
    node = next(n for n in qdq.graph.node if n.name == node_name)
    producer = _producers(qdq)[node.input[position]]
    assert producer.op_type == "DequantizeLinear"
    return producer


def _constant_dqs(qdq: onnx.ModelProto) -> list[onnx.NodeProto]:
    inits = _initializers(qdq)
    return [n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(c))
def test_demo_qdq_is_valid_runs_and_keeps_accuracy(demo, tables, config):
    model, data = demo
    qdq = export_qdq(model, tables[config])
    onnx.checker.check_model(qdq, full_check=True)
    bits = tables[config].bits
    assert opset_version(qdq) >= QDQ_OPSET[bits]
    assert [i.name for i in qdq.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in qdq.graph.output] == [o.name for o in model.graph.output]
    types = {n.op_type for n in qdq.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= types
    # no float weight is left: every Conv/Gemm reads its weight and bias through a DequantizeLinear
    producers = _producers(qdq)
    for node in qdq.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            assert all(producers[name].op_type == "DequantizeLinear" for name in node.input)
    reference = float_accuracy(model.SerializeToString(), data.test_inputs, data.test_labels)
    quantized = float_accuracy(qdq.SerializeToString(), data.test_inputs, data.test_labels)
    assert quantized >= reference - 1.0, (quantized, reference)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(c))
def test_scales_are_the_tables_powers_of_two_with_zero_points_of_the_width(demo, tables, config):
    model, _ = demo
    table = tables[config]
    qdq = export_qdq(model, table)
    inits = _initializers(qdq)
    producers = _producers(qdq)
    graph_input = model.graph.input[0].name
    pairs = 0
    for node in qdq.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] in inits:
            continue
        quantize = producers[node.input[0]]
        assert quantize.op_type == "QuantizeLinear"
        assert list(quantize.input[1:]) == list(node.input[1:])  # one scale and zero point for the pair
        scale, zero = inits[node.input[1]], inits[node.input[2]]
        assert scale.dtype == np.float32 and scale.shape == ()
        assert zero.dtype == ZERO_DTYPE[table.bits] and zero.shape == () and zero == 0
        exponent = int(np.log2(scale))
        assert scale == np.float32(2.0**exponent)
        output = node.output[0]
        if output in table.exponents:  # an activation pair: the DequantizeLinear writes the tensor's own name
            assert exponent == table.exponents[output]
            pairs += 1
        elif quantize.input[0] == graph_input:  # the graph input keeps its name: consumers read the DQ output
            assert exponent == table.exponents[graph_input]
            pairs += 1
        else:  # the chip's RequantizeLinear before the Add: the table records where it goes and to what
            assert "_requantized" in output
            assert exponent in [r["to_exponent"] for r in table.metadata["requantize"]]
    first = next(n for n in qdq.graph.node if graph_input in n.input)
    assert first.op_type == "QuantizeLinear" and inits[first.input[1]] == 2.0 ** table.exponents[graph_input]
    assert pairs >= 8
    for dq in _constant_dqs(qdq):
        weight = dq.input[0].removesuffix("_quantized")
        expected = np.float32(2.0 ** np.asarray(table.exponents[weight], dtype=np.float64))
        np.testing.assert_array_equal(inits[dq.input[1]], expected)
        if len(dq.input) > 2:
            zero = inits[dq.input[2]]
            assert zero.dtype == ZERO_DTYPE[table.bits] and not zero.any()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(c))
def test_integer_weights_and_biases_are_the_simulators(demo, tables, config):
    model, _ = demo
    table = tables[config]
    qdq = export_qdq(model, table)
    simulated = Evaluator(config[0], config[1], "esp32p4").generate_quantized_model(model, table)
    inits = _initializers(qdq)
    checked = 0
    for dq in _constant_dqs(qdq):
        name = dq.input[0].removesuffix("_quantized")
        ints = inits[dq.input[0]]
        is_bias = len(dq.input) == 2
        assert ints.dtype == (np.int32 if is_bias else ZERO_DTYPE[table.bits])
        np.testing.assert_array_equal(ints.astype(np.int64), simulated.constants[name])
        checked += 1
    assert checked == 10  # 5 layers: 5 weights and 5 biases
    float_names = {t.name for t in model.graph.initializer}
    assert not float_names & set(inits)  # the float weights are gone


def test_input_model_is_not_modified(demo, tables):
    model, _ = demo
    before = model.SerializeToString(deterministic=True)
    for table in tables.values():
        export_qdq(model, table)
    assert model.SerializeToString(deterministic=True) == before
    assert opset_version(model) == 17  # the int16 export upgraded a copy only


def test_fused_relu_gets_the_pair_after_the_relu_only(demo, tables):
    model, _ = demo
    qdq = export_qdq(model, tables[("int8", "per-tensor")])
    producers = _producers(qdq)
    consumers = {name: [n for n in qdq.graph.node if name in n.input] for n in qdq.graph.node for name in n.output}
    first_conv = next(n for n in qdq.graph.node if n.op_type == "Conv")
    assert [c.op_type for c in consumers[first_conv.output[0]]] == ["Relu"]  # no pair before the Relu
    relu = consumers[first_conv.output[0]][0]
    assert [c.op_type for c in consumers[relu.output[0]]] == ["QuantizeLinear"]
    # the residual Add reads the MaxPool output requantized from 2^-4 to 2^-3, as the chip does
    assert [r["tensor"] for r in tables[("int8", "per-tensor")].metadata["requantize"]] == [
        "/features/features.3/MaxPool_output_0"
    ]
    add = next(n for n in qdq.graph.node if n.op_type == "Add")
    requant = producers[add.input[0]]
    assert requant.op_type == "DequantizeLinear" and producers[requant.input[0]].op_type == "QuantizeLinear"
    source = producers[requant.input[0]].input[0]
    assert source == "/features/features.3/MaxPool_output_0"
    scales = _initializers(qdq)
    table = tables[("int8", "per-tensor")]
    assert scales[requant.input[1]] == 2.0 ** table.exponents[add.output[0].removesuffix("_float")]
    assert table.exponents[source] != table.exponents[add.output[0].removesuffix("_float")]


def _linear_model(rng, trans_b: int) -> tuple[onnx.ModelProto, np.ndarray]:
    # x -> Conv -> Relu -> ConvTranspose -> Flatten -> Gemm(transB) -> y
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("ConvTranspose", ["r", "Wt", "Bt"], ["t"], strides=[2, 2], name="deconv"),
        helper.make_node("Flatten", ["t"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "Wf", "Bf"], ["y"], transB=trans_b, name="fc"),
    ]
    fc_shape = (5, 3 * 8 * 8) if trans_b else (3 * 8 * 8, 5)
    inits = {
        # per-channel scales differ: each output channel has its own range
        "W": (rng.normal(0, 0.3, (4, 2, 3, 3)) * np.array([1, 4, 0.25, 2])[:, None, None, None]).astype(np.float32),
        "B": rng.normal(0, 0.1, 4).astype(np.float32),
        "Wt": (rng.normal(0, 0.3, (4, 3, 2, 2)) * np.array([1, 8, 0.5])[None, :, None, None]).astype(np.float32),
        "Bt": rng.normal(0, 0.1, 3).astype(np.float32),
        "Wf": (
            rng.normal(0, 0.1, fc_shape) * np.geomspace(0.25, 4, 5)[(slice(None), None) if trans_b else None]
        ).astype(np.float32),
        "Bf": rng.normal(0, 0.1, 5).astype(np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 2, 4, 4])], [tensor("y", ["N", 5])], inits)
    return model, rng.normal(0, 1, (64, 2, 4, 4)).astype(np.float32)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_per_channel_axes_for_conv_conv_transpose_and_gemm(rng, trans_b):
    model, data = _linear_model(rng, trans_b)
    table = Calibrator("int8", "per-channel", "minmax").calibrate(model, data).table
    for name in ("W", "Wt", "Wf"):
        assert len(set(table.exponents[name])) > 1  # really per channel
    qdq = export_qdq(model, table)
    inits = _initializers(qdq)
    for node_name, weight, axis in [("conv", "W", 0), ("deconv", "Wt", 1), ("fc", "Wf", 0 if trans_b else 1)]:
        dq = _weight_dq(qdq, node_name, 1)
        assert _axis(dq) == axis
        ints = inits[dq.input[0]]
        assert ints.dtype == np.int8 and ints.shape[axis] == len(table.exponents[weight])
        np.testing.assert_array_equal(inits[dq.input[1]], 2.0 ** np.asarray(table.exponents[weight]))
        bias = _weight_dq(qdq, node_name, 2)
        assert inits[bias.input[0]].dtype == np.int32 and _axis(bias) == 0
    simulated = Evaluator("int8", "per-channel", "esp32p4").generate_quantized_model(model, table)
    for weight in ("W", "Wt", "Wf", "B", "Bt", "Bf"):
        np.testing.assert_array_equal(inits[f"{weight}_quantized"], simulated.constants[weight])
    reference = run(model, {"x": data})[0]
    quantized = run(qdq, {"x": data})[0]
    assert np.abs(quantized - reference).max() < 0.1 * np.abs(reference).max()
    report = qdq_agreement(model, table, "esp32p4", data)
    assert report["y"]["equal_fraction"] >= 0.95 and report["y"]["top1_agreement"] >= 0.95


def test_agreement_with_the_simulator_on_the_demo(demo, tables):
    model, data = demo
    inputs = data.test_inputs[:1000]
    table = tables[("int8", "per-tensor")]
    p4 = qdq_agreement(model, table, "esp32p4", inputs)["logits"]
    assert p4["elements"] == 1000 * 10
    # ESP32-P4 rounds half-to-even like onnxruntime's QuantizeLinear: the int8 values agree
    assert p4["equal_fraction"] >= 0.99 and p4["top1_agreement"] >= 0.99
    s3 = qdq_agreement(model, table, "esp32s3", inputs)["logits"]
    assert s3["top1_agreement"] >= 0.99
    assert s3["max_abs_diff"] <= 8 * 2.0 ** table.exponents["logits"]  # a few steps of 2^e at most
    int16 = qdq_agreement(model, tables[("int16", "per-tensor")], "esp32p4", inputs[:300])["logits"]
    assert int16["top1_agreement"] >= 0.99
    assert int16["max_abs_diff"] <= 4 * 2.0 ** tables[("int16", "per-tensor")].exponents["logits"]


def test_float_tensors_get_no_pair_and_int16_upgrades_the_opset(rng):
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("ReduceMean", ["c"], ["m"], axes=[2, 3], keepdims=0, name="mean"),
        helper.make_node("Gemm", ["m", "Wf", "Bf"], ["g"], transB=1, name="fc"),
        helper.make_node("Softmax", ["g"], ["y"], axis=1, name="softmax"),
    ]
    inits = {
        "W": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
        "B": rng.normal(0, 0.1, 4).astype(np.float32),
        "Wf": rng.normal(0, 0.5, (5, 4)).astype(np.float32),
        "Bf": rng.normal(0, 0.1, 5).astype(np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 3, 6, 6])], [tensor("y", ["N", 5])], inits, opset=13)
    data = rng.normal(0, 1, (32, 3, 6, 6)).astype(np.float32)
    for bits in ("int8", "int16"):
        table = Calibrator(bits, "per-tensor", "minmax").calibrate(model, data).table
        assert table.metadata["float_tensors"] == ["y"]
        qdq = export_qdq(model, table)
        assert opset_version(qdq) == (13 if bits == "int8" else 21)
        producers = _producers(qdq)
        assert producers["y"].op_type == "Softmax"  # the float output: no pair
        assert producers[producers["y"].input[0]].op_type == "DequantizeLinear"  # its input is quantized
        np.testing.assert_allclose(run(qdq, {"x": data})[0], run(model, {"x": data})[0], atol=0.02)
        report = qdq_agreement(model, table, "esp32p4", data)["y"]
        assert report["top1_agreement"] == 1.0 and report["max_abs_diff"] < 1e-3


def test_int16_bias_beyond_int32_stays_float_at_its_quantized_value(rng):
    # inputs near 1 (2^-15) and tiny weights (2^-26): a bias of 3 needs 3 * 2^41, far beyond int32
    node = helper.make_node("Gemm", ["x", "W", "B"], ["y"], transB=1, name="fc")
    inits = {"W": rng.uniform(-1e-4, 1e-4, (3, 4)).astype(np.float32), "B": np.array([3.0, -2.5, 1e-3], np.float32)}
    model = make_model([node], [tensor("x", ["N", 4])], [tensor("y", ["N", 3])], inits)
    data = rng.uniform(-1, 1, (16, 4)).astype(np.float32)
    table = Calibrator("int16", "per-tensor", "minmax").calibrate(model, data).table
    qdq = export_qdq(model, table)
    bias_input = next(n for n in qdq.graph.node if n.op_type == "Gemm").input[2]
    bias = _initializers(qdq)[bias_input]
    assert bias.dtype == np.float32
    exponent = table.exponents["B"]
    # the integers of the ESP32-P4 lowering: its int16 layers keep 40-bit biases, so 3 * 2^41 saturates there
    ints = np.clip(np.rint(inits["B"].astype(np.float64) * 2.0**-exponent), -(2.0**39), 2.0**39 - 1)
    np.testing.assert_array_equal(bias, (ints * 2.0**exponent).astype(np.float32))
    assert bias[2] == np.float32(np.rint(1e-3 * 2.0**-exponent) * 2.0**exponent)  # in range: exact


def test_a_table_of_another_model_is_refused(demo, tables):
    model, _ = demo
    unoptimized = onnx.load(str(demo_model_path()))
    with pytest.raises(QuantTableError, match="another model"):
        export_qdq(unoptimized, tables[("int8", "per-tensor")])
    incomplete = dataclasses.replace(
        tables[("int8", "per-tensor")],
        exponents={k: v for k, v in tables[("int8", "per-tensor")].exponents.items() if k != "fc.weight"},
    )
    with pytest.raises(QuantTableError, match="fc.weight"):
        export_qdq(model, incomplete)


def test_bit_width_mismatch_and_legacy_tables(demo, tables, tmp_path):
    model, data = demo
    table = tables[("int8", "per-tensor")]
    with pytest.raises(QuantTableError, match="int8"):
        export_qdq(model, table, bits="int16")
    legacy = QuantTable(dict(table.exponents), {})  # the legacy toolkit's plain dict: no bit width, no hash
    with pytest.raises(OptionError, match="bits"):
        export_qdq(model, legacy)
    path, _ = legacy.save(tmp_path / "legacy.pickle")
    from_path = export_qdq(model, path, bits=8)
    expected = export_qdq(model, table)
    assert from_path.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
    with pytest.raises(QuantTableError, match="no such quantization table"):
        export_qdq(model, tmp_path / "missing.pickle")


def test_save_qdq_refuses_an_existing_file_without_force(demo, tables, tmp_path):
    model, data = demo
    table = tables[("int8", "per-channel")]
    target = tmp_path / "model_qdq.onnx"
    assert save_qdq(model, table, target) == target
    saved = onnx.load(str(target))
    onnx.checker.check_model(saved)
    session = create_session(target.read_bytes())
    logits = session.run(None, {"input": data.test_inputs[:8]})[0]
    assert logits.shape == (8, 10)
    target.write_bytes(b"precious")
    with pytest.raises(OptionError, match="use --force") as error:
        save_qdq(model, table, target)
    assert str(target) in str(error.value)
    assert target.read_bytes() == b"precious"
    save_qdq(model, table, target, force=True)
    assert onnx.load(str(target)).graph.output[0].name == "logits"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_qdq.onnx"]  # no temporary file left behind


def test_constants_take_the_exponent_the_chip_gives_them_and_agree_exactly_on_p4(rng):
    # Clip bounds and the Pad value at their input's exponent, a constant Add operand at the Add's output
    # exponent, a Concat input requantized to the shared exponent, an int8 Sigmoid table, an average pool,
    # and a MatMul that absorbs its Relu
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Clip", ["c", "lo", "hi"], ["k"], name="clip"),
        helper.make_node("Add", ["k", "cst"], ["a"], name="add"),
        helper.make_node("Sigmoid", ["a"], ["s"], name="sigmoid"),
        helper.make_node("Concat", ["s", "c"], ["cat"], axis=1, name="concat"),
        helper.make_node("Pad", ["cat", "pads", "pv"], ["p"], mode="constant", name="pad"),
        helper.make_node("AveragePool", ["p"], ["ap"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Flatten", ["ap"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "M"], ["mm"], name="matmul"),
        helper.make_node("Relu", ["mm"], ["y"], name="relu"),
    ]
    inits = {
        "W": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
        "B": rng.normal(0, 0.1, 4).astype(np.float32),
        "lo": np.array(-1.0, np.float32),
        "hi": np.array(2.0, np.float32),
        "cst": rng.normal(0, 0.5, (1, 4, 1, 1)).astype(np.float32),
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
        "pv": np.array(0.25, np.float32),
        "M": rng.normal(0, 0.3, (8 * 4 * 4, 6)).astype(np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 3, 6, 6])], [tensor("y", ["N", 6])], inits, opset=13)
    data = rng.normal(0, 1, (64, 3, 6, 6)).astype(np.float32)
    table = Calibrator("int8", "per-tensor", "minmax").calibrate(model, data).table
    exps = table.exponents
    assert exps["cst"] != exps["a"] and exps["s"] != exps["cat"]  # the chip really rescales both
    qdq = export_qdq(model, table)
    inits_q = _initializers(qdq)
    producers = _producers(qdq)
    for node_name, position, exponent in [
        ("clip", 1, exps["c"]),
        ("clip", 2, exps["c"]),
        ("add", 1, exps["a"]),
        ("pad", 2, exps["cat"]),
        ("concat", 0, exps["cat"]),
    ]:
        dq = _weight_dq(qdq, node_name, position)
        assert inits_q[dq.input[1]] == 2.0**exponent, (node_name, position)
    assert producers["mm"].op_type == "MatMul"  # no pair between the MatMul and its Relu
    assert "pads" in inits_q and inits_q["pads"].dtype == np.int64  # integer parameters stay as they are
    report = qdq_agreement(model, table, "esp32p4", data)["y"]
    assert report["equal_fraction"] >= 0.99 and report["max_abs_diff"] <= 2.0 ** exps["y"]


def test_cli_export_qdq_reports_the_agreement(tmp_path):
    from click.testing import CliRunner

    from espquant.cli import main

    model = optimize_model(onnx.load(demo_model_path()))
    data = load_demo_data()
    onnx.save(model, tmp_path / "m.onnx")
    Calibrator("int8").calibrate(model, data.calib_inputs[:200]).table.save(tmp_path / "t.pickle")
    np.save(tmp_path / "x.npy", data.test_inputs[:64])
    args = ["export", str(tmp_path / "m.onnx"), "--table", str(tmp_path / "t.pickle"), "--format", "qdq"]
    result = CliRunner().invoke(main, [*args, "--target", "esp32p4", "--test-input", str(tmp_path / "x.npy")])
    assert result.exit_code == 0, result.output
    assert "100.00%" in result.output and (tmp_path / "m_qdq.onnx").is_file()
    assert CliRunner().invoke(main, args).exit_code == 2  # exists: --force needed


def test_a_softmax_read_by_a_matmul_is_quantized_once_for_it_and_stays_float_as_an_output(rng):
    # PP-OCR's recognizer: Softmax (float32 on the chip) -> Reshape -> MatMul. The lowering inserts the
    # QuantizeLinear ESP-PPQ writes; QDQ shows it as one pair on the Reshape's input; the output stays float.
    nodes = [
        helper.make_node("Softmax", ["x"], ["p"], name="softmax", axis=-1),
        helper.make_node("Reshape", ["p", "shape"], ["r"], name="reshape"),
        helper.make_node("MatMul", ["r", "v"], ["y"], name="matmul"),
    ]
    model = make_model(
        nodes,
        [tensor("x", ["N", 4, 6]), tensor("v", ["N", 6, 8])],
        [tensor("y", ["N", 4, 8]), tensor("p", ["N", 4, 6])],
        {"shape": np.array([0, 4, 6])},
    )
    data = {"x": rng.normal(0, 2, (64, 4, 6)).astype(np.float32), "v": rng.normal(0, 1, (64, 6, 8)).astype(np.float32)}
    table = Calibrator("int8", "per-tensor", "minmax").calibrate(model, data).table
    assert table.exponents["p"] == table.exponents["r"] == -6  # scores up to 1.0 at int8, kept as one copy
    quantized = lower_for_target(model, table, "esp32p4")
    copy = next(n for n in quantized.nodes if n.op_type == "QuantizeLinear")
    assert copy.inputs == ["p"] and quantized.exponents[copy.outputs[0]] == -6 and "p" in quantized.float_tensors
    qdq = export_qdq(model, table)
    producers = _producers(qdq)
    assert producers["p"].op_type == "Softmax"  # the float output keeps no pair
    reshape = next(n for n in qdq.graph.node if n.op_type == "Reshape")
    assert producers[reshape.input[0]].op_type == "DequantizeLinear"
    report = qdq_agreement(model, table, "esp32p4", data)
    assert report["y"]["equal_fraction"] >= 0.99 and report["p"]["max_abs_diff"] < 1e-6
    expected = run(model, data)[0]
    simulated = Evaluator("int8", "per-tensor", "esp32s3")
    simulated.generate_quantized_model(model, table)
    outputs, _ = simulated.evaluate_quantized_model(data, to_float=True)
    assert np.abs(outputs[0] - expected).max() <= 0.1 * np.abs(expected).max()


def test_a_silu_is_one_pair_around_its_two_float_nodes_and_agrees_exactly_on_p4(rng):
    # x * Sigmoid(x) is one Swish module on the chip (one rounding): the QDQ model keeps Sigmoid and Mul in float
    # between one pair, and agrees with the simulated P4 integers exactly
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        n("Sigmoid", ["c"], ["s"], name="gate"),
        n("Mul", ["c", "s"], ["h"], name="silu"),
        n("Conv", ["h", "w2"], ["y"], name="project"),
    ]
    inits = {
        "w": rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32),
        "w2": rng.normal(0, 0.5, (2, 4, 1, 1)).astype(np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 2, 8, 8])], inits)
    data = rng.normal(0, 1, (32, 3, 8, 8)).astype(np.float32)
    table = Calibrator("int8").calibrate(model, data).table
    producers = _producers(export_qdq(model, table))
    assert producers["s"].op_type == "Sigmoid" and producers[producers["s"].input[0]].op_type == "DequantizeLinear"
    assert qdq_agreement(model, table, "esp32p4", data)["y"]["equal_fraction"] == 1.0
