"""Registry consistency: every entry carries what the checker, calibrator, simulator and exporters need."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from espquant.ops import REGISTRY, UNREGISTERED_HINTS, ExponentRule, Role, get_op_spec, merged_broadcast_shapes
from espquant.ops.spec import OpSpec
from espquant.simulator.interpreter import simulated_ops

# The op types registered by ESP-DL's runtime (dl_module_creator.hpp at v3.3.9) that a float ONNX model
# can contain; LUT, InsertZeros and StreamingCache are produced by the exporter, not by users.
RUNTIME_OPS = {
    "Add", "AveragePool", "Clip", "Concat", "Conv", "DepthToSpace", "DequantizeLinear", "Div", "Elu", "Equal",
    "Exp", "Flatten", "GRU", "Gather", "Gelu", "Gemm", "GlobalAveragePool", "Greater", "GreaterOrEqual",
    "HardSigmoid", "HardSwish", "Identity", "LSTM", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual",
    "Log", "LogSoftmax", "LpNormalization", "MatMul", "MaxPool", "Mod", "Mul", "Neg", "PRelu", "Pad", "Pow",
    "QuantizeLinear", "RMSNormalization", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu",
    "RequantizeLinear", "Reshape", "Resize", "ReverseSequence", "ScatterND", "Sigmoid", "Slice", "Softmax",
    "SpaceToDepth", "Split", "Sqrt", "Squeeze", "StreamingCache", "Sub", "Swish", "Tanh", "Transpose",
    "Unsqueeze",
}  # fmt: skip


def _exists_at(op_type: str, opset: int) -> bool:
    """Whether ``op_type`` is defined at ``opset`` (HardSwish appears at 14: an entry may not claim 13)."""
    try:
        onnx.defs.get_schema(op_type, opset)
    except onnx.defs.SchemaError:
        return False
    return True


@pytest.mark.parametrize("spec", REGISTRY.values(), ids=list(REGISTRY))
def test_entry_is_complete(spec: OpSpec):
    if spec.onnx_standard:
        assert onnx.defs.has(spec.op_type), f"{spec.op_type} is not an ONNX op"
        assert spec.min_opset <= onnx.defs.onnx_opset_version()
        first = onnx.defs.get_schema(spec.op_type, spec.min_opset).since_version if spec.min_opset else 0
        assert first <= spec.min_opset and _exists_at(spec.op_type, spec.min_opset), spec.op_type
        schema = onnx.defs.get_schema(spec.op_type)
        assert len(spec.inputs) <= max(schema.max_input, 1) or spec.variadic
    assert spec.inputs and spec.inputs[0].role is Role.ACTIVATION
    assert isinstance(spec.exponent, ExponentRule)
    assert spec.spec_ref
    assert spec.bits and spec.bits <= {8, 16}
    assert spec.output_dtype in ("quantized", "float32", "bool")
    if spec.status != "supported":
        assert spec.status_reason, "an unspecified op must say why"
    for position in spec.weight_inputs:
        assert spec.category in ("linear", "activation", "recurrent"), spec.op_type
        assert spec.inputs[position].must_be_constant or spec.inputs[position].may_be_runtime
    if spec.bias_inputs:
        assert spec.weight_inputs, "a bias exponent is e_in + e_w: there must be a weight"
    for constraint in spec.constraints:
        assert constraint.field and callable(constraint.test)
    # The simulator has an integer kernel for every supported entry, and none for what it must refuse.
    assert (spec.op_type in simulated_ops()) == (spec.status == "supported"), spec.op_type


def test_every_runtime_op_is_registered_and_nothing_else_is_unexplained():
    assert set(REGISTRY) >= RUNTIME_OPS
    assert set(REGISTRY) - RUNTIME_OPS == {"ConvTranspose"}  # runs as InsertZeros + Conv
    assert not set(UNREGISTERED_HINTS) & set(REGISTRY)


def test_only_esp_dl_ops_are_non_standard():
    assert {s.op_type for s in REGISTRY.values() if not s.onnx_standard} == {"RequantizeLinear", "StreamingCache"}


def test_quantization_facts_from_the_spec():
    conv, gemm, matmul = get_op_spec("Conv"), get_op_spec("Gemm"), get_op_spec("MatMul")
    assert conv.inputs[1].role is Role.WEIGHT and conv.inputs[1].channel_axis == 0
    assert conv.inputs[2].role is Role.BIAS
    assert get_op_spec("ConvTranspose").inputs[1].channel_axis == 1
    assert gemm.inputs[1].resolve_channel_axis({"transB": 1}) == 0
    assert gemm.inputs[1].resolve_channel_axis({"transB": 0}) == 1
    assert matmul.inputs[1].may_be_runtime and matmul.inputs[1].channel_axis is None
    for op in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        assert get_op_spec(op).fuses == {"Relu"}
        assert get_op_spec(op).nonnegative_shift
    assert get_op_spec("Mul").nonnegative_shift
    assert get_op_spec("Concat").exponent is ExponentRule.SHARED and get_op_spec("Concat").variadic
    for op in ("MaxPool", "Relu", "Reshape", "Flatten", "Transpose", "Slice", "Squeeze", "Gather", "Pad"):
        assert get_op_spec(op).exponent is ExponentRule.PASSTHROUGH, op
    for op in ("Add", "Sub"):
        assert get_op_spec(op).exponent is ExponentRule.ALIGN_TO_OUTPUT
    assert get_op_spec("Greater").output_dtype == "bool"
    assert get_op_spec("Softmax").output_dtype == "float32"
    for op in ("Sigmoid", "Tanh", "HardSwish", "LeakyRelu", "Exp", "Clip"):
        assert get_op_spec(op).int8_lut, op
    assert get_op_spec("Resize").bits == {8}
    assert get_op_spec("Reshape").inputs[1].role is Role.PARAM
    assert get_op_spec("Pad").inputs[2].role is Role.QPARAM
    for spec in REGISTRY.values():  # what espquant does not simulate says why
        assert spec.status == "supported" or spec.status_reason, spec.op_type
    assert get_op_spec("BatchNormalization") is None


# --- ESP-DL's merged broadcasting -------------------------------------------------------------------------


@st.composite
def broadcastable_pairs(draw):
    out = draw(st.lists(st.integers(1, 4), min_size=1, max_size=6))
    a = [d if draw(st.booleans()) else 1 for d in out]
    b = [d if draw(st.booleans()) else 1 for d in out]
    return a[draw(st.integers(0, len(a))) :], b[draw(st.integers(0, len(b))) :]


@settings(max_examples=300, deadline=None)
@given(broadcastable_pairs())
def test_merged_broadcast_is_numpy_broadcasting(pair):
    a_shape, b_shape = pair
    rng = np.random.default_rng(0)
    a = rng.integers(-5, 5, a_shape)
    b = rng.integers(-5, 5, b_shape)
    merged_a, merged_b, merged_out = merged_broadcast_shapes(a_shape, b_shape)
    assert len(merged_a) == len(merged_b) == len(merged_out)
    expected = (a + b).reshape(merged_out)
    np.testing.assert_array_equal(a.reshape(merged_a) + b.reshape(merged_b), expected)


def test_merged_broadcast_examples_from_the_spec():
    assert merged_broadcast_shapes([1, 96, 5, 1], [1, 96, 5, 49])[2] == [480, 49]
    assert merged_broadcast_shapes([1, 1, 4, 5], [2, 3, 1, 1]) == ([1, 20], [6, 1], [6, 20])
    assert merged_broadcast_shapes([48], [1]) == ([48], [1], [48])
    assert len(merged_broadcast_shapes([2, 1, 3, 1, 5], [1, 4, 1, 6, 1])[2]) == 5


@pytest.mark.parametrize("op_type", sorted(k for k, v in REGISTRY.items() if v.status == "supported"))
def test_every_backend_takes_what_the_registry_says(op_type):
    """``check`` says yes exactly when the simulator runs the op and ``export`` can write it; the legacy C++
    writer takes exactly the ops the registry marks as legacy layers. A new backend entry or a new registry
    entry without the other fails here."""
    from espquant.export.cpp import _HANDLERS as CPP_WRITERS
    from espquant.export.espdl_export import _EXPORT as ESPDL_WRITERS

    spec = REGISTRY[op_type]
    assert op_type in simulated_ops(), f"{op_type}: accepted by the checker, but the simulator has no kernel"
    if spec.espdl_refusal:
        assert op_type not in ESPDL_WRITERS, f"{op_type}: written to .espdl, but the registry refuses it"
    else:
        assert op_type in ESPDL_WRITERS, f"{op_type}: accepted by the checker, but the .espdl writer lacks it"
    assert (op_type in CPP_WRITERS) == spec.legacy_layer, f"{op_type}: the legacy C++ writer and registry differ"


def test_imports_flow_one_way():
    """Format and arithmetic at the bottom, engines above, facades and CLI on top: no module imports a layer
    above its own (lazy imports inside functions included)."""
    import ast
    from pathlib import Path

    import espquant

    layers = {
        "errors": 0, "files": 0, "_version": 0, "progress": 0, "arrays": 1,
        "quant": 1, "graph": 1, "model_io": 1, "table": 1, "runtime": 1,
        "espdl": 2, "ops": 2,
        "optimizer": 3, "checker": 3,
        "calibration": 4,
        "simulator": 5,
        # The calibration engine measures candidate tables on the simulated chip (the ``auto`` method): it sits
        # above the simulator, which reads the calibration plan below it.
        "calibration.engine": 5.5, "calibration.auto": 5.5,
        "export": 6, "report": 6,
        "api": 7, "demo": 7, "cli": 8, "__init__": 9, "__main__": 9,
    }  # fmt: skip
    root = Path(espquant.__file__).parent
    wrong = []
    for path in root.rglob("*.py"):
        parts = [p.removesuffix(".py") for p in path.relative_to(root).parts]
        level = layers.get(".".join(parts[:2]), layers[parts[0]])
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith("espquant."):
                    pieces = name.split(".")[1:]
                    target = layers.get(".".join(pieces[:2]), layers.get(pieces[0], -1))
                    if target > level:
                        wrong.append(f"{path.relative_to(root)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_espquant_ops_prints_one_json_document():
    import json

    from click.testing import CliRunner

    from espquant.cli import main

    result = CliRunner().invoke(main, ["ops", "--json"])
    assert result.exit_code == 0
    rows = {row["op_type"]: row for row in json.loads(result.output)}
    assert rows["Conv"]["espdl"] and rows["Conv"]["cpp"] and rows["Gelu"]["int16"] and rows["Equal"]["espdl"]
    assert rows["ConvTranspose"]["espdl"]
    for recurrent in ("GRU", "LSTM"):  # simulated bit for bit and written to .espdl (simulator/recurrent.py)
        row = rows[recurrent]
        assert row["int8"] and row["int16"] and row["simulate"] and row["espdl"] and row["qdq"], row
        assert "gate exponent" in row["notes"]
