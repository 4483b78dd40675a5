"""``espquant quantize`` / ``espquant.quantize``: the whole chain in one call.

End to end from the command line for a C chip, the ESP32-S3 and the ESP32-P4 at int8 and int16 (the file passes
``run --self-test`` and, when present, Espressif's runtime); the same numbers as the manual chain; one JSON
document; every output guard; an incompatible model stops with every problem before any work; a generator
is read once."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

import espquant
from espquant.api.quantize import default_method
from espquant.cli import main
from espquant.errors import UnsupportedModelError
from espquant.runtime import create_session
from helpers import bn_node, bn_params, make_model, tensor
from test_espdl_host import HOST, RUNNERS

SAMPLES = 40


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def model_path(tmp_path):
    """Conv + BatchNormalization (the optimizer folds it) + Relu + MaxPool + Gemm: 10 classes."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        bn_node("c", "b"),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "W2", "b2"], ["y"], transB=1, name="fc"),
    ]
    inits = {
        "W": rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32),
        **bn_params(rng, 8),
        "W2": rng.normal(0, 0.2, (10, 8 * 4 * 4)).astype(np.float32),
        "b2": rng.normal(0, 0.1, 10).astype(np.float32),
    }
    path = tmp_path / "net.onnx"
    onnx.save(make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 10])], inits), path)
    return path


@pytest.fixture
def data(tmp_path, model_path):
    rng = np.random.default_rng(6)
    x = rng.normal(0, 1, (SAMPLES, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    scores = create_session(onnx.load(model_path)).run(None, {"x": x})[0]
    labels = scores.argmax(1)
    labels[::5] = (labels[::5] + 1) % 10  # not all right: accuracy below 100%
    np.save(tmp_path / "y.npy", labels)
    return tmp_path / "x.npy", tmp_path / "y.npy"


@pytest.mark.parametrize(("target", "bits"), [(t, b) for t in ("esp32c3", "esp32s3", "esp32p4") for b in (8, 16)])
def test_quantize_end_to_end_from_the_command_line(tmp_path, model_path, data, target, bits):
    output = tmp_path / f"out_{target}_{bits}.espdl"
    result = _run("quantize", model_path, "--data", data[0], "--target", target, "--bits", bits, "-o", output, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["self_test_passed"] is True and document["bits"] == bits and document["target"] == target
    assert document["calibration_samples"] == SAMPLES - 8 and document["evaluation"]["samples"] == 8
    assert document["file_bytes"] == output.stat().st_size
    assert any("BatchNormalization" in line for line in document["optimizer_fused"])
    assert len(document["worst_layers"]) == 3
    assert document["evaluation"]["outputs"][0]["sqnr_db"] > (15 if bits == 8 else 40)
    checked = _run("run", output, "--self-test", "--json")
    assert checked.exit_code == 0, checked.output
    assert all(row["equal"] for row in json.loads(checked.stdout)["outputs"])
    if (HOST / "espdl_host_run").is_file():  # Espressif's own runtime code (tests/test_espdl_host.py)
        binary, extra = RUNNERS[target]
        ran = subprocess.run([str(HOST / binary), str(output), *extra], capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, ran.stdout[-1500:] + ran.stderr[-500:]


def test_same_numbers_as_the_manual_chain(tmp_path, model_path, data):
    x, y = np.load(data[0]), np.load(data[1])
    held = 8  # the last 20% of 40
    np.save(tmp_path / "calib.npy", x[:-held])
    np.save(tmp_path / "eval.npy", x[-held:])
    np.save(tmp_path / "eval_y.npy", y[-held:])
    method = default_method()
    assert _run("optimize", model_path, "-o", tmp_path / "manual.onnx").exit_code == 0
    assert _run("calibrate", tmp_path / "manual.onnx", "--data", tmp_path / "calib.npy", "--method", method,
                "-o", tmp_path / "manual.pickle").exit_code == 0  # fmt: skip
    calibrated = tmp_path / "manual_model.onnx"  # written when calibration changed the weights (CLE ...)
    evaluated_model = calibrated if calibrated.exists() else tmp_path / "manual.onnx"
    evaluation = ["--data", tmp_path / "eval.npy", "--labels", tmp_path / "eval_y.npy", "--target", "esp32p4"]
    manual = _run("evaluate", evaluated_model, "--table", tmp_path / "manual.pickle", *evaluation, "--json")
    assert manual.exit_code == 0, manual.output
    one = _run("quantize", model_path, "--data", data[0], "--labels", data[1], "--target", "esp32p4", "--json")
    assert one.exit_code == 0, one.output
    expected, got = json.loads(manual.stdout), json.loads(one.stdout)["evaluation"]
    for key in ("samples", "float_accuracy", "quantized_accuracy", "top1_agreement", "outputs"):
        assert got[key] == expected[key], key
    assert 0 < got["float_accuracy"] < 1
    table = json.loads((tmp_path / "net_esp32p4_calib.json").read_text())
    assert table["exponents"] == json.loads((tmp_path / "manual.json").read_text())["exponents"]


def test_eval_data_with_labels_reports_accuracy_and_a_readable_summary(tmp_path, model_path, data):
    result = _run("quantize", model_path, "--data", data[0], "--eval-data", data[0], "--labels", data[1],
                  "--target", "esp32s3", "--workdir", tmp_path, "-o", tmp_path / "a.espdl")  # fmt: skip
    assert result.exit_code == 0, result.output
    text = result.stdout
    for needle in ("float accuracy", "int8 accuracy", "SQNR", "worst layer 1", "espquant report", "file size",
                   "fuse_bn_into_conv", "int8 fallback", "self-test", "passed"):  # fmt: skip
        assert needle in text, needle
    assert f"{SAMPLES} samples" in text  # evaluated on all of --eval-data, calibrated on all of --data


def test_json_is_one_document_on_stdout(model_path, data):
    result = CliRunner().invoke(main, ["quantize", str(model_path), "--data", str(data[0]), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)  # nothing else on stdout
    assert document["format"] == "espdl" and document["method"] == default_method()


@pytest.mark.parametrize("fmt", ["qdq", "cpp"])
def test_other_formats_use_the_export_paths(tmp_path, model_path, data, fmt):
    output = tmp_path / ("q.onnx" if fmt == "qdq" else "cpp")
    if fmt == "cpp":
        output.mkdir()
    result = _run("quantize", model_path, "--data", data[0], "--format", fmt, "-o", output, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    if fmt == "qdq":
        assert onnx.load(output).graph.node and document["qdq_agreement"]
    else:
        assert sorted(p.suffix for p in output.iterdir() if "coefficient" in p.name) == [".cpp", ".hpp", ".hpp"]


def test_every_output_is_guarded(tmp_path, model_path, data):
    output = tmp_path / "g.espdl"
    first = _run("quantize", model_path, "--data", data[0], "-o", output, "--json")
    assert first.exit_code == 0, first.output
    before = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = _run("quantize", model_path, "--data", data[0], "-o", output)
    assert again.exit_code == 2 and "already exist" in again.output and "--force" in again.output
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before  # nothing touched
    assert _run("quantize", model_path, "--data", data[0], "-o", output, "--force").exit_code == 0
    model_bytes, data_bytes = model_path.read_bytes(), data[0].read_bytes()
    for output_path in (model_path, data[0]):
        refused = _run("quantize", model_path, "--data", data[0], "-o", output_path, "--force")
        assert refused.exit_code == 1 and "never writes over its own inputs" in refused.output
    # The intermediate optimized model would land on the input model itself: refused even with --force.
    clash = tmp_path / "m_esp32s3_optimized.onnx"
    clash.write_bytes(model_bytes)
    refused = _run("quantize", clash, "--data", data[0], "-o", tmp_path / "m_esp32s3.espdl", "--force")
    assert refused.exit_code == 1 and "never writes over its own inputs" in refused.output
    assert clash.read_bytes() == model_bytes and model_path.read_bytes() == model_bytes
    assert data[0].read_bytes() == data_bytes


def test_an_incompatible_model_stops_with_every_problem(tmp_path):
    nodes = [
        helper.make_node("Max", ["x", "x"], ["a"], name="max1"),
        helper.make_node("Min", ["a", "x"], ["b"], name="min1"),
        helper.make_node("Relu", ["b"], ["y"], name="relu"),
    ]
    path = tmp_path / "bad.onnx"
    onnx.save(make_model(nodes, [tensor("x", ["N", 4])], [tensor("y", ["N", 4])]), path)
    np.save(tmp_path / "x.npy", np.ones((4, 4), np.float32))
    result = _run("quantize", path, "--data", tmp_path / "x.npy")
    assert result.exit_code == 1
    assert "max1" in result.output and "min1" in result.output and "2 problem(s)" in result.output
    assert not list(tmp_path.glob("*.pickle")) and not list(tmp_path.glob("*.espdl"))


def test_python_api_with_a_model_proto_and_a_generator(tmp_path, model_path, data):
    x = np.load(data[0])
    pulled = []

    def batches():
        for start in range(0, SAMPLES, 4):
            pulled.append(start)
            yield x[start : start + 4]

    stream = batches()
    result = espquant.quantize(onnx.load(model_path), stream, tmp_path / "gen.espdl", target="esp32s3",
                               num_of_bits=8, calib_steps=100, progress=False)  # fmt: skip
    assert pulled == list(range(0, SAMPLES, 4))  # every batch produced once
    assert next(stream, None) is None
    assert result.evaluation.samples == 8 and result.calibration_samples == 32  # the last 2 of 10 batches held out
    assert all(row["equal"] for row in result.self_test)
    steps = espquant.quantize(model_path, x, tmp_path / "steps.espdl", calib_steps=1, batch_size=8, progress=False)
    assert steps.calibration_samples == 8


def test_quantize_torch_exports_and_quantizes(tmp_path):
    pytest.importorskip("torch")
    import torch

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten())
    data = np.random.default_rng(0).random((10, 3, 6, 6)).astype(np.float32)
    result = espquant.quantize_torch(module, torch.zeros(1, 3, 6, 6), data, tmp_path / "t.espdl", progress=False)
    assert all(row["equal"] for row in result.self_test)


def test_incompatible_python_api_raises_before_any_work(tmp_path):
    nodes = [helper.make_node("Max", ["x", "x"], ["y"], name="m")]
    model = make_model(nodes, [tensor("x", ["N", 4])], [tensor("y", ["N", 4])])

    def never():
        raise AssertionError("the data was read before the check")
        yield

    with pytest.raises(UnsupportedModelError, match="'m'"):
        espquant.quantize(model, never(), tmp_path / "m.espdl", progress=False)


def test_quantize_a_folder_of_images(tmp_path, model_path):
    Image = pytest.importorskip("PIL.Image")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(7)
    for k in range(10):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(folder / f"{k:02d}.png")
    spec = "resize=8x8,scale=1/255,mean=0.5,0.5,0.5,std=0.5,0.5,0.5,layout=NCHW,color=RGB"
    result = _run("quantize", model_path, "--data", folder, "--preprocess", spec, "--target", "esp32p4",
                  "-o", tmp_path / "img.espdl", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["calibration_samples"] == 8 and document["evaluation"]["samples"] == 2
    assert document["self_test_passed"] is True


def test_a_calibration_that_changes_the_weights_is_what_gets_exported(tmp_path):
    """Cross-layer equalization (method 'auto', another part of the calibrator) changes the float weights: the
    kept model, the evaluation and the export all use that model, which the table belongs to."""
    from espquant.calibration import engine

    if "auto" not in engine.CALIBRATION_METHODS[8]:
        pytest.skip("no 'auto' calibration method in this calibrator")
    rng = np.random.default_rng(9)
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2", "b2"], ["y"], pads=[1, 1, 1, 1], name="conv2"),
    ]
    scale = np.array([0.05, 1.0, 4.0, 0.5], np.float32)[:, None, None, None]  # unequal channels: CLE acts
    inits = {
        "W1": (rng.normal(0, 0.5, (4, 3, 3, 3)) * scale).astype(np.float32),
        "b1": rng.normal(0, 0.1, 4).astype(np.float32),
        "W2": rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32),
        "b2": rng.normal(0, 0.1, 4).astype(np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 3, 6, 6])], [tensor("y", ["N", 4, 6, 6])], inits)
    x = rng.normal(0, 1, (20, 3, 6, 6)).astype(np.float32)
    result = espquant.quantize(model, x, tmp_path / "cle.espdl", method="auto", progress=False)
    assert all(row["equal"] for row in result.self_test)
    kept = onnx.load(result.optimized_model)
    from espquant.table import QuantTable, graph_hash

    assert QuantTable.load(result.table).metadata["graph_hash"] == graph_hash(kept)


def test_input_shape_pins_a_dynamic_model_as_esp_ppq_takes_it(tmp_path):
    """Height and width left dynamic: the checker refuses the model; ESP-PPQ's ``input_shape`` pins them."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["y"], name="flat"),
    ]
    weights = {"W": rng.normal(0, 0.4, (5, 3, 3, 3)).astype(np.float32), "b": np.full(5, 0.1, np.float32)}
    model = make_model(nodes, [tensor("x", ["N", 3, "H", "W"])], [tensor("y", ["N", 5])], weights)
    path = tmp_path / "dyn.onnx"
    onnx.save(model, path)
    np.save(tmp_path / "x.npy", rng.normal(0, 1, (10, 3, 6, 6)).astype(np.float32))
    refused = _run("quantize", path, "--data", tmp_path / "x.npy")
    assert refused.exit_code == 1 and "dynamic" in refused.output.lower()
    pinned = _run("quantize", path, "--data", tmp_path / "x.npy", "--input-shape", "1,3,6,6", "--no-test-values",
                  "--target", "esp32c3", "--bits", "16", "--json")  # fmt: skip
    assert pinned.exit_code == 0, pinned.output
    assert json.loads(pinned.stdout)["self_test_passed"] is True
    result = espquant.quantize(model, np.load(tmp_path / "x.npy"), tmp_path / "py.espdl", input_shape=[1, 3, 6, 6],
                               num_of_bits=16, target="esp32c3", export_test_values=False, progress=False)  # fmt: skip
    assert result.evaluation.to_dict()["outputs"] == json.loads(pinned.stdout)["evaluation"]["outputs"]
