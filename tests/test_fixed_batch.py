"""Models that fix their batch (every TFLite-converted model, many PyTorch exports: input ``[1, ...]``, a Reshape
to ``[1, K]``): calibrate, evaluate, report and the QDQ comparison run them B samples at a time and give what
the same model with a dynamic batch gives. ``dataset.Chunking`` is the one place that decides it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from espquant import Calibrator, Evaluator
from espquant.calibration.dataset import Chunking
from espquant.cli import main
from espquant.errors import DatasetError, ModelError
from espquant.export.qdq import qdq_agreement
from espquant.report import analyze
from espquant.runtime import create_session
from helpers import make_model, tensor

SAMPLES = 10
TARGETS = ("esp32s3", "esp32p4", "esp32c3")


def tflite_like(batch: int | str, seed: int = 5) -> onnx.ModelProto:
    """A tf2onnx-style classifier: NHWC input, Transpose to NCHW, Conv, Relu, Reshape to ``[batch, 64]``, Gemm.
    ``batch`` an int fixes it (the Reshape target too), a name keeps it dynamic (Reshape to ``[-1, 64]``); the
    weights depend on ``seed`` only, so both forms compute the same function."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2], name="nhwc_to_nchw"),
        helper.make_node("Conv", ["t", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Reshape", ["r1", "shape"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1, name="fc"),
    ]
    inits = {
        "w1": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.1, 4).astype(np.float32),
        "shape": np.array([batch if isinstance(batch, int) else -1, 64], np.int64),
        "w2": rng.normal(0, 0.3, (10, 64)).astype(np.float32),
        "b2": rng.normal(0, 0.1, 10).astype(np.float32),
    }
    return make_model(nodes, [tensor("x", [batch, 8, 8, 3])], [tensor("y", [batch, 10])], inits)


@pytest.fixture
def data() -> np.ndarray:
    return np.random.default_rng(11).normal(0, 1, (SAMPLES, 8, 8, 3)).astype(np.float32)


def test_onnxruntime_itself_refuses_other_batches(data):
    # What every path below must avoid: the fixed model fed a whole batch.
    with pytest.raises(Exception, match="Expected: 1"):
        create_session(tflite_like(1)).run(None, {"x": data})


# --- the helper ---------------------------------------------------------------------------------------------


def test_chunking_reads_the_declared_first_dimension():
    assert Chunking.of(tflite_like(1)).fixed == 1
    assert Chunking.of(tflite_like(2)).fixed == 2
    assert Chunking.of(tflite_like("N")).fixed is None
    assert Chunking.of(None).fixed is None
    two_inputs = make_model(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        [tensor("a", [1, 4]), tensor("b", [2, 4])],
        [tensor("y", [2, 4])],
    )
    with pytest.raises(ModelError, match="different batch sizes"):
        Chunking.of(two_inputs)


def test_chunking_steps_splits_and_joins():
    assert Chunking(None).step(64) == 64 and Chunking(1).step(64) == 64
    assert Chunking(3).step(64) == 63 and Chunking(8).step(5) == 8
    calls: list[int] = []

    def run_once(feeds):
        calls.append(len(feeds["x"]))
        x = feeds["x"]
        return [x * 2, x.sum(axis=1)[0]]  # one output with the batch axis, one without

    x = np.arange(16, dtype=np.float32).reshape(8, 2)
    out = Chunking(2).run(run_once, {"x": x})
    assert calls == [2, 2, 2, 2]
    np.testing.assert_array_equal(out[0], x * 2)
    np.testing.assert_array_equal(out[1], [x[i : i + 2].sum(axis=1)[0] for i in range(0, 8, 2)])  # stacked
    calls.clear()
    out = Chunking(None).run(run_once, {"x": x})  # a dynamic batch: one run, outputs as they are
    assert calls == [8] and out[0].shape == (8, 2)
    with pytest.raises(DatasetError, match="holds 7 samples, but the model fixes its batch to 2"):
        Chunking(2).run(run_once, {"x": x[:7]})


# --- the API --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_calibration_equals_the_dynamic_model(data, method):
    fixed = Calibrator("int8", "per-tensor", method).calibrate(tflite_like(1), data, batch_size=4)
    dynamic = Calibrator("int8", "per-tensor", method).calibrate(tflite_like("N"), data, batch_size=4)
    assert fixed.samples == dynamic.samples == SAMPLES
    assert fixed.table.exponents == dynamic.table.exponents
    # Iterable batches are split into runs of B too.
    streamed = Calibrator("int8", "per-tensor", method).calibrate(tflite_like(1), (data[i : i + 3] for i in (0, 3, 6)))
    assert streamed.samples == 9


@pytest.mark.parametrize("bits", ["int8", "int16"])
def test_evaluator_equals_the_dynamic_model(data, bits):
    fixed, dynamic = tflite_like(1), tflite_like("N")
    fixed_table = Calibrator(bits).calibrate(fixed, data).table
    dynamic_table = Calibrator(bits).calibrate(dynamic, data).table
    assert fixed_table.exponents == dynamic_table.exponents
    for target in TARGETS:
        ours, theirs = Evaluator(bits, "per-tensor", target), Evaluator(bits, "per-tensor", target)
        ours.generate_quantized_model(fixed, fixed_table)
        theirs.generate_quantized_model(dynamic, dynamic_table)
        got, names = ours.evaluate_quantized_model(data)
        want, _ = theirs.evaluate_quantized_model(data)
        assert names == ["y"] and got[0].shape == (SAMPLES, 10)
        np.testing.assert_array_equal(got[0], want[0])
        ours.quantized.compiled = False  # the interpreter applies the Reshape to [1, 64] too
        np.testing.assert_array_equal(ours.evaluate_quantized_model(data)[0][0], want[0])


def test_report_analysis_equals_the_dynamic_model(data):
    fixed, dynamic = tflite_like(1), tflite_like("N")
    table = Calibrator("int8").calibrate(fixed, data).table
    dynamic_table = Calibrator("int8").calibrate(dynamic, data).table
    ours = analyze(fixed, table, data, "esp32s3", batch_size=4)
    theirs = analyze(dynamic, dynamic_table, data, "esp32s3", batch_size=4)
    assert ours.samples == theirs.samples == SAMPLES
    assert [layer.tensor for layer in ours.layers] == [layer.tensor for layer in theirs.layers]
    for a, b in zip(ours.layers, theirs.layers):
        _assert_close_fields(a.to_dict(), b.to_dict(), a.tensor)  # float sums in another grouping
    assert ours.histograms.keys() == theirs.histograms.keys()
    for name, (counts, edges) in ours.histograms.items():
        np.testing.assert_array_equal(counts, theirs.histograms[name][0])
        np.testing.assert_allclose(edges, theirs.histograms[name][1])


def test_mixed_precision_search_equals_the_dynamic_model(data):
    from espquant.report.mixed import suggest_int16

    fixed, dynamic = tflite_like(1), tflite_like("N")
    ours = suggest_int16(fixed, Calibrator("int8").calibrate(fixed, data).table, data, "esp32s3", count=1)
    theirs = suggest_int16(dynamic, Calibrator("int8").calibrate(dynamic, data).table, data, "esp32s3", count=1)
    assert ours.to_dict() == theirs.to_dict() and len(ours.steps) == 2
    assert ours.table is not None and ours.table.exponents == theirs.table.exponents


def test_qdq_agreement_equals_the_dynamic_model(data):
    fixed, dynamic = tflite_like(1), tflite_like("N")
    table = Calibrator("int8").calibrate(fixed, data).table
    dynamic_table = Calibrator("int8").calibrate(dynamic, data).table
    for target in ("esp32s3", "esp32p4"):
        ours = qdq_agreement(fixed, table, target, data)
        assert ours == qdq_agreement(dynamic, dynamic_table, target, data)
        assert ours["y"]["elements"] == SAMPLES * 10


def test_a_fixed_batch_of_two_runs_two_at_a_time(data):
    fixed, dynamic = tflite_like(2), tflite_like("N")
    eight = data[:8]
    table = Calibrator("int8").calibrate(fixed, eight, batch_size=3).table  # slices of 2 samples
    dynamic_table = Calibrator("int8").calibrate(dynamic, eight).table
    assert table.exponents == dynamic_table.exponents
    evaluator = Evaluator("int8", "per-tensor", "esp32p4")
    evaluator.generate_quantized_model(fixed, table)
    reference = Evaluator("int8", "per-tensor", "esp32p4")
    reference.generate_quantized_model(dynamic, dynamic_table)
    np.testing.assert_array_equal(
        evaluator.evaluate_quantized_model(eight)[0][0], reference.evaluate_quantized_model(eight)[0][0]
    )
    # A number of samples the batch does not divide is refused, naming both numbers, wherever data goes in.
    with pytest.raises(DatasetError, match="holds 7 samples, but the model fixes its batch to 2"):
        Calibrator("int8").calibrate(fixed, data[:7])
    with pytest.raises(DatasetError, match="batch starting at sample 4 holds 3 samples"):
        Calibrator("int8").calibrate(fixed, iter([data[:4], data[4:7]]))
    with pytest.raises(DatasetError, match="multiple of 2"):
        evaluator.evaluate_quantized_model(data[:7])
    with pytest.raises(DatasetError, match="multiple of 2"):
        analyze(fixed, table, data[:7], "esp32p4")
    with pytest.raises(DatasetError, match="multiple of 2"):
        qdq_agreement(fixed, table, "esp32p4", data[:7])


def test_simulate_reads_each_float_model_it_is_given(data):
    """``simulate`` keeps the float model's shapes and chunking between calls (a batch-1 caller's overhead), but
    a call with another float model object reads that one: its fixed batch is honoured at once."""
    from espquant.simulator.simulate import simulate

    dynamic, fixed = tflite_like("N"), tflite_like(2)
    table = Calibrator("int8").calibrate(dynamic, data[:8]).table
    quantized = Evaluator("int8", "per-tensor", "esp32s3").generate_quantized_model(dynamic, table)
    first, _ = simulate(quantized, dynamic, data[:7])  # any number: the batch is free
    with pytest.raises(DatasetError, match="multiple of 2"):
        simulate(quantized, fixed, data[:7])
    again, _ = simulate(quantized, dynamic, data[:7])
    np.testing.assert_array_equal(first[0], again[0])


# --- the command line -------------------------------------------------------------------------------------------


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _calibrate_evaluate_report_export(tmp_path, model: onnx.ModelProto, name: str, data: np.ndarray) -> dict:
    """Every command that feeds data, on ``model``; their JSON results and the table's exponents."""
    model_path, data_path = tmp_path / f"{name}.onnx", tmp_path / f"{name}_x.npy"
    onnx.save(model, model_path)
    np.save(data_path, data)
    table = tmp_path / f"{name}.pickle"
    result = _run("calibrate", model_path, "--data", data_path, "-o", table, "--batch-size", 4)
    assert result.exit_code == 0, result.output
    results = {"table": json.loads(table.with_suffix(".json").read_text())["exponents"]}
    for target in TARGETS:
        result = _run("evaluate", model_path, "--table", table, "--data", data_path, "--target", target, "--json")
        assert result.exit_code == 0, result.output
        results[f"evaluate {target}"] = json.loads(result.output)
    result = _run("report", model_path, "--table", table, "--data", data_path, "--json")
    assert result.exit_code == 0, result.output
    results["report"] = json.loads(result.output)
    qdq = tmp_path / f"{name}_qdq.onnx"
    args = ["export", model_path, "--table", table, "--format", "qdq", "--target", "esp32p4"]
    result = _run(*args, "--test-input", data_path, "-o", qdq)
    assert result.exit_code == 0, result.output
    results["qdq"] = [line for line in result.output.splitlines() if line.startswith("│ y")]
    assert results["qdq"], result.output
    return results


def _assert_close_fields(ours: dict, theirs: dict, where: object) -> None:
    """Numbers equal up to float sums in another grouping, everything else exactly (pytest.approx refuses
    mappings that hold strings from pytest 9.2 on)."""
    assert ours.keys() == theirs.keys(), where
    for key, value in ours.items():
        if isinstance(value, float) and isinstance(theirs[key], float):
            assert value == pytest.approx(theirs[key], rel=1e-9, nan_ok=True), (where, key)
        else:
            assert value == theirs[key], (where, key)


def test_cli_commands_on_a_fixed_batch_model_equal_the_dynamic_model(tmp_path, data):
    ours = _calibrate_evaluate_report_export(tmp_path, tflite_like(1), "fixed", data)
    theirs = _calibrate_evaluate_report_export(tmp_path, tflite_like("N"), "dynamic", data)
    assert ours["table"] == theirs["table"]
    for target in TARGETS:
        a, b = ours[f"evaluate {target}"], theirs[f"evaluate {target}"]
        assert a["samples"] == b["samples"] == SAMPLES and a["top1_agreement"] == b["top1_agreement"]
        for x, y in zip(a["outputs"], b["outputs"]):
            assert x["sqnr_db"] == pytest.approx(y["sqnr_db"], rel=1e-9)
            assert x["max_abs_error"] == pytest.approx(y["max_abs_error"], rel=1e-9)
    a, b = ours["report"], theirs["report"]
    assert a["samples"] == b["samples"] == SAMPLES and a["worst_first"] == b["worst_first"]
    for x, y in zip(a["layers"], b["layers"]):
        _assert_close_fields(x, y, x.get("tensor"))
    assert ours["qdq"] == theirs["qdq"]


def test_cli_a_batch_pinned_by_optimize_input_shape(tmp_path, data):
    """PyTorch's ``x.view(x.size(0), -1)`` exports a Shape chain; ``optimize --input-shape x:1,...`` pins the
    batch and folds it into a constant Reshape ``[1, -1]``: the optimized model runs one sample at a time."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Shape", ["r1"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0, name="batch"),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"], name="unsqueeze"),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0, name="concat"),
        helper.make_node("Reshape", ["r1", "target"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1, name="fc"),
    ]
    inits = {
        "w1": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.1, 4).astype(np.float32),
        "zero": np.array(0, np.int64),
        "axes": np.array([0], np.int64),
        "minus1": np.array([-1], np.int64),
        "w2": rng.normal(0, 0.3, (10, 64)).astype(np.float32),
        "b2": rng.normal(0, 0.1, 10).astype(np.float32),
    }
    path, optimized = tmp_path / "chain.onnx", tmp_path / "chain_optimized.onnx"
    onnx.save(make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 10])], inits), path)
    assert _run("optimize", path, "--input-shape", "x:1,3,8,8", "-o", optimized).exit_code == 0
    pinned = onnx.load(optimized)
    assert [n.op_type for n in pinned.graph.node] == ["Conv", "Relu", "Reshape", "Gemm"]
    x = np.ascontiguousarray(data.transpose(0, 3, 1, 2))
    np.save(tmp_path / "x.npy", x)
    labels = np.concatenate([create_session(pinned).run(None, {"x": s[None]})[0].argmax(-1) for s in x])
    np.save(tmp_path / "labels.npy", labels)
    table = tmp_path / "t.pickle"
    assert _run("calibrate", optimized, "--data", tmp_path / "x.npy", "-o", table).exit_code == 0
    args = ["evaluate", optimized, "--table", table, "--data", tmp_path / "x.npy", "--labels", tmp_path / "labels.npy"]
    result = _run(*args, "--json", "--batch-size", 3)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["samples"] == SAMPLES and report["float_accuracy"] == 1.0
    assert report["outputs"][0]["sqnr_db"] > 20
    # Labels that do not match the data are a clear error, not a numpy broadcast failure.
    np.save(tmp_path / "short.npy", labels[:4])
    result = _run(*args[:-1], tmp_path / "short.npy")
    assert result.exit_code == 1 and "4 labels for 10 samples" in result.output


def test_cli_samples_the_fixed_batch_does_not_divide(tmp_path, data):
    model_path = tmp_path / "b2.onnx"
    onnx.save(tflite_like(2), model_path)
    np.save(tmp_path / "x7.npy", data[:7])
    result = _run("calibrate", model_path, "--data", tmp_path / "x7.npy")
    assert result.exit_code == 1 and "internal error" not in result.output
    assert "holds 7 samples, but the model fixes its batch to 2" in result.output
    np.save(tmp_path / "x8.npy", data[:8])
    table = tmp_path / "t.pickle"
    assert _run("calibrate", model_path, "--data", tmp_path / "x8.npy", "-o", table).exit_code == 0
    for command in ("evaluate", "report"):
        result = _run(command, model_path, "--table", table, "--data", tmp_path / "x7.npy")
        assert result.exit_code == 1 and "multiple of 2" in result.output, result.output
    result = _run(
        "export",
        model_path,
        "--table",
        table,
        "--format",
        "qdq",
        "--test-input",
        tmp_path / "x7.npy",
        "-o",
        tmp_path / "q.onnx",
    )
    assert result.exit_code == 1 and "multiple of 2" in result.output and not (tmp_path / "q.onnx").exists()
