"""``auto`` calibration, cross-layer equalization and bias correction (issue 14).

Models: the bundled MNIST demo CNN (real weights, real digits) for auto and the CLI; small Conv graphs built
here for CLE and bias correction, e.g.

    x -> Conv(w1, b1) -> Relu -> Conv(w2, b2) -> y        (CLE rescales w1's rows and w2's columns)
"""

from __future__ import annotations

from importlib.resources import files

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from espquant import Calibrator
from espquant.calibration import auto as auto_module
from espquant.calibration.auto import output_heads, probability_outputs, spread_weights
from espquant.calibration.engine import calibrate_model
from espquant.calibration.exponents import assign_exponents
from espquant.calibration.plan import plan_calibration
from espquant.cli import main
from espquant.errors import QuantTableError
from espquant.graph import scale_initializers
from espquant.optimizer import optimize_model
from espquant.optimizer.equalize import equalization_factors, equalization_pairs, equalized_copy
from espquant.quant.profiles import get_target
from espquant.simulator.lowering import build_quantized_model
from espquant.simulator.simulate import simulate
from espquant.table import QuantTable, graph_hash
from helpers import make_model, run, tensor


@pytest.fixture(scope="module")
def demo():
    """The optimized demo CNN, 256 calibration digits and 300 test digits."""
    model = optimize_model(onnx.load(str(files("espquant") / "data" / "demo_mnist_cnn.onnx")))
    data = np.load(str(files("espquant") / "data" / "demo_mnist.npz"))
    calib = data["calib_images"][:256, None].astype(np.float32)
    return model, calib, data["test_images"][:300, None].astype(np.float32)


@pytest.fixture(scope="module")
def auto_result(demo):
    model, calib, _ = demo
    return calibrate_model(model, calib, 8, "per-tensor", "auto")


def _output_error(model: onnx.ModelProto, table: QuantTable, x: np.ndarray) -> float:
    """What auto minimises: the simulated S3 outputs' mean absolute error against onnxruntime's float outputs,
    over the float outputs' mean absolute value (mean over outputs)."""
    quantized = build_quantized_model(model, table, get_target("esp32s3"), 8)
    simulated, _ = simulate(quantized, model, x, to_float=True)
    reference = run(model, {model.graph.input[0].name: x})
    return float(np.mean([np.mean(np.abs(s - r)) / np.mean(np.abs(r)) for s, r in zip(simulated, reference)]))


def test_auto_never_worse_than_minmax_on_its_measured_error(demo, auto_result):
    model, calib, test = demo
    meta = auto_result.table.metadata
    assert meta["method"] == "auto"
    assert meta["auto"]["output_error"] <= meta["auto"]["minmax_output_error"]
    minmax = calibrate_model(model, calib, 8, "per-tensor", "minmax")
    search = calib[:64]
    assert _output_error(auto_result.model, auto_result.table, search) <= _output_error(model, minmax.table, search)
    # and on held-out digits it is not worse either (a real gain on this model: about 4x less error)
    assert _output_error(auto_result.model, auto_result.table, test) < _output_error(model, minmax.table, test)


def test_auto_is_deterministic(demo, auto_result):
    model, calib, _ = demo
    again = calibrate_model(model, calib, 8, "per-tensor", "auto")
    assert again.table.exponents == auto_result.table.exponents
    assert graph_hash(again.model) == graph_hash(auto_result.model) == again.table.metadata["graph_hash"]


def test_candidates_run_their_samples_in_runs_of_a_bounded_size(demo, auto_result, monkeypatch):
    """A candidate's samples go in runs whose largest activation stays within ``RUN_VALUES`` (new sessions
    allocate every tensor on their first run: smaller runs cost less), with the same values as one run, and its
    program keeps the plain layout (no blocked sessions for a few runs). A fixed-batch model or a tensor without
    the samples first keeps one run."""
    from espquant.calibration.auto import samples_per_run, simulated_values
    from espquant.simulator import simulate as simulate_module

    model, calib, _ = demo
    x = {model.graph.input[0].name: calib[:20]}
    names = [n.output[0] for n in model.graph.node]
    reference = auto_module.float_reference(model, names, x, ["CPUExecutionProvider"], 1)
    largest = max(v[0].size for v in reference.values())
    monkeypatch.setattr(auto_module, "RUN_VALUES", 3 * largest + 1)
    assert samples_per_run(model, reference) == 3
    assert samples_per_run(model, reference | {"scalar": np.zeros(7)}) is None  # not 20 samples first
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 20
    assert samples_per_run(fixed, reference) is None
    runs = []
    real = simulate_module.simulate

    def counting(quantized, *args, **kwargs):
        runs.append(quantized.blocked_layout)
        return real(quantized, *args, **kwargs)

    monkeypatch.setattr(simulate_module, "simulate", counting)
    table = auto_result.table
    whole = simulated_values(auto_result.model, table, get_target("esp32s3"), 8, x, names[:3])
    split = simulated_values(auto_result.model, table, get_target("esp32s3"), 8, x, names[:3], 3)
    assert runs == [False] * 8  # one run, then 7 runs of at most 3 samples, none with blocked sessions
    assert whole.keys() == split.keys() and all(np.array_equal(whole[k], split[k]) for k in whole)


def test_auto_table_respects_exponent_rules(auto_result):
    """The chosen table lowers (shift bounds, requantize edges) for every family it may run on."""
    for target in ("esp32s3", "esp32p4", "esp32c3"):
        build_quantized_model(auto_result.model, auto_result.table, get_target(target), 8)


def _score_heads(rng) -> tuple[onnx.ModelProto, np.ndarray]:
    """A detector's score output in miniature: two 1x1 Conv heads, reshaped to [N, anchors, 1] and
    concatenated, on features whose channel 0 sometimes carries a huge negative value, so the scores have a
    far negative tail (background anchors) over a bulk in [-4, 4]:

        x -> Conv(8->1) -> Reshape ---\
        x -> Conv(8->1) -> Reshape -> Concat(axis 1) -> scores [N, 128, 1]
    """
    nodes = [
        helper.make_node("Conv", ["x", "h1.w", "h1.b"], ["h1"], name="h1", kernel_shape=[1, 1]),
        helper.make_node("Conv", ["x", "h2.w", "h2.b"], ["h2"], name="h2", kernel_shape=[1, 1]),
        helper.make_node("Reshape", ["h1", "flat"], ["r1"]),
        helper.make_node("Reshape", ["h2", "flat"], ["r2"]),
        helper.make_node("Concat", ["r1", "r2"], ["scores"], axis=1),
        helper.make_node("Conv", ["x", "box.w", "box.b"], ["boxes"], name="box", kernel_shape=[1, 1]),
    ]
    inits = {
        "h1.w": rng.normal(0, 0.5, (1, 8, 1, 1)).astype(np.float32),
        "h1.b": np.array([-1.0], np.float32),
        "h2.w": rng.normal(0, 0.5, (1, 8, 1, 1)).astype(np.float32),
        "h2.b": np.array([0.5], np.float32),
        "flat": np.array([0, -1, 1], np.int64),
        "box.w": rng.normal(0, 0.5, (4, 8, 1, 1)).astype(np.float32),
        "box.b": np.zeros(4, np.float32),
    }
    inits["h1.w"][0, 0] = inits["h2.w"][0, 0] = 2.0
    outputs = [tensor("scores", ["N", 128, 1]), tensor("boxes", ["N", 4, 8, 8])]
    model = make_model(nodes, [tensor("x", ["N", 8, 8, 8])], outputs, inits)
    x = rng.normal(0, 1, (160, 8, 8, 8)).astype(np.float32)
    x[:, 0] = np.where(rng.random((160, 8, 8)) < 0.002, -60.0, x[:, 0])
    return model, x


def test_output_heads_reach_the_layers_behind_reshapes_and_concats(rng):
    model, _ = _score_heads(rng)
    heads = output_heads(model, ["scores"], {"h1", "h2", "scores", "unrelated"})
    assert sorted(heads["scores"]) == ["h1", "h2", "scores"]


def test_auto_walks_a_long_tailed_score_head_to_a_finer_exponent(rng):
    """min-max gives the scores the step their -120 tail needs; auto clips the tail (every clipped score stays
    far below any threshold) and keeps the resolution where the values are: fewer wrong decisions at 0."""
    model, x = _score_heads(rng)
    calib, test = x[:128], x[128:]
    minmax = calibrate_model(model, calib, 8, "per-tensor", "minmax")
    auto = calibrate_model(model, calib, 8, "per-tensor", "auto")
    assert auto.table.exponents["scores"] < minmax.table.exponents["scores"]
    assert _output_error(model, auto.table, test) < _output_error(model, minmax.table, test)
    reference = run(model, {"x": test})[0] > 0
    decided = {}
    for name, result in (("minmax", minmax), ("auto", auto)):
        quantized = build_quantized_model(model, result.table, get_target("esp32s3"), 8)
        decided[name] = np.sum((simulate(quantized, model, test, to_float=True)[0][0] > 0) != reference)
    assert decided["auto"] < decided["minmax"]


def test_probability_outputs_are_found_through_data_movement(rng):
    """A Sigmoid score reshaped to [N, 64] is a probability (its error counts in probability units); the
    logits beside it and a Sigmoid followed by arithmetic are not."""
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["logits"], kernel_shape=[1, 1]),
        helper.make_node("Sigmoid", ["logits"], ["p"]),
        helper.make_node("Reshape", ["p", "flat"], ["score"]),
        helper.make_node("Sigmoid", ["logits"], ["q"]),
        helper.make_node("Mul", ["q", "two"], ["scaled"]),
    ]
    inits = {
        "w": rng.normal(0, 1, (1, 2, 1, 1)).astype(np.float32),
        "b": np.zeros(1, np.float32),
        "flat": np.array([0, -1], np.int64),
        "two": np.array(2.0, np.float32),
    }
    outputs = [tensor("score", ["N", 64]), tensor("logits", ["N", 1, 8, 8]), tensor("scaled", ["N", 1, 8, 8])]
    model = make_model(nodes, [tensor("x", ["N", 2, 8, 8])], outputs, inits)
    assert probability_outputs(model, ["score", "logits", "scaled"]) == ["score"]


def _prelu_block(rng) -> tuple[onnx.ModelProto, np.ndarray]:
    """``x -> Conv 3x3 -> PRelu (slopes 0.05-0.2) -> Conv 1x1 -> y`` on inputs whose convolution is mostly
    negative: the PRelu output's range is a fraction of its input's, so it fits a finer exponent."""
    nodes = [
        helper.make_node("Conv", ["x", "c.w", "c.b"], ["a"], name="c", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("PRelu", ["a", "slope"], ["p"], name="prelu"),
        helper.make_node("Conv", ["p", "o.w", "o.b"], ["y"], name="o", kernel_shape=[1, 1]),
    ]
    inits = {
        "c.w": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
        "c.b": np.full(4, -3.0, np.float32),
        "slope": rng.uniform(0.05, 0.2, (4, 1, 1)).astype(np.float32),
        "o.w": rng.normal(0, 1, (2, 4, 1, 1)).astype(np.float32),
        "o.b": np.zeros(2, np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 2, 8, 8])], inits)
    return model, rng.normal(0, 1, (160, 3, 8, 8)).astype(np.float32)


def test_auto_gives_a_prelu_a_finer_output_exponent_than_its_input(rng):
    model, x = _prelu_block(rng)
    auto = calibrate_model(model, x[:128], 8, "per-tensor", "auto")
    minmax = calibrate_model(model, x[:128], 8, "per-tensor", "minmax")
    assert minmax.table.exponents["p"] == minmax.table.exponents["a"]  # the fixed methods keep the input's
    assert auto.table.exponents["p"] < auto.table.exponents["a"]
    assert _output_error(auto.model, auto.table, x[128:]) < _output_error(model, minmax.table, x[128:])


@pytest.mark.parametrize(
    "target, bits, requantized",
    [("esp32s3", 8, False), ("esp32s3", 16, False), ("esp32p4", 8, False), ("esp32p4", 16, True), ("esp32c3", 8, True)],
)
def test_a_finer_prelu_output_is_a_requantize_where_the_kernel_copies_positives(rng, target, bits, requantized):
    """The ESP32-S3 and ESP32-P4 int8 PRelu kernels rescale positives; the C kernel (plain-C chips, ESP32-P4
    int16) copies them, so the lowering computes the PRelu at its input's exponent and requantizes after. Either
    way the compiled simulation equals the interpreter, and the output carries the table's exponent."""
    model, x = _prelu_block(rng)
    table = calibrate_model(model, x[:128], bits, "per-tensor", "auto").table
    assert table.exponents["p"] < table.exponents["a"]
    quantized = build_quantized_model(model, table, get_target(target), bits)
    ops = [n.op_type for n in quantized.nodes]
    assert ("RequantizeLinear" in ops[ops.index("PRelu") :]) == requantized
    assert quantized.exponents["p"] == table.exponents["p"]
    compiled = simulate(quantized, model, x[128:])[0]
    quantized.compiled = False
    interpreted = simulate(quantized, model, x[128:])[0]
    for a, b in zip(compiled, interpreted):
        np.testing.assert_array_equal(a, b)


def test_assign_exponents_keeps_a_finer_prelu_output_only(rng):
    model, _ = _prelu_block(rng)
    plan = plan_calibration(model)
    observed = {"x": -5, "a": -2, "y": -2}
    assert assign_exponents(model, plan, observed, 8, per_channel=False).exponents["p"] == -2
    assert assign_exponents(model, plan, observed | {"p": -4}, 8, per_channel=False).exponents["p"] == -4
    assert assign_exponents(model, plan, observed | {"p": 0}, 8, per_channel=False).exponents["p"] == -2


def _spread_depthwise(rng) -> tuple[onnx.ModelProto, np.ndarray]:
    """An inverted-residual tail in miniature, whose depthwise channel 0 has weights 60x the others':

        x -> depthwise Conv 3x3 (4 channels) -> Clip(0, 6) -> 1x1 Conv (reads channels 1-3 strongly) -> y

    The Clip (ReLU6, as MobileNetV2 and MediaPipe's models have it) keeps cross-layer equalization out: it
    is not positive-homogeneous. With one weight exponent for the depthwise layer (ESP32-S3), min-max leaves
    channels 1-3 a handful of integer levels."""
    nodes = [
        helper.make_node("Conv", ["x", "dw.w", "dw.b"], ["d"], name="dw", kernel_shape=[3, 3], pads=[1] * 4, group=4),
        helper.make_node("Clip", ["d", "lo", "hi"], ["c"]),
        helper.make_node("Conv", ["c", "pw.w", "pw.b"], ["y"], name="pw", kernel_shape=[1, 1]),
    ]
    dw = rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32)
    dw[0] *= 60
    inits = {
        "dw.w": dw,
        "dw.b": np.full(4, 0.5, np.float32),
        "lo": np.array(0.0, np.float32),
        "hi": np.array(6.0, np.float32),
        "pw.w": np.array([[0.02, 1.0, -1.0, 1.0], [0.02, -1.0, 1.0, 1.0]], np.float32).reshape(2, 4, 1, 1),
        "pw.b": np.zeros(2, np.float32),
    }
    model = make_model(nodes, [tensor("x", ["N", 4, 8, 8])], [tensor("y", ["N", 2, 8, 8])], inits)
    return model, rng.normal(0, 1, (160, 4, 8, 8)).astype(np.float32)


def test_spread_weights_lists_per_tensor_weights_whose_channels_differ_widely(rng):
    model, _ = _spread_depthwise(rng)
    plan = plan_calibration(model)
    assert spread_weights(plan, model, {}, 8) == {"dw.w": 3}  # pw.w's channels span 1.0 / 1.0
    assert spread_weights(plan, model, {}, 16) == {}  # at int16 the median channel still has hundreds of levels


def test_assign_exponents_takes_a_chosen_per_tensor_weight_exponent(rng):
    model, _ = _spread_depthwise(rng)
    plan = plan_calibration(model)
    observed = {"x": -5, "d": -3, "c": -5, "y": -3}
    plain = assign_exponents(model, plan, observed, 8, per_channel=False).exponents
    finer = assign_exponents(model, plan, observed | {"dw.w": plain["dw.w"] - 2}, 8, per_channel=False).exponents
    assert finer["dw.w"] == plain["dw.w"] - 2
    assert finer["dw.b"] == finer["x"] + finer["dw.w"]  # the bias follows: e_in + e_w
    per_channel = assign_exponents(model, plan, observed | {"dw.w": -9}, 8, per_channel=True).exponents
    assert isinstance(per_channel["dw.w"], list) and -9 not in per_channel["dw.w"]


def test_auto_gives_a_widely_spread_depthwise_weight_a_finer_step(rng, monkeypatch):
    """The walk saturates channel 0's large weights (Clip(0, 6) follows, and the next layer barely reads it)
    for twice or more the levels in channels 1-3: auto's table has a finer weight exponent than min-max's and
    measures less error on held-out data than the same search without the walk."""
    model, x = _spread_depthwise(rng)
    calib, test = x[:128], x[128:]
    auto = calibrate_model(model, calib, 8, "per-tensor", "auto")
    minmax = calibrate_model(model, calib, 8, "per-tensor", "minmax")
    assert auto.table.exponents["dw.w"] < minmax.table.exponents["dw.w"]
    steps = auto.table.exponents["dw.w"] - minmax.table.exponents["dw.w"]
    assert auto.table.metadata["auto"]["narrowed_weights"] == {"dw.w": steps}
    monkeypatch.setattr(auto_module, "MAX_WEIGHT_SIMULATIONS", 0)
    unwalked = calibrate_model(model, calib, 8, "per-tensor", "auto")
    assert unwalked.table.exponents["dw.w"] == minmax.table.exponents["dw.w"]
    assert _output_error(auto.model, auto.table, test) < 0.8 * _output_error(unwalked.model, unwalked.table, test)
    per_channel = calibrate_model(model, calib, 8, "per-channel", "auto")  # ESP32-P4: every channel has its own
    assert isinstance(per_channel.table.exponents["dw.w"], list)


# --- cross-layer equalization -----------------------------------------------------------------------------


def _conv(name: str, x: str, y: str, group: int = 1, pads: int = 1) -> onnx.NodeProto:
    return helper.make_node(
        "Conv", [x, f"{name}.w", f"{name}.b"], [y], name=name, kernel_shape=[3, 3], pads=[pads] * 4, group=group
    )


def _weights(rng, name: str, shape: tuple[int, ...], skew: bool = True) -> dict[str, np.ndarray]:
    """Weights whose output channels differ in range by up to 100x (what CLE is for)."""
    w = rng.normal(0, 1, shape).astype(np.float32)
    if skew:
        w *= np.logspace(-2, 0, shape[0]).astype(np.float32).reshape((-1,) + (1,) * (len(shape) - 1))
    return {f"{name}.w": w, f"{name}.b": rng.normal(0, 0.1, shape[0]).astype(np.float32)}


def _chain(rng, between: list[str], depthwise: bool = False, activation_nodes=None, extra=None) -> onnx.ModelProto:
    """x -> conv1 -> [between] -> conv2 (depthwise when asked) -> [Relu] -> conv3 -> y."""
    nodes, inits = [_conv("c1", "x", "a0")], _weights(rng, "c1", (8, 3, 3, 3))
    tensor_name = "a0"
    for index, op in enumerate(between):
        out = f"a{index + 1}"
        maker = (activation_nodes or {}).get(op, lambda i, o, op=op: helper.make_node(op, [i], [o]))
        nodes.append(maker(tensor_name, out))
        tensor_name = out
    if depthwise:
        nodes.append(_conv("c2", tensor_name, "b0", group=8))
        inits |= _weights(rng, "c2", (8, 1, 3, 3))
    else:
        nodes.append(_conv("c2", tensor_name, "b0"))
        inits |= _weights(rng, "c2", (8, 8, 3, 3))
    nodes += [helper.make_node("Relu", ["b0"], ["b1"]), _conv("c3", "b1", "y")]
    inits |= _weights(rng, "c3", (4, 8, 3, 3), skew=False) | dict(extra or {})
    return make_model(nodes, [tensor("x", ["N", 3, 12, 12])], [tensor("y", ["N", 4, 12, 12])], inits)


@pytest.mark.parametrize(
    "between, depthwise, pairs",
    [(["Relu"], False, 2), ([], False, 2), (["Relu"], True, 2), ([], True, 2)],
    ids=["relu", "no-activation", "relu-depthwise", "depthwise"],
)
def test_cle_is_exact_and_equalizes(rng, between, depthwise, pairs):
    model = _chain(rng, between, depthwise)
    equalized, changed = equalized_copy(model)
    assert changed == pairs
    x = rng.normal(0.3, 1, (4, 3, 12, 12)).astype(np.float32)
    (before,), (after,) = run(model, {"x": x}), run(equalized, {"x": x})
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * float(np.abs(before).max()))
    w_before = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "c1.w"))
    w_after = onnx.numpy_helper.to_array(next(t for t in equalized.graph.initializer if t.name == "c1.w"))
    spread = lambda w: np.abs(w).reshape(len(w), -1).max(1).max() / np.abs(w).reshape(len(w), -1).max(1).min()  # noqa: E731
    assert spread(w_after) < spread(w_before) / 3  # the channels' ranges moved together


def test_cle_grouped_conv_exact(rng):
    """A grouped (group=2) second Conv: input channel c is column c % 4 of the rows of its group."""
    nodes = [_conv("c1", "x", "a"), helper.make_node("Relu", ["a"], ["r"]), _conv("c2", "r", "y", group=2)]
    inits = _weights(rng, "c1", (8, 3, 3, 3)) | _weights(rng, "c2", (6, 4, 3, 3), skew=False)
    model = make_model(nodes, [tensor("x", ["N", 3, 10, 10])], [tensor("y", ["N", 6, 10, 10])], inits)
    equalized, changed = equalized_copy(model)
    assert changed == 1
    x = rng.normal(0, 1, (2, 3, 10, 10)).astype(np.float32)
    (before,), (after,) = run(model, {"x": x}), run(equalized, {"x": x})
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * float(np.abs(before).max()))


@pytest.mark.parametrize("activation", ["Clip", "PRelu", "LeakyRelu", "Sigmoid"])
def test_cle_refuses_non_homogeneous_activations(rng, activation):
    """ReLU6 (Clip), PRelu, LeakyRelu ... between the Convs: rescaling would change the model, so no pair."""
    makers = {
        "Clip": lambda i, o: helper.make_node("Clip", [i, "lo", "hi"], [o]),
        "PRelu": lambda i, o: helper.make_node("PRelu", [i, "slope"], [o]),
    }
    extra = {"lo": np.float32(0), "hi": np.float32(6), "slope": np.full((8, 1, 1), 0.1, np.float32)}
    model = _chain(rng, [activation], activation_nodes=makers, extra=extra)
    pairs = equalization_pairs(model)
    assert all(p.first.name != "c1" for p in pairs)  # c1 -> act -> c2 refused; c2 -> Relu -> c3 still fine
    assert [p.first.name for p in pairs] == ["c2"]


def test_cle_refuses_shared_intermediate(rng):
    """A Conv output read twice (or a graph output) cannot be rescaled without changing the other reader."""
    nodes = [_conv("c1", "x", "a"), _conv("c2", "a", "y"), helper.make_node("Relu", ["a"], ["z"])]
    inits = _weights(rng, "c1", (8, 3, 3, 3)) | _weights(rng, "c2", (4, 8, 3, 3))
    model = make_model(
        nodes, [tensor("x", ["N", 3, 8, 8])], [tensor("y", ["N", 4, 8, 8]), tensor("z", ["N", 8, 8, 8])], inits
    )
    assert equalization_pairs(model) == []


# --- bias correction ----------------------------------------------------------------------------------------


def _two_layers(rng: np.random.Generator) -> onnx.ModelProto:
    """x -> Conv (no bias) -> Relu -> Flatten -> Gemm (bias, transB) -> y."""
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["y"], transB=1),
    ]
    inits = {
        "cw": rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32),
        "gw": rng.normal(0, 0.1, (5, 4 * 6 * 6)).astype(np.float32),
        "gb": rng.normal(0, 0.1, 5).astype(np.float32),
    }
    return make_model(nodes, [tensor("x", ["N", 3, 6, 6])], [tensor("y", ["N", 5])], inits)


def test_a_table_carries_bias_shifts_exactly_and_the_model_gets_them(rng, tmp_path):
    """Bias shifts (auto's bias correction) round-trip bit for bit through both table formats, and the model the
    table rebuilds computes each layer's output minus its shift: a Conv without a bias gets one."""
    from espquant.graph import BiasShift, shift_biases
    from espquant.table import shifts_metadata

    model = _two_layers(rng)
    shifts = [BiasShift("c", rng.normal(0, 0.1, 4)), BiasShift("y", rng.normal(0, 0.1, 5))]
    table = QuantTable({"x": -5}, {"bits": 8, "graph_hash": graph_hash(model), "bias_shifts": shifts_metadata(shifts)})
    x = rng.normal(0, 1, (3, 3, 6, 6)).astype(np.float32)
    for table_format in ("exponents", "legacy"):
        path = tmp_path / f"{table_format}.pickle"
        table.save(path, table_format)
        loaded = QuantTable.load(path)
        for got, want in zip(loaded.bias_shifts, shifts, strict=True):
            assert got.layer == want.layer
            np.testing.assert_array_equal(got.values, want.values)
        rebuilt = loaded.model_for(model)
        assert graph_hash(rebuilt) == graph_hash(shift_biases(model, shifts)) != graph_hash(model)
    shifted_conv = shift_biases(model, shifts[:1])
    exposed = [helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, None)]
    for m in (model, shifted_conv):
        m.graph.output.extend(exposed)
    (y0, c0), (y1, c1) = run(model, {"x": x}), run(shifted_conv, {"x": x})
    np.testing.assert_allclose(c1, c0 - shifts[0].values.reshape(1, -1, 1, 1), atol=1e-6)
    assert y1.shape == y0.shape


@pytest.mark.parametrize(
    "entry",
    [
        {"layer": "c", "values": [float("nan")]},
        {"layer": "c", "values": []},
        {"layer": "c", "values": [1.0], "extra": 1},
        {"layer": 3, "values": [1.0]},
    ],
    ids=["nan", "empty", "unknown-key", "layer-not-a-name"],
)
def test_bad_bias_shifts_are_refused_on_load(tmp_path, entry):
    path = tmp_path / "t.pickle"
    QuantTable({"x": -5}, {"bits": 8, "bias_shifts": [entry]}).save(path)
    with pytest.raises(QuantTableError, match="bias_shifts"):
        QuantTable.load(path)


@pytest.mark.parametrize(
    "entry", [{"layer": "c", "values": [1.0] * 3}, {"layer": "r", "values": [1.0] * 4}], ids=["count", "not-a-layer"]
)
def test_bias_shifts_that_do_not_fit_the_model_are_a_clear_error(rng, entry):
    table = QuantTable({}, {"bits": 8, "bias_shifts": [entry]})
    with pytest.raises(QuantTableError, match="bias shifts do not fit"):
        table.model_for(_two_layers(rng))


def test_bias_correction_reduces_output_mean_error(rng):
    """x (mean 1) -> Conv -> Relu -> Conv: weight rounding shifts each output channel's mean; the corrected
    biases take that shift out of the simulated chip's outputs."""
    nodes = [_conv("c1", "x", "a"), helper.make_node("Relu", ["a"], ["r"]), _conv("c2", "r", "y")]
    inits = _weights(rng, "c1", (16, 3, 3, 3)) | _weights(rng, "c2", (8, 16, 3, 3))
    model = make_model(nodes, [tensor("x", ["N", 3, 16, 16])], [tensor("y", ["N", 8, 16, 16])], inits)
    x = rng.normal(1.0, 0.5, (96, 3, 16, 16)).astype(np.float32)

    def mean_error(result) -> float:
        quantized = build_quantized_model(result.model, result.table, get_target("esp32s3"), 8)
        (simulated,), _ = simulate(quantized, result.model, x, to_float=True)
        (reference,) = run(model, {"x": x})
        return float(np.abs((simulated - reference).mean(axis=(0, 2, 3))).mean())

    plain = calibrate_model(model, x, 8, "per-tensor", "minmax", bias_correction=False)
    corrected = calibrate_model(model, x, 8, "per-tensor", "minmax", bias_correction=True)
    assert corrected.transforms == ["bias_correction"] and plain.transforms == []
    assert corrected.table.metadata["graph_hash"] == graph_hash(corrected.model) != graph_hash(model)
    assert mean_error(corrected) < 0.5 * mean_error(plain)


# --- legacy API and CLI --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile", "mse"])
def test_legacy_named_methods_unchanged(demo, method):
    """Named methods keep their meaning: no CLE, no bias correction, the table is for the input model."""
    model, calib, _ = demo
    result = Calibrator("int8", "per-tensor", method).calibrate(model, calib[:64])
    assert result.transforms == [] and result.model is model or graph_hash(result.model) == graph_hash(model)
    assert result.table.metadata["graph_hash"] == graph_hash(model)
    assert result.table.metadata["method"] == method


def test_legacy_accepts_auto(demo, tmp_path):
    model, calib, _ = demo
    table = Calibrator("int8", "per-channel", "auto").generate_quantization_table(
        model, calib[:64], tmp_path / "t.pickle"
    )
    assert table.metadata["method"] == "auto"
    assert "cle" not in table.metadata["model_transforms"]  # per-channel: CLE is off by default


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def cli_files(demo, tmp_path_factory):
    model, calib, test = demo
    folder = tmp_path_factory.mktemp("auto_cli")
    onnx.save(model, folder / "m.onnx")
    np.save(folder / "x.npy", calib[:64])
    np.save(folder / "t.npy", test[:100])
    return folder


@pytest.mark.parametrize("args", [[], ["--method", "auto"]], ids=["default", "method-auto"])
def test_cli_calibrate_auto_then_evaluate_and_export_the_same_model(cli_files, args):
    """The default (auto) keeps the float weights: the five CLI steps run on one model file."""
    folder = cli_files
    name = "default" if not args else "auto"
    result = _cli("calibrate", folder / "m.onnx", "--data", folder / "x.npy", "-o", folder / f"{name}.pickle", *args)
    assert result.exit_code == 0, result.output
    table = QuantTable.load(folder / f"{name}.pickle")
    assert table.metadata["method"] == "auto" and not (folder / f"{name}_model.onnx").exists()
    evaluated = _cli("evaluate", folder / "m.onnx", "--table", folder / f"{name}.pickle", "--data", folder / "t.npy")
    assert evaluated.exit_code == 0, evaluated.output
    exported = _cli(
        "export", folder / "m.onnx", "--table", folder / f"{name}.pickle", "--target", "esp32s3",
        "-o", folder / f"{name}.espdl",
    )  # fmt: skip
    assert exported.exit_code == 0, exported.output


def test_cli_cle_and_bias_correction_write_the_model_the_table_is_for(cli_files):
    folder = cli_files
    args = ["--cle", "--bias-correction"]
    result = _cli("calibrate", folder / "m.onnx", "--data", folder / "x.npy", "-o", folder / "eq.pickle", *args)
    assert result.exit_code == 0, result.output
    table = QuantTable.load(folder / "eq.pickle")
    written = folder / "eq_model.onnx"
    assert written.is_file() and table.metadata["calibrated_model"] == written.name
    assert table.metadata["graph_hash"] == graph_hash(onnx.load(written))
    evaluated = _cli("evaluate", written, "--table", folder / "eq.pickle", "--data", folder / "t.npy")
    assert evaluated.exit_code == 0, evaluated.output
    table = folder / "eq.pickle"
    exported = _cli("export", written, "--table", table, "--target", "esp32s3", "-o", folder / "eq.espdl")
    assert exported.exit_code == 0, exported.output
    wrong = _cli("evaluate", folder / "m.onnx", "--table", folder / "eq.pickle", "--data", folder / "t.npy")
    assert wrong.exit_code != 0 and "_model.onnx" in wrong.output


def test_cli_no_cle_minmax_keeps_model(cli_files):
    folder = cli_files
    result = _cli(
        "calibrate", folder / "m.onnx", "--data", folder / "x.npy", "-o", folder / "mm.pickle", "--method", "minmax"
    )
    assert result.exit_code == 0, result.output
    assert not (folder / "mm_model.onnx").exists()
    result = _cli("calibrate", folder / "m.onnx", "--data", folder / "x.npy", "-o", folder / "nc.pickle", "--no-cle")
    assert result.exit_code == 0, result.output
    assert "cle" not in QuantTable.load(folder / "nc.pickle").metadata["model_transforms"]


@pytest.mark.parametrize(("joined", "batched"), [("channels", True), ("batch", False)])
def test_auto_searches_every_kept_sample_of_a_batch_one_model_the_simulator_batches(rng, joined, batched):
    """A model that fixes its batch to 1 is searched on all 32 kept samples when the simulator runs it many
    samples per call (small, every node on its own sample), and on 8 when it must run them one by one (here a
    Concat on the batch axis): the search costs about the same either way."""
    from espquant.calibration.auto import SEARCH_SAMPLES
    from espquant.calibration.engine import FIXED_BATCH_SEARCH_SAMPLES

    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Concat", ["r", "r"], ["y"], axis=1 if joined == "channels" else 0),
    ]
    inits = {"w": rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "b": np.zeros(4, np.float32)}
    shape = [1, 8, 6, 6] if joined == "channels" else [2, 4, 6, 6]
    model = optimize_model(make_model(nodes, [tensor("x", [1, 3, 6, 6])], [tensor("y", shape)], inits))
    data = rng.normal(0, 1, (48, 3, 6, 6)).astype(np.float32)
    result = calibrate_model(model, data, 8, "per-tensor", "auto")
    expected = SEARCH_SAMPLES if batched else FIXED_BATCH_SEARCH_SAMPLES
    assert FIXED_BATCH_SEARCH_SAMPLES < SEARCH_SAMPLES < len(data)
    assert result.table.metadata["auto"]["search_samples"] == expected


def test_small_inputs_are_searched_on_more_samples_and_keep_their_validation_samples(rng):
    """The search takes as many samples as hold ``SEARCH_VALUES`` input values (at least ``SEARCH_SAMPLES``, at
    most ``MAX_SEARCH_SAMPLES``); with a small calibration set the ``VALIDATION_SAMPLES`` after them stay apart."""
    from espquant.calibration.auto import (
        MAX_SEARCH_SAMPLES,
        SEARCH_SAMPLES,
        SEARCH_VALUES,
        VALIDATION_SAMPLES,
        search_sample_count,
    )

    assert search_sample_count(1) == MAX_SEARCH_SAMPLES
    assert search_sample_count(SEARCH_VALUES // 100) == 100
    assert search_sample_count(3 * 224 * 224) == SEARCH_SAMPLES
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    inits = {"w": rng.normal(0, 0.3, (16, 8)).astype(np.float32), "b": np.zeros(8, np.float32)}
    model = make_model(nodes, [tensor("x", ["N", 16])], [tensor("y", ["N", 8])], inits)
    for size, searched in ((400, MAX_SEARCH_SAMPLES), (150, 150 - VALIDATION_SAMPLES), (80, SEARCH_SAMPLES)):
        data = rng.normal(0, 1, (size, 16)).astype(np.float32)
        result = calibrate_model(model, data, 8, "per-tensor", "auto")
        assert result.table.metadata["auto"]["search_samples"] == searched, size
    batches = [rng.normal(0, 1, (10, 16)).astype(np.float32) for _ in range(40)]  # streamed: kept across batches
    result = calibrate_model(model, iter(batches), 8, "per-tensor", "auto")
    assert result.table.metadata["auto"]["search_samples"] == MAX_SEARCH_SAMPLES and result.samples == 400


def _softmax_classifier(rng: np.random.Generator) -> tuple[onnx.ModelProto, np.ndarray]:
    """x -> Gemm -> logits -> Softmax -> float probabilities; one sample in 20 is four times larger (confident:
    logits far out, probabilities saturated at 1 whatever their step)."""
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    inits = {"w": rng.normal(0, 0.6, (10, 16)).astype(np.float32), "b": np.zeros(10, np.float32)}
    model = make_model(nodes, [tensor("x", ["N", 16])], [tensor("probs", ["N", 10])], inits)
    x = rng.normal(0, 1, (600, 16)).astype(np.float32)
    x[::20] *= 4
    return model, x


def test_a_float_softmax_output_walks_its_logits():
    """The chip's Softmax turns int8 logits into float probabilities: their resolution is the logits' step, so the
    output's head is the logits. auto clips the confident samples' far logits (their probabilities stay 1) for a
    finer step where the uncertain ones are, as ESP-PPQ's table for a trained MNIST MLP does (39.1 dB there against
    36.4 dB at the min-max step)."""
    model, x = _softmax_classifier(np.random.default_rng(0))
    assert output_heads(model, ["probs"], {"logits"}) == {"probs": ["logits"]}
    calib, test = x[:400], x[400:]
    reference = run(model, {"x": test})[0]
    errors, exponents = {}, {}
    for method in ("minmax", "auto"):
        table = calibrate_model(model, calib, 8, "per-tensor", method).table
        quantized = build_quantized_model(model, table, get_target("esp32s3"), 8)
        errors[method] = float(np.mean(np.abs(simulate(quantized, model, test, to_float=True)[0][0] - reference)))
        exponents[method] = table.exponents["logits"]
    assert exponents["auto"] < exponents["minmax"] and errors["auto"] < 0.8 * errors["minmax"]


# --- what the search holds --------------------------------------------------------------------------------


def test_the_float_reference_of_a_free_batch_runs_in_parts_with_the_values_of_one_run(demo, monkeypatch):
    """``float_reference`` runs a free batch a few samples at a time (``REFERENCE_RUN_VALUES`` input values) into
    one array per tensor: the values of one run, without onnxruntime's and numpy's copies of every activation of
    every sample at once. A tensor without the samples first (a shape computed in the graph) takes one run."""
    model, calib, _ = demo
    x = {model.graph.input[0].name: calib[:10]}
    names = [n.output[0] for n in model.graph.node]
    whole = auto_module.float_reference(model, names, x, ["CPUExecutionProvider"], 1)
    runs = []
    real = auto_module.create_session

    class Counted:
        def __init__(self, session):
            self.session = session

        def run(self, fetched, feeds):
            runs.append(len(next(iter(feeds.values()))))
            return self.session.run(fetched, feeds)

    monkeypatch.setattr(auto_module, "create_session", lambda *args, **kwargs: Counted(real(*args, **kwargs)))
    monkeypatch.setattr(auto_module, "REFERENCE_RUN_VALUES", 3 * 784)  # 3 digits a run
    parts = auto_module.float_reference(model, names, x, ["CPUExecutionProvider"], 1)
    assert runs == [3, 3, 3, 1]
    assert parts.keys() == whole.keys() and all(np.array_equal(parts[k], whole[k]) for k in whole)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    runs.clear()
    parts = auto_module.float_reference(fixed, names, x, ["CPUExecutionProvider"], 1)
    assert runs == [2] * 5  # a fixed batch: runs of B, whatever REFERENCE_RUN_VALUES says
    assert all(np.array_equal(parts[k], whole[k]) for k in whole)

    no_batch = onnx.ModelProto()
    no_batch.CopyFrom(model)
    shape = helper.make_node("Shape", [names[0]], ["shape_of"])
    no_batch.graph.node.append(helper.make_node("Cast", ["shape_of"], ["shape_f"], to=onnx.TensorProto.FLOAT))
    no_batch.graph.node.insert(len(no_batch.graph.node) - 1, shape)
    runs.clear()
    values = auto_module.float_reference(no_batch, [*names, "shape_f"], x, ["CPUExecutionProvider"], 1)
    assert values["shape_f"].shape == (4,) and np.array_equal(values[names[-1]], whole[names[-1]])
    assert runs == [3, 10]  # the first part showed a tensor without the samples first: one run of all


def test_the_equalized_reference_is_the_plain_one_rescaled(rng):
    """The equalized family's float values are the plain model's divided per channel (``_Rescaled``), made when
    read instead of kept as a second copy: they match a float run of the equalized model to float32 rounding."""
    model = _chain(rng, ["Relu"])
    x = {"x": rng.normal(0.3, 1, (6, 3, 12, 12)).astype(np.float32)}
    equalization = equalization_factors(model)
    assert equalization.divisors
    names = list(equalization.divisors)
    plain = auto_module.float_reference(model, names, x, ["CPUExecutionProvider"], 1)
    equalized = scale_initializers(model, equalization.factors)
    direct = auto_module.float_reference(equalized, names, x, ["CPUExecutionProvider"], 1)
    rescaled = auto_module._Rescaled(plain, equalization.divisors)
    assert set(rescaled) == set(names)
    for name in names:
        assert rescaled[name].dtype == np.float32
        np.testing.assert_allclose(
            rescaled[name], direct[name], rtol=1e-5, atol=1e-6 * float(np.abs(direct[name]).max())
        )


def test_the_search_keeps_errors_not_simulated_values(demo, monkeypatch):
    """Every table the search simulates leaves two numbers behind, not its simulated activations (those of 32
    large images in double, per table, filled gigabytes); scoring takes a tensor's difference in place."""
    model, calib, _ = demo
    searches = []

    class Recorded(auto_module._Search):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            searches.append(self)

    monkeypatch.setattr(auto_module, "_Search", Recorded)
    calibrate_model(model, calib[:96], 8, "per-tensor", "auto")
    (search,) = searches
    assert search.cache
    for scores in search.cache.values():
        assert scores is None or (
            isinstance(scores[0], float) and all(isinstance(e, float) for e in scores[1].values())
        )
    simulated = np.random.default_rng(0).normal(size=(4, 5))
    reference = simulated.astype(np.float32) + 0.25
    expected = float(np.mean(np.square(simulated - reference.astype(np.float64)))) / 2.0
    assert auto_module._relative_error(simulated.copy(), reference, 2.0) == pytest.approx(expected, rel=1e-12)
