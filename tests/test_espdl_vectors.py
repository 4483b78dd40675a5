"""Bit-exactness against Espressif's own reference files: every stored test output reproduced.

Integer outputs must match exactly. Float outputs (Softmax, and the float graphs of the Log / Exp / Sqrt /
Squeeze / Add tests) are the host's PyTorch values, which no device-faithful rule reproduces bit for bit:
they are compared within 8 float32 ulp (ARITHMETIC.md 12.8, 15).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import shared_dir
from espquant.errors import ModelError, TargetError
from espquant.simulator.espdl_model import compare_output, load_espdl

VECTORS = shared_dir() / "vectors"
FILES = sorted(VECTORS.glob("*/*.espdl")) if VECTORS.is_dir() else []
needs_vectors = pytest.mark.skipif(
    not FILES, reason=f"Espressif's reference vectors not found at {VECTORS} (set ESPQUANT_SHARED to the shared folder)"
)


def _target(path):
    """EDL2 files record their target; the 3.0.x EDL1 files carry it in the file-name prefix."""
    return None if path.parent.name == "espdl-gemm" else path.name.split("_")[0]


def compare(got: np.ndarray, want: np.ndarray) -> str | None:
    equal, detail = compare_output(got, want)
    return None if equal else detail


@needs_vectors
@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.stem}" for p in FILES])
def test_reference_file_is_reproduced(path):
    """By the interpreter (``keep``: every tensor) and by the compiled path (the default ``run``)."""
    model = load_espdl(path, _target(path))
    inputs, expected = model.test_values
    for got in (model.run(inputs, keep=True), model.run(inputs)):
        problems = {name: compare(got[name], want) for name, want in expected.items()}
        assert not any(problems.values()), problems


@needs_vectors
def test_the_profile_rounding_matters():
    # The P4 Conv vectors reproduce with half-to-even only: with the S3 rule they fail. (A simulator that
    # ignored the profile could not pass both.)
    path = VECTORS / "espdl-ops" / "esp32p4_conv2d_conv2d_ishap_1_16_32_32_kshap_32_16_1_1_s8.espdl"
    model = load_espdl(path, "esp32p4")
    inputs, expected = model.test_values
    assert all(compare(model.run(inputs)[n], w) is None for n, w in expected.items())
    model.profile = dataclasses.replace(model.profile, rounding="half_up")
    assert any(compare(model.run(inputs)[n], w) is not None for n, w in expected.items())


@needs_vectors
def test_target_is_required_or_checked():
    old = VECTORS / "espdl-ops" / "esp32s3_reshape_reshape_ishap_1_16_1_3_s8.espdl"
    if not old.exists():
        old = next(p for p in FILES if p.parent.name == "espdl-ops")
    with pytest.raises(TargetError, match="does not record its target"):
        load_espdl(old)
    gemm = VECTORS / "espdl-gemm" / "esp32s3_linear_ishap_1_16_kshap_16_16_relu_s8.espdl"
    assert load_espdl(gemm).profile.name == "esp32s3"
    with pytest.raises(TargetError, match="exported for esp32s3, not esp32p4"):
        load_espdl(gemm, "esp32p4")
    model = load_espdl(gemm)
    with pytest.raises(ModelError, match="no value for model input"):
        model.run({})


@needs_vectors
def test_cli_run_self_test_and_inputs(tmp_path):
    import json

    from click.testing import CliRunner

    from espquant.cli import main

    gemm = VECTORS / "espdl-gemm" / "esp32s3_linear_ishap_1_31_kshap_32_31_relu_s8.espdl"
    result = CliRunner().invoke(main, ["run", str(gemm), "--self-test", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["outputs"][0]["equal"] is True
    model = load_espdl(gemm)
    inputs, expected = model.test_values
    np.save(tmp_path / "x.npy", next(iter(inputs.values())))
    result = CliRunner().invoke(
        main, ["run", str(gemm), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npz")]
    )
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "y.npz") as saved:
        name = next(iter(expected))
        np.testing.assert_array_equal(saved[name].reshape(-1), expected[name].reshape(-1))
    old = next(p for p in FILES if p.parent.name == "espdl-ops")
    result = CliRunner().invoke(main, ["run", str(old), "--self-test"])
    assert result.exit_code == 1 and "pass target=" in result.output
