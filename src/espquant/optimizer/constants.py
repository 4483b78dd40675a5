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

from espquant.graph import GraphView, remove_nodes, set_initializer, unique_name
from espquant.optimizer.pipeline import PassResult

__all__ = ["constants_to_initializers", "remove_initializer_inputs", "fold_constants", "reshape_copy_dims"]

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


# Folding may materialise at most this many values per node: a 194-byte ConstantOfShape([30000, 30000]) must not
# take gigabytes (the node stays, and the checker says what to do about it).
MAX_FOLDED_ELEMENTS = 1 << 24


def _folded_size(node: onnx.NodeProto, inputs: list[np.ndarray | None], model: onnx.ModelProto) -> int | None:
    """How many values folding ``node`` would make, from ONNX shape inference (None when it cannot tell).

    Small integer inputs (shapes, repeats, ranges) are given as values; the others only as declared shapes, so
    a large weight is not copied for this."""
    names = [name if name else "" for name in node.input]
    declared, constants = [], []
    for name, value in zip(names, inputs):
        if not name or value is None:
            continue
        if value.size <= 64 and value.dtype.kind in "iuf":
            constants.append(numpy_helper.from_array(np.asarray(value), name))
        else:
            declared.append(
                helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
            )
    outputs = [helper.make_empty_tensor_value_info(name) for name in node.output if name]
    graph = helper.make_graph([node], "size", declared, outputs, constants)
    tiny = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(tiny, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is advisory here
        return None
    total = 0
    for info in inferred.graph.output:
        dims = info.type.tensor_type.shape.dim
        if not info.type.tensor_type.HasField("shape") or any(not d.HasField("dim_value") for d in dims):
            return None
        count = 1
        for dim in dims:
            count *= max(int(dim.dim_value), 0)
        total += count
    return total


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
    warnings: list[str] = []
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
            size = _folded_size(node, inputs, model)
            if size is not None and size > MAX_FOLDED_ELEMENTS:
                warnings.append(
                    f"not folding {node.op_type} {node.name!r}: it would make {size} values (more than "
                    f"{MAX_FOLDED_ELEMENTS}); the node stays in the graph"
                )
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
        return PassResult(warnings=tuple(warnings))
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
    return PassResult(len(doomed), details, tuple(warnings))


def _scalar_index(view: GraphView, name: str) -> int | None:
    """The single integer held by constant ``name`` (scalar or one-element 1-D), else None."""
    if not view.is_constant(name):
        return None
    value = view.array(name)
    return int(value.reshape(-1)[0]) if value.size == 1 and value.dtype.kind in "iu" else None


def _input_dim_reference(view: GraphView, name: str, data: str) -> int | None:
    """Which axis of ``data`` the 1-element tensor ``name`` holds, when it is ``Shape(data)[i]``.

    Recognises ``Gather(Shape(data), [i])`` and ``Unsqueeze(Gather(Shape(data), i), [0])``, the forms
    PyTorch writes for ``x.size(i)`` inside ``x.view(...)``.
    """
    node = view.producer.get(name)
    if node is not None and node.op_type == "Unsqueeze":
        axes = node.input[1] if len(node.input) > 1 else ""
        attr_axes = [list(a.ints) for a in node.attribute if a.name == "axes"]
        if (axes and _scalar_index(view, axes) != 0) or (attr_axes and attr_axes[0] != [0]):
            return None
        node = view.producer.get(node.input[0])
    if node is None or node.op_type != "Gather" or any(a.name == "axis" and a.i != 0 for a in node.attribute):
        return None
    shape = view.producer.get(node.input[0])
    if shape is None or shape.op_type != "Shape" or shape.input[0] != data or shape.attribute:
        return None
    index = _scalar_index(view, node.input[1])
    rank = view.shape(data)
    if index is not None and index < 0 and rank is not None:
        index += len(rank)
    return index


def reshape_copy_dims(model: onnx.ModelProto) -> PassResult:
    """Turn ``Reshape(x, Concat(x.shape[i] at position i, constants...))`` into a constant target with 0 there.

    With ``allowzero`` unset, a 0 in a Reshape target copies that axis from the input, so a target built at
    run time from the input's own (dynamic) batch dimension becomes a constant and the shape chain dies.
    This is how ``x.view(x.size(0), -1)`` from PyTorch folds while the batch stays dynamic.
    """
    graph = model.graph
    view = GraphView(graph)
    taken = set(view.initializers) | set(view.producer)
    changed = 0
    for node in graph.node:
        if node.op_type != "Reshape" or any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        concat = view.producer.get(node.input[1])
        if concat is None or concat.op_type != "Concat" or view.is_constant(node.input[1]):
            continue
        target: list[int] = []
        for part in concat.input:
            if view.is_constant(part):
                target.extend(int(v) for v in view.array(part).reshape(-1))
                continue
            if _input_dim_reference(view, part, node.input[0]) != len(target):
                break
            target.append(0)
        else:
            name = unique_name(f"{node.name or 'Reshape'}_shape", taken)
            set_initializer(graph, name, np.array(target, dtype=np.int64))
            node.input[1] = name
            changed += 1
    return PassResult(
        changed, (f"{changed} Reshape target(s) from the input's own shape -> constant",) if changed else ()
    )
