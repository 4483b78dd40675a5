"""Mixed precision: int16 layers in an int8 model through the table, the calibrator, the simulator (compiled and
interpreted), the .espdl exporter, and the suggestions of the report."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from espquant import Calibrator, Evaluator
from espquant.cli import main
from espquant.demo import demo_model_path, load_demo_data
from espquant.errors import OptionError, QuantTableError
from espquant.espdl.reader import read_espdl
from espquant.optimizer import optimize_model
from espquant.report.mixed import suggest_int16, weight_bytes
from espquant.simulator.espdl_model import load_espdl
from espquant.table import QuantTable

PW, ADD = "/features/features.4/pw/Conv_output_0", "/features/features.4/Add_output_0"


@pytest.fixture(scope="module")
def demo():
    return optimize_model(onnx.load(demo_model_path())), load_demo_data()


@pytest.fixture(scope="module")
def mixed_table(demo):
    model, data = demo
    calibrator = Calibrator("int8")
    calibrator.set_int16_layers(["/features/features.4/pw/Conv", ADD])  # a node name and a tensor name
    return calibrator.calibrate(model, data.calib_inputs[:300]).table


def test_the_table_records_the_int16_layers_and_their_exponents(tmp_path, demo, mixed_table):
    model, data = demo
    plain = Calibrator("int8").calibrate(model, data.calib_inputs[:300]).table
    assert mixed_table.metadata["int16_layers"] == sorted([PW, ADD])
    assert mixed_table.exponents[PW] == plain.exponents[PW] - 8  # same range, 8 more bits
    assert all(mixed_table.exponents[k] == plain.exponents[k] for k in plain.exponents if "features.0" in k)
    for suffix in (".pickle", ".json"):
        mixed_table.save(tmp_path / "t.pickle")
        loaded = QuantTable.load((tmp_path / "t.pickle").with_suffix(suffix))
        assert loaded.metadata["int16_layers"] == mixed_table.metadata["int16_layers"]
        assert loaded.exponents == mixed_table.exponents


@pytest.mark.parametrize("target", ["esp32s3", "esp32p4", "esp32c3"])
def test_simulated_and_exported_with_widths_per_layer(tmp_path, demo, mixed_table, target):
    model, data = demo
    evaluator = Evaluator("int8", "per-tensor", target)
    quantized = evaluator.generate_quantized_model(model, mixed_table)
    widths = {n.outputs[0]: n.bits for n in quantized.nodes}
    assert widths[PW] == widths[ADD] == widths["/features/features.4/act/Relu_output_0"] == 16  # Relu follows
    assert widths["logits"] == 8 and widths["/features/features.0/features.0.2/Relu_output_0"] == 8
    conversions = [n for n in quantized.nodes if n.op_type == "RequantizeLinear"]
    assert {n.bits for n in conversions} == {8, 16}  # into the int16 block and out of it
    assert quantized.constants[quantized.nodes[[n.outputs[0] for n in quantized.nodes].index(PW)].inputs[1]].max() > 127
    fast = evaluator.evaluate_quantized_model(data.test_inputs[:256])[0][0]
    quantized.compiled = False
    slow = evaluator.evaluate_quantized_model(data.test_inputs[:256])[0][0]
    np.testing.assert_array_equal(fast, slow)
    quantized.compiled = True
    accuracy = float((fast.argmax(axis=1) == data.test_labels[:256]).mean())
    assert accuracy > 0.97
    path = evaluator.export_espdl(tmp_path / "mixed.espdl", data.test_inputs)
    decoded = read_espdl(path)
    kinds = {n.outputs[0]: n.quant_type for n in decoded.nodes}
    assert kinds[PW] == kinds[ADD] == "S16" and kinds["logits"] == "S8"
    pw = next(n for n in decoded.nodes if n.outputs[0] == PW)
    assert decoded.initializers[pw.inputs[1]].dtype == "INT16" and decoded.initializers[pw.inputs[2]].dtype == "INT64"
    assert decoded.values[ADD].dtype == "INT16"
    loaded = load_espdl(path)
    ints = quantized.quantize_input(quantized.inputs[0], data.test_inputs[:128])
    got = loaded.run({quantized.inputs[0]: np.transpose(ints, loaded.onnx_layout(quantized.inputs[0]))})["logits"]
    np.testing.assert_array_equal(got, quantized.run({quantized.inputs[0]: ints})["logits"])


def test_bad_int16_layer_requests(demo):
    model, data = demo
    calibrator = Calibrator("int8")
    calibrator.set_int16_layers(["no_such_layer"])
    with pytest.raises(QuantTableError, match="'no_such_layer'"):
        calibrator.calibrate(model, data.calib_inputs[:32])
    with pytest.raises(OptionError, match="int8 model"):
        Calibrator("int16").set_int16_layers([PW])


def test_suggest_int16_follows_the_analysis_and_measures_each_step(demo):
    model, data = demo
    table = Calibrator("int8").calibrate(model, data.calib_inputs[:300]).table
    images = data.test_inputs[:200]
    result = suggest_int16(model, table, images, "esp32p4", count=2, calibration_data=data.calib_inputs[:300])
    assert result.metric == "agreement" and result.float_accuracy == 100.0
    assert [len(s.int16_layers) for s in result.steps] == [0, 2]
    assert result.steps[1].weight_bytes > result.steps[0].weight_bytes
    assert result.table is not None and result.table.metadata["int16_layers"] == sorted(result.steps[1].int16_layers)
    evaluator = Evaluator("int8", "per-tensor", "esp32p4")
    assert weight_bytes(evaluator.generate_quantized_model(model, result.table)) == result.steps[1].weight_bytes
    budget = suggest_int16(model, table, images, "esp32p4", budget=100.0, labels=data.test_labels[:200])
    assert budget.metric == "accuracy" and len(budget.steps) == 1  # already within the budget: nothing added
    with pytest.raises(OptionError, match="either count"):
        suggest_int16(model, table, images, "esp32p4")
    everything = suggest_int16(model, table, images[:64], "esp32p4", count=100)  # more than there are layers
    last = everything.steps[-1]
    assert last.int16_layers[-1] == "input" and len(last.int16_layers) == len(set(last.int16_layers))
    assert last.accuracy >= 98.0 and last.weight_bytes > 2 * everything.steps[0].weight_bytes * 0.9


def test_cli_report_suggests_and_writes_the_mixed_table(tmp_path, demo):
    model, data = demo
    onnx.save(model, tmp_path / "m.onnx")
    Calibrator("int8").calibrate(model, data.calib_inputs[:300]).table.save(tmp_path / "t.pickle")
    np.save(tmp_path / "x.npy", data.test_inputs[:100])
    np.save(tmp_path / "y.npy", data.test_labels[:100])
    args = [
        "report",
        str(tmp_path / "m.onnx"),
        "--table",
        str(tmp_path / "t.pickle"),
        "--data",
        str(tmp_path / "x.npy"),
    ]
    result = CliRunner().invoke(main, [*args, "--labels", str(tmp_path / "y.npy"), "--suggest-int16", "1"])
    assert result.exit_code == 0, result.output
    assert "none (all int8)" in result.output and (tmp_path / "t_mixed.pickle").is_file()
    assert QuantTable.load(tmp_path / "t_mixed.pickle").metadata["int16_layers"]
    result = CliRunner().invoke(main, [*args, "--suggest-int16", "1", "--budget", "0.5"])
    assert result.exit_code == 2


def test_an_int16_clip_compares_with_bounds_at_its_own_input_exponent(rng):
    """Clip's min / max are raw integers at the exponent the node reads its input with: an int16 Clip whose
    input comes from an int8 layer reads it widened (e - 8), so its bounds must be quantized there too."""
    from onnx import helper

    from helpers import make_model, tensor

    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="relu6"),
    ]
    inits = {
        "w": rng.normal(0, 1, (4, 2, 1, 1)).astype(np.float32),
        "lo": np.array([0.0], np.float32),
        "hi": np.array([6.0], np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 2, 3, 3])], [tensor("y", ["N", 4, 3, 3])], inits)
    data = 4 * rng.normal(0, 1, (16, 2, 3, 3)).astype(np.float32)
    calibrator = Calibrator("int8")
    calibrator.set_int16_layers(["relu6"])
    evaluator = Evaluator("int8", "per-tensor", "esp32p4")
    evaluator.generate_quantized_model(model, calibrator.calibrate(model, data).table)
    got = evaluator.evaluate_quantized_model(data, to_float=True)[0][0]
    assert got.max() == pytest.approx(6.0, abs=0.05) and got.min() == 0.0


def test_an_int16_conv_takes_its_relu6_along(rng):
    """The Clip after a Conv is that layer's activation: an int16 Conv makes it int16 too (an int8 Clip
    would round the int16 Conv output back to int8 through a RequantizeLinear at once)."""
    from onnx import helper

    from helpers import make_model, tensor

    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Clip", ["c", "lo", "hi"], ["k"], name="relu6"),
        helper.make_node("Conv", ["k", "w2"], ["y"], name="conv2"),
    ]
    inits = {
        "w": rng.normal(0, 1, (4, 2, 1, 1)).astype(np.float32),
        "w2": rng.normal(0, 1, (4, 4, 1, 1)).astype(np.float32),
        "lo": np.array(0.0, np.float32),
        "hi": np.array(6.0, np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 2, 3, 3])], [tensor("y", ["N", 4, 3, 3])], inits)
    data = 4 * rng.normal(0, 1, (16, 2, 3, 3)).astype(np.float32)
    calibrator = Calibrator("int8")
    calibrator.set_int16_layers(["conv"])
    table = calibrator.calibrate(model, data).table
    assert table.exponents["c"] == table.exponents["k"] == -12  # 6 at int16: 32767 * 2^-12 = 7.99
    quantized = Evaluator("int8", "per-tensor", "esp32p4").generate_quantized_model(model, table)
    assert quantized.widths["c"] == quantized.widths["k"] == 16
    requantized = [n.inputs[0] for n in quantized.nodes if n.op_type == "RequantizeLinear"]
    assert requantized == ["x", "k"]  # widened into the int16 conv, narrowed into the int8 conv2: none between
    values = quantized.run({"x": quantized.quantize_input("x", data)}, keep=True)
    assert values["k"].max() == 6 * 2**12


def test_formats_without_mixed_precision_refuse_a_mixed_table(tmp_path, demo, mixed_table):
    from espquant.export.cpp import export_coefficient_to_cpp
    from espquant.export.qdq import export_qdq

    model, _ = demo
    with pytest.raises(OptionError, match="mixed-precision table"):
        export_qdq(model, mixed_table)
    with pytest.raises(OptionError, match="one width per model"):
        export_coefficient_to_cpp(model, mixed_table, "esp32s3", tmp_path, "m")
    assert not list(tmp_path.iterdir())


def test_an_int16_graph_input_round_trips(tmp_path, demo):
    """Naming the graph input makes the chip quantize the image to int16 for the first (int16) layer."""
    model, data = demo
    first = "/features/features.0/features.0.0/Conv"
    calibrator = Calibrator("int8")
    calibrator.set_int16_layers(["input", first])
    table = calibrator.calibrate(model, data.calib_inputs[:200]).table
    evaluator = Evaluator("int8", "per-tensor", "esp32s3")
    quantized = evaluator.generate_quantized_model(model, table)
    assert quantized.width("input") == 16 and quantized.nodes[0].bits == 16
    assert quantized.quantize_input("input", data.test_inputs[:1]).max() > 127
    path = evaluator.export_espdl(tmp_path / "m.espdl", data.test_inputs)
    loaded = load_espdl(path)
    assert loaded.inputs[0].dtype == "INT16"
    ints = quantized.quantize_input("input", data.test_inputs[:64])
    got = loaded.run({"input": np.transpose(ints, loaded.onnx_layout("input"))})["logits"]
    np.testing.assert_array_equal(got, quantized.run({"input": ints})["logits"])


@pytest.mark.parametrize("method", ["minmax", "auto"])
def test_a_softmax_whose_int8_exp_table_would_overflow_runs_at_int16(tmp_path, rng, caplog, method):
    """Logits beyond +-88 (127 * 2^e with e >= 0): ESP-DL's int8 Softmax looks exp(q 2^e) up without subtracting
    the maximum, so the chip gets inf / NaN. Calibration runs that Softmax at int16 (the input widened by a
    RequantizeLinear, exactly), says so, and the simulator and the exported file agree."""
    from onnx import helper

    from helpers import make_model, run, tensor

    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["l"], name="fc"),
        helper.make_node("Softmax", ["l"], ["y"], name="sm"),
    ]
    model = make_model(nodes, [tensor("x", ["N", 16])], [tensor("y", ["N", 40])],
                       {"w": rng.normal(0, 10, (16, 40)).astype(np.float32)})
    data = rng.normal(0, 1, (64, 16)).astype(np.float32)
    with caplog.at_level("WARNING", logger="espquant.advice"):
        table = Calibrator("int8", "per-tensor", method).calibrate(model, data).table
    assert table.metadata["int16_layers"] == ["y"] and table.exponents["l"] >= 0
    assert "'sm' runs at int16" in caplog.text
    evaluator = Evaluator("int8", "per-tensor", "esp32s3")
    quantized = evaluator.generate_quantized_model(model, table)
    softmax = next(n for n in quantized.nodes if n.op_type == "Softmax")
    assert softmax.bits == 16 and quantized.width(softmax.inputs[0]) == 16
    outputs, _ = evaluator.evaluate_quantized_model(data, to_float=True)
    expected = run(model, {"x": data})[0]
    assert np.isfinite(outputs[0]).all() and (outputs[0].argmax(1) == expected.argmax(1)).mean() >= 0.9
    path = evaluator.export_espdl(tmp_path / "m.espdl", data[:1])
    node = next(n for n in read_espdl(path).nodes if n.op_type == "Softmax")
    assert node.attributes["quant_type"] == "S16"
    # Without the widening, the same exponents give NaN on the chip (what the table above avoids).
    plain = QuantTable(dict(table.exponents), {**table.metadata, "int16_layers": []})
    int8 = Evaluator("int8", "per-tensor", "esp32s3")
    int8.generate_quantized_model(model, plain)
    assert np.isnan(int8.evaluate_quantized_model(data, to_float=True)[0][0]).any()
