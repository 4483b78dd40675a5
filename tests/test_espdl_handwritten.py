"""``.espdl`` files written by hand for what the ONNX front end never produces: StreamingCache (ESP-DL's stateful
node for streaming models: the simulator keeps the last frames between runs as the chip does) and ESP-DL's
own channel orders (SpaceToDepth with several channels, DepthToSpace DCR). Espressif's runtime agrees."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_dir
from espquant import load_espdl
from espquant.espdl.reader import EspdlFile, EspdlNode, EspdlTensor, EspdlValue
from espquant.espdl.writer import write_espdl

HOST = shared_dir() / "tools" / "espdl-host" / "bin" / "espdl_host_run"


def _file(tmp_path, first: np.ndarray, expected: np.ndarray):
    x = EspdlValue("x", "INT8", (1, 3, 4), [-4])
    y = EspdlValue("y", "INT8", (1, 5, 4), [-4])
    node = EspdlNode("cache", "StreamingCache", ["x"], ["y"], {"window_size": 3, "frame_axis": 1, "quant_type": "S8"})
    decoded = EspdlFile(
        path="",
        container="EDL2",
        ir_version=8,
        metadata={"target": "esp32c3"},
        graph_name="stream",
        nodes=[node],
        initializers={},
        inputs=[x],
        outputs=[y],
        values={"x": x, "y": y},
        test_inputs={"x": EspdlTensor("x", "INT8", (1, 3, 4), first.astype(np.int8), [-4])},
        test_outputs={"y": EspdlTensor("y", "INT8", (1, 5, 4), expected.astype(np.int8), [-4])},
    )
    path = tmp_path / "stream.espdl"
    write_espdl(decoded, path)
    return path


def test_the_cache_carries_the_last_frames_between_runs(tmp_path):
    first = np.arange(12).reshape(1, 3, 4)
    second = -np.arange(12).reshape(1, 3, 4)
    expected = np.concatenate([np.zeros((1, 2, 4), int), first], axis=1)
    model = load_espdl(_file(tmp_path, first, expected))
    np.testing.assert_array_equal(model.run({"x": first})["y"], expected)
    # the second call starts with the last two frames of the first call's output
    np.testing.assert_array_equal(model.run({"x": second})["y"], np.concatenate([first[:, 1:], second], axis=1))
    model.reset()
    np.testing.assert_array_equal(model.run({"x": first})["y"], expected)
    # a batch of frames is a stream of calls, in order
    both = model.run({"x": np.concatenate([second, first])})["y"]
    np.testing.assert_array_equal(both[1], np.concatenate([second[0, 1:], first[0]]))


needs_host = pytest.mark.skipif(not HOST.is_file(), reason=f"ESP-DL's host runtime not found at {HOST}")


@needs_host
def test_espressif_runtime_agrees_on_the_first_call(tmp_path):
    first = np.arange(12).reshape(1, 3, 4) - 6
    expected = load_espdl(_file(tmp_path, first, np.zeros((1, 5, 4)))).run({"x": first})["y"]
    path = _file(tmp_path, first, expected)
    result = subprocess.run([str(HOST), str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-1500:]


def _space_to_depth_file(tmp_path, x: np.ndarray, expected: np.ndarray):
    """NHWC (1, 4, 4, 2) -> SpaceToDepth(2) -> (1, 2, 2, 8)."""
    inp = EspdlValue("x", "INT8", (1, 4, 4, 2), [0])
    out = EspdlValue("y", "INT8", (1, 2, 2, 8), [0])
    node = EspdlNode("s2d", "SpaceToDepth", ["x"], ["y"], {"blocksize": 2, "quant_type": "S8"})
    decoded = EspdlFile(
        path="",
        container="EDL2",
        ir_version=8,
        metadata={"target": "esp32c3"},
        graph_name="s2d",
        nodes=[node],
        initializers={},
        inputs=[inp],
        outputs=[out],
        values={"x": inp, "y": out},
        test_inputs={"x": EspdlTensor("x", "INT8", inp.shape, x.astype(np.int8), [0])},
        test_outputs={"y": EspdlTensor("y", "INT8", out.shape, expected.astype(np.int8), [0])},
    )
    path = tmp_path / "s2d.espdl"
    write_espdl(decoded, path)
    return path


def test_space_to_depth_orders_channels_as_esp_dl():
    x = np.arange(32).reshape(1, 4, 4, 2)  # NHWC
    got = load_espdl(_space_to_depth_file(Path(tempfile.mkdtemp()), x, np.zeros((1, 2, 2, 8)))).run({"x": x})["y"]
    # out_c = c * 4 + (h % 2) * 2 + (w % 2) (dl_module_space_to_depth.hpp): channel 0's block first
    assert got[0, 0, 0].tolist() == [x[0, 0, 0, 0], x[0, 0, 1, 0], x[0, 1, 0, 0], x[0, 1, 1, 0],
                                     x[0, 0, 0, 1], x[0, 0, 1, 1], x[0, 1, 0, 1], x[0, 1, 1, 1]]  # fmt: skip


@needs_host
def test_espressif_runtime_agrees_on_space_to_depth(tmp_path):
    x = np.arange(32).reshape(1, 4, 4, 2) - 16
    expected = load_espdl(_space_to_depth_file(tmp_path, x, np.zeros((1, 2, 2, 8)))).run({"x": x})["y"]
    path = _space_to_depth_file(tmp_path, x, expected)
    result = subprocess.run([str(HOST), str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-1500:]
