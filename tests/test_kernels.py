"""Integer kernels against hand-worked cases from ARITHMETIC.md and a plain-Python reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from espquant.quant.profiles import get_target
from espquant.simulator import kernels

S3, P4, C = get_target("esp32s3"), get_target("esp32p4"), get_target("esp32c3")


def _python_conv(x, w, b, stride, pad, shift, rounding, relu):
    """Straightforward loops in Python integers: the reference the numpy kernel must equal."""
    batch, height, width, channels = x.shape
    n, kh, kw, _ = w.shape
    out_h = (height + 2 * pad - kh) // stride + 1
    out_w = (width + 2 * pad - kw) // stride + 1
    out = np.zeros((batch, out_h, out_w, n), np.int64)
    for bi in range(batch):
        for oy in range(out_h):
            for ox in range(out_w):
                for o in range(n):
                    acc = int(b[o])
                    for i in range(kh):
                        for j in range(kw):
                            y, xx = oy * stride + i - pad, ox * stride + j - pad
                            if 0 <= y < height and 0 <= xx < width:
                                acc += sum(int(x[bi, y, xx, c]) * int(w[o, i, j, c]) for c in range(channels))
                    q, r = divmod(acc, 1 << shift)
                    half = 1 << (shift - 1)
                    if r > half or (r == half and (rounding == "half_up" or q % 2 == 1)):
                        q += 1
                    q = max(q, 0) if relu else q
                    out[bi, oy, ox, o] = min(max(q, -128), 127)
    return out


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([1, 2]),
    st.sampled_from([0, 1]),
    st.integers(1, 9),
    st.booleans(),
    st.sampled_from(["esp32s3", "esp32p4", "esp32c3"]),
)
def test_conv_matches_python_integers(seed, stride, pad, shift, relu, target):
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (1, 5, 6, 3))
    w = rng.integers(-128, 128, (4, 3, 3, 3))
    b = rng.integers(-5000, 5000, 4)
    profile = get_target(target)
    got = kernels.conv2d_nhwc(
        x,
        w,
        b,
        strides=[stride, stride],
        pads=[pad] * 4,
        dilations=[1, 1],
        depthwise=False,
        shift=shift,
        relu=relu,
        bits=8,
        profile=profile,
    )
    np.testing.assert_array_equal(got, _python_conv(x, w, b, stride, pad, shift, profile.rounding, relu))


def test_s3_int8_lanes_saturate_at_20_bits_after_every_product():
    # 16 output channels (one full lane block) of a 1x1 conv over 40 input channels with maximal products:
    # 40 * 127 * 127 = 645,160 > 2**19 - 1 = 524,287. The S3 lane stops at 524,287; P4 (32-bit) does not.
    x = np.full((1, 1, 1, 40), 127)
    w = np.full((16, 1, 1, 40), 127)
    common = dict(strides=[1, 1], pads=[0] * 4, dilations=[1, 1], depthwise=False, shift=13, relu=False, bits=8)
    assert kernels.conv2d_nhwc(x, w, None, profile=S3, **common)[0, 0, 0, 0] == (524_287 + 4096) >> 13  # 64
    assert kernels.conv2d_nhwc(x, w, None, profile=P4, **common)[0, 0, 0, 0] == (645_160 + 4096) >> 13  # 79
    # Order matters: the last two products are negative, so the saturated lane then comes down from the rail.
    w_late_negative = w.copy()
    w_late_negative[:, :, :, -2:] = -127
    s3 = kernels.conv2d_nhwc(x, w_late_negative, None, profile=S3, **common)[0, 0, 0, 0]
    p4 = kernels.conv2d_nhwc(x, w_late_negative, None, profile=P4, **common)[0, 0, 0, 0]
    assert s3 == (524_287 - 2 * 16_129 + 4096) >> 13  # 60
    assert p4 == (36 * 16_129 + 4096) >> 13  # 71
    # The 8 tail channels of a 24-channel layer use the 40-bit accumulator: no saturation there.
    w24 = np.full((24, 1, 1, 40), 127)
    out = kernels.conv2d_nhwc(x, w24, None, profile=S3, **common)[0, 0, 0]
    assert out[:16].tolist() == [64] * 16 and out[16:].tolist() == [79] * 8


def test_s3_bias_wraps_into_the_20_bit_lane():
    x = np.zeros((1, 1, 1, 1), np.int64)
    w = np.zeros((16, 1, 1, 1), np.int64)
    bias = np.full(16, 2**19)  # wraps to -2**19 in a 20-bit lane
    common = dict(strides=[1, 1], pads=[0] * 4, dilations=[1, 1], depthwise=False, shift=13, relu=False, bits=8)
    assert kernels.conv2d_nhwc(x, w, bias, profile=S3, **common)[0, 0, 0, 0] == -64
    assert kernels.conv2d_nhwc(x, w, bias, profile=C, **common)[0, 0, 0, 0] == 64


def test_average_pool_float32_tie_from_the_spec():
    # area 7, e_in - e_out = -4, sum -728: exact -6.5, float32 gives -6.5000005 -> -7 on every profile.
    x = np.zeros((1, 1, 7, 1), np.int64)
    x[0, 0, :, 0] = [-104] * 7  # sum -728
    for profile in (S3, P4, C):
        out = kernels.average_pool_nhwc(
            x, kernel=[1, 7], strides=[1, 1], pads=[0, 0, 0, 0], e_in=-8, e_out=-4, bits=8, profile=profile
        )
        assert out[0, 0, 0, 0] == -7


def test_mul_paths():
    a = np.arange(-8, 8).reshape(1, 16)
    b = np.full((1, 16), 3)
    simd = kernels.mul(a, b, e_a=-4, e_b=-4, e_out=-5, bits=8, profile=S3)  # d0 = 16 lanes: SR(a*b, 3)
    assert simd.tolist()[0] == [((v * 3) + 4) >> 3 for v in range(-8, 8)]
    short = kernels.mul(a[:, :5], b[:, :5], e_a=-4, e_b=-4, e_out=-5, bits=8, profile=P4)  # float path
    expected = np.rint(np.arange(-8, -3) * 3 / 8.0)
    np.testing.assert_array_equal(short[0], expected)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from([1, 2]),
    st.sampled_from([[0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 2, 1]]),
    st.sampled_from([1, 2]),
    st.booleans(),
)
def test_float32_onnxruntime_sums_equal_the_integer_kernel(seed, stride, pads, dilation, depthwise):
    # The fast path (onnxruntime float32 Conv, used when every partial sum stays below 2**24) must give the
    # very integers of the numpy kernel.
    from espquant.simulator.interpreter import _float32_conv_sums
    from espquant.simulator.quantized_model import QNode, QuantizedModel

    rng = np.random.default_rng(seed)
    channels = 6
    x = rng.integers(-128, 128, (2, channels, 7, 8))
    w = rng.integers(-40, 40, (channels, 1, 3, 3)) if depthwise else rng.integers(-40, 40, (5, channels, 3, 3))
    group = channels if depthwise else 1
    model = QuantizedModel([], {}, {}, [], [], P4, 8)
    node = QNode("Conv", f"conv{seed}", ["x", "w"], ["y"], {})
    sums = _float32_conv_sums(model, node, x, w, None, [stride] * 2, pads, [dilation] * 2, group)
    assert sums is not None
    # Reference: the definition, in int64 sums over each output pixel's window.
    padded = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    out_h = (padded.shape[2] - dilation * 2 - 1) // stride + 1
    out_w = (padded.shape[3] - dilation * 2 - 1) // stride + 1
    reference = np.zeros((2, w.shape[0], out_h, out_w), np.int64)
    for oy in range(out_h):
        for ox in range(out_w):
            rows = slice(oy * stride, oy * stride + 2 * dilation + 1, dilation)
            cols = slice(ox * stride, ox * stride + 2 * dilation + 1, dilation)
            window = padded[:, :, rows, cols]
            if depthwise:
                reference[:, :, oy, ox] = np.einsum("bchw,chw->bc", window, w[:, 0])
            else:
                reference[:, :, oy, ox] = np.einsum("bchw,nchw->bn", window, w)
    np.testing.assert_array_equal(sums, reference)


@pytest.mark.parametrize("scale", [1, 4, 127])
def test_fast_path_equals_lane_emulation_on_esp32s3(scale):
    # Weights whose worst case exceeds the S3 20-bit lane: with small inputs this data never reaches the rail
    # (the fast path must be taken and agree); with scale 127 it does (the emulation must be used).
    from espquant.simulator.interpreter import _conv
    from espquant.simulator.quantized_model import QNode, QuantizedModel

    rng = np.random.default_rng(scale)
    x = rng.integers(-scale, scale + 1, (2, 32, 6, 6))
    w = rng.integers(-127, 128, (16, 32, 3, 3))
    model = QuantizedModel([], {}, {"x": -7, "w": -7, "y": -2}, ["x"], ["y"], S3, 8)
    node = QNode("Conv", "conv", ["x", "w"], ["y"], {"pads": [1, 1, 1, 1]})
    got = _conv(model, node, {"x": x, "w": w})[0]
    expected = kernels.conv2d_nhwc(
        np.moveaxis(x, 1, -1),
        np.moveaxis(w, 1, -1),
        None,
        strides=[1, 1],
        pads=[1, 1, 1, 1],
        dilations=[1, 1],
        depthwise=False,
        shift=12,
        relu=False,
        bits=8,
        profile=S3,
    )
    np.testing.assert_array_equal(got, np.moveaxis(expected, -1, 1))
    assert ("y" in model._sessions) == (scale < 127)  # sessions are keyed by the output tensor


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    taps=st.integers(1, 100),
    bits=st.sampled_from([8, 10, 20]),
)
def test_saturating_accumulation_matches_tap_by_tap_python_integers(data, taps, bits):
    """Blocks of taps added at once (when no running sum can reach the rail) give exactly the sequential
    clamp after every product, whatever the data does near the rails."""
    from espquant.simulator.kernels import _saturating_accumulate

    rows, outputs = 2, 3
    value = st.integers(-128, 127)
    cols = np.array(data.draw(st.lists(value, min_size=rows * taps, max_size=rows * taps))).reshape(rows, taps)
    weight = np.array(data.draw(st.lists(value, min_size=taps * outputs, max_size=taps * outputs))).reshape(
        taps, outputs
    )
    start = np.array(data.draw(st.lists(st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1), min_size=3, max_size=3)))
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    expected = np.zeros((rows, outputs), np.int64)
    for r in range(rows):
        for o in range(outputs):
            acc = int(start[o])
            for t in range(taps):
                acc = min(max(acc + int(cols[r, t]) * int(weight[t, o]), low), high)
            expected[r, o] = acc
    np.testing.assert_array_equal(_saturating_accumulate(cols, weight, start, bits), expected)
