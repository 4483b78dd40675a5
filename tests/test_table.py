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
        assert loaded.exponents == table.exponents and loaded.metadata == table.metadata
    raw = pickle.loads(pickle_path.read_bytes())  # the legacy format: a plain dict
    assert raw["x"] == -7 and raw["w"] == [-8, -9] and METADATA_KEY in raw


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
        (pickle.dumps({"x": "big"}), "must be an int or a list of ints"),
        (pickle.dumps({"x": True}), "must be an int"),
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
