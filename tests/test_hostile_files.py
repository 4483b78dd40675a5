"""Damaged files never cause anything but a clear espquant error (issue 16): bytes of small ``.espdl`` and
``.npy`` files flipped and truncated by hypothesis in a subprocess under a memory limit, plus the reproductions
of the probes that found the problems."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import helper

from espquant import Calibrator, Evaluator
from espquant.cli import main
from espquant.errors import DatasetError, ModelError
from espquant.espdl import DIGEST_KEY, decode_espdl, encode_espdl, read_espdl, write_espdl
from espquant.table import QuantTable
from helpers import make_model, tensor

FUZZER = Path(__file__).parent / "fuzz" / "fuzz_files.py"
MEMORY_LIMIT = 4 << 30  # address space: onnxruntime maps more than it touches
RESIDENT_LIMIT_KIB = 1 << 20  # what the run may actually use: 1 GiB


def _small_model():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "g"], ["y"], name="gemm"),
    ]
    inits = {
        "w": rng.normal(0, 0.5, (4, 2, 3, 3)).astype(np.float32),
        "g": rng.normal(0, 0.3, (36, 3)).astype(np.float32),
    }
    return make_model(nodes, [tensor("x", ["N", 2, 6, 6])], [tensor("y", ["N", 3])], inits)


@pytest.fixture(scope="module")
def espdl_file(tmp_path_factory):
    model = _small_model()
    data = np.random.default_rng(1).normal(0, 1, (8, 2, 6, 6)).astype(np.float32)
    evaluator = Evaluator("int8", "per-tensor", "esp32c3")
    evaluator.generate_quantized_model(model, Calibrator("int8").calibrate(model, data).table)
    return evaluator.export_espdl(tmp_path_factory.mktemp("fuzz") / "small.espdl", data[:1])


def _fuzz(kind: str, path: Path, examples: int) -> dict:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    result = subprocess.run(
        [sys.executable, str(FUZZER), kind, str(path), str(examples)],
        capture_output=True, text=True, timeout=600, preexec_fn=limit, cwd=Path(__file__).parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["unexpected"], "\n---\n".join(report["unexpected"])
    assert report["peak_kib"] < RESIDENT_LIMIT_KIB, report
    return report["outcomes"]


def test_damaged_espdl_with_digest_is_an_error_or_unchanged(espdl_file):
    outcomes = _fuzz("espdl", espdl_file, 150)
    assert set(outcomes) <= {"espquant error", "unchanged result"}, outcomes


def test_damaged_espdl_without_digest_never_crashes(espdl_file, tmp_path):
    decoded = read_espdl(espdl_file)
    del decoded.metadata[DIGEST_KEY]
    bare = tmp_path / "bare.espdl"
    write_espdl(decoded, bare)
    outcomes = _fuzz("espdl", bare, 150)
    assert set(outcomes) <= {"espquant error", "unchanged result", "changed result"}, outcomes


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_damaged_numpy_files_are_an_error_or_unchanged(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    values = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.save(path, values) if suffix == ".npy" else np.savez(path, x=values, y=np.arange(6))
    outcomes = _fuzz("npy", path, 150)
    assert set(outcomes) <= {"espquant error", "unchanged result", "changed result"}, outcomes


# --- the probes, one by one ------------------------------------------------------------------------------------


def test_the_digest_catches_a_changed_weight_the_test_input_misses(espdl_file, tmp_path):
    decoded = read_espdl(espdl_file)
    weight = decoded.initializers["g"]
    weight.data = weight.data.copy()
    weight.data.reshape(-1)[0] ^= 1  # a change the single embedded test output may not show
    damaged = tmp_path / "damaged.espdl"
    write_espdl(decoded, damaged)
    result = CliRunner().invoke(main, ["run", str(damaged), "--self-test"])
    assert result.exit_code == 1 and "digest" in result.output, result.output
    result = CliRunner().invoke(main, ["inspect", str(damaged)])
    assert result.exit_code == 1 and "MISMATCH" in result.output
    assert CliRunner().invoke(main, ["inspect", str(espdl_file)]).output.count("verified") == 1


@pytest.mark.parametrize("damage", ["key", "key and value"])
def test_a_damaged_digest_entry_does_not_make_a_changed_file_look_unsigned(espdl_file, tmp_path, damage):
    """Found by the fuzzer: bytes flipped in the digest's key (and value) and in a weight; the file then read as
    one without a digest, and the changed weight ran silently."""
    decoded = read_espdl(espdl_file)
    weight = decoded.initializers["g"]
    weight.data = weight.data.copy()
    weight.data.reshape(-1)[0] ^= 1
    value = decoded.metadata.pop(DIGEST_KEY)
    decoded.metadata[DIGEST_KEY.replace(".", "Q")] = value if damage == "key" else value.replace("256", "2\x1d6")
    damaged = tmp_path / "damaged.espdl"
    write_espdl(decoded, damaged)
    result = CliRunner().invoke(main, ["run", str(damaged), "--self-test"])
    assert result.exit_code == 1 and "digest" in result.output, result.output


def test_a_huge_window_or_pad_is_refused_before_allocating(espdl_file):
    decoded = read_espdl(espdl_file)
    (pool,) = [n for n in decoded.nodes if n.op_type == "MaxPool"]
    pool.attributes["kernel_shape"] = [73_014_444_034, 2]
    with pytest.raises(ModelError, match="kernel_shape"):
        load_espdl_bytes(encode_espdl(decoded))
    pool.attributes["kernel_shape"] = [2, 2]
    (conv,) = [n for n in decoded.nodes if n.op_type == "Conv"]
    conv.attributes["pads"] = [9_240_577, 1, 1, 1]
    with pytest.raises(ModelError, match="pads"):
        load_espdl_bytes(encode_espdl(decoded))


def load_espdl_bytes(data: bytes):
    from espquant.quant import get_target
    from espquant.simulator.espdl_model import EspdlModel

    return EspdlModel(decode_espdl(data, "probe.espdl"), get_target("esp32c3"))


def test_a_huge_tensor_size_is_refused_by_the_reader(espdl_file):
    decoded = read_espdl(espdl_file)
    value = next(iter(decoded.values.values()))
    value.shape = (1, 1 << 20, 1 << 20)
    with pytest.raises(ModelError, match="no ESP32 holds"):
        decode_espdl(encode_espdl(decoded), "probe.espdl")


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "cannot read"),
        (b"\x93NUMPY\x01\x00", "cannot read"),
        ("0-d", "0-d"),
        ("object", "Python objects"),
    ],
)
def test_bad_run_inputs_are_clear_errors(espdl_file, tmp_path, content, fragment):
    path = tmp_path / "in.npy"
    if content == "0-d":
        np.save(path, np.int8(3))
    elif content == "object":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        path.write_bytes(content)
    result = CliRunner().invoke(main, ["run", str(espdl_file), "--input", str(path)])
    assert result.exit_code != 0 and fragment in result.output and "internal error" not in result.output, result.output


def test_run_inputs_must_be_the_files_integers_unless_float_input(espdl_file, tmp_path):
    decoded = read_espdl(espdl_file)
    (name,) = decoded.test_inputs
    integers = decoded.test_inputs[name].data
    floats, wide, missing = tmp_path / "f.npy", tmp_path / "w.npy", tmp_path / "missing.npy"
    np.save(floats, integers.astype(np.float32) * 0.01)
    np.save(wide, integers.astype(np.int32) * 1000)
    for path, fragment in ((floats, "--float-input"), (wide, "do not fit"), (missing, "no such data file")):
        result = CliRunner().invoke(main, ["run", str(espdl_file), "--input", str(path)])
        assert result.exit_code != 0 and fragment in result.output, result.output
    result = CliRunner().invoke(main, ["run", str(espdl_file), "--input", str(floats), "--float-input", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)


def test_arrays_loader_names_the_file(tmp_path):
    truncated = tmp_path / "t.npz"
    np.savez(truncated, x=np.zeros((4, 3)))
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(DatasetError, match="t.npz"):
        from espquant.arrays import load_arrays

        load_arrays(truncated)


# --- evaluate / report / calibrate inputs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """The small classifier (first output (N, 3)), a Conv-only model, their data and tables."""
    folder = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(3)
    classifier = _small_model()
    conv = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        [tensor("x", ["N", 2, 6, 6])],
        [tensor("y", ["N", 4, 4, 4])],
        {"w": rng.normal(0, 0.5, (4, 2, 3, 3)).astype(np.float32)},
    )
    data = rng.normal(0, 1, (8, 2, 6, 6)).astype(np.float32)
    np.save(folder / "x.npy", data)
    paths = {}
    for name, model in (("classifier", classifier), ("conv", conv)):
        onnx_path = folder / f"{name}.onnx"
        import onnx

        onnx.save(model, onnx_path)
        table = Calibrator("int8").calibrate(model, data).table
        table.save(folder / f"{name}.pickle")
        paths[name] = (onnx_path, folder / f"{name}.pickle")
    return folder, paths


def _evaluate(paths, name, data, *extra):
    model, table = paths[name]
    return CliRunner().invoke(main, ["evaluate", str(model), "--table", str(table), "--data", str(data), *extra])


def test_top1_only_for_class_scores(calibrated):
    folder, paths = calibrated
    result = _evaluate(paths, "conv", folder / "x.npy", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["top1_agreement"] is None
    labels = folder / "labels.npy"
    np.save(labels, np.zeros(8, np.int64))
    result = _evaluate(paths, "conv", folder / "x.npy", "--labels", str(labels))
    assert result.exit_code == 1 and "(N, classes)" in result.output, result.output


@pytest.mark.parametrize(
    "labels, fragment",
    [
        (np.zeros(5, np.int64), "5 labels for 8 samples"),
        (np.full(8, 7), "labels 7..7 for 3 classes"),
        (np.full(8, 0.5), "integer class indices"),
        (np.zeros((8, 3)), "one class index per sample"),
    ],
)
def test_labels_are_validated(calibrated, labels, fragment):
    folder, paths = calibrated
    path = folder / "bad_labels.npy"
    np.save(path, labels)
    result = _evaluate(paths, "classifier", folder / "x.npy", "--labels", str(path))
    assert result.exit_code == 1 and fragment in result.output, result.output


@pytest.mark.parametrize("kind", ["empty", "nan", "zero-byte"])
def test_bad_evaluation_data_is_a_clear_error(calibrated, kind):
    folder, paths = calibrated
    path = folder / f"{kind}.npy"
    if kind == "empty":
        np.save(path, np.zeros((0, 2, 6, 6), np.float32))
    elif kind == "nan":
        np.save(path, np.full((8, 2, 6, 6), np.nan, np.float32))
    else:
        path.write_bytes(b"")
    result = _evaluate(paths, "classifier", path)
    assert result.exit_code == 1 and "internal error" not in result.output, result.output


def test_report_json_is_one_document(calibrated, tmp_path):
    folder, paths = calibrated
    model, table = paths["classifier"]
    args = ["report", str(model), "--table", str(table), "--data", str(folder / "x.npy"), "--json"]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "out"), "--suggest-int16", "1"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)  # nothing before or after it
    assert "written" in document and "mixed_precision" in document


def test_legacy_table_format_from_cli_and_api(calibrated, tmp_path):
    import pickle

    folder, paths = calibrated
    model, _ = paths["classifier"]
    target = tmp_path / "t.pickle"
    args = ["calibrate", str(model), "--data", str(folder / "x.npy"), "-o", str(target), "--table-format", "legacy"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    raw = pickle.loads(target.read_bytes())
    assert all(isinstance(v, float) or v.dtype == np.float64 for v in raw.values())
    import onnx

    table = Calibrator("int8").generate_quantization_table(
        onnx.load(model), np.load(folder / "x.npy"), tmp_path / "a.pickle"
    )
    raw = pickle.loads((tmp_path / "a.pickle").read_bytes())  # the legacy API writes scales, weights as arrays
    assert isinstance(raw["w"], np.ndarray) and raw["x"] == 2.0 ** table.exponents["x"]
    assert QuantTable.load(tmp_path / "a.pickle").exponents == table.exponents
    written = target.with_name("t_model.onnx")  # auto's equalization / bias correction baked: the legacy pickle
    result = _evaluate({"c": (written if written.exists() else model, target)}, "c", folder / "x.npy")
    assert result.exit_code == 0, result.output


def test_folding_does_not_materialise_a_huge_constant(tmp_path):
    """194 bytes of ONNX: ConstantOfShape([30000, 30000]) -> ReduceMax took 3.6 GB before; the node stays."""
    import onnx
    from onnx import TensorProto

    shape = onnx.numpy_helper.from_array(np.array([30000, 30000], np.int64), "s")
    nodes = [
        helper.make_node("ConstantOfShape", ["s"], ["big"], name="big"),
        helper.make_node("ReduceMax", ["big"], ["m"], name="max", keepdims=0),
        helper.make_node("Add", ["x", "m"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [shape],
    )  # fmt: skip
    path = tmp_path / "bomb.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    result = subprocess.run(
        [sys.executable, "-m", "espquant", "optimize", str(path), "-o", str(tmp_path / "out.onnx")],
        capture_output=True, text=True, timeout=300, preexec_fn=limit,
    )  # fmt: skip
    assert result.returncode == 0 and "not folding ConstantOfShape" in result.stdout, result.stderr[-2000:]


def test_raw_pixels_get_a_hint(caplog):
    model = _small_model()
    pixels = np.random.default_rng(0).integers(0, 256, (4, 2, 6, 6)).astype(np.uint8)
    with caplog.at_level("WARNING", logger="espquant.data"):
        Calibrator("int8").calibrate(model, pixels)
    assert "looks like raw pixels" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="espquant.data"):
        Calibrator("int8").calibrate(model, pixels.astype(np.float32) / 255)
    assert "raw pixels" not in caplog.text


def test_wrong_shapes_and_overflowing_data_are_clear_errors(calibrated, tmp_path):
    folder, paths = calibrated
    model, table = paths["classifier"]
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((4, 3, 6, 6), np.float32))
    for args in (
        ["evaluate", str(model), "--table", str(table), "--data", str(wrong)],
        ["report", str(model), "--table", str(table), "--data", str(wrong)],
        ["export", str(model), "--table", str(table), "--target", "esp32s3", "-o", str(tmp_path / "x.espdl"),
         "--test-input", str(wrong)],
    ):  # fmt: skip
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and "does not match the model's" in result.output, result.output
    import onnx

    scaled = make_model(
        [helper.make_node("Mul", ["x", "k"], ["y"], name="scale")], [tensor("x", ["N", 4])], [tensor("y", ["N", 4])],
        {"k": np.full((1, 4), 10.0, np.float32)},
    )  # fmt: skip
    onnx.save(scaled, tmp_path / "scaled.onnx")
    huge = tmp_path / "huge.npy"
    np.save(huge, np.full((4, 4), 3e38, np.float32))  # finite, but ten times it is not
    for method in ("minmax", "auto"):
        args = [
            "calibrate",
            str(tmp_path / "scaled.onnx"),
            "--data",
            str(huge),
            "-o",
            str(tmp_path / f"{method}.pickle"),
        ]
        result = CliRunner().invoke(main, [*args, "--method", method])
        assert result.exit_code == 1 and "reaches inf" in result.output and "internal" not in result.output


def test_a_one_array_archive_says_which_array_feeds_the_input(calibrated, tmp_path, caplog):
    folder, paths = calibrated
    model, _ = paths["classifier"]
    archive = tmp_path / "other.npz"
    np.savez(archive, y=np.load(folder / "x.npy"))
    with caplog.at_level("WARNING", logger="espquant.data"):
        result = CliRunner().invoke(
            main, ["calibrate", str(model), "--data", str(archive), "-o", str(tmp_path / "t.pickle")]
        )
    assert result.exit_code == 0, result.output
    assert "its one array 'y' feeds the model's input 'x'" in caplog.text
