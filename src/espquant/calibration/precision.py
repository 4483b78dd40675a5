"""Mixed precision: which tensors are int16 in an int8 model.

ESP-DL v3 runs each layer at its own width (``quant_type`` S8 or S16 per node) and converts between widths
with RequantizeLinear. A table lists its int16 layers by their output tensors (metadata ``int16_layers``);
the widths of everything else follow from the graph:

- an int16 layer's output is int16 (for a Conv / Gemm that absorbs its Relu: the Relu output);
- a Clip whose Conv takes its range (``plan.range_from``: a ReLU6 after a Conv) has the Conv's width: it is
  that layer's activation, and an int8 Clip would round the int16 Conv back to int8 at once;
- pass-through ops (data movement, MaxPool, Relu at the same exponent) keep their input's width, so a
  reshape does not cost a conversion;
- ops whose inputs share one exponent (Concat) take the widest member's width;
- everything else has the table's base width.

A layer reads its activation inputs at its own width: where a producer has the other width the quantized
model converts it with a RequantizeLinear (int8 -> int16 widens losslessly, ``e16 = e8 - 8``).

An int16 model is mixed the other way round when an op has no int16 kernel on the chip (ESP-DL's int16
Resize is an empty function; ``checker.runs_at``): that node computes at int8 (its output exponent is
calibrated at int8), pass-through ops after it stay int8, a Concat is int8 only when all its inputs are, and
everything else is int16. The rule reads only the graph and the registry, so calibration, the simulator and
the exporters derive the same widths from the same table; the table also lists them (``int8_fallback``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import onnx

from espquant.calibration.plan import CalibrationPlan
from espquant.checker import FALLBACK_BITS, runs_at
from espquant.errors import QuantTableError
from espquant.ops import ExponentRule
from espquant.ops.activations import SOFTMAX_FAMILY, int8_softmax_overflows

__all__ = [
    "WIDEN",
    "Fallback",
    "int8_fallbacks",
    "overflowing_softmax",
    "resolve_int16_layers",
    "tensor_widths",
    "equivalent_exponent",
]

WIDEN = 8  # int8 -> int16 keeps the range when the exponent drops by 8 bits


def equivalent_exponent(exponent: int, from_bits: int, to_bits: int) -> int:
    """The exponent that keeps a tensor's range when its width changes (int8 e <-> int16 e - 8)."""
    return exponent - (to_bits - from_bits)


def resolve_int16_layers(plan: CalibrationPlan, names: Iterable[str]) -> list[str]:
    """Output tensors of the layers named by node name or by (any) output tensor, fused Relu resolved; a graph
    input may be named too (the chip then quantizes the input to int16)."""
    by_node = {node.name: node for node, _ in plan.nodes if node.name}
    outputs = {o for node, _ in plan.nodes for o in node.output if o} | set(plan.observed)  # graph inputs too
    resolved = []
    for name in names:
        if name in by_node:
            tensor = by_node[name].output[0]
        elif name in outputs:
            tensor = name
        else:
            raise QuantTableError(f"int16 layer {name!r}: no node or tensor of that name in the model.")
        resolved.append(plan.fused.get(tensor, tensor))
    return sorted(set(resolved))


@dataclass(frozen=True)
class Fallback:
    """A node of an int16 model that runs at int8 because the chip has no int16 kernel for its op."""

    node: str
    op_type: str
    tensor: str  # its output, whose exponent is an int8 one

    def __str__(self) -> str:
        return (
            f"node {self.node!r} ({self.op_type}) runs at int{FALLBACK_BITS}: ESP-DL has no int16 {self.op_type} "
            "kernel (RequantizeLinear converts where its neighbours are int16)"
        )


def int8_fallbacks(plan: CalibrationPlan, base: int) -> list[Fallback]:
    """The nodes of a ``base``-bit model that compute at int8 for want of a kernel at ``base`` (module docstring)."""
    return [
        Fallback(node.name or node.output[0], node.op_type, plan.fused.get(node.output[0], node.output[0]))
        for node, spec in plan.nodes
        if node.output and runs_at(spec, base) not in (base, None)
    ]


def _int8_widths(plan: CalibrationPlan) -> dict[str, int]:
    """An int16 model's int8 tensors: the fallback nodes' outputs and what only moves them (module docstring)."""
    narrow = {f.tensor for f in int8_fallbacks(plan, 16)}
    if not narrow:
        return {}
    constants = set(plan.constants)
    for node, spec in plan.nodes:
        outputs = [plan.fused.get(o, o) for o in node.output if o]
        inputs = [t for t in node.input if t]
        members = [t for t in inputs if t not in constants]
        passes_through = spec.exponent is ExponentRule.PASSTHROUGH and bool(inputs) and inputs[0] in narrow
        shares = spec.exponent is ExponentRule.SHARED and bool(members) and all(t in narrow for t in members)
        if passes_through or shares:
            narrow.update(outputs)
    return dict.fromkeys(sorted(narrow - set(plan.float_tensors)), FALLBACK_BITS)


def tensor_widths(model: onnx.ModelProto, plan: CalibrationPlan, base: int, int16: Iterable[str]) -> dict[str, int]:
    """The width of every activation tensor that differs from ``base`` (module docstring)."""
    del model  # the plan holds the graph in topological order
    if base == 16:
        return _int8_widths(plan)
    wide = set(int16)
    if not wide:
        return {}
    # A Conv / Gemm that absorbs its Relu writes the Relu output: its own output tensor has that width too.
    wide.update(raw for raw, fused in plan.fused.items() if fused in wide)
    for node, spec in plan.nodes:
        outputs = [plan.fused.get(o, o) for o in node.output if o]
        inputs = [t for t in node.input if t]
        passes_through = spec.exponent is ExponentRule.PASSTHROUGH and bool(inputs) and inputs[0] in wide
        shares = spec.exponent is ExponentRule.SHARED and any(t in wide for t in inputs)
        relu6_of_wide = node.op_type == "Clip" and bool(inputs) and inputs[0] in wide and inputs[0] in plan.range_from
        if passes_through or shares or relu6_of_wide:
            wide.update(outputs)
    # A float output keeps the width of the layer named for it (a Softmax at int16 reads its input at int16).
    return dict.fromkeys(sorted(wide - (set(plan.float_tensors) - set(int16))), 16)


def overflowing_softmax(
    plan: CalibrationPlan, exponents: dict[str, int | list[int]], widths: dict[str, int], bits: int
) -> list[str]:
    """The Softmax / LogSoftmax layers that would compute at int8 with an input range the chip's int8 exp table
    cannot hold (inf / NaN on the chip: ``int8_softmax_overflows``), by output tensor. Calibration runs them at
    int16 instead, where the runtime subtracts the maximum in float (a RequantizeLinear widens the input)."""
    found = []
    for node, _ in plan.nodes:
        if node.op_type not in SOFTMAX_FAMILY or not node.output or widths.get(node.output[0], bits) != 8:
            continue
        exponent = exponents.get(node.input[0])
        if isinstance(exponent, int):
            at_int8 = equivalent_exponent(exponent, widths.get(node.input[0], bits), 8)
            if int8_softmax_overflows(at_int8):
                found.append(node.output[0])
    return found
