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


# Folding may materialise at most this many values per node (256 MiB of float32, twice what any ESP32 holds):
# a 194-byte ConstantOfShape([30000, 30000]) must not
# take gigabytes (the node stays, and the checker says what to do about it).
MAX_FOLDED_ELEMENTS = 1 << 26


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


# Ops that only move the entries of a shape tensor, with the inputs whose entries they move (None: all); their
# other inputs (starts, indices, axes ...) must be constants.
_ENTRY_MOVERS: dict[str, tuple[int, ...] | None] = {
    "Identity": (0,),
    "Cast": (0,),
    "Slice": (0,),
    "Gather": (0,),
    "Squeeze": (0,),
    "Unsqueeze": (0,),
    "Reshape": (0,),
    "Flatten": (0,),
    "Concat": None,
}
_INTEGER_TENSOR_TYPES = frozenset(
    {
        onnx.TensorProto.INT8,
        onnx.TensorProto.INT16,
        onnx.TensorProto.INT32,
        onnx.TensorProto.INT64,
        onnx.TensorProto.UINT8,
        onnx.TensorProto.UINT16,
        onnx.TensorProto.UINT32,
        onnx.TensorProto.UINT64,
    }
)
_MAX_SHAPE_ENTRIES = 64
_MAX_CHAIN_DEPTH = 64


def _unknown_dim(tensor: str, axis: int) -> str:
    """The stand-in for an unnamed dynamic dimension: the same (tensor, axis) is the same value."""
    return f"?{tensor}#{axis}"


def _shape_entries(node: onnx.NodeProto, view: GraphView) -> np.ndarray | None:
    """``Shape(x)`` as entries: ints for static dims, the dim's symbol (or an unknown-dim stand-in) otherwise."""
    shape = view.shape(node.input[0])
    if shape is None:
        return None
    entries = [_unknown_dim(node.input[0], axis) if dim is None else dim for axis, dim in enumerate(shape)]
    attrs = {a.name: a.i for a in node.attribute}
    rank = len(entries)
    start, end = attrs.get("start", 0), attrs.get("end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return np.array(entries[start:end] or [], dtype=object)


def _moved_entries(node: onnx.NodeProto, values: list[np.ndarray | None], model: onnx.ModelProto) -> np.ndarray | None:
    """Run an entry-moving node on index stand-ins and map its output back to the entries.

    Every moved input is replaced by the positions of its entries in one table, so ONNX's own reference
    evaluator decides which entry lands where (Slice's clamping, negative indices, Concat's order) and no
    symbolic rule is written twice."""
    moved = _ENTRY_MOVERS[node.op_type]
    table: list[int | str] = []
    inputs: list[np.ndarray | None] = []
    for position, value in enumerate(values):
        if value is None or (moved is not None and position not in moved):
            if value is not None and any(isinstance(e, str) for e in value.reshape(-1).tolist()):
                return None  # a symbolic index, start or axis: where entries land is not known
            inputs.append(None if value is None else np.array(value.tolist(), dtype=np.int64))
            continue
        positions = np.arange(len(table), len(table) + value.size, dtype=np.int64).reshape(value.shape)
        table.extend(value.reshape(-1).tolist())
        inputs.append(positions)
    try:
        result = _evaluate(node, inputs, model)[0]
    except Exception as exc:  # noqa: BLE001 - the reference evaluator raises many kinds; folding is best-effort
        logger.debug("cannot follow %s (%s) symbolically: %s", node.name, node.op_type, exc)
        return None
    if result.dtype.kind not in "iu":
        return None
    return np.array([table[int(i)] for i in result.reshape(-1)], dtype=object).reshape(result.shape)


def _symbolic_value(
    view: GraphView, name: str, model: onnx.ModelProto, memo: dict[str, np.ndarray | None], depth: int = 0
) -> np.ndarray | None:
    """The value of a small integer tensor as entries that are ints or dimension symbols, or None.

    Follows what exporters build shape parameters from: ``Shape`` of tensors with a symbolic batch, then Cast,
    Slice, Gather, (Un)Squeeze, Concat; nodes whose inputs all turn out to be ints are evaluated. A symbol
    stands for one dimension's run-time value, so equal symbols are equal values."""
    if name in memo:
        return memo[name]
    memo[name] = None  # a cycle (which the checker refuses anyway) ends here
    result: np.ndarray | None = None
    if view.is_constant(name):
        value = view.array(name)
        if value.dtype.kind in "iu" and value.size <= _MAX_SHAPE_ENTRIES:
            result = np.array(value.tolist(), dtype=object).reshape(value.shape)
    elif depth < _MAX_CHAIN_DEPTH and (node := view.producer.get(name)) is not None and node.domain in ("", "ai.onnx"):
        if node.op_type == "Shape":
            result = _shape_entries(node, view)
        elif node.op_type == "Cast" and next((a.i for a in node.attribute if a.name == "to"), 0) not in (
            _INTEGER_TENSOR_TYPES
        ):
            result = None
        elif len([o for o in node.output if o]) == 1:
            values = [_symbolic_value(view, i, model, memo, depth + 1) if i else None for i in node.input]
            if not any(i and v is None for i, v in zip(node.input, values)):
                symbolic = any(isinstance(e, str) for v in values if v is not None for e in v.reshape(-1).tolist())
                if not symbolic:
                    concrete = [None if v is None else np.array(v.tolist(), dtype=np.int64) for v in values]
                    result = _concrete_entries(node, concrete, model)
                elif node.op_type in _ENTRY_MOVERS:
                    result = _moved_entries(node, values, model)
    if result is not None and result.size > _MAX_SHAPE_ENTRIES:
        result = None
    memo[name] = result
    return result


def _concrete_entries(
    node: onnx.NodeProto, values: list[np.ndarray | None], model: onnx.ModelProto
) -> np.ndarray | None:
    """A node of a shape chain whose inputs are all known integers, evaluated (arithmetic on shapes included)."""
    try:
        result = _evaluate(node, values, model)[0]
    except Exception as exc:  # noqa: BLE001 - best-effort, as in fold_constants
        logger.debug("cannot evaluate %s (%s): %s", node.name, node.op_type, exc)
        return None
    if result.dtype.kind not in "iu" or result.size > _MAX_SHAPE_ENTRIES:
        return None
    return np.array(result.tolist(), dtype=object).reshape(result.shape)


def _constant_target(target: np.ndarray, data_shape: list[int | str | None] | None, data: str) -> list[int] | None:
    """A constant Reshape target equal to ``target`` (ints and symbols) for this data, or None.

    A symbol at position i that is the data's own dimension i becomes 0 (with ``allowzero`` unset, 0 copies
    that dimension). One remaining symbol becomes -1, provided the target has no -1 yet: the element count
    then fixes it to the value it had."""
    shape = data_shape or []
    resolved: list[int | None] = []
    for axis, entry in enumerate(target.reshape(-1).tolist()):
        if isinstance(entry, int):
            resolved.append(entry)
        elif axis < len(shape) and (entry == shape[axis] or entry == _unknown_dim(data, axis)):
            resolved.append(0)
        else:
            resolved.append(None)
    unknown = [axis for axis, entry in enumerate(resolved) if entry is None]
    if len(unknown) > 1 or (unknown and -1 in resolved):
        return None
    return [-1 if entry is None else entry for entry in resolved]


def reshape_copy_dims(model: onnx.ModelProto) -> PassResult:
    """Give every Reshape whose target is computed at run time a constant target that equals it.

    Exporters build targets from the input's shape: PyTorch's ``x.view(x.size(0), -1)`` as
    ``Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])``, paddle2onnx as ``Concat(Cast(Slice(Cast(Shape(x)))), [-1])``
    or ``Reshape(softmax_2d, Shape(logits))``. With a dynamic batch these chains cannot be folded into numbers,
    but the target is still known up to the batch: the symbol sits where the data has it (a 0 copies it, with
    ``allowzero`` unset) or is the one unknown entry (-1 gives it back). The shape chain then dies and the
    following shapes become static, which ESP-DL needs.
    """
    graph = model.graph
    view = GraphView(graph)
    taken = set(view.initializers) | set(view.producer)
    memo: dict[str, np.ndarray | None] = {}
    changed = 0
    for node in graph.node:
        if (
            node.op_type != "Reshape"
            or node.domain not in ("", "ai.onnx")
            or len(node.input) < 2
            or view.is_constant(node.input[1])
            or any(a.name == "allowzero" and a.i for a in node.attribute)
        ):
            continue
        target = _symbolic_value(view, node.input[1], model, memo)
        if target is None or target.ndim != 1:
            continue
        constant = _constant_target(target, view.shape(node.input[0]), node.input[0])
        if constant is None:
            continue
        name = unique_name(f"{node.name or 'Reshape'}_shape", taken)
        set_initializer(graph, name, np.array(constant, dtype=np.int64))
        node.input[1] = name
        changed += 1
    return PassResult(
        changed, (f"{changed} Reshape target(s) computed from shapes at run time -> constant",) if changed else ()
    )
