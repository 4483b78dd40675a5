"""No exponent rule asks the runtime for a right shift it cannot apply (more than 31 on its int32 paths).

A real hand-landmark model's last Gemm had one output channel of near-zero weights: its per-channel exponent
was -28 and its shift 33, which ESP-DL's C shift leaves undefined (the host runtime returned -128 where the
simulator said 0). The calibrator clamps such a channel's exponent; a table that still breaks the bound is
refused by every command that lowers it, naming the tensor.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from espquant import Calibrator, Evaluator
from espquant.calibration.exponents import weight_exponents
from espquant.cli import main
from espquant.errors import QuantTableError
from espquant.quant.pot import MAX_RIGHT_SHIFT
from espquant.table import QuantTable
from helpers import make_model, tensor


def _gemm_with_a_dead_channel(rng):
    """x (N, 8) -> Gemm -> y (N, 4); output channel 3 has weights around 1e-9."""
    weight = rng.normal(0, 0.5, (8, 4)).astype(np.float32)
    weight[:, 3] = rng.normal(0, 1e-9, 8)
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="head")]
    inits = {"W": weight, "B": np.zeros(4, np.float32)}
    return make_model(nodes, [tensor("x", ["N", 8])], [tensor("y", ["N", 4])], inits)


def test_a_negligible_channel_gets_the_coarsest_exponent_the_shift_allows(rng):
    model = _gemm_with_a_dead_channel(rng)
    data = rng.normal(0, 1, (64, 8)).astype(np.float32)
    table = Calibrator("int8", "per-channel", "minmax").calibrate(model, data).table
    e_in, e_out, e_w = table["x"], table["y"], table["W"]
    assert max(e_out - e_in - e for e in e_w) == MAX_RIGHT_SHIFT  # channel 3 sits exactly at the bound
    weight = numpy_helper.to_array(model.graph.initializer[0])
    assert e_w[3] == e_out - e_in - MAX_RIGHT_SHIFT >= weight_exponents(weight, 8, 1)[3]
    assert e_w[:3] == weight_exponents(weight, 8, 1)[:3]  # the other channels keep their own range
    assert table["B"] == [e_in + e for e in e_w]  # the bias follows the clamped weights
    evaluator = Evaluator("int8", "per-channel", "esp32p4")
    evaluator.generate_quantized_model(model, table)
    out, _ = evaluator.evaluate_quantized_model(data)
    assert np.all(out[0][:, 3] == 0)  # the dead channel computes 0, as the runtime does with a 31-bit shift


def test_a_table_that_breaks_the_bound_is_refused_naming_the_tensor(rng, tmp_path):
    model = _gemm_with_a_dead_channel(rng)
    data = rng.normal(0, 1, (64, 8)).astype(np.float32)
    table = Calibrator("int8", "per-channel", "minmax").calibrate(model, data).table
    exponents = dict(table.exponents)
    exponents["W"] = [*exponents["W"][:3], exponents["W"][3] - 5]  # shift 36 on channel 3
    broken = QuantTable(exponents, dict(table.metadata))
    with pytest.raises(QuantTableError, match=r"node 'head' \(Gemm\): exponent -?\d+ of 'W' makes a right shift of 36"):
        Evaluator("int8", "per-channel", "esp32p4").generate_quantized_model(model, broken)
    import onnx

    onnx.save(model, tmp_path / "m.onnx")
    broken.save(tmp_path / "t.pickle")
    args = ["check", str(tmp_path / "m.onnx"), "--target", "esp32p4", "--table", str(tmp_path / "t.pickle")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "right shift of 36" in result.output and "'W'" in result.output


def test_exponents_stay_in_the_runtimes_scaling_range(tmp_path):
    """Data of 1e-45 asked for exponent -155 (ESP-DL's 1 << 155 is undefined C); the calibrator keeps -30,
    and a table that asks for more is refused naming the tensor."""
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [tensor("x", ["N", 4])],
                       [tensor("y", ["N", 4])])  # fmt: skip
    tiny = np.full((4, 4), 1e-45, np.float32)
    table = Calibrator("int8").calibrate(model, tiny).table
    assert table["x"] == -30 and table["y"] == -30
    evaluator = Evaluator("int8", "per-tensor", "esp32c3")
    evaluator.generate_quantized_model(model, table)
    with pytest.raises(QuantTableError, match="exponent of 'x' is -40"):
        evaluator.generate_quantized_model(model, QuantTable({"x": -40, "y": -40}))
