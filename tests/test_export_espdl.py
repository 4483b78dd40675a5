"""The .espdl exporter: the FlatBuffers writer, the weight byte orders, the exported graph and its round trip.

The round trip is the contract: a file written for a target, read back with ``load_espdl`` and simulated from
its own contents (NHWC layouts, blocked weights, tables and all), computes exactly the integers of the
in-memory quantized model, on every target and width.
"""

from __future__ import annotations

import struct

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from conftest import shared_dir
from espquant import Calibrator, Evaluator
from espquant.checker import check_model
from espquant.cli import main
from espquant.demo import demo_model_path, load_demo_data
from espquant.errors import DatasetError, OptionError, OutputError, QuantTableError
from espquant.espdl.layouts import (
    decode_conv_weight,
    decode_depthwise_weight,
    decode_kn_matrix,
    encode_conv_weight,
    encode_depthwise_weight,
    encode_kn_matrix,
)
from espquant.espdl.reader import read_espdl
from espquant.espdl.writer import encode_espdl
from espquant.optimizer import optimize_model
from espquant.simulator.espdl_model import load_espdl
from helpers import make_model, tensor
from test_compiled import _cnn

VECTORS = sorted((shared_dir() / "vectors").glob("*/*.espdl")) if (shared_dir() / "vectors").is_dir() else []
TARGETS = ["esp32s3", "esp32p4", "esp32c3"]


# --- the writer ---------------------------------------------------------------------------------------------


def _same_tensor(a, b) -> bool:
    return (
        (a.name, a.dtype, a.dims, a.doc) == (b.name, b.dtype, b.dims, b.doc)
        and np.array_equal(np.asarray(a.data).reshape(-1), np.asarray(b.data).reshape(-1))
        and (a.exponents or [0]) == (b.exponents or [0])
    )


def _values(values):
    return [(v.name, v.dtype, v.shape, v.exponents or [0]) for v in values]


@pytest.mark.skipif(not VECTORS, reason=f"Espressif's reference vectors not found under {shared_dir()}")
def test_the_writer_reproduces_every_shared_file(tmp_path):
    """Every file Espressif's toolchain wrote (EDL1 and EDL2) is re-encoded as EDL2 and reads back the same."""
    for path in VECTORS:
        original = read_espdl(path)
        data = encode_espdl(original)
        assert data[:4] == b"EDL2" and len(data) % 16 == 0
        assert struct.unpack_from("<II", data, 4) == (0, len(data) - 16)
        copy_path = tmp_path / "copy.espdl"
        copy_path.write_bytes(data)
        copy = read_espdl(copy_path)
        assert copy.nodes == original.nodes, path.name
        assert (copy.metadata, copy.graph_name, copy.ir_version) == (
            original.metadata,
            original.graph_name,
            original.ir_version,
        )
        assert list(copy.initializers) == list(original.initializers)
        assert all(_same_tensor(copy.initializers[k], v) for k, v in original.initializers.items()), path.name
        for mine, theirs in ((copy.test_inputs, original.test_inputs), (copy.test_outputs, original.test_outputs)):
            assert list(mine) == list(theirs) and all(_same_tensor(mine[k], v) for k, v in theirs.items())
        assert _values(copy.inputs) == _values(original.inputs)
        assert _values(copy.values.values()) == _values(original.values.values())


# --- weight byte orders -------------------------------------------------------------------------------------


def test_blocked_int8_conv_bytes_by_hand():
    """N = 17 int8 output channels: one block of 16 lanes interleaved per tap and input channel, then the
    17th channel in plain HWC order (ESPDL_FORMAT.md 5.2)."""
    n, kh, kw, c = 17, 1, 2, 3
    weight = np.array(
        [[[[100 * o + 10 * y + ch for ch in range(c)] for y in range(kw)] for _ in range(kh)] for o in range(n)]
    )
    flat = encode_conv_weight(weight, 8, blocked=True)
    assert flat[:16].tolist() == [100 * o for o in range(16)]  # tap (0, 0), channel 0, lanes 0..15
    assert flat[16:32].tolist() == [100 * o + 1 for o in range(16)]  # channel 1
    assert flat[48:64].tolist() == [100 * o + 10 for o in range(16)]  # tap (0, 1), channel 0
    assert flat[96:].tolist() == [1600, 1601, 1602, 1610, 1611, 1612]  # the tail channel, plain
    assert encode_conv_weight(weight, 8, blocked=False)[:6].tolist() == [0, 1, 2, 10, 11, 12]  # NHWC
    depthwise = np.arange(9 * 3).reshape(9, 1, 3)  # (N, KH, KW) with N = 9 at int16: one 8-lane block + 1
    flat = encode_depthwise_weight(depthwise, 16, blocked=True)
    assert flat[:8].tolist() == [3 * o for o in range(8)] and flat[-3:].tolist() == [24, 25, 26]
    assert encode_depthwise_weight(depthwise, 16, blocked=False)[:9].tolist() == [3 * o for o in range(9)]  # HWN


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 3),
    c=st.integers(1, 5),
    bits=st.sampled_from([8, 16]),
    blocked=st.booleans(),
)
def test_encoders_invert_the_decoders(n, k, c, bits, blocked):
    rng = np.random.default_rng(n * 100 + k * 10 + c)
    conv = rng.integers(-128, 128, (n, k, k + 1, c))
    assert np.array_equal(
        decode_conv_weight(encode_conv_weight(conv, bits, blocked), n, k, k + 1, c, bits, blocked), conv
    )
    depthwise = rng.integers(-128, 128, (n, k, k))
    flat = encode_depthwise_weight(depthwise, bits, blocked)
    assert np.array_equal(decode_depthwise_weight(flat, n, k, k, bits, blocked), depthwise)
    matrix = rng.integers(-128, 128, (c + 3, n))
    assert np.array_equal(decode_kn_matrix(encode_kn_matrix(matrix, bits, blocked), c + 3, n, bits, blocked), matrix)


# --- the exported graph ---------------------------------------------------------------------------------------


def _round_trip(quantized, path, samples: np.ndarray) -> None:
    """The file re-loaded and run on ``samples`` equals the in-memory model, output by output."""
    loaded = load_espdl(path)
    ints = {name: quantized.quantize_input(name, samples) for name in quantized.inputs[:1]}
    expected = quantized.run(ints)
    feeds = {name: np.transpose(v, loaded.onnx_layout(name)) for name, v in ints.items()}
    got = loaded.run(feeds)
    assert [o.name for o in loaded.outputs] == list(expected)
    for name, want in expected.items():
        back = np.transpose(got[name], np.argsort(loaded.onnx_layout(name)))
        if name in quantized.float_tensors:  # NaN where both are NaN counts as equal (assert_array_equal)
            np.testing.assert_array_equal(back.astype(np.float32), want.astype(np.float32))
        else:
            np.testing.assert_array_equal(back, want, err_msg=name)


@pytest.fixture(scope="module")
def demo():
    return optimize_model(onnx.load(demo_model_path())), load_demo_data()


@pytest.mark.parametrize(
    ("bits", "granularity", "target"),
    [
        ("int8", "per-tensor", "esp32s3"),
        ("int8", "per-tensor", "esp32p4"),
        ("int8", "per-tensor", "esp32c3"),
        ("int8", "per-channel", "esp32p4"),
        ("int16", "per-tensor", "esp32s3"),
        ("int16", "per-tensor", "esp32p4"),
        ("int16", "per-tensor", "esp32c3"),
    ],
)
def test_the_demo_model_round_trips_bit_for_bit(tmp_path, demo, bits, granularity, target):
    model, data = demo
    table = Calibrator(bits, granularity).calibrate(model, data.calib_inputs[:200]).table
    evaluator = Evaluator(bits, granularity, target)
    quantized = evaluator.generate_quantized_model(model, table)
    path = evaluator.export_espdl(tmp_path / "demo.espdl", data.test_inputs)
    _round_trip(quantized, path, data.test_inputs[:256])
    decoded = read_espdl(path)
    raw = path.read_bytes()
    assert raw[:4] == b"EDL2" and struct.unpack_from("<II", raw, 4) == (0, len(raw) - 16) and len(raw) % 16 == 0
    assert decoded.metadata["target"] == target and decoded.ir_version == model.ir_version
    convs = [n for n in decoded.nodes if n.op_type == "Conv"]
    assert {n.quant_type for n in decoded.nodes} == {"S8" if bits == "int8" else "S16"}
    assert {n.attributes["activation"] for n in convs} == {"Relu", "Linear"}
    weight, bias = decoded.initializers[convs[0].inputs[1]], decoded.initializers[convs[0].inputs[2]]
    assert weight.dtype == ("INT8" if bits == "int8" else "INT16")
    assert bias.dtype == ("INT32" if bits == "int8" else "INT64")
    assert weight.dims == (3, 3, 1, 16)  # [KH, KW, C, N]
    lanes = 16 if bits == "int8" else 8
    assert weight.doc == (f"layout ==> (N/{lanes})HWC{lanes}" if target != "esp32c3" else "layout ==> NHWC")
    assert len(weight.exponents) == (16 if granularity == "per-channel" else 1)
    assert bias.exponents == [quantized.exponent(convs[0].inputs[0]) + e for e in weight.exponents]
    assert decoded.inputs[0].shape == (1, 28, 28, 1)  # the image enters a Conv: stored NHWC
    assert all(v.exponents == [quantized.exponent(k)] for k, v in decoded.values.items() if k in quantized.exponents)
    # The embedded test values: the first given digit and the simulator's outputs for it.
    loaded = load_espdl(path)
    inputs, outputs = loaded.test_values
    first = quantized.quantize_input(quantized.inputs[0], data.test_inputs[:1])
    np.testing.assert_array_equal(inputs[quantized.inputs[0]], first.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(loaded.run(inputs)["logits"], outputs["logits"])


@pytest.mark.parametrize("target", TARGETS)
def test_every_exportable_operator_round_trips(tmp_path, rng, target):
    """Conv (strided, depthwise, fused ReLU), Clip, Add / Sub / Mul with a per-channel constant, MaxPool,
    AveragePool, an int8 Sigmoid table, Transpose, Concat, GlobalAveragePool, Squeeze / Unsqueeze, Flatten,
    Gemm, Reshape, Softmax (float output) and RequantizeLinear where exponents change: Transposes go in
    wherever an op needs the other layout."""
    model = _cnn(rng)
    table = Calibrator("int8").calibrate(model, rng.normal(0, 1, (16, 3, 12, 12)).astype(np.float32)).table
    evaluator = Evaluator("int8", "per-tensor", target)
    quantized = evaluator.generate_quantized_model(model, table)
    path = evaluator.export_espdl(tmp_path / "cnn.espdl")
    _round_trip(quantized, path, 3 * rng.normal(0, 1, (32, 3, 12, 12)).astype(np.float32))
    decoded = read_espdl(path)
    ops = {n.op_type for n in decoded.nodes}
    assert {"Transpose", "RequantizeLinear", "Softmax", "Sigmoid", "Mul", "Concat"} <= ops
    sigmoid = next(n for n in decoded.nodes if n.op_type == "Sigmoid")
    lut = decoded.initializers[sigmoid.attributes["lut"]]
    assert lut.dtype == "INT8" and lut.dims == (256,)
    softmax = next(n for n in decoded.nodes if n.op_type == "Softmax")
    assert decoded.values[softmax.outputs[0]].dtype == "FLOAT"
    mul = next(n for n in decoded.nodes if n.op_type == "Mul")
    assert decoded.initializers[mul.inputs[1]].dims == (1, 1, 1, 16)  # the (1, C, 1, 1) constant, NHWC


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("target", TARGETS)
def test_per_channel_prelu_over_rows_exports(tmp_path, rng, target, bits):
    """MTCNN's RNet / ONet run PRelu on a Gemm's (N, C) output: export refused it ('needs a 3-D or 4-D input')
    although check accepted it. It is written as (N, 1, 1, C) between two Reshapes and re-simulated per batch."""
    model = make_model(
        [helper.make_node("Gemm", ["x", "w"], ["h"], name="fc"), helper.make_node("PRelu", ["h", "s"], ["y"])],
        [tensor("x", ["N", 6])],
        [tensor("y", ["N", 10])],
        {"w": rng.normal(0, 0.5, (6, 10)).astype(np.float32), "s": rng.uniform(0.05, 0.5, 10).astype(np.float32)},
    )
    samples = rng.normal(0, 1, (16, 6)).astype(np.float32)
    evaluator = Evaluator(f"int{bits}", "per-tensor", target)
    table = Calibrator(f"int{bits}").calibrate(model, samples).table
    quantized = evaluator.generate_quantized_model(model, table)
    path = evaluator.export_espdl(tmp_path / "rows.espdl", test_inputs=samples)
    assert [n.op_type for n in read_espdl(path).nodes][-3:] == ["Reshape", "PRelu", "Reshape"]
    _round_trip(quantized, path, samples)


@pytest.mark.parametrize("target", TARGETS)
def test_gemm_with_a_row_bias_exports(tmp_path, rng, target):
    """skl2onnx writes an MLP's intercepts as (1, N) Gemm biases: the export's simulation stopped with numpy's
    'input operand has more dimensions than allowed by the axis remapping'."""
    model = make_model(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc"),
            helper.make_node("Relu", ["h"], ["y"], name="relu"),
        ],
        [tensor("x", [None, 8])],
        [tensor("y", [None, 4])],
        {"w": rng.normal(0, 0.5, (8, 4)).astype(np.float32), "b": rng.normal(0, 0.5, (1, 4)).astype(np.float32)},
    )
    samples = rng.normal(0, 1, (16, 8)).astype(np.float32)
    evaluator = Evaluator("int8", "per-tensor", target)
    quantized = evaluator.generate_quantized_model(model, Calibrator("int8").calibrate(model, samples).table)
    path = evaluator.export_espdl(tmp_path / "mlp.espdl", test_inputs=samples)
    _round_trip(quantized, path, samples)


@pytest.mark.parametrize("target", TARGETS)
def test_reshape_copy_target_is_written_with_allowzero(tmp_path, rng, target):
    """The optimizer writes ``x.view(x.size(0), -1)`` under a dynamic batch as Reshape(x, [0, -1]). ESP-DL's
    Reshape reads ``allowzero`` from an attribute into an uninitialised int and asserts on a 0 unless it reads 0
    (PP-OCR's classifier aborted in Espressif's runtime), so the file writes the attribute."""
    model = make_model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="flatten")],
        [tensor("x", ["N", 4, 3, 3])],
        [tensor("y", ["N", 36])],
        {"shape": np.array([0, -1], np.int64)},
    )
    samples = rng.normal(0, 1, (8, 4, 3, 3)).astype(np.float32)
    evaluator = Evaluator("int8", "per-tensor", target)
    quantized = evaluator.generate_quantized_model(model, Calibrator("int8").calibrate(model, samples).table)
    path = evaluator.export_espdl(tmp_path / "flatten.espdl")
    decoded = read_espdl(path)
    reshape = next(n for n in decoded.nodes if n.op_type == "Reshape")
    assert decoded.initializers[reshape.inputs[1]].data.tolist() == [0, -1]
    assert reshape.attributes["allowzero"] == 0
    _round_trip(quantized, path, samples)


def test_quantize_dequantize_and_int16_round_trip(tmp_path, rng):
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant"),
        helper.make_node("Relu", ["q"], ["r"], name="relu"),
        helper.make_node("DequantizeLinear", ["r", "s", "z"], ["y"], name="dequant"),
    ]
    inits = {"s": np.array(2.0**-7, np.float32), "z": np.array(0, np.int8)}
    model = make_model(nodes, [tensor("x", ["N", 64])], [tensor("y", ["N", 64])], inits)
    data = rng.normal(0, 1, (32, 64)).astype(np.float32)
    for bits in ("int8", "int16"):
        table = Calibrator(bits).calibrate(model, data).table
        evaluator = Evaluator(bits, "per-tensor", "esp32p4")
        quantized = evaluator.generate_quantized_model(model, table)
        path = evaluator.export_espdl(tmp_path / f"qdq_{bits}.espdl", data)
        loaded = load_espdl(path)
        assert loaded.inputs[0].dtype == "FLOAT" and loaded.outputs[0].dtype == "FLOAT"
        got = loaded.run({"x": data})["y"]
        np.testing.assert_array_equal(got, quantized.run_float({"x": data})["y"])


# --- bad inputs ---------------------------------------------------------------------------------------------


def test_refusals_happen_before_anything_is_written(tmp_path, demo, rng):
    model, data = demo
    per_channel = Calibrator("int8", "per-channel").calibrate(model, data.calib_inputs[:64]).table
    evaluator = Evaluator("int8", "per-channel", "esp32s3")
    with pytest.raises(QuantTableError, match="esp32s3 cannot run.*esp32p4"):  # refused before any simulation
        evaluator.generate_quantized_model(model, per_channel)
    assert not (tmp_path / "s3.espdl").exists()
    evaluator = Evaluator("int8", "per-tensor", "esp32p4")
    evaluator.generate_quantized_model(model, Calibrator("int8").calibrate(model, data.calib_inputs[:64]).table)
    target = tmp_path / "demo.espdl"
    target.write_bytes(b"keep me")
    with pytest.raises(OptionError, match="exists"):
        evaluator.export_espdl(target)
    assert target.read_bytes() == b"keep me"
    evaluator.export_espdl(target, force=True)
    assert target.read_bytes()[:4] == b"EDL2"
    with pytest.raises(OutputError, match="does not exist"):
        evaluator.export_espdl(tmp_path / "missing" / "x.espdl")


def test_cli_export_then_self_test(tmp_path, demo):
    from click.testing import CliRunner

    model, data = demo
    onnx.save(model, tmp_path / "m.onnx")
    Calibrator("int8").calibrate(model, data.calib_inputs[:64]).table.save(tmp_path / "t.pickle")
    np.save(tmp_path / "x.npy", data.test_inputs[:4])
    runner = CliRunner()
    args = ["export", str(tmp_path / "m.onnx"), "--table", str(tmp_path / "t.pickle"), "--target", "esp32c3"]
    result = runner.invoke(main, [*args, "--test-input", str(tmp_path / "x.npy")])
    assert result.exit_code == 0, result.output
    written = tmp_path / "m_esp32c3.espdl"
    assert written.is_file()
    assert runner.invoke(main, args).exit_code == 2  # exists: --force needed
    assert runner.invoke(main, [*args, "--force"]).exit_code == 0
    result = runner.invoke(main, ["run", str(written), "--self-test"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("target", TARGETS)
def test_pad_slice_and_resize_round_trip(tmp_path, rng, mode, target):
    """Pad and Slice work in ONNX layout (INT64 operands), Resize on NHWC with NCHW-ordered scales: the
    exporter puts Transposes between them."""
    resize = {"mode": mode, "coordinate_transformation_mode": "asymmetric" if mode == "nearest" else "half_pixel"}
    resize |= {"nearest_mode": "floor"} if mode == "nearest" else {}
    nodes = [
        helper.make_node("Pad", ["x", "pads", "zero"], ["p"], mode="constant", name="pad"),
        helper.make_node("Slice", ["p", "starts", "ends", "axes"], ["s"], name="slice"),
        helper.make_node("Resize", ["s", "", "scales"], ["y"], name="up", **resize),
    ]
    inits = {
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
        "zero": np.array(0.25, np.float32),
        "starts": np.array([1], np.int64),
        "ends": np.array([5], np.int64),
        "axes": np.array([3], np.int64),
        "scales": np.array([1, 1, 2, 2], np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 2, 4, 4])], [tensor("y", ["N", 2, 12, 8])], inits)
    data = rng.normal(0, 1, (6, 2, 4, 4)).astype(np.float32)
    table = Calibrator("int8").calibrate(model, data).table
    evaluator = Evaluator("int8", "per-tensor", target)
    quantized = evaluator.generate_quantized_model(model, table)
    path = evaluator.export_espdl(tmp_path / "m.espdl", data)
    _round_trip(quantized, path, data)
    decoded = read_espdl(path)
    assert [n.op_type for n in decoded.nodes] == ["Pad", "Slice", "Transpose", "Resize"]
    up = decoded.nodes[-1]
    assert up.inputs[1] == "" and decoded.initializers[up.inputs[2]].data.tolist() == [1, 1, 2, 2]


def test_constant_first_operands_and_unique_node_names(tmp_path, rng):
    """Sub(constant, x) after a Conv (NHWC): the constant follows the activation's layout; two requantized
    operands of one Add get distinct node names in the file."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], name="conv_a"),
        helper.make_node("Conv", ["x", "w2"], ["b"], name="conv_b"),
        helper.make_node("Add", ["a", "b"], ["s"], name="add"),
        helper.make_node("Sub", ["bias", "s"], ["y"], name="sub"),
    ]
    inits = {
        "w1": rng.normal(0, 0.2, (4, 3, 1, 1)).astype(np.float32),
        "w2": rng.normal(0, 3.0, (4, 3, 1, 1)).astype(np.float32),
        "bias": rng.normal(0, 1, (1, 4, 1, 1)).astype(np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 3, 5, 5])], [tensor("y", ["N", 4, 5, 5])], inits)
    data = rng.normal(0, 1, (8, 3, 5, 5)).astype(np.float32)
    table = Calibrator("int8").calibrate(model, data).table
    evaluator = Evaluator("int8", "per-tensor", "esp32p4")
    quantized = evaluator.generate_quantized_model(model, table)
    path = evaluator.export_espdl(tmp_path / "m.espdl", data)
    _round_trip(quantized, path, data)
    decoded = read_espdl(path)
    names = [n.name for n in decoded.nodes]
    assert len(names) == len(set(names))
    sub = next(n for n in decoded.nodes if n.op_type == "Sub")
    assert decoded.initializers[sub.inputs[0]].dims == (1, 1, 1, 4)


def test_one_constant_read_at_two_ranks_gets_a_copy_per_form(tmp_path, rng):
    """paddle2onnx shares one scalar constant between Muls of different ranks (PP-OCRv4's recognizer: a 4-D
    conv stage and the 3-D attention blocks). Each use is padded to its output's rank; writing one copy for both
    made the runtime broadcast the 3-D Mul to 4-D, and the self-check refused the export."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Mul", ["c", "one"], ["m4"], name="mul4"),
        helper.make_node("Reshape", ["m4", "shape"], ["r"], name="reshape"),
        helper.make_node("Mul", ["r", "one"], ["m3"], name="mul3"),
        helper.make_node("ReduceMean", ["m3", "axes"], ["y"], name="mean", keepdims=1),
    ]
    inits = {
        "w": rng.normal(0, 0.3, (4, 3, 1, 1)).astype(np.float32),
        "one": np.array([1.5], np.float32),
        "shape": np.array([1, 4, 25]),
        "axes": np.array([-1]),
    }
    model = make_model(nodes, [tensor("x", [1, 3, 5, 5])], [tensor("y", [1, 4, 1])], inits, opset=18)
    data = rng.normal(0, 1, (1, 3, 5, 5)).astype(np.float32)
    table = Calibrator("int8").calibrate(model, data).table
    evaluator = Evaluator("int8", "per-tensor", "esp32s3")
    quantized = evaluator.generate_quantized_model(model, table)
    path = evaluator.export_espdl(tmp_path / "m.espdl", data)
    _round_trip(quantized, path, data)
    decoded = read_espdl(path)
    operands = {n.name: decoded.initializers[n.inputs[1]].dims for n in decoded.nodes if n.op_type == "Mul"}
    assert operands == {"mul4": (1, 1, 1, 1), "mul3": (1, 1, 1)}


def test_a_real_architecture_exports_and_round_trips(tmp_path):
    """SqueezeNet from the onnx package (Conv, Relu, MaxPool, Concat of fire modules, Dropout removed,
    GlobalAveragePool, Softmax): exported for the S3 and simulated from the file bit for bit. Its shipped
    weights (all 0.02) make the int8 Softmax input overflow: NaN on the chip, NaN in the file's simulation."""
    import os

    import onnx.backend.test

    path = os.path.join(os.path.dirname(onnx.backend.test.__file__), "data", "light", "light_squeezenet.onnx")
    model = optimize_model(onnx.load(path))
    data = np.random.default_rng(0).normal(0, 1, (2, 3, 224, 224)).astype(np.float32)
    table = Calibrator("int8").calibrate(model, data, batch_size=1).table
    evaluator = Evaluator("int8", "per-tensor", "esp32s3")
    quantized = evaluator.generate_quantized_model(model, table)
    written = evaluator.export_espdl(tmp_path / "squeezenet.espdl", data)
    for sample in data:  # the model pins batch 1 (its final Reshape)
        _round_trip(quantized, written, sample[None])
    decoded = read_espdl(written)
    assert sum(n.op_type == "Conv" for n in decoded.nodes) == 26 and decoded.inputs[0].shape == (1, 224, 224, 3)


def test_an_unwritable_output_is_a_clear_error(tmp_path, demo, monkeypatch):
    model, data = demo
    evaluator = Evaluator("int8", "per-tensor", "esp32s3")
    evaluator.generate_quantized_model(model, Calibrator("int8").calibrate(model, data.calib_inputs[:64]).table)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("espquant.files.tempfile.mkstemp", refuse)
    with pytest.raises(OutputError, match="cannot write into .*\\(Permission denied\\)"):
        evaluator.export_espdl(tmp_path / "m.espdl")
    assert not list(tmp_path.iterdir())


def test_a_nan_test_input_is_refused(tmp_path, demo):
    model, data = demo
    evaluator = Evaluator("int8", "per-tensor", "esp32c3")
    evaluator.generate_quantized_model(model, Calibrator("int8").calibrate(model, data.calib_inputs[:64]).table)
    sample = np.array(data.test_inputs[:1])
    sample[0, 0, 3, 3] = np.inf
    with pytest.raises(DatasetError, match="NaN or Inf"):
        evaluator.export_espdl(tmp_path / "m.espdl", sample)
    assert not (tmp_path / "m.espdl").exists()


@pytest.mark.parametrize("target", TARGETS)
def test_matmul_by_a_constant_round_trips(tmp_path, rng, target):
    """Each trailing K x N slice of a constant B is stored in the Gemm byte order (blocked on S3 / P4); N = 20
    leaves a 4-channel tail after one 16-lane block. A run-time B of any width is accepted (its byte order is
    built by data-movement nodes; tests/test_espdl_host.py runs such files)."""
    nodes = [
        helper.make_node("MatMul", ["x", "b"], ["m"], name="matmul"),
        helper.make_node("Relu", ["m"], ["y"], name="relu"),
    ]
    b = rng.normal(0, 0.3, (2, 12, 20)).astype(np.float32)
    model = make_model(nodes, [tensor("x", ["N", 2, 5, 12])], [tensor("y", ["N", 2, 5, 20])], {"b": b})
    data = rng.normal(0, 1, (8, 2, 5, 12)).astype(np.float32)
    table = Calibrator("int8").calibrate(model, data).table
    evaluator = Evaluator("int8", "per-tensor", target)
    quantized = evaluator.generate_quantized_model(model, table)
    path = evaluator.export_espdl(tmp_path / "m.espdl", data)
    _round_trip(quantized, path, data)
    decoded = read_espdl(path)
    (matmul,) = [n for n in decoded.nodes if n.op_type == "MatMul"]
    assert matmul.attributes["activation"] == "Relu" and decoded.initializers["b"].dims == (2, 12, 20)
    runtime = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [tensor("x", ["N", 4, 6]), tensor("w", ["N", 6, 3])],
        [tensor("y", ["N", 4, 3])],
    )
    assert check_model(runtime, target=target, strict=False).ok
