"""Compiled simulation: runs of integer nodes lowered into onnxruntime float32 graphs that are exact by proof.

The interpreter (``QuantizedModel.run``) executes one numpy kernel per node; that is clear and bit-exact but
pays numpy's per-pass cost on every tensor. Here each maximal run of nodes whose integer arithmetic can be
written with exact float32 operations becomes one onnxruntime graph, so the whole model runs at close to
onnxruntime's float speed and still produces exactly the interpreter's integers.

Why float32 is exact here: every tensor holds integers below 2**24 in magnitude (int8 / int16 values,
accumulators whose bound ``2**(bits-1) * max_n sum|w_n| + |bias| + half`` is checked below 2**24 when the
graph is built), so every product, partial sum (in whatever order the kernel adds), multiplication by a
power of two and Floor / Round is exact. Rounding follows the profile: half-up adds ``2**(s-1)`` to the
accumulator (folded into the bias) and floors after the ``2**-s`` scaling; half-even uses Round (ties to
even). Float32 steps of the chip (average pools, input quantization) are the same float32 operations in the
same order as the numpy kernels, with ``floor(v + 0.5)`` taken in double as ``round_float`` does.

What cannot be proven statically becomes a guard, computed in the graph: on ESP32-S3 an int8 accumulator
lane saturates at 20 bits, so where the static bound reaches the rail the graph also computes this data's
own bound ``max (|x| * |w|) + |bias|`` and reports whether it reaches the rail. If any guard trips the batch
is re-run by the interpreter, which emulates the saturation tap by tap. Guards are valid by induction: a
guard only reads tensors whose own guards held.

Nodes that cannot be lowered (float outputs, MatMul slices, LUT-free float activations, ...) run in the
interpreter between compiled segments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from espquant.quant.pot import EXACT_FLOAT32, qmax, qmin

if TYPE_CHECKING:
    from espquant.simulator.quantized_model import QNode, QuantizedModel

__all__ = ["CompiledProgram", "GuardTripped", "compile_program", "QUANTIZE_INPUT"]

F32 = np.float32
QUANTIZE_INPUT = "QuantizeInput"  # pseudo-node: float graph input -> integers, as QuantizedModel.quantize_input


class _Refused(Exception):
    """A node that cannot be lowered exactly; it runs in the interpreter."""


@dataclass
class _Builder:
    """Accumulates the ONNX nodes, constants and guards of one segment."""

    model: QuantizedModel
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    guards: list[str] = field(default_factory=list)
    guard_nodes: list[str] = field(default_factory=list)  # the node (first output) each guard protects
    produced: set[str] = field(default_factory=set)
    nonnegative: set[str] = field(default_factory=set)  # integer tensors that can never be negative
    bits: int = 8  # the width of the node being lowered
    consumed: list[str] = field(default_factory=list)
    _count: int = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}::{self._count}"

    def const(self, value: Any, hint: str, dtype: Any = F32) -> str:
        name = self.fresh(hint + "::const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        out = output or self.fresh(op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def use(self, tensor: str) -> str:
        """An integer activation this segment reads (from a previous step unless produced here)."""
        if tensor in self.model.float_tensors:
            raise _Refused(f"{tensor!r} holds floats")
        if tensor in self.model.constants:
            raise _Refused(f"{tensor!r} is a constant used as an activation")
        if tensor not in self.produced:
            self.consumed.append(tensor)
        return tensor

    def constant(self, tensor: str) -> np.ndarray:
        value = self.model.constants.get(tensor)
        if value is None:
            raise _Refused(f"{tensor!r} is not a constant")
        return np.asarray(value)

    def guard(self, tripped: str, node: QNode) -> None:
        """A boolean scalar that must stay false for ``node``'s compiled result to be exact."""
        self.guards.append(tripped)
        self.guard_nodes.append(node.outputs[0])

    def mark(self) -> tuple[int, int, int, int]:
        return len(self.nodes), len(self.initializers), len(self.guards), len(self.consumed)

    def rollback(self, mark: tuple[int, int, int, int]) -> None:
        del self.nodes[mark[0] :], self.initializers[mark[1] :], self.consumed[mark[3] :]
        del self.guards[mark[2] :], self.guard_nodes[mark[2] :]

    # --- shared integer steps -----------------------------------------------------------------------------------

    def saturate(self, x: str, output: str, low_zero: bool = False) -> str:
        bits = self.bits
        low = self.const(0.0 if low_zero else qmin(bits), output)
        return self.op("Clip", [x, low, self.const(qmax(bits), output)], output)

    def shift_round(self, acc: str, shift: np.ndarray, hint: str, half_added: bool) -> str:
        """``SR(acc, shift)`` for float32 integers: scale by ``2**-shift`` then round per the profile. With
        half-up the caller has already added ``2**(shift-1)`` where ``shift > 0`` (``half_added``)."""
        if np.all(shift == 0):
            return acc
        scaled = self.op("Mul", [acc, self.const(2.0 ** -shift.astype(np.float64), hint)])
        if np.all(shift <= 0):
            return scaled  # a left shift: exact, integer already
        if self.model.profile.rounding == "half_even":
            return self.op("Round", [scaled])
        if not half_added:
            scaled = self.op("Add", [scaled, self.const(0.5, hint)])  # exact: the caller checked the bound
        return self.op("Floor", [scaled])

    def round_float32(self, values: str, hint: str) -> str:
        """``round_float`` of arbitrary float32 values: half-up is ``floor(v + 0.5)`` in double."""
        if self.model.profile.rounding == "half_even":
            return self.op("Round", [values])
        wide = self.op("Cast", [values], to=TensorProto.DOUBLE)
        floor = self.op("Floor", [self.op("Add", [wide, self.const(0.5, hint, np.float64)])])
        bits = self.bits
        clipped = self.op(
            "Clip", [floor, self.const(qmin(bits), hint, np.float64), self.const(qmax(bits), hint, np.float64)]
        )
        return self.op("Cast", [clipped], to=TensorProto.FLOAT)


def _half(shift: np.ndarray, rounding: str) -> np.ndarray:
    """The ``2**(s-1)`` a half-up shift adds to the accumulator (0 where nothing is rounded)."""
    if rounding != "half_up":
        return np.zeros(shift.shape, np.int64)
    return np.where(shift > 0, np.int64(1) << np.maximum(shift - 1, 0), 0)


def _lane_limit(m: QuantizedModel, bits: int) -> float | None:
    """The narrowest accumulator rail a SIMD profile can reach, or None when no rail is reachable in float32."""
    if not m.profile.simd:
        return None
    limit = 2.0 ** (min(m.profile.conv_acc_bits[bits], m.profile.tail_acc_bits[bits]) - 1)
    return limit if limit < EXACT_FLOAT32 else None


def _accumulating(
    b: _Builder,
    node: QNode,
    weight: np.ndarray,
    bias: np.ndarray | None,
    contract: Callable[[str, str, str | None], str],
    embed: Callable[[np.ndarray], np.ndarray] = lambda w: w,
) -> str:
    """Conv / Gemm: exact sums from ``contract(x, w, bias)``, shift, fused ReLU, saturate.

    ``weight`` has output channels first (for the bounds); ``embed`` gives the layout the contraction takes;
    ``contract`` builds the float32 operation on ``(x, w_const, bias_const)`` names."""
    m = b.model
    shift = np.asarray(
        m.exponent(node.outputs[0]) - m.exponent(node.inputs[0]) - np.asarray(m.exponents[node.inputs[1]]),
        dtype=np.int64,
    ).reshape(-1)
    channels = weight.shape[0]
    shift = np.broadcast_to(shift, (channels,)).copy()
    bias64 = np.zeros(channels, np.int64) if bias is None else np.broadcast_to(bias.astype(np.int64), (channels,))
    half = _half(shift, m.profile.rounding)
    # Every partial sum is the bias plus a subset of the products. With signed inputs a subset is bounded by
    # 2^(bits-1) sum|w|; with inputs that cannot be negative (after a ReLU / ReLU6) by qmax times the sum
    # of the positive (or of the negative) weights, about half as much.
    flat = weight.astype(np.int64).reshape(channels, -1).astype(np.float64)
    if node.inputs[0] in b.nonnegative:
        x_max = float(qmax(b.bits))
        high, low = x_max * np.clip(flat, 0, None).sum(axis=1), x_max * np.clip(flat, None, 0).sum(axis=1)
    else:
        x_max = float(2 ** (b.bits - 1))
        high = x_max * np.abs(flat).sum(axis=1)
        low = -high
    if float((np.maximum(high, -low) + np.abs(bias64 + half)).max(initial=0)) >= EXACT_FLOAT32:
        raise _Refused("the accumulator bound is not exact in float32")
    limit = _lane_limit(m, b.bits)
    bias_max = float(np.abs(bias64).max(initial=0))
    x = b.use(node.inputs[0])
    hint = node.outputs[0]
    reach = np.maximum(np.abs(bias64 + high), np.abs(bias64 + low))  # the chip's running sums stay inside
    if limit is not None and float(reach.max(initial=0)) >= limit:
        if bias_max >= limit:
            raise _Refused("the bias alone fills the accumulator lane")
        bound = contract(b.op("Abs", [x]), b.const(embed(np.abs(weight)), hint + "::abs"), None)
        top = b.op("ReduceMax", [bound], keepdims=0)
        b.guard(b.op("GreaterOrEqual", [top, b.const(limit - bias_max, hint)]), node)
    start = bias64 + half
    acc = contract(x, b.const(embed(weight), hint), b.const(start, hint) if np.any(start) else None)
    shape = [1, channels] + [1] * (weight.ndim - 2) if weight.ndim > 2 else [channels]
    y = b.shift_round(acc, shift.reshape(shape), hint, half_added=True)
    return b.saturate(y, node.outputs[0], low_zero=node.relu)


def _lower_conv(b: _Builder, node: QNode) -> None:
    w = b.constant(node.inputs[1])
    if w.ndim != 4:
        raise _Refused("only 2-D convolutions are compiled")
    group = int(node.attrs.get("group", 1))
    if group != 1 and not (w.shape[1] == 1 and group == w.shape[0]):
        raise _Refused("grouped (non-depthwise) convolution")
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise _Refused("auto_pad")
    bias = b.constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
    attrs = {
        "strides": list(node.attrs.get("strides", [1, 1])),
        "pads": list(node.attrs.get("pads", [0, 0, 0, 0])),
        "dilations": list(node.attrs.get("dilations", [1, 1])),
        "group": group,
    }

    def contract(x: str, weight: str, start: str | None) -> str:
        return b.op("Conv", [x, weight] + ([start] if start else []), **attrs)

    _accumulating(b, node, w, bias, contract)


def _lower_gemm(b: _Builder, node: QNode) -> None:
    if node.attrs.get("transA", 0):
        raise _Refused("transA")
    w = b.constant(node.inputs[1])
    w = w.T if node.attrs.get("transB", 0) else w  # (K, M)
    bias = b.constant(node.inputs[2]).reshape(-1) if len(node.inputs) > 2 and node.inputs[2] else None
    if bias is not None and bias.size not in (1, w.shape[1]):
        raise _Refused("bias shape")

    def contract(x: str, weight: str, start: str | None) -> str:
        product = b.op("MatMul", [x, weight])
        return b.op("Add", [product, start]) if start else product

    _accumulating(b, node, w.T, bias, contract, embed=lambda oc_first: np.ascontiguousarray(oc_first.T))


def _lower_add_sub(b: _Builder, node: QNode) -> None:
    a, c = (b.use(t) if t not in b.model.constants else _int_const(b, t) for t in node.inputs)
    b.saturate(b.op(node.op_type, [a, c]), node.outputs[0])


def _int_const(b: _Builder, tensor: str) -> str:
    value = b.constant(tensor)
    if np.abs(value.astype(np.int64)).max(initial=0) >= EXACT_FLOAT32:
        raise _Refused("constant too wide for float32")
    return b.const(value, tensor)


def _lower_table(b: _Builder, node: QNode) -> None:
    """An int8 activation by its stored table: ``T[q + 128]`` (a Gather on the float32 table)."""
    assert node.table is not None
    if node.bits != 8:
        raise _Refused("int16 tables run in the interpreter")
    index = b.op("Cast", [b.op("Add", [b.use(node.inputs[0]), b.const(128.0, node.outputs[0])])], to=TensorProto.INT64)
    b.op("Gather", [b.const(node.table.reshape(-1), node.outputs[0]), index], node.outputs[0], axis=0)


def _lower_relu(b: _Builder, node: QNode) -> None:
    if b.model.exponent(node.inputs[0]) != b.model.exponent(node.outputs[0]):
        raise _Refused("Relu that rescales runs the float path")
    b.op("Relu", [b.use(node.inputs[0])], node.outputs[0])


def _lower_clip(b: _Builder, node: QNode) -> None:
    m = b.model
    x = b.use(node.inputs[0])
    bounds = []
    for position in (1, 2):
        tensor = node.inputs[position] if len(node.inputs) > position else ""
        bounds.append(_int_const(b, tensor) if tensor else "")
    e_in, e_out = m.exponent(node.inputs[0]), m.exponent(node.outputs[0])
    if e_in == e_out:
        b.op("Clip", [x, *bounds], node.outputs[0])
        return
    clamped = b.op("Clip", [x, *bounds])
    _rescale(b, clamped, e_out - e_in, node.outputs[0])


def _rescale(b: _Builder, x: str, shift: int, output: str) -> None:
    """``sat(SR(x, shift))`` of int8/int16 values (RequantizeLinear; Clip's float rescale is the same value:
    ``x * 2**-shift`` is exact and ``floor(v + 0.5)`` of such a v is exact in float32)."""
    y = b.shift_round(x, np.asarray(shift, dtype=np.int64).reshape(1), output, half_added=False)
    b.saturate(y, output)


def _lower_requantize(b: _Builder, node: QNode) -> None:
    """RequantizeLinear, and QuantizeLinear (the same runtime module) on float or integer input."""
    m = b.model
    if node.op_type == "QuantizeLinear" and node.inputs[0] in m.float_tensors:
        b.consumed.append(node.inputs[0])
        _quantize(b, node.inputs[0], m.exponent(node.outputs[0]), node.outputs[0])
        return
    shift = m.exponent(node.outputs[0]) - m.exponent(node.inputs[0])
    if m.profile.requant_multiplier(b.bits, shift) is not None:
        raise _Refused("the wrapped left-shift multiplier depends on the tensor size")
    _rescale(b, b.use(node.inputs[0]), shift, node.outputs[0])


def _pool_attrs(node: QNode) -> dict[str, Any]:
    kernel = list(node.attrs["kernel_shape"])
    if len(kernel) != 2:
        raise _Refused("only 2-D pools are compiled")
    if node.attrs.get("ceil_mode", 0) or list(node.attrs.get("dilations", [1, 1])) != [1, 1]:
        raise _Refused("ceil_mode / dilations")
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise _Refused("auto_pad")
    return {
        "kernel_shape": kernel,
        "strides": list(node.attrs.get("strides", [1, 1])),
        "pads": list(node.attrs.get("pads", [0, 0, 0, 0])),
    }


def _lower_max_pool(b: _Builder, node: QNode) -> None:
    if len(node.outputs) > 1 and node.outputs[1]:
        raise _Refused("MaxPool indices")
    b.op("MaxPool", [b.use(node.inputs[0])], node.outputs[0], **_pool_attrs(node))


def _lower_average_pool(b: _Builder, node: QNode) -> None:
    """Integer tap sum (padding counts as zeros), times ``k = f32(f32(2^e_in / area) 2^-e_out)`` in float32,
    rounded: ``average_pool_nhwc``. The sum comes from onnxruntime's average (count_include_pad) times the
    area, rounded: its relative error stays below 2**-21, so below one half while the sum is below 2**20."""
    m = b.model
    x = b.use(node.inputs[0])
    hint = node.outputs[0]
    if node.op_type == "GlobalAveragePool":  # every axis after the channels: 1-D and 2-D alike
        shape = b.op("Shape", [x])
        rank = b.op("Size", [shape])
        axes = b.op("Range", [b.const(2, hint, np.int64), rank, b.const(1, hint, np.int64)])
        total = b.op("ReduceSum", [x, axes], keepdims=1)
        spatial = b.op("Slice", [shape, b.const([2], hint, np.int64), b.const([2**62], hint, np.int64)])
        area = b.op("Cast", [b.op("ReduceProd", [spatial], keepdims=0)], to=TensorProto.FLOAT)
        # The plane is only known at run time: the sum is exact while 2^(bits-1) * area stays below 2^24.
        b.guard(b.op("GreaterOrEqual", [area, b.const(EXACT_FLOAT32 / 2 ** (b.bits - 1), hint)]), node)
        inverse = b.op("Div", [b.const(1.0, hint), area])
    else:
        attrs = _pool_attrs(node)
        kernel_area = attrs["kernel_shape"][0] * attrs["kernel_shape"][1]
        if 2.0 ** (b.bits - 1) * kernel_area >= 2.0**20:
            raise _Refused("pool sums too large to recover exactly")
        mean = b.op("AveragePool", [x], count_include_pad=1, **attrs)
        total = b.op("Round", [b.op("Mul", [mean, b.const(float(kernel_area), hint)])])
        inverse = b.const(F32(1.0) / F32(kernel_area), hint)
    e_in, e_out = m.exponent(node.inputs[0]), m.exponent(node.outputs[0])
    k = b.op("Mul", [b.op("Mul", [b.const(2.0**e_in, hint), inverse]), b.const(2.0**-e_out, hint)])
    _round_saturate(b, b.op("Mul", [total, k]), node.outputs[0])


def _round_saturate(b: _Builder, values: str, output: str) -> None:
    rounded = b.round_float32(values, output)
    b.saturate(rounded, output)


def _lower_quantize_input(b: _Builder, node: QNode) -> None:
    """``QuantizedModel.quantize_input``; the input is float (fed as float32, as quantize_input converts it)."""
    b.consumed.append(node.inputs[0])
    _quantize(b, node.inputs[0], b.model.exponent(node.outputs[0]), node.outputs[0])


def _quantize(b: _Builder, source: str, exponent: int, output: str) -> None:
    """float -> int: ``sat(R(f32(x) * f32(2^-e)))``."""
    _round_saturate(b, b.op("Mul", [source, b.const(2.0**-exponent, output)]), output)


def _lower_reshape(b: _Builder, node: QNode) -> None:
    shape = b.constant(node.inputs[1]).astype(np.int64).reshape(-1)
    b.op("Reshape", [b.use(node.inputs[0]), b.const(shape, node.outputs[0], np.int64)], node.outputs[0])


def _lower_passthrough(b: _Builder, node: QNode) -> None:
    """Data movement with ONNX's own semantics (Flatten, Transpose, Identity, Concat)."""
    inputs = [b.use(t) for t in node.inputs if t]
    attrs = {k: v for k, v in node.attrs.items() if k in ("axis", "perm")}
    b.op(node.op_type, inputs, node.outputs[0], **attrs)


def _lower_axes(b: _Builder, node: QNode) -> None:
    """Squeeze / Unsqueeze with constant axes (input or attribute)."""
    if len(node.inputs) > 1 and node.inputs[1]:
        axes = b.constant(node.inputs[1]).astype(np.int64).reshape(-1)
    elif "axes" in node.attrs:
        axes = np.asarray(node.attrs["axes"], np.int64)
    elif node.op_type == "Squeeze":
        b.op("Squeeze", [b.use(node.inputs[0])], node.outputs[0])
        return
    else:
        raise _Refused("Unsqueeze without axes")
    b.op(node.op_type, [b.use(node.inputs[0]), b.const(axes, node.outputs[0], np.int64)], node.outputs[0])


_LOWER: dict[str, Callable[[_Builder, QNode], None]] = {
    QUANTIZE_INPUT: _lower_quantize_input,
    "Conv": _lower_conv,
    "Gemm": _lower_gemm,
    "Add": _lower_add_sub,
    "Sub": _lower_add_sub,
    "Relu": _lower_relu,
    "Clip": _lower_clip,
    "RequantizeLinear": _lower_requantize,
    "QuantizeLinear": _lower_requantize,
    "MaxPool": _lower_max_pool,
    "AveragePool": _lower_average_pool,
    "GlobalAveragePool": _lower_average_pool,
    "Reshape": _lower_reshape,
    "Flatten": _lower_passthrough,
    "Transpose": _lower_passthrough,
    "Identity": _lower_passthrough,
    "Concat": _lower_passthrough,
    "Squeeze": _lower_axes,
    "Unsqueeze": _lower_axes,
}


@dataclass
class _Segment:
    """One onnxruntime graph: reads ``inputs`` from the environment, writes ``outputs``, reports ``guards``."""

    inputs: list[str]
    outputs: list[str]
    guards: list[str]
    guard_nodes: list[str]
    session: Any
    nodes: int


class GuardTripped(Exception):
    """An accumulator lane may saturate on this batch (or a sum may leave float32's exact range): these nodes
    (named by their first output) must run in the interpreter."""

    def __init__(self, nodes: list[str]) -> None:
        super().__init__(", ".join(nodes))
        self.nodes = nodes


@dataclass
class CompiledProgram:
    """Segments and interpreter nodes in execution order (see the module docstring)."""

    steps: list[_Segment | QNode]

    @property
    def compiled_nodes(self) -> int:
        return sum(s.nodes for s in self.steps if isinstance(s, _Segment))

    @property
    def interpreted_nodes(self) -> list[QNode]:
        return [s for s in self.steps if not isinstance(s, _Segment)]

    def run(self, env: dict[str, np.ndarray], interpret: Callable[[QNode, dict[str, np.ndarray]], None]) -> None:
        """Execute every step on ``env`` (updated in place; segment outputs become int64 before an interpreter
        step reads them and at the end); raises GuardTripped when a guard trips."""
        from_segments: set[str] = set()
        for step in self.steps:
            if isinstance(step, _Segment):
                feeds = {name: _as_f32(env[name]) for name in step.inputs}
                results = step.session.run(step.outputs + step.guards, feeds)
                tripped = [n for n, g in zip(step.guard_nodes, results[len(step.outputs) :]) if bool(g)]
                if tripped:
                    raise GuardTripped(tripped)
                env.update(zip(step.outputs, results[: len(step.outputs)]))
                from_segments.update(step.outputs)
                continue
            for name in step.inputs:
                if name in from_segments:
                    env[name] = env[name].astype(np.int64)
                    from_segments.discard(name)
            interpret(step, env)
        for name in from_segments:
            env[name] = env[name].astype(np.int64)


def _as_f32(value: np.ndarray) -> np.ndarray:
    return value if value.dtype == F32 else value.astype(F32)


_KEEPS_SIGN = {
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Reshape",
    "Flatten",
    "Transpose",
    "Identity",
    "Squeeze",
    "Unsqueeze",
    "RequantizeLinear",
    "Concat",
}


def _nonnegative_tensors(model: QuantizedModel, nodes: list[QNode]) -> set[str]:
    """Integer tensors that are never negative, whatever the data: outputs of a fused or plain ReLU, of a
    Clip with a non-negative constant lower bound, of an int8 table without negative entries, and what
    sign-keeping ops (pools, data movement, requantization: rounding and saturation keep x >= 0) make of
    them."""
    found: set[str] = set()
    for node in nodes:
        if not node.outputs or node.outputs[0] in model.float_tensors:
            continue
        inputs = [t for t in node.inputs if t and t not in model.constants]
        if node.relu or node.op_type == "Relu":
            keeps = True
        elif node.table is not None:
            keeps = bool(node.table.min() >= 0)
        elif node.op_type == "Clip":
            low = node.inputs[1] if len(node.inputs) > 1 else ""
            keeps = bool(low) and low in model.constants and float(np.min(model.constants[low])) >= 0
        else:
            keeps = node.op_type in _KEEPS_SIGN and bool(inputs) and all(t in found for t in inputs)
        if keeps:
            found.add(node.outputs[0])
    return found


def compile_program(
    model: QuantizedModel, nodes: list[QNode], threads: int | None, interpret: frozenset[str] = frozenset()
) -> CompiledProgram:
    """Partition ``nodes`` into compiled segments and interpreter steps; build one session per segment.
    Nodes whose first output is in ``interpret`` (their guards tripped before) stay in the interpreter."""
    needed_after: list[set[str]] = []
    live = set(model.outputs)
    for node in reversed(nodes):
        needed_after.append(set(live))
        live |= {t for t in node.inputs if t}
    needed_after.reverse()
    steps: list[_Segment | QNode] = []
    nonnegative = _nonnegative_tensors(model, nodes)
    builder = _Builder(model, nonnegative=nonnegative)
    count = 0
    for index, node in enumerate(nodes):
        lower = _lower_table if node.table is not None else _LOWER.get(node.op_type)
        mark = builder.mark()
        builder.bits = node.bits
        try:
            if lower is None or (node.outputs and node.outputs[0] in interpret):
                raise _Refused("no lowering")
            lower(builder, node)
        except _Refused:
            builder.rollback(mark)
            if builder.nodes:
                steps += _segment(builder, sorted(builder.produced & needed_after[index - 1]), threads, count)
            builder, count = _Builder(model, nonnegative=nonnegative), 0
            steps.append(node)
            continue
        builder.produced.update(t for t in node.outputs if t)
        count += 1
    if builder.nodes:
        steps += _segment(builder, sorted(builder.produced & needed_after[-1]), threads, count)
    return CompiledProgram(steps)


def _segment(builder: _Builder, outputs: list[str], threads: int | None, count: int) -> list[_Segment]:
    """The segment's session, or nothing when no later step reads what it computes (dead nodes)."""
    from espquant.runtime import create_session

    if not outputs and not builder.guards:
        return []
    inputs = list(dict.fromkeys(t for t in builder.consumed if t not in builder.produced))
    graph = helper.make_graph(
        builder.nodes,
        "espquant_compiled_segment",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs]
        + [helper.make_tensor_value_info(name, TensorProto.BOOL, None) for name in builder.guards],
        builder.initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = create_session(proto, threads=threads, what="a compiled simulator segment")
    return [_Segment(inputs, outputs, list(builder.guards), list(builder.guard_nodes), session, count)]
