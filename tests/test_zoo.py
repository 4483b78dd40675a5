"""Espressif's model zoo (50 ``.espdl`` files of ESP-DL v3.3.9): every file loads and runs, and the compiled
path gives exactly the interpreter's integers on random inputs.

The zoo files embed no test values; exactness is held by the operator vectors (test_espdl_vectors.py) and by
Espressif's runtime on the files espquant writes. The three small files here run in the default suite; the
whole zoo is the ``heavy`` marker (``pytest -m heavy``, run by ``.ci/run``).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import shared_dir
from espquant.simulator import compiled, layout
from espquant.simulator.espdl_model import load_espdl


@pytest.fixture(autouse=True)
def _blocked_from_the_first_run(monkeypatch):
    """The compiled path checked here is the one repeated runs take: segments on blocked tensors
    (simulator/layout.py) from the first run."""
    monkeypatch.setattr(compiled, "BLOCKED_FROM_RUN", 1)
    monkeypatch.setattr(layout, "STRICT", True)


ZOO = shared_dir() / "zoo"
FILES = sorted(ZOO.glob("*.espdl")) if ZOO.is_dir() else []
needs_zoo = pytest.mark.skipif(not FILES, reason=f"the model zoo was not found at {ZOO} (set ESPQUANT_SHARED)")
# Small files that together hold LUT (int16 table), Gelu (int8 table), PRelu without a table, Div, ReduceMean,
# Softmax, float edges and dilated 1-D convolutions (the TDNN).
QUICK = (
    "human_face_detect_s3_human_face_detect_msr_s8_v1.espdl",
    "pp_ocr_v6_p4_pp_ocr_v6_rec_s16_w640.espdl",
    "pp_ocr_v6_p4_pp_ocr_v6_rec_s8.espdl",
    "speaker_verification_p4_sv_tdnn_tiny_3s.espdl",
)


def _target(path):
    return "esp32p4" if "_p4_" in path.name else "esp32s3"


def _random_inputs(model, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.inputs:
        dtype = np.int16 if value.dtype == "INT16" else np.int8
        info = np.iinfo(dtype)
        feeds[value.name] = rng.integers(info.min, info.max, size=value.shape, endpoint=True).astype(dtype)
    return feeds


def _check(path):
    model = load_espdl(path, _target(path))
    feeds = _random_inputs(model)
    compiled = model.run(feeds)
    model.compiled = False
    interpreted = model.run(feeds)
    assert set(compiled) == {v.name for v in model.outputs}
    for name, value in interpreted.items():
        assert compiled[name].dtype == value.dtype and compiled[name].shape == value.shape, name
        np.testing.assert_array_equal(compiled[name], value, err_msg=f"{path.name}: output {name}")


@needs_zoo
@pytest.mark.parametrize("name", QUICK)
def test_small_zoo_files_run_and_both_paths_agree(name):
    _check(ZOO / name)


@needs_zoo
@pytest.mark.heavy
@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_every_zoo_file_runs_and_both_paths_agree(path):
    _check(path)


@needs_zoo
def test_the_whole_zoo_lowers():
    """Every file's every node has a kernel: loading lowers the whole graph (running it is the heavy test)."""
    for path in FILES:
        load_espdl(path, _target(path))


@needs_zoo
@pytest.mark.parametrize(
    ("name", "left"),
    [
        ("pp_ocr_v6_p4_pp_ocr_v6_rec_s8.espdl", set()),  # 1-D convolutions, ReduceMean: all in the graph
        ("speaker_verification_p4_sv_tdnn_tiny_3s.espdl", {"Div"}),  # a Div of two activations stays
    ],
)
def test_what_small_zoo_files_leave_to_the_interpreter(name, left):
    """The compiled path's reach on real files: what a program still hands to the numpy interpreter."""
    path = ZOO / name
    model = load_espdl(path, _target(path))
    model.run(_random_inputs(model))
    interpreted = {n.op_type for p in model.quantized._programs.values() for n in p.interpreted_nodes}
    assert interpreted == left
