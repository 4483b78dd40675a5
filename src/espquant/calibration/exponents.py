"""From observed ranges to a consistent set of exponents, following the registry's rules.

Order of application, node by node in topological order:
- weights: one exponent per tensor, or per output channel (granularity per-channel, ops whose registry
  entry gives a channel axis), from the weight method; a per-tensor weight whose exponent is among the
  observed ones takes that one instead (``auto`` chooses a finer step for weights whose channels differ
  widely in range, saturating the largest); biases: ``e_in + e_w`` (per channel when the weight is);
- a Conv/Gemm/MatMul that absorbs its Relu takes the Relu output's exponent;
- pass-through ops (MaxPool, Relu, data movement) give their output the input's exponent; a PRelu
  (``rescaled_output``) keeps a finer observed exponent where it has one (``auto`` chooses it);
- Concat's inputs and output share the largest exponent among them;
- kernels that cannot shift left (Conv, Gemm, MatMul, Mul) get ``e_out >= e_in + e_w``;
- no layer shifts right by more than ``MAX_RIGHT_SHIFT``: the weights of a channel too small to matter get
  a coarser exponent;
- wherever a consumer needs an exponent its producer does not have (Concat, Add/Sub inputs aligned to the
  output, comparisons aligned to the largest input) a RequantizeLinear is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from espquant.calibration.observers import CANDIDATES
from espquant.calibration.plan import CalibrationPlan
from espquant.calibration.precision import equivalent_exponent
from espquant.calibration.recurrent import assign_recurrent_exponents
from espquant.graph import GraphView
from espquant.ops import ExponentRule, OpSpec, Role
from espquant.ops.recurrent import RECURRENT_OPS
from espquant.quant.pot import MAX_RIGHT_SHIFT, exponent_for_max_abs, qmax, qmin

__all__ = ["Requantize", "ExponentAssignment", "assign_exponents", "cover_aligned_inputs", "weight_exponents"]


@dataclass(frozen=True)
class Requantize:
    """A RequantizeLinear the quantized model needs before ``node``'s input ``position``."""

    node: str
    position: int
    tensor: str
    from_exponent: int
    to_exponent: int


@dataclass
class ExponentAssignment:
    exponents: dict[str, int | list[int]]
    requantize: list[Requantize] = field(default_factory=list)


def weight_exponents(
    values: np.ndarray, bits: int, channel_axis: int | None, method: str = "minmax"
) -> int | list[int]:
    """Exponent(s) of a weight: one, or one per slice along ``channel_axis``.

    ``minmax``: the smallest exponent that keeps max |w|. ``mse``: of that one and the ``CANDIDATES``
    finer ones, the exponent whose quantized weights (rounded, saturated as the chip stores them) are
    closest to the float weights in squared error. The weights are all there, so the error is exact. A
    finer step can win when one outlier weight would otherwise coarsen the whole tensor. Ties go to the
    larger exponent."""
    rows = values.reshape(1, -1) if channel_axis is None else np.moveaxis(values, channel_axis, 0)
    rows = rows.reshape(rows.shape[0], -1).astype(np.float64)
    tops = [exponent_for_max_abs(float(m), bits) for m in np.abs(rows).max(axis=1, initial=0.0)]
    if method == "mse":
        tops = [_closest_exponent(row, bits, top) for row, top in zip(rows, tops)]
    return tops[0] if channel_axis is None else tops


def _closest_exponent(row: np.ndarray, bits: int, top: int) -> int:
    candidates = range(top - CANDIDATES, top + 1)
    errors = [
        float(np.sum((row - np.clip(np.round(row * 2.0**-e), qmin(bits), qmax(bits)) * 2.0**e) ** 2))
        for e in candidates
    ]
    best = min(errors)
    return max(e for e, error in zip(candidates, errors) if error <= best)


def _bound_weight_shift(
    node: onnx.NodeProto, spec: OpSpec, exps: dict[str, int | list[int]], weight: str, room: int, input_exp: int
) -> None:
    """Keep the layer's shift ``e_out - e_in - e_w`` at most ``MAX_RIGHT_SHIFT`` (``room = e_out - e_in``).

    A channel of near-zero weights gets a very fine exponent (-28 for weights around 1e-8), and its shift
    would pass what the runtime can apply; raising that channel's exponent to ``room - MAX_RIGHT_SHIFT`` only
    rounds weights that are negligible at the output's step anyway. The bias follows (``e_in + e_w``)."""
    floor = room - MAX_RIGHT_SHIFT
    value = exps[weight]
    clamped = [max(e, floor) for e in value] if isinstance(value, list) else max(value, floor)
    if clamped == value:
        return
    exps[weight] = clamped
    for position in spec.bias_inputs:
        if position < len(node.input) and node.input[position]:
            exps[node.input[position]] = (
                [input_exp + e for e in clamped] if isinstance(clamped, list) else input_exp + clamped
            )


def _largest(value: int | list[int]) -> int:
    return max(value) if isinstance(value, list) else value


def cover_aligned_inputs(
    model: onnx.ModelProto,
    plan: CalibrationPlan,
    observed: dict[str, int],
    own: dict[str, int],
    bits: int,
    widths: dict[str, int] | None = None,
) -> list[str]:
    """Raise the output exponent of every op that reads its inputs at its output's exponent (Add, Sub: ESP-DL
    subtracts the integers as they are, ``dl_base_sub.cpp``) until it holds each input's own range, and give
    the Conv outputs written at that exponent (``plan.range_from``) the raised one. Returns the raised outputs.

    A difference of two large values (a detector's box decoding ``x2 - x1``, a residual block whose branch
    cancels its input) has a smaller range than its inputs: at the output's own exponent the inputs saturate
    before the subtraction and the result is wrong, not just coarse. ``observed`` holds the exponents chosen
    so far (updated in place), ``own`` each input's exponent from its own range where ``observed`` has another
    (the range_from Conv outputs)."""
    widths = widths or {}
    view = GraphView(model.graph)
    width = lambda tensor: widths.get(tensor, bits)  # noqa: E731
    ranges = dict(observed) | own  # a tensor's own exponent, data movement inheriting its input's
    raised = []
    for node, spec in plan.nodes:
        inputs = [t for t in node.input if t]
        outputs = [plan.fused.get(o, o) for o in node.output if o]
        if spec.exponent is ExponentRule.PASSTHROUGH and inputs and inputs[0] in ranges:
            for output in outputs:
                ranges.setdefault(output, equivalent_exponent(ranges[inputs[0]], width(inputs[0]), width(output)))
        if spec.exponent is not ExponentRule.ALIGN_TO_OUTPUT or not outputs or outputs[0] not in observed:
            continue
        output = outputs[0]
        needed = [observed[output]]
        for position, tensor in enumerate(node.input):
            role = spec.input_spec(position)
            if not tensor or role is None or role.role is not Role.ACTIVATION:
                continue
            if view.is_constant(tensor):
                values = np.abs(view.array(tensor).astype(np.float64))
                if values.size and np.isfinite(values).all():
                    needed.append(exponent_for_max_abs(float(values.max()), width(output)))
            elif tensor in ranges:
                needed.append(equivalent_exponent(ranges[tensor], width(tensor), width(output)))
        if max(needed) > observed[output]:
            observed[output] = ranges[output] = max(needed)
            raised.append(output)
    for conv_output, reader_output in plan.range_from.items():
        if reader_output in raised:
            raised_exponent = observed[reader_output]
            observed[conv_output] = equivalent_exponent(raised_exponent, width(reader_output), width(conv_output))
    return raised


def assign_exponents(
    model: onnx.ModelProto,
    plan: CalibrationPlan,
    observed: dict[str, int],
    bits: int,
    per_channel: bool,
    widths: dict[str, int] | None = None,
    weight_method: str = "minmax",
) -> ExponentAssignment:
    """Turn the observed exponents into the table's exponents (see the module docstring for the rules).

    ``widths`` gives the tensors whose width differs from ``bits`` (mixed precision, ``precision.py``): their
    exponents are observed at that width, a layer's weights take its output's width, and members of a
    shared exponent are compared at the output's width."""
    widths = widths or {}
    view = GraphView(model.graph)
    exps: dict[str, int | list[int]] = dict(observed)
    for name in plan.constants:
        exps[name] = weight_exponents(view.array(name), bits, None)
    weights = {(id(w.node), w.position): w for w in plan.weights}
    result = ExponentAssignment(exps)

    def width(tensor: str) -> int:
        return widths.get(tensor, bits)

    def at_width(tensor: str, node_bits: int) -> int | list[int] | None:
        """A tensor's exponent as a layer of width ``node_bits`` reads it (weights are already at it)."""
        value = exps.get(tensor)
        if isinstance(value, int) and tensor not in plan_weights:
            return equivalent_exponent(value, width(tensor), node_bits)
        return value

    plan_weights = {w.tensor for w in plan.weights}

    def need(node: onnx.NodeProto, position: int, tensor: str, target: int) -> None:
        current = exps.get(tensor)
        if isinstance(current, int) and current != target:
            result.requantize.append(Requantize(node.name, position, tensor, current, target))

    for node, spec in plan.nodes:
        weight_exp: int | list[int] | None = None
        weight_tensor = ""
        node_bits = width(plan.fused.get(node.output[0], node.output[0])) if node.output else bits
        for position, tensor in enumerate(node.input):
            use = weights.get((id(node), position))
            if use is not None:
                axis = use.channel_axis if per_channel else None
                chosen = observed.get(tensor)
                if not (axis is None and isinstance(chosen, int)):
                    exps[tensor] = weight_exponents(view.array(tensor), node_bits, axis, weight_method)
                weight_exp, weight_tensor = exps[tensor], tensor
        input_exp = exps.get(node.input[0]) if node.input else None
        if isinstance(input_exp, int):  # read at the layer's width (an int8 input of an int16 layer is widened)
            input_exp = equivalent_exponent(input_exp, width(node.input[0]), node_bits)
        for position, tensor in enumerate(node.input):
            role = spec.input_spec(position)
            if not tensor or role is None:
                continue
            if role.role is Role.BIAS and isinstance(input_exp, int) and weight_exp is not None:
                exps[tensor] = (
                    [input_exp + e for e in weight_exp] if isinstance(weight_exp, list) else input_exp + weight_exp
                )
            elif role.role is Role.QPARAM and isinstance(input_exp, int):
                exps[tensor] = input_exp
        outputs = [o for o in node.output if o and o not in plan.float_tensors]
        if spec.exponent is ExponentRule.PASSTHROUGH and isinstance(input_exp, int):
            for output in outputs:
                own = observed.get(output) if spec.rescaled_output else None
                exps[output] = own if isinstance(own, int) and own <= input_exp else input_exp
        elif spec.exponent is ExponentRule.SHARED:
            members = [t for t in node.input if t and isinstance(exps.get(t), int)]
            member_exps = [equivalent_exponent(exps[t], width(t), node_bits) for t in members]  # type: ignore[arg-type]
            shared = max(member_exps + [exps[o] for o in outputs if o in exps])  # type: ignore[type-var]
            for output in outputs:
                exps[output] = shared
            for position, tensor in enumerate(node.input):
                if tensor:
                    need(node, position, tensor, shared)
        for output in outputs:
            target = plan.fused.get(output, output)
            if target not in exps:
                continue
            value = exps[target]
            if spec.nonnegative_shift and isinstance(value, int):
                operands = [input_exp, *(at_width(t, node_bits) for t in node.input[1:2] if t)] if node.input[0] else []
                if len(operands) == 2 and all(o is not None for o in operands):
                    floor = sum(_largest(o) for o in operands)  # type: ignore[arg-type]
                    value = max(value, floor)
            exps[output] = value
            if target != output:
                exps[target] = value
            if weight_exp is not None and isinstance(input_exp, int) and isinstance(value, int):
                _bound_weight_shift(node, spec, exps, weight_tensor, value - input_exp, input_exp)
        if spec.exponent is ExponentRule.ALIGN_TO_OUTPUT and outputs and isinstance(exps.get(outputs[0]), int):
            for position, tensor in enumerate(node.input):
                if tensor:
                    need(node, position, tensor, exps[outputs[0]])  # type: ignore[arg-type]
        elif spec.exponent is ExponentRule.ALIGN_TO_LARGEST:
            present = [exps[t] for t in node.input if t and isinstance(exps.get(t), int)]
            if present:
                for position, tensor in enumerate(node.input):
                    if tensor:
                        need(node, position, tensor, max(present))  # type: ignore[type-var]
        if node.op_type in RECURRENT_OPS and isinstance(input_exp, int):  # gate exponent, int16 states
            assign_recurrent_exponents(model, node, view, exps, node_bits, input_exp, need, width)
    return result
