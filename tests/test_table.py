"""The quantization table: round trip, legacy plain dicts, the restricted unpickler, model mismatch."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from onnx import helper

from espquant.errors import QuantTableError
from espquant.table import METADATA_KEY, QuantTable, graph_hash
from helpers import make_model, tensor


def _model(scale=1.0):
    node = helper.make_node("Mul", ["x", "w"], ["y"], name="mul")
    return make_model([node], [tensor("x", [1, 4])], [tensor("y", [1, 4])], {"w": np.full(4, scale, np.float32)})


def test_round_trip_pickle_and_json(tmp_path):
    table = QuantTable({"x": -7, "w": [-8, -9], "y": -5}, {"bits": 8, "graph_hash": graph_hash(_model())})
    pickle_path, json_path = table.save(tmp_path / "t.pickle")
    assert json_path == tmp_path / "t.json"
    for path in (pickle_path, json_path):
        loaded = QuantTable.load(path)
        assert loaded.exponents == table.exponents
        assert {k: v for k, v in loaded.metadata.items() if k != "checksum"} == table.metadata
    raw = pickle.loads(pickle_path.read_bytes())  # a plain dict
    assert raw["x"] == -7 and raw["w"] == [-8, -9] and METADATA_KEY in raw


def test_a_one_channel_per_channel_weight_keeps_its_checksum(tmp_path):
    """A per-channel table of a model whose last Conv has one output channel (a text detector's probability
    map): the weight's ``[e]`` reads back as ``e``, and the checksum must still match (it did not)."""
    table = QuantTable({"x": -7, "w": [-8, -9], "head": [-6]}, {"bits": 8, "granularity": "per-channel"})
    for name in ("t.pickle", "legacy.pickle"):
        path, twin = table.save(tmp_path / name, table_format="legacy" if name.startswith("legacy") else "exponents")
        for source in (path, twin):
            assert QuantTable.load(source).exponents["head"] == -6


def test_legacy_table_with_numpy_values(tmp_path):
    path = tmp_path / "legacy.pickle"
    path.write_bytes(pickle.dumps({"x": np.int64(-7), "w": np.array([-8, -9])}))
    assert QuantTable.load(path).exponents == {"x": -7, "w": [-8, -9]}


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/espquant-pwned",))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps({"x": _Exploit()}))
    marker = tmp_path / "marker"
    with pytest.raises(QuantTableError, match="refused to load the pickle.*forbidden object (posix|os).system"):
        QuantTable.load(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (pickle.dumps([1, 2]), "holds a list"),
        (pickle.dumps({"x": "big"}), "must be an int"),
        (pickle.dumps({"x": True}), "is a bool"),
        (b"\x80\x04garbage", "not a readable quantization table"),
    ],
)
def test_bad_tables(tmp_path, payload, message):
    path = tmp_path / "bad.pickle"
    path.write_bytes(payload)
    with pytest.raises(QuantTableError, match=message):
        QuantTable.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(QuantTableError, match="no such quantization table"):
        QuantTable.load(tmp_path / "none.pickle")


def test_table_for_another_model_or_missing_tensors():
    table = QuantTable({"x": -7, "w": -8}, {"graph_hash": graph_hash(_model())})
    table.check_model(_model(), ["x", "w"])
    with pytest.raises(QuantTableError, match="calibrated for another model"):
        table.check_model(_model(scale=2.0), ["x"])
    with pytest.raises(QuantTableError, match="no exponent for 1 tensor.*'y'"):
        table.check_model(_model(), ["x", "w", "y"])


# --- the original toolkit's tables, and hostile ones (issues 16 and 18) ----------------------------------------


def test_the_original_toolkits_scales_load_as_exponents(tmp_path):
    path = tmp_path / "legacy.pickle"
    path.write_bytes(pickle.dumps({"input": np.float64(0.0078125), "w": np.array([0.25, 0.125]), "y": 1.0}))
    assert QuantTable.load(path).exponents == {"input": -7, "w": [-2, -3], "y": 0}


def test_a_scale_that_is_not_a_power_of_two_names_the_tensor(tmp_path):
    path = tmp_path / "legacy.pickle"
    path.write_bytes(pickle.dumps({"input": 0.0078125, "conv.w": 0.3}))
    with pytest.raises(QuantTableError, match="'conv.w' is 0.3, not a power of two"):
        QuantTable.load(path)


def test_legacy_format_round_trips_with_its_metadata_in_the_twin(tmp_path):
    table = QuantTable({"x": -7, "w": [-8, -9]}, {"bits": 8, "graph_hash": graph_hash(_model())})
    pickle_path, _ = table.save(tmp_path / "t.pickle", table_format="legacy")
    raw = pickle.loads(pickle_path.read_bytes())
    assert set(raw) == {"x", "w"} and raw["x"] == 2.0**-7 and raw["w"].tolist() == [2.0**-8, 2.0**-9]
    loaded = QuantTable.load(pickle_path)
    assert loaded.exponents == table.exponents and loaded.metadata["graph_hash"] == table.metadata["graph_hash"]


class _HugeArray:
    """Pickles as ``numpy.ndarray((10**7,), 'f8')``: a few bytes asking numpy for 80 MB."""

    def __reduce__(self):
        return (np.ndarray, ((10**7,), "f8"))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"x": _HugeArray()}, "refused to load the pickle.*10000000 elements"),
        ({"x": 10**30}, "exponent of 'x' is 1000000000000000000000000000000;"),
        ({"x": 1e20}, "not a power of two"),
        ({"x": 127}, "at most 64 either way"),
        ({"x": [[[[-7]]]]}, "must be an int"),
        ({"x": -7, METADATA_KEY: {"format_version": 999}}, "'format_version' = 999 is not valid.*upgrade"),
        ({"x": -7, METADATA_KEY: {"bits": 7}}, "'bits' = 7"),
        ({"x": -7, METADATA_KEY: {"int16_layers": ["nope", 5]}}, "'int16_layers'"),
        ({"x": -7, METADATA_KEY: {"requantize": [{"node": 1}]}}, "'requantize'"),
    ],
)
def test_hostile_tables_are_refused_briefly(tmp_path, table, message):
    path = tmp_path / "t.pickle"
    path.write_bytes(pickle.dumps(table))
    with pytest.raises(QuantTableError, match=message) as caught:
        QuantTable.load(path)
    assert len(str(caught.value)) < 400


def test_a_table_edited_after_calibration_is_told_apart(tmp_path):
    table = QuantTable({"x": -7}, {"bits": 8})
    pickle_path, _ = table.save(tmp_path / "t.pickle")
    raw = pickle.loads(pickle_path.read_bytes())
    raw[METADATA_KEY]["bits"] = 16
    pickle_path.write_bytes(pickle.dumps(raw))
    with pytest.raises(QuantTableError, match="changed after calibration.*delete the metadata entry 'checksum'"):
        QuantTable.load(pickle_path)
    del raw[METADATA_KEY]["checksum"]  # edited on purpose
    pickle_path.write_bytes(pickle.dumps(raw))
    assert QuantTable.load(pickle_path).bits == 16


def test_per_channel_exponents_must_number_the_channels():
    table = QuantTable({"w": [-7] * 1000})
    table.check_channels("w", 1000)
    with pytest.raises(QuantTableError, match="1000 exponents for 'w', which has 4 channels"):
        table.check_channels("w", 4)


def test_a_legacy_bias_exponent_does_not_mislead_the_v3_simulation(tmp_path):
    """The original toolkit's tables hold the legacy library's bias exponent (the output's); ESP-DL v3 adds the
    bias to the accumulator at e_in + e_w, which the lowering derives whatever the table says."""
    from onnx import helper as h

    from espquant.quant.profiles import get_target
    from espquant.simulator.lowering import build_quantized_model

    node = h.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")
    inits = {"w": np.full((4, 2), 0.25, np.float32), "b": np.array([0.5, -0.5], np.float32)}
    model = make_model([node], [tensor("x", ["N", 4])], [tensor("y", ["N", 2])], inits)
    v3 = QuantTable({"x": -7, "w": -8, "b": -15, "y": -5})
    path = tmp_path / "original.pickle"  # as the original calibrator pickles them: scales, weights as arrays
    path.write_bytes(pickle.dumps({"x": 2.0**-7, "w": np.array([2.0**-8]), "b": 2.0**-5, "y": 2.0**-5}))
    legacy = QuantTable.load(path)
    assert legacy["w"] == -8
    for table in (v3, legacy):
        quantized = build_quantized_model(model, table, get_target("esp32s3"), 8)
        assert quantized.exponents["b"] == -15 and quantized.constants["b"].tolist() == [16384, -16384]
