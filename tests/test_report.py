"""The layer-wise error report: the analysis finds a badly scaled layer first; tables, JSON and the HTML page."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import helper

from espquant import Calibrator
from espquant.cli import main
from espquant.report import analyze
from espquant.report.render import PLOT_HINT, write_report
from helpers import make_model, tensor


def _model(rng):
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Conv", ["p", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg"], ["y"], transB=1, name="fc"),
    ]
    inits = {
        "w1": rng.normal(0, 0.4, (8, 1, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.1, 8).astype(np.float32),
        "w2": rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32),
        "b2": rng.normal(0, 0.1, 8).astype(np.float32),
        "wg": rng.normal(0, 0.2, (4, 8 * 4 * 4)).astype(np.float32),
    }
    return make_model(nodes, [tensor("x", ["N", 1, 8, 8])], [tensor("y", ["N", 4])], inits)


@pytest.fixture
def setup(rng):
    model = _model(rng)
    data = rng.normal(0, 1, (64, 1, 8, 8)).astype(np.float32)
    return model, data, Calibrator("int8").calibrate(model, data).table


def test_a_badly_scaled_layer_is_found_first(setup):
    model, data, table = setup
    good = analyze(model, table, data, "esp32p4")
    assert {layer.tensor for layer in good.layers} == {"r1", "p", "r2", "f", "y"}
    pool = next(layer for layer in good.layers if layer.tensor == "p")
    assert pool.added_sqnr_db == float("inf")  # a max pool adds no error of its own
    assert all(layer.cosine > 0.99 for layer in good.layers)
    table.exponents["r2"] -= 3  # 8x too fine: the second conv's output saturates
    bad = analyze(model, table, data, "esp32p4")
    worst = bad.worst()[0]
    assert worst.tensor == "r2" and worst.op_type == "Conv+Relu"
    assert worst.clipped_fraction > 0.05 and worst.added_sqnr_db < good.worst()[0].added_sqnr_db - 5
    # Downstream layers inherit the damage (accumulated) without adding their own.
    flatten = next(layer for layer in bad.layers if layer.tensor == "f")
    assert flatten.sqnr_db < 15 and flatten.added_sqnr_db == float("inf")


def test_a_conv_saturating_what_its_relu6_clamps_is_not_reported_as_clipping(rng):
    """The Conv before a ReLU6 takes the Clip's range and saturates values beyond 6 by design; the report
    compares it within [0, 6], where its values matter, so the Conv does not look like the worst layer."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Clip", ["c", "lo", "hi"], ["r"], name="relu6"),
    ]
    inits = {
        "w": rng.normal(0, 3.0, (4, 1, 3, 3)).astype(np.float32),  # pre-ReLU6 values far beyond +-6
        "lo": np.array(0.0, np.float32),
        "hi": np.array(6.0, np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 1, 6, 6])], [tensor("r", ["N", 4, 6, 6])], inits)
    data = rng.normal(0, 1, (32, 1, 6, 6)).astype(np.float32)
    analysis = analyze(model, Calibrator("int8").calibrate(model, data).table, data, "esp32s3")
    conv = next(layer for layer in analysis.layers if layer.tensor == "c")
    assert conv.float_max == 6.0 and conv.clipped_fraction == 0.0 and conv.sqnr_db > 30


def test_accumulated_error_is_zero_where_nothing_is_lost(rng):
    """A Relu on inputs that are exact multiples of the step: simulation equals the float model."""
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x", ["N", 16])], [tensor("y", ["N", 16])])
    data = (rng.integers(-100, 100, (8, 16)) / 64).astype(np.float32)
    analysis = analyze(model, Calibrator("int8").calibrate(model, data).table, data, "esp32s3")
    (layer,) = analysis.layers
    assert layer.sqnr_db == float("inf") and layer.max_abs_error == 0 and layer.cosine == 1.0


def test_report_files_with_and_without_matplotlib(tmp_path, setup, monkeypatch):
    pytest.importorskip("matplotlib")
    model, data, table = setup
    analysis = analyze(model, table, data, "esp32s3")
    written = write_report(analysis, tmp_path / "with")
    page = written["html"].read_text()
    assert page.count("data:image/png;base64,") >= 2 and "r2" in page
    document = json.loads(written["json"].read_text())
    assert document["worst_first"][0] == analysis.worst()[0].tensor and len(document["layers"]) == 5
    assert written["markdown"].read_text().count("\n| ") == 1 + 5
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plot extra were not installed
    written = write_report(analysis, tmp_path / "without")
    assert written["html"] == PLOT_HINT and not (tmp_path / "without" / "index.html").exists()
    assert (tmp_path / "without" / "report.md").is_file() and (tmp_path / "without" / "report.json").is_file()


def test_cli_report(tmp_path, setup):
    import onnx

    model, data, table = setup
    onnx.save(model, tmp_path / "m.onnx")
    table.save(tmp_path / "t.pickle")
    np.save(tmp_path / "x.npy", data)
    runner = CliRunner()
    args = [
        "report",
        str(tmp_path / "m.onnx"),
        "--table",
        str(tmp_path / "t.pickle"),
        "--data",
        str(tmp_path / "x.npy"),
    ]
    result = runner.invoke(main, [*args, "-o", str(tmp_path / "rep"), "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "worst layers first" in result.output and (tmp_path / "rep" / "report.md").is_file()
    result = runner.invoke(main, [*args, "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["bits"] == 8
