"""ScatterND as ESP-DL runs it: slices in order, integers at one shared exponent, saturating add."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

from espquant import Calibrator, Evaluator, check_model
from helpers import make_model, tensor


def _model(reduction, indices, updates):
    node = helper.make_node("ScatterND", ["x", "i", "u"], ["y"], name="n", reduction=reduction)
    return make_model(
        [node], [tensor("x", ["N", 3, 4])], [tensor("y", ["N", 3, 4])], {"i": indices, "u": updates}, opset=18
    )


@pytest.mark.parametrize("reduction", ["none", "add", "max", "min"])
def test_follows_the_float_model(reduction):
    rng = np.random.default_rng(2)
    model = _model(reduction, np.array([[0, 2], [0, -3]]), rng.normal(0, 1, (2, 4)).astype(np.float32))
    data = rng.normal(0, 1, (8, 3, 4)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": data})[0]
    table = Calibrator("int16").calibrate(model, data).table
    evaluator = Evaluator("int16", "per-tensor", "esp32s3")
    evaluator.generate_quantized_model(model, table)
    got = evaluator.evaluate_quantized_model(data, to_float=True)[0][0]
    assert np.abs(got - expected).max() <= 2 * 2.0 ** evaluator.quantized.exponent("y")


def test_repeated_indices_apply_in_order_and_mul_is_refused():
    model = _model("none", np.array([[0, 1], [0, 1]]), np.array([[1, 1, 1, 1], [2, 2, 2, 2]], np.float32))
    data = np.zeros((1, 3, 4), np.float32)
    table = Calibrator("int8").calibrate(model, data).table
    evaluator = Evaluator("int8", "per-tensor", "esp32c3")
    evaluator.generate_quantized_model(model, table)
    got = evaluator.evaluate_quantized_model(data, to_float=True)[0][0]
    assert got[0, 1].tolist() == [2, 2, 2, 2]  # the last slice wins
    refused = check_model(_model("mul", np.array([[0, 1]]), np.ones((1, 4), np.float32)), strict=False)
    assert not refused.ok and "attribute reduction" in [p.field for p in refused.problems]
