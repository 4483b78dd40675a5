"""The legacy ESP-DL library's arithmetic (v1.1 / v2.0, esp-dl a95b00ea, November 2021) as a runtime profile.

``export_coefficient_to_cpp`` writes C++ for the legacy layer classes (``dl::layer::Conv2D`` ...), whose integer
rules differ from ESP-DL v3 (``docs/LEGACY_ARITHMETIC.md``): constants and inputs round half to even, every right
shift truncates toward minus infinity, the per-tensor bias is added *after* the shift at the output exponent,
int8 per-channel layers take a detour through int16, Add2D aligns its inputs to the coarser exponent, and the
LeakyReLU / PReLU slopes are truncated to ``bits - 1`` fraction bits. The rules were read off the original
toolkit's ``Evaluator`` (the quantized ONNX graph it builds and runs) and checked against its outputs bit for bit.

This module lowers an ONNX model and its table to the same integer model the v3 simulator uses
(:class:`~espquant.simulator.quantized_model.QuantizedModel`, one :class:`QNode` per legacy layer) and runs it
with its own kernel table (:data:`LEGACY_RUN`): only the kernels differ. ``export/cpp.py`` writes the constants
computed here (:func:`legacy_bias`, :func:`legacy_slope`), so what it exports is what is simulated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import onnx

from espquant.errors import EspquantError, QuantTableError, TargetError, UnsupportedModelError, UnsupportedOpError
from espquant.graph import GraphView, node_attributes, opset_version
from espquant.quant.pot import EXACT_FLOAT64
from espquant.quant.profiles import LEGACY_TARGETS, TargetProfile, get_target
from espquant.quant.rounding import round_float, saturate
from espquant.simulator import kernels
from espquant.simulator.quantized_model import QNode, QuantizedModel
from espquant.table import QuantTable

__all__ = [
    "LEGACY_OPS",
    "LEGACY_RUN",
    "PER_CHANNEL_BIAS_SHIFT",
    "LegacyModel",
    "build_legacy_model",
    "finish_accumulator",
    "legacy_bias",
    "legacy_profile",
    "legacy_slope",
    "quantize_half_even",
    "shift_floor",
]

# int8 per-channel layers: the accumulator is shifted right by 4 into int16, where the int16 bias (at
# e_in + e_w[n] + 4) is added; the quantization spec and the original toolkit's table both say so.
PER_CHANNEL_BIAS_SHIFT = 4

# Ops the legacy library runs whose integer rule espquant cannot vouch for: the original toolkit's Evaluator,
# the only reference (the kernels ship as prebuilt .a files), does not compute them in integers.
_UNKNOWN_RULES = {
    "AveragePool": "the original toolkit's Evaluator averages in float and ignores the output exponent, so the "
    "legacy AvgPool2D's integer rounding is unknown",
    "GlobalAveragePool": "the original toolkit's Evaluator averages in float and ignores the output exponent, so "
    "the legacy GlobalAveragePool2D's integer rounding is unknown",
    "Sub": "the original toolkit's Evaluator subtracts the raw integers without rescaling or saturating, so the "
    "legacy Sub2D's integer rule is unknown",
    "Mul": "the original toolkit's Evaluator multiplies the raw integers without rescaling or saturating, so the "
    "legacy Mul2D's integer rule is unknown",
}


# --- integer primitives ---------------------------------------------------------------------------------------


def shift_floor(values: np.ndarray, shift: int | np.ndarray) -> np.ndarray:
    """``floor(v * 2**-shift)`` exactly in int64 (a left shift when ``shift < 0``): the legacy library's shift,
    which truncates toward minus infinity (the original Evaluator: ``Mul(2**-shift)`` then ``Floor``)."""
    v = np.asarray(values, dtype=np.int64)
    s = np.asarray(shift, dtype=np.int64)
    right = v >> np.minimum(np.maximum(s, 0), 63)  # past 63 bits the floor is 0 or -1 already
    # A left shift never wraps: beyond 2^62 the value saturates (every caller saturates far below that).
    left_bits = np.minimum(np.maximum(-s, 0), 62)
    limit = np.int64(1) << (62 - left_bits)
    left = np.clip(v, -limit, limit) << left_bits
    return np.where(s >= 0, right, left)


def quantize_half_even(
    value: np.ndarray, exponent: int | list[int] | np.ndarray, bits: int, axis: int = 0
) -> np.ndarray:
    """``sat(rint(v * 2**-e))``: how the legacy toolkit quantizes inputs, weights and biases (``np.round``, half
    to even), with one exponent per slice along ``axis`` when ``exponent`` is a list."""
    v = np.asarray(value, dtype=np.float64)
    if isinstance(exponent, (list, np.ndarray)) and np.ndim(exponent):
        shape = [1] * v.ndim
        shape[axis] = len(exponent)
        scale = (2.0 ** -np.asarray(exponent, dtype=np.float64)).reshape(shape)
    else:
        scale = 2.0 ** -int(exponent)  # type: ignore[arg-type]
    return saturate(round_float(v * scale, "half_even"), bits)


def legacy_bias(
    bias: np.ndarray, e_in: int, e_w: int | list[int], e_out: int, bits: int
) -> tuple[np.ndarray, int | list[int]]:
    """The bias the legacy layer adds, and its exponent(s).

    Per tensor it is added after the shift, so it lives at the output exponent in the feature type; int8 per
    channel it is added to the accumulator shifted right by 4, so it is int16 at ``e_in + e_w[n] + 4``.
    """
    values = np.asarray(bias, dtype=np.float64).reshape(-1)
    if isinstance(e_w, list):
        exponents = [e_in + e + PER_CHANNEL_BIAS_SHIFT for e in e_w]
        return quantize_half_even(np.broadcast_to(values, (len(e_w),)), exponents, 16), exponents
    return quantize_half_even(values, e_out, bits), e_out


def legacy_slope(alpha: float | np.ndarray, bits: int) -> tuple[np.ndarray, int]:
    """A LeakyReLU alpha or PReLU slopes as the legacy layer holds them: truncated toward zero to ``bits - 1``
    fraction bits (exponent ``1 - bits``) whatever the table says, not saturated (an alpha of 1.7 at int8 is 217).
    """
    exponent = 1 - bits
    scaled = np.asarray(alpha, dtype=np.float32).astype(np.float64) * 2.0**-exponent
    return np.trunc(scaled).astype(np.int64), exponent


def _exact_sums(cols: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``cols (rows, K) @ weight (K, N)`` exactly: float BLAS only under its exactness bound, else int64."""
    bound = float(kernels._max_abs(cols)) * float(np.abs(weight.astype(np.int64)).sum(axis=0).max(initial=0))
    return kernels._exact_matmul(cols, weight, bound)


def _conv_sums(x: np.ndarray, w: np.ndarray, attrs: dict, depthwise: bool) -> np.ndarray:
    """Exact integer sums of a 2-D convolution on NCHW integers (zero padding), without bias: ``(N, C_out, H, W)``."""
    batch, channels, height, width = x.shape
    n, _, kh, kw = w.shape
    top, left, bottom, right = (int(p) for p in attrs.get("pads", [0, 0, 0, 0]))
    sh, sw = (int(s) for s in attrs.get("strides", [1, 1]))
    dh, dw = (int(d) for d in attrs.get("dilations", [1, 1]))
    padded = np.pad(np.moveaxis(x, 1, -1).astype(np.int64), [(0, 0), (top, bottom), (left, right), (0, 0)])
    taps = kernels.conv_taps(padded, (kh, kw), (sh, sw), (dh, dw))
    out_h, out_w = taps[0].shape[1:3]
    if depthwise:
        cols = np.stack(taps, axis=-2).reshape(-1, kh * kw, channels)  # (rows, taps, C)
        weight = w[:, 0].reshape(n, kh * kw).T.astype(np.int64)  # (taps, C)
        bound = float(kernels._max_abs(cols)) * float(np.abs(weight).sum(axis=0).max(initial=0))
        kind = np.float64 if bound < EXACT_FLOAT64 else np.int64
        sums = np.einsum("rtc,tc->rc", cols.astype(kind), weight.astype(kind)).astype(np.int64)
    else:
        cols = np.stack(taps, axis=3).reshape(-1, kh * kw * channels)  # (kh, kw, c) order
        sums = _exact_sums(cols, np.moveaxis(w, 1, -1).reshape(n, -1).T.astype(np.int64))
    return np.moveaxis(sums.reshape(batch, out_h, out_w, n), -1, 1)


# --- the model ------------------------------------------------------------------------------------------------


@dataclass
class LegacyModel(QuantizedModel):
    """The integer model under the legacy library's rules: the v3 container, its own kernels and input rounding.

    Always interpreted (the compiled fast path encodes the v3 rules)."""

    def __post_init__(self) -> None:
        self.compiled = False

    def quantize_input(self, name: str, x: np.ndarray) -> np.ndarray:
        """``q = sat(rint(x 2^-e))``: the original Evaluator quantizes its inputs with ``np.round``."""
        return quantize_half_even(np.asarray(x), self.exponent(name), self.width(name))

    def run_node(self, node: QNode, env: dict[str, np.ndarray]) -> None:
        env.update(zip(node.outputs, LEGACY_RUN[node.op_type](self, node, env)))


def _acc_saturate(m: QuantizedModel, node: QNode, sums: np.ndarray) -> np.ndarray:
    """The accumulator register: the chip's width for the layer's width (ESP32-S3: QACC 20 / 40 bits)."""
    return saturate(sums, m.profile.conv_acc_bits[node.bits])


def finish_accumulator(m: QuantizedModel, node: QNode, sums: np.ndarray, channel_axis: int) -> np.ndarray:
    """Accumulator -> output of Conv2D / DepthwiseConv2D / FullyConnected (per tensor or int8 per channel)."""
    acc = _acc_saturate(m, node, sums)
    e_in, e_out = m.exponent(node.inputs[0]), m.exponent(node.outputs[0])
    e_w = m.exponents[node.inputs[1]]
    bias = m.constants.get(node.attrs["legacy_bias"]) if node.attrs.get("legacy_bias") else None
    shape = [1] * acc.ndim
    shape[channel_axis] = -1
    if isinstance(e_w, list):  # int8 per channel: >> 4 into int16, + int16 bias, then to int8
        t = shift_floor(acc, PER_CHANNEL_BIAS_SHIFT)
        if bias is not None:
            t = t + bias.reshape(shape)
        t = saturate(t, 16)
        shift = (e_out - e_in - PER_CHANNEL_BIAS_SHIFT - np.asarray(e_w, dtype=np.int64)).reshape(shape)
        return saturate(shift_floor(t, shift), node.bits)
    y = shift_floor(acc, e_out - e_in - int(e_w))
    if bias is not None:
        y = y + bias.reshape(shape)
    return saturate(y, node.bits)


def _conv(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    x, w = env[node.inputs[0]], env[node.inputs[1]]
    sums = _conv_sums(x, w, node.attrs, depthwise=int(node.attrs.get("group", 1)) > 1)
    return [finish_accumulator(m, node, sums, channel_axis=1)]


def _fully_connected(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Gemm / MatMul by a constant (the weight in ONNX's layout, ``(N, K)`` under ``transB``)."""
    x, w = env[node.inputs[0]], env[node.inputs[1]]
    w = w.T if node.attrs.get("transB", 0) else w
    rows = x.reshape(-1, x.shape[-1]).astype(np.int64)
    sums = _exact_sums(rows, w.astype(np.int64)).reshape(*x.shape[:-1], w.shape[1])
    return [finish_accumulator(m, node, sums, channel_axis=-1)]


def _add(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Add2D: the finer input is floored to the coarser exponent, the sum shifted (floor) to the output."""
    a, b = (env[t].astype(np.int64) for t in node.inputs[:2])
    e_a, e_b = m.exponent(node.inputs[0]), m.exponent(node.inputs[1])
    e_hi = max(e_a, e_b)
    total = shift_floor(a, e_hi - e_a) + shift_floor(b, e_hi - e_b)
    return [saturate(shift_floor(total, m.exponent(node.outputs[0]) - e_hi), node.bits)]


def _relu(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [np.maximum(env[node.inputs[0]], 0)]


def _slope_activation(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    """LeakyReLU / PReLU: ``x`` where ``x >= 0``, else ``floor(x * alpha / 2^(bits-1))``, saturated."""
    x = env[node.inputs[0]].astype(np.int64)
    slope = m.constants[node.attrs["legacy_slope"]]
    if slope.size > 1:  # PReLU: one slope per channel (axis 1 of NCHW, or the last axis of a flat tensor)
        slope = slope.reshape([-1] + [1] * (x.ndim - 2)) if x.ndim > 2 else slope.reshape(-1)
    negative = shift_floor(x * slope, node.bits - 1)
    return [saturate(np.where(x >= 0, x, negative), node.bits)]


def _max_pool(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    x = env[node.inputs[0]]
    args = kernels.pool_arguments(node.attrs, x.shape[2:4], False)
    return [np.moveaxis(kernels.max_pool_nhwc(np.moveaxis(x, 1, -1), **args), -1, 1)]


def _concat(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [np.concatenate([env[t] for t in node.inputs if t], axis=int(node.attrs.get("axis", 0)))]


def _flatten(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Flatten, and Reshape to ``(N, K)``: the legacy Flatten (both keep the values and the exponent)."""
    x = env[node.inputs[0]]
    return [x.reshape(x.shape[0], -1)]


def _identity(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [env[node.inputs[0]]]


Kernel = Callable[[QuantizedModel, QNode, dict[str, np.ndarray]], list[np.ndarray]]

LEGACY_RUN: dict[str, Kernel] = {
    "Conv": _conv,
    "Gemm": _fully_connected,
    "MatMul": _fully_connected,
    "Add": _add,
    "Relu": _relu,
    "LeakyRelu": _slope_activation,
    "PRelu": _slope_activation,
    "MaxPool": _max_pool,
    "Concat": _concat,
    "Flatten": _flatten,
    "Reshape": _flatten,
    "Identity": _identity,
}
# The ops the legacy profile simulates: those export/cpp.py writes as legacy layers, less _UNKNOWN_RULES.
LEGACY_OPS = frozenset(LEGACY_RUN)


# --- lowering -------------------------------------------------------------------------------------------------


def legacy_profile(target: str | TargetProfile) -> TargetProfile:
    """The profile of a chip the legacy library served: the chip's accumulator widths, and int8 per-channel
    weights, which the legacy library runs on every chip it served (unlike ESP-DL v3).

    Raises:
        TargetError: a chip the legacy library did not serve.
    """
    profile = get_target(target)
    if profile.name not in LEGACY_TARGETS:
        raise TargetError(
            f"target chip {profile.name!r} is not served by the legacy ESP-DL library (v1.1 / v2.0); valid targets: "
            f"{', '.join(LEGACY_TARGETS)}."
        )
    return replace(profile, per_channel_weights=True, description=f"{profile.description}, legacy ESP-DL library")


class _Lowering:
    """Walks the ONNX nodes in order, turning each into one legacy layer or recording why it cannot be one."""

    def __init__(self, model: onnx.ModelProto, table: QuantTable, bits: int) -> None:
        try:  # shapes for the layer checks (MaxPool / Reshape rank, Add operands), as the exporter infers them
            inferred = onnx.shape_inference.infer_shapes(model)
        except (onnx.shape_inference.InferenceError, ValueError):
            inferred = model
        self.view = GraphView(inferred.graph)
        self.opset = opset_version(model)
        self.table = table
        self.bits = bits
        self.exps: dict[str, int | list[int]] = {}
        self.constants: dict[str, np.ndarray] = {}
        self.nodes: list[QNode] = []
        self.problems: list[str] = []

    def problem(self, node: onnx.NodeProto, reason: str) -> None:
        self.problems.append(f"node {node.name!r} ({node.op_type}): {reason}")

    def exponent(self, tensor: str) -> int | list[int] | None:
        value = self.exps.get(tensor, self.table.exponents.get(tensor))
        if value is None:
            return None
        return [int(v) for v in value] if isinstance(value, (list, tuple, np.ndarray)) else int(value)

    def activation(self, node: onnx.NodeProto, tensor: str) -> int | None:
        """The exponent of an activation tensor (recorded for the model), or None with a problem recorded."""
        if self.view.is_constant(tensor):
            self.problem(node, f"input {tensor!r} is a constant; the legacy layer takes tensors only")
            return None
        e = self.exponent(tensor)
        if not isinstance(e, int):
            self.problem(node, f"the table has no (per-tensor) exponent for {tensor!r}")
            return None
        self.exps[tensor] = e
        return e

    def lower(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        if op in _UNKNOWN_RULES:
            self.problem(node, _UNKNOWN_RULES[op])
            return
        if op not in LEGACY_RUN:
            self.problem(node, "the legacy ESP-DL library (v1.1 / v2.0) has no layer espquant exports for this op")
            return
        attrs = node_attributes(node, self.opset)
        inputs = [t for t in node.input]
        handler = {"Conv": self.linear, "Gemm": self.linear, "MatMul": self.linear, "Add": self.add}.get(op)
        if handler is not None:
            handler(node, attrs, inputs)
        elif op in ("LeakyRelu", "PRelu"):
            self.slope(node, attrs, inputs)
        elif op == "Concat":
            self.same_exponent(node, attrs, [t for t in inputs if t])
        else:  # Relu, MaxPool, Flatten, Reshape, Identity: the output keeps the input's exponent
            self.same_exponent(node, attrs, inputs[:1])

    def structure(self, node: onnx.NodeProto, attrs: dict) -> str | None:
        """Why a pass-through node is no legacy layer (None: it is one)."""
        if node.op_type == "Reshape":
            shape = self.view.shape(node.output[0])
            if shape is not None and len(shape) != 2:
                return "only a Reshape to (N, K) is a legacy layer (Flatten)"
        if node.op_type == "Flatten" and int(attrs.get("axis", 1)) != 1:
            return "only Flatten with axis 1 is a legacy layer"
        if node.op_type == "MaxPool":
            shape = self.view.shape(node.input[0])
            if shape is None or len(shape) != 4:
                return "only 2-D pooling of (N, C, H, W) inputs is a legacy MaxPool2D"
            if attrs.get("ceil_mode", 0) or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
                return "ceil_mode or auto_pad SAME_* are not expressible as a legacy MaxPool2D"
            if any(int(d) != 1 for d in attrs.get("dilations", [1, 1])):
                return "pools with dilation are not expressible as a legacy MaxPool2D"
        if node.op_type == "Concat" and int(attrs.get("axis", 0)) == 0:
            return "concatenation along the batch axis is not expressible"
        return None

    def add_node(self, node: onnx.NodeProto, attrs: dict, inputs: list[str]) -> None:
        out = node.output[0]
        e_out = self.exponent(out)
        if not isinstance(e_out, int):
            self.problem(node, f"the table has no (per-tensor) exponent for {out!r}")
            return
        self.exps[out] = e_out
        self.nodes.append(QNode(node.op_type, node.name, inputs, [out], attrs, bits=self.bits))

    def same_exponent(self, node: onnx.NodeProto, attrs: dict, tensors: list[str]) -> None:
        """Layers that keep their input's exponent (Relu, MaxPool, Flatten, Concat ...): the table must agree,
        as the chip's tensor carries its exponent on and the next layer reads it."""
        found = [self.activation(node, t) for t in tensors]
        e_out = self.exponent(node.output[0])
        if any(e is None for e in found):
            return
        reason = self.structure(node, attrs)
        if reason is not None:
            self.problem(node, reason)
            return
        if any(e != e_out for e in found):
            self.problem(
                node,
                f"input exponent(s) {sorted(set(found))} differ from output exponent {e_out}; the legacy layer keeps "
                "the input exponent",
            )
            return
        self.add_node(node, attrs, tensors)

    def weight(self, node: onnx.NodeProto, tensor: str, axis: int) -> int | list[int] | None:
        if not self.view.is_constant(tensor):
            self.problem(node, "the second operand is not a constant; the legacy layer needs a constant filter")
            return None
        e_w = self.exponent(tensor)
        if e_w is None:
            self.problem(node, f"the table has no exponent for the weight {tensor!r}")
            return None
        if isinstance(e_w, list) and len(e_w) == 1:
            e_w = e_w[0]
        if isinstance(e_w, list) and self.bits != 8:
            self.problem(node, "per-channel weights at int16; the legacy library runs per-channel int8 only")
            return None
        self.exps[tensor] = e_w
        self.constants[tensor] = quantize_half_even(self.view.array(tensor), e_w, self.bits, axis)
        return e_w

    def linear(self, node: onnx.NodeProto, attrs: dict, inputs: list[str]) -> None:
        """Conv -> Conv2D / DepthwiseConv2D; Gemm and MatMul by a constant -> FullyConnected."""
        op = node.op_type
        e_in = self.activation(node, inputs[0])
        if op == "Conv":
            w_shape = self.view.array(inputs[1]).shape if self.view.is_constant(inputs[1]) else ()
            group = int(attrs.get("group", 1))
            if len(w_shape) != 4:
                self.problem(node, "only 2-D convolutions are legacy layers")
                return
            if group > 1 and not (w_shape[1] == 1 and w_shape[0] == group):
                self.problem(node, f"group={group} is not a depthwise convolution with one filter per channel")
                return
            if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
                self.problem(node, "auto_pad SAME_* is not expressible; export with explicit pads")
                return
            axis = 0
        elif op == "Gemm":
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                self.problem(node, "transA, alpha or beta differ from the defaults")
                return
            axis = 0 if attrs.get("transB", 0) else 1
        else:
            axis = 1
        e_w = self.weight(node, inputs[1], axis)
        if e_in is None or e_w is None:
            return
        e_out = self.exponent(node.output[0])
        attrs = dict(attrs)
        if op != "MatMul" and len(inputs) > 2 and inputs[2] and isinstance(e_out, int):
            if not self.view.is_constant(inputs[2]):
                self.problem(node, "the bias is not a constant")
                return
            values, e_b = legacy_bias(self.view.array(inputs[2]), e_in, e_w, e_out, self.bits)
            name = f"{inputs[2]}__legacy"
            self.constants[name], self.exps[name] = values, e_b
            attrs["legacy_bias"] = name
        self.add_node(node, attrs, inputs[:2])

    def add(self, node: onnx.NodeProto, attrs: dict, inputs: list[str]) -> None:
        found = [self.activation(node, t) for t in inputs[:2]]
        shapes = [self.view.shape(t) for t in inputs[:2]]
        if None not in found and shapes[0] is not None and shapes[0] != shapes[1]:
            self.problem(node, f"input shapes {shapes[0]} and {shapes[1]}: Add2D needs two tensors of one shape")
            return
        if None not in found:
            self.add_node(node, attrs, inputs[:2])

    def slope(self, node: onnx.NodeProto, attrs: dict, inputs: list[str]) -> None:
        if node.op_type == "LeakyRelu":
            alpha: np.ndarray = np.array([float(attrs.get("alpha", 0.01))])
        elif self.view.is_constant(inputs[1]):
            alpha = self.view.array(inputs[1]).reshape(-1)
        else:
            self.problem(node, "the slope is not a constant")
            return
        values, exponent = legacy_slope(alpha, self.bits)
        name = f"{node.output[0]}__legacy_slope"
        self.constants[name], self.exps[name] = values, exponent
        self.same_exponent(node, {**attrs, "legacy_slope": name}, inputs[:1])


def build_legacy_model(
    model: onnx.ModelProto, table: QuantTable, profile: str | TargetProfile, bits: int
) -> LegacyModel:
    """The integer model of ``model`` under ``table`` as the legacy library runs it on ``profile``'s chip.

    Raises:
        TargetError: a chip the legacy library did not serve.
        QuantTableError: a table of another model.
        UnsupportedModelError: listing every node the legacy profile cannot simulate, with the reason.
    """
    target = legacy_profile(profile)
    if bits not in (8, 16):
        raise UnsupportedOpError(f"int{bits}: the legacy library runs int8 or int16 models.")
    if table.metadata.get("int16_layers"):
        raise UnsupportedModelError("the legacy ESP-DL library runs one width per model; this table mixes int8/int16.")
    model = table.model_for(model)  # the table's weight factors (equalization) applied
    lowering = _Lowering(model, table, bits)
    inputs = [i.name for i in model.graph.input if i.name in lowering.view.graph_inputs]
    if len(inputs) != 1:
        lowering.problems.append(f"the model has inputs {inputs}; a legacy model takes exactly one input")
    for name in inputs:
        e = lowering.exponent(name)
        if not isinstance(e, int):
            raise QuantTableError(f"the table has no exponent for the model input {name!r}.")
        lowering.exps[name] = e
    for node in model.graph.node:
        lowering.lower(node)
    if lowering.problems:
        listed = "\n  ".join(lowering.problems)
        raise UnsupportedModelError(
            f"the legacy ESP-DL library profile cannot simulate this model on {target.name} "
            f"({len(lowering.problems)} problem(s)):\n  {listed}"
        )
    return LegacyModel(
        nodes=lowering.nodes,
        constants=lowering.constants,
        exponents=lowering.exps,
        inputs=inputs,
        outputs=[o.name for o in model.graph.output],
        profile=target,
        bits=bits,
    )


def original_table_scales(model: onnx.ModelProto, table: QuantTable, bits: int) -> dict[str, float | np.ndarray]:
    """``table`` as the original toolkit's calibrator pickles it, so its ``Evaluator`` and
    ``export_coefficient_to_cpp`` read espquant's tables: scales ``2 ** e`` (float64), weights as arrays (one
    value per tensor, or per channel), biases at the legacy library's exponent (the output's per tensor,
    ``e_in + e_w[n] + 4`` per channel: :func:`legacy_bias`). A model the legacy library cannot run keeps the
    table's exponents, weights still as arrays."""
    try:
        legacy = build_legacy_model(model, table, "esp32s3", bits)
        weights = {n.inputs[1] for n in legacy.nodes if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.inputs) > 1}
        exponents: dict[str, int | list[int]] = dict(table.exponents)
        for name, value in legacy.exponents.items():
            if name.endswith("__legacy"):  # a bias at the legacy exponent
                exponents[name.removesuffix("__legacy")] = value
    except EspquantError:
        view = GraphView(model.graph)
        weights = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1}
        weights &= set(view.initializers)
        exponents = dict(table.exponents)
    scales: dict[str, float | np.ndarray] = {}
    for name, e in exponents.items():
        if isinstance(e, list) or name in weights:
            scales[name] = np.power(2.0, np.asarray(e if isinstance(e, list) else [e], dtype=np.float64))
        else:
            scales[name] = float(2.0**e)
    return scales
