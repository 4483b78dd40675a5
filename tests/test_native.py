"""The double-precision kernels of simulator/native.py (int16 layers): hand-worked integers, every kernel choice
against a plain int64 reference on random geometry, and whole models against the interpreter."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from espquant.simulator import compiled, native

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason="numba is not installed")


def _requantize(channels: int, start: np.ndarray, shift: int, half_even: bool, low=-32768, high=32767):
    return native.Requantize(start.astype(np.float64), np.full(channels, 2.0**-shift), half_even, low, high)


def _reference_conv(x, w, start, shift, half_even, strides, pads, dilations, depthwise, low=-32768, high=32767):
    """``sat(R((S + start) 2**-shift))`` with the sums in int64, tap by tap from a zero-padded input."""
    batch, channels, height, width = x.shape
    m, _, kh, kw = w.shape
    padded = np.zeros((batch, channels, height + pads[0] + pads[2], width + pads[1] + pads[3]), np.int64)
    padded[:, :, pads[0] : pads[0] + height, pads[1] : pads[1] + width] = x
    oh = (padded.shape[2] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (padded.shape[3] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    sums = np.zeros((batch, m, oh, ow), np.int64) + start.reshape(1, -1, 1, 1)
    for di in range(kh):
        for dj in range(kw):
            r, c = di * dilations[0], dj * dilations[1]
            window = padded[
                :, :, r : r + strides[0] * (oh - 1) + 1 : strides[0], c : c + strides[1] * (ow - 1) + 1 : strides[1]
            ]
            if depthwise:
                sums += window * w[:, 0, di, dj].reshape(1, -1, 1, 1)
            else:
                sums += np.einsum("nchw,mc->nmhw", window, w[:, :, di, dj])
    return _round(sums, shift, half_even, low, high)


def _round(sums: np.ndarray, shift: int, half_even: bool, low: int, high: int) -> np.ndarray:
    """Integer rounding of ``sums / 2**shift`` (the half of half-up is already in the sums' start)."""
    if shift <= 0:
        return np.clip(sums << -shift, low, high)
    floor = sums >> shift
    if half_even:
        rest = sums - (floor << shift)
        half = 1 << (shift - 1)
        floor = floor + ((rest > half) | ((rest == half) & (floor % 2 == 1)))
    return np.clip(floor, low, high)


def test_hand_worked_depthwise_and_rows():
    """One 3x3 channel, pad 1: the centre output sums all nine products, a corner four; ties go to even on
    ESP32-P4 and up (the half in the start) elsewhere."""
    x = np.arange(1, 10, dtype=np.float32).reshape(1, 1, 3, 3) * 1000  # 1000 .. 9000
    w = np.ones((1, 1, 3, 3), np.int64)
    # centre: 45000; corner (0, 0): 1000 + 2000 + 4000 + 5000 = 12000. Shift 4: 2812.5 and 750.
    even = native.Conv(w, [1, 1], [1, 1, 1, 1], [1, 1], True, _requantize(1, np.zeros(1), 4, True))(x)
    assert even[0, 0, 1, 1] == 2812 and even[0, 0, 0, 0] == 750  # 2812.5 -> 2812 (even)
    up = native.Conv(w, [1, 1], [1, 1, 1, 1], [1, 1], True, _requantize(1, np.full(1, 8), 4, False))(x)
    assert up[0, 0, 1, 1] == 2813 and up[0, 0, 0, 0] == 750  # (45000 + 8) / 16 = 2813.0
    # Gemm: [1000, -2000] @ [[3, 1], [4, 1]] = [-5000, -1000]; shift 3 with the half: -624.5 -> -625, -124.5 -> -125
    rows = native.Rows(np.array([[3, 1], [4, 1]]), _requantize(2, np.full(2, 4), 3, False))
    assert rows(np.array([[1000.0, -2000.0]], np.float32)).tolist() == [[-625.0, -125.0]]
    # Saturation and a fused ReLU's bounds
    clipped = native.Rows(np.array([[30000]]), _requantize(1, np.zeros(1), 0, True, low=0, high=32767))
    assert clipped(np.array([[2.0], [-2.0]], np.float32)).tolist() == [[32767.0], [0.0]]


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    depthwise=st.booleans(),
    kernel=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    strides=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    pads=st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)),
    dilations=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    size=st.sampled_from([(5, 7), (3, 3), (9, 30), (20, 13)]),  # narrow planes and wide ones (kernel choice)
    channels=st.sampled_from([1, 3, 8, 40]),  # few taps (plane kernels) and many (BLAS)
    shift=st.integers(-2, 34),
    half_even=st.booleans(),
    relu=st.booleans(),
    layouts=st.tuples(st.booleans(), st.booleans(), st.sampled_from([None, True, False])),
)
@example(  # a depthwise 1x1 layer (a per-channel scale): not a pointwise layer's BLAS product
    seed=0,
    depthwise=True,
    kernel=(1, 1),
    strides=(1, 1),
    pads=(0, 0, 0, 0),
    dilations=(1, 1),
    size=(5, 7),
    channels=3,
    shift=0,
    half_even=False,
    relu=False,
    layouts=(False, False, None),
)
def test_every_kernel_equals_the_int64_reference(
    seed, depthwise, kernel, strides, pads, dilations, size, channels, shift, half_even, relu, layouts
):
    """Depthwise (plane and channels-last pixel kernels), few-tap planes, 1x1 rows, im2col + BLAS: full-range
    int16 values, any geometry, shifts that round (ties included), shift left and saturate; tensors read and
    written channels first or last, computed in either layout (``native.Conv.takes_last`` ...)."""
    rng = np.random.default_rng(seed)
    height, width = size
    kh, kw = kernel
    if (height + pads[0] + pads[2] - dilations[0] * (kh - 1) - 1) < 0 or (
        width + pads[1] + pads[3] - dilations[1] * (kw - 1) - 1
    ) < 0:
        return  # no output pixel
    outputs = channels if depthwise else int(rng.integers(1, 6))
    w = rng.integers(-32768, 32768, (outputs, 1 if depthwise else channels, kh, kw))
    x = rng.integers(-32768, 32768, (2, channels, height, width))
    start = rng.integers(-(2**40), 2**40, outputs) >> int(rng.integers(0, 41))
    if not half_even and shift > 0:
        start = start + (1 << (shift - 1))
    low = 0 if relu else -32768
    requantize = _requantize(outputs, start, shift, half_even, low=low)
    conv = native.Conv(w, list(strides), list(pads), list(dilations), depthwise, requantize)
    conv.takes_last, conv.gives_last, conv.computes_last = layouts
    given_x = x.transpose(0, 2, 3, 1) if conv.takes_last else x
    got = conv(given_x.astype(np.float32))
    want = _reference_conv(x, w, start, shift, half_even, strides, pads, dilations, depthwise, low=low)
    np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1) if conv.gives_last else want)
    assert got.dtype == np.float32


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.sampled_from([(1, 7), (5, 40), (2, 3, 300), (64,)]),
    columns=st.integers(1, 9),
    shift=st.integers(0, 34),
    half_even=st.booleans(),
)
def test_rows_equal_the_int64_reference(seed, shape, columns, shift, half_even):
    """Gemm / MatMul rows for any leading shape (a 1-D vector included)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-32768, 32768, shape)
    w = rng.integers(-32768, 32768, (shape[-1], columns))
    start = rng.integers(-(2**36), 2**36, columns)
    got = native.Rows(w, _requantize(columns, start, shift, half_even))(x.astype(np.float32))
    want = _round(x @ w + start, shift, half_even, -32768, 32767)
    np.testing.assert_array_equal(got, want)
    assert got.shape == (*shape[:-1], columns)


def test_int16_models_run_their_accumulating_nodes_natively():
    """The shipped MNIST CNN at int16: every Conv becomes a native step, its input quantized natively too (its
    10-class Gemm, 15,680 products a sample, stays in its segment in double), equal to the interpreter and to the
    digit-split graphs they replace (compiled.NATIVE off)."""
    import onnx

    from espquant import Calibrator, Evaluator
    from espquant.demo import demo_model_path, load_demo_data
    from espquant.optimizer import optimize_model

    model = optimize_model(onnx.load(demo_model_path()))
    demo = load_demo_data()
    data = demo.test_inputs[:24]
    table = Calibrator("int16").calibrate(model, demo.calib_inputs[:64]).table
    for target in ("esp32s3", "esp32p4"):
        runs = []
        for native_on, interpreted in ((True, False), (False, False), (False, True)):
            quantized = Evaluator("int16", "per-tensor", target).generate_quantized_model(model, table)
            quantized.compiled = not interpreted
            with mock.patch.object(compiled, "NATIVE", native_on):
                runs.append(quantized.run_float({quantized.inputs[0]: data}))
            if native_on:
                program = quantized._programs[(True, None)]
                kinds = {node.op_type for node in program.native_nodes}
                assert kinds == {"Conv", compiled.QUANTIZE_INPUT} and not program.interpreted_nodes
        for name in runs[0]:
            np.testing.assert_array_equal(runs[0][name], runs[2][name])
            np.testing.assert_array_equal(runs[1][name], runs[2][name])


def _int16_runs(rng, nodes, weights, shape, target):
    """A graph of ``nodes`` from input ``x`` (``shape`` per sample) to output ``y`` with float ``weights``,
    calibrated at int16 on normal data and run on twice that data (some values saturate): ``(quantized model, its
    compiled program, compiled output, interpreted output)``."""
    from onnx import TensorProto, helper, numpy_helper

    from espquant import Calibrator, Evaluator

    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    data = rng.normal(0, 1, (5, *shape)).astype(np.float32)
    table = Calibrator("int16").calibrate(model, data).table
    quantized = Evaluator("int16", "per-tensor", target).generate_quantized_model(model, table)
    fast = quantized.run_float({"x": 2 * data})["y"]
    program = quantized._programs[(True, None)]
    quantized.compiled = False
    slow = quantized.run_float({"x": 2 * data})["y"]
    quantized.compiled = True
    return quantized, program, fast, slow


def _layer_steps(program: compiled.CompiledProgram) -> list[compiled._NativeStep]:
    """The program's native steps of layers (not the input's quantization)."""
    steps = [step for step in program.steps if isinstance(step, compiled._NativeStep)]
    return [step for step in steps if step.node.op_type != compiled.QUANTIZE_INPUT]


@pytest.mark.parametrize("target", ["esp32s3", "esp32p4", "esp32c3"])
def test_activations_after_a_native_convolution_are_looked_up_in_the_same_step(rng, target):
    """Conv -> HardSwish -> Conv -> Sigmoid at int16 (MobileNetV3's blocks): each activation, the only reader
    of its convolution, is the table of the interpreter's own step, applied by the native step itself (no
    onnxruntime segment between the two convolutions); the integers are the interpreter's."""
    from onnx import helper

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c1"], ["h"]),
        helper.make_node("Conv", ["h", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c2"], ["y"]),
    ]
    weights = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "w2": rng.normal(0, 0.3, (1, 8, 3, 3))}
    quantized, program, fast, slow = _int16_runs(rng, nodes, weights, (3, 10, 10), target)
    natives = _layer_steps(program)
    assert [len(step.after) for step in natives] == [1, 1]
    assert isinstance(natives[0].after[0], native.Activation)  # HardSwish: computed value by value
    assert [step.output for step in natives] == ["h", "y"]
    assert program.compiled_nodes == len(quantized.nodes) + 1  # + the input's quantization
    np.testing.assert_array_equal(fast, slow)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    exponent=st.integers(-20, 4),
    bits=st.sampled_from([8, 16]),
    half_even=st.booleans(),
)
def test_the_native_input_quantization_equals_the_reference(seed, exponent, bits, half_even):
    """``native.Activation.quantizer`` is ``kernels.quantize_float``: float32 product, half-up as floor in double or
    half-even, saturation; on ties (``k + 0.5`` times the step), values just beside them, huge and tiny values."""
    from espquant.quant.profiles import get_target
    from espquant.simulator import kernels

    rng = np.random.default_rng(seed)
    step = 2.0**exponent
    ties = (rng.integers(-(2**bits), 2**bits, 300) + 0.5) * step
    x = np.concatenate([ties, np.nextafter(ties, 0), np.nextafter(ties, np.inf), rng.normal(0, 2**bits * step, 300),
                        [0.0, -0.0, 1e30, -1e30, 1e-30, 3.4e38]]).astype(np.float32)  # fmt: skip
    profile = get_target("esp32p4" if half_even else "esp32s3")
    assert (profile.rounding == "half_even") == half_even
    with np.errstate(over="ignore"):  # 3.4e38 times 2**20 is inf in float32: saturated, as on the chip
        want = kernels.quantize_float(x, e_out=exponent, bits=bits, profile=profile)
    got = native.Activation.quantizer(exponent, half_even, bits)(x.reshape(3, -1)).reshape(-1)
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_an_int16_model_quantizes_its_input_in_a_native_step(rng):
    """A model whose first layer is a native step (an int16 Conv) quantizes its input natively too: the program
    starts with no onnxruntime segment, and its integers are the interpreter's."""
    from onnx import helper

    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    _, program, fast, slow = _int16_runs(rng, nodes, {"w": rng.normal(0, 0.3, (4, 3, 3, 3))}, (3, 9, 9), "esp32s3")
    assert [type(step).__name__ for step in program.steps] == ["_NativeStep", "_NativeStep"]
    assert program.steps[0].kernel.kind == native.IDENTITY  # the input's quantization
    np.testing.assert_array_equal(fast, slow)


@pytest.mark.parametrize("target", ["esp32s3", "esp32p4"])
@pytest.mark.parametrize(
    ("kernel", "strides", "pads", "native_pools"),
    [
        ([2, 2], [2, 2], [0, 0, 0, 0], True),
        ([3, 3], [2, 2], [1, 1, 1, 1], False),
        ([2, 2], [1, 2], [0, 0, 0, 0], False),
    ],
)
def test_a_maxpool_after_a_native_convolution_pools_in_the_same_step(rng, target, kernel, strides, pads, native_pools):
    """Conv -> Relu -> MaxPool -> Conv -> HardSwish -> MaxPool at int16 (an MNIST CNN's blocks) on odd planes: each
    2x2 MaxPool of stride 2, the only reader of what a native step computes, is pooled by that step (no onnxruntime
    segment between the two convolutions); other pools stay in onnxruntime. The integers are the interpreter's."""
    from onnx import helper

    pool = {"kernel_shape": kernel, "strides": strides, "pads": pads}
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], **pool),
        helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c2"], ["h2"]),
        helper.make_node("MaxPool", ["h2"], ["y"], **pool),
    ]
    weights = {"w1": rng.normal(0, 0.3, (6, 2, 3, 3)), "w2": rng.normal(0, 0.3, (5, 6, 3, 3))}
    _, program, fast, slow = _int16_runs(rng, nodes, weights, (2, 13, 11), target)
    natives = _layer_steps(program)
    if native_pools:
        assert [step.output for step in natives] == ["p1", "y"]
        assert [step.after[-1] for step in natives] == [native.max_pool_2x2] * 2  # the Relu is in the saturation
    else:
        assert [step.output for step in natives] == ["r1", "h2"]
    np.testing.assert_array_equal(fast, slow)


@pytest.mark.parametrize("target", ["esp32s3", "esp32p4"])
def test_native_convolutions_pass_channels_last_tensors_between_them(rng, target):
    """A depthwise-separable stack at int16 (1x1 expansion -> Relu -> strided 3x3 depthwise -> 1x1 projection ->
    HardSwish -> 2x2 MaxPool -> depthwise on a narrow plane -> Conv read by two layers): the tensors that one
    native convolution computes channels last and only native convolutions read stay channels last (no
    transposes between them), the pool pools them channels last, the tensor onnxruntime reads (the Add) and the
    output stay channels first; the integers are the interpreter's."""
    from onnx import helper

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["e1"]),
        helper.make_node("Relu", ["e1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["d2"], group=64, pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["d2", "w3"], ["p3"]),
        helper.make_node("HardSwish", ["p3"], ["h3"]),
        helper.make_node("MaxPool", ["h3"], ["m3"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["m3", "w4"], ["d4"], group=40, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["d4", "w5"], ["a5"]),
        helper.make_node("Conv", ["d4", "w6"], ["b5"]),
        helper.make_node("Add", ["a5", "b5"], ["y"]),
    ]
    weights = {  # 1x1 layers of more than FEW_WEIGHTS weights (through BLAS), large enough for native steps (_tiny)
        "w1": rng.normal(0, 0.2, (64, 48, 1, 1)),
        "w2": rng.normal(0, 0.3, (64, 1, 3, 3)),
        "w3": rng.normal(0, 0.2, (40, 64, 1, 1)),
        "w4": rng.normal(0, 0.3, (40, 1, 3, 3)),
        "w5": rng.normal(0, 0.2, (36, 40, 1, 1)),
        "w6": rng.normal(0, 0.2, (36, 40, 1, 1)),
    }
    quantized, program, fast, slow = _int16_runs(rng, nodes, weights, (48, 16, 14), target)
    steps = {step.node.outputs[0]: step.kernel for step in _layer_steps(program)}
    assert set(steps) == {"r1", "d2", "p3", "d4", "a5", "b5"}  # the Relu fused into the first layer
    assert {name for name, conv in steps.items() if conv.gives_last} == {"r1", "d2", "p3", "d4"}
    assert {name for name, conv in steps.items() if conv.takes_last} == {"d2", "p3", "d4", "a5", "b5"}
    pooling = next(step for step in _layer_steps(program) if step.output == "m3")
    assert pooling.after[-1] is native.max_pool_2x2_channels_last
    np.testing.assert_array_equal(fast, slow)
    # A layer whose plane size is not known still reads the layout its producer gives.
    next(node for node in quantized.nodes if node.outputs[0] == "p3").input_shapes = None
    quantized._programs.clear()
    x = {"x": rng.normal(0, 2, (3, 48, 16, 14)).astype(np.float32)}
    unknown = quantized.run_float(x)["y"]
    assert next(s for s in _layer_steps(quantized._programs[(True, None)]) if s.output == "m3").kernel.takes_last
    quantized.compiled = False
    np.testing.assert_array_equal(unknown, quantized.run_float(x)["y"])


@settings(max_examples=40, deadline=None)
@given(
    op_type=st.sampled_from(["HardSwish", "HardSigmoid", "LeakyRelu", "Relu"]),
    e_in=st.integers(-16, 2),
    e_out=st.integers(-16, 2),
    alpha=st.floats(0.01, 0.5),
    beta=st.floats(0.0, 1.0),
    half_even=st.booleans(),
)
def test_an_activation_computed_value_by_value_equals_its_int16_float_path(
    op_type, e_in, e_out, alpha, beta, half_even
):
    """``native.Activation`` reproduces the chip's int16 float path (``activations.float_path``: HardSwish's
    double clip, HardSigmoid's and LeakyRelu's float32 products, both roundings, saturation) on all 65,536 input
    values, for any exponents and attributes; a table that differs in one entry is refused."""
    from espquant.simulator.activations import float_function, float_path

    attrs = {"alpha": alpha, "beta": beta} if op_type == "HardSigmoid" else {"alpha": alpha}
    values = np.arange(-32768, 32768)
    rounding = "half_even" if half_even else "half_up"
    table = float_path(float_function(op_type, attrs), values, e_in, e_out, 16, rounding).astype(np.float32)
    computed = native.Activation.verified(op_type, attrs, (e_in, e_out), half_even, table, -32768)
    assert computed is not None
    np.testing.assert_array_equal(computed(values.astype(np.float32).reshape(2, -1)), table.reshape(2, -1))
    table[12345] += 1
    assert native.Activation.verified(op_type, attrs, (e_in, e_out), half_even, table, -32768) is None
    assert native.Activation.verified("Sigmoid", {}, (e_in, e_out), half_even, table, -32768) is None


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    broadcast=st.lists(st.booleans(), min_size=4, max_size=4),
    shift=st.integers(0, 31),
    half_even=st.booleans(),
)
def test_product_equals_the_simd_rule_of_mul(seed, shape, broadcast, shift, half_even):
    """``native.Product`` of two int16 tensors (one broadcast along random axes) equals ``kernels.mul``'s SIMD
    rule ``sat(SR(a b, s))`` in int64: both roundings, shifts 0-31 (products up to 2**30), saturation."""
    from espquant.quant.rounding import saturate, shift_round

    rng = np.random.default_rng(seed)
    a = rng.integers(-32768, 32768, shape)
    b = rng.integers(-32768, 32768, [1 if flat else n for n, flat in zip(shape, broadcast)])
    rounding = "half_even" if half_even else "half_up"
    start = compiled._half(np.asarray([shift]), rounding).astype(np.float64)
    product = native.Product(native.Requantize(start, np.asarray([2.0**-shift]), half_even, -32768, 32767))
    got = product(a.astype(np.float32), b.astype(np.float32))
    want = saturate(shift_round(a * b, shift, rounding), 16)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("target", ["esp32s3", "esp32p4", "esp32c3"])
@pytest.mark.parametrize("constant", [False, True])
def test_int16_mul_on_the_simd_rule_runs_natively(rng, target, constant):
    """A squeeze-excite gate ``x[N, C, H, W] * s[N, C, 1, 1]`` at int16 (or ``x`` times a constant ``[C, 1, 1]``):
    where the chip's kernel takes its SIMD rule (S3, P4: the channels fill the lanes) the Mul is a native step;
    on C3 it stays in the graph (float32 rule); the integers are the interpreter's, ties and saturation included."""
    from espquant.quant.profiles import get_target
    from espquant.simulator.quantized_model import QNode, QuantizedModel

    node = QNode("Mul", "mul", ["x", "s"], ["y"], {}, bits=16)
    node.input_shapes = [[None, 16, 5, 6], [None, 16, 1, 1] if not constant else [16, 1, 1]]
    gate = rng.integers(-32768, 32768, (1, 16, 1, 1) if not constant else (16, 1, 1))
    gate.reshape(-1)[:2] = [32767, -32768]
    constants = {"s": gate} if constant else {}
    exponents = {"x": -10, "s": -15, "y": -12}
    model = QuantizedModel([node], constants, exponents, ["x"] if constant else ["x", "s"], ["y"],
                           get_target(target), 16)  # fmt: skip
    x = rng.integers(-32768, 32768, (3, 16, 5, 6))
    x[0, 0, 0, :4] = [32767, -32768, 4, -4]  # saturation; 4 * 32767 * 2^-13 and its negative sit near ties
    feeds = {"x": x} if constant else {"x": x, "s": np.repeat(gate, 3, axis=0)}
    model.compiled = True
    fast = model.run(feeds)["y"]
    program = next(iter(model._programs.values()))
    model.compiled = False
    slow = model.run(feeds)["y"]
    np.testing.assert_array_equal(fast, slow)
    assert [n.op_type for n in program.native_nodes] == (["Mul"] if target != "esp32c3" else [])
    assert not program.interpreted_nodes


@pytest.mark.parametrize("target", ["esp32s3", "esp32p4", "esp32c3"])
def test_a_softmax_hands_float_probabilities_to_the_next_node_in_its_segment(rng, target):
    """Gemm -> Softmax -> Mul by a constant at int8: one segment, whose Softmax's float probabilities the Mul
    quantizes (never made integers on the way); the model's outputs (the probabilities and the product) equal
    the interpreter's, dtypes included."""
    from onnx import TensorProto, helper, numpy_helper

    from espquant import Calibrator, Evaluator

    inits = {"w": rng.normal(0, 0.5, (10, 6)).astype(np.float32), "k": np.full((1, 6), 3.0, np.float32)}
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["g"]),
        helper.make_node("Softmax", ["g"], ["p"], axis=1),
        helper.make_node("Mul", ["p", "k"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 6]) for n in ("p", "y")],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    data = rng.normal(0, 1, (16, 10)).astype(np.float32)
    table = Calibrator("int8").calibrate(model, data).table
    quantized = Evaluator("int8", "per-tensor", target).generate_quantized_model(model, table)
    fast = quantized.run_float({"x": 3 * data})
    program = quantized._programs[(True, None)]
    assert not program.native_nodes and not program.interpreted_nodes
    quantized.compiled = False
    slow = quantized.run_float({"x": 3 * data})
    for name in ("p", "y"):
        assert fast[name].dtype == slow[name].dtype
        np.testing.assert_array_equal(fast[name], slow[name])


@pytest.mark.parametrize("compiled_path", [True, False])
def test_a_model_limited_to_one_thread_runs_its_blas_products_on_one(compiled_path):
    """``threads = 1`` bounds numpy's BLAS pool while the model runs (its int16 products: native steps, or the
    interpreter's double sums) and gives the pool back after it, also when the run raises; ``threads = None``
    leaves it alone."""
    import onnx

    from espquant import Calibrator, Evaluator
    from espquant.demo import demo_model_path, load_demo_data
    from espquant.optimizer import optimize_model
    from espquant.simulator import blas, interpreter

    libraries = blas._libraries()
    if not libraries:
        pytest.skip("threadpoolctl finds no BLAS library in this numpy")
    before = [library.get_num_threads() for library in libraries]
    model = optimize_model(onnx.load(demo_model_path()))
    demo = load_demo_data()
    table = Calibrator("int16").calibrate(model, demo.calib_inputs[:32]).table
    quantized = Evaluator("int16", "per-tensor", "esp32s3").generate_quantized_model(model, table)
    quantized.compiled = compiled_path
    seen: list[list[int]] = []

    def watched(kernel):
        def watching(*args):
            seen.append([library.get_num_threads() for library in libraries])
            return kernel(*args)

        return watching

    if compiled_path:  # the int16 convolutions are native steps
        patch = mock.patch.object(native.Conv, "__call__", watched(native.Conv.__call__))
    else:
        patch = mock.patch.dict(interpreter.RUN, {"Conv": watched(interpreter.RUN["Conv"])})
    data = {quantized.inputs[0]: demo.test_inputs[:4]}
    with patch:
        for threads in (1, None):
            quantized.threads = threads
            quantized.run_float(data)
            assert [library.get_num_threads() for library in libraries] == before
    assert seen and seen[0] == [1] * len(libraries) and seen[-1] == before
    with mock.patch.object(native.Conv, "__call__", side_effect=RuntimeError("boom")):
        quantized.threads = 1
        quantized.compiled = True
        with pytest.raises(RuntimeError):
            quantized.run_float(data)
    assert [library.get_num_threads() for library in libraries] == before


@pytest.mark.parametrize("op", ["Gemm", "Conv"])
@pytest.mark.parametrize("target", ["esp32s3", "esp32p4"])
def test_a_layer_of_few_products_keeps_its_double_sums_in_its_segment(rng, op, target):
    """An int16 Gemm / 1x1 Conv of at most ``IN_GRAPH_PRODUCTS`` products a sample (the float model's shapes say
    how many) stays in the graph, in onnxruntime's double MatMul, instead of ending its segment in a native step;
    32 products more and it is a native step. Both equal the interpreter, full-range activations included."""
    from espquant.quant.profiles import get_target
    from espquant.simulator.quantized_model import QNode, QuantizedModel

    limit = compiled.IN_GRAPH_PRODUCTS
    for products, native_expected in ((limit, False), (limit + 32, True)):
        # weights within 2**10: beyond float32's exact sums, short of ESP32-S3's int16 lane rails
        if op == "Gemm":  # K x 16 weights, one row a sample
            weight, x = rng.integers(-(2**10), 2**10, (products // 16, 16)), (5, products // 16)
            shape, attrs = [None, products // 16], {}
        else:  # 8 x 4 weights on a 1 x (products / 32) plane
            weight, x = rng.integers(-(2**10), 2**10, (8, 4, 1, 1)), (5, 4, 1, products // 32)
            shape, attrs = [None, 4, 1, products // 32], {}
        node = QNode(op, op.lower(), ["x", "w", "b"], ["y"], attrs, bits=16)
        node.input_shapes = [shape, list(weight.shape), [weight.shape[-1] if op == "Gemm" else 8]]
        bias = rng.integers(-(2**20), 2**20, weight.shape[-1] if op == "Gemm" else 8)
        exponents = {"x": -8, "w": -14, "b": -22, "y": -7}
        model = QuantizedModel([node], {"w": weight, "b": bias}, exponents, ["x"], ["y"], get_target(target), 16)
        data = rng.integers(-(2**15), 2**15, x)
        data.reshape(-1)[:2] = [-(2**15), 2**15 - 1]
        model.compiled = True
        fast = model.run({"x": data})["y"]
        program = model._programs[(False, None)]
        assert bool(program.native_nodes) == native_expected, products
        model.compiled = False
        np.testing.assert_array_equal(fast, model.run({"x": data})["y"])


def _spinning(session) -> bool:
    """Whether the session lets onnxruntime's idle workers spin (its config entry; spinning is onnxruntime's
    default, where the entry is absent)."""
    options = session.get_session_options()
    try:
        return options.get_session_config_entry("session.intra_op.allow_spinning") != "0"
    except RuntimeError:  # onnxruntime raises for an entry never set: its default, spinning
        return True


@pytest.mark.parametrize("bits", ["int8", "int16"])
def test_sessions_spin_only_when_nothing_runs_between_their_calls(bits):
    """A program of one onnxruntime segment keeps onnxruntime's default, spinning workers (nothing else runs between
    its calls); a program whose native steps run between segments makes its sessions' workers sleep, so that they
    leave the cores to those steps (runtime.create_session, compile_program). The demo CNN: one segment at int8, native
    convolutions between segments at int16, with onnxruntime's default threads and with one."""
    import onnx

    from espquant import Calibrator, Evaluator
    from espquant.demo import demo_model_path, load_demo_data
    from espquant.optimizer import optimize_model

    model = optimize_model(onnx.load(demo_model_path()))
    demo = load_demo_data()
    table = Calibrator(bits).calibrate(model, demo.calib_inputs[:32]).table
    quantized = Evaluator(bits, "per-tensor", "esp32s3").generate_quantized_model(model, table)
    for threads in (None, 1):
        quantized.threads = threads
        for _ in range(compiled.BLOCKED_FROM_RUN):  # the sessions that run on blocked tensors too
            quantized.run_float({quantized.inputs[0]: demo.test_inputs[:2]})
            program = quantized._programs[(True, threads)]
            segments = [step for step in program.steps if isinstance(step, compiled._Segment)]
            alone = len(program.steps) == 1
            assert alone == (bits == "int8") and segments
            assert all(_spinning(segment.session) == alone for segment in segments)


def test_a_session_without_spinning_says_so_in_its_options():
    """``create_session(spinning=False)`` sets onnxruntime's ``allow_spinning`` entry to 0; the default leaves it."""
    from onnx import TensorProto, helper

    from espquant.runtime import create_session

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert not _spinning(create_session(model, spinning=False))
    assert _spinning(create_session(model))
