"""The command line: tables and JSON on success, one clear line and exit 1 (or 2 for usage) on failure."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from conftest import ONNX_TEST_DATA
from espquant.cli import main
from helpers import bn_node, bn_params, make_model, op_types, tensor


@pytest.fixture
def model_path(tmp_path, rng):
    inits = {"W": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), **bn_params(rng, 4)}
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        bn_node("c", "b"),
        helper.make_node("Relu", ["b"], ["y"]),
    ]
    path = tmp_path / "net.onnx"
    onnx.save(make_model(nodes, [tensor("x", ["N", 3, "H", "W"])], [tensor("y", ["N", 4, "H", "W"])], inits), path)
    return path


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_help_teaches():
    result = _run("--help")
    assert result.exit_code == 0
    assert "espquant optimize model.onnx" in result.output
    result = _run("optimize", "--help")
    assert result.exit_code == 0 and "--input-shape" in result.output and "Examples" in result.output


def test_optimize_prints_the_pass_table(model_path):
    result = _run("optimize", model_path, "--input-shape", "x:1,3,8,8")
    assert result.exit_code == 0, result.output
    assert "fold_bn" in result.output or "fuse_bn_into_conv" in result.output
    assert "BatchNormalization -1" in result.output
    out = model_path.with_name("net_optimized.onnx")
    assert op_types(onnx.load(out)) == ["Conv", "Relu"]


def test_optimize_json(model_path, tmp_path):
    target = tmp_path / "clean.onnx"
    result = _run("optimize", model_path, "-o", target, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["output"] == str(target)
    assert report["op_types_before"]["BatchNormalization"] == 1
    assert "BatchNormalization" not in report["op_types_after"]
    assert {p["name"] for p in report["passes"]} >= {"fuse_bn_into_conv", "fold_constants", "check"}


def test_list_passes():
    result = _run("optimize", "--list-passes")
    assert result.exit_code == 0
    assert "fuse_matmul_add_bias_into_gemm" in result.output and "batchnorm_to_mul_add" in result.output


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["optimize", "missing.onnx"], 1, "missing.onnx: no such file"),
        (["optimize", "MODEL", "--passes", "nope"], 2, "unknown optimizer pass(es): nope"),
        (["optimize", "MODEL", "--input-shape", "x=1,3"], 2, "expected NAME:D0,D1"),
        (["optimize", "MODEL", "--input-shape", "z:1,3,8,8"], 2, "no such input"),
        (["optimize", "MODEL", "-o", "MODEL"], 1, "never writes over its own inputs"),
        (["optimize"], 2, "missing argument MODEL"),
        (["optimize", "MODEL", "--bogus"], 2, "No such option"),
    ],
)
def test_errors_are_one_line_with_exit_code(model_path, args, code, message):
    args = [str(model_path) if a == "MODEL" else a for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_optimize_each_light_model_prints_table(tmp_path):
    path = ONNX_TEST_DATA / "light" / "light_squeezenet.onnx"
    result = _run("optimize", path, "-o", tmp_path / "squeezenet.onnx")
    assert result.exit_code == 0, result.output
    assert "upgrade_opset" in result.output and "opset 9 -> 13" in result.output


def test_unexpected_errors_are_one_line_unless_debug(model_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("espquant.optimizer.optimize_file", broken)
    result = _run("optimize", model_path)
    assert result.exit_code == 1
    assert "internal error: RuntimeError: boom" in result.output and "--debug" in result.output
    assert "Traceback" not in result.output
    result = _run("--debug", "optimize", model_path)
    assert isinstance(result.exception, RuntimeError)
