"""Compiled simulation: runs of integer nodes lowered into onnxruntime float32 graphs that are exact by proof.

The interpreter (``QuantizedModel.run``) executes one numpy kernel per node; that is clear and bit-exact but
pays numpy's per-pass cost on every tensor. Here each maximal run of nodes whose integer arithmetic can be
written with exact float32 operations becomes one onnxruntime graph, so the whole model runs at close to
onnxruntime's float speed and still produces exactly the interpreter's integers.

Why float32 is exact here: every tensor holds integers below 2**24 in magnitude (int8 / int16 values,
accumulators whose bound ``2**(bits-1) * max_n sum|w_n| + |bias| + half`` is checked below 2**24 when the
graph is built), so every product, partial sum (in whatever order the kernel adds), multiplication by a
power of two and Floor / Round is exact. Rounding follows the profile: half-up adds ``2**(s-1)`` to the
accumulator (folded into the bias) and floors after the ``2**-s`` scaling (folded into the weights: a power
of two keeps every partial sum exact); half-even uses Round (ties to even). Float32 steps of the chip
(average pools, input quantization) are the same float32 operations in the same order as the numpy kernels,
with ``floor(v + 0.5)`` taken in double as ``round_float`` does.

Sums beyond 2**24 (int16 layers, int8 layers of huge fan-in): Gemm / MatMul run onnxruntime's double MatMul
(exact below 2**53); a Conv (float32 only in onnxruntime) splits the activation and / or the weights into
balanced digits (``x = hi * 2**8 + lo`` with ``|hi|, |lo| <= 128`` for int16) so that every digit-pair
contraction stays below 2**24 (checked per layer from the weights and the digit bounds, at most 4
contractions), and the pairs are added in double, where shift, ReLU and saturation follow.

What cannot be proven statically becomes a guard, computed in the graph: on ESP32-S3 an int8 accumulator
lane saturates at 20 bits, so where the static bound reaches the rail the graph also computes this data's
bound (every running sum lies in ``start + [-(M - S) / 2, (M + S) / 2]`` with ``M = sum |x w|``, ``S`` the exact
sum; first the cheaper Cauchy-Schwarz bound ``||x patch|| * ||w||``, ``M`` itself only under an ``If`` when
that one reaches the rail) and reports whether it reaches the rail. If a guard trips the batch is re-run with
that node as a rail step: its exact sums leave the segment, ``lanes.emulate`` replaces only the outputs that
may saturate by their saturating sums, and the next segment shifts them (other tripped nodes run in the
interpreter). Guards are valid by induction: a guard only reads tensors whose own guards held.

Nodes that cannot be lowered (float outputs, run-time MatMul operands, LUT-free float activations, ...) run
in the interpreter between compiled segments. From a program's third run (``BLOCKED_FROM_RUN``) its segments
keep onnxruntime's blocked layout across their rounding steps (simulator/layout.py).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from espquant.ops.broadcast import merged_broadcast_shapes
from espquant.quant.pot import EXACT_FLOAT32, EXACT_FLOAT64, qmax, qmin, simd_lanes
from espquant.runtime import runner
from espquant.simulator import kernels, lanes, libm, native
from espquant.simulator.activations import FLOAT_FUNCTIONS
from espquant.simulator.layout import SAME_SHAPE
from espquant.simulator.reductions import REDUCE_KINDS

if TYPE_CHECKING:
    from espquant.simulator.quantized_model import QNode, QuantizedModel

__all__ = ["CompiledProgram", "GuardTripped", "compile_program", "QUANTIZE_INPUT"]

F32 = np.float32
QUANTIZE_INPUT = "QuantizeInput"  # pseudo-node: float graph input -> integers, as QuantizedModel.quantize_input
# Whether accumulating nodes whose sums pass float32's integers run in double in simulator/native.py (numba)
# rather than as digit splits in the graph. Tests turn it off to check the digit splits, the fallback where numba
# is missing.
NATIVE = True
# The run from which a program's segments keep onnxruntime's blocked layout between convolutions
# (simulator/layout.py): the edit costs about one more session creation (0.1-0.2 s on real models), which a
# program run once or twice (each candidate table ``auto`` simulates) would not win back.
BLOCKED_FROM_RUN = 3
# Accumulating nodes of at most this many products per sample keep their double sums in the graph instead of a
# native step (``_tiny``).
IN_GRAPH_PRODUCTS = 1 << 14


_NAMES = itertools.count(1)


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
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # see _value_ranges
    bits: int = 8  # the width of the node being lowered
    consumed: list[str] = field(default_factory=list)
    rail_nodes: frozenset[str] = frozenset()  # accumulating nodes lowered as rail steps (their guard tripped)
    exports: list[str] = field(default_factory=list)  # internal tensors a later step reads (rail steps)
    types: dict[str, int] = field(default_factory=dict)  # TensorProto type of non-float32 inputs / outputs
    pending: tuple[Any, Callable[[_Builder], None]] | None = None  # a rail step and the node's finishing part
    clamps: dict[str, tuple[int, int, str]] = field(default_factory=dict)  # see _clamp_fusions
    quantized_input: QNode | None = None  # the input quantization lowered here, if any (see _segment)

    def fresh(self, hint: str) -> str:
        """A new tensor name, unique across segments too (a rail step hands one segment's sums to the next)."""
        return f"{hint}::{next(_NAMES)}"

    def const(self, value: Any, hint: str, dtype: Any = F32) -> str:
        name = self.fresh(hint + "::const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(
        self, op_type: str, inputs: list[str], output: str | None = None, name: str | None = None, **attrs: Any
    ) -> str:
        out = output or self.fresh(op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def use(self, tensor: str, dtype: int = TensorProto.FLOAT) -> str:
        """An integer activation this segment reads (from a previous step unless produced here); ``dtype``: how a
        segment input is fed (float32, or double for the exact sums a rail step hands on)."""
        if dtype != TensorProto.FLOAT:
            self.types[tensor] = dtype
        self.integer_activation(tensor)
        if tensor not in self.produced:
            self.consumed.append(tensor)
        return tensor

    def moved(self, node: QNode) -> list[str]:
        """The inputs of a data-movement node (Reshape, Transpose, Concat ...): integer activations, or floats
        when its output is float too (a Softmax's probabilities reshaped for the model's output), which the
        segment moves as they are and hands on as floats."""
        tensors = [t for t in (node.inputs if node.op_type == "Concat" else node.inputs[:1]) if t]
        if node.outputs[0] not in self.model.float_tensors:
            return [self.use(t) for t in tensors]
        if not all(t in self.model.float_tensors for t in tensors):
            raise _Refused("float and integer tensors moved together")
        self.consumed.extend(t for t in tensors if t not in self.produced)
        return tensors

    def nonnegative(self, tensor: str) -> bool:
        """Whether the integer tensor can never be negative, whatever the data (``_value_ranges``)."""
        return tensor in self.ranges and self.ranges[tensor][0] >= 0

    def integer_activation(self, tensor: str) -> None:
        """Refuse a tensor that is no integer activation (floats, or a constant where a lowering reads data)."""
        if tensor in self.model.float_tensors:
            raise _Refused(f"{tensor!r} holds floats")
        if tensor in self.model.constants:
            raise _Refused(f"{tensor!r} is a constant used as an activation")

    def constant(self, tensor: str) -> np.ndarray:
        value = self.model.constants.get(tensor)
        if value is None:
            raise _Refused(f"{tensor!r} is not a constant")
        return np.asarray(value)

    def guard(self, tripped: str, node: QNode) -> None:
        """A boolean scalar that must stay false for ``node``'s compiled result to be exact."""
        self.guards.append(tripped)
        self.guard_nodes.append(node.outputs[0])

    def mark(self) -> tuple[int, int, int, int, int]:
        return len(self.nodes), len(self.initializers), len(self.guards), len(self.consumed), len(self.exports)

    def rollback(self, mark: tuple[int, int, int, int, int]) -> None:
        del self.nodes[mark[0] :], self.initializers[mark[1] :], self.consumed[mark[3] :]
        del self.guards[mark[2] :], self.guard_nodes[mark[2] :], self.exports[mark[4] :]
        self.pending = None

    # --- shared integer steps -----------------------------------------------------------------------------------

    def saturate(
        self, x: str, output: str, low_zero: bool = False, dtype: Any = F32, bounds: tuple[int, int] | None = None
    ) -> str:
        """Clip to the node's width (or to ``bounds``); a double accumulator is clipped in double, then made
        float32."""
        bits = self.bits
        low_value, high_value = bounds if bounds is not None else (0 if low_zero else qmin(bits), qmax(bits))
        low = self.const(low_value, output, dtype)
        high = self.const(high_value, output, dtype)
        if dtype == F32:
            return self.op("Clip", [x, low, high], output)
        return self.op("Cast", [self.op("Clip", [x, low, high])], output, to=TensorProto.FLOAT)

    def shift_round(self, acc: str, shift: np.ndarray, hint: str, dtype: Any = F32) -> str:
        """``SR(acc, shift)`` for integers held in float32 or double: scale by ``2**-shift`` then round per the
        profile (half-up: ``floor(v + 1/2)``). Accumulating nodes fold the half into their bias instead and
        round with :func:`_round_saturate_scaled`."""
        if np.all(shift == 0):
            return acc
        scaled = self.op("Mul", [acc, self.const(2.0 ** -shift.astype(np.float64), hint, dtype)])
        if np.all(shift <= 0):
            return scaled  # a left shift: exact, integer already
        if self.model.profile.rounding == "half_even":
            return self.op("Round", [scaled])
        scaled = self.op("Add", [scaled, self.const(0.5, hint, dtype)])  # exact: the caller checked the bound
        return self.op("Floor", [scaled])

    def round_float32(self, values: str, hint: str) -> str:
        """``round_float`` of arbitrary float32 values (not saturated: the caller clips next). Half-up is
        ``floor(v + 0.5)``, but ``v + 0.5`` rounds in float32 (0.49999997 + 0.5 gives 1). It is taken as
        half-even ``r = Round(v)`` plus one where ``v - r`` is exactly 1/2 (a tie half-even sent down; one it
        sent up gives -1/2). ``v - r`` is exact: for ``|v| >= 1``, ``r`` lies within a factor 2 of ``v``
        (Sterbenz); below, ``r`` is -1, 0 or 1 and ``v - r`` lies in [-1/2, 1/2] on ``v``'s own grid. Five
        float32 passes take half the time of the same in double (measured on 786K values)."""
        rounded = self.op("Round", [values])
        if self.model.profile.rounding == "half_even":
            return rounded
        tie = self.op("Equal", [self.op("Sub", [values, rounded]), self.const(0.5, hint)])
        return self.op("Add", [rounded, self.op("Cast", [tie], to=TensorProto.FLOAT)])


def _half(shift: np.ndarray, rounding: str) -> np.ndarray:
    """The ``2**(s-1)`` a half-up shift adds to the accumulator (0 where nothing is rounded)."""
    if rounding != "half_up":
        return np.zeros(shift.shape, np.int64)
    return np.where(shift > 0, np.int64(1) << np.maximum(shift - 1, 0), 0)


# Digit splits tried when a sum is not exact in float32, cheapest first: (digits of x, digits of w). Each pair
# of digits is one float32 contraction, so the cost is their product (at most 4, as the issue asks); among
# equal products, fewer activation digits cost fewer elementwise passes in the graph.
_SPLITS = ((2, 1), (1, 2), (3, 1), (2, 2), (4, 1))


def _digit_shifts(bits: int, count: int) -> list[int]:
    """Where the balanced digits of a ``bits``-bit integer start: ``ceil(i * bits / count)``, lowest first."""
    return [-(-i * bits // count) for i in range(count)]


def _digit_bounds(bits: int, count: int) -> list[int]:
    """The largest magnitude of each (unscaled) balanced digit of a signed ``bits``-bit value, lowest first: a
    digit between shifts s and t lies in ``[-2**(t-s-1), 2**(t-s-1)]`` (rounding up can reach the top), the
    top digit within ``2**(bits-1-s)``."""
    shifts = _digit_shifts(bits, count)
    ends = shifts[1:] + [bits]
    return [1 << (end - start - 1) for start, end in zip(shifts, ends)]


def split_digits(values: np.ndarray, bits: int, count: int) -> list[np.ndarray]:
    """``values`` as ``count`` balanced digits scaled by their place value (lowest first), which add up to it.

    From the top: ``d = 2**s * floor(r / 2**s + 1/2)``, ``r -= d``; the compiled graph makes the same digits of an
    activation with float32 Mul / Add / Floor, exactly (every value is an integer below 2**bits)."""
    rest = values.astype(np.int64)
    digits = []
    for shift in reversed(_digit_shifts(bits, count)[1:]):
        digit = ((rest + (1 << (shift - 1))) >> shift) << shift
        digits.append(digit)
        rest = rest - digit
    digits.append(rest)
    return digits[::-1]


def _split_plan(flat: np.ndarray, bits: int) -> tuple[int, int, list[np.ndarray]] | None:
    """The cheapest split ``(x digits, w digits, scaled weight digits)`` whose every digit-pair contraction is
    exact in float32: ``max |x digit| * sum_k |w digit[n, k]| < 2**24`` for every output channel ``n`` (place
    values are powers of two, which keep float32 sums exact). None when no split of cost <= 4 is exact."""
    for x_count, w_count in _SPLITS:
        weights = split_digits(flat, bits, w_count)
        shifts = _digit_shifts(bits, w_count)
        column = max(float((np.abs(d) >> s).sum(axis=1).max(initial=0)) for d, s in zip(weights, shifts))
        if max(_digit_bounds(bits, x_count)) * column < EXACT_FLOAT32:
            return x_count, w_count, weights
    return None


def _activation_digits(b: _Builder, x: str, count: int, hint: str) -> list[tuple[int, str]]:
    """``(place, digit * 2**place)`` pairs of an integer activation (their sum is ``x``), highest first, made in
    the graph with two float32 adds per digit: ``t = (r + c) - c`` with ``c = 1.5 * 2**(23 + place)`` is ``r``
    rounded to a multiple of ``2**place`` (ties to even; exact while ``|r| < 2**(22 + place)``), then
    ``r -= t``. Ties go to even instead of up as in ``split_digits``, which keeps each digit within
    ``_digit_bounds``. A digit keeps its place value, so its contraction needs no scaling of its own (a power of
    two changes no product's significant bits)."""
    rest, digits = x, []
    for place in reversed(_digit_shifts(b.bits, count)[1:]):
        magic = 1.5 * 2.0 ** (23 + place)
        digit = b.op("Sub", [b.op("Add", [rest, b.const(magic, hint)]), b.const(magic, hint)])
        digits.append((place, digit))
        rest = b.op("Sub", [rest, digit])
    digits.append((0, rest))
    return digits


@dataclass(frozen=True)
class _Accumulating:
    """What a Conv / Gemm / MatMul lowering hands to :func:`_accumulating`.

    ``weight`` has output channels first (for the bounds); ``embed`` gives the layout the contraction takes;
    ``contract`` builds the float32 operation on ``(x, w_const, bias_const)`` names; ``products`` makes the
    tap products of a rail step from the input (``lanes.conv_products`` / ``rows_products``)."""

    weight: np.ndarray
    bias: np.ndarray | None
    contract: Callable[[str, str, str | None], str]
    products: Callable[[np.ndarray], Callable[[np.ndarray], np.ndarray]]
    embed: Callable[[np.ndarray], np.ndarray] = lambda w: w
    depthwise: bool = False
    channel_axis: int = 1
    # The contraction in double (onnxruntime's MatMul; it has no double Conv): ``(x_double, scaled weights with
    # output channels first, start or None) -> sums``. Gemm, MatMul and 1x1 convolutions have one.
    contract_double: Callable[[str, np.ndarray, np.ndarray | None], str] | None = None
    shift_exponent: int | list[int] | None = None  # the weight exponent (MatMul: the interpreter's scalar)
    # The contraction's input made from the node's (ConvTranspose: zeros inserted between pixels, padded).
    source: Callable[[str], str] | None = None
    # The whole node in double outside onnxruntime (simulator/native.py), made for its requantization.
    native: Callable[[native.Requantize], Callable[[np.ndarray], np.ndarray]] | None = None
    rank: int = 4  # of the node's input and output (a 1-D convolution's: 3)


def _accumulating(b: _Builder, node: QNode, spec: _Accumulating) -> None:
    """Conv / Gemm / MatMul: exact sums, lane rails, shift, fused ReLU, saturate.

    The sums are one float32 contraction when every partial sum stays below 2**24; otherwise a MatMul (Gemm,
    MatMul) runs in double, exact below 2**53 (onnxruntime has a double MatMul, no double Conv), and a Conv
    splits the activation and / or the weights into balanced digits (int16: ``x = hi * 256 + lo``) so that each
    digit-pair contraction is exact in float32, the pairs rounded in float32 where their bounds allow
    (:func:`_plan_float32_rounding`), else added, shifted and saturated in double. Where a lane may saturate
    (ESP32-S3 int8: 20 bits) the graph checks this data's bound ``start + (M +- S) / 2`` (``M = sum |x w|``);
    a node whose check tripped once is built as a rail step: its sums go to :func:`lanes.emulate`, which
    replaces only the outputs that may saturate."""
    m = b.model
    weight, channels = spec.weight, spec.weight.shape[0]
    e_w = m.exponents[node.inputs[1]] if spec.shift_exponent is None else spec.shift_exponent
    shift = np.asarray(m.exponent(node.outputs[0]) - m.exponent(node.inputs[0]) - np.asarray(e_w), dtype=np.int64)
    shift = np.broadcast_to(shift.reshape(-1), (channels,)).copy()
    rails = lanes.lane_rails(spec.bias, channels, b.bits, m.profile, spec.depthwise)
    start = rails.start
    half = _half(shift, m.profile.rounding)
    # Every partial sum is the start plus a subset of the products. With signed inputs a subset is bounded by
    # 2^(bits-1) sum|w|. With inputs of a known range [lo, hi] (after a ReLU / ReLU6: [0, qmax]; after a
    # HardSwish table: barely below 0) product k lies in [min(w lo, w hi), max(w lo, w hi)], so a subset lies
    # between the sum of the negative lower ends and the sum of the positive upper ends: about half as much.
    # Per channel, the sums of the positive weights P and of the negative ones N give both bounds: product k's
    # upper end max(w lo, w hi, 0) is w max(hi, 0) for w > 0 and w min(lo, 0) for w < 0, so the subsets stay
    # within [min(lo, 0) P + max(hi, 0) N, max(hi, 0) P + min(lo, 0) N] (two sums per weight, no product table:
    # every candidate table ``auto`` simulates compiles every layer again).
    flat = weight.astype(np.int64).reshape(channels, -1)
    positive = np.maximum(flat, 0).sum(axis=1)
    negative = flat.sum(axis=1) - positive
    magnitude = float(2 ** (b.bits - 1)) * (positive - negative).astype(np.float64)
    if node.inputs[0] in b.ranges:
        lowest, highest = b.ranges[node.inputs[0]]
        up, down = max(float(highest), 0.0), min(float(lowest), 0.0)
        high = up * positive.astype(np.float64) + down * negative.astype(np.float64)
        low = down * positive.astype(np.float64) + up * negative.astype(np.float64)
    else:
        high = magnitude
        low = -high
    direct = float((np.maximum(high, -low) + np.abs(start + half)).max(initial=0)) < EXACT_FLOAT32
    if float((magnitude + np.abs(start + half)).max(initial=0)) >= EXACT_FLOAT64:
        raise _Refused("the accumulator bound is not exact in double")
    reach = np.maximum(np.abs(start + high), np.abs(start + low))  # the chip's running sums stay inside
    checked = rails.reachable and bool((reach >= 2.0 ** (rails.width - 1)).any())
    natively = spec.native is not None and NATIVE and native.AVAILABLE and not _tiny(node, spec)
    if not direct and not checked and natively:
        _native_step(b, node, spec.native, (start + half).astype(np.float64), shift)
        return
    double = spec.contract_double is not None
    plan = None if direct or double else _split_plan(flat, b.bits)
    if not direct and not double and plan is None:
        raise _Refused("no digit split of the sums is exact in float32")
    rail_step = checked and node.outputs[0] in b.rail_nodes
    x = b.use(node.inputs[0])
    if spec.source is not None:
        x = spec.source(x)
    hint = node.outputs[0]
    folded = np.zeros_like(half) if rail_step else half  # the rounding half, added to the sums
    # Unless a rail step needs the sums as integers, the 2**-shift scaling rides in the weights and the start: a
    # power of two keeps every float32 partial sum exact, and the contraction delivers the value to round (a
    # guard compares the sums with the rails scaled the same way).
    scale = np.ones(channels) if rail_step else 2.0 ** -shift.astype(np.float64)
    dtype = F32 if direct else np.float64
    shape = [1, channels, *[1] * (spec.rank - 2)] if spec.channel_axis == 1 else [channels]

    def scaled(w: np.ndarray) -> np.ndarray:
        return w.reshape(weight.shape) * scale.reshape(-1, *[1] * (weight.ndim - 1))

    begin = (start + folded) * scale
    rounding = None
    if plan is not None and not checked:
        rounding = _plan_float32_rounding(b.bits, m.profile.rounding == "half_even", plan[0], plan[2], shift, begin)
    if direct:
        acc = spec.contract(
            x, b.const(spec.embed(scaled(weight)), hint), b.const(begin, hint) if np.any(begin) else None
        )
    elif rounding is not None:  # digit pairs rounded in float32, no double pass at all
        _round_split_sums_in_float32(b, node, spec, _activation_digits(b, x, plan[0], hint), rounding, scaled)
        return
    elif spec.contract_double is not None:  # one exact contraction in double instead of digit pairs
        wide = b.op("Cast", [x], to=TensorProto.DOUBLE)
        acc = spec.contract_double(wide, scaled(weight), begin if np.any(begin) else None)
    else:
        x_count, w_count, weights = plan
        parts = [
            b.op(
                "Cast",
                [spec.contract(digit, b.const(spec.embed(scaled(wd)), hint), None)],
                to=TensorProto.DOUBLE,
            )
            for _, digit in _activation_digits(b, x, x_count, hint)
            for wd in weights
        ]
        if np.any(begin):
            parts.append(b.const(begin.reshape(shape), hint, np.float64))
        acc = b.op("Sum", parts)  # integers below 2**53 (checked): exact in double, in any order
    if not checked:
        _round_saturate_scaled(b, acc, shift, node, dtype)
        return
    exact = float(magnitude.max(initial=0)) < EXACT_FLOAT32  # sum |x w| itself is exact in float32
    check = _RailCheck(spec, x, acc, dtype, rails, folded, scale, shape, exact)
    flag, bound = _rail_check(b, node, check, cheap_first=not rail_step)
    if rail_step:
        assert bound is not None  # a rail step measures the exact magnitude
        _rail_step(b, node, check, bound, flag, shift)
        return
    b.guard(flag, node)
    _round_saturate_scaled(b, acc, shift, node, dtype)


def _tiny(node: QNode, spec: _Accumulating) -> bool:
    """Whether a node with a double contraction in the graph does at most ``IN_GRAPH_PRODUCTS`` products per
    sample (from the float model's shape of its input): a squeeze-excite block's 1x1 convolutions, a classifier's
    last Gemm. It then stays in its segment, in double (``contract_double``): onnxruntime's double MatMul costs
    it a few microseconds, where a native step ends the segment (one more onnxruntime call and the step's own).
    Measured at batch 1 (ESP32-S3 int16, same process, interleaved): the 64-128-128-10 MLP 79 -> 64 us a sample,
    the Keras MNIST MLP 126 -> 107 us; onnxruntime's double MatMul of one row is slow beyond this size (a
    784 x 128 layer 71 us, against 16 us natively)."""
    shape = (node.input_shapes or [None])[0]
    if spec.contract_double is None or shape is None or len(shape) < 2:
        return False
    if not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        return False
    rows = int(np.prod(shape[1:], dtype=np.int64)) // max(shape[spec.channel_axis] or 1, 1)  # outputs per channel
    return rows * spec.weight.size <= IN_GRAPH_PRODUCTS


def _native_step(
    b: _Builder,
    node: QNode,
    make: Callable[[native.Requantize], Callable[[np.ndarray], np.ndarray]],
    start: np.ndarray,
    shift: np.ndarray,
) -> None:
    """End the segment before ``node`` and compute it whole in double (simulator/native.py): its sums are beyond
    float32's integers but exact in double (checked by the caller), and no lane can reach a rail."""
    b.integer_activation(node.inputs[0])
    low, high, output = _clamp(b, node)
    half_even = b.model.profile.rounding == "half_even"
    requantize = native.Requantize(start, 2.0 ** -shift.astype(np.float64), half_even, low, high)
    b.pending = (_NativeStep(node, (node.inputs[0],), output, make(requantize)), lambda _: None)


def _native_product(b: _Builder, node: QNode, shift: int) -> None:
    """End the segment before the int16 Mul ``node`` (SIMD rule) and compute it in double (``native.Product``):
    onnxruntime would cast both operands and the product to double and take five more passes over them."""
    activations = [t for t in node.inputs[:2] if t not in b.model.constants]
    for tensor in activations:
        b.integer_activation(tensor)
    half_even = b.model.profile.rounding == "half_even"
    start = _half(np.asarray([shift]), b.model.profile.rounding).astype(np.float64)
    low, high, output = _clamp(b, node)
    product = native.Product(native.Requantize(start, np.asarray([2.0**-shift]), half_even, low, high))
    kernel: Callable[..., np.ndarray] = product
    if len(activations) == 1:  # a constant operand, bound here once (as float32 integers, like the other)
        tensor = next(t for t in node.inputs[:2] if t in b.model.constants)
        constant = b.constant(tensor).astype(np.int64).astype(F32)
        first = tensor == node.inputs[0]
        kernel = functools.partial(_with_constant, product, constant, first)
    b.pending = (_NativeStep(node, tuple(activations), output, kernel), lambda _: None)


def _lower_softmax(b: _Builder, node: QNode) -> None:
    """An int8 / int16 Softmax to float32 probabilities, as ``kernels.softmax_float`` computes them: each exp a
    lookup, the sum CumSum's (onnxruntime adds along the axis strictly in order, as ``np.add.accumulate``), its
    last element the total, one float32 division. int8 looks up ``x`` itself (the exp table, no max subtracted);
    int16 subtracts the max first, and ``(x - max) * 2**e`` is exact in float32 (an integer of 17 bits times a power
    of two), so its exp is a table over the 65,536 differences. One node run of the graph instead of a step of its
    own between two segments (a classifier's head at batch 1 paid more for the break than for the Softmax)."""
    m, source = b.model, node.inputs[0]
    exponent = m.exponents.get(source)
    if source in m.float_tensors or node.outputs[0] not in m.float_tensors or not isinstance(exponent, int):
        raise _Refused("a float input, an integer output or per-channel exponents")
    width = m.width(source)
    x, axis, hint = b.use(source), int(node.attrs.get("axis", -1)), node.outputs[0]
    if width == 8:
        exps = b.fresh("exp")
        _gather(b, kernels.softmax_table(exponent), x, qmin(8), exps)
    elif width == 16:
        below = b.op("Sub", [x, b.op("ReduceMax", [x], axes=[axis], keepdims=1)])  # -65535 ... 0
        table = libm.expf((-np.arange(1 << 16, dtype=np.float64) * 2.0**exponent).astype(F32))  # exp(-k 2**e)
        exps = _gather_rolled(b, np.roll(table[::-1], 1), below, b.fresh("exp"))  # index -k reads exp(-k 2**e)
    else:
        raise _Refused("Softmax beyond int16")
    running = b.op("CumSum", [exps, b.const(axis, hint, np.int64)])
    total = b.op("Gather", [running, b.const([-1], hint, np.int64)], axis=axis)
    b.op("Div", [exps, total], hint)


def _with_constant(product: native.Product, constant: np.ndarray, first: bool, x: np.ndarray) -> np.ndarray:
    return product(constant, x) if first else product(x, constant)


@dataclass(eq=False)  # compared by identity
class _DigitPart:
    """One digit-pair contraction of a split sum, scaled: ``value = sum(x digit * w digit) * 2**(place - shift)``
    (times 1/2 under half-even) plus ``start``, a float32 tensor holding a multiple of ``2**granularity`` (or of
    1, whichever is finer) below ``bound``, per output channel."""

    place: int  # the activation digit's place
    weight: np.ndarray  # the weight digit, scaled by its place value
    granularity: np.ndarray
    bound: np.ndarray
    start: np.ndarray | None = None

    def exact_with(self, start: np.ndarray) -> bool:
        """Whether the contraction stays exact in float32 with ``start`` added (every partial sum is the start
        plus some products, a multiple of the finer of its granularity and the start's)."""
        finest = np.minimum(self.granularity, 0).astype(np.float64)
        return float(((self.bound + np.abs(start)) * 2.0**-finest).max()) < EXACT_FLOAT32


@dataclass(frozen=True)
class _Float32Rounding:
    """How a digit-split sum is rounded in float32 (see :func:`_plan_float32_rounding`): the finest part, the
    coarse ones in increasing size, and which of those are cut into integer and fraction."""

    fine: _DigitPart
    coarse: list[_DigitPart]
    cut: list[_DigitPart]
    unit: float  # 1/2 under half-even, else 1


def _plan_float32_rounding(
    bits: int, half_even: bool, x_count: int, weights: list[np.ndarray], shift: np.ndarray, begin: np.ndarray
) -> _Float32Rounding | None:
    """Whether (and how) a digit-split sum can be rounded without double; None when a bound forbids it.

    Adding the parts in double costs a cast per part and double-width passes, most of an int16 layer's time.
    Instead every part but the finest (the low digits, whose granularity is the rounding's) is cut into its
    integer ``I = floor(v)`` and fraction ``v - I`` (both exact); the fractions and the finest part add up exactly
    in float32 when the checked bound keeps them below ``2**24`` units of the finest granularity, and round to
    ``r``. Then ``y = r + sum I``: every add but the last is checked exact, and the last is exact or lands beyond
    ``2**24`` on the right side, which saturation treats the same. The start (bias and rounding half) is cut the
    same way: its fraction rides on the finest contraction, its integer on a coarse one. Half-even works at half
    scale, so the integers it adds are even and cannot change which neighbour a tie goes to."""
    unit = 0.5 if half_even else 1.0
    channels = shift.shape[0]
    x_bounds = dict(zip(_digit_shifts(bits, x_count), _digit_bounds(bits, x_count)))
    columns = [np.abs(weight.reshape(channels, -1)).sum(axis=1).astype(np.float64) for weight in weights]
    parts = []
    for place in _digit_shifts(bits, x_count):
        scale = unit * 2.0 ** (place - shift).astype(np.float64)
        for w_place, weight, column in zip(_digit_shifts(bits, len(weights)), weights, columns):
            granularity = place + w_place - shift - (1 if half_even else 0)
            parts.append(_DigitPart(place, weight, granularity, x_bounds[place] * column * scale))
    fine = min(parts, key=lambda part: int(part.granularity.min()))
    coarse = [part for part in parts if part is not fine]
    cut = [part for part in coarse if int(part.granularity.min()) < 0]
    start = begin * unit
    whole_start = np.floor(start)
    fine.start = start - whole_start
    if any(int(part.granularity.min()) < -24 for part in cut) or not fine.exact_with(fine.start + len(cut)):
        return None  # a fraction, or the fractions' sum, not exact
    if np.any(whole_start):  # carried by the smallest coarse contraction that stays exact with it
        host = next((part for part in sorted(coarse, key=_largest) if part.exact_with(whole_start)), None)
        if host is None:
            return None
        host.start, host.bound = whole_start, host.bound + np.abs(whole_start)
    coarse.sort(key=_largest)
    # Every addition of integers but the last must be exact. Half-up: r, then the coarse integers in increasing
    # size. Half-even: the coarse integers (half units) first, doubled, then r (within 2**24, so that a last sum
    # beyond 2**24 stays beyond the saturation bounds after r is added).
    fractions = fine.bound + 1 + len(cut)
    smaller = sum((part.bound + 1 for part in coarse[:-1]), np.zeros(channels))  # |floor(v)| <= |v| + 1
    before_last = np.maximum(smaller, 2 * fractions + 1) if half_even else fractions + 1 + smaller
    if float(before_last.max()) >= EXACT_FLOAT32:
        return None
    return _Float32Rounding(fine, coarse, cut, unit)


def _largest(part: _DigitPart) -> float:
    return float(part.bound.max())


def _round_split_sums_in_float32(
    b: _Builder,
    node: QNode,
    spec: _Accumulating,
    digits: list[tuple[int, str]],
    plan: _Float32Rounding,
    scaled: Callable[[np.ndarray], np.ndarray],
) -> None:
    """Build the plan of :func:`_plan_float32_rounding`: contractions, cuts, rounding, saturation."""
    hint, names = node.outputs[0], dict(digits)

    def value(part: _DigitPart) -> str:
        weight = spec.embed(scaled(part.weight) * plan.unit)
        bias = b.const(part.start, hint) if part.start is not None and np.any(part.start) else None
        return spec.contract(names[part.place], b.const(weight, hint), bias)

    fraction, integers = value(plan.fine), []
    for part in plan.coarse:
        whole = value(part)
        if part in plan.cut:
            integer = b.op("Floor", [whole])
            fraction = b.op("Add", [fraction, b.op("Sub", [whole, integer])])
            whole = integer
        integers.append(whole)
    if plan.unit != 1.0:  # half-even, at half scale
        y = b.op("Round", [b.op("Mul", [fraction, b.const(2.0, hint)])])
        if integers:
            total = integers[0]
            for integer in integers[1:]:
                total = b.op("Add", [total, integer])
            y = b.op("Add", [y, b.op("Mul", [total, b.const(2.0, hint)])])
    else:
        y = b.op("Floor", [fraction])
        for integer in integers:
            y = b.op("Add", [y, integer])
    low, high, output = _clamp(b, node)
    b.saturate(y, output, bounds=(low, high))


def _clamp(b: _Builder, node: QNode) -> tuple[int, int, str]:
    """``(low, high, output)``: the saturation bounds of an accumulating node (fused ReLU included) and the tensor
    it writes; when a Relu / Clip that only this node feeds was fused into it (``_clamp_fusions``), the
    intersection of both ranges and that node's output."""
    low, high = (0 if node.relu else qmin(b.bits)), qmax(b.bits)
    fused = b.clamps.get(node.outputs[0])
    if fused is None:
        return low, high, node.outputs[0]
    return max(low, fused[0]), min(high, fused[1]), fused[2]


def _round_saturate_scaled(b: _Builder, value: str, shift: np.ndarray, node: QNode, dtype: Any) -> None:
    """``sat(R(v))`` of the scaled sums ``v = (S + start + half) 2**-shift`` (half only for half-up). Saturating
    first is the same (the bounds are integers) and lets onnxruntime fuse the Clip into the Conv / Gemm; a
    double value is rounded in double, then saturated in float32 (large values stay beyond the bounds)."""
    low, high, output = _clamp(b, node)
    rounding = "Round" if b.model.profile.rounding == "half_even" else "Floor"
    exact = not np.any(shift > 0)  # left shifts only: already integers
    if dtype == F32:
        clipped = b.op("Clip", [value, b.const(low, output), b.const(high, output)], None if not exact else output)
        if not exact:
            b.op(rounding, [clipped], output)
        return
    rounded = value if exact else b.op(rounding, [value])
    narrow = b.op("Cast", [rounded], to=TensorProto.FLOAT)
    b.op("Clip", [narrow, b.const(low, output), b.const(high, output)], output)


@dataclass(frozen=True)
class _RailCheck:
    """What :func:`_rail_check` reads of an accumulating node: ``acc`` holds ``(S + start + folded) * scale``
    (``scale``: ``2**-shift`` per output channel for a guard, 1 for a rail step, which needs integer sums)."""

    spec: _Accumulating
    x: str
    acc: str
    dtype: Any
    rails: lanes.LaneRails
    folded: np.ndarray
    scale: np.ndarray
    shape: list[int]
    exact: bool  # sum |x w| is exact in float32

    def channels(self, values: np.ndarray) -> np.ndarray:
        """Per-channel integer quantities in the sums' scale, shaped to broadcast against them."""
        return (values * self.scale).reshape(self.shape)


def _rail_check(b: _Builder, node: QNode, check: _RailCheck, cheap_first: bool = False) -> tuple[str, str | None]:
    """``(flag, magnitude)``: the graph's scalar "some output may saturate" (``lanes.risky`` on the whole
    tensor) and the magnitude ``M >= sum |x w|`` it used, in the sums' scale (exact when the sums are; else
    enlarged by a relative margin that covers float32's rounding in any summation order). A power-of-two scale
    changes no comparison: sums, magnitudes and rails are all scaled alike, exactly.

    With ``cheap_first`` (a guard, which needs only the flag) the graph first tries a bound that costs no second
    contraction: Cauchy-Schwarz, ``M <= ||x patch|| * ||w_n||`` (:func:`_patch_norm_bound`). Only when that one
    reaches a rail does an ``If`` compute ``M`` itself; the magnitude is then not returned (None)."""
    hint = node.outputs[0]
    # With u = S + 2 start (an integer) and rails [-2^(w-1), 2^(w-1) - 1], "u + M > 2 high or u - M < 2 low"
    # is "|u + 1| + M >= 2^w" (M may only be larger than the true integer magnitude): one pass fewer per side.
    offset = check.channels((check.rails.start - check.folded + 1).astype(np.float64))
    distance = b.op("Abs", [b.op("Add", [check.acc, b.const(offset, hint, check.dtype)])])
    if not cheap_first:
        magnitude = _magnitude(b, node, check)
        return _reaches_rail(b, b.op("Add", [distance, magnitude]), check, hint), magnitude
    cheap = _reaches_rail(b, b.op("Add", [distance, _patch_norm_bound(b, node, check)]), check, hint)

    def precise() -> str:
        return _reaches_rail(b, b.op("Add", [distance, _magnitude(b, node, check)]), check, hint)

    return _confirmed(b, cheap, precise), None


def _confirmed(b: _Builder, cheap: str, precise: Callable[[], str]) -> str:
    """The scalar flag ``cheap`` (a bound that may be too large), confirmed or cleared where it is set by the
    flag ``precise`` builds: an ``If`` runs those nodes only then."""
    mark = len(b.nodes)
    flag = precise()
    then_nodes = b.nodes[mark:]
    del b.nodes[mark:]
    kept = b.fresh("kept")
    return b.op(
        "If",
        [cheap],
        then_branch=helper.make_graph(
            then_nodes, b.fresh("precise"), [], [helper.make_tensor_value_info(flag, TensorProto.BOOL, [])]
        ),
        else_branch=helper.make_graph(
            [helper.make_node("Identity", [cheap], [kept])],
            b.fresh("cheap"),
            [],
            [helper.make_tensor_value_info(kept, TensorProto.BOOL, [])],
        ),
    )


def _magnitude(b: _Builder, node: QNode, check: _RailCheck) -> str:
    """``M >= sum |x w|`` per output, in the sums' scale: the contraction of ``|x|`` with ``|w|``."""
    hint, spec = node.outputs[0], check.spec
    size = check.x if b.nonnegative(node.inputs[0]) else b.op("Abs", [check.x])  # after a ReLU: already |x|
    scaled = np.abs(spec.weight) * check.scale.reshape(-1, *[1] * (spec.weight.ndim - 1))
    magnitude = spec.contract(size, b.const(spec.embed(scaled), hint + "::abs"), None)
    if not check.exact:
        taps = spec.weight[0].size
        margin = 1.0 + (taps + 4) * 2.0**-22
        magnitude = b.op("Mul", [magnitude, b.const(margin, hint)])
        magnitude = b.op("Add", [magnitude, b.const(check.channels(np.ones(len(check.scale))), hint)])
    return b.op("Cast", [magnitude], to=TensorProto.DOUBLE) if check.dtype != F32 else magnitude


def _patch_norm_bound(b: _Builder, node: QNode, check: _RailCheck) -> str:
    """``||x patch||_2 * ||w_n||_2 >= sum |x w|`` per output (Cauchy-Schwarz), in the sums' scale, safely
    rounded up.

    The patch norms are one contraction of ``x * x`` with a single all-ones filter (a depthwise layer: one per
    channel, as cheap as the layer), far less than the second full contraction ``M`` needs. Float32 may round
    the sum of squares (relative error below ``taps * 2**-24`` in any order), the square root and the products
    (``2**-24`` each): the weight norms carry a relative margin for all of them, and 2 more units cover the
    final addition."""
    hint, spec = node.outputs[0], check.spec
    weight = spec.weight.astype(np.float64)
    taps = weight[0].size
    ones = np.ones(weight.shape if spec.depthwise else (1, *weight.shape[1:]))
    squares = spec.contract(b.op("Mul", [check.x, check.x]), b.const(spec.embed(ones), hint + "::ones"), None)
    norms = np.sqrt((weight.reshape(weight.shape[0], -1) ** 2).sum(axis=1)) * (1.0 + (taps + 16) * 2.0**-22)
    norms = np.nextafter(check.channels(norms).astype(np.float32), np.float32(np.inf))
    bound = b.op("Mul", [b.op("Sqrt", [squares]), b.const(norms, hint)])
    bound = b.op("Add", [bound, b.const(check.channels(np.full(len(check.scale), 2.0)), hint)])
    return b.op("Cast", [bound], to=TensorProto.DOUBLE) if check.dtype != F32 else bound


def _reaches_rail(b: _Builder, reach: str, check: _RailCheck, hint: str) -> str:
    """The scalar flag "some ``reach`` (per output, ``|u + 1| + M`` in the sums' scale) is at least its lane's
    ``2**width`` (scaled alike)"""
    span = 2.0**check.rails.width * check.scale
    if np.all(span == span[0]):
        maximum = b.op("ReduceMax", [reach], keepdims=0)
        return b.op("GreaterOrEqual", [maximum, b.const(span[0], hint, check.dtype)])
    excess = b.op("Sub", [reach, b.const(span.reshape(check.shape), hint, check.dtype)])
    worst = b.op("ReduceMax", [excess], keepdims=0)
    return b.op("GreaterOrEqual", [worst, b.const(0.0, hint, check.dtype)])


def _rail_step(b: _Builder, node: QNode, check: _RailCheck, magnitude: str, flag: str, shift: np.ndarray) -> None:
    """End the segment after the sums: a rail step fixes the outputs that may saturate, a new segment shifts."""
    spec, x, acc, dtype = check.spec, check.x, check.acc, check.dtype
    double = dtype != F32
    b.exports += [acc, magnitude, flag] + ([x] if x not in b.consumed else [])  # made here: handed on
    if double:
        b.types[acc] = b.types[magnitude] = TensorProto.DOUBLE
    b.types[flag] = TensorProto.BOOL
    step = _RailStep(
        node=node,
        x=x,
        acc=acc,
        magnitude=magnitude,
        flag=flag,
        rails=check.rails,
        channel_axis=spec.channel_axis,
        products=spec.products,
        taps=int(spec.weight[0].size),
        max_product=int(2 ** (b.bits - 1)) * int(np.abs(spec.weight.astype(np.int64)).max(initial=0)),
        magnitude_exact=check.exact,
    )

    def finish(nb: _Builder) -> None:
        source = nb.use(acc, TensorProto.DOUBLE if double else TensorProto.FLOAT)
        y = nb.shift_round(source, shift.reshape(check.shape), node.outputs[0], dtype=dtype)
        low, high, output = _clamp(nb, node)
        nb.saturate(y, output, dtype=dtype, bounds=(low, high))

    b.pending = (step, finish)


def _conv_geometry(node: QNode, one_d: bool = False) -> dict[str, Any]:
    """Strides, pads and dilations of a 2-D convolution; a 1-D one's as the 2-D one of height 1 that computes it
    (``interpreter._conv_operands``)."""
    if one_d:
        pads = list(node.attrs.get("pads", [0, 0]))
        return {
            "strides": [1, *node.attrs.get("strides", [1])],
            "pads": [0, pads[0], 0, pads[1]],
            "dilations": [1, *node.attrs.get("dilations", [1])],
        }
    return {
        "strides": list(node.attrs.get("strides", [1, 1])),
        "pads": list(node.attrs.get("pads", [0, 0, 0, 0])),
        "dilations": list(node.attrs.get("dilations", [1, 1])),
    }


def _lower_conv(b: _Builder, node: QNode) -> None:
    """A 2-D convolution, or a 1-D one as the 2-D convolution of height 1 that the interpreter computes: its
    input gains that axis inside each contraction (Unsqueeze, Conv, Squeeze), and a native step lifts and drops
    it around the 2-D kernel, so every other step of :func:`_accumulating` sees the node's own 3-D tensors."""
    w = b.constant(node.inputs[1])
    one_d = w.ndim == 3
    if one_d:
        w = w[:, :, None, :]
    if w.ndim != 4:
        raise _Refused("only 1-D and 2-D convolutions are compiled")
    group = int(node.attrs.get("group", 1))
    depthwise = group != 1
    if depthwise and not (w.shape[1] == 1 and group == w.shape[0]):
        raise _Refused("grouped (non-depthwise) convolution")
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
        raise _Refused("auto_pad")
    bias = b.constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
    geometry = _conv_geometry(node, one_d)
    attrs = {**geometry, "group": group}
    height = b.const([2], node.outputs[0], np.int64) if one_d else ""

    def contract(x: str, weight: str, start: str | None) -> str:
        x = b.op("Unsqueeze", [x, height]) if one_d else x
        sums = b.op("Conv", [x, weight] + ([start] if start else []), **attrs)
        return b.op("Squeeze", [sums, height]) if one_d else sums

    def products(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        return lanes.conv_products(x[:, :, None, :] if one_d else x, w, depthwise=depthwise, **geometry)

    def whole(requantize: native.Requantize) -> Callable[[np.ndarray], np.ndarray]:
        conv = native.Conv(w, **geometry, depthwise=depthwise, requantize=requantize)
        return functools.partial(_one_d, conv) if one_d else conv

    plain = {"strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1]}
    pointwise = w.shape[2:] == (1, 1) and not depthwise and geometry == plain
    double = _pointwise_double(b, node.outputs[0], _known_shape(node)) if pointwise else None
    spec = _Accumulating(
        w, bias, contract, products, depthwise=depthwise, contract_double=double, native=whole, rank=3 if one_d else 4
    )
    _accumulating(b, node, spec)


def _one_d(conv: native.Conv, x: np.ndarray) -> np.ndarray:
    """A 1-D convolution on ``(N, C, L)`` by the 2-D kernel of height 1."""
    return conv(x[:, :, None, :])[:, :, 0, :]


def _lower_conv_transpose(b: _Builder, node: QNode) -> None:
    """ConvTranspose as ESP-DL runs it (``interpreter._conv_transpose``): zeros inserted between the pixels
    (onnxruntime's own ConvTranspose with a 1x1 kernel of ones, one channel per group: each output takes at
    most one input, exact), padded or cropped (Pad with negative pads), then a stride-1 Conv with the kernel
    flipped and its channel axes swapped, lowered like any Conv."""
    w = b.constant(node.inputs[1])
    if w.ndim != 4 or int(node.attrs.get("group", 1)) != 1:
        raise _Refused("only 2-D, group-1 transposed convolutions are compiled")
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "") or "output_shape" in node.attrs:
        raise _Refused("auto_pad / output_shape")
    strides = list(node.attrs.get("strides", [1, 1]))
    dilations = list(node.attrs.get("dilations", [1, 1]))
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    extra = list(node.attrs.get("output_padding", [0, 0]))
    kh, kw = w.shape[2:]
    begin = [dilations[0] * (kh - 1) - pads[0], dilations[1] * (kw - 1) - pads[1]]
    end = [dilations[0] * (kh - 1) - pads[2] + extra[0], dilations[1] * (kw - 1) - pads[3] + extra[1]]
    flipped = np.ascontiguousarray(np.flip(w, axis=(2, 3)).transpose(1, 0, 2, 3))  # (C_out, C_in, KH, KW)
    bias = b.constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
    hint = node.outputs[0]
    channels = w.shape[0]

    def source(x: str) -> str:
        if strides != [1, 1]:
            ones = b.const(np.ones((channels, 1, 1, 1)), hint)
            x = b.op("ConvTranspose", [x, ones], group=channels, strides=strides, kernel_shape=[1, 1])
        if any(begin) or any(end):
            x = b.op("Pad", [x, b.const([0, 0, *begin, 0, 0, *end], hint, np.int64)])
        return x

    def contract(x: str, weight: str, start: str | None) -> str:
        return b.op("Conv", [x, weight] + ([start] if start else []), dilations=dilations)

    def products(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        geometry = {"strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": dilations}
        return lanes.conv_products(x, flipped, depthwise=False, **geometry)

    _accumulating(b, node, _Accumulating(flipped, bias, contract, products, source=source))


def _pointwise_double(
    b: _Builder, hint: str, shape: list[int] | None
) -> Callable[[str, np.ndarray, np.ndarray | None], str]:
    """A 1x1 convolution (stride 1, no padding) in double: ``W (N, C) @ x (B, C, H*W)``, shaped back: to
    ``[batch, N, H, W]`` from the float model's input ``shape`` (``[C, H, W]``) when it gives one, else from the
    input's run-time shape (four more nodes, each a few microseconds on a squeeze-excite block's tiny tensors)."""

    def contract(x: str, weight: np.ndarray, start: np.ndarray | None) -> str:
        channels = weight.shape[0]
        rows = b.op("Reshape", [x, b.const([0, 0, -1], hint, np.int64)])
        sums = b.op("MatMul", [b.const(weight.reshape(channels, -1), hint, np.float64), rows])
        if start is not None:
            sums = b.op("Add", [sums, b.const(start.reshape(channels, 1), hint, np.float64)])
        if shape is not None and len(shape) == 3:
            return b.op("Reshape", [sums, b.const([0, channels, *shape[1:]], hint, np.int64)])
        shape_now = b.op("Shape", [x])
        target = b.op(
            "Concat",
            [
                b.op("Slice", [shape_now, b.const([0], hint, np.int64), b.const([1], hint, np.int64)]),
                b.const([channels], hint, np.int64),
                b.op("Slice", [shape_now, b.const([2], hint, np.int64), b.const([2**62], hint, np.int64)]),
            ],
            axis=0,
        )
        return b.op("Reshape", [sums, target])

    return contract


def _contract_rows(b: _Builder) -> Callable[[str, str, str | None], str]:
    def contract(x: str, weight: str, start: str | None) -> str:
        product = b.op("MatMul", [x, weight])
        return b.op("Add", [product, start]) if start else product

    return contract


def _contract_rows_double(b: _Builder, hint: str) -> Callable[[str, np.ndarray, np.ndarray | None], str]:
    """``x (..., K) @ W (K, N) + start`` in double (``weight`` has output channels first)."""

    def contract(x: str, weight: np.ndarray, start: np.ndarray | None) -> str:
        product = b.op("MatMul", [x, b.const(np.ascontiguousarray(weight.T), hint, np.float64)])
        return b.op("Add", [product, b.const(start, hint, np.float64)]) if start is not None else product

    return contract


def _lower_gemm(b: _Builder, node: QNode) -> None:
    if node.attrs.get("transA", 0):
        raise _Refused("transA")
    w = b.constant(node.inputs[1])
    w = w.T if node.attrs.get("transB", 0) else w  # (K, M)
    bias = b.constant(node.inputs[2]).reshape(-1) if len(node.inputs) > 2 and node.inputs[2] else None
    if bias is not None and bias.size not in (1, w.shape[1]):
        raise _Refused("bias shape")

    def products(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        return lanes.rows_products(x, w)

    def embed(oc_first: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(oc_first.T)

    double = _contract_rows_double(b, node.outputs[0])
    spec = _Accumulating(
        w.T, bias, _contract_rows(b), products, embed, channel_axis=-1, contract_double=double, native=_rows(w)
    )
    _accumulating(b, node, spec)


def _rows(weight: np.ndarray) -> Callable[[native.Requantize], native.Rows]:
    """``x @ weight (K, M)`` requantized, in double (Gemm, MatMul by a constant)."""
    return functools.partial(native.Rows, weight)


def _lower_matmul(b: _Builder, node: QNode) -> None:
    """MatMul by a constant 2-D B: per batch slice a 1x1 convolution without bias (``kernels.matmul_slices``),
    which ONNX's MatMul broadcasting computes for any rank of A (1-D A included); by a run-time B,
    :func:`_lower_matmul_activations`."""
    if node.inputs[1] not in b.model.constants:
        _lower_matmul_activations(b, node)
        return
    if isinstance(b.model.exponents.get(node.inputs[1]), list):
        raise _Refused("MatMul by a per-channel B")
    w = b.constant(node.inputs[1])
    if w.ndim != 2:
        raise _Refused("MatMul by a B of rank other than 2")

    def products(x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        return lanes.rows_products(x, w)

    spec = _Accumulating(
        w.T,
        None,
        _contract_rows(b),
        products,
        lambda oc_first: np.ascontiguousarray(oc_first.T),
        channel_axis=-1,
        contract_double=_contract_rows_double(b, node.outputs[0]),
        shift_exponent=b.model.exponent(node.inputs[1]),
        native=_rows(w),
    )
    _accumulating(b, node, spec)


def _lower_matmul_activations(b: _Builder, node: QNode) -> None:
    """MatMul of two activations (attention's ``Q K^T`` and its weights times ``V``) as ``kernels.matmul_slices``
    computes it: the exact integer sums (float32 while every partial sum, with the rounding half, stays below
    2**24, else double), shifted with the profile's rounding, ReLU, saturated. On the SIMD chips a lane could
    reach its rail where ``2**(a_bits-1) 2**(b_bits-1) K`` does: a guard then checks this data's ``sum |a| |b|``
    against the narrowest lane and sends the node to the interpreter when it trips. Both operands must be known
    to have at least two axes (a 1-D product has shape ``[1]`` in the interpreter, a scalar in ONNX)."""
    m = b.model
    if node.outputs[0] in b.rail_nodes:  # its guard tripped: no rail step for run-time weights
        raise _Refused("a MatMul of two activations whose lanes reached a rail")
    shapes = (node.input_shapes or [None, None])[:2]
    if len(shapes) < 2 or any(shape is None or len(shape) < 2 for shape in shapes):
        raise _Refused("MatMul of operands of unknown or single rank")
    depth, columns = shapes[0][-1], shapes[1][-1]  # type: ignore[index]
    exponents = [m.exponents.get(t) for t in (*node.inputs[:2], node.outputs[0])]
    if not isinstance(depth, int) or not all(isinstance(e, int) for e in exponents):
        raise _Refused("MatMul over an axis of unknown length, or per-channel exponents")
    e_a, e_b, e_out = (int(e) for e in exponents)  # type: ignore[arg-type]
    shift = e_out - e_a - e_b
    bound = 2.0 ** (m.width(node.inputs[0]) - 1) * 2.0 ** (m.width(node.inputs[1]) - 1) * depth
    half = 2.0 ** (shift - 1) if shift > 0 and m.profile.rounding == "half_up" else 0.0
    if bound + half >= EXACT_FLOAT64:
        raise _Refused("the sums are not exact in double")
    dtype = F32 if bound + half < EXACT_FLOAT32 else np.float64
    a, c = b.use(node.inputs[0]), b.use(node.inputs[1])
    operands = [a, c] if dtype == F32 else [b.op("Cast", [t], to=TensorProto.DOUBLE) for t in (a, c)]
    ranks = (len(shapes[0]), len(shapes[1]))  # type: ignore[arg-type]
    sums = _batched_product(b, operands, dtype, ranks)
    if m.profile.simd:  # kernels._accumulate: lane blocks of the SIMD width, the tail columns in the wider lanes
        lanes_n = simd_lanes(node.bits)
        widths = []
        if not isinstance(columns, int) or columns >= lanes_n:
            widths.append(m.profile.conv_acc_bits[node.bits])
        if not isinstance(columns, int) or columns % lanes_n:
            widths.append(m.profile.tail_acc_bits[node.bits])
        limit = 2.0 ** (min(widths) - 1)
        if bound >= limit:
            widest = 2.0 ** (2 * max(m.width(t) for t in node.inputs[:2]) - 2) * depth  # above every sum of squares
            squared = (
                operands
                if dtype == np.float64 or widest < EXACT_FLOAT32
                else [b.op("Cast", [t], to=TensorProto.DOUBLE) for t in operands]
            )
            b.guard(_products_reach(b, operands, squared, limit, dtype, ranks, node.outputs[0]), node)
    rounded = b.shift_round(sums, np.asarray([shift]), node.outputs[0], dtype=dtype)
    low, high, output = _clamp(b, node)
    b.saturate(rounded, output, dtype=dtype, bounds=(low, high))


def _batched_product(b: _Builder, operands: list[str], dtype: Any, ranks: tuple[int, int]) -> str:
    """``a @ b`` with ONNX's MatMul broadcasting (operands of ``ranks``); in double as an Einsum: onnxruntime
    before 1.24 fuses a Transpose before a MatMul into its FusedMatMul, which has no double kernel (a session of
    ``K^T`` in double then fails to load; onnxruntime 1.23.2, Python 3.10). Einsum broadcasts axes of length 1
    but wants as many batch axes on both sides: the shorter operand gains leading ones."""
    if dtype == F32:
        return b.op("MatMul", operands)
    lifted = [
        b.op("Unsqueeze", [t, b.const(np.arange(max(ranks) - rank), t, np.int64)]) if rank < max(ranks) else t
        for t, rank in zip(operands, ranks)
    ]
    return b.op("Einsum", lifted, equation="...ij,...jk->...ik")


def _products_reach(
    b: _Builder, operands: list[str], squared: list[str], limit: float, dtype: Any, ranks: tuple[int, int], hint: str
) -> str:
    """The scalar flag "some ``sum_k |a_ik| |b_kj|`` reaches ``limit``" of a MatMul of two activations (exact
    integers in ``dtype``). First Cauchy-Schwarz over the whole batch, ``max_i ||a_i||^2 max_j ||b_j||^2 >= limit^2``
    (two reductions of ``squared``, the operands in a type that holds their sums of squares exactly, and no
    second product; the product of the two maxima in double with a relative margin for its rounding); only
    where that reaches the limit, the magnitudes themselves (``|a| @ |b|``)."""
    largest = []
    for operand, axis in zip(squared, (-1, -2)):
        squares = b.op("ReduceSumSquare", [operand], axes=[axis], keepdims=0)
        largest.append(b.op("Cast", [b.op("ReduceMax", [squares], keepdims=0)], to=TensorProto.DOUBLE))
    squared_limit = limit * limit * (1.0 - 2.0**-40)
    cheap = b.op("GreaterOrEqual", [b.op("Mul", largest), b.const(squared_limit, hint, np.float64)])

    def precise() -> str:
        magnitude = _batched_product(b, [b.op("Abs", [t]) for t in operands], dtype, ranks)
        reach = b.op("ReduceMax", [magnitude], keepdims=0)
        return b.op("GreaterOrEqual", [reach, b.const(limit, hint, dtype)])

    return _confirmed(b, cheap, precise)


def _lower_add_sub(b: _Builder, node: QNode) -> None:
    """Integer Add / Sub of operands at the output's exponent, saturated (and clamped by a fused Relu / Clip)."""
    a, c = (b.use(t) if t not in b.model.constants else _int_const(b, t) for t in node.inputs)
    low, high, output = _clamp(b, node)
    b.saturate(b.op(node.op_type, [a, c], name=_same_shape_mark(node)), output, bounds=(low, high))


def _same_shape_mark(node: QNode) -> str | None:
    """``layout.SAME_SHAPE`` and the node's output when the float model gives its first two inputs one shape (every
    axis but the batch a number, the batch the same name or number): such an op of two activations may run on
    onnxruntime's blocked tensors; one that may broadcast may not (simulator/layout.py)."""
    shapes = (node.input_shapes or [])[:2]
    if len(shapes) < 2 or shapes[0] is None or shapes[0] != shapes[1] or not shapes[0]:
        return None
    if not all(isinstance(d, int) for d in shapes[0][1:]) or shapes[0][0] is None:
        return None
    return SAME_SHAPE + node.outputs[0]


def _int_const(b: _Builder, tensor: str) -> str:
    value = b.constant(tensor)
    if np.abs(value.astype(np.int64)).max(initial=0) >= EXACT_FLOAT32:
        raise _Refused("constant too wide for float32")
    return b.const(value, tensor)


def _lower_table(b: _Builder, node: QNode) -> None:
    """An int8 activation by its stored table: ``T[q + 128]`` (a Gather on the float32 table); any other width
    as :func:`_lower_elementwise`."""
    assert node.table is not None
    if node.bits != 8 or b.model.width(node.inputs[0]) != 8:
        _lower_elementwise(b, node)
        return
    _gather(b, node.table.reshape(-1), b.use(node.inputs[0]), qmin(8), node.outputs[0])


def _known_shape(node: QNode) -> list[int] | None:
    """The float model's shape of the node's first input when every axis but the batch is a number."""
    shape = (node.input_shapes or [None])[0]
    if shape is None or len(shape) < 1 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        return None
    return [int(d) for d in shape[1:]]  # type: ignore[arg-type]


def _gather(b: _Builder, table: np.ndarray, x: str, lowest: int, output: str) -> None:
    """``table[x - lowest]`` for the integers ``x`` (exact in float32) of a signed width (``lowest = -size / 2``).

    Negative indices count from the end, so the table rolled by half its size is indexed by ``x`` itself (one
    pass fewer than adding ``-lowest``). The lookup is GatherElements on the flattened indices, not Gather:
    onnxruntime's Gather copies element by element through its generic block path (about 16 ns per element on
    this machine) while GatherElements is a plain loop (about 2.3 ns); the two Reshapes are views. The shape back
    is always ``Shape(x)``, even where the float model knows it: that is how simulator/layout.py recognises a
    lookup it may run on onnxruntime's blocked tensors (a constant shape could be a Reshape of the plane that
    onnxruntime merged into this one)."""
    assert table.size == -2 * lowest
    _gather_rolled(b, np.roll(table, lowest), x, output)


def _gather_rolled(b: _Builder, rolled: np.ndarray, x: str, output: str) -> str:
    """``rolled[x]`` for integers ``x`` in ``[-rolled.size, rolled.size)`` (negative ones count from the end), in
    ``x``'s shape: :func:`_gather`'s lookup."""
    index = b.op("Reshape", [b.op("Cast", [x], to=TensorProto.INT32), b.const(np.array([-1]), "flat", np.int64)])
    looked_up = b.op("GatherElements", [b.const(rolled, output), index], axis=0)
    return b.op("Reshape", [looked_up, b.op("Shape", [x])], output)


def _lower_elementwise(b: _Builder, node: QNode) -> None:
    """An activation of one integer input whose output depends on that integer alone (an int16 table, the
    float32 path of Sigmoid / HardSwish / ..., Pow / Div / Mod by a constant scalar, Neg): the interpreter's own
    step (``QuantizedModel.run_node``) run once on every value of the input's width is the node, exactly, as a
    table (65,536 entries at int16)."""
    source = b.use(node.inputs[0])
    table = _elementwise_table(b.model, node)
    if table is None:
        raise _Refused("input wider than int16, a float output, or not elementwise")
    _gather(b, table, source, qmin(b.model.width(source)), node.outputs[0])


def _elementwise_table(model: QuantizedModel, node: QNode) -> np.ndarray | None:
    """The node as a float32 table over every value of its input's width, lowest first (the interpreter's own
    step run once on them all), or None when its input is wider than int16, its output float, its other inputs
    are not constant scalars, or its output does not take one value per input value. A Div takes another path
    in ``kernels.div`` when its dividend holds one value: it is tabled only where every sample holds several."""
    source = node.inputs[0]
    width = model.width(source)
    if width > 16 or node.outputs[0] in model.float_tensors:
        return None
    others = [t for t in node.inputs[1:] if t]
    if any(t not in model.constants or np.size(model.constants[t]) != 1 for t in others):
        return None
    if node.op_type == "Div" and int(np.prod(_known_shape(node) or [1])) < 2:
        return None
    values = np.arange(qmin(width), qmax(width) + 1, dtype=np.int64)
    env = {source: values} | {t: model.constants[t] for t in others}
    model.run_node(node, env)
    table = np.asarray(env[node.outputs[0]]).reshape(-1)
    return table.astype(F32) if table.shape == values.shape else None


def _tabled(model: QuantizedModel, node: QNode) -> bool:
    """Whether the compiled graph computes ``node`` as a table of its one integer input (``_lower_elementwise``):
    the float32 path of an activation, an int16 table, a Relu that rescales."""
    if node.table is not None:
        return True
    if node.op_type == "Relu":
        return model.exponent(node.inputs[0]) != model.exponent(node.outputs[0])
    return _LOWER.get(node.op_type) is _lower_elementwise


def _lower_relu(b: _Builder, node: QNode) -> None:
    if b.model.exponent(node.inputs[0]) != b.model.exponent(node.outputs[0]):
        _lower_elementwise(b, node)  # a Relu that rescales: the float path, as a table
        return
    b.op("Relu", [b.use(node.inputs[0])], node.outputs[0])


def _lower_mul(b: _Builder, node: QNode) -> None:
    """Mul (``kernels.mul``). The kernel takes one of two paths by the merged broadcast shape: the SIMD rule
    ``sat(SR(a b, s))`` with ``s = e_out - e_a - e_b``, or float32 ``sat(R(f32(a b) k))`` with ``k = 2^-s``. While
    ``|a b| < 2^24`` the product is exact in float32 and both are ``R(a b 2^-s)``: one graph for any shape. Wider
    products (int16) round in float32 on the float path: chips without SIMD always take it; on ESP32-S3 / -P4
    the float model's inferred shapes decide (``_mul_takes_simd``), and where they cannot, both are computed,
    the SIMD one kept, and a guard sends the batch to the interpreter where they differ."""
    m = b.model
    if node.relu:
        raise _Refused("Mul with a fused Relu")
    exponents = [m.exponents.get(t) for t in (*node.inputs[:2], node.outputs[0])]
    if not all(isinstance(e, int) for e in exponents):
        raise _Refused("per-channel exponents")
    e_a, e_b, e_out = (int(e) for e in exponents)  # type: ignore[arg-type]
    shift = e_out - e_a - e_b
    k = F32(F32(F32(2.0**e_a) * F32(2.0**e_b)) * F32(2.0**-e_out))
    if shift < 0 or float(k) != 2.0**-shift:
        raise _Refused("Mul scale not an exact power of two")
    largest = 1.0
    for tensor in node.inputs[:2]:
        if tensor in m.constants:
            largest *= float(np.abs(b.constant(tensor).astype(np.int64)).max(initial=0))
        else:
            largest *= 2.0 ** (m.width(tensor) - 1)
    known = node.input_shapes or [None, None]
    shapes = [list(m.constants[t].shape) if t in m.constants else known[i] for i, t in enumerate(node.inputs[:2])]
    simd_path = largest >= EXACT_FLOAT32 and _mul_takes_simd(shapes, node.bits, m.profile.simd)
    if simd_path and NATIVE and native.AVAILABLE and any(t not in m.constants for t in node.inputs[:2]):
        _native_product(b, node, shift)
        return
    operands = [_int_const(b, t) if t in m.constants else b.use(t) for t in node.inputs[:2]]
    hint = node.outputs[0]

    def product() -> str:
        return b.op("Mul", operands, name=_same_shape_mark(node))

    def float_path() -> str:  # built only where read: the SIMD path never reads it
        return b.op("Mul", [product(), b.const(2.0**-shift, hint)])

    if largest < EXACT_FLOAT32:
        _rescale(b, product(), shift, hint)
        return
    if simd_path is False:
        _round_saturate(b, float_path(), hint)
        return
    wide = b.op("Mul", [b.op("Cast", [x], to=TensorProto.DOUBLE) for x in operands])
    simd = b.shift_round(wide, np.asarray([shift]), hint, np.float64)
    if simd_path:
        b.saturate(simd, hint, dtype=np.float64)
        return
    exact = b.saturate(simd, b.fresh(hint), dtype=np.float64)
    rounded = b.saturate(b.round_float32(float_path(), hint), b.fresh(hint))
    largest_difference = b.op("ReduceMax", [b.op("Abs", [b.op("Sub", [exact, rounded])])], keepdims=0)
    b.guard(b.op("Greater", [largest_difference, b.const(0.0, hint)]), node)
    b.op("Identity", [exact], hint)


def _mul_takes_simd(shapes: list, bits: int, simd: bool) -> bool | None:
    """Whether ``kernels.mul`` takes its SIMD path for every batch size, from the input shapes (None:
    unknown, or it depends on the batch). The innermost merged length grows with the batch only when the batch
    axis merges into it, so the answer at batch 1 and at a huge batch covers every batch in between."""
    if not simd:
        return False
    if len(shapes) < 2 or any(s is None or any(not isinstance(d, int) for d in s[1:]) for s in shapes[:2]):
        return None
    lanes = simd_lanes(bits)
    answers = set()
    for batch in (1, 1 << 20):
        a, b = ([batch if not isinstance(d, int) else d for d in s] for s in shapes[:2])  # type: ignore[union-attr]
        try:
            answers.add(merged_broadcast_shapes(a, b)[2][-1] >= lanes)
        except ValueError:
            return None
    return answers.pop() if len(answers) == 1 else None


def _lower_prelu(b: _Builder, node: QNode) -> None:
    """PRelu with per-channel integer slopes (``kernels.prelu_per_channel``): ESP32-S3 rounds ``q alpha`` by
    ``s = e_out - e_in - e_alpha``, other chips floor it (``kernels.prelu_rounds_negatives``); the SIMD kernels
    rescale positives to e_out (``kernels.prelu_rescales_positives``), the C reference copies them. Products
    beyond float32's integers (int16) are taken in double."""
    from espquant.simulator.kernels import prelu_rescales_positives, prelu_rounds_negatives

    m = b.model
    exponents = [m.exponents.get(t) for t in (node.inputs[0], node.inputs[1], node.outputs[0])]
    if not all(isinstance(e, int) for e in exponents):
        raise _Refused("per-channel exponents")
    e_in, e_slope, e_out = (int(e) for e in exponents)  # type: ignore[arg-type]
    slope = b.constant(node.inputs[1]).astype(np.int64)
    hint = node.outputs[0]
    x = b.use(node.inputs[0])
    shift = e_out - e_in - e_slope
    # Every negative-branch value scaled back by 2**shift, the half-up half included, is an integer of this size.
    largest = 2.0 ** (m.width(node.inputs[0]) - 1) * float(np.abs(slope).max(initial=0)) + 2.0 ** max(shift - 1, 0)
    dtype: Any = F32 if largest < EXACT_FLOAT32 else np.float64
    wide = x if dtype == F32 else b.op("Cast", [x], to=TensorProto.DOUBLE)
    # Both branches give 0 at q = 0 (0 shifted either way), so the node is the sum of the positive branch on
    # max(q, 0) and the negative one on min(q, 0): no Where, whose broadcasting kernel cost onnxruntime more
    # than the rest of the node on MTCNN.
    positive = b.op("Relu", [wide])
    if prelu_rescales_positives(m.profile, node.bits):
        positive = b.shift_round(positive, np.asarray([e_out - e_in]), hint, dtype)
    # q * (alpha 2^-shift) is the exact product scaled by a power of two (its size checked above).
    scaled_slope = slope.astype(np.float64) * 2.0**-shift
    negative = b.op("Mul", [b.op("Min", [wide, b.const(0.0, hint, dtype)]), b.const(scaled_slope, hint, dtype)])
    rounds = prelu_rounds_negatives(m.profile)
    if shift > 0 and rounds and m.profile.rounding == "half_even":
        negative = b.op("Round", [negative])
    elif shift > 0 and rounds:
        negative = b.op("Floor", [b.op("Add", [negative, b.const(0.5, hint, dtype)])])  # exact: ``largest``
    elif shift > 0:
        negative = b.op("Floor", [negative])  # the C reference: an arithmetic shift right
    b.saturate(b.op("Add", [positive, negative]), hint, dtype=dtype)


def _lower_resize(b: _Builder, node: QNode) -> None:
    """Resize of an input whose plane size the float model fixes. Nearest (``kernels.resize_nearest_nhwc``):
    the kernel's own source indices (``kernels.nearest_indices``): onnxruntime's Resize or a broadcast copy
    where they repeat each pixel an integer number of times, else two constant Gathers; then the rescale when
    the exponents differ. Linear (``kernels.resize_linear_nhwc``): the kernel's float32 steps with its own
    indices and weights (``kernels.linear_axis``), rows blended first, then columns."""
    from espquant.simulator.kernels import linear_axis, nearest_indices

    mode = node.attrs.get("mode", "nearest")
    if mode not in ("nearest", "linear"):
        raise _Refused("cubic Resize")
    shape = (node.input_shapes or [None])[0]
    if shape is None or len(shape) != 4 or any(not isinstance(d, int) for d in shape[2:]):
        factors = _doubling_factors(b, node) if mode == "nearest" else None
        if factors is None:
            raise _Refused("the plane size is only known at run time")
        _nearest_repeat(b, node, b.use(node.inputs[0]), *factors)
        return
    height, width = int(shape[2]), int(shape[3])  # type: ignore[arg-type]
    if len(node.inputs) > 2 and node.inputs[2] and b.constant(node.inputs[2]).size:
        scales = b.constant(node.inputs[2]).reshape(-1).astype(float)
        if scales.size != 4:
            raise _Refused("Resize scales of another rank")
        scale_h, scale_w = float(scales[2]), float(scales[3])
    elif len(node.inputs) > 3 and node.inputs[3]:
        sizes = b.constant(node.inputs[3]).reshape(-1)
        if sizes.size != 4:
            raise _Refused("Resize sizes of another rank")
        scale_h, scale_w = float(sizes[2] / float(height)), float(sizes[3] / float(width))
    else:
        raise _Refused("Resize without scales or sizes")
    hint = node.outputs[0]
    m = b.model
    if mode == "linear":
        align = node.attrs.get("coordinate_transformation_mode") == "align_corners"
        values = b.op("Mul", [b.use(node.inputs[0]), b.const(2.0 ** m.exponent(node.inputs[0]), hint)])
        # Both passes blend rows (axis 2): onnxruntime's Gather copies whole rows fast but single elements slowly
        # (about 16 ns each), so the columns are blended between two Transposes.
        for size, scale in ((height, scale_h), (width, scale_w)):
            index, weight = linear_axis(size, scale, align)
            low = b.op("Gather", [values, b.const(index, hint, np.int64)], axis=2)
            high = b.op("Gather", [values, b.const(np.minimum(index + 1, size - 1), hint, np.int64)], axis=2)
            keep = b.const((F32(1.0) - weight).reshape(-1, 1), hint)
            values = b.op("Add", [b.op("Mul", [low, keep]), b.op("Mul", [high, b.const(weight.reshape(-1, 1), hint)])])
            values = b.op("Transpose", [values], perm=[0, 1, 3, 2])  # after both passes: back to (H, W)
        _round_saturate(b, b.op("Mul", [values, b.const(2.0 ** -m.exponent(hint), hint)]), hint)
        return
    rows, cols = nearest_indices(height, scale_h), nearest_indices(width, scale_w)
    x = b.use(node.inputs[0])
    fh, fw = _repeat_factors(rows, height), _repeat_factors(cols, width)
    if fh and fw and not fh & (fh - 1) and not fw & (fw - 1):
        _nearest_repeat(b, node, x, fh, fw)
        return
    if fh and fw:  # other integer factors: a broadcast copy, no index lookups
        six = b.op("Reshape", [x, b.const([0, 0, height, 1, width, 1], hint, np.int64)])
        wide = b.op("Expand", [six, b.const([1, 1, 1, fh, 1, fw], hint, np.int64)])
        y = b.op("Reshape", [wide, b.const([0, 0, height * fh, width * fw], hint, np.int64)])
    else:  # onnxruntime's Gather copies one element per index along the last axis: the slower general case
        rows_name, cols_name = b.const(rows, hint, np.int64), b.const(cols, hint, np.int64)
        y = b.op("Gather", [b.op("Gather", [x, rows_name], axis=2), cols_name], axis=3)
    _resized(b, node, y)


def _resized(b: _Builder, node: QNode, y: str) -> None:
    """The resized integers ``y`` as the node's output: rescaled when the exponents differ."""
    shift = b.model.exponent(node.outputs[0]) - b.model.exponent(node.inputs[0])
    if shift == 0:
        b.op("Identity", [y], node.outputs[0])
        return
    _rescale(b, y, shift, node.outputs[0])


def _nearest_repeat(b: _Builder, node: QNode, x: str, fh: int, fw: int) -> None:
    """Every source pixel repeated ``f = 2^k`` times: onnxruntime's own nearest Resize (asymmetric, floor) takes
    source index floor(i / f), exact for a power of two whether it divides or multiplies by 1 / f, and runs in
    the blocked layout of the convolutions around it (no index lookups, no reorders)."""
    scales = b.const([1.0, 1.0, fh, fw], node.outputs[0])
    y = b.op(
        "Resize", [x, "", scales], mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"
    )
    _resized(b, node, y)


def _doubling_factors(b: _Builder, node: QNode) -> tuple[int, int] | None:
    """``(f_h, f_w)`` of a nearest Resize by constant scales ``[1, 1, f_h, f_w]`` that are powers of two: its
    source indices are floor(i / f) whatever the plane (``kernels.nearest_indices``: ``size * f`` outputs, the
    reciprocal exact), so it needs no plane size; else None."""
    if len(node.inputs) <= 2 or not node.inputs[2] or node.inputs[2] not in b.model.constants:
        return None
    scales = b.constant(node.inputs[2]).reshape(-1).astype(float)
    if scales.size != 4 or scales[0] != 1 or scales[1] != 1:
        return None
    factors = [int(f) for f in scales[2:] if f >= 1 and f == int(f) and not int(f) & (int(f) - 1)]
    return (factors[0], factors[1]) if len(factors) == 2 else None


def _repeat_factors(indices: np.ndarray, size: int) -> int | None:
    """``f`` when the source indices are ``0, .., 0, 1, .., 1, ...`` (each of ``size`` pixels ``f`` times, an
    integer upsampling as FPNs use), else None."""
    if len(indices) % size:
        return None
    factor = len(indices) // size
    return factor if np.array_equal(indices, np.arange(len(indices)) // factor) else None


def _lower_pad(b: _Builder, node: QNode) -> None:
    """Pad with constant pads (``interpreter._pad``): onnxruntime's Pad moves the integers as they are."""
    mode = node.attrs.get("mode", "constant")
    if mode not in ("constant", "edge", "reflect") or (len(node.inputs) > 3 and node.inputs[3]):
        raise _Refused("Pad mode or axes")
    if len(node.inputs) < 2 or not node.inputs[1]:
        raise _Refused("Pad without a pads input")
    pads = b.constant(node.inputs[1]).astype(np.int64).reshape(-1)
    if np.any(pads < 0):
        raise _Refused("negative pads")
    hint = node.outputs[0]
    inputs = [b.use(node.inputs[0]), b.const(pads, hint, np.int64)]
    if mode == "constant" and len(node.inputs) > 2 and node.inputs[2]:
        inputs.append(b.const(float(b.constant(node.inputs[2]).reshape(-1)[0]), hint))
    b.op("Pad", inputs, hint, mode=mode)


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
    y = b.shift_round(x, np.asarray(shift, dtype=np.int64).reshape(1), output)
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
    """MaxPool, moved before the rounding and clamping that end the node producing its input where nothing
    else reads that input (:func:`_monotone_tail`): a non-decreasing function of each value commutes with a
    maximum, so ``max(floor(v)) = floor(max(v))`` exactly. onnxruntime then pools the convolution's output in
    its blocked layout, and rounds a quarter of the values (2x2 pools) after one layout change, not all of them
    between two."""
    if len(node.outputs) > 1 and node.outputs[1]:
        raise _Refused("MaxPool indices")
    attrs = _pool_attrs(node)
    x = b.use(node.inputs[0])
    tail = _monotone_tail(b, x) if _sole_reader(b.model, node) else []
    if not tail:
        b.op("MaxPool", [x], node.outputs[0], **attrs)
        return
    for op in tail:
        b.nodes.remove(op)
    value = b.op("MaxPool", [tail[-1].input[0]], **attrs)
    for index, op in enumerate(reversed(tail)):
        output = node.outputs[0] if index == len(tail) - 1 else None
        value = b.op(
            op.op_type, [value, *op.input[1:]], output, **{a.name: helper.get_attribute_value(a) for a in op.attribute}
        )


# Elementwise steps that are non-decreasing in their first input (the others are constants): they commute with
# a maximum over values of one channel.
_MONOTONE_STEPS = frozenset({"Floor", "Round", "Relu", "Clip"})
_FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})  # onnxruntime fuses them into the Conv before them


def _produced_by(b: _Builder, tensor: str, op_type: str) -> bool:
    return any(tensor in n.output and n.op_type == op_type for n in b.nodes)


def _sole_reader(model: QuantizedModel, node: QNode) -> bool:
    """Whether ``node`` is the only reader of its first input, which is no model output."""
    tensor = node.inputs[0]
    readers = sum(tensor in n.inputs for n in model.nodes)
    return readers == 1 and tensor not in model.outputs


def _monotone_tail(b: _Builder, x: str) -> list[onnx.NodeProto]:
    """The chain of ``_MONOTONE_STEPS`` nodes this segment ends ``x`` with, last first: each one's output read
    by nothing but the next one (``x`` by nothing yet), its other inputs constants of this segment."""
    constants = {t.name for t in b.initializers}
    tail: list[onnx.NodeProto] = []
    tensor, reader = x, None
    while tensor not in b.exports and tensor not in b.guards:
        readers = [n for n in b.nodes if tensor in n.input]
        producer = next((n for n in b.nodes if tensor in n.output), None)
        if readers != ([reader] if reader is not None else []) or producer is None:
            break
        if producer.op_type not in _MONOTONE_STEPS or not all(t in constants for t in producer.input[1:] if t):
            break
        if producer.op_type in _FUSED_ACTIVATIONS and _produced_by(b, producer.input[0], "Conv"):
            break  # onnxruntime computes it inside the convolution: cheaper there than after the pool
        tail.append(producer)
        tensor, reader = producer.input[0], producer
    return tail


def _lower_average_pool(b: _Builder, node: QNode) -> None:
    """Integer tap sum (padding counts as zeros), times ``k = f32(f32(2^e_in / area) 2^-e_out)`` in float32,
    rounded: ``average_pool_nhwc``. The sum comes from onnxruntime's average (count_include_pad) times the
    area, rounded: its relative error stays below 2**-21, so below one half while the sum is below 2**20."""
    m = b.model
    x = b.use(node.inputs[0])
    hint = node.outputs[0]
    if node.op_type == "GlobalAveragePool":  # every axis after the channels: 1-D and 2-D alike
        known = _known_shape(node)
        area = None
        if known is not None and len(known) > 1:
            # A plane the float model fixes: axes and area are constants (onnxruntime folds ``k`` then), nine
            # nodes fewer, which counts at batch 1.
            area = int(np.prod(known[1:]))
            axes = b.const(np.arange(2, 1 + len(known)), hint, np.int64)
            inverse = b.const(F32(1.0) / F32(area), hint)
        else:
            dims = b.op("Shape", [x])
            axes = b.op("Range", [b.const(2, hint, np.int64), b.op("Size", [dims]), b.const(1, hint, np.int64)])
            spatial = b.op("Slice", [dims, b.const([2], hint, np.int64), b.const([2**62], hint, np.int64)])
            inverse = b.op(
                "Div",
                [b.const(1.0, hint), b.op("Cast", [b.op("ReduceProd", [spatial], keepdims=0)], to=TensorProto.FLOAT)],
            )
        if area is not None and 2.0 ** (m.width(node.inputs[0]) - 1) * area < EXACT_FLOAT32:
            total = b.op("ReduceSum", [x, axes], keepdims=1)  # every partial sum an integer below 2**24: exact
        else:  # in double (exact, whatever the plane), rounded to float32 as the kernel's total.astype(float32)
            wide = b.op("ReduceSum", [b.op("Cast", [x], to=TensorProto.DOUBLE), axes], keepdims=1)
            total = b.op("Cast", [wide], to=TensorProto.FLOAT)
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
    b.quantized_input = node
    _quantize(b, node.inputs[0], b.model.exponent(node.outputs[0]), node.outputs[0])


def _quantize(b: _Builder, source: str, exponent: int, output: str) -> None:
    """float -> int: ``sat(R(f32(x) * f32(2^-e)))``."""
    _round_saturate(b, b.op("Mul", [source, b.const(2.0**-exponent, output)]), output)


def _lower_reshape(b: _Builder, node: QNode) -> None:
    shape = b.constant(node.inputs[1]).astype(np.int64).reshape(-1)
    b.op("Reshape", [*b.moved(node), b.const(shape, node.outputs[0], np.int64)], node.outputs[0])


def _lower_passthrough(b: _Builder, node: QNode) -> None:
    """Data movement with ONNX's own semantics (Flatten, Transpose, Identity, Concat)."""
    inputs = b.moved(node)
    attrs = {k: v for k, v in node.attrs.items() if k in ("axis", "perm")}
    b.op(node.op_type, inputs, node.outputs[0], **attrs)


def _lower_axes(b: _Builder, node: QNode) -> None:
    """Squeeze / Unsqueeze with constant axes (input or attribute)."""
    if len(node.inputs) > 1 and node.inputs[1]:
        axes = b.constant(node.inputs[1]).astype(np.int64).reshape(-1)
    elif "axes" in node.attrs:
        axes = np.asarray(node.attrs["axes"], np.int64)
    elif node.op_type == "Squeeze":
        b.op("Squeeze", b.moved(node), node.outputs[0])
        return
    else:
        raise _Refused("Unsqueeze without axes")
    b.op(node.op_type, [*b.moved(node), b.const(axes, node.outputs[0], np.int64)], node.outputs[0])


def _known_dims(node: QNode) -> list[int | None] | None:
    """The shape of the node's first input as far as it is known (None per unknown axis), or None without a rank."""
    shape = (node.input_shapes or [None])[0]
    if shape is None:
        return None
    return [int(d) if isinstance(d, int) and d >= 0 else None for d in shape]


def _lower_split(b: _Builder, node: QNode) -> None:
    """Split along a known axis into sizes fixed when lowering (``interpreter._split``: the sizes given, else
    ``ceil(n / outputs)`` each, the last one what remains)."""
    dims = _known_dims(node)
    axis = int(node.attrs.get("axis", 0))
    if dims is None and axis < 0:
        raise _Refused("Split on a negative axis of an input of unknown rank")
    axis = axis % len(dims) if dims is not None else axis
    if len(node.inputs) > 1 and node.inputs[1]:
        sizes = [int(v) for v in b.constant(node.inputs[1]).reshape(-1)]
    elif "split" in node.attrs:
        sizes = [int(v) for v in node.attrs["split"]]
    else:
        length = dims[axis] if dims is not None and axis < len(dims) else None
        if length is None:
            raise _Refused("Split into equal parts of an axis of unknown length")
        chunk = -(-length // len(node.outputs))
        sizes = [min(chunk, length - i * chunk) for i in range(len(node.outputs))]
    if len(sizes) != len(node.outputs) or any(size <= 0 for size in sizes):
        raise _Refused("Split sizes that are not one positive size per output")
    x = b.moved(node)[0]
    b.nodes.append(helper.make_node("Split", [x, b.const(sizes, node.outputs[0], np.int64)], node.outputs, axis=axis))


def _lower_slice(b: _Builder, node: QNode) -> None:
    """Slice by constant starts, ends, axes and positive steps of axes whose lengths are known: the bounds are
    normalised as Python's slices normalise them (``interpreter._slice``) before onnxruntime sees them, so both
    agree also where ONNX's clamping rules differ from Python's."""
    dims = _known_dims(node)
    if dims is None:
        raise _Refused("Slice of an input of unknown rank")
    starts, ends = (b.constant(node.inputs[i]).astype(np.int64).reshape(-1) for i in (1, 2))
    given = [b.constant(t).astype(np.int64).reshape(-1) if t else None for t in (node.inputs[3:5] + ["", ""])[:2]]
    axes = given[0] if given[0] is not None else np.arange(len(starts))
    steps = given[1] if given[1] is not None else np.ones(len(starts), np.int64)
    bounds = []
    for start, end, axis, step in zip(starts.tolist(), ends.tolist(), axes.tolist(), steps.tolist()):
        axis %= len(dims)
        if step <= 0 or dims[axis] is None:
            raise _Refused("Slice with a negative step or along an axis of unknown length")
        bounds.append((*slice(start, end, step).indices(dims[axis])[:2], axis, step))
    hint = node.outputs[0]
    columns = [b.const([bound[i] for bound in bounds], hint, np.int64) for i in range(4)]
    b.op("Slice", [*b.moved(node), *columns], hint)


def _lower_reduce(b: _Builder, node: QNode) -> None:
    """ReduceMax / ReduceMin (the integers themselves), ReduceSum and ReduceMean as ``reductions.reduce_integer``
    computes them: the integer sum (float32 where the float model's shapes keep every partial sum an integer
    below 2**24, else double), then ReduceSum's ``shift_and_round`` or ReduceMean's float32
    ``sum 2^e_in / count 2^-e_out``, rounded and saturated. Without the shapes (a ``.espdl`` file's nodes carry
    none) the count is taken from the tensor at run time, and an int8 sum that could wrap in the runtime's int32
    accumulator (2**24 values or more) trips a guard: the node then moves to the interpreter."""
    kind = REDUCE_KINDS[node.op_type]
    dims = _known_dims(node)
    if len(node.inputs) > 1 and node.inputs[1]:
        listed = [int(a) for a in b.constant(node.inputs[1]).reshape(-1)]
    else:
        listed = [int(a) for a in node.attrs.get("axes", [])]
    axes = sorted({a % len(dims) for a in listed}) if dims is not None else listed  # none: all (interpreter)
    keepdims = int(bool(node.attrs.get("keepdims", 1)))
    x, hint = b.use(node.inputs[0]), node.outputs[0]
    if kind in ("max", "min"):
        listed_axes = {"axes": axes} if axes else {}
        b.op("ReduceMax" if kind == "max" else "ReduceMin", [x], hint, keepdims=keepdims, **listed_axes)
        return
    reduced = [dims[a] for a in (axes or range(len(dims)))] if dims is not None else [None]
    count = int(np.prod(reduced)) if all(length is not None for length in reduced) else None
    axes_input = [b.const(axes, hint, np.int64)] if axes else []
    if count is None:
        shape = b.op("Shape", [x])
        chosen = b.op("Gather", [shape, axes_input[0]]) if axes else shape
        counted = b.op("ReduceProd", [chosen], keepdims=0)
        if node.bits == 8:
            b.guard(b.op("GreaterOrEqual", [counted, b.const(1 << 24, hint, np.int64)]), node)
        divisor = b.op("Cast", [counted], to=TensorProto.FLOAT)
    elif node.bits == 8 and 2.0**7 * count >= 2.0**31:
        raise _Refused("an int8 sum that may wrap in int32")
    else:
        divisor = b.const(float(count), hint)
    m = b.model
    e_in, e_out = m.exponent(node.inputs[0]), m.exponent(hint)
    if kind == "mean":
        if count is not None and 2.0 ** (node.bits - 1) * count < EXACT_FLOAT32:
            total = b.op("ReduceSum", [x, *axes_input], keepdims=keepdims)
        else:
            wide = b.op("ReduceSum", [b.op("Cast", [x], to=TensorProto.DOUBLE), *axes_input], keepdims=keepdims)
            total = b.op("Cast", [wide], to=TensorProto.FLOAT)  # the sum rounded to float32, as the C code's
        real = b.op("Mul", [total, b.const(2.0**e_in, hint)])
        mean = b.op("Div", [real, divisor])
        _round_saturate(b, b.op("Mul", [mean, b.const(2.0**-e_out, hint)]), hint)
        return
    # ReduceSum: every step in double, where the sum, its half and its shift are all exact.
    total = b.op("ReduceSum", [b.op("Cast", [x], to=TensorProto.DOUBLE), *axes_input], keepdims=keepdims)
    b.saturate(b.shift_round(total, np.array(e_out - e_in), hint, dtype=np.float64), hint, dtype=np.float64)


_LOWER: dict[str, Callable[[_Builder, QNode], None]] = {
    QUANTIZE_INPUT: _lower_quantize_input,
    "Conv": _lower_conv,
    "ConvTranspose": _lower_conv_transpose,
    "Gemm": _lower_gemm,
    "MatMul": _lower_matmul,
    "Add": _lower_add_sub,
    "Sub": _lower_add_sub,
    "Mul": _lower_mul,
    "Pad": _lower_pad,
    "Resize": _lower_resize,
    "PRelu": _lower_prelu,
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
    "Split": _lower_split,
    "Slice": _lower_slice,
    **{op: _lower_reduce for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")},
    "Softmax": _lower_softmax,
    **{op: _lower_elementwise for op in (*FLOAT_FUNCTIONS, "Pow", "Div", "Mod", "Neg") if op != "Relu"},
}


SEGMENT = "a compiled simulator segment"  # how errors name a segment's graph


@dataclass
class _Segment:
    """One onnxruntime graph: reads ``inputs`` from the environment, writes ``outputs``, reports ``guards``;
    its session is made by ``open`` once the program is known (``compile_program``)."""

    inputs: list[str]
    outputs: list[str]
    guards: list[str]
    guard_nodes: list[str]
    nodes: int
    doubles: frozenset[str] = frozenset()  # inputs fed as double (exact int16 sums handed on by a rail step)
    internal: frozenset[str] = frozenset()  # outputs only a rail step and the next segment read (sums, flags)
    floats: frozenset[str] = frozenset()  # float outputs (a Softmax's probabilities), never made integers
    proto: onnx.ModelProto | None = None  # the graph, until its session runs on blocked tensors (layout.py)
    threads: int | None = None
    spinning: bool = True  # onnxruntime's idle workers spin (runtime.create_session)
    session: Any = field(init=False, default=None, repr=False)  # made by ``open``
    run: Callable[[list[str], dict[str, Any]], list[Any]] = field(init=False, repr=False)  # runtime.runner

    def open(self, spinning: bool) -> None:
        """Make the session, with spinning idle workers or not (``compile_program`` decides)."""
        from espquant.runtime import create_session

        assert self.proto is not None
        self.spinning = spinning
        self.session = create_session(self.proto, threads=self.threads, what=SEGMENT, spinning=spinning)
        self.run = runner(self.session)

    def block(self) -> None:
        """Run from now on with the elementwise steps on onnxruntime's blocked tensors (simulator/layout.py)."""
        from espquant.simulator.layout import blocked_session

        if self.proto is not None:
            self.session = blocked_session(
                self.proto, threads=self.threads, what=SEGMENT, current=self.session, spinning=self.spinning
            )
            self.run = runner(self.session)
            self.proto = None

    def execute(self, env: dict[str, np.ndarray]) -> None:
        """Run on ``env`` (its inputs read from it, its outputs added); raises GuardTripped when a guard trips."""
        doubles = self.doubles
        feeds = {name: _as_f32(env[name]) if name not in doubles else env[name] for name in self.inputs}
        results = self.run(self.fetches, feeds)
        if self.guards:
            tripped = [n for n, g in zip(self.guard_nodes, results[len(self.outputs) :]) if bool(g)]
            if tripped:
                raise GuardTripped(tripped)
        env.update(zip(self.outputs, results))

    @functools.cached_property
    def handed_on(self) -> list[str]:
        """The outputs later steps read as integers (not the sums and flags only a rail step reads, nor floats)."""
        return [name for name in self.outputs if name not in self.internal and name not in self.floats]

    @functools.cached_property
    def fetches(self) -> list[str]:
        return self.outputs + self.guards


@dataclass
class _RailStep:
    """Between two segments: the exact sums ``acc`` of an accumulating node whose lanes may saturate, with the
    outputs that may reach a rail replaced by their saturating sums (``lanes.emulate``) when ``flag`` is set."""

    node: QNode
    x: str
    acc: str
    magnitude: str
    flag: str
    rails: lanes.LaneRails
    channel_axis: int
    products: Callable[[np.ndarray], Callable[[np.ndarray], np.ndarray]]
    taps: int
    max_product: int
    magnitude_exact: bool

    def run(self, env: dict[str, np.ndarray]) -> None:
        if not bool(env[self.flag]):
            return
        env[self.acc] = lanes.emulate(
            env[self.acc],
            env[self.magnitude],
            self.rails,
            self.channel_axis,
            self.products(np.asarray(env[self.x])),
            taps=self.taps,
            max_product=self.max_product,
            magnitude_exact=self.magnitude_exact,
        )


@dataclass
class _NativeStep:
    """Between two segments: an accumulating node computed whole in double (simulator/native.py); it writes
    ``output`` as float32 integers, as a segment would: its own, or that of the nodes it absorbed (a Relu / Clip
    joining its saturation, then an activation the graph would compute as a table, looked up or computed value by
    value here, then a MaxPool)."""

    node: QNode
    inputs: tuple[str, ...]
    output: str
    kernel: Callable[..., np.ndarray]
    fused: int = 0  # the Relu / Clip, activation and MaxPool nodes computed here too
    # What the absorbed nodes do to the kernel's output, in order: an activation (``_activation_after``: its
    # table's lookup or a native.Activation), a 2x2 MaxPool. A fused clamp is in the kernel's saturation.
    after: list[Callable[[np.ndarray], np.ndarray]] = field(default_factory=list)

    def run(self, env: dict[str, np.ndarray]) -> None:
        values = self.kernel(*(_as_f32(env[name]) for name in self.inputs))
        for finish in self.after:
            values = finish(values)
        env[self.output] = values

    def absorb(self, follower: QNode, finish: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        """Compute ``follower`` (the only reader of this step's output) here too: a fused clamp (already in the
        requantization), or what ``finish`` computes (an activation, a MaxPool)."""
        self.output, self.fused = follower.outputs[0], self.fused + 1
        if finish is not None:
            self.after.append(finish)


class GuardTripped(Exception):
    """An accumulator lane may saturate on this batch (or a sum may leave float32's exact range): these nodes
    (named by their first output) must run in the interpreter."""

    def __init__(self, nodes: list[str]) -> None:
        super().__init__(", ".join(nodes))
        self.nodes = nodes


@dataclass
class CompiledProgram:
    """Segments and interpreter nodes in execution order (see the module docstring)."""

    steps: list[_Segment | _RailStep | _NativeStep | QNode]
    runs: int = 0
    blocked_layout: bool = True  # the segments move to blocked tensors at run BLOCKED_FROM_RUN
    # Whether a run needs the model's constants in its environment (an interpreter step, or an output that is a
    # constant): set by QuantizedModel when it compiles the program, read on every run.
    reads_constants: bool = True

    @property
    def compiled_nodes(self) -> int:
        """Nodes run in onnxruntime segments or natively (a fused Relu / Clip counted with its node)."""
        segments = sum(s.nodes for s in self.steps if isinstance(s, _Segment))
        return segments + sum(1 + s.fused for s in self.steps if isinstance(s, _NativeStep))

    @functools.cached_property
    def interpreted_nodes(self) -> list[QNode]:  # read on every run: computed once (the steps never change)
        return [s for s in self.steps if not isinstance(s, (_Segment, _RailStep, _NativeStep))]

    @functools.cached_property
    def uses_blas(self) -> bool:
        """Whether a step may call numpy's BLAS: any step but an onnxruntime segment (simulator/blas.py)."""
        return any(not isinstance(s, _Segment) for s in self.steps)

    @property
    def native_nodes(self) -> list[QNode]:
        """Accumulating nodes computed in double by simulator/native.py."""
        return [s.node for s in self.steps if isinstance(s, _NativeStep)]

    @property
    def rail_nodes(self) -> list[QNode]:
        """Accumulating nodes whose possibly saturating outputs are emulated between segments."""
        return [s.node for s in self.steps if isinstance(s, _RailStep)]

    def run(
        self,
        env: dict[str, np.ndarray],
        interpret: Callable[[QNode, dict[str, np.ndarray]], None],
        wanted: Collection[str] | None = None,
    ) -> None:
        """Execute every step on ``env`` (updated in place; segment outputs become int64 before an interpreter
        step reads them, and at the end those in ``wanted``, default all); raises GuardTripped when a guard
        trips."""
        self.runs += 1
        if self.runs == BLOCKED_FROM_RUN and self.blocked_layout:
            for step in self.steps:
                if isinstance(step, _Segment):
                    step.block()
        if self.straight:
            self._run_straight(env, wanted)
            return
        from_segments: set[str] = set()
        for step in self.steps:
            if isinstance(step, _RailStep):
                step.run(env)
                continue
            if isinstance(step, _NativeStep):
                step.run(env)
                from_segments.add(step.output)
                continue
            if isinstance(step, _Segment):
                step.execute(env)
                from_segments.update(step.handed_on)
                continue
            for name in step.inputs:
                if name in from_segments:
                    env[name] = env[name].astype(np.int64)
                    from_segments.discard(name)
            interpret(step, env)
        for name in from_segments if wanted is None else from_segments.intersection(wanted):
            env[name] = env[name].astype(np.int64)

    @functools.cached_property
    def straight(self) -> bool:
        """Whether every step is an onnxruntime segment or a native step (most models): such a program runs
        through :meth:`_run_straight`, which tracks nothing between steps."""
        return all(isinstance(s, (_Segment, _NativeStep)) for s in self.steps)

    @functools.cached_property
    def integer_results(self) -> frozenset[str]:
        """The tensors the steps write as float32 integers (everything but a segment's floats and internals)."""
        native = {s.output for s in self.steps if isinstance(s, _NativeStep)}
        return frozenset(native).union(*(s.handed_on for s in self.steps if isinstance(s, _Segment)))

    def _run_straight(self, env: dict[str, np.ndarray], wanted: Collection[str] | None) -> None:
        """:meth:`run` for a program of segments and native steps only: no interpreter step reads an
        intermediate tensor, so only the results asked for become int64, at the end. A batch-1 call of a small
        model paid more for the general loop's bookkeeping than for a third of its onnxruntime run."""
        for step in self.steps:
            if step.__class__ is _NativeStep:
                step.run(env)  # type: ignore[union-attr]
            else:
                step.execute(env)  # type: ignore[union-attr]
        integers = self.integer_results
        for name in integers if wanted is None else wanted:
            if name in integers:
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


def _value_ranges(model: QuantizedModel, nodes: list[QNode]) -> dict[str, tuple[int, int]]:
    """``(lowest, highest)`` integer of the tensors whose range is known whatever the data: outputs of a fused or
    plain ReLU and of a Clip with a non-negative constant lower bound (``[0, qmax]``), of a stored table (its
    smallest and largest entry: a HardSwish never goes far below 0, a Sigmoid never below it), and what
    range-keeping ops make of them: data movement and MaxPool keep their inputs' range, average pools add 0
    (padding), requantization, or any of these ops between different exponents, keeps only ``x >= 0`` (rounding
    and saturation keep it, the scale changes), a Mul maps its operands' ranges through its product
    (:func:`_product_range`: MobileNetV3's squeeze-excite gate)."""
    ranges: dict[str, tuple[int, int]] = {}
    for node in nodes:
        if not node.outputs or node.outputs[0] in model.float_tensors:
            continue
        top = qmax(node.bits)
        inputs = [t for t in node.inputs if t and t not in model.constants]
        known = [ranges[t] for t in inputs if t in ranges]
        if node.relu or node.op_type == "Relu":
            found: tuple[int, int] | None = (0, top)
        elif node.table is not None:
            found = (int(node.table.min()), int(node.table.max()))
        elif node.op_type == "Clip":
            low = node.inputs[1] if len(node.inputs) > 1 else ""
            nonnegative = bool(low) and low in model.constants and float(np.min(model.constants[low])) >= 0
            found = (0, top) if nonnegative else None
        elif node.op_type == "Mul":
            found = _product_range(model, node, ranges)
        elif node.op_type not in _KEEPS_SIGN or not inputs or len(known) != len(inputs):
            found = None
        elif node.op_type == "RequantizeLinear" or not _same_exponents(model, [*inputs, node.outputs[0]]):
            found = (0, top) if all(lowest >= 0 for lowest, _ in known) else None  # rescaled: only the sign holds
        else:
            found = (min(lowest for lowest, _ in known), max(highest for _, highest in known))
            if node.op_type in ("AveragePool", "GlobalAveragePool"):
                found = (min(found[0], 0), max(found[1], 0))
        if found is not None:
            ranges[node.outputs[0]] = found
    return ranges


def _same_exponents(model: QuantizedModel, tensors: list[str]) -> bool:
    """Whether the tensors share one exponent (integers pass between them unscaled)."""
    exponents = [model.exponents.get(t) for t in tensors]
    return all(e is not None and e == exponents[0] for e in exponents)


def _product_range(model: QuantizedModel, node: QNode, ranges: dict[str, tuple[int, int]]) -> tuple[int, int] | None:
    """The range of a Mul whose operands' ranges are known (activations in ``ranges``, constants by their values):
    both of the kernel's paths (``kernels.mul``) compute ``sat(R(p 2^-s))`` of the product ``p`` (the float32
    one rounding ``p 2^-s`` first, by less than one unit at these sizes), non-decreasing in ``p``: so the
    extreme products bound the output, with one unit of slack each way. Per-channel exponents: unknown."""
    if len(node.inputs) != 2 or any(isinstance(model.exponents.get(t), list) for t in [*node.inputs, *node.outputs]):
        return None
    ends = []
    for tensor in node.inputs:
        if tensor in model.constants:
            values = np.asarray(model.constants[tensor])
            ends.append((int(values.min()), int(values.max())))
        elif tensor in ranges:
            ends.append(ranges[tensor])
        else:
            return None
    products = [x * y for x in ends[0] for y in ends[1]]
    scale = 2.0 ** (model.exponent(node.inputs[0]) + model.exponent(node.inputs[1]) - model.exponent(node.outputs[0]))
    low, high = qmin(node.bits), qmax(node.bits)  # saturation
    lowest = min(max(int(np.floor(min(products) * scale)) - 1, low), high)
    highest = min(max(int(np.ceil(max(products) * scale)) + 1, low), high)
    return lowest, highest


# Accumulating nodes that become rail steps once their guard trips (every other tripped node is interpreted).
_RAIL_STEPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# Nodes that end with a saturation a following Relu / Clip can be folded into (``_clamp_fusions``).
_CLAMPING = _RAIL_STEPS | {"Add", "Sub"}


def _clamp_bounds(model: QuantizedModel, node: QNode) -> tuple[int, int]:
    """The integer range a Relu or an integer Clip (no rescale) keeps."""
    if node.op_type == "Relu":
        return 0, qmax(node.bits)
    ends = []
    for position, default in ((1, qmin(node.bits)), (2, qmax(node.bits))):
        tensor = node.inputs[position] if len(node.inputs) > position else ""
        ends.append(int(np.asarray(model.constants[tensor]).reshape(-1)[0]) if tensor else default)
    return ends[0], ends[1]


def _clamp_fusions(model: QuantizedModel, nodes: list[QNode], readers: dict[str, list[QNode]]) -> dict[str, QNode]:
    """Relu / Clip nodes (same exponent and width, constant integer bounds) that are the only reader of a Conv /
    Gemm / MatMul / Add / Sub output which is no model output: ``clip(sat(R(acc)), lo, hi)`` is ``R(acc)``
    clipped to the intersection of both ranges, so the node writes the follower's output directly (one pass
    less per layer: MobileNet's ReLU6, the ReLU after a residual Add). Keyed by the node's output."""
    fusions = {}
    for node in nodes:
        if node.op_type not in _CLAMPING or node.table is not None or not node.outputs:
            continue
        output = node.outputs[0]
        follower = readers.get(output, [None])[0]
        if output in model.outputs or len(readers.get(output, [])) != 1 or follower is None:
            continue
        if follower.op_type not in ("Relu", "Clip") or follower.table is not None or follower.bits != node.bits:
            continue
        if follower.inputs[0] != output or len(follower.outputs) != 1 or follower.outputs[0] in model.float_tensors:
            continue
        if output not in model.exponents or model.exponent(output) != model.exponent(follower.outputs[0]):
            continue
        bounds = [t for t in follower.inputs[1:] if t]
        if not all(t in model.constants and np.asarray(model.constants[t]).size == 1 for t in bounds):
            continue
        if not all(float(np.asarray(model.constants[t]).reshape(-1)[0]).is_integer() for t in bounds):
            continue
        low, high = _clamp_bounds(model, follower)
        if max(low, 0 if node.relu else qmin(node.bits)) <= min(high, qmax(node.bits)):
            fusions[output] = follower
    return fusions


def _table_follower(
    model: QuantizedModel, tensor: str, readers: dict[str, list[QNode]]
) -> tuple[QNode, np.ndarray] | None:
    """The activation a native step may finish with a table lookup, and its table: the only reader of ``tensor``
    (no model output), an activation of that one input that the graph would compute as a table."""
    found = readers.get(tensor, [])
    if len(found) != 1 or tensor in model.outputs or tensor not in model.exponents:
        return None
    node = found[0]
    if node.inputs[0] != tensor or len([t for t in node.inputs if t]) != 1 or len(node.outputs) != 1:
        return None
    table = _elementwise_table(model, node) if _tabled(model, node) else None
    return None if table is None else (node, table)


def _activation_after(model: QuantizedModel, node: QNode, table: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """How a native step finishes with the activation ``node`` whose ``table`` (from ``_table_follower``) it
    absorbed: computed value by value (``native.Activation``) where that equals the table on every input value
    (the float path of HardSwish, HardSigmoid, LeakyRelu, a rescaling Relu), else looked up in it."""
    lowest = qmin(model.width(node.inputs[0]))
    if node.table is None:
        exponents = (model.exponent(node.inputs[0]), model.exponent(node.outputs[0]))
        half_even = model.profile.rounding == "half_even"
        computed = native.Activation.verified(node.op_type, node.attrs, exponents, half_even, table, lowest)
        if computed is not None:
            return computed
    return functools.partial(native.lookup, table=table, lowest=lowest)


def _pool_follower(
    model: QuantizedModel, tensor: str, readers: dict[str, list[QNode]]
) -> tuple[QNode, Callable[[np.ndarray], np.ndarray]] | None:
    """The MaxPool a native step may finish with: the only reader of ``tensor`` (no model output), a 2x2 pool of
    stride 2 without padding, indices or ceil mode (``native.max_pool_2x2``; other pools stay in onnxruntime,
    whose own kernel is faster than a general one here)."""
    found = readers.get(tensor, [])
    if len(found) != 1 or tensor in model.outputs or found[0].op_type != "MaxPool":
        return None
    node = found[0]
    if node.inputs[0] != tensor or (len(node.outputs) > 1 and node.outputs[1]):
        return None
    try:
        attrs = _pool_attrs(node)
    except _Refused:
        return None
    plain = attrs["kernel_shape"] == [2, 2] and attrs["strides"] == [2, 2] and not any(attrs["pads"])
    return (node, native.max_pool_2x2) if plain else None


def _readers(nodes: list[QNode]) -> dict[str, list[QNode]]:
    """The nodes reading each tensor."""
    readers: dict[str, list[QNode]] = {}
    for node in nodes:
        for tensor in {t for t in node.inputs if t}:
            readers.setdefault(tensor, []).append(node)
    return readers


def compile_program(
    model: QuantizedModel, nodes: list[QNode], threads: int | None, guarded: frozenset[str] = frozenset()
) -> CompiledProgram:
    """Partition ``nodes`` into compiled segments, rail steps and interpreter steps; build one session per
    segment. Nodes whose first output is in ``guarded`` (their guards tripped before) become rail steps when
    they accumulate (exact on any data), else they stay in the interpreter."""
    needed_after: list[set[str]] = []
    live = set(model.outputs)
    for node in reversed(nodes):
        needed_after.append(set(live))
        live |= {t for t in node.inputs if t}
    needed_after.reverse()
    steps: list[_Segment | _RailStep | _NativeStep | QNode] = []
    ranges = _value_ranges(model, nodes)

    readers = _readers(nodes)
    fusions = _clamp_fusions(model, nodes, readers)
    clamps = {name: (*_clamp_bounds(model, follower), follower.outputs[0]) for name, follower in fusions.items()}

    def fresh() -> _Builder:
        return _Builder(model, ranges=ranges, rail_nodes=guarded, clamps=clamps)

    builder = fresh()
    count = 0
    # Relu / Clip nodes computed by the accumulating node before them: 1 when that node is in a segment (counted
    # there), 0 when it is a native step (which counts its follower itself).
    absorbed: dict[int, int] = {}
    for index, node in enumerate(nodes):
        if id(node) in absorbed:
            count += absorbed[id(node)]
            continue
        lower = _lower_table if node.table is not None else _LOWER.get(node.op_type)
        needed = needed_after[index - 1] if index else live
        mark = builder.mark()
        builder.bits = node.bits
        try:
            tripped = bool(node.outputs) and node.outputs[0] in guarded
            if lower is None or (tripped and (node.op_type not in _RAIL_STEPS or node.table is not None)):
                raise _Refused("no lowering")
            lower(builder, node)
        except _Refused:
            builder.rollback(mark)
            if builder.nodes:
                steps += _segment(builder, sorted(builder.produced & needed), threads, count)
            builder, count = fresh(), 0
            steps.append(node)
            continue
        count += 1
        outside = False  # the node's outputs come from a native step, not from the next segment
        if builder.pending is not None:  # a rail step: the sums leave this segment, the shift starts the next
            step, finish = builder.pending
            builder.pending = None
            outside = isinstance(step, _NativeStep)
            steps += _segment(builder, sorted(builder.produced & needed), threads, count - outside)
            steps.append(step)
            builder, count = fresh(), 0
            builder.bits = node.bits
            finish(builder)
        follower = fusions.get(node.outputs[0]) if node.outputs else None
        if outside:
            native_step = steps[-1]
            assert isinstance(native_step, _NativeStep)
            if follower is not None:
                native_step.absorb(follower)
                absorbed[id(follower)] = 0
            activation = _table_follower(model, native_step.output, readers)
            if activation is not None:
                native_step.absorb(activation[0], _activation_after(model, *activation))
                absorbed[id(activation[0])] = 0
            pool = _pool_follower(model, native_step.output, readers)
            if pool is not None:
                native_step.absorb(pool[0], pool[1])
                absorbed[id(pool[0])] = 0
            continue
        if follower is not None and node.op_type in _CLAMPING:
            absorbed[id(follower)] = 1
            builder.produced.update(follower.outputs)
            continue
        builder.produced.update(t for t in node.outputs if t)
    if builder.nodes:
        steps += _segment(builder, sorted(builder.produced & needed_after[-1]), threads, count)
    _chain_channels_last(steps, set(model.outputs))
    # onnxruntime's idle workers spin after every op. That may pay when nothing else runs between its calls (a
    # program of one segment), and ruins a program whose native steps, rail steps or interpreter run between
    # segments on the same cores with numpy's BLAS threads: 2 cores, default threads, PP-OCR's int16 classifier at
    # batch 1 took 78 ms a sample with spinning workers, 6.5 ms without; MediaPipe's BlazeFace 200 ms against 8-9.
    spinning = len(steps) == 1
    for step in steps:
        if isinstance(step, _Segment):
            step.open(spinning)
    return CompiledProgram(steps)


def _chain_channels_last(steps: list[_Segment | _RailStep | _NativeStep | QNode], outputs: set[str]) -> None:
    """Choose the layout each native convolution computes in (``native.Conv.computes_last``) and keep channels
    last (``gives_last`` / ``takes_last``) each tensor one of them computes channels last and only native
    convolutions read: a MobileNet block's 1x1 expansion, depthwise layer and 1x1 projection, or a
    depthwise-separable CNN, then chain without transposing in between. In program order, from the float model's
    plane sizes (``native.Conv.layout``): a depthwise layer computes channels last when its input is or its
    output plane is narrow; a 1x1 layer through BLAS when its input is or every reader prefers it. A tensor any
    other step reads (an onnxruntime segment, the interpreter, the caller) stays in ONNX's layout. The layouts
    only move the work, never the integers (native.Conv transposes what it needs)."""
    readers: dict[str, list[object]] = {}
    for step in steps:
        for name in _reads(step):
            readers.setdefault(name, []).append(step)
    chained: set[str] = set()
    for step in steps:
        conv = _native_conv(step)
        if conv is None:
            continue
        assert isinstance(step, _NativeStep)
        conv.takes_last = step.inputs[0] in chained
        plane = _static_plane(step)
        if plane is None:
            continue
        found = readers.get(step.output, [])
        chainable = bool(found) and step.output not in outputs and all(_native_conv(r) is not None for r in found)
        last = conv.computes_last_by_default(*plane) or (
            conv.layout(*plane) == native.EITHER and chainable and all(_reader_layout(r) == native.LAST for r in found)
        )
        conv.computes_last = last
        if last and chainable:
            conv.gives_last = True
            chained.add(step.output)
            step.after = [native.max_pool_2x2_channels_last if f is native.max_pool_2x2 else f for f in step.after]


def _reads(step: object) -> list[str]:
    """The tensors a step reads from the environment."""
    if isinstance(step, _RailStep):
        return [step.x, step.acc, step.magnitude, step.flag]
    return [t for t in getattr(step, "inputs", ()) if t]


def _native_conv(step: object) -> native.Conv | None:
    """The convolution kernel of a native step (None for anything else)."""
    kernel = getattr(step, "kernel", None) if isinstance(step, _NativeStep) else None
    return kernel if isinstance(kernel, native.Conv) else None


def _static_plane(step: object) -> tuple[int, int] | None:
    """A native step's input plane (height, width) from the float model's shapes, when known."""
    shape = (step.node.input_shapes or [None])[0] if isinstance(step, _NativeStep) else None
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
        return None
    return int(shape[2]), int(shape[3])  # type: ignore[arg-type]


def _reader_layout(step: object) -> str | None:
    """The layout a native convolution prefers for its input plane (None when the plane is not known)."""
    conv, plane = _native_conv(step), _static_plane(step)
    return None if conv is None or plane is None else conv.layout(*plane)


def _segment(
    builder: _Builder, outputs: list[str], threads: int | None, count: int
) -> list[_Segment] | list[_NativeStep]:
    """The segment, or nothing when no later step reads what it computes (dead nodes), or a native step
    (``native.Activation.quantizer``) when all it would do is quantize an input: the segment before an int16
    model's first native layer, whose onnxruntime call cost more than the quantization. The session is made
    later (``_Segment.open``)."""
    outputs = list(dict.fromkeys(outputs + builder.exports))
    if not outputs and not builder.guards:
        return []
    node = builder.quantized_input
    if count == 1 and node is not None and outputs == node.outputs[:1] and NATIVE and native.AVAILABLE:
        m = builder.model
        half_even = m.profile.rounding == "half_even"
        quantize = native.Activation.quantizer(m.exponent(node.outputs[0]), half_even, m.width(node.outputs[0]))
        return [_NativeStep(node, tuple(node.inputs[:1]), node.outputs[0], quantize)]
    inputs = list(dict.fromkeys(t for t in builder.consumed if t not in builder.produced))

    def info(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, builder.types.get(name, TensorProto.FLOAT), None)

    graph = helper.make_graph(
        builder.nodes,
        "espquant_compiled_segment",
        [info(name) for name in inputs],
        [info(name) for name in outputs]
        + [helper.make_tensor_value_info(name, TensorProto.BOOL, None) for name in builder.guards],
        builder.initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    doubles = frozenset(name for name in inputs if builder.types.get(name) == TensorProto.DOUBLE)
    internal = frozenset(builder.exports) - builder.produced
    floats = frozenset(outputs) & builder.model.float_tensors
    guards, guard_nodes = list(builder.guards), list(builder.guard_nodes)
    segment = _Segment(inputs, outputs, guards, guard_nodes, count, doubles, internal, floats, proto, threads)
    return [segment]
