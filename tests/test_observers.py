"""Observers and the exponent rule, against hand-worked values and numpy references."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from espquant.calibration.observers import BINS, HistogramObserver, MinMaxObserver, make_observer
from espquant.quant.pot import EXPONENT_LIMIT, exponent_for_max_abs, qmax


@pytest.mark.parametrize(
    ("max_abs", "bits", "expected"),
    [
        (127.0, 8, 0),  # exactly qmax * 2^0: representable, no larger exponent
        (127.0001, 8, 1),
        (1.0, 8, -6),  # 127 * 2^-7 = 0.992 < 1
        (0.992, 8, -7),
        (0.0, 8, -7),  # all zeros: the neutral default
        (0.0, 16, -15),
        (32767 * 2.0**-10, 16, -10),
        (3.0, 16, -13),
    ],
)
def test_exponent_rule_examples(max_abs, bits, expected):
    assert exponent_for_max_abs(max_abs, bits) == expected


@settings(max_examples=400, deadline=None)
@given(st.floats(min_value=1e-30, max_value=1e30, allow_nan=False), st.sampled_from([8, 16]))
def test_exponent_rule_is_the_smallest_that_fits(max_abs, bits):
    """Within ESP-DL's range of exponents (±30): beyond it the exponent is clamped (clipping above, zeros below)."""
    e = exponent_for_max_abs(max_abs, bits)
    assert -EXPONENT_LIMIT <= e <= EXPONENT_LIMIT
    if e < EXPONENT_LIMIT:
        assert max_abs <= qmax(bits) * 2.0**e
    if e > -EXPONENT_LIMIT:
        assert max_abs > qmax(bits) * 2.0 ** (e - 1)


def test_exponent_rule_rejects_non_finite():
    with pytest.raises(ValueError):
        exponent_for_max_abs(math.inf, 8)


def test_minmax_observer_streams():
    observer = MinMaxObserver()
    for batch in (np.array([0.5, -2.0]), np.array([1.0, 3.9])):
        observer.update(batch)
    assert observer.max_abs == 3.9 and observer.count == 4
    assert observer.exponent(8) == exponent_for_max_abs(3.9, 8) == -5
    assert observer.clipped_fraction(-5, 8) == 0.0


def test_histogram_grows_exactly_by_merging_bins(rng):
    data = [rng.normal(0, 0.1, 1000), rng.normal(0, 3.0, 1000), rng.normal(0, 40.0, 1000)]
    streamed = HistogramObserver("mse")
    for batch in data:
        streamed.update(batch)
    whole = HistogramObserver("mse")
    whole.update(np.concatenate(data))
    assert streamed.range_log2 == whole.range_log2
    np.testing.assert_array_equal(streamed.counts, whole.counts)
    # numpy reference over the final range
    edges = np.linspace(0, 2.0**whole.range_log2, BINS + 1)
    reference, _ = np.histogram(np.abs(np.concatenate(data)), bins=edges)
    np.testing.assert_array_equal(whole.counts, reference)


def test_percentile_ignores_a_rare_outlier(rng):
    values = np.concatenate([rng.uniform(-1, 1, 100_000), [100.0]])
    assert make_observer("minmax").exponent(8) == -7  # empty observer: the neutral default
    minmax, percentile = make_observer("minmax"), make_observer("percentile")
    for observer in (minmax, percentile):
        for chunk in np.array_split(values, 4):  # chunks below SAMPLES_PER_BATCH: every value is counted
            observer.update(chunk)
    assert minmax.exponent(8) == exponent_for_max_abs(100.0, 8) == 0
    assert percentile.exponent(8) == exponent_for_max_abs(1.0, 8) == -6
    assert 0 < percentile.clipped_fraction(-6, 8) < 1e-4


def test_mse_matches_a_brute_force_search(rng):
    values = rng.laplace(0, 1.0, 50_000)
    observer = make_observer("mse")
    observer.update(values)
    top = exponent_for_max_abs(np.abs(values).max(), 8)

    def error(e):
        q = np.clip(np.round(values / 2.0**e), -128, 127) * 2.0**e
        return np.sum((values - q) ** 2)

    brute = min(range(top - 6, top + 1), key=error)
    assert abs(observer.exponent(8) - brute) <= 1  # histogram bin centres vs exact values


def test_mse_weight_exponent_worked_example():
    """One weight 1.0 among a thousand 0.01 at int8. Min-max keeps 1.0 exactly at e = -6 (q = 64), and
    0.01 rounds to 1 step of 2^-6: error 1000 * 0.005625^2 = 0.0316. At e = -7, 1.0 saturates to
    127 * 2^-7 (error 6.1e-5), and 0.01 rounds to 2^-7: 1000 * 0.0021875^2 = 0.0048. Total 0.0049, the
    least. At e = -8 the outlier alone costs (1 - 127/256)^2 = 0.25."""
    from espquant.calibration.exponents import weight_exponents

    weights = np.array([1.0] + [0.01] * 1000, np.float32)
    assert weight_exponents(weights, 8, None) == -6
    assert weight_exponents(weights, 8, None, "mse") == -7
    per_channel = np.stack([weights, np.full_like(weights, 0.5)])  # a uniform row keeps its min-max exponent
    assert weight_exponents(per_channel, 8, 0, "mse") == [-7, -7]  # 0.5 is exactly 64 * 2^-7
    assert weight_exponents(per_channel, 8, 0) == [-6, -7]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=1, max_size=40), st.sampled_from([8, 16]))
def test_mse_weight_exponent_is_never_worse_than_min_max(values, bits):
    from espquant.calibration.exponents import weight_exponents

    weights = np.array(values, np.float64)

    def error(e: int) -> float:
        return float(
            np.sum((weights - np.clip(np.round(weights * 2.0**-e), -(2 ** (bits - 1)), qmax(bits)) * 2.0**e) ** 2)
        )

    top, chosen = weight_exponents(weights, bits, None), weight_exponents(weights, bits, None, "mse")
    assert top - 6 <= chosen <= top
    assert all(error(chosen) <= error(e) for e in range(top - 6, top + 1))


def test_entropy_clips_a_long_tail_but_not_a_uniform_range(rng):
    tail = make_observer("entropy")
    tail.update(np.concatenate([rng.normal(0, 1, 200_000), [60.0]]))
    assert tail.exponent(8) < exponent_for_max_abs(60.0, 8)
    uniform = make_observer("entropy")
    uniform.update(rng.uniform(-1, 1, 200_000))
    assert uniform.exponent(8) == exponent_for_max_abs(1.0, 8)


def test_exact_zeros_do_not_count_as_clipped(rng):
    observer = make_observer("entropy")
    observer.update(np.maximum(rng.normal(0, 1, 10_000), 0))  # a ReLU output: half zeros
    assert observer.zeros > 4000
    assert observer.clipped_fraction(observer.exponent(8), 8) < 0.5


def test_exact_zeros_stay_out_of_the_bins(rng):
    values = np.maximum(rng.normal(0, 1, 10_000), 0).astype(np.float32)  # half exact zeros
    observer = HistogramObserver("entropy")
    observer.update(values)
    edges = np.linspace(0, 2.0**observer.range_log2, BINS + 1)
    reference, _ = np.histogram(values[values > 0], bins=edges)
    np.testing.assert_array_equal(observer.counts, reference)
    assert observer.zeros == int((values == 0).sum())


def test_large_batches_are_subsampled_but_the_maximum_is_exact(rng):
    observer = make_observer("entropy")
    values = rng.normal(0, 1, 1_000_000)
    values[123_457] = 50.0  # not on the sampling stride of the first batch
    observer.update(values)
    assert observer.max_abs == 50.0
    assert observer.sampled <= 1 << 14 and observer.count == 1_000_000


# --- the chip's rounding primitives (ARITHMETIC.md section 3 worked examples) ------------------------------

from espquant.quant.rounding import round_float, saturate, shift_round, wrap  # noqa: E402


@pytest.mark.parametrize(
    ("acc", "shift", "half_up", "half_even"),
    [
        (20, 3, 3, 2),
        (28, 3, 4, 4),
        (-12, 3, -1, -2),
        (-20, 3, -2, -2),
        (-28, 3, -3, -4),
        (-1, 1, 0, 0),
        (1030, 3, 129, 129),
    ],
)
def test_shift_round_worked_examples(acc, shift, half_up, half_even):
    assert shift_round(np.array([acc]), shift, "half_up")[0] == half_up
    assert shift_round(np.array([acc]), shift, "half_even")[0] == half_even
    assert saturate(shift_round(np.array([1030]), 3, "half_up"), 8)[0] == 127


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**40), 2**40), st.integers(-3, 30))
def test_shift_round_matches_python_integers(acc, shift):
    from fractions import Fraction

    exact = Fraction(acc, 2**shift) if shift >= 0 else Fraction(acc * 2 ** (-shift))
    floor = exact.numerator // exact.denominator
    frac = exact - floor
    up = floor + (1 if frac >= Fraction(1, 2) else 0)
    even = floor + (1 if frac > Fraction(1, 2) or (frac == Fraction(1, 2) and floor % 2 == 1) else 0)
    assert shift_round(np.array([acc]), shift, "half_up")[0] == up
    assert shift_round(np.array([acc]), shift, "half_even")[0] == even


def test_round_float_and_wrap():
    values = np.array([2.5, -2.5, -6.5000005, 0.49999997], dtype=np.float32)
    assert round_float(values, "half_up").tolist() == [3, -2, -7, 0]
    assert round_float(values, "half_even").tolist() == [2, -2, -7, 0]
    assert wrap(np.array([2**19, 2**19 - 1, -(2**19) - 1]), 20).tolist() == [-(2**19), 2**19 - 1, 2**19 - 1]


@pytest.mark.parametrize("method", ["minmax", "mse", "percentile", "entropy"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_nan_or_infinite_activation_is_named_not_binned(method, bad):
    """An activation that overflows in the float model (inf - inf gives NaN): Python's ``max`` dropped a NaN
    that was not its first argument, and the histogram cast inf to an integer (numpy warned)."""
    from espquant.calibration.observers import finite_range
    from espquant.errors import DatasetError

    observer = make_observer(method)
    observer.update(np.array([1.0, 2.0], np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        observer.update(np.array([3.0, bad], np.float32))
    with pytest.raises(DatasetError, match="'t' reaches"):
        finite_range("t", observer)
