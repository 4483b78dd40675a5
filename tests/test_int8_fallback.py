"""int16 models with an op the chip has no int16 kernel for (ESP-DL's int16 Resize is an empty function): the
node runs at int8 between RequantizeLinear conversions, the rest stays int16; ``strict`` refuses instead. The
table simulates, and exports to ``.espdl`` files ESP-DL's own runtime runs (when its host build is present)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from conftest import shared_dir
from espquant import Calibrator, Evaluator
from espquant.calibration.plan import plan_calibration
from espquant.calibration.precision import int8_fallbacks, tensor_widths
from espquant.cli import main
from espquant.errors import OptionError, UnsupportedModelError
from espquant.export.qdq import export_qdq
from espquant.quant.pot import exponent_for_max_abs
from espquant.report import analyze
from espquant.runtime import create_session
from espquant.simulator.espdl_model import load_espdl
from helpers import make_model, tensor

HOST = shared_dir() / "tools" / "espdl-host" / "bin"
RUNNERS = {
    "esp32c3": ("espdl_host_run", []),
    "esp32s3": ("espdl_host_run", ["--relayout", "s3"]),
    "esp32p4": ("espdl_host_run_p4round", ["--relayout", "p4"]),
}
NEAREST = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}


def conv_resize_conv(seed: int = 4) -> onnx.ModelProto:
    """Conv + Relu -> nearest 2x Resize -> Conv: the decoder step of a segmentation or super-resolution net."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Resize", ["r1", "", "scales"], ["up"], name="upsample", **NEAREST),
        helper.make_node("Conv", ["up", "w2", "b2"], ["y"], pads=[1, 1, 1, 1], name="conv2"),
    ]
    inits = {
        "w1": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.1, 4).astype(np.float32),
        "scales": np.array([1, 1, 2, 2], np.float32),
        "w2": rng.normal(0, 0.3, (2, 4, 3, 3)).astype(np.float32),
        "b2": rng.normal(0, 0.1, 2).astype(np.float32),
    }
    return make_model(nodes, [tensor("x", ["N", 3, 6, 6])], [tensor("y", ["N", 2, 12, 12])], inits)


@pytest.fixture
def data() -> np.ndarray:
    return np.random.default_rng(8).normal(0, 1, (16, 3, 6, 6)).astype(np.float32)


def _float(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return create_session(model).run(None, {"x": x})[0]


def _sqnr(reference: np.ndarray, got: np.ndarray) -> float:
    noise = np.sum((got.astype(np.float64) - reference) ** 2)
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / noise))


def test_calibration_runs_the_resize_at_int8(data, caplog):
    model = conv_resize_conv()
    with caplog.at_level("WARNING", logger="espquant.calibration.engine"):
        result = Calibrator("int16").calibrate(model, data)
    assert [(f.node, f.op_type, f.tensor) for f in result.fallbacks] == [("upsample", "Resize", "up")]
    assert "node 'upsample' (Resize) runs at int8" in caplog.text
    table = result.table
    assert table.metadata["bits"] == 16 and table.metadata["int8_fallback"] == ["up"]
    # The Resize output's exponent is an int8 one; its neighbours keep int16 exponents.
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    for name in ("r1", "up"):
        exposed.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    r1, up = create_session(exposed).run(["r1", "up"], {"x": data})
    assert table["up"] == exponent_for_max_abs(float(np.abs(up).max()), 8)
    assert table["r1"] == exponent_for_max_abs(float(np.abs(r1).max()), 16)
    with pytest.raises(UnsupportedModelError, match="Resize for int8 only, not int16.*without --strict"):
        Calibrator("int16", strict=True).calibrate(model, data)
    assert Calibrator("int8").calibrate(model, data).fallbacks == []  # nothing to fall back from


def test_the_widths_follow_the_graph():
    """Pass-through ops after the int8 node stay int8 (no conversion for a Reshape); a Concat is int8 only when
    every input is; everything else is int16."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["up"], name="up", **NEAREST),
        helper.make_node("Relu", ["up"], ["relu"], name="relu"),
        helper.make_node("Resize", ["x", "", "scales"], ["up2"], name="up2", **NEAREST),
        helper.make_node("Concat", ["relu", "up2"], ["narrow_cat"], axis=1, name="narrow_cat"),
        helper.make_node("Conv", ["narrow_cat", "w"], ["c"], name="conv"),
        helper.make_node("Concat", ["c", "relu"], ["wide_cat"], axis=1, name="wide_cat"),
    ]
    inits = {"scales": np.array([1, 1, 2, 2], np.float32), "w": rng.normal(0, 1, (2, 4, 1, 1)).astype(np.float32)}
    model = make_model(nodes, [tensor("x", ["N", 2, 3, 3])], [tensor("wide_cat", ["N", 4, 6, 6])], inits)
    plan = plan_calibration(model)
    assert [f.tensor for f in int8_fallbacks(plan, 16)] == ["up", "up2"]
    assert tensor_widths(model, plan, 16, []) == {"up": 8, "relu": 8, "up2": 8, "narrow_cat": 8}
    assert int8_fallbacks(plan, 8) == [] and tensor_widths(model, plan, 8, []) == {}


@pytest.mark.parametrize("target", sorted(RUNNERS))
def test_the_table_simulates_and_exports(tmp_path, data, target):
    model = conv_resize_conv()
    table = Calibrator("int16").calibrate(model, data).table
    evaluator = Evaluator("int16", "per-tensor", target)
    quantized = evaluator.generate_quantized_model(model, table)
    layout = [(n.op_type, n.bits) for n in quantized.nodes]
    assert layout == [("Conv", 16), ("RequantizeLinear", 8), ("Resize", 8), ("RequantizeLinear", 16), ("Conv", 16)]
    got, _ = evaluator.evaluate_quantized_model(data, to_float=True)
    reference = _float(model, data)
    assert _sqnr(reference, got[0]) > 30  # int8 in the middle: an int8 model's accuracy, not int16's
    ints = evaluator.evaluate_quantized_model(data)[0][0]
    quantized.compiled = False
    np.testing.assert_array_equal(evaluator.evaluate_quantized_model(data)[0][0], ints)
    written = evaluator.export_espdl(tmp_path / f"{target}.espdl", test_inputs=data)
    loaded = load_espdl(written)
    inputs, expected = loaded.test_values
    for name, value in loaded.run(inputs).items():
        np.testing.assert_array_equal(value, expected[name])
    assert {n.bits for n in loaded.quantized.nodes if n.op_type == "Resize"} == {8}


@pytest.mark.skipif(
    not (HOST / "espdl_host_run").is_file(), reason=f"ESP-DL's host runtime not found at {HOST} (see its README)"
)
@pytest.mark.parametrize("target", sorted(RUNNERS))
def test_espressif_runtime_runs_the_exported_file(tmp_path, data, target):
    model = conv_resize_conv()
    table = Calibrator("int16").calibrate(model, data).table
    evaluator = Evaluator("int16", "per-tensor", target)
    evaluator.generate_quantized_model(model, table)
    path = evaluator.export_espdl(tmp_path / f"{target}.espdl", test_inputs=data)
    binary, extra = RUNNERS[target]
    result = subprocess.run([str(HOST / binary), str(path), *extra], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{target}:\n{result.stdout[-1500:]}{result.stderr[-500:]}"
    assert "RESULT: PASS" in result.stdout


def test_the_layer_report_measures_the_int8_node_at_int8(data):
    model = conv_resize_conv()
    table = Calibrator("int16").calibrate(model, data).table
    analysis = analyze(model, table, data * 3, "esp32p4")  # larger than calibrated: the int8 range clips
    layers = {layer.tensor: layer for layer in analysis.layers}
    assert layers["up"].clipped_fraction > 0.01  # at int16's range nothing would clip
    assert layers["y"].sqnr_db < layers["r1"].sqnr_db


def test_qdq_export_refuses_a_table_with_int8_nodes(data):
    model = conv_resize_conv()
    table = Calibrator("int16").calibrate(model, data).table
    with pytest.raises(OptionError, match="'upsample' \\(Resize\\) run\\(s\\) at int8.*--format espdl"):
        export_qdq(model, table)


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_calibrate_evaluate_export(tmp_path, data):
    model_path, data_path, table = tmp_path / "up.onnx", tmp_path / "x.npy", tmp_path / "t.pickle"
    onnx.save(conv_resize_conv(), model_path)
    np.save(data_path, data)
    result = _run("calibrate", model_path, "--data", data_path, "--bits", "int16", "-o", table)
    assert result.exit_code == 0, result.output
    fallback_lines = [line for line in result.output.splitlines() if "int8 fallback" in line]
    assert len(fallback_lines) == 1 and "'upsample' (Resize) runs at int8" in fallback_lines[0]
    saved = json.loads(table.with_suffix(".json").read_text())
    assert saved["metadata"]["int8_fallback"] == ["up"]
    up_row = next(line for line in result.output.splitlines() if line.startswith("│ up "))
    assert f"±{127 * 2.0 ** saved['exponents']['up']:.4g}" in up_row  # its int8 range, not an int16 one
    strict = tmp_path / "strict.pickle"
    result = _run("calibrate", model_path, "--data", data_path, "--bits", "int16", "--strict", "-o", strict)
    assert result.exit_code == 1 and "Resize for int8 only, not int16" in result.output
    assert "internal error" not in result.output and not strict.exists()
    for target in RUNNERS:
        result = _run("evaluate", model_path, "--table", table, "--data", data_path, "--target", target, "--json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert report["bits"] == 16 and report["outputs"][0]["sqnr_db"] > 30
        out = tmp_path / f"{target}.espdl"
        result = _run("export", model_path, "--table", table, "--target", target, "-o", out)
        assert result.exit_code == 0 and out.is_file(), result.output
        assert _run("run", out, "--self-test").exit_code == 0
    result = _run("export", model_path, "--table", table, "--format", "qdq", "-o", tmp_path / "q.onnx")
    assert result.exit_code == 2 and "--format espdl" in result.output and not (tmp_path / "q.onnx").exists()
