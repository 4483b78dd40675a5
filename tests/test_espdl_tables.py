"""Stored tables and table-less activations of ``.espdl`` files, as ESP-DL v3.3 runs them (ARITHMETIC.md 8).

Hand-worked integers for the int16 table rules (nearest neighbour with the S3 / P4 tie rules, the 3.0.0-rc.2
linear interpolation), the int16 activations that carry a ``lut`` attribute but compute in float32, and the C
reference of a per-channel PRelu (floor shift right, plain shift left).
"""

from __future__ import annotations

import numpy as np
import pytest

from espquant.errors import UnsupportedOpError
from espquant.espdl.reader import EspdlFile, EspdlNode, EspdlTensor, EspdlValue
from espquant.quant.profiles import get_target
from espquant.simulator import kernels
from espquant.simulator.espdl_model import lower_espdl


def test_int16_table_nearest_neighbour_and_its_ties():
    # step 32 (2049 entries): T[i] = i. q = -32768 + 5*32 + 16 is a tie between entries 5 and 6.
    table = np.arange(2049)
    tie, below, above = -32768 + 5 * 32 + 16, -32768 + 5 * 32 + 15, -32768 + 5 * 32 + 17
    q = np.array([tie, below, above, -32768, 32767])
    assert kernels.lut_int16(q, table, interpolate=False, half_even=False).tolist() == [6, 5, 6, 0, 2048]
    # P4: a tie goes to the even index (5 is odd: up to 6; at index 6 a tie stays at 6).
    tie_even = -32768 + 6 * 32 + 16
    got = kernels.lut_int16(np.array([tie, tie_even]), table, interpolate=False, half_even=True)
    assert got.tolist() == [6, 6]


def test_int16_table_linear_interpolation_of_rc2():
    table = np.zeros(2049, np.int64)
    table[5], table[6] = 100, 37  # falling: the fraction truncates toward zero
    q = np.array([-32768 + 5 * 32 + 10])
    # 100 + trunc(10 * (37 - 100) / 32) = 100 + trunc(-19.6875) = 81
    assert kernels.lut_int16(q, table, interpolate=True, half_even=False).tolist() == [81]


def _one_node_file(op_type, quant_type, dtype, attrs, initializers, container="EDL2"):
    x = EspdlValue("x", dtype, (1, 4), [-8])
    y = EspdlValue("y", dtype, (1, 4), [-8])
    node = EspdlNode("n", op_type, ["x", *[t.name for t in initializers if t.name != attrs.get("lut")]], ["y"],
                     {"quant_type": quant_type, **attrs})
    return EspdlFile("mem", container, 8, {}, "g", [node], {t.name: t for t in initializers}, [x], [y],
                     {"x": x, "y": y}, {}, {})


def test_an_int16_sqrt_with_a_table_computes_in_float():
    """Speaker verification's ``/xvec/pool/Sqrt``: S16 with a 257-entry table; v3.3 ignores the table."""
    table = EspdlTensor("lut", "INT16", (257,), np.full(257, 2896, np.int16), [-8])
    decoded = _one_node_file("Sqrt", "S16", "INT16", {"lut": "lut"}, [table])
    q = np.array([[256 * 4, 256 * 9, 0, 256]])  # 4.0, 9.0, 0.0, 1.0 at exponent -8
    got = lower_espdl(decoded, get_target("esp32p4")).run({"x": q})["y"]
    assert got.tolist() == [[512, 768, 0, 256]]  # sqrt in float32, at exponent -8
    rc2 = _one_node_file("Sqrt", "S16", "INT16", {"lut": "lut"}, [table], container="EDL1")
    assert lower_espdl(rc2, get_target("esp32p4")).run({"x": q})["y"].tolist() == [[2896] * 4]  # rc.2: the table


def test_per_channel_prelu_c_reference_shifts_both_ways():
    slope = np.array([5, 5, 5, 5])
    q = np.array([[-3, -3, 7, 0]])
    common = {"e_in": -4, "e_out": -4, "bits": 8, "profile": get_target("esp32c3")}
    # shift = e_out - e_in - e_slope = 7: floor(-15 / 128) = -1; positives copied.
    assert kernels.prelu_per_channel(q, slope, e_slope=-7, **common).tolist() == [[-1, -1, 7, 0]]
    # shift -2: a plain left shift, -15 * 4 = -60.
    assert kernels.prelu_per_channel(q, slope, e_slope=2, **common).tolist() == [[-60, -60, 7, 0]]


def test_per_channel_prelu_rescales_positives_where_the_simd_kernel_does():
    """ESP-PPQ gives a PRelu its own output exponent. ESP32-P4's int8 kernel (``dl_esp32p4_prelu.S``: "pos part,
    *scale, right shift: output - input", half-even) rescales positives as ESP32-S3's does (half-up); its int16
    path and plain-C chips run the C reference, which copies them."""
    slope = np.array([5, 5, 5, 5, 5])
    q = np.array([[-3, 6, 7, 5, 0]])
    # e_out - e_in = 1: positives halved (6 -> 3, 7 -> 3.5, 5 -> 2.5); negatives: shift 1 - (-7) = 8.
    common = {"e_in": -4, "e_out": -3, "e_slope": -7}
    p4 = kernels.prelu_per_channel(q, slope, bits=8, profile=get_target("esp32p4"), **common)
    assert p4.tolist() == [[-1, 3, 4, 2, 0]]  # half-even: 3.5 -> 4, 2.5 -> 2; floor(-15 / 256) = -1
    s3 = kernels.prelu_per_channel(q, slope, bits=8, profile=get_target("esp32s3"), **common)
    assert s3.tolist() == [[0, 3, 4, 3, 0]]  # half-up: 2.5 -> 3; SR(-15, 8) = floor(-15/256 + 1/2) = 0
    for profile, bits in ((get_target("esp32p4"), 16), (get_target("esp32c3"), 8)):
        copied = kernels.prelu_per_channel(q, slope, bits=bits, profile=profile, **common)
        assert copied.tolist() == [[-1, 6, 7, 5, 0]]


def test_a_file_whose_prelu_slope_esp_dl_would_assert_on_is_refused():
    """ESP-PPQ 1.3.12 writes a ``[C]`` slope after a Gemm; ESP-DL's loader asserts ``[C, 1, 1]`` (the chip aborts)."""
    flat = EspdlTensor("slope", "INT8", (4,), np.array([5, 5, 5, 5], np.int8), [-7])
    with pytest.raises(UnsupportedOpError, match=r"\[C, 1, 1\]"):
        lower_espdl(_one_node_file("PRelu", "S8", "INT8", {}, [flat]), get_target("esp32s3"))
    shaped = EspdlTensor("slope", "INT8", (4, 1, 1), np.array([5, 5, 5, 5], np.int8).reshape(4, 1, 1), [-7])
    got = lower_espdl(_one_node_file("PRelu", "S8", "INT8", {}, [shaped]), get_target("esp32s3"))
    assert got.run({"x": np.array([[-128, 3, 0, -1]])})["y"].tolist() == [[-5, 3, 0, 0]]


@pytest.mark.parametrize(("attrs", "refused"), [({}, True), ({"allowzero": 0}, False)])
def test_a_reshape_with_a_zero_runs_only_with_its_allowzero_written(attrs, refused):
    """Without the attribute ESP-DL reads ``allowzero`` uninitialised: what a 0 does on the chip is not defined."""
    shape = EspdlTensor("shape", "INT64", (2,), np.array([0, -1], np.int64), [0])
    decoded = _one_node_file("Reshape", "S8", "INT8", attrs, [shape])
    if refused:
        with pytest.raises(UnsupportedOpError, match="allowzero"):
            lower_espdl(decoded, get_target("esp32p4"))
    else:
        got = lower_espdl(decoded, get_target("esp32p4")).run({"x": np.array([[1, 2, 3, 4]])})["y"]
        assert got.tolist() == [[1, 2, 3, 4]]
