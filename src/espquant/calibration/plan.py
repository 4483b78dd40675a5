"""What a model needs calibrated, read from the operator registry: which activations to observe, which
constants are weights (and along which axis), biases, and where a Conv/Gemm/MatMul absorbs its Relu."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from espquant.errors import UnsupportedModelError
from espquant.graph import GraphView
from espquant.ops import ExponentRule, Role, get_op_spec
from espquant.ops.spec import OpSpec

__all__ = ["CalibrationPlan", "WeightUse", "plan_calibration"]


@dataclass(frozen=True)
class WeightUse:
    """A constant weight read by ``node`` at input ``position``; ``channel_axis`` None: per tensor only."""

    node: onnx.NodeProto
    position: int
    tensor: str
    channel_axis: int | None


@dataclass
class CalibrationPlan:
    """The calibration work for one model, in topological order."""

    nodes: list[tuple[onnx.NodeProto, OpSpec]]
    observed: list[str]  # activations whose range is measured on the data
    fused: dict[str, str]  # producer output -> the Relu output whose exponent it takes
    weights: list[WeightUse] = field(default_factory=list)
    constants: list[str] = field(default_factory=list)  # constant operands quantized like activations
    float_tensors: list[str] = field(default_factory=list)  # float32 / bool outputs (Softmax, comparisons)
    fixed: dict[str, int] = field(default_factory=dict)  # exponents the model states (QuantizeLinear scales)


def plan_calibration(model: onnx.ModelProto) -> CalibrationPlan:
    """Build the plan; every op must be in the registry (run the checker first for the reasons)."""
    view = GraphView(model.graph)
    nodes: list[tuple[onnx.NodeProto, OpSpec]] = []
    observed: list[str] = [i.name for i in model.graph.input if i.name in view.graph_inputs]
    fused: dict[str, str] = {}
    plan = CalibrationPlan(nodes, observed, fused)
    unknown = sorted({n.op_type for n in model.graph.node if get_op_spec(n.op_type) is None})
    if unknown:
        raise UnsupportedModelError(
            f"cannot calibrate op type(s) ESP-DL does not run: {', '.join(unknown)}; run `espquant check` for details."
        )
    # A graph input read only by QuantizeLinear nodes reaches the chip as float: the Q node quantizes it once.
    for name in list(observed):
        readers = view.consumers.get(name, [])
        if readers and all(r.op_type == "QuantizeLinear" and r.input[0] == name for r in readers):
            observed.remove(name)
            plan.float_tensors.append(name)
    for node in model.graph.node:
        spec = get_op_spec(node.op_type)
        assert spec is not None
        nodes.append((node, spec))
        if node.op_type == "QuantizeLinear":
            _fix_from_scale(plan, view, node)
            continue
        if node.op_type == "DequantizeLinear":
            _check_dequantized_readers(view, node, spec)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for position, tensor in enumerate(node.input):
            role = spec.input_spec(position)
            if not tensor or role is None or not view.is_constant(tensor):
                continue
            if role.role is Role.WEIGHT:
                plan.weights.append(WeightUse(node, position, tensor, role.resolve_channel_axis(attrs)))
            elif role.role is Role.ACTIVATION and tensor not in plan.constants:
                plan.constants.append(tensor)
        # Float edges (Softmax outputs) stay float through pass-through ops (a Reshape after a Softmax).
        float_input = (
            spec.exponent is ExponentRule.PASSTHROUGH and bool(node.input) and node.input[0] in plan.float_tensors
        )
        for output in node.output:
            if not output:
                continue
            if spec.output_dtype != "quantized" or float_input:
                plan.float_tensors.append(output)
                continue
            consumer = view.single_consumer(output)
            if spec.fuses and consumer is not None and consumer.op_type in spec.fuses:
                fused[output] = consumer.output[0]
                observed.append(consumer.output[0])
            elif spec.exponent is not ExponentRule.PASSTHROUGH:
                observed.append(output)
    return plan


def _fix_from_scale(plan: CalibrationPlan, view: GraphView, node: onnx.NodeProto) -> None:
    """A QuantizeLinear's output exponent is its power-of-two scale (the checker refuses any other scale)."""
    scale = view.array(node.input[1]) if len(node.input) > 1 and view.is_constant(node.input[1]) else None
    values = None if scale is None else np.unique(scale.astype(np.float64))
    if values is None or values.size != 1 or not (values[0] > 0 and np.log2(values[0]).is_integer()):
        raise UnsupportedModelError(
            f"QuantizeLinear {node.name or node.output[0]!r}: its scale must be one constant power of two; "
            "run `espquant check` for details."
        )
    plan.fixed[node.output[0]] = int(np.log2(values[0]))


def _check_dequantized_readers(view: GraphView, node: onnx.NodeProto, spec: OpSpec) -> None:
    """DequantizeLinear gives float32 on the chip: only data movement, QuantizeLinear or a graph output may
    read it (a Conv reading floats cannot run)."""
    pending = [node.output[0]]
    while pending:
        tensor = pending.pop()
        for reader in view.consumers.get(tensor, []):
            reader_spec = get_op_spec(reader.op_type)
            if reader.op_type == "QuantizeLinear":
                continue
            if (
                reader_spec is not None
                and reader_spec.exponent is ExponentRule.PASSTHROUGH
                and reader.input[0] == tensor
            ):
                pending.extend(o for o in reader.output if o)
                continue
            raise UnsupportedModelError(
                f"DequantizeLinear {node.name or node.output[0]!r} gives float32 on the chip, but "
                f"{reader.op_type} {reader.name or reader.output[0]!r} needs quantized input; remove the "
                "QuantizeLinear/DequantizeLinear pairs (espquant calibrates the float model itself) or keep "
                "DequantizeLinear only before the model's outputs."
            )
