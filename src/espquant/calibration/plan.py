"""What a model needs calibrated, read from the operator registry: which activations to observe, which
constants are weights (and along which axis), biases, where a Conv/Gemm/MatMul absorbs its Relu, and where
it takes the range of the op that reads it.

A Conv (Gemm, MatMul) accumulates in a wide register and rounds and saturates once, at its output. When
its only reader is
- a Clip with constant bounds: every value the Conv saturates lies outside the range the Clip keeps, and the
  Clip maps it to the same bound as the exact value. Covering only the kept range loses nothing and leaves
  finer steps inside it: a ReLU6 layer whose Conv output reaches 30 keeps steps of 2^-4 instead of 2^-2 at
  int8, and the Clip runs with e_in = e_out, as in ESP-PPQ's files;
- an Add or Sub, which reads its inputs at its output's exponent: a Conv at its own exponent would be
  requantized to that one by a RequantizeLinear (two roundings, the same saturation, one more node on the
  chip). Writing at the output's exponent directly is one rounding and no extra node.
In both cases the Conv output takes the exponent of its reader's output range (``range_from``). Behind a
Clip it is not observed, which spares calibration the cost of measuring it; behind an Add it is
(``range_observed``): the Add's exponent must hold each input's own range, or the inputs saturate before the
sum (a branch that cancels its input, a difference of two large values:
``exponents.cover_aligned_inputs``). Ops that align their inputs before summing (an Add reading an Add) keep
their own range."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from espquant.errors import UnsupportedModelError
from espquant.graph import GraphView, node_attributes, opset_version
from espquant.ops import ExponentRule, Role, get_op_spec
from espquant.ops.spec import OpSpec

__all__ = ["CalibrationPlan", "WeightUse", "plan_calibration", "QUANTIZED_COPY"]

QUANTIZED_COPY = "__quantized"  # the integer copy of a float32 tensor an integer op reads: ``<tensor>__quantized``


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
    range_from: dict[str, str] = field(default_factory=dict)  # conv-like output -> its reader's output (see above)
    # range_from outputs read by an Add / Sub: measured too, so the Add's exponent can hold them (exponents.py)
    range_observed: list[str] = field(default_factory=list)
    weights: list[WeightUse] = field(default_factory=list)
    constants: list[str] = field(default_factory=list)  # constant operands quantized like activations
    float_tensors: list[str] = field(default_factory=list)  # float32 / bool outputs (Softmax, comparisons)
    fixed: dict[str, int] = field(default_factory=dict)  # exponents the model states (QuantizeLinear scales)
    # A float32 output (Softmax) that an integer op reads: the chip quantizes it once, by a QuantizeLinear the
    # lowering inserts (float tensor -> its integer copy, at the float tensor's observed exponent) ...
    quantized_copies: dict[str, str] = field(default_factory=dict)
    # ... and the nodes that read the copy instead of the float tensor (by identity, as in the model).
    copy_readers: set[int] = field(default_factory=set)

    @property
    def activations(self) -> list[str]:
        """Every activation the quantization table must give an exponent: measured, or taken from a reader."""
        return [*self.observed, *self.range_from]

    def weight_widths(self, widths: dict[str, int], bits: int) -> dict[str, int]:
        """Weight tensor -> the width its layer runs at (``bits`` unless mixed precision widens the layer)."""
        return {use.tensor: widths.get(use.node.output[0], bits) for use in self.weights}


def plan_calibration(model: onnx.ModelProto) -> CalibrationPlan:
    """Build the plan; every op must be in the registry (run the checker first for the reasons)."""
    view = GraphView(model.graph)
    opset = opset_version(model)
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
    swish, gates = _swish_units(view)
    for node in model.graph.node:
        if id(node) in gates:  # the Sigmoid of an x * Sigmoid(x): part of the Swish below
            continue
        node = swish.get(id(node), node)
        spec = get_op_spec(node.op_type)
        assert spec is not None
        nodes.append((node, spec))
        if node.op_type == "QuantizeLinear":
            _fix_from_scale(plan, view, node)
            continue
        if node.op_type == "DequantizeLinear":
            _check_dequantized_readers(view, node, spec)
        attrs = node_attributes(node, opset)
        for position, tensor in enumerate(node.input):
            role = spec.input_spec(position)
            if not tensor or role is None or not view.is_constant(tensor):
                continue
            if role.role is Role.WEIGHT:
                plan.weights.append(WeightUse(node, position, tensor, role.resolve_channel_axis(attrs)))
            elif role.role is Role.ACTIVATION and tensor not in plan.constants:
                plan.constants.append(tensor)
        # Float edges (Softmax outputs) stay float through pass-through ops (a Reshape after a Softmax) unless
        # an integer op reads them further on (then the pass-through op moves the quantized copy).
        float_input = (
            spec.exponent is ExponentRule.PASSTHROUGH
            and bool(node.input)
            and node.input[0] in plan.float_tensors
            and id(node) not in plan.copy_readers
        )
        for output in node.output:
            if not output:
                continue
            if spec.output_dtype != "quantized" or float_input:
                plan.float_tensors.append(output)
                if spec.output_dtype == "float32" and node.op_type != "DequantizeLinear":
                    _quantize_for_integer_readers(plan, view, output)
                continue
            consumer = view.single_consumer(output)
            if spec.fuses and consumer is not None and consumer.op_type in spec.fuses:
                fused[output] = consumer.output[0]
                observed.append(consumer.output[0])
            elif spec.fuses and consumer is not None and _reads_in_range(view, consumer, output):
                plan.range_from[output] = consumer.output[0]
                if consumer.op_type != "Clip":  # an Add / Sub: its inputs must fit its exponent
                    plan.range_observed.append(output)
            elif spec.exponent is not ExponentRule.PASSTHROUGH:
                observed.append(output)
    # Only a reader whose own output is measured can lend its range (not a float or fixed-exponent output).
    plan.range_from = {p: r for p, r in plan.range_from.items() if r in observed}
    plan.range_observed = [t for t in plan.range_observed if t in plan.range_from]
    return plan


def _swish_units(view: GraphView) -> tuple[dict[int, onnx.NodeProto], set[int]]:
    """``x * Sigmoid(x)`` (SiLU: YOLO, EfficientNet; ONNX has Swish only from opset 24) computed as the chip's
    one Swish module: an int8 table from ``x``'s exponent to the product's, or the module's float32 at int16,
    as ESP-PPQ's files do. Two nodes would round the gate to int8 and the product again. The float model keeps
    its two nodes; the plan lists one Swish node (the Mul's name and output) in the Mul's place, and skips the
    Sigmoid, whose output must be read by that Mul alone. Returns ``{id(Mul): Swish}`` and the Sigmoids' ids."""
    swish: dict[int, onnx.NodeProto] = {}
    gates: set[int] = set()
    for node in view.graph.node:
        if node.op_type != "Mul" or len(node.input) != 2 or node.input[0] == node.input[1]:
            continue
        for x, gate_output in (tuple(node.input), tuple(reversed(node.input))):
            gate = view.producer.get(gate_output)
            if (
                gate is not None
                and gate.op_type == "Sigmoid"
                and gate.input[0] == x
                and view.single_consumer(gate_output) is node
                and gate_output not in view.graph_outputs
            ):
                swish[id(node)] = helper.make_node("Swish", [x], list(node.output), name=node.name)
                gates.add(id(gate))
                break
    return swish, gates


def _quantize_for_integer_readers(plan: CalibrationPlan, view: GraphView, tensor: str) -> None:
    """Give the float32 ``tensor`` an integer copy when an integer op reads it, directly or through data
    movement (PP-OCR's recognizer: attention scores Softmax -> Reshape -> MatMul), as ESP-PPQ's files do with a
    QuantizeLinear after the Softmax. The copy's exponent is the float tensor's own (observed on the data);
    readers whose data movement only reaches graph outputs or QuantizeLinear nodes keep reading floats."""
    readers = [r for r in view.consumers.get(tensor, []) if _needs_integers(view, r, tensor)]
    if not readers:
        return
    plan.quantized_copies[tensor] = tensor + QUANTIZED_COPY
    plan.copy_readers.update(id(r) for r in readers)
    plan.observed.append(tensor)


def _needs_integers(view: GraphView, reader: onnx.NodeProto, tensor: str) -> bool:
    """Whether ``reader`` of a float tensor needs it as integers: any op but QuantizeLinear and data movement
    (its first input) whose outputs no integer op reads further on."""
    if reader.op_type == "QuantizeLinear":
        return False
    spec = get_op_spec(reader.op_type)
    if spec is None or spec.exponent is not ExponentRule.PASSTHROUGH or not reader.input or reader.input[0] != tensor:
        return True
    return any(_needs_integers(view, r, out) for out in reader.output if out for r in view.consumers.get(out, []))


def _reads_in_range(view: GraphView, node: onnx.NodeProto, tensor: str) -> bool:
    """``node`` needs ``tensor`` only within the range of its own output: a Clip of ``tensor`` with constant
    (or absent) bounds, or an op that reads its inputs at its output's exponent (Add, Sub)."""
    spec = get_op_spec(node.op_type)
    if spec is not None and spec.exponent is ExponentRule.ALIGN_TO_OUTPUT:
        return True
    return node.op_type == "Clip" and node.input[0] == tensor and view.clamp_bounds(node) is not None


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
