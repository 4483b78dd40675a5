"""End to end calibration: legacy configurations on the demo model, registry rules, bad data, the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from espquant import Calibrator
from espquant.cli import main
from espquant.demo import demo_model_path, load_demo_data
from espquant.errors import DatasetError, ModelError, UnsupportedModelError
from espquant.ops import Role, get_op_spec
from espquant.optimizer import optimize_model
from espquant.quant.pot import exponent_for_max_abs
from espquant.runtime import create_session
from espquant.table import QuantTable, graph_hash
from helpers import make_model, tensor

LEGACY_CONFIGS = [
    ("int8", "per-tensor", "minmax"),
    ("int8", "per-tensor", "entropy"),
    ("int8", "per-channel", "minmax"),
    ("int8", "per-channel", "entropy"),
    ("int16", "per-tensor", "minmax"),
]


@pytest.fixture(scope="module")
def demo():
    return optimize_model(onnx.load(demo_model_path())), load_demo_data().calib_inputs[:300]


def needed_tensors(model: onnx.ModelProto) -> set[str]:
    """Every tensor the simulator holds: quantized inputs/outputs of every node (not shape parameters)."""
    names = set()
    for node in model.graph.node:
        spec = get_op_spec(node.op_type)
        for position, name in enumerate(node.input):
            role = spec.input_spec(position)
            if name and role is not None and role.role in (Role.ACTIVATION, Role.WEIGHT, Role.BIAS, Role.QPARAM):
                names.add(name)
        if spec.output_dtype == "quantized":
            names.update(o for o in node.output if o)
    return names


@pytest.mark.parametrize(("bits", "granularity", "method"), LEGACY_CONFIGS)
def test_demo_model_in_every_legacy_configuration(tmp_path, demo, bits, granularity, method):
    model, data = demo
    path = tmp_path / "demo_calib.pickle"
    table = Calibrator(bits, granularity, method).generate_quantization_table(model, data, str(path))
    loaded = QuantTable.load(path)
    # The legacy API writes the original toolkit's format: biases at the legacy library's exponent (ESP-DL v3's
    # e_in + e_w is derived again when the table is lowered), everything else as calibrated.
    biases = {n.input[2] for n in model.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2}
    assert {k: v for k, v in loaded.exponents.items() if k not in biases} == {
        k: v for k, v in table.exponents.items() if k not in biases
    }
    assert (tmp_path / "demo_calib.json").is_file()
    loaded.check_model(model, needed_tensors(model))  # every tensor the simulator needs, right model
    meta = loaded.metadata
    assert (meta["bits"], meta["granularity"], meta["method"]) == (int(bits[3:]), granularity, method)
    assert meta["graph_hash"] == graph_hash(model) and meta["samples"] == 300
    per_channel = [n for n, e in loaded.exponents.items() if isinstance(e, list)]
    assert bool(per_channel) == (granularity == "per-channel")
    assert loaded["input"] == (
        exponent_for_max_abs(float(np.abs(data).max()), int(bits[3:])) if method == "minmax" else loaded["input"]
    )


def test_streamed_batches_equal_one_array(demo):
    model, data = demo
    whole = Calibrator("int8", "per-tensor", "entropy").calibrate(model, data, batch_size=64).table
    streamed = (
        Calibrator("int8", "per-tensor", "entropy")
        .calibrate(model, (data[i : i + 64] for i in range(0, len(data), 64)))
        .table
    )
    assert whole.exponents == streamed.exponents


def _conv_relu_pool_model(rng, outlier_channel=None):
    #   x -> Conv(W, B) -> Relu -> MaxPool -> Concat(., x2) -> y ;  x2 -> Add(x2, x2) -> (into Concat)
    weight = rng.normal(0, 0.1, (4, 2, 3, 3)).astype(np.float32)
    if outlier_channel is not None:
        weight[outlier_channel] *= 100
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Add", ["x2", "x2"], ["a"], name="add"),
        helper.make_node("Concat", ["p", "a"], ["y"], axis=1, name="concat"),
    ]
    inits = {"W": weight, "B": rng.normal(0, 0.1, 4).astype(np.float32)}
    return make_model(
        nodes, [tensor("x", [1, 2, 8, 8]), tensor("x2", [1, 3, 4, 4])], [tensor("y", [1, 7, 4, 4])], inits
    )


def test_registry_rules_are_applied(rng):
    model = _conv_relu_pool_model(rng)
    data = {
        "x": rng.normal(0, 1, (64, 2, 8, 8)).astype(np.float32),
        "x2": rng.normal(0, 20, (64, 3, 4, 4)).astype(np.float32),
    }
    result = Calibrator("int8").calibrate(model, data)
    e = result.table.exponents
    assert "c" not in result.observers and "r" in result.observers  # the Conv takes its fused Relu's exponent
    assert e["c"] == e["r"] and e["p"] == e["r"]  # fused Relu, then MaxPool passes it through
    assert e["c"] >= e["x"] + e["W"]  # no left shift in the Conv kernel
    assert e["B"] == e["x"] + e["W"]  # bias at e_in + e_w
    assert e["y"] == max(e["p"], e["a"])  # Concat shares the largest exponent
    small = "p" if e["p"] < e["a"] else "a"
    # Add aligns both inputs to its output (x2 + x2 needs one more bit), Concat its smaller input.
    assert [(r.node, r.position, r.tensor, r.to_exponent) for r in result.requantize] == [
        ("add", 0, "x2", e["a"]),
        ("add", 1, "x2", e["a"]),
        ("concat", ["p", "a"].index(small), small, e["y"]),
    ]


def test_per_channel_weights_isolate_an_outlier_channel(rng):
    model = _conv_relu_pool_model(rng, outlier_channel=2)
    data = {
        "x": rng.normal(0, 1, (8, 2, 8, 8)).astype(np.float32),
        "x2": rng.normal(0, 1, (8, 3, 4, 4)).astype(np.float32),
    }
    per_tensor = Calibrator("int8", "per-tensor").calibrate(model, data).table
    per_channel = Calibrator("int8", "per-channel").calibrate(model, data).table
    channels = per_channel["W"]
    assert isinstance(channels, list) and len(channels) == 4
    assert max(channels) == channels[2] == per_tensor["W"]
    assert all(c <= channels[2] - 6 for i, c in enumerate(channels) if i != 2)
    assert per_channel["B"] == [per_channel["x"] + c for c in channels]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.zeros((0, 1, 28, 28), np.float32), "empty"),
        (np.zeros((4, 28, 28), np.float32), r"rank 3 instead of 4"),
        (np.zeros((4, 1, 28, 27), np.float32), r"axis 3 is 27, expected 28"),
        (np.array([["a"]]), "not numeric"),
        ({"image": np.zeros((2, 1, 28, 28), np.float32)}, r"unknown input\(s\) \['image'\]"),
        ([], "empty"),
        ("calib.npy", "pass an array"),
    ],
)
def test_bad_calibration_data(demo, data, message):
    with pytest.raises(DatasetError, match=message):
        Calibrator("int8").calibrate(demo[0], data)


def test_nan_names_the_first_bad_sample(demo):
    data = demo[1][:40].copy()
    data[37, 0, 3, 3] = np.nan
    data[39, 0, 0, 0] = np.inf
    with pytest.raises(DatasetError, match="input 'input': sample 37 contains NaN or Inf"):
        Calibrator("int8").calibrate(demo[0], data, batch_size=16)


def test_unsupported_model_is_refused_with_every_reason():
    nodes = [helper.make_node("LRN", ["x"], ["y"], size=3, name="lrn")]
    model = make_model(nodes, [tensor("x", [1, 4, 6, 6])], [tensor("y", [1, 4, 6, 6])])
    with pytest.raises(UnsupportedModelError, match="node 'lrn' \\(LRN\\)"):
        Calibrator("int8").calibrate(model, np.zeros((1, 4, 6, 6), np.float32))


def test_cli_calibrate(tmp_path, demo):
    model, data = demo
    onnx.save(model, tmp_path / "demo.onnx")
    np.save(tmp_path / "calib.npy", data[:100])
    result = CliRunner().invoke(
        main,
        ["calibrate", str(tmp_path / "demo.onnx"), "--data", str(tmp_path / "calib.npy"), "--method", "percentile"],
    )
    assert result.exit_code == 0, result.output
    assert "max |x|" in result.output and "clipped" in result.output and "logits" in result.output
    assert QuantTable.load(tmp_path / "demo_calib.pickle").metadata["method"] == "percentile"
    result = CliRunner().invoke(
        main,
        [
            "calibrate",
            str(tmp_path / "demo.onnx"),
            "--data",
            str(tmp_path / "calib.npy"),
            "--json",
            "-o",
            str(tmp_path / "t.pickle"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["metadata"]["samples"] == 100
    result = CliRunner().invoke(main, ["calibrate", str(tmp_path / "demo.onnx"), "--data", str(tmp_path / "x.npy")])
    assert result.exit_code == 1 and "no such data file" in result.output


def test_static_batch_models_are_calibrated_in_batches(rng):
    # A constant Reshape target [1, 12] pins the batch to 1: data is fed one sample at a time.
    nodes = [
        helper.make_node("Reshape", ["x", "t"], ["r"], name="reshape"),
        helper.make_node("Relu", ["r"], ["y"], name="relu"),
    ]
    pinned = make_model(nodes, [tensor("x", [1, 3, 4])], [tensor("y", [1, 12])], {"t": np.array([1, 12])})
    data = rng.normal(0, 1, (10, 3, 4)).astype(np.float32)
    result = Calibrator("int8").calibrate(pinned, data, batch_size=4)
    assert result.samples == 10
    assert result.table["x"] == exponent_for_max_abs(float(np.abs(data).max()), 8)
    # Without the Reshape the static batch is simply made dynamic.
    free = make_model([nodes[1]], [tensor("r", [1, 12])], [tensor("y", [1, 12])])
    assert Calibrator("int8").calibrate(free, data.reshape(10, 12), batch_size=4).samples == 10


def test_minmax_ranges_equal_a_direct_measurement(rng):
    # Clip and Relu outputs are derived from their input's extremes instead of being measured: the result
    # must equal measuring every tensor directly.
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Clip", ["c", "lo", "hi"], ["k"], name="clip"),
        helper.make_node("Conv", ["k", "W2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r"], name="relu"),
        helper.make_node("Clip", ["c2", "lo"], ["k2"], name="clip_low_only"),
        helper.make_node("Add", ["r", "k2"], ["y"], name="add"),
    ]
    inits = {
        "W": rng.normal(0, 1, (3, 2, 3, 3)).astype(np.float32),
        "W2": rng.normal(0, 1, (3, 3, 1, 1)).astype(np.float32),
        "lo": np.array(0.5, np.float32),
        "hi": np.array(6.0, np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 2, 5, 5])], [tensor("y", ["N", 3, 5, 5])], inits)
    data = rng.normal(0, 2, (40, 2, 5, 5)).astype(np.float32)
    result = Calibrator("int8").calibrate(model, data, batch_size=16)
    direct = _measure_directly(model, list(result.observers), data)
    assert set(result.observers) == {"x", "k", "c2", "k2", "y"}  # c takes k's range; r passes c2 through
    for name, observer in result.observers.items():
        assert observer.max_abs == direct[name], name


def test_a_model_onnxruntime_refuses_is_a_clear_error(rng):
    """A float64 weight under a float32 input: onnxruntime cannot bind the types; the user gets one line that
    says so and how to check the model, not onnxruntime's exception."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    weight = rng.normal(0, 1, (2, 2, 1, 1))  # float64
    model = make_model(nodes, [tensor("x", ["N", 2, 3, 3])], [tensor("y", ["N", 2, 3, 3])], {"w": weight})
    with pytest.raises(ModelError, match=r"onnxruntime [\d.]+ cannot load the model for calibration.*onnx.checker"):
        Calibrator("int8").calibrate(model, rng.normal(0, 1, (2, 2, 3, 3)).astype(np.float32))


def test_legacy_export_coefficient_to_cpp_and_the_cli(tmp_path):
    """The legacy toolkit's call, as its example.py makes it, and `espquant export --format cpp`."""
    model = optimize_model(onnx.load(demo_model_path()))
    data = load_demo_data()
    calibrator = Calibrator("int8", "per-tensor", "minmax")
    calibrator.generate_quantization_table(model, data.calib_inputs[:200], str(tmp_path / "t.pickle"))
    written = calibrator.export_coefficient_to_cpp(
        model, str(tmp_path / "t.pickle"), "esp32s3", str(tmp_path), "mnist_coefficient", True
    )
    assert [p.name for p in written] == [
        "mnist_coefficient.cpp",
        "mnist_coefficient.hpp",
        "mnist_coefficient_model.hpp",
    ]
    assert "get_" in written[1].read_text()
    onnx.save(model, tmp_path / "m.onnx")
    (tmp_path / "cpp").mkdir()
    args = ["export", str(tmp_path / "m.onnx"), "--table", str(tmp_path / "t.pickle"), "--format", "cpp"]
    result = CliRunner().invoke(main, [*args, "--target", "esp32c3", "-o", str(tmp_path / "cpp")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cpp" / "m_coefficient_model.hpp").is_file()
    result = CliRunner().invoke(main, [*args, "--target", "esp32p4", "-o", str(tmp_path / "cpp")])
    assert result.exit_code == 1 and "esp32s3" in result.output  # the legacy library's chips are listed


def test_clip_bounds_stored_as_one_element_vectors(rng):
    """torch's ReLU6 export writes Clip's min / max as shape-[1] tensors; min-max derives the range from them."""
    nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["y"], name="relu6")]
    inits = {"lo": np.array([0.0], np.float32), "hi": np.array([6.0], np.float32)}
    model = make_model(nodes, [tensor("x", ["N", 8])], [tensor("y", ["N", 8])], inits)
    table = Calibrator("int8").calibrate(model, 10 * rng.normal(0, 1, (16, 8)).astype(np.float32)).table
    assert table.exponents["y"] == exponent_for_max_abs(6.0, 8)


def _measure_directly(model: onnx.ModelProto, names: list[str], data: np.ndarray) -> dict[str, float]:
    """max |x| of ``names`` from onnxruntime with every tensor exposed (no in-graph reduction)."""

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(
        helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names if n not in present
    )
    session = create_session(exposed)
    return {n: float(np.abs(v).max()) for n, v in zip(names, session.run(names, {"x": data}))}


def test_pooled_maxima_equal_a_direct_measurement(rng):
    """Min-max reduces non-negative tensors in the graph (GlobalMaxPool): on ranks 4 and 3, 3 or 16
    channels, and a last batch of another size, every max |x| must equal measuring the tensor itself.
    Tensors that may be negative, rank-2 tensors and symbolic spatial sizes are measured whole."""
    from espquant.calibration.collector import _poolable

    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Clip", ["c", "lo", "hi"], ["k"], name="relu6"),  # Conv takes this range
        helper.make_node("Conv", ["k", "W16"], ["c16"], name="conv16"),
        helper.make_node("Relu", ["c16"], ["r16"], name="relu16"),  # fused: observed as r16
        helper.make_node("Clip", ["r16", "neg"], ["m"], name="clip_negative_low"),  # r16 observed: derived
        helper.make_node("Reshape", ["m", "rows"], ["m3"], name="to_rank3"),
        helper.make_node("Clip", ["m3", "lo"], ["r3"], name="clip_rank3"),
        helper.make_node("ReduceMean", ["r3"], ["g"], axes=[2], keepdims=0, name="mean"),
        helper.make_node("Gemm", ["g", "Wfc"], ["f"], transB=1, name="fc"),
        helper.make_node("Relu", ["f"], ["y"], name="relu_fc"),  # rank 2: exposed
        helper.make_node("Conv", ["k", "Wn", "Bn"], ["cn"], name="conv_negative"),
        helper.make_node("Clip", ["cn", "neg"], ["n"], name="clip_keeps_negatives"),  # about -1: exposed
    ]
    inits = {
        "W": rng.normal(0, 1, (3, 2, 3, 3)).astype(np.float32),
        "W16": rng.normal(0, 1, (16, 3, 1, 1)).astype(np.float32),
        "Wfc": rng.normal(0, 1, (4, 16)).astype(np.float32),
        "lo": np.array(0.0, np.float32),
        "hi": np.array(6.0, np.float32),
        "neg": np.array(-1.0, np.float32),
        "rows": np.array([-1, 16, 30]),  # static after the Reshape even when H and W are not
        "Wn": rng.normal(0, 0.01, (2, 3, 1, 1)).astype(np.float32),
        "Bn": np.array([-3.0, -3.0], np.float32),
    }
    outputs = [tensor("y", ["N", 4]), tensor("n", ["N", 2, 6, 5])]
    model = make_model(nodes, [tensor("x", ["N", 2, 6, 5])], outputs, inits, opset=13)
    data = rng.normal(0, 2, (10, 2, 6, 5)).astype(np.float32)
    result = Calibrator("int8").calibrate(model, data, batch_size=4)
    direct = _measure_directly(model, list(result.observers), data)
    for name, observer in result.observers.items():
        assert observer.max_abs == direct[name], name
    assert direct["n"] == 1.0
    measured = [n for n in result.observers if n != "x"]
    assert set(_poolable(model, measured)) == {"k", "r16", "r3"}
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"  # the checker refuses this model,
    assert set(_poolable(model, measured)) == {"r3"}  # but the collector must not assume static sizes
    assert "c" not in result.observers and result.table["c"] == result.table["k"]


def test_a_conv_read_only_by_a_clip_or_an_add_takes_its_readers_range(rng):
    """Values the Conv saturates lie outside what the Clip keeps; an Add reads its inputs at its output's
    exponent anyway. Either way the Conv writes at its reader's exponent: finer steps, no RequantizeLinear."""
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("Clip", ["c", "lo", "hi"], ["k"], name="relu6"),
        helper.make_node("Conv", ["k", "W2"], ["p"], name="project"),
        helper.make_node("Add", ["k", "p"], ["s"], name="residual"),
        helper.make_node("Add", ["s", "s"], ["y"], name="add_of_add"),  # not conv-like: keeps its own range
    ]
    inits = {
        "W": rng.normal(0, 10, (3, 3, 1, 1)).astype(np.float32),  # pre-ReLU6 values reach about ±60
        "W2": rng.normal(0, 0.3, (3, 3, 1, 1)).astype(np.float32),
        "lo": np.array(0.0, np.float32),
        "hi": np.array(6.0, np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 3, 4, 4])], [tensor("y", ["N", 3, 4, 4])], inits)
    data = rng.normal(0, 2, (32, 3, 4, 4)).astype(np.float32)
    result = Calibrator("int8").calibrate(model, data)
    e = result.table.exponents
    assert set(result.observers) == {"x", "k", "s", "y", "p"}  # p: measured so the Add's exponent holds it
    assert e["c"] == e["k"] == exponent_for_max_abs(6.0, 8) == -4
    assert e["p"] == e["s"]
    assert [(r.node, r.tensor) for r in result.requantize] == [
        ("residual", "k"),
        ("add_of_add", "s"),
        ("add_of_add", "s"),
    ]
    from rich.console import Console

    from espquant.cli.calibrate import print_calibration

    console = Console(record=True, width=120)
    print_calibration(result, console)
    rows = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if "│" in line}
    assert "as k" in rows["c"] and "as s" in rows["p"] and "-4" in rows["c"]
    # On the chip: a Conv output far beyond 6 saturates, and the ReLU6 still gives exactly 6.
    from espquant import Evaluator

    quantized = Evaluator("int8", "per-tensor", "esp32s3").generate_quantized_model(model, result.table)
    values = quantized.run({"x": quantized.quantize_input("x", data)}, keep=True)
    assert values["c"].max() == 127 and values["k"].max() == 96  # 96 * 2^-4 = 6


def test_mse_calibration_chooses_weight_exponents_by_squared_error_too(rng):
    """calib_method 'mse' also picks each weight's exponent by squared error (the weights are known
    exactly); the other methods keep max |w|. One outlier weight 1.0 among small ones: -7 instead of -6."""
    weight = np.full((4, 2, 3, 3), 0.01, np.float32)
    weight[0, 0, 0, 0] = 1.0
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="conv")]
    model = make_model(nodes, [tensor("x", ["N", 2, 5, 5])], [tensor("y", ["N", 4, 3, 3])], {"W": weight})
    data = rng.normal(0, 1, (8, 2, 5, 5)).astype(np.float32)
    assert Calibrator("int8", "per-tensor", "minmax").calibrate(model, data).table["W"] == -6
    assert Calibrator("int8", "per-tensor", "entropy").calibrate(model, data).table["W"] == -6
    mse = Calibrator("int8", "per-tensor", "mse").calibrate(model, data).table
    assert mse["W"] == -7 and mse["y"] >= mse["x"] + mse["W"]
    assert Calibrator("int8", "per-channel", "mse").calibrate(model, data).table["W"] == [-7, -13, -13, -13]


@pytest.mark.parametrize("order", ["x, sigmoid", "sigmoid, x"])
def test_a_written_out_silu_is_one_swish_module(rng, order):
    """x * Sigmoid(x) (YOLO's SiLU): one Swish node in the integer model (an int8 table from x's exponent to
    the product's), as ESP-PPQ writes it, instead of a rounded gate and a Mul; a gate read elsewhere stays."""
    from espquant.calibration.plan import plan_calibration
    from espquant.simulator.lowering import lower_for_target

    n = helper.make_node
    operands = ["c", "s"] if order == "x, sigmoid" else ["s", "c"]
    nodes = [
        n("Conv", ["x", "w"], ["c"], name="conv"),
        n("Sigmoid", ["c"], ["s"], name="gate"),
        n("Mul", operands, ["y"], name="silu"),
        n("Sigmoid", ["y"], ["g2"], name="gate2"),
        n("Mul", ["y", "g2"], ["z"], name="kept"),  # its gate is an output too: two nodes
    ]
    inits = {"w": rng.normal(0, 0.5, (4, 3, 1, 1)).astype(np.float32)}
    model = make_model(nodes, [tensor("x", ["N", 3, 5, 5])], [tensor("z", None), tensor("g2", None)], inits)
    plan = plan_calibration(model)
    assert [node.op_type for node, _ in plan.nodes] == ["Conv", "Swish", "Sigmoid", "Mul"]
    data = rng.normal(0, 1, (32, 3, 5, 5)).astype(np.float32)
    table = Calibrator("int8").calibrate(model, data).table
    assert "s" not in table.exponents and "g2" in table.exponents
    quantized = lower_for_target(model, table, "esp32s3")
    swish = next(q for q in quantized.nodes if q.op_type == "Swish")
    assert swish.inputs == ["c"] and swish.outputs == ["y"] and swish.table is not None
    x_exp, y_exp = table.exponents["c"], table.exponents["y"]
    codes = np.arange(-128, 128)
    expected = np.clip(np.rint(codes * 2.0**x_exp / (1 + np.exp(-codes * 2.0**x_exp)) * 2.0**-y_exp), -128, 127)
    assert np.abs(swish.table.reshape(-1) - expected).max() <= 1  # the table is the function, rounded once


@pytest.mark.parametrize("bits", ["int8", "int16"])
def test_a_difference_of_large_values_keeps_its_inputs_unsaturated(rng, bits):
    """YOLO's box decoding, x2 - x1 with both near 300 and the difference near 15: ESP-DL subtracts the integers
    at the output's exponent (dl_base_sub.cpp), so that exponent must hold the inputs, not only the difference;
    at the difference's own exponent both inputs saturated and the result was wrong by ~half its range."""
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["a"], name="left"),
        helper.make_node("Conv", ["x", "W2", "B2"], ["b"], name="right"),
        helper.make_node("Sub", ["b", "a"], ["d"], name="width"),
        helper.make_node("Add", ["d", "offset"], ["y"], name="shift"),
    ]
    inits = {
        "W1": rng.normal(0, 0.5, (2, 3, 1, 1)).astype(np.float32),
        "B1": np.array([300.0, 280.0], np.float32),
        "B2": np.array([315.0, 290.0], np.float32),
        "offset": np.array([200.0], np.float32),  # a constant beyond the sum's own range
    }
    inits["W2"] = inits["W1"] + rng.normal(0, 0.05, (2, 3, 1, 1)).astype(np.float32)
    model = make_model(nodes, [tensor("x", ["N", 3, 4, 4])], [tensor("y", ["N", 2, 4, 4])], inits)
    data = rng.normal(0, 1, (32, 3, 4, 4)).astype(np.float32)
    table = Calibrator(bits).calibrate(model, data).table
    width = 8 if bits == "int8" else 16
    assert table.exponents["d"] >= exponent_for_max_abs(330.0, width) - 1  # holds the inputs near 315
    assert table.exponents["y"] >= exponent_for_max_abs(200.0, width)  # and the constant
    from espquant import Evaluator

    evaluator = Evaluator(bits, "per-tensor", "esp32s3")
    evaluator.generate_quantized_model(model, table)
    simulated = evaluator.evaluate_quantized_model(data, to_float=True)[0][0]
    expected = create_session(model).run(None, {"x": data})[0]
    step = 2.0 ** table.exponents["y"]
    assert np.abs(simulated - expected).max() <= 3 * step


def test_a_concat_of_very_different_ranges_is_pointed_out(rng, caplog):
    """YOLO exports concatenate box coordinates (hundreds) with class scores (0..1): one exponent on the chip,
    so at int8 every score rounds to 0. Calibration says so, naming the node and the input."""
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["boxes"], name="box_head"),
        helper.make_node("Conv", ["x", "W2"], ["logits"], name="class_head"),
        helper.make_node("Sigmoid", ["logits"], ["scores"], name="gate"),
        helper.make_node("Concat", ["boxes", "scores"], ["y"], axis=1, name="head"),
    ]
    inits = {
        "W": rng.normal(0, 1, (4, 3, 1, 1)).astype(np.float32),
        "B": np.full(4, 400.0, np.float32),
        "W2": rng.normal(0, 1, (2, 3, 1, 1)).astype(np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 3, 4, 4])], [tensor("y", ["N", 6, 4, 4])], inits)
    data = rng.normal(0, 1, (16, 3, 4, 4)).astype(np.float32)
    with caplog.at_level("WARNING", logger="espquant.advice"):
        Calibrator("int8").calibrate(model, data)
    assert "Concat 'head': input 'scores'" in caplog.text and "'boxes'" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="espquant.advice"):
        Calibrator("int16").calibrate(model, data)  # 15 bits leave the scores 2^-6 steps: no warning
    assert "Concat" not in caplog.text
