"""The legacy C++ coefficient exporter: byte order, exponents, generated model class, compile checks, bad inputs.

The generated text is decoded here with plain index loops (not the exporter's vectorised transposes) and compared
with the simulator's integers; the filter orders themselves are pinned by sequences the ESP-DL v2.0 convert tool
wrote for index-valued filters.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from espquant import Calibrator, Evaluator
from espquant.demo import demo_model_path, load_demo_data
from espquant.errors import ModelError, OptionError, OutputError, QuantTableError, TargetError, UnsupportedModelError
from espquant.export import cpp
from espquant.export.cpp import export_coefficient_to_cpp, legacy_filter_elements
from espquant.optimizer import optimize_model
from espquant.simulator.legacy import legacy_profile
from espquant.simulator.lowering import build_quantized_model
from espquant.table import QuantTable
from helpers import make_model, tensor

DATA = Path(__file__).parent / "data"
GXX = shutil.which("g++")
needs_gxx = pytest.mark.skipif(GXX is None, reason="g++ is not installed: the generated C++ cannot be compiled here")

# Header names of ESP-DL v2.0 (include/typedef, include/layer) the generated files may include.
LEGACY_HEADERS = [
    "dl_constant.hpp",
    "dl_layer_model.hpp",
    "dl_layer_conv2d.hpp",
    "dl_layer_depthwise_conv2d.hpp",
    "dl_layer_fullyconnected.hpp",
    "dl_layer_max_pool2d.hpp",
    "dl_layer_avg_pool2d.hpp",
    "dl_layer_global_avg_pool2d.hpp",
    "dl_layer_add2d.hpp",
    "dl_layer_sub2d.hpp",
    "dl_layer_mul2d.hpp",
    "dl_layer_relu.hpp",
    "dl_layer_leakyrelu.hpp",
    "dl_layer_prelu.hpp",
    "dl_layer_flatten.hpp",
    "dl_layer_concat.hpp",
]

# What the ESP-DL v2.0 convert tool (tools/convert_tool, `-q 0`, filter_exponent 0) wrote for filters whose
# values are 1..n in [H, W, C, N] order: (target, bits, depthwise, shape) -> the element array it generated.
# esp32s2 and esp32c3 gave exactly the esp32 arrays.
CONVERTER = {
    ("esp32", 8, False, (1, 2, 2, 18)): [
        1, 19, 37, 55, 2, 20, 38, 56, 3, 21, 39, 57, 4, 22, 40, 58, 5, 23, 41, 59, 6, 24, 42, 60, 7, 25, 43, 61,
        8, 26, 44, 62, 9, 27, 45, 63, 10, 28, 46, 64, 11, 29, 47, 65, 12, 30, 48, 66, 13, 31, 49, 67, 14, 32, 50,
        68, 15, 33, 51, 69, 16, 34, 52, 70, 17, 35, 53, 71, 18, 36, 54, 72,
    ],
    ("esp32", 16, False, (2, 1, 2, 3)): [1, 4, 7, 10, 2, 5, 8, 11, 3, 6, 9, 12],
    ("esp32", 8, True, (1, 2, 19, 1)): list(range(1, 39)),
    ("esp32s3", 8, False, (1, 2, 2, 18)): [
        1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31,
        32, 33, 34, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 55, 56, 57, 58, 59, 60, 61,
        62, 63, 64, 65, 66, 67, 68, 69, 70, 17, 35, 53, 71, 18, 36, 54, 72,
    ],
    ("esp32s3", 8, True, (1, 2, 19, 1)): [
        1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32,
        33, 34, 35, 17, 18, 19, 36, 37, 38,
    ],
    ("esp32s3", 8, False, (2, 1, 2, 3)): [1, 4, 7, 10, 2, 5, 8, 11, 3, 6, 9, 12],
    ("esp32s3", 16, False, (1, 2, 2, 18)): [
        1, 2, 3, 4, 5, 6, 7, 8, 19, 20, 21, 22, 23, 24, 25, 26, 37, 38, 39, 40, 41, 42, 43, 44, 55, 56, 57, 58, 59,
        60, 61, 62, 9, 10, 11, 12, 13, 14, 15, 16, 27, 28, 29, 30, 31, 32, 33, 34, 45, 46, 47, 48, 49, 50, 51, 52,
        63, 64, 65, 66, 67, 68, 69, 70, 17, 35, 53, 71, 18, 36, 54, 72,
    ],
    ("esp32s3", 16, True, (1, 2, 19, 1)): [
        1, 2, 3, 4, 5, 6, 7, 8, 20, 21, 22, 23, 24, 25, 26, 27, 9, 10, 11, 12, 13, 14, 15, 16, 28, 29, 30, 31, 32,
        33, 34, 35, 17, 18, 19, 36, 37, 38,
    ],
    ("esp32s3", 16, False, (1, 1, 2, 10)): [1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 14, 15, 16, 17, 18, 9, 19, 10, 20],
    ("esp32s3", 16, True, (2, 1, 10, 1)): [1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 14, 15, 16, 17, 18, 9, 10, 19, 20],
}  # fmt: skip


# --- decoding the generated text, independently of the exporter ----------------------------------------------


def decode_filter(elements: list[int], shape: tuple[int, ...], target: str, bits: int, depthwise: bool) -> np.ndarray:
    """Undo the legacy element order with index loops: back to an [H, W, C, N] array."""
    kh, kw, channels, outputs = shape
    out = np.zeros(shape, dtype=np.int64)
    values = iter(elements)
    lanes = (16 if bits == 8 else 8) if target == "esp32s3" else None
    if depthwise:
        full = channels // lanes * lanes if lanes else 0
        for block in range(0, full, lanes or 1):
            for y in range(kh):
                for x in range(kw):
                    for k in range(lanes or 0):
                        out[y, x, block + k, 0] = next(values)
        for y in range(kh):
            for x in range(kw):
                for c in range(full, channels):
                    out[y, x, c, 0] = next(values)
    else:
        full = outputs // lanes * lanes if lanes else 0
        for block in range(0, full, lanes or 1):
            for y in range(kh):
                for x in range(kw):
                    for c in range(channels):
                        for k in range(lanes or 0):
                            out[y, x, c, block + k] = next(values)
        for n in range(full, outputs):
            for y in range(kh):
                for x in range(kw):
                    for c in range(channels):
                        out[y, x, c, n] = next(values)
    assert next(values, None) is None, "more elements than the shape holds"
    return out


def parse_cpp(text: str) -> dict[str, dict]:
    """layer -> {node, op, elements per constant, filter exponent / shape / dilation, bias exponent, activation}."""
    layers: dict[str, dict] = {}
    for m in re.finditer(r"// layer (\w+): ONNX node '(.*)' \((\w+)\) -> (\w+)", text):
        layers[m.group(1)] = {"node": m.group(2), "op": m.group(3), "cls": m.group(4)}
    arrays = {
        m.group(1): [int(v) for v in m.group(2).split(",") if v.strip()]
        for m in re.finditer(r"(\w+)_element\[\] = \{(.*?)\};", text, re.S)
    }
    exponent_arrays = {
        m.group(1): [int(v) for v in m.group(2).split(",")]
        for m in re.finditer(r"const static int8_t (\w+)_filter_exponent\[\] = \{(.*?)\};", text)
    }
    for name, info in layers.items():
        info["elements"] = {kind: arrays.get(f"{name}_{kind}") for kind in ("filter", "bias", "activation")}
        m = re.search(rf"Filter<(\w+)> {name}_filter\({name}_filter_element, (-?\d+|\w+), (?:(\d+), )?"
                      rf"\{{([\d, ]+)\}}, \{{(\d+), (\d+)\}}\);", text)  # fmt: skip
        if m:
            info["ctype"] = m.group(1)
            info["filter_exponent"] = exponent_arrays[name] if m.group(3) else int(m.group(2))
            if m.group(3):
                assert int(m.group(3)) == len(exponent_arrays[name])
            info["filter_shape"] = tuple(int(v) for v in m.group(4).split(","))
            info["dilation"] = (int(m.group(5)), int(m.group(6)))
        m = re.search(rf"Bias<(\w+)> {name}_bias\({name}_bias_element, (-?\d+), \{{(\d+),\}}\);", text)
        if m:
            info["bias_type"], info["bias_exponent"] = m.group(1), int(m.group(2))
        m = re.search(
            rf"Activation<\w+> {name}_activation\((\w+)(?:, {name}_activation_element, (-?\d+), .*)?\);", text
        )
        if m:
            info["activation"] = m.group(1)
            info["activation_exponent"] = int(m.group(2)) if m.group(2) else None
    return layers


def parse_model(text: str) -> list[dict]:
    """The model class's layers in declaration order: class, name, node, constructor arguments."""
    members = re.findall(r"^    dl::layer::(\w+)<([\w, ]+)> (\w+); // (.*)$", text, re.M)
    layers = []
    for cls, template, name, node in members:
        m = re.search(rf"^\s+(?:: )?{name}\((.*)\),?$", text, re.M)
        assert m, f"no initializer for {name}"
        layers.append({"cls": cls, "template": template, "name": name, "node": node, "args": m.group(1)})
    return layers


def check_call_frees(text: str, outputs: list[str]) -> None:
    """In call(): nothing is read after it was freed, and every tensor but the outputs is freed exactly once.

    An in-place member (constructed with a trailing ``true``, ESP-DL v1.1's ReLU / Flatten) writes into its
    input's tensor: its output is that tensor, freed once after the last read of either.
    """
    body = re.search(r"void call\(dl::Tensor<\w+> &input\)\n    \{\n(.*?)\n    \}", text, re.S).group(1)
    in_place = {m["name"] for m in parse_model(text) if m["args"].endswith(", true")}
    alias: dict[str, str] = {}
    freed: list[str] = []
    for line in body.splitlines():
        line = line.strip()
        if line.endswith(".free_element();"):
            freed.append(line.removesuffix(".free_element();"))
        elif line:
            reads = ["input"] if re.search(r"\(input\)|\binput,", line) else []
            reads += re.findall(r"this->\w+\.get_output\(\)", line)
            reads = [alias.get(r, r) for r in reads]
            assert not set(reads) & set(freed), f"{line} reads a freed tensor"
            called = re.match(r"this->(\w+)\.call\(", line)
            if called and called.group(1) in in_place:
                alias[f"this->{called.group(1)}.get_output()"] = reads[0]
    members = re.findall(r"^    dl::layer::\w+<[\w, ]+> (\w+);", text, re.M)
    kept = {alias.get(f"this->{o}.get_output()", f"this->{o}.get_output()") for o in outputs}
    expected = [
        t for t in ["input"] + [f"this->{m}.get_output()" for m in members if m not in in_place] if t not in kept
    ]
    assert sorted(freed) == sorted(expected)


def flatten_order(channels: int, height: int, width: int) -> list[int]:
    """For each element of flattened [H][W][C] data, its index in ONNX's flattened (C, H, W) order."""
    return [c * height * width + y * width + x for y in range(height) for x in range(width) for c in range(channels)]


def expected_hwcn(q, node, model: onnx.ModelProto) -> tuple[np.ndarray, bool]:
    """The simulator's integer weight of ``node`` as a legacy [H, W, C, N] array, and whether it is depthwise."""
    w = np.asarray(q.constants[node.inputs[1]], dtype=np.int64)
    if node.op_type == "Conv":
        if int(node.attrs.get("group", 1)) > 1:
            return np.stack([w[c, 0] for c in range(w.shape[0])], axis=-1)[..., None], True
        return np.einsum("nchw->hwcn", w), False
    matrix = w.T if node.attrs.get("transB", 0) else w  # (K, N)
    producer = next((n for n in model.graph.node if node.inputs[0] in n.output), None)
    if producer is not None and producer.op_type == "Flatten":
        info = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}[producer.input[0]]
        _, c, h, width = (d.dim_value for d in info.type.tensor_type.shape.dim)
        matrix = matrix[flatten_order(c, h, width)]
    return matrix[None, None], False


def compile_files(folder: Path, tmp_path: Path, file_name: str, ctype: str) -> None:
    """g++ -fsyntax-only on the .cpp and on a driver that builds, calls and forwards the generated model."""
    stubs = tmp_path / "legacy_include"
    stubs.mkdir(exist_ok=True)
    for header in LEGACY_HEADERS:
        (stubs / header).write_text('#include "legacy_dl_layers.hpp"\n')
    model_hpp = (folder / f"{file_name}_model.hpp").read_text()
    cls = re.search(r"^class (\w+) : public dl::layer::Model<(\w+)>", model_hpp, re.M)
    assert cls and cls.group(2) == ctype
    driver = folder / "driver.cpp"
    driver.write_text(
        f'#include "{file_name}_model.hpp"\n'
        f"void run(dl::Tensor<{ctype}> &input)\n{{\n    {cls.group(1)} model;\n    model.forward(input);\n"
        "    model.build(input);\n    model.call(input);\n}\n"
    )
    for source in (folder / f"{file_name}.cpp", driver):
        command = [GXX, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", f"-I{stubs}", f"-I{DATA}", f"-I{folder}"]
        result = subprocess.run([*command, str(source)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{source.name} does not compile:\n{result.stderr}"


# --- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    model = optimize_model(onnx.load(demo_model_path()))
    data = load_demo_data().calib_inputs[:64]
    tables = {
        (bits, granularity): Calibrator(f"int{bits}", granularity, "minmax").calibrate(model, data).table
        for bits, granularity in [(8, "per-tensor"), (16, "per-tensor"), (8, "per-channel")]
    }
    return model, tables


def _conv_model(weights: np.ndarray, bias: np.ndarray | None = None) -> onnx.ModelProto:
    n, c, kh, kw = weights.shape
    inputs = ["x", "W"] + (["B"] if bias is not None else [])
    inits = {"W": weights.astype(np.float32)} | ({"B": bias.astype(np.float32)} if bias is not None else {})
    node = helper.make_node("Conv", inputs, ["y"], name="conv", kernel_shape=[kh, kw])
    return make_model([node], [tensor("x", ["N", c, 4, 4])], [tensor("y", ["N", n, 5 - kh, 5 - kw])], inits)


# --- the filter byte order ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CONVERTER), ids=lambda c: f"{c[0]}-int{c[1]}-{'dw' if c[2] else 'conv'}-{c[3]}")
def test_filter_order_is_the_legacy_converters(case):
    target, bits, depthwise, shape = case
    values = np.arange(1, int(np.prod(shape)) + 1).reshape(shape)
    expected = CONVERTER[case]
    for chip in [target] if target == "esp32s3" else ["esp32", "esp32s2", "esp32c3"]:
        assert legacy_filter_elements(values, chip, bits, depthwise).tolist() == expected
    # The test's own decoder agrees with the converter, so it can judge the generated files below.
    np.testing.assert_array_equal(decode_filter(expected, shape, target, bits, depthwise), values)


@pytest.mark.parametrize("target", cpp.LEGACY_TARGETS)
def test_two_output_channel_conv_byte_order(tmp_path, rng, target):
    # W[n, c, 0, w] in 1/32 steps; max |w| = 0.25 gives exponent -8, so the integers are 8 * k.
    ints = np.array([[[[1, 2]], [[3, 4]]], [[[-5, 6]], [[7, -8]]]])
    model = _conv_model(ints / 32.0)
    table = Calibrator("int8", "per-tensor", "minmax").calibrate(model, rng.normal(0, 1, (8, 2, 4, 4))).table
    export_coefficient_to_cpp(model, table, target, tmp_path, "two")
    layer = parse_cpp((tmp_path / "two.cpp").read_text())["conv"]
    # Output channel 0 then 1, each [H][W][C]: (w0, c0), (w0, c1), (w1, c0), (w1, c1).
    assert layer["elements"]["filter"] == [8, 24, 16, 32, -40, 56, 48, -64]
    assert layer["filter_shape"] == (1, 2, 2, 2)
    assert layer["filter_exponent"] == table.exponents["W"] == -8
    assert layer["ctype"] == "int8_t"


# --- the demo model on every target ------------------------------------------------------------------------

# Every target at int8 per-tensor; int16 and int8 per-channel on one S3 and one plain-C target each.
CONFIGS = [(target, 8, "per-tensor") for target in cpp.LEGACY_TARGETS]
CONFIGS += [("esp32s3", 16, "per-tensor"), ("esp32", 16, "per-tensor")]
CONFIGS += [("esp32s3", 8, "per-channel"), ("esp32c3", 8, "per-channel")]


@pytest.mark.parametrize("target,bits,granularity", CONFIGS)
def test_demo_export_holds_the_simulators_integers(demo, tmp_path, target, bits, granularity):
    model, tables = demo
    table = tables[(bits, granularity)]
    paths = export_coefficient_to_cpp(model, table, target, tmp_path, "demo_coefficient")
    assert [p.name for p in paths] == ["demo_coefficient.cpp", "demo_coefficient.hpp", "demo_coefficient_model.hpp"]
    q = build_quantized_model(model, table, legacy_profile(target), bits)  # the layers, as the exporter sees them
    # The constants are the legacy profile's (simulator/legacy.py): what the legacy Evaluator simulates.
    legacy = Evaluator(f"int{bits}", granularity, target, library="legacy").generate_quantized_model(model, table)
    nodes = {n.name: n for n in q.nodes}
    layers = parse_cpp(paths[0].read_text())
    ctype = "int8_t" if bits == 8 else "int16_t"
    weighted = [n for n in q.nodes if n.op_type in ("Conv", "Gemm")]
    assert sorted(layer["node"] for layer in layers.values()) == sorted(n.name for n in weighted)
    for name, layer in layers.items():
        node = nodes[layer["node"]]
        hwcn, depthwise = expected_hwcn(legacy, node, model)
        assert layer["filter_shape"] == hwcn.shape
        decoded = decode_filter(layer["elements"]["filter"], hwcn.shape, target, bits, depthwise)
        np.testing.assert_array_equal(decoded, hwcn, err_msg=f"filter of {name}")
        assert layer["filter_exponent"] == table.exponents[node.inputs[1]]
        assert layer["ctype"] == ctype
        # The bias: the float one rounded half to even at the legacy exponent, saturated (LEGACY_ARITHMETIC.md).
        bias = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == node.inputs[2]))
        e_out = table.exponents[node.outputs[0]]
        if granularity == "per-channel":
            assert (layer["bias_type"], layer["bias_exponent"]) == ("int16_t", -128)
            e_bias = table.exponents[node.inputs[0]] + np.asarray(table.exponents[node.inputs[1]]) + 4
            expected = np.clip(np.rint(bias.astype(np.float64) * 2.0**-e_bias), -32768, 32767)
        else:
            assert (layer["bias_type"], layer["bias_exponent"]) == (ctype, e_out)
            expected = np.clip(np.rint(bias.astype(np.float64) * 2.0**-e_out), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        assert layer["elements"]["bias"] == [int(v) for v in expected]
        assert layer.get("activation") == ("ReLU" if node.relu else None)
    # The model class: one layer per node, in order, with the table's output exponents.
    model_layers = parse_model(paths[2].read_text())
    assert [m["node"] for m in model_layers] == [n.name for n in q.nodes]
    classes = [m["cls"] for m in model_layers]
    # ESP-DL v1.1 (the default) spells it ReLU and builds ReLU / Flatten in place (export/cpp/versions.py).
    assert classes == ["Conv2D", "MaxPool2D", "Conv2D", "MaxPool2D", "DepthwiseConv2D", "Conv2D", "Add2D", "ReLU",
                       "Flatten", "FullyConnected"]  # fmt: skip
    assert [m["args"].endswith(", true") for m in model_layers] == [c in ("ReLU", "Flatten") for c in classes]
    for member in model_layers:
        node = nodes[member["node"]]
        if member["cls"] in ("Conv2D", "DepthwiseConv2D", "FullyConnected", "Add2D"):
            assert int(member["args"].split(",")[0]) == table.exponents[node.outputs[0]]
        if granularity == "per-channel" and member["cls"] in ("Conv2D", "DepthwiseConv2D", "FullyConnected"):
            assert member["template"] == "int8_t, int16_t"
        else:
            assert member["template"] == ctype
    assert f"static constexpr int input_exponent = {table.exponents['input']};" in paths[2].read_text()
    check_call_frees(paths[2].read_text(), [model_layers[-1]["name"]])


@needs_gxx
@pytest.mark.parametrize("target,bits,granularity", CONFIGS)
def test_demo_export_compiles_against_the_legacy_api(demo, tmp_path, target, bits, granularity):
    model, tables = demo
    out = tmp_path / "out"
    # legacy_dl_layers.hpp declares the v2.0 API; tests/test_cpp_compile.py compiles against the real headers.
    export_coefficient_to_cpp(
        model, tables[(bits, granularity)], target, out, "demo_coefficient", library_version="2.0"
    )
    compile_files(out, tmp_path, "demo_coefficient", "int8_t" if bits == 8 else "int16_t")


def test_print_model_info_prints_the_layer_table(demo, tmp_path, capsys):
    model, tables = demo
    table = tables[(8, "per-tensor")]
    export_coefficient_to_cpp(model, table, "esp32s3", tmp_path, "quiet")
    assert capsys.readouterr().out == ""
    export_coefficient_to_cpp(model, table, "esp32s3", tmp_path, "loud", print_model_info=True)
    printed = capsys.readouterr().out
    layers = parse_model((tmp_path / "loud_model.hpp").read_text())
    for member in layers:
        assert member["name"] in printed and member["cls"] in printed
    rows = {line.split("│")[1].strip(): line for line in printed.splitlines() if line.count("│") > 5}
    fc = next(m for m in layers if m["cls"] == "FullyConnected")
    cells = [c.strip() for c in rows[fc["name"]].split("│")]
    assert "[1568]" in cells and "[10]" in cells and "[1, 1, 1568, 10]" in cells
    assert str(table.exponents["fc.weight"]) in cells and cells[-2] == str(table.exponents["logits"])


# --- a model with every exportable op ------------------------------------------------------------------------


def _all_ops_model(rng) -> onnx.ModelProto:
    #  x -> LeakyRelu -> Conv(s2) -> MaxPool -+-> dwConv -> PRelu --------------+-> Add -> Sub -> Mul -> Concat
    #                                         +-> AvgPool(3, s1, pad 1) --------+    (with the MaxPool output)
    #  Concat -> GlobalAveragePool -> Flatten -> Gemm -> Relu -> MatMul -> y
    nodes = [
        helper.make_node("LeakyRelu", ["x"], ["lr"], alpha=0.1, name="leaky"),
        helper.make_node("Conv", ["lr", "W1", "B1"], ["c1"], strides=[2, 2], pads=[1, 0, 1, 0], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("Conv", ["p1", "Wd", "Bd"], ["d1"], group=4, pads=[1, 1, 1, 1], name="dw1"),
        helper.make_node("Relu", ["d1"], ["dr"], name="relu_dw"),
        helper.make_node("PRelu", ["dr", "slope"], ["pr"], name="prelu"),
        helper.make_node(
            "AveragePool", ["p1"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1, name="avg"
        ),
        helper.make_node("Add", ["pr", "ap"], ["s1"], name="add"),
        helper.make_node("Sub", ["s1", "p1"], ["s2"], name="sub"),
        helper.make_node("Mul", ["s2", "p1"], ["s3"], name="mul"),
        helper.make_node("Concat", ["s3", "s3"], ["cat"], axis=1, name="concat"),
        helper.make_node("GlobalAveragePool", ["cat"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "Wf", "Bf"], ["h"], transB=1, name="fc"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu_fc"),
        helper.make_node("MatMul", ["hr", "Wm"], ["y"], name="matmul"),
    ]
    inits = {
        "W1": rng.normal(0, 0.3, (4, 2, 3, 3)),
        "B1": rng.normal(0, 0.1, 4),
        "Wd": rng.normal(0, 0.3, (4, 1, 3, 3)),
        "Bd": rng.normal(0, 0.1, 4),
        "slope": np.full((4, 1, 1), 0.25),
        "Wf": rng.normal(0, 0.5, (6, 8)),
        "Bf": rng.normal(0, 0.1, 6),
        "Wm": rng.normal(0, 0.5, (6, 3)),
    }
    inits = {k: v.astype(np.float32) for k, v in inits.items()}
    return make_model(nodes, [tensor("x", ["N", 2, 16, 16])], [tensor("y", ["N", 3])], inits)


def _calibrated(model, bits: int, data: np.ndarray) -> QuantTable:
    return Calibrator(f"int{bits}", "per-tensor", "minmax").calibrate(model, data).table


@pytest.mark.parametrize("target,bits", [("esp32s3", 8), ("esp32s3", 16), ("esp32", 8)])
def test_every_exportable_op(tmp_path, rng, target, bits):
    model = _all_ops_model(rng)
    # Non-negative data: LeakyRelu and PRelu then keep their input exponent, as the legacy layers require.
    table = _calibrated(model, bits, rng.uniform(0, 1, (32, 2, 16, 16)).astype(np.float32))
    export_coefficient_to_cpp(model, table, target, tmp_path, "ops", library_version="2.0")
    text = (tmp_path / "ops_model.hpp").read_text()
    members = {m["node"]: m for m in parse_model(text)}
    assert [m["cls"] for m in members.values()] == [
        "LeakyRelu", "Conv2D", "MaxPool2D", "DepthwiseConv2D", "PRelu", "AvgPool2D", "Add2D", "Sub2D", "Mul2D",
        "Concat", "GlobalAveragePool2D", "Flatten", "FullyConnected", "FullyConnected",
    ]  # fmt: skip
    # Geometry in the legacy argument order: padding [top, bottom, left, right], strides y, x.
    assert "dl::PADDING_NOT_SET, {1, 1, 0, 0}, 2, 2" in members["conv1"]["args"]
    assert members["pool1"]["args"].startswith("{2, 2}, dl::PADDING_VALID, {}, 2, 2")
    assert members["avg"]["args"].startswith(f"{table.exponents['ap']}, {{3, 3}}, dl::PADDING_NOT_SET, {{1, 1, 1, 1}}")
    assert members["concat"]["args"].startswith("2,")  # ONNX channel axis 1 -> legacy [H, W, C] axis 2
    # LeakyRelu: alpha 0.1 truncated to bits - 1 fraction bits; PRelu: one slope per channel, the same way.
    e_alpha = 1 - bits
    assert members["leaky"]["args"].startswith(f"{int(np.float32(0.1) * 2.0**-e_alpha)}, {e_alpha},")
    check_call_frees(text, ["matmul"])
    layers = parse_cpp((tmp_path / "ops.cpp").read_text())
    slope = layers["prelu"]
    assert slope["activation"] == "PReLU"
    assert slope["elements"]["activation"] == [int(0.25 * 2.0**-e_alpha)] * 4
    assert layers["leaky"]["activation"] == "LeakyReLU"
    assert layers["matmul"]["filter_shape"] == (1, 1, 6, 3) and layers["matmul"]["elements"]["bias"] is None
    assert layers["fc"]["activation"] == "ReLU"  # the Relu after the Gemm is fused into it
    if GXX is not None:
        compile_files(tmp_path, tmp_path, "ops", "int8_t" if bits == 8 else "int16_t")


def test_v11_refuses_what_its_headers_cannot_build(tmp_path, rng):
    # ESP-DL v1.1's Sub2D, Mul2D, LeakyReLU and PReLU headers do not compile (export/cpp/versions.py): every such
    # node is named with the header, nothing is written; v2.0 builds the same model.
    model = _all_ops_model(rng)
    table = _calibrated(model, 8, rng.uniform(0, 1, (32, 2, 16, 16)).astype(np.float32))
    with pytest.raises(UnsupportedModelError) as info:
        export_coefficient_to_cpp(model, table, "esp32s3", tmp_path, "ops", library_version="1.1")
    message = str(info.value)
    assert "v1.1 cannot run this model on esp32s3 (4 problem(s))" in message
    for node, header in [("leaky", "leakyrelu"), ("prelu", "prelu"), ("sub", "sub2d"), ("mul", "mul2d")]:
        assert re.search(
            rf"node '{node}' \(\w+\): ESP-DL v1\.1's \w+ does not compile \(dl_layer_{header}\.hpp:", message
        )
    assert "library_version='2.0'" in message
    assert list(tmp_path.iterdir()) == []
    assert len(export_coefficient_to_cpp(model, table, "esp32s3", tmp_path, "ops", library_version="2.0")) == 3


def test_v11_in_place_layers_need_a_private_input(tmp_path, rng):
    # v1.1 builds ReLU in place: it may not overwrite a tensor a later layer (here the Add) still reads.
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Add", ["r", "c"], ["y"], name="add"),
    ]
    inits = {"W": rng.normal(0, 0.3, (2, 2, 1, 1)).astype(np.float32)}
    model = make_model(nodes, [tensor("x", ["N", 2, 4, 4])], [tensor("y", ["N", 2, 4, 4])], inits)
    table = _calibrated(model, 8, rng.uniform(0, 1, (8, 2, 4, 4)).astype(np.float32))
    with pytest.raises(
        UnsupportedModelError,
        match=r"node 'relu' \(Relu\): ESP-DL v1\.1's ReLU works only in place "
        r"\(dl_layer_relu\.hpp.*layer\(s\) add read it later",
    ):
        export_coefficient_to_cpp(model, table, "esp32", tmp_path, "x")
    text = export_coefficient_to_cpp(model, table, "esp32", tmp_path, "x", library_version="2.0")[2].read_text()
    assert "dl::layer::Relu<int8_t> relu;" in text
    with pytest.raises(OptionError, match="library_version '3.0': use one of 1.1, 2.0"):
        export_coefficient_to_cpp(model, table, "esp32", tmp_path / "o", "x", library_version="3.0")


def test_cli_library_version(demo, tmp_path):
    from click.testing import CliRunner

    from espquant.cli import main

    model, tables = demo
    option = next(p for p in main.commands["export"].params if p.name == "library_version")
    assert tuple(option.type.choices) == tuple(cpp.LIBRARY_VERSIONS) and option.default == cpp.DEFAULT_LIBRARY_VERSION
    onnx.save(model, tmp_path / "m.onnx")
    tables[(8, "per-tensor")].save(tmp_path / "t.pickle")
    args = ["export", str(tmp_path / "m.onnx"), "--table", str(tmp_path / "t.pickle"), "--format", "cpp"]
    for version, relu in [(None, "ReLU"), ("1.1", "ReLU"), ("2.0", "Relu")]:
        out = tmp_path / f"cpp-{version}"
        extra = ["--library-version", version] if version else []
        result = CliRunner().invoke(main, [*args, *extra, "-o", str(out)])
        assert result.exit_code == 0, result.output
        text = (out / "m_coefficient_model.hpp").read_text()
        assert f"dl::layer::{relu}<int8_t>" in text and f"legacy ESP-DL v{version or '1.1'} " in text
    result = CliRunner().invoke(main, [*args, "--library-version", "3.0", "-o", str(tmp_path / "x")])
    assert result.exit_code != 0 and "1.1" in result.output and "2.0" in result.output


# --- bad inputs -------------------------------------------------------------------------------------------------


def test_unknown_target_lists_the_valid_ones(demo, tmp_path):
    model, tables = demo
    with pytest.raises(TargetError, match="esp32, esp32s2, esp32c3, esp32s3") as info:
        export_coefficient_to_cpp(model, tables[(8, "per-tensor")], "esp32p4", tmp_path / "out", "x")
    assert "'esp32p4'" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_ops_the_legacy_library_lacks_are_all_named(tmp_path, rng):
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node(
            "Resize",
            ["c", "", "scales"],
            ["up"],
            mode="nearest",
            coordinate_transformation_mode="asymmetric",
            nearest_mode="floor",
            name="upsample",
        ),
        helper.make_node("Sigmoid", ["up"], ["y"], name="gate"),
    ]
    inits = {"W": rng.normal(0, 0.3, (2, 1, 3, 3)).astype(np.float32), "scales": np.array([1, 1, 2, 2], np.float32)}
    model = make_model(nodes, [tensor("x", ["N", 1, 4, 4])], [tensor("y", ["N", 2, 8, 8])], inits)
    table = _calibrated(model, 8, rng.normal(0, 1, (8, 1, 4, 4)).astype(np.float32))
    with pytest.raises(UnsupportedModelError) as info:
        export_coefficient_to_cpp(model, table, "esp32s3", tmp_path, "x")
    message = str(info.value)
    assert "node 'upsample' (Resize)" in message and "no layer for this op" in message
    assert "node 'gate' (Sigmoid)" in message and "2 problem(s)" in message
    assert "'conv'" not in message
    assert list(tmp_path.iterdir()) == []


def test_inexpressible_exponents_are_errors(tmp_path, rng):
    # Mostly negative data: LeakyRelu's output range (and exponent) shrinks, but the legacy layer keeps e_in.
    model = make_model(
        [helper.make_node("LeakyRelu", ["x"], ["y"], alpha=0.01, name="leaky")],
        [tensor("x", ["N", 2, 4, 4])],
        [tensor("y", ["N", 2, 4, 4])],
    )
    table = _calibrated(model, 8, rng.uniform(-8, 0.1, (8, 2, 4, 4)).astype(np.float32))
    assert table.exponents["x"] != table.exponents["y"]
    with pytest.raises(UnsupportedModelError, match=r"node 'leaky' \(LeakyRelu\): input exponent -?\d+ differs"):
        export_coefficient_to_cpp(model, table, "esp32", tmp_path, "x")
    # Concat of two convolutions of different ranges: the simulator requantizes one input, the legacy library can't.
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["a"], name="c1"),
        helper.make_node("Conv", ["x", "W2"], ["b"], name="c2"),
        helper.make_node("Concat", ["a", "b"], ["y"], axis=1, name="cat"),
    ]
    inits = {"W1": np.full((2, 2, 1, 1), 0.01, np.float32), "W2": np.full((2, 2, 1, 1), 3.0, np.float32)}
    model = make_model(nodes, [tensor("x", ["N", 2, 4, 4])], [tensor("y", ["N", 4, 4, 4])], inits)
    table = _calibrated(model, 8, rng.normal(0, 1, (8, 2, 4, 4)).astype(np.float32))
    with pytest.raises(UnsupportedModelError, match=r"node 'cat' \(Concat\): input 'a__requant_-?\d+' needs a requant"):
        export_coefficient_to_cpp(model, table, "esp32s3", tmp_path, "x")
    assert list(tmp_path.iterdir()) == []


def test_output_path_that_is_a_file_or_under_a_file(demo, tmp_path):
    model, tables = demo
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    with pytest.raises(ModelError, match="is a file, not a folder"):
        export_coefficient_to_cpp(model, tables[(8, "per-tensor")], "esp32", blocker, "x")
    with pytest.raises(OutputError, match="cannot write there"):  # mkdir fails even for root
        export_coefficient_to_cpp(model, tables[(8, "per-tensor")], "esp32", blocker / "sub", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_read_only_folder(demo, tmp_path):
    model, tables = demo
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="cannot write there"):
            export_coefficient_to_cpp(model, tables[(8, "per-tensor")], "esp32", folder, "x")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_a_failed_write_leaves_no_partial_files(demo, tmp_path, monkeypatch):
    import espquant.files

    model, tables = demo
    real = espquant.files._write_temporary
    calls = []

    def failing(path, data):
        calls.append(Path(path).name)
        if len(calls) == 2:
            raise OutputError(f"{path}: writing failed (No space left on device); nothing was changed.")
        return real(path, data)

    monkeypatch.setattr(espquant.files, "_write_temporary", failing)
    with pytest.raises(OutputError, match="No space left on device"):
        export_coefficient_to_cpp(model, tables[(8, "per-tensor")], "esp32", tmp_path, "x")
    assert calls == ["x.cpp", "x.hpp"]
    assert list(tmp_path.iterdir()) == []


def test_options_and_tables(demo, tmp_path):
    model, tables = demo
    table = tables[(8, "per-tensor")]
    with pytest.raises(OptionError, match="plain base name"):
        export_coefficient_to_cpp(model, table, "esp32", tmp_path, "sub/x")
    with pytest.raises(QuantTableError, match="int8, not int16"):
        export_coefficient_to_cpp(model, table, "esp32", tmp_path, "x", bits=16)
    legacy = QuantTable(dict(table.exponents), {})  # a legacy toolkit table: exponents only
    with pytest.raises(QuantTableError, match="bit width"):
        export_coefficient_to_cpp(model, legacy, "esp32", tmp_path, "x")
    assert list(tmp_path.iterdir()) == []
    pickle_path, _ = table.save(tmp_path / "table.pickle")
    from_path = export_coefficient_to_cpp(model, pickle_path, "ESP32-S3", tmp_path / "a", "mnist-coefficient")
    from_legacy = export_coefficient_to_cpp(model, legacy, "esp32s3", tmp_path / "b", "mnist-coefficient", bits=8)
    assert [p.read_text() for p in from_path] == [p.read_text() for p in from_legacy]
    assert "namespace mnist_coefficient" in from_path[1].read_text()
    assert "class MnistCoefficientModel" in from_path[2].read_text()


def test_saturating_int8_bias_warns(tmp_path, rng, caplog):
    # A bias of 100 next to outputs within +-2: the int8 bias at the output exponent clips to 127 * 2^e_out.
    model = _conv_model(np.array([0.1, -0.05]).reshape(2, 1, 1, 1), bias=np.array([100.0, 0.001]))
    data = rng.normal(0, 1, (8, 1, 4, 4)).astype(np.float32)
    table = _calibrated(model, 8, data)
    # The calibrated output range includes the bias: force the output exponent small to make it saturate.
    exps = dict(table.exponents)
    exps["y"] = exps["B"] = exps["x"] + exps["W"]
    small = QuantTable(exps, dict(table.metadata))
    with caplog.at_level("WARNING", logger="espquant.export.cpp"):
        export_coefficient_to_cpp(model, small, "esp32s3", tmp_path, "sat")
    assert "1 of 2 bias value(s) saturate to int8_t" in caplog.text
    layer = parse_cpp((tmp_path / "sat.cpp").read_text())["conv"]
    assert layer["elements"]["bias"][0] == 127
    assert layer["bias_exponent"] == exps["y"]
