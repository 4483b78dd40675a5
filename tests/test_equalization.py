"""Cross-layer equalization through clamped activations, carried by the table (issue 14).

The model (``helpers.relu6_block``), a MobileNetV2-style block whose depthwise channels differ ~100x in range
(BatchNorm folding does that):

    x -> Conv(w1) -> Clip(0, 6) -> depthwise Conv(w2) -> Relu -> Conv(w3) -> y

Per-tensor weights leave most depthwise channels a few levels; rescaling a channel through the ReLU6 is exact
only while the clamp does not act on it, which the calibration data's peaks tell (through the Relu always).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from espquant.calibration import engine as engine_module
from espquant.calibration.engine import calibrate_model, with_factors_applied
from espquant.cli import main
from espquant.errors import QuantTableError
from espquant.graph import WeightFactor, scale_initializers
from espquant.optimizer.equalize import HEADROOM, Equalization, equalization_factors, equalization_pairs
from espquant.quant.profiles import get_target
from espquant.report.analysis import analyze
from espquant.simulator.lowering import build_quantized_model
from espquant.simulator.simulate import simulate
from espquant.table import QuantTable, factors_metadata, graph_hash
from helpers import RELU6_BOUND, make_model, relu6_block, run, tensor

BOUND = RELU6_BOUND


@pytest.fixture(scope="module")
def block():
    rng = np.random.default_rng(7)
    model = relu6_block(rng)
    data = rng.normal(0.5, 1.0, (96, 3, 12, 12)).astype(np.float32)
    return model, data


def _peaks(model: onnx.ModelProto, data: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    values = run(exposed, {"x": data})[1:]
    return {n: np.abs(v).max(axis=(0, 2, 3)).astype(np.float64) for n, v in zip(names, values)}


def _channel_spread(weight: np.ndarray) -> float:
    ranges = np.abs(weight).reshape(len(weight), -1).max(axis=1)
    return float(ranges.max() / np.median(ranges))


def test_clamped_pairs_only_with_peaks(block):
    model, _ = block
    # ReLU6 is not positive-homogeneous: without data only the pair through the Relu is exact
    assert [p.first.name for p in equalization_pairs(model)] == ["c2"]
    pairs = equalization_pairs(model, clamped=True)
    assert [(p.first.name, [s.name for s in p.seconds], p.bound) for p in pairs] == [
        ("c1", ["c2"], BOUND),
        ("c2", ["c3"], math.inf),
    ]
    assert pairs[0].tensors == ["a", "a6"]
    assert {f.tensor for f in equalization_factors(model).factors} == {"c2.w", "c2.b", "c3.w"}  # no peaks


def test_clamped_equalization_is_exact_on_the_data_and_keeps_the_headroom(block):
    model, data = block
    peaks = _peaks(model, data, ["a6", "b6"])
    assert (peaks["a6"] >= BOUND).any() and (peaks["a6"] * HEADROOM <= BOUND).any()  # both kinds of channel
    equalization = equalization_factors(model, peaks)
    assert equalization.pairs == 2
    equalized = scale_initializers(model, equalization.factors)
    (before,), (after,) = run(model, {"x": data}), run(equalized, {"x": data})
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5 * float(np.abs(before).max()))
    for tensor_name in ("a6",):
        divisor, peak = equalization.divisors[tensor_name], peaks[tensor_name]
        saturating = peak * HEADROOM > BOUND
        assert np.all(divisor[saturating] == 1.0)  # a channel near the clamp keeps its scale
        assert np.all(peak[~saturating] / divisor[~saturating] * HEADROOM <= BOUND * (1 + 1e-9))
        assert np.allclose(_peaks(equalized, data, [tensor_name])[tensor_name], peak / divisor, rtol=1e-4)
    w2 = lambda m: onnx.numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "c2.w"))  # noqa: E731
    assert _channel_spread(w2(equalized)) < _channel_spread(w2(model)) / 4


def test_channels_at_the_clamp_keep_their_scale(block):
    """Peaks at the bound for every channel: the pair through the ReLU6 may not move; the one through the Relu
    still does."""
    model, _ = block
    peaks = {"a6": np.full(16, BOUND), "b6": np.full(16, BOUND)}
    equalization = equalization_factors(model, peaks)
    assert {f.tensor for f in equalization.factors} == {"c2.w", "c2.b", "c3.w"}
    assert set(equalization.divisors) == {"b", "b6"}


def test_scale_initializers_multiplies_in_float64_once():
    model = make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[1, 1])],
        [tensor("x", [1, 2, 1, 1])],
        [tensor("y", [1, 2, 1, 1])],
        {"w": np.array([[[[3.0]], [[5.0]]], [[[7.0]], [[11.0]]]], np.float32)},
    )
    factors = [
        WeightFactor("w", np.array([0.5, 2.0]).reshape(2, 1, 1, 1)),
        WeightFactor("w", np.array([3.0, 1 / 3]).reshape(1, 2, 1, 1)),
    ]
    scaled = onnx.numpy_helper.to_array(scale_initializers(model, factors).graph.initializer[0])
    expected = (np.array([[3.0, 5.0], [7.0, 11.0]]) * [[1.5, 0.5 / 3], [6.0, 2.0 / 3]]).astype(np.float32)
    np.testing.assert_array_equal(scaled.reshape(2, 2), expected)
    assert onnx.numpy_helper.to_array(model.graph.initializer[0])[0, 0, 0, 0] == 3.0  # the input is not touched
    with pytest.raises(ValueError, match="no initializer"):
        scale_initializers(model, [WeightFactor("nope", np.ones(1))])
    with pytest.raises(ValueError):
        scale_initializers(model, [WeightFactor("w", np.ones((3, 1, 1, 1)))])


def test_table_carries_factors_exactly(block, tmp_path):
    model, data = block
    equalization = equalization_factors(model, _peaks(model, data, ["a6", "b6"]))
    table = QuantTable(
        {"x": -5},
        {"bits": 8, "graph_hash": graph_hash(model), "weight_factors": factors_metadata(equalization.factors)},
    )
    for table_format in ("exponents", "legacy"):
        path = tmp_path / f"{table_format}.pickle"
        table.save(path, table_format)
        loaded = QuantTable.load(path)
        assert [f.tensor for f in loaded.weight_factors] == [f.tensor for f in equalization.factors]
        for got, want in zip(loaded.weight_factors, equalization.factors):
            np.testing.assert_array_equal(got.values, want.values)  # JSON and pickle keep every bit
        rebuilt = loaded.model_for(model)
        assert graph_hash(rebuilt) == graph_hash(scale_initializers(model, equalization.factors))
    assert QuantTable({"x": -5}, {"bits": 8}).model_for(model) is model  # no factors: the model itself


@pytest.mark.parametrize(
    "entry",
    [
        {"tensor": "c2.w", "shape": [2], "values": [1.0, -1.0]},
        {"tensor": "c2.w", "shape": [3], "values": [1.0, 2.0]},
        {"tensor": "c2.w", "shape": [1], "values": [float("nan")]},
        {"tensor": "c2.w", "shape": [1], "values": [1.0], "extra": 1},
    ],
    ids=["negative", "count", "nan", "unknown-key"],
)
def test_bad_factors_are_refused_on_load(tmp_path, entry):
    path = tmp_path / "t.pickle"
    QuantTable({"x": -5}, {"bits": 8, "weight_factors": [entry]}).save(path)
    with pytest.raises(QuantTableError, match="weight_factors"):
        QuantTable.load(path)


def test_factors_that_do_not_fit_the_model_are_a_clear_error(block):
    model, _ = block
    table = QuantTable(
        {}, {"bits": 8, "weight_factors": [{"tensor": "c2.w", "shape": [5, 1, 1, 1], "values": [1.0] * 5}]}
    )
    with pytest.raises(QuantTableError, match="weight factors do not fit"):
        table.model_for(model)


def _simulated_error(model: onnx.ModelProto, table: QuantTable, data: np.ndarray) -> float:
    quantized = build_quantized_model(model, table, get_target("esp32s3"), 8)
    (simulated,), _ = simulate(quantized, model, data, to_float=True)
    (reference,) = run(model, {"x": data})
    return float(np.mean(np.abs(simulated - reference)) / np.mean(np.abs(reference)))


@pytest.fixture(scope="module")
def equalized_result(block):
    model, data = block
    return calibrate_model(model, data[:64], 8, "per-tensor", "auto")


def test_auto_equalizes_and_the_table_stays_the_users_model(block, equalized_result, monkeypatch):
    model, data = block
    result = equalized_result
    assert result.model is model and result.transforms == []
    assert result.table.metadata["graph_hash"] == graph_hash(model)
    assert result.table.metadata["cle_pairs"] == 2 and result.table.weight_factors
    equalized_error = _simulated_error(model, result.table, data[64:])
    monkeypatch.setattr(engine_module, "equalization_pairs", lambda model, clamped=False: [])
    monkeypatch.setattr(engine_module, "equalization_factors", lambda model, peaks=None: Equalization([], {}, 0))
    plain = calibrate_model(model, data[:64], 8, "per-tensor", "auto")
    assert not plain.table.weight_factors
    assert equalized_error < 0.8 * _simulated_error(model, plain.table, data[64:])  # held-out samples


def test_lowering_applies_the_factors(block, equalized_result):
    """The integer model from (user's model, table) is the one from (equalized and bias-corrected model, table
    without factors and shifts)."""
    model, _ = block
    table = equalized_result.table
    assert table.weight_factors and table.bias_shifts
    carried = ("weight_factors", "bias_shifts", "graph_hash")
    bare = QuantTable(dict(table.exponents), {k: v for k, v in table.metadata.items() if k not in carried})
    for target in ("esp32s3", "esp32p4", "esp32"):
        via_table = build_quantized_model(model, table, get_target(target), 8)
        direct = build_quantized_model(table.model_for(model), bare, get_target(target), 8)
        assert [(n.op_type, n.outputs, n.relu) for n in via_table.nodes] == [
            (n.op_type, n.outputs, n.relu) for n in direct.nodes
        ]
        assert via_table.constants.keys() == direct.constants.keys()
        for name, value in direct.constants.items():
            np.testing.assert_array_equal(via_table.constants[name], value)


def test_report_compares_with_the_equalized_float_tensors(block, equalized_result):
    """Per-layer SQNR needs the float values of the rescaled tensors: the user's model's would differ per channel."""
    model, data = block
    analysis = analyze(model, equalized_result.table, data[64:], "esp32s3")
    by_tensor = {layer.tensor: layer for layer in analysis.layers}
    assert by_tensor["a6"].sqnr_db > 20 and by_tensor["b6"].sqnr_db > 15


def test_legacy_pickle_gets_the_equalized_model(block, equalized_result):
    """The original toolkit reads scales and the model's own weights: the factors are baked into a model."""
    model, _ = block
    baked = with_factors_applied(equalized_result)
    assert not baked.table.weight_factors and not baked.table.bias_shifts
    assert baked.transforms == ["cle", "bias_correction"]
    assert baked.table.metadata["graph_hash"] == graph_hash(baked.model) != graph_hash(model)
    assert baked.table.model_for(baked.model) is baked.model
    via_factors = build_quantized_model(model, equalized_result.table, get_target("esp32s3"), 8)
    via_model = build_quantized_model(baked.model, baked.table, get_target("esp32s3"), 8)
    for name, value in via_factors.constants.items():
        np.testing.assert_array_equal(via_model.constants[name], value)


def test_cli_calibrate_then_export_the_same_model(block, tmp_path):
    """The default (auto) equalizes, and the user's model still exports; the legacy format writes the model."""
    model, data = block
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "d.npy", data[:64])
    runner = CliRunner()
    done = runner.invoke(
        main,
        ["calibrate", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npy"), "-o", str(tmp_path / "t.pickle")],
    )
    assert done.exit_code == 0, done.output
    assert not (tmp_path / "t_model.onnx").exists()
    assert "cross-layer equalization: 2 Conv pair(s) rescaled" in done.output and "equalized" in done.output
    shifts = QuantTable.load(tmp_path / "t.pickle").bias_shifts
    assert shifts and f"bias correction: {len(shifts)} layer bias(es)" in done.output
    assert QuantTable.load(tmp_path / "t.pickle").weight_factors
    done = runner.invoke(
        main,
        [
            "export",
            str(tmp_path / "m.onnx"),
            "--table",
            str(tmp_path / "t.pickle"),
            "--target",
            "esp32s3",
            "-o",
            str(tmp_path / "m.espdl"),
        ],
    )
    assert done.exit_code == 0, done.output
    assert (tmp_path / "m.espdl").stat().st_size > 0
    done = runner.invoke(
        main,
        [
            "calibrate",
            str(tmp_path / "m.onnx"),
            "--data",
            str(tmp_path / "d.npy"),
            "-o",
            str(tmp_path / "l.pickle"),
            "--table-format",
            "legacy",
        ],
    )
    assert done.exit_code == 0, done.output
    written = onnx.load(tmp_path / "l_model.onnx")
    assert QuantTable.load(tmp_path / "l.pickle").metadata["graph_hash"] == graph_hash(written)
    carried = QuantTable.load(tmp_path / "t.pickle").model_for(model)  # equalized (exact) and bias-corrected
    assert math.isclose(
        float(np.abs(run(written, {"x": data[:8]})[0] - run(carried, {"x": data[:8]})[0]).max()), 0.0, abs_tol=1e-4
    )


@pytest.mark.parametrize("margin, families", [(0.0, 1), (1e9, 2)])
def test_close_families_are_both_searched_and_the_better_kept(block, monkeypatch, margin, families):
    """Starts within FAMILY_MARGIN of the best: the plain and the equalized model both get stages 1-2, and the
    result is the better of the two searches (the starts alone can pick the one whose search ends behind)."""
    from espquant.calibration import auto as auto_module

    model, data = block
    refined = []
    original = auto_module._refined

    def recording(search, variant, *args, **kwargs):
        best = original(search, variant, *args, **kwargs)
        refined.append((variant.equalization is not None, best[0]))
        return best

    monkeypatch.setattr(auto_module, "FAMILY_MARGIN", margin)
    monkeypatch.setattr(auto_module, "_refined", recording)
    result = calibrate_model(model, data[:64], 8, "per-tensor", "auto")
    assert len(refined) == families and len({equalized for equalized, _ in refined}) == families
    chosen = min(refined, key=lambda r: r[1])
    assert bool(result.table.weight_factors) == chosen[0]
    assert result.table.metadata["auto"]["output_error"] <= chosen[1]


def test_the_family_is_chosen_on_samples_the_search_did_not_see(block, monkeypatch):
    """auto keeps the 64 calibration samples after its 32 search samples apart, and the plain and the equalized
    model's best tables are compared there: the one that measures better on them wins, whatever the search
    samples said."""
    from espquant.calibration import auto as auto_module

    model, data = block
    seen = []
    original = auto_module._validation_error

    def reversed_verdict(values, reference, magnitude, outputs):
        seen.append(len(next(iter(reference.values()))))
        error = original(values, reference, magnitude, outputs)
        return -error  # the worse table measures better here: it must be the one kept

    monkeypatch.setattr(auto_module, "FAMILY_MARGIN", 1e9)
    monkeypatch.setattr(auto_module, "_validation_error", reversed_verdict)
    result = calibrate_model(model, data, 8, "per-tensor", "auto")
    assert seen == [auto_module.VALIDATION_SAMPLES] * 2  # both families, on the 64 samples after the search's 32
    assert not result.table.weight_factors  # the equalized table measured better: reversed, the plain one wins


@pytest.mark.parametrize("seed", [0, 1])
def test_an_equalized_and_bias_corrected_table_fits_the_model_it_is_written_for(seed):
    """When the equalized model's bias-corrected twin wins, the table's weight exponents are its weights' (they
    once were the plain model's, a factor of up to 8 off): the table on the user's model (its factors and bias
    shifts applied) measures on the search samples exactly the error the search measured for it."""
    rng = np.random.default_rng(seed)
    model = relu6_block(rng)
    data = rng.normal(0.5, 1.0, (96, 3, 12, 12)).astype(np.float32)
    result = calibrate_model(model, data, 8, "per-tensor", "auto")
    assert result.model is model and result.table.weight_factors and result.table.bias_shifts
    searched = data[: result.table.metadata["auto"]["search_samples"]]
    quantized = build_quantized_model(result.model, result.table, get_target("esp32s3"), 8)
    simulated, _ = simulate(quantized, result.model, searched, to_float=True)
    reference = run(model, {"x": searched})
    error = np.mean([np.mean(np.abs(s - r)) / np.mean(np.abs(r)) for s, r in zip(simulated, reference)])
    assert error == pytest.approx(result.table.metadata["auto"]["output_error"], rel=1e-6)
