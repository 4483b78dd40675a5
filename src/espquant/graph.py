"""A small read view over an ONNX graph: producers, consumers, initializers as numpy, topological order.

Passes ask the same questions again and again ("who produces this tensor?", "is this input a constant?",
"how many nodes read this output?"). :class:`GraphView` answers them from indexes built once. It is a
snapshot: a pass that edits the graph builds a new view afterwards.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = [
    "GraphView",
    "opset_version",
    "tensor_shape",
    "node_attributes",
    "set_initializer",
    "WeightFactor",
    "scale_initializers",
    "BiasShift",
    "shift_biases",
    "layer_output_channels",
    "subtract_from_bias",
    "remove_nodes",
    "replace_nodes",
    "unique_name",
]


class GraphView:
    """Indexes over ``graph`` for quick producer / consumer / constant look-ups."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.graph_outputs: set[str] = {o.name for o in graph.output}
        self._declared_inputs: set[str] = {i.name for i in graph.input}
        self.graph_inputs: set[str] = self._declared_inputs - set(self.initializers)
        self.value_info: dict[str, onnx.ValueInfoProto] = {
            v.name: v for v in [*graph.input, *graph.value_info, *graph.output]
        }

    def is_constant(self, name: str) -> bool:
        """True for an initializer that is not also a graph input (graph inputs can be overridden)."""
        return name in self.initializers and name not in self._declared_inputs

    def array(self, name: str) -> np.ndarray:
        """The initializer ``name`` as a numpy array."""
        return numpy_helper.to_array(self.initializers[name])

    def clamp_bounds(self, node: onnx.NodeProto) -> tuple[float, float] | None:
        """``(low, high)`` that a Relu, or a Clip with constant (or absent) bounds, clamps its input to; None
        for any other node or a Clip whose bounds are computed at run time."""
        if node.op_type == "Relu":
            return 0.0, math.inf
        if node.op_type != "Clip":
            return None
        low, high = [*node.input[1:3], "", ""][:2]  # absent or empty: unbounded on that side
        if any(name and not self.is_constant(name) for name in (low, high)):
            return None
        return (
            float(self.array(low).reshape(-1)[0]) if low else -math.inf,
            float(self.array(high).reshape(-1)[0]) if high else math.inf,
        )

    def single_consumer(self, name: str) -> onnx.NodeProto | None:
        """The only node reading ``name``, or None when zero or several nodes read it or it is a graph output."""
        readers = self.consumers.get(name, [])
        if len(readers) != 1 or name in self.graph_outputs:
            return None
        return readers[0]

    def shape(self, name: str) -> list[int | str | None] | None:
        """The inferred shape of ``name`` (ints for static dims, names for symbolic, None when unknown)."""
        if name in self.initializers:
            return list(self.initializers[name].dims)
        info = self.value_info.get(name)
        return tensor_shape(info) if info is not None else None


def tensor_shape(info: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """The shape recorded in a ValueInfoProto, or None when it records no rank.

    A negative size is how paddle2onnx and other exporters write a dynamic dimension (``[-1, 3, ?, ?]``): it is
    read as unknown (None), like an unnamed dimension."""
    tensor_type = info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(dim.dim_value if dim.dim_value >= 0 else None)
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return dims


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    """The opset the model imports for ``domain`` ("" and "ai.onnx" are the same default domain)."""
    for entry in model.opset_import:
        if entry.domain in ({"", "ai.onnx"} if domain in ("", "ai.onnx") else {domain}):
            return entry.version
    return 0


def node_attributes(node: onnx.NodeProto, opset: int) -> dict[str, Any]:
    """The node's attributes with the ONNX schema's defaults filled in for the absent ones (strings decoded).

    The one place ONNX defaults are read: the checker's constraints, the calibration plan and the integer
    model all see the same values, so no kernel guesses a default of its own."""
    values: dict[str, Any] = {}
    if onnx.defs.has(node.op_type, node.domain):
        try:
            schema = onnx.defs.get_schema(node.op_type, max(opset, 1), node.domain)
        except onnx.defs.SchemaError:  # newer than the model's opset (the plan's Swish for x * Sigmoid(x))
            schema = onnx.defs.get_schema(node.op_type, node.domain)
        for name, attribute in schema.attributes.items():
            if attribute.default_value.type != onnx.AttributeProto.UNDEFINED:
                values[name] = helper.get_attribute_value(attribute.default_value)
    for attribute in node.attribute:
        values[attribute.name] = helper.get_attribute_value(attribute)
    for name, value in list(values.items()):
        if isinstance(value, bytes):
            values[name] = value.decode("utf-8", errors="replace")
    return values


def set_initializer(graph: onnx.GraphProto, name: str, value: np.ndarray) -> None:
    """Add the initializer ``name`` or replace its value in place (keeps the graph's order stable).

    A scalar stays a scalar: ``np.ascontiguousarray`` would make it shape (1,), and a scalar Gather index
    (PyTorch's ``x.size(0)``) would then give a 1-D result and break the shape chain after it."""
    array = np.asarray(value)
    tensor = numpy_helper.from_array(array if array.flags.c_contiguous else array.copy(order="C"), name)
    for index, existing in enumerate(graph.initializer):
        if existing.name == name:
            graph.initializer[index].CopyFrom(tensor)
            return
    graph.initializer.append(tensor)


@dataclass(frozen=True)
class WeightFactor:
    """Multiply the initializer ``tensor`` by ``values`` (positive, float64, broadcast to the tensor's shape).

    Cross-layer equalization is a set of these; a quantization table carries them (``QuantTable.model_for``),
    so every consumer of the table rebuilds the same float weights from the user's model."""

    tensor: str
    values: np.ndarray


def scale_initializers(model: onnx.ModelProto, factors: Sequence[WeightFactor]) -> onnx.ModelProto:
    """A copy of ``model`` with each initializer multiplied by the product of its factors, in float64, stored
    back in its own dtype once: the same factors always give the same weights, whoever applies them.

    Raises:
        ValueError: a factor names no float initializer or does not broadcast to its shape.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    initializers = {t.name: t for t in copy.graph.initializer}
    combined: dict[str, np.ndarray] = {}
    for factor in factors:
        tensor = initializers.get(factor.tensor)
        if tensor is None:
            raise ValueError(f"no initializer {factor.tensor!r}")
        shape = tuple(tensor.dims)
        values = np.asarray(factor.values, dtype=np.float64)
        if values.ndim > len(shape) or np.broadcast_shapes(values.shape, shape) != shape:
            raise ValueError(
                f"factors of shape {list(values.shape)} do not fit {factor.tensor!r} of shape {list(shape)}"
            )
        combined[factor.tensor] = combined.get(factor.tensor, np.float64(1.0)) * values
    for name, values in combined.items():
        original = numpy_helper.to_array(initializers[name])
        if original.dtype.kind != "f":
            raise ValueError(f"{name!r} is not a float tensor")
        scaled = (original.astype(np.float64) * values).astype(original.dtype)
        initializers[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(scaled), name))
    return copy


@dataclass(frozen=True)
class BiasShift:
    """Subtract ``values`` (float64, one per output channel) from the bias of the Conv / Gemm whose first output
    is ``layer``; a layer without a bias gets one (``-values``).

    Bias correction is a set of these; a quantization table carries them beside its weight factors
    (``QuantTable.model_for``), so the user's model stays the one to evaluate and export."""

    layer: str
    values: np.ndarray


def subtract_from_bias(
    model: onnx.ModelProto, node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], shift: np.ndarray, suffix: str
) -> None:
    """``bias -= shift`` for a Conv / Gemm of ``model`` (a new initializer ``<node>.<suffix>`` when it has none),
    in float64, stored as float32."""
    if len(node.input) > 2 and node.input[2]:
        bias = inits[node.input[2]]
        values = numpy_helper.to_array(bias).astype(np.float64) - shift
        bias.CopyFrom(numpy_helper.from_array(values.astype(np.float32), bias.name))
        return
    taken = {t.name for t in model.graph.initializer} | {n for x in model.graph.node for n in [*x.input, *x.output]}
    name = unique_name(f"{node.name or node.output[0]}.{suffix}", taken)
    tensor = numpy_helper.from_array((-np.asarray(shift, dtype=np.float64)).astype(np.float32), name)
    model.graph.initializer.append(tensor)
    inits[name] = model.graph.initializer[-1]
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = name


def layer_output_channels(view: GraphView, layer: onnx.NodeProto) -> tuple[int, int] | None:
    """``(rank, channels)`` of a Conv / ConvTranspose / Gemm output, from its constant weight's dims (shapes need
    not be inferred); None without a constant weight."""
    name = layer.input[1] if len(layer.input) > 1 else ""
    if not view.is_constant(name):
        return None
    dims = [int(d) for d in view.initializers[name].dims]
    attrs = {a.name: a.i for a in layer.attribute if a.type == onnx.AttributeProto.INT}
    if layer.op_type == "Conv":
        return len(dims), dims[0]
    if layer.op_type == "ConvTranspose":
        return len(dims), dims[1] * attrs.get("group", 1)
    if len(dims) != 2:
        return None
    return 2, dims[0] if attrs.get("transB", 0) else dims[1]


def shift_biases(model: onnx.ModelProto, shifts: Sequence[BiasShift]) -> onnx.ModelProto:
    """A copy of ``model`` with each shift subtracted from its layer's bias (``BiasShift``).

    Raises:
        ValueError: a shift names no Conv / Gemm with a constant weight, or its length is not that layer's
            output channels, or its bias is not a 1-D initializer of that length read by that layer only.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    view = GraphView(copy.graph)
    for shift in shifts:
        node = view.producer.get(shift.layer)
        found = layer_output_channels(view, node) if node is not None and node.op_type in ("Conv", "Gemm") else None
        values = np.asarray(shift.values, dtype=np.float64)
        if found is None:
            raise ValueError(f"no Conv / Gemm with a constant weight writes {shift.layer!r}")
        channels = found[1]
        named = node.input[2] if len(node.input) > 2 else ""
        bias = view.initializers.get(named) if named else None
        if values.shape != (channels,) or (bias is not None and list(bias.dims) != [channels]):
            raise ValueError(f"a shift of {values.size} values does not fit the {channels} channels of {shift.layer!r}")
        if named and (bias is None or len(view.consumers.get(named) or [node]) > 1):
            raise ValueError(f"the bias of {shift.layer!r} is not a constant of its own")
        subtract_from_bias(copy, node, view.initializers, values, "corrected_bias")
    return copy


def remove_nodes(graph: onnx.GraphProto, doomed: Iterable[onnx.NodeProto]) -> None:
    """Remove the given nodes (by identity) from ``graph``, keeping the order of the rest."""
    replace_nodes(graph, {id(node): [] for node in doomed})


def replace_nodes(graph: onnx.GraphProto, replacements: dict[int, list[onnx.NodeProto]]) -> None:
    """Replace each node whose ``id`` is a key by the key's list of nodes (empty: removal), in place.

    Node identity is stable here because callers hold references to the nodes they found in the graph.
    """
    rebuilt: list[onnx.NodeProto] = []
    for node in graph.node:
        for kept in replacements.get(id(node), [node]):
            copy = onnx.NodeProto()
            copy.CopyFrom(kept)
            rebuilt.append(copy)
    del graph.node[:]
    graph.node.extend(rebuilt)


def unique_name(base: str, taken: set[str]) -> str:
    """``base`` itself if free, else ``base_1``, ``base_2``...; the name returned is added to ``taken``."""
    name, counter = base, 0
    while name in taken:
        counter += 1
        name = f"{base}_{counter}"
    taken.add(name)
    return name
