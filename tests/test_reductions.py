"""ESP-DL's Reduce modules on integers (espquant.simulator.reductions): hand-worked examples and properties."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from espquant.simulator.reductions import reduce_integer, sqrt_newton


def _run(kind, values, axis=(1,), bits=8, e_in=-4, e_out=-4, keepdims=True, rounding="half_up"):
    x = np.asarray(values, dtype=np.int64)
    return reduce_integer(kind, x, axis, keepdims=keepdims, e_in=e_in, e_out=e_out, bits=bits, rounding=rounding)


def test_l1_sums_absolute_integers_and_shifts():
    # |-128| + 127 + |-3| = 258 at 2^-4; e_out = -2: 258 >> 2 = 64.5 -> 65 (half up), 64 (half even)
    assert _run("l1", [[-128, 127, -3]], e_out=-2).tolist() == [[65]]
    assert _run("l1", [[-128, 127, -3]], e_out=-2, rounding="half_even").tolist() == [[64]]


def test_l2_is_newton_sqrt_of_the_integer_sum_of_squares():
    # 3^2 + 4^2 = 25 at 2^-8 -> sqrt = 5 * 2^-4 = 0.3125 -> at 2^-6: 20
    assert _run("l2", [[3, 4]], e_out=-6).tolist() == [[20]]


def test_prod_folds_in_float_and_saturates():
    # (2 * 2^-1) * (3 * 2^-1) = 1.5 -> at 2^-2: 6
    assert _run("prod", [[2, 3]], e_in=-1, e_out=-2).tolist() == [[6]]
    # 100^4 is far past int8: the saturating conversion lands on 127, a negative product on -128
    assert _run("prod", [[100, 100, 100, 100]], e_in=0, e_out=0).tolist() == [[127]]
    assert _run("prod", [[100, -100, 100]], e_in=0, e_out=0).tolist() == [[-128]]


def test_log_sum_of_a_negative_sum_is_the_largest_integer():
    # log of a negative number is NaN; the chip's float -> int conversion gives INT_MAX, truncated to 127
    assert _run("log_sum", [[-5, 1]]).tolist() == [[127]]
    # log(0) = -inf -> -128
    assert _run("log_sum", [[-1, 1]]).tolist() == [[-128]]


def test_log_sum_exp_int8_uses_the_exp_table_of_the_input_exponent():
    x = np.array([[0, 16, -16]])  # 0, 1, -1 at 2^-4
    want = np.log(np.float32(1) + np.exp(np.float32(1)) + np.exp(np.float32(-1)))
    got = _run("log_sum_exp", x)
    assert got.tolist() == [[int(np.floor(want * 16 + 0.5))]]


def test_float_folds_visit_reduced_axes_in_row_major_order():
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, (2, 3, 4, 5))
    got = _run("prod", x, axis=(1, 3), e_in=-7, e_out=-7, keepdims=False)
    expected = np.empty((2, 4), dtype=np.int64)
    for n in range(2):
        for h in range(4):
            acc = np.float32(1)
            for c in range(3):
                for w in range(5):
                    acc = np.float32(acc * np.float32(np.float32(x[n, c, h, w]) * np.float32(2.0**-7)))
            expected[n, h] = min(127, max(-128, int(np.floor(np.float64(np.float32(acc * np.float32(128))) + 0.5))))
    assert got.tolist() == expected.tolist()


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=2.0**-20, max_value=2.0**30, allow_nan=False, width=32))
def test_sqrt_newton_is_close_to_sqrt(value):
    got = float(sqrt_newton(np.array([value], np.float32))[0])
    assert abs(got - np.sqrt(value)) <= max(1e-5, 4 * np.spacing(np.float32(np.sqrt(value))))
