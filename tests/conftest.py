"""Shared test fixtures: where the ONNX backend test data lives, and a summary of the float-equivalence run."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import onnx
import pytest

ONNX_TEST_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"

# Filled by tests/test_optimizer_equivalence.py, printed at the end of the run.
EQUIVALENCE_LOG: dict[str, list[str]] = defaultdict(list)


def shared_dir() -> Path:
    """The project's ``shared/`` folder: ``$ESPQUANT_SHARED`` or ``../shared`` beside the checkout."""
    return Path(os.environ.get("ESPQUANT_SHARED", Path(__file__).resolve().parents[2] / "shared"))


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(1234)


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001 - pytest hook signature
    if not EQUIVALENCE_LOG:
        return
    ran, skipped = EQUIVALENCE_LOG.get("ran", []), EQUIVALENCE_LOG.get("skipped", [])
    terminalreporter.section("optimizer float equivalence")
    terminalreporter.write_line(f"{len(ran)} model(s) checked against onnxruntime, {len(skipped)} skipped")
    for line in skipped:
        terminalreporter.write_line(f"  skipped {line}")
    bn = sum(int(x.split("bn_fused=")[1]) for x in ran if "bn_fused=" in x)
    terminalreporter.write_line(f"BatchNormalization nodes removed across checked models: {bn}")
