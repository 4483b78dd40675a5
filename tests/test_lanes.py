"""Saturating accumulator lanes emulated only where they can saturate (simulator/lanes.py), against the
reference tap-by-tap clamping of ``kernels._saturating_accumulate``, on hand-worked and generated cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from espquant.quant.profiles import get_target
from espquant.simulator import lanes
from espquant.simulator.kernels import _accumulate


def _reference(products: np.ndarray, start: int, bits: int) -> int:
    acc, high = start, (1 << (bits - 1)) - 1
    for p in products:
        acc = min(max(acc + int(p), -high - 1), high)
    return acc


def test_walk_blocks_hand_worked():
    """Rails [-8, 7], start 5: +4 clamps at 7, -3 gives 4, +6 clamps at 7, -20 clamps at -8, -1 stays at -8, +3
    gives -5, where the unclamped sum is -6. Single-tap blocks (the only ones below the span 16 here)."""
    products = np.array([[4, -3, 6, -20, -1, 3]])
    assert _reference(products[0], 5, 4) == -5 and 5 + int(products.sum()) == -6
    got = lanes.walk_blocks(products, np.array([5]), np.array([-8]), np.array([7]), block=1)
    assert got.tolist() == [-5]


@settings(max_examples=200, deadline=None)
@given(
    products=st.lists(st.integers(-(2**14), 2**14), min_size=1, max_size=200),
    bits=st.sampled_from([8, 12, 16, 20, 24]),
    start_fraction=st.floats(-1, 1),
)
def test_walk_blocks_equals_tap_by_tap_clamping(products, bits, start_fraction):
    """Any products, any lane width: blocks whose magnitude stays below the rails' span give exactly the
    tap-by-tap result (the unclamped path touches at most one rail per block)."""
    high = (1 << (bits - 1)) - 1
    start = int(start_fraction * high)
    row = np.array(products)
    block = max(1, (2 * high) // (2**14))
    got = lanes.walk_blocks(row[None, :], np.array([start]), np.array([-high - 1]), np.array([high]), block)
    assert int(got[0]) == _reference(row, start, bits)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), taps=st.integers(1, 400), lean=st.booleans())
def test_emulate_gemm_equals_the_reference_lanes(seed, taps, lean):
    """Gemm sums on ESP32-S3 int8 (16 lanes of 20 bits, a tail of 40): ``emulate`` on the exact sums equals the
    reference ``_accumulate`` (which clamps tap by tap wherever the bound is reached)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (7, taps))
    w = rng.integers(-128, 128, (taps, 21))
    if lean:
        x[:3] = np.abs(x[:3])
        w[:, :6] = np.abs(w[:, :6])
    bias = rng.integers(-(2**19), 2**19, 21)
    profile = get_target("esp32s3")
    expected = _accumulate(x, w, bias, 8, profile)
    rails = lanes.lane_rails(bias, 21, 8, profile, depthwise=False)
    exact = x @ w + rails.start
    magnitude = np.abs(x) @ np.abs(w)
    got = lanes.emulate(
        exact.astype(np.float64),
        magnitude.astype(np.float64),
        rails,
        -1,
        lanes.rows_products(x, w),
        taps=taps,
        max_product=128 * 128,
        magnitude_exact=True,
    )
    np.testing.assert_array_equal(got.astype(np.int64), expected)


@pytest.mark.parametrize("depthwise", [False, True])
def test_emulate_convolution_products_follow_filter_memory_order(rng, depthwise):
    """The gathered tap products of a strided, dilated, padded convolution add up to the convolution and
    saturate like the reference (kh, kw, c) order."""
    from espquant.simulator.kernels import conv2d_nhwc

    channels = 6
    weight = rng.integers(-128, 128, (channels, 1 if depthwise else 5, 3, 3))
    x = rng.integers(-128, 128, (2, channels if depthwise else 5, 9, 7))
    geometry = {"strides": [2, 1], "pads": [1, 0, 2, 1], "dilations": [1, 2]}
    products = lanes.conv_products(x, weight, depthwise=depthwise, **geometry)
    out_shape = (2, channels, 5, 4)
    elements = np.arange(int(np.prod(out_shape)))
    sums = products(elements).sum(axis=1).reshape(out_shape)
    ref_weight = weight[:, 0] if depthwise else np.moveaxis(weight, 1, -1)
    common = dict(depthwise=depthwise, shift=0, relu=False, bits=16, **geometry)
    expected = conv2d_nhwc(np.moveaxis(x, 1, -1), ref_weight, None, profile=get_target("esp32c3"), **common)
    np.testing.assert_array_equal(np.clip(np.moveaxis(sums, 1, -1), -(2**15), 2**15 - 1), expected)  # plain-C: exact
    # With 10-bit rails every lane saturates somewhere: walk them all against the reference clamping.
    rows = products(elements)
    start = np.zeros(elements.size, np.int64)
    walked = lanes.walk_blocks(rows, start, start - 512, start + 511, block=1)
    assert walked.tolist() == [_reference(r, 0, 10) for r in rows]


def test_lane_rails_of_each_profile():
    s3 = lanes.lane_rails(np.array([2**19 + 5] * 20), 20, 8, get_target("esp32s3"), depthwise=False)
    assert s3.width.tolist() == [20] * 16 + [40] * 4
    assert s3.start[0] == 2**19 + 5 - 2**20 and s3.start[19] == 2**19 + 5  # 20-bit lanes wrap the bias
    assert not lanes.lane_rails(None, 4, 8, get_target("esp32c3"), depthwise=False).reachable
    p4 = lanes.lane_rails(None, 9, 16, get_target("esp32p4"), depthwise=True)
    assert p4.width.tolist() == [64] * 9
