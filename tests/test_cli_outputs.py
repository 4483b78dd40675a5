"""Every command that writes: never over its own inputs, an existing output only with --force, pairs whole.

The rule is one for all commands (``espquant.files.guard_outputs``); each case here is a way a user lost a
file before: a model replaced by a pickle, a table replaced by an export, a JSON twin from another run.
"""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from espquant import optimize_fp_model
from espquant.cli import main
from espquant.demo import demo_model_path, load_demo_data


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The demo model, calibration data, labels and one int8 table, made once."""
    folder = tmp_path_factory.mktemp("outputs")
    model = folder / "m.onnx"
    optimize_fp_model(demo_model_path(), model)
    data = load_demo_data()
    np.save(folder / "x.npy", data.test_inputs[:48])
    np.save(folder / "y.npy", data.test_labels[:48].astype(np.int64))
    # minmax: a table for m.onnx itself (auto's CLE / bias correction would make it for t_model.onnx)
    args = ["--data", folder / "x.npy", "-o", folder / "t.pickle", "--method", "minmax"]
    assert _run("calibrate", model, *args).exit_code == 0
    return folder


@pytest.fixture
def files(workspace, tmp_path):
    """A fresh copy of the workspace per test, with digests to prove nothing changed."""
    for path in workspace.iterdir():
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


def _unchanged(folder, names, before):
    return all(_digest(folder / name) == before[name] for name in names)


@pytest.mark.parametrize(
    "args",
    [
        ["calibrate", "{m.onnx}", "--data", "{x.npy}", "-o", "{m.onnx}"],
        ["calibrate", "{m.onnx}", "--data", "{x.npy}", "-o", "{x.npy}"],
        ["export", "{m.onnx}", "--table", "{t.pickle}", "-o", "{t.pickle}"],
        ["export", "{m.onnx}", "--table", "{t.pickle}", "-o", "{t.json}"],
        ["export", "{m.onnx}", "--table", "{t.pickle}", "--test-input", "{x.npy}", "-o", "{x.npy}"],
        ["export", "{m.onnx}", "--table", "{t.pickle}", "--format", "qdq", "-o", "{m.onnx}"],
        ["optimize", "{m.onnx}", "-o", "{m.onnx}"],
        ["report", "{m.onnx}", "--table", "{t.pickle}", "--data", "{x.npy}", "--labels", "{y.npy}", "--budget", "1",
         "-o", "{.}"],
    ],
)
def test_no_command_writes_over_its_own_inputs_even_with_force(files, args):
    names = ["m.onnx", "x.npy", "y.npy", "t.pickle", "t.json"]
    before = {name: _digest(files / name) for name in names}
    filled = [str(files / a[1:-1]) if a.startswith("{") else a for a in args]
    if args[0] == "report":  # its mixed table goes to t_mixed.pickle: here a link to the input table
        (files / "t_mixed.pickle").symlink_to(files / "t.pickle")
    result = _run(*filled, "--force")
    assert result.exit_code == 1, result.output
    assert "never writes over its own inputs" in result.output
    assert _unchanged(files, names, before)


@pytest.mark.parametrize(
    ("args", "outputs"),
    [
        (["optimize", "{m.onnx}"], ["m_optimized.onnx"]),
        (["optimize", "{m.onnx}", "-o", "{o.onnx}"], ["o.onnx"]),
        (["calibrate", "{m.onnx}", "--data", "{x.npy}", "-o", "{c.pickle}"], ["c.pickle", "c.json"]),
        (["calibrate", "{m.onnx}", "--data", "{x.npy}", "-o", "{c.pickle}"], ["c.json"]),  # only the unnamed twin
        (["export", "{m.onnx}", "--table", "{t.pickle}", "-o", "{e.espdl}"], ["e.espdl"]),
        (["export", "{m.onnx}", "--table", "{t.pickle}", "--format", "qdq"], ["m_qdq.onnx"]),
        (["export", "{m.onnx}", "--table", "{t.pickle}", "--format", "cpp", "--target", "esp32"],
         ["m_coefficient.hpp"]),
        (["report", "{m.onnx}", "--table", "{t.pickle}", "--data", "{x.npy}", "-o", "{.}"], ["report.md"]),
    ],
)
def test_existing_outputs_need_force(files, args, outputs):
    for name in outputs:
        (files / name).write_bytes(b"earlier work")
    filled = [str(files / a[1:-1]) if a.startswith("{") else a for a in args]
    result = _run(*filled)
    assert result.exit_code == 2, result.output
    assert "add --force to replace" in result.output
    assert all((files / name).read_bytes() == b"earlier work" for name in outputs)
    result = _run(*filled, "--force")
    assert result.exit_code == 0, result.output
    assert all((files / name).read_bytes() != b"earlier work" for name in outputs)


def test_run_output_needs_force_and_never_replaces_an_input(files):
    espdl = files / "m.espdl"
    assert _run("export", files / "m.onnx", "--table", files / "t.pickle", "-o", espdl).exit_code == 0
    (files / "out.npz").write_bytes(b"earlier")
    result = _run("run", espdl, "--self-test", "-o", files / "out.npz")
    assert result.exit_code == 2 and "add --force" in result.output
    result = _run("run", espdl, "--self-test", "-o", files / "out.npz", "--force")
    assert result.exit_code == 0, result.output
    with np.load(files / "out.npz") as saved:  # -o is honoured with --self-test too
        assert len(saved.files) == 1
    result = _run("run", espdl, "--self-test", "-o", espdl, "--force")
    assert result.exit_code == 1 and "never writes over its own inputs" in result.output
    assert _run("run", espdl, "--self-test").exit_code == 0


def test_a_table_path_ending_in_json_is_refused(files):
    result = _run("calibrate", files / "m.onnx", "--data", files / "x.npy", "-o", files / "tt.json")
    assert result.exit_code == 2 and "its JSON twin" in result.output
    assert not (files / "tt.json").exists()


def test_qdq_with_a_bad_test_input_writes_nothing(files):
    np.save(files / "bad.npy", np.zeros((2, 3, 5, 5), np.float32))
    result = _run("export", files / "m.onnx", "--table", files / "t.pickle", "--format", "qdq",
                  "--test-input", files / "bad.npy")
    assert result.exit_code == 1, result.output
    assert not (files / "m_qdq.onnx").exists()


def test_output_paths_that_cannot_be_written(files):
    (files / "a_file").write_text("x")
    result = _run("report", files / "m.onnx", "--table", files / "t.pickle", "--data", files / "x.npy",
                  "-o", files / "a_file")
    assert result.exit_code == 1 and "is a file" in result.output
    result = _run("demo", "--workdir", files / "a_file")
    assert result.exit_code == 1 and "is a file" in result.output
    result = _run("optimize", files / "m.onnx", "-o", files / "missing" / "o.onnx")
    assert result.exit_code == 1 and "does not exist" in result.output


def test_demo_reuses_its_own_folder_but_not_a_foreign_one(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "demo_mnist_cnn.onnx").write_bytes(b"my own model")
    result = _run("demo", "--workdir", foreign)
    assert result.exit_code == 2 and "add --force" in result.output
    assert (foreign / "demo_mnist_cnn.onnx").read_bytes() == b"my own model"
