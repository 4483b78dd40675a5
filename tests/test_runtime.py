"""onnxruntime sessions: graphs stamped newer than the installed onnxruntime loads are brought within its
limits, and a model it cannot run is one clear error naming both versions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import espquant.runtime as runtime
from espquant.errors import ModelError
from espquant.runtime import RuntimeLimits, create_session, for_runtime, runtime_limits
from helpers import tensor


def _relu(ir_version: int, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [tensor("x", [2])], [tensor("y", [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def test_the_probe_finds_what_this_onnxruntime_loads():
    limits = runtime_limits()
    assert 7 <= limits.ir_version <= onnx.IR_VERSION and 13 <= limits.opset <= onnx.defs.onnx_opset_version()
    assert runtime._loads(limits.ir_version, 13)
    if limits.ir_version < onnx.IR_VERSION:
        assert not runtime._loads(limits.ir_version + 1, 13)


def test_the_newest_onnx_stamp_runs_on_the_installed_onnxruntime():
    """helper.make_model stamps onnx's newest IR version (14 with onnx 1.23); onnxruntime 1.23 stops at 11."""
    model = _relu(onnx.IR_VERSION, 13)
    out = create_session(model).run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0]
    assert out.tolist() == [0.0, 2.0]


@pytest.fixture
def old_runtime(monkeypatch):
    """An onnxruntime like 1.17: IR versions up to 9, opsets up to 20."""
    monkeypatch.setattr(runtime, "runtime_limits", lambda: RuntimeLimits(9, 20, "1.17.0"))


def test_a_newer_ir_stamp_is_lowered_when_the_opsets_allow(old_runtime):
    model = _relu(12, 13)
    lowered = for_runtime(model)
    assert lowered.ir_version == 9 and model.ir_version == 12  # a copy; the argument is untouched
    within = _relu(8, 13)
    assert for_runtime(within) is within


def test_an_opset_newer_than_the_runtime_is_a_clear_error(old_runtime):
    with pytest.raises(ModelError, match=r"the model uses ONNX opset 21; the installed onnxruntime 1\.17\.0 runs "
                                         r"opsets up to 20: upgrade onnxruntime \(pip install -U onnxruntime\)"):
        for_runtime(_relu(10, 21))


def test_an_ir_version_the_opsets_need_is_not_lowered(monkeypatch):
    monkeypatch.setattr(runtime, "runtime_limits", lambda: RuntimeLimits(6, 20, "1.2.0"))
    with pytest.raises(ModelError, match=r"IR version 8 and its opsets need at least 7; .* loads IR versions up to 6"):
        for_runtime(_relu(8, 13), "the model")


def test_runner_gives_what_run_gives_and_falls_back_without_the_inner_binding():
    """``runner`` calls onnxruntime's inner binding (no per-call Python checks) and returns the same arrays;
    a session object without that binding (another onnxruntime build) gets its own ``run``."""
    from types import SimpleNamespace

    from espquant.runtime import runner

    node = helper.make_node("Add", ["x", "x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    session = create_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(runner(session)(["y"], {"x": x})[0], session.run(["y"], {"x": x})[0])
    plain = SimpleNamespace(run=lambda names, feeds: ["fallback"])
    assert runner(plain)(["y"], {"x": x}) == ["fallback"]
