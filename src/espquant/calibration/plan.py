"""What a model needs calibrated, read from the operator registry: which activations to observe, which
constants are weights (and along which axis), biases, and where a Conv/Gemm/MatMul absorbs its Relu."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    for node in model.graph.node:
        spec = get_op_spec(node.op_type)
        assert spec is not None
        nodes.append((node, spec))
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
