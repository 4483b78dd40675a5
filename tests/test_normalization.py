"""ESP-DL's normalisation modules (espquant.simulator.normalization): they follow the float model, and a
hand-worked example of each."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

from espquant import Calibrator, Evaluator
from espquant.simulator.normalization import layer_normalization, lp_normalization, rms_normalization
from helpers import make_model, tensor

SHAPE = ["N", 3, 4, 8]


def _models(rng):
    return {
        "LayerNormalization": make_model(
            [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], name="n", axis=-1)],
            [tensor("x", SHAPE)],
            [tensor("y", SHAPE)],
            {"g": rng.uniform(0.5, 2, (8,)).astype(np.float32), "b": rng.normal(0, 0.5, (8,)).astype(np.float32)},
        ),
        "RMSNormalization": make_model(
            [helper.make_node("RMSNormalization", ["x", "g"], ["y"], name="n", axis=1)],
            [tensor("x", SHAPE)],
            [tensor("y", SHAPE)],
            {"g": rng.uniform(0.5, 2, (3, 1, 8)).astype(np.float32)},
            opset=23,
        ),
        "LpNormalization": make_model(
            [helper.make_node("LpNormalization", ["x"], ["y"], name="n", axis=2, p=2)],
            [tensor("x", SHAPE)],
            [tensor("y", SHAPE)],
        ),
    }


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("op", ["LayerNormalization", "RMSNormalization", "LpNormalization"])
def test_follows_the_float_model(op, bits):
    rng = np.random.default_rng(5)
    model = _models(rng)[op]
    data = rng.normal(0, 2, (4, 3, 4, 8)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": data})[0]
    table = Calibrator(f"int{bits}").calibrate(model, data).table
    evaluator = Evaluator(f"int{bits}", "per-tensor", "esp32c3")
    evaluator.generate_quantized_model(model, table)
    got = evaluator.evaluate_quantized_model(data, to_float=True)[0][0]
    step = 2.0 ** evaluator.quantized.exponent("y")
    # the input's own rounding moves the statistics (and a short Lp row's norm) a little: relative to the output
    # range, about one input step
    relative = 0.02 if bits == 8 else 5e-4
    assert np.abs(got - expected).max() <= 3 * step + relative * np.abs(expected).max()


def test_layer_normalization_by_hand():
    # x = [1, 3] at 2^0: mean 2, variance 1, inv_std ~ 1/sqrt(1 + 1e-5); scale 2 (int 1 at 2^1), bias 0.5
    got = layer_normalization(
        np.array([[1, 3]]),
        np.array([1, 1]),
        np.array([1, 1]),
        axis=-1,
        epsilon=1e-5,
        e_in=0,
        e_scale=1,
        e_bias=-1,
        e_out=-4,
        bits=8,
        rounding="half_up",
    )
    # (-1 * 2 + 0.5) * 16 = -24 (-23.9998...), (1 * 2 + 0.5) * 16 = 40 (39.9998)
    assert got.tolist() == [[-24, 40]]


def test_rms_normalization_by_hand():
    # x = [3, 4] at 2^-1 -> [1.5, 2]: mean square 3.125, rms factor 1/sqrt(3.125) = 0.5657; scale [1, 2]
    got = rms_normalization(
        np.array([[3, 4]]),
        np.array([1.0, 2.0], np.float32),
        axis=-1,
        epsilon=0.0,
        e_in=-1,
        e_out=-5,
        bits=8,
        rounding="half_up",
    )
    assert got.tolist() == [[round(1.5 / np.sqrt(3.125) * 32), round(2 * 2 / np.sqrt(3.125) * 32)]]


def test_lp_normalization_rounds_by_axis_as_the_runtime_does():
    x = np.array([[3, -4], [0, 0]])
    # last axis: x * (inv * 2^7); p = 1: 3 / 7 * 128 = 54.86 -> 55, -73.1 -> -73; an all-zero row stays 0
    assert lp_normalization(x, axis=-1, p=1, e_out=-7, bits=8, rounding="half_up").tolist() == [[55, -73], [0, 0]]
    # p = 2 along axis 0: column norms 3 and 4 -> [[1, -1], [0, 0]] at 2^-6 = [[64, -64], [0, 0]]
    assert lp_normalization(x, axis=0, p=2, e_out=-6, bits=8, rounding="half_up").tolist() == [[64, -64], [0, 0]]
