"""Passes that turn computable values into initializers.

ESP-DL needs weights and shape parameters as constants in the file; exporters often leave them as
``Constant`` nodes, as shape chains computed at run time (``Shape -> Gather -> Concat -> Reshape``), or as
``ConstantOfShape`` generators. These passes evaluate all of that once, on the host, with ONNX's reference
evaluator, so what remains is the network itself.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from espquant.graph import GraphView, remove_nodes, set_initializer
from espquant.optimizer.pipeline import PassResult

__all__ = ["constants_to_initializers", "remove_initializer_inputs", "fold_constants"]

logger = logging.getLogger(__name__)

# Operators whose output must not be computed once and frozen.
_NONDETERMINISTIC = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)
_SUBGRAPH_ATTRS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value a ``Constant`` node produces, from whichever of its attribute forms is set."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None  # sparse_value / value_string(s): left as nodes


def constants_to_initializers(model: onnx.ModelProto) -> PassResult:
    """Replace every ``Constant`` node of the main graph by an initializer of the same name."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    doomed = []
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or node.output[0] in outputs:
            continue
        value = _constant_value(node)
        if value is None:
            continue
        set_initializer(graph, node.output[0], value)
        doomed.append(node)
    if doomed:
        remove_nodes(graph, doomed)
    return PassResult(len(doomed), (f"{len(doomed)} Constant -> initializer",) if doomed else ())


def remove_initializer_inputs(model: onnx.ModelProto) -> PassResult:
    """Drop initializers from the graph inputs (old exporters list weights as inputs; IR >= 4 needs not)."""
    graph = model.graph
    names = {t.name for t in graph.initializer}
    kept = [i for i in graph.input if i.name not in names]
    removed = len(graph.input) - len(kept)
    if removed == 0:
        return PassResult()
    copies = [onnx.ValueInfoProto() for _ in kept]
    for copy, info in zip(copies, kept):
        copy.CopyFrom(info)
    del graph.input[:]
    graph.input.extend(copies)
    model.ir_version = max(model.ir_version, 4)
    return PassResult(removed, (f"{removed} initializer(s) removed from graph inputs",))


def _static_shape(view: GraphView, name: str) -> list[int] | None:
    shape = view.shape(name)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return shape  # type: ignore[return-value]


def _shape_value(node: onnx.NodeProto, view: GraphView) -> np.ndarray | None:
    """The value of a ``Shape`` or ``Size`` node when its input's shape is fully known."""
    shape = _static_shape(view, node.input[0])
    if shape is None:
        return None
    if node.op_type == "Size":
        return np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
    attrs = {a.name: a.i for a in node.attribute}
    rank = len(shape)
    start, end = attrs.get("start", 0), attrs.get("end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return np.array(shape[start:end], dtype=np.int64)


def _evaluate(node: onnx.NodeProto, inputs: list[np.ndarray | None], model: onnx.ModelProto) -> list[np.ndarray]:
    """Run one node with ONNX's reference evaluator at the model's opset."""
    names = [name if name else "" for name in node.input]
    graph_inputs = [
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
        for name, value in zip(names, inputs)
        if name and value is not None
    ]
    graph_outputs = [helper.make_empty_tensor_value_info(name) for name in node.output if name]
    graph = helper.make_graph([node], "fold", graph_inputs, graph_outputs)
    tiny = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    feeds = {name: value for name, value in zip(names, inputs) if name and value is not None}
    results = ReferenceEvaluator(tiny).run(None, feeds)
    return [np.asarray(r) for r in results]


def fold_constants(model: onnx.ModelProto) -> PassResult:
    """Evaluate every node whose inputs are all constants (and ``Shape`` of static shapes) into initializers.

    Graph outputs are never folded away, nor random generators or nodes with subgraphs. A node the
    reference evaluator cannot run stays as it is.
    """
    graph = model.graph
    view = GraphView(graph)
    graph_input_names = {i.name for i in graph.input}
    known: dict[str, np.ndarray] = {}

    def constant(name: str) -> np.ndarray | None:
        if name in known:
            return known[name]
        if name in view.initializers and name not in graph_input_names:
            known[name] = view.array(name)
            return known[name]
        return None

    doomed: list[onnx.NodeProto] = []
    folded_types: dict[str, int] = {}
    for node in graph.node:
        if (
            node.domain not in ("", "ai.onnx")
            or node.op_type in _NONDETERMINISTIC
            or any(attr.type in _SUBGRAPH_ATTRS for attr in node.attribute)
            or any(name in view.graph_outputs for name in node.output)
            or not any(node.output)
        ):
            continue
        values: list[np.ndarray] | None
        if node.op_type in ("Shape", "Size"):
            value = _shape_value(node, view)
            values = None if value is None else [value]
        else:
            inputs = [constant(name) if name else None for name in node.input]
            if any(name and value is None for name, value in zip(node.input, inputs)):
                continue
            try:
                values = _evaluate(node, inputs, model)
            except Exception as exc:  # the reference evaluator raises many kinds; folding is best-effort
                logger.debug("cannot fold %s (%s): %s", node.name, node.op_type, exc)
                continue
        if values is None or len(values) != len([o for o in node.output if o]):
            continue
        for name, value in zip([o for o in node.output if o], values):
            known[name] = value
            set_initializer(graph, name, value)
        doomed.append(node)
        folded_types[node.op_type] = folded_types.get(node.op_type, 0) + 1
    if not doomed:
        return PassResult()
    remove_nodes(graph, doomed)
    # Folded outputs may have had value_info entries; initializers now describe them.
    folded = {name for node in doomed for name in node.output}
    kept_info = [v for v in graph.value_info if v.name not in folded]
    if len(kept_info) != len(graph.value_info):
        copies = [onnx.ValueInfoProto() for _ in kept_info]
        for copy, info in zip(copies, kept_info):
            copy.CopyFrom(info)
        del graph.value_info[:]
        graph.value_info.extend(copies)
    details = tuple(f"folded {count} {op}" for op, count in sorted(folded_types.items()))
    return PassResult(len(doomed), details)
