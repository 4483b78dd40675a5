"""Hard-sigmoid and hard-swish written out with Add / Clip / Mul / Div -> one HardSigmoid / HardSwish node.

Exporters spell MobileNetV3's activations out when the target opset lacks them (PaddleOCR via paddle2onnx,
Keras via tf2onnx, PyTorch's ``x * F.relu6(x + 3) / 6``): ``Clip(x + 3, 0, 6) / 6`` is hard-sigmoid and
``x * Clip(x + 3, 0, 6) / 6`` hard-swish. Left as they are, each is three or four quantized layers on the chip,
each rounding to its own exponent; fused, it is one table look-up (int8) or one float-emulated op (int16).

Both rewrites are identities of real arithmetic, so the results agree up to float32 rounding:

- ``Clip(a * x + b, 0, 1) = HardSigmoid(x; alpha=a, beta=b)`` (any constants, the scale and the offset
  written as Mul / Div / Add / Sub by scalars in either order);
- ``s * Clip(a * x + b, 0, h) = HardSigmoid(x; alpha=s*a, beta=s*b)`` when ``s * h = 1`` (so ``s > 0``);
- ``x * HardSigmoid(x; 1/6, 1/2) = HardSwish(x)``, and ``s * (x * Clip(a * x + b, 0, h))`` likewise when
  ``s * h = 1``, ``s * a = 1/6`` and ``s * b = 1/2``.

"Equal" constants means equal up to a relative 1e-6 (float32 spellings of 1/6). Nodes are fused only when
every intermediate tensor is read by the next node of the pattern alone and is not a graph output. HardSwish
exists from opset 14 on: a model below that is converted with ONNX's version converter first (13 -> 14
changes no operator's meaning), and when that fails the hard-swish patterns stay as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, version_converter

from espquant.graph import GraphView, opset_version, replace_nodes, unique_name
from espquant.optimizer.pipeline import PassResult

__all__ = ["fuse_hard_sigmoid", "fuse_hard_swish", "HARD_SWISH_OPSET"]

HARD_SWISH_OPSET = 14
_IR_FOR_HARD_SWISH_OPSET = 7  # ONNX 1.9
_RELATIVE = 1e-6
_SWISH_ALPHA, _SWISH_BETA = 1.0 / 6.0, 0.5
# HardSigmoid's attribute defaults in every opset.
_HARD_SIGMOID_DEFAULTS = {"alpha": 0.2, "beta": 0.5}


def _close(value: float, wanted: float) -> bool:
    """``value`` equals ``wanted`` up to float32 rounding of how an exporter wrote it (relative 1e-6)."""
    return abs(value - wanted) <= _RELATIVE * abs(wanted)


@dataclass(frozen=True)
class _Affine:
    """``scale * source + offset``, computed by ``nodes`` (the Add/Sub/Mul/Div nodes walked, any order)."""

    source: str
    scale: float
    offset: float
    nodes: tuple[onnx.NodeProto, ...]
    kinds: frozenset[str]


@dataclass(frozen=True)
class _Fusion:
    """Replace ``nodes`` by ``fused`` (which writes the last node's output)."""

    nodes: tuple[onnx.NodeProto, ...]
    fused: onnx.NodeProto


class _Patterns:
    """Pattern look-ups over one snapshot of the graph; ``claimed`` keeps fusions from sharing nodes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.view = GraphView(model.graph)
        self.claimed: set[int] = set()
        self.taken = {n.name for n in model.graph.node}

    def private(self, name: str) -> bool:
        """True when one node reads ``name`` and it is not a graph output: its producer may disappear."""
        return self.view.single_consumer(name) is not None

    def free_producer(self, name: str, op_types: tuple[str, ...]) -> onnx.NodeProto | None:
        """The producer of ``name`` if it is one of ``op_types``, unclaimed, and ``name`` is private."""
        node = self.view.producer.get(name)
        if node is None or node.op_type not in op_types or node.domain not in ("", "ai.onnx"):
            return None
        if id(node) in self.claimed or not self.private(name):
            return None
        return node

    def scalar(self, name: str, data: str) -> float | None:
        """The value of constant ``name`` when it holds one float32 and broadcasting it cannot grow ``data``.

        float32 only: the tolerances are float32's, and the models ESP-DL quantizes are float32."""
        if not name or not self.view.is_constant(name):
            return None
        value = self.view.array(name)
        if value.size != 1 or value.dtype != np.float32:
            return None
        if value.ndim > 0:
            shape = self.view.shape(data)
            if shape is None or len(shape) < value.ndim:
                return None
        number = float(value.reshape(-1)[0])
        return number if math.isfinite(number) else None

    def step(self, node: onnx.NodeProto) -> tuple[str, str, float] | None:
        """``(data, kind, value)`` for ``data + c`` / ``data - c`` (kind ``offset``) or ``data * c`` /
        ``data / c`` (kind ``scale``) with a scalar constant ``c``; None for anything else."""
        if len(node.input) != 2:
            return None
        first, second = node.input
        if node.op_type in ("Add", "Mul"):
            kind = "offset" if node.op_type == "Add" else "scale"
            for data, constant in ((first, second), (second, first)):
                value = self.scalar(constant, data)
                if value is not None:
                    return data, kind, value
            return None
        value = self.scalar(second, first)
        if value is None:
            return None
        if node.op_type == "Sub":
            return first, "offset", -value
        if node.op_type == "Div" and value != 0.0:
            return first, "scale", 1.0 / value
        return None

    def affine(self, name: str) -> _Affine:
        """Walk back from ``name`` through at most one scale and one offset node (each output private)."""
        scale, offset, nodes, kinds = 1.0, 0.0, [], set()
        current = name
        while len(nodes) < 2:
            node = self.free_producer(current, ("Add", "Sub", "Mul", "Div"))
            step = None if node is None else self.step(node)
            if node is None or step is None or step[1] in kinds:
                break
            data, kind, value = step
            # current = data (+|*) value, and the result so far is scale * current + offset
            if kind == "offset":
                offset += scale * value
            else:
                scale *= value
            nodes.append(node)
            kinds.add(kind)
            current = data
        return _Affine(current, scale, offset, tuple(nodes), frozenset(kinds))

    def clip_bounds(self, node: onnx.NodeProto) -> tuple[float, float] | None:
        """``(low, high)`` of a Clip with constant bounds: inputs (opset >= 11) or attributes (opset 6)."""
        attrs = {a.name: a.f for a in node.attribute if a.name in ("min", "max")}
        low, high = attrs.get("min", -math.inf), attrs.get("max", math.inf)
        for position in (1, 2):
            if position < len(node.input) and node.input[position]:
                value = self.scalar(node.input[position], node.input[0])
                if value is None:
                    return None
                low, high = (value, high) if position == 1 else (low, value)
        return low, high

    def clamp(self, name: str) -> tuple[onnx.NodeProto, float, _Affine] | None:
        """``(clip, high, inner)`` when ``name`` is a private ``Clip(inner, 0, high)`` with a finite ``high > 0``."""
        clip = self.free_producer(name, ("Clip",))
        bounds = None if clip is None else self.clip_bounds(clip)
        if clip is None or bounds is None or bounds[0] != 0.0 or not 0.0 < bounds[1] < math.inf:
            return None
        return clip, bounds[1], self.affine(clip.input[0])

    def scaled(self, node: onnx.NodeProto) -> tuple[str, float] | None:
        """``(data, s)`` when ``node`` multiplies or divides by a scalar constant."""
        step = self.step(node) if node.op_type in ("Mul", "Div") else None
        return None if step is None else (step[0], step[2])

    def fusion(self, nodes: list[onnx.NodeProto], op_type: str, source: str, **attrs: float) -> _Fusion:
        """Claim ``nodes`` and build the node that replaces them; it keeps the last node's output and name."""
        self.claimed.update(id(n) for n in nodes)
        last = nodes[-1]
        name = last.name or unique_name(op_type, self.taken)
        return _Fusion(tuple(nodes), helper.make_node(op_type, [source], [last.output[0]], name=name, **attrs))


def _hard_sigmoid_at(patterns: _Patterns, node: onnx.NodeProto) -> _Fusion | None:
    """A hard-sigmoid ending at ``node``: ``Clip(a*x + b, 0, 1)`` or ``s * Clip(a*x + b, 0, 1/s)``."""
    if id(node) in patterns.claimed or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Clip":
        bounds = patterns.clip_bounds(node)
        if bounds is None or bounds[0] != 0.0 or not _close(bounds[1], 1.0):
            return None
        inner = patterns.affine(node.input[0])
        if inner.kinds != {"scale", "offset"}:
            return None
        nodes = [*reversed(inner.nodes), node]
        return patterns.fusion(nodes, "HardSigmoid", inner.source, alpha=inner.scale, beta=inner.offset)
    outer = patterns.scaled(node)
    if outer is None:
        return None
    data, s = outer
    found = patterns.clamp(data)
    if found is None:
        return None
    clip, high, inner = found
    if not _close(s * high, 1.0) or "offset" not in inner.kinds:
        return None
    nodes = [*reversed(inner.nodes), clip, node]
    return patterns.fusion(nodes, "HardSigmoid", inner.source, alpha=s * inner.scale, beta=s * inner.offset)


def _replace(model: onnx.ModelProto, fusions: list[_Fusion]) -> None:
    """Put each fused node where its pattern's last node was (its input is computed before the pattern)."""
    replacements: dict[int, list[onnx.NodeProto]] = {}
    for fusion in fusions:
        for node in fusion.nodes:
            replacements[id(node)] = []
        replacements[id(fusion.nodes[-1])] = [fusion.fused]
    replace_nodes(model.graph, replacements)


def fuse_hard_sigmoid(model: onnx.ModelProto) -> PassResult:
    """Replace written-out hard-sigmoids (``Clip(x/6 + 0.5, 0, 1)``, ``Clip(x + 3, 0, 6) / 6`` ...) by HardSigmoid."""
    patterns = _Patterns(model)
    fusions = [f for f in (_hard_sigmoid_at(patterns, node) for node in model.graph.node) if f is not None]
    if not fusions:
        return PassResult()
    _replace(model, fusions)
    return PassResult(len(fusions), (f"fused {len(fusions)} written-out hard-sigmoid(s) into HardSigmoid",))


def _hard_sigmoid_attrs(node: onnx.NodeProto) -> tuple[float, float]:
    values = {**_HARD_SIGMOID_DEFAULTS, **{a.name: a.f for a in node.attribute if a.name in ("alpha", "beta")}}
    return values["alpha"], values["beta"]


def _hard_swish_at(patterns: _Patterns, node: onnx.NodeProto) -> _Fusion | None:
    """A hard-swish ending at ``node``: ``x * HardSigmoid(x; 1/6, 1/2)`` or ``s * (x * Clip(a*x + b, 0, 1/s))``."""
    if id(node) in patterns.claimed or node.domain not in ("", "ai.onnx") or node.op_type not in ("Mul", "Div"):
        return None
    if node.op_type == "Mul" and len(node.input) == 2:
        for x, other in (tuple(node.input), tuple(reversed(node.input))):
            gate = patterns.free_producer(other, ("HardSigmoid",))
            if gate is not None and gate.input[0] == x and x != other:
                alpha, beta = _hard_sigmoid_attrs(gate)
                if _close(alpha, _SWISH_ALPHA) and _close(beta, _SWISH_BETA):
                    return patterns.fusion([gate, node], "HardSwish", x)
    outer = patterns.scaled(node)
    product = None if outer is None else patterns.free_producer(outer[0], ("Mul",))
    if outer is None or product is None or len(product.input) != 2:
        return None
    s = outer[1]
    for x, other in (tuple(product.input), tuple(reversed(product.input))):
        found = patterns.clamp(other) if x != other else None
        if found is None:
            continue
        clip, high, inner = found
        if (
            inner.source == x
            and "offset" in inner.kinds
            and _close(s * high, 1.0)
            and _close(s * inner.scale, _SWISH_ALPHA)
            and _close(s * inner.offset, _SWISH_BETA)
        ):
            return patterns.fusion([*reversed(inner.nodes), clip, product, node], "HardSwish", x)
    return None


def _hard_swish_fusions(model: onnx.ModelProto) -> list[_Fusion]:
    patterns = _Patterns(model)
    return [f for f in (_hard_swish_at(patterns, node) for node in model.graph.node) if f is not None]


def _raise_opset(model: onnx.ModelProto) -> str | None:
    """Convert ``model`` in place to opset 14 (HardSwish's first); returns why it could not, else None."""
    current = opset_version(model)
    try:
        converted = version_converter.convert_version(model, HARD_SWISH_OPSET)
    except Exception as exc:  # the converter raises plain RuntimeErrors from C++
        return f"could not convert opset {current} to {HARD_SWISH_OPSET} ({exc})"
    # The converter stamps the installed onnx's newest IR version; keep the input's (onnxruntime may be older).
    converted.ir_version = max(model.ir_version, _IR_FOR_HARD_SWISH_OPSET)
    model.CopyFrom(converted)
    return None


def fuse_hard_swish(model: onnx.ModelProto) -> PassResult:
    """Replace written-out hard-swishes (``x * Clip(x + 3, 0, 6) / 6``, ``x * HardSigmoid(x)``) by HardSwish.

    Raises the model's opset to 14 when it finds one in an older model (HardSwish does not exist before).
    """
    fusions = _hard_swish_fusions(model)
    if not fusions:
        return PassResult()
    details = []
    current = opset_version(model)
    if current < HARD_SWISH_OPSET:
        failure = _raise_opset(model)
        if failure is not None:
            return PassResult(
                warnings=(f"{len(fusions)} written-out hard-swish(es) kept: HardSwish needs opset 14 and {failure}",)
            )
        details.append(f"opset {current} -> {HARD_SWISH_OPSET} for HardSwish")
        fusions = _hard_swish_fusions(model)  # the converted model holds new node objects
    _replace(model, fusions)
    details.append(f"fused {len(fusions)} written-out hard-swish(es) into HardSwish")
    return PassResult(len(fusions), tuple(details))
