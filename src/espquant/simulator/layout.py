"""Keep onnxruntime's blocked layout across the elementwise steps between compiled convolutions.

onnxruntime runs a float Conv fastest in its blocked layout (NCHWc: channels in blocks of 8 or 16 values, made
by the NchwcTransformer of its full optimization level), and a chain of Convs stays blocked. But every op that
onnxruntime does not run blocked, Floor and Round among them, gets a ReorderOutput before it and a
ReorderInput after it: two copies of the tensor per layer. Rounding after every integer layer is exactly what
the compiled simulator needs, so those copies cost a quarter to a third of an int8 model's time.

An elementwise op computes each value from the values at the same position, so on a blocked tensor it computes
the same numbers, only stored in another order, as long as it does not broadcast one tensor against another of
another shape (``SAME_SHAPE``). :func:`keep_blocked` edits the graph onnxruntime optimized
(saved by the first session) accordingly: each elementwise op whose tensor inputs are all blocked copies
(same channel count; constants only as scalars) runs on them; a ReorderInput of its result becomes the
blocked result itself; a consumer that needs the plain layout gets one ReorderOutput after the op instead of
before it. The padding lanes of a block (channels beyond a multiple of the block size) hold zeros after a
Conv; only ops that keep finite values finite are moved (no Div, Sqrt, Log: a NaN in a padding lane would
reach the next Conv's sums through its zero weights), so those lanes stay harmless.

The edited graph is loaded without further optimization; it holds nothing but onnxruntime's own ops. When
onnxruntime blocked nothing, or anything on the way fails, the session that already runs the graph is kept.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from espquant.errors import ModelError
from espquant.runtime import create_session

__all__ = ["keep_blocked", "blocked_session"]

logger = logging.getLogger(__name__)

NCHWC = "com.microsoft.nchwc"
# Tests set this: an edited graph that onnxruntime refuses is then an error, not a quiet fall back to the
# optimized one (which gives the same integers, more slowly, and would hide the edit's mistake).
STRICT = False
# Elementwise ops that compute each value from the same position of their inputs and keep finite values finite.
ELEMENTWISE = frozenset({"Floor", "Round", "Clip", "Relu", "Abs", "Neg", "Add", "Sub", "Mul", "Max", "Min"})
# The name prefix of an op whose tensor inputs have one shape (compiled.py marks those it knows from the float
# model). onnxruntime presents a blocked tensor with its plain shape, channels rounded up to whole blocks, while
# its values lie block by block; an op that broadcasts one blocked tensor against another (a squeeze-excite gate
# [N, C, 1, 1] times its [N, C, H, W] map) would pair values of different channels. So an op with two or more
# tensor inputs moves only when marked so; one tensor and scalars always may.
SAME_SHAPE = "espquant_same_shape:"


def _attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _is_reorder(node: onnx.NodeProto, op_type: str) -> bool:
    return node.domain == NCHWC and node.op_type == op_type and not _attribute(node, "channels_last", 0)


@dataclass
class _Blocked:
    """A tensor's blocked twin: its name, the ReorderOutput whose attributes (channel count) restore the plain
    layout, and whether it holds floats (onnxruntime reorders float32 only)."""

    name: str
    reorder: onnx.NodeProto
    floats: bool = True


def keep_blocked(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """``model`` (a graph onnxruntime optimized) with its elementwise ops moved onto the blocked tensors and the
    reorders that made unnecessary dropped; None when there is nothing to move.

    Besides the elementwise ops, an int8 activation table moves: ``Cast`` to integer indices, ``Reshape`` to one
    axis, ``GatherElements`` from the constant table, ``Reshape`` back to the ``Shape`` of the table's input
    (compiled.py's ``_gather``) looks up each value on its own, so on the blocked tensor it only needs the
    blocked shape to reshape back to."""
    source = onnx.ModelProto()  # the edit renames inputs of the nodes it keeps: ``model`` stays as it is
    source.CopyFrom(model)
    graph = source.graph
    constants = {init.name: init for init in graph.initializer}
    blocked: dict[str, _Blocked] = {}  # plain tensor -> its blocked twin
    flat: dict[str, tuple[str, str]] = {}  # flattened plain tensor -> (flattened twin, the plain tensor it came from)
    shapes: dict[str, str] = {}  # Shape output -> the tensor it measures
    casts: dict[str, str] = {}  # Cast output -> the tensor it read
    nodes: list[onnx.NodeProto] = []

    def twin(node: onnx.NodeProto, inputs: dict[int, str]) -> onnx.NodeProto:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = ""
        for index, name in inputs.items():
            copy.input[index] = name
        copy.output[0] = node.output[0] + "::blocked"
        nodes.append(copy)
        return copy

    for node in graph.node:
        nodes.append(node)  # kept until nothing reads it any more (_live)
        if _is_reorder(node, "ReorderOutput"):
            blocked[node.output[0]] = _Blocked(node.input[0], node)
        elif node.domain != "" or len(node.output) != 1:
            continue
        elif node.op_type in ELEMENTWISE:
            scalar = {name for name in node.input if name in constants and math.prod(constants[name].dims) == 1}
            tensors = {i: name for i, name in enumerate(node.input) if name and name not in scalar}
            if not tensors or not all(name in blocked and blocked[name].floats for name in tensors.values()):
                continue  # a constant that is not a scalar is never blocked
            if len(set(tensors.values())) > 1 and not node.name.startswith(SAME_SHAPE):
                continue  # it may broadcast (SAME_SHAPE)
            sources = [blocked[name] for name in tensors.values()]
            if len({_attribute(source.reorder, "channels") for source in sources}) != 1:
                continue
            moved = twin(node, {i: blocked[name].name for i, name in tensors.items()})
            # The plain result, for consumers that need it: one reorder after the op instead of one before it.
            nodes.remove(node)
            plain = helper.make_node("ReorderOutput", [moved.output[0]], [node.output[0]], domain=NCHWC)
            plain.attribute.extend(sources[0].reorder.attribute)
            nodes.append(plain)
            blocked[node.output[0]] = _Blocked(moved.output[0], plain)
        elif node.op_type == "Cast" and node.input[0] in blocked:
            source = blocked[node.input[0]]
            moved = twin(node, {0: source.name})
            floats = _attribute(node, "to") == onnx.TensorProto.FLOAT
            blocked[node.output[0]] = _Blocked(moved.output[0], source.reorder, floats)
            casts[node.output[0]] = node.input[0]
        elif node.op_type == "Reshape" and node.input[0] in blocked and _is_flattening(constants.get(node.input[1])):
            moved = twin(node, {0: blocked[node.input[0]].name})
            # The plain float tensor an integer-index Cast read: what the lookup reshapes back to.
            flat[node.output[0]] = (moved.output[0], casts.get(node.input[0], node.input[0]))
        elif node.op_type == "GatherElements" and node.input[1] in flat and node.input[0] in constants:
            moved = twin(node, {1: flat[node.input[1]][0]})
            flat[node.output[0]] = (moved.output[0], flat[node.input[1]][1])
        elif node.op_type == "Shape" and len(node.input) == 1 and len(node.attribute) == 0:
            shapes[node.output[0]] = node.input[0]
        elif node.op_type == "Reshape" and node.input[0] in flat:
            # Back to the shape of the tensor the indices came from, and only so (a Reshape onnxruntime merged
            # with a later one could reshape the plane otherwise).
            source = flat[node.input[0]][1]
            origin = blocked.get(source)
            if origin is None or shapes.get(node.input[1]) != source:
                continue
            shape = helper.make_node("Shape", [origin.name], [node.output[0] + "::blocked_shape"])
            nodes.append(shape)
            moved = twin(node, {0: flat[node.input[0]][0], 1: shape.output[0]})
            blocked[node.output[0]] = _Blocked(moved.output[0], origin.reorder)
    rename = {}
    kept = []
    captured = set().union(*(_captured(node) for node in nodes))  # what If branches read from this graph
    for node in nodes:
        source = blocked.get(node.input[0]) if node.input else None
        if (
            _is_reorder(node, "ReorderInput")
            and source is not None
            and source.floats
            and node.output[0] not in captured
        ):
            rename[node.output[0]] = source.name
            continue
        kept.append(node)
    outputs = {o.name for o in graph.output}
    if not rename or outputs & set(rename):
        return None
    for node in kept:
        for index, name in enumerate(node.input):
            if name in rename:
                node.input[index] = rename[name]
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    del edited.graph.node[:], edited.graph.value_info[:]
    edited.graph.node.extend(_live(kept, outputs))
    return edited


def _is_flattening(shape: onnx.TensorProto | None) -> bool:
    """Whether a Reshape's shape is the constant ``[-1]`` (a Reshape to one axis)."""
    return shape is not None and numpy_helper.to_array(shape).reshape(-1).tolist() == [-1]


def _captured(node: onnx.NodeProto) -> set[str]:
    """The tensors of the enclosing graph that ``node``'s subgraphs (an If's branches) read."""
    names: set[str] = set()
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        for graph in graphs:
            produced = {init.name for init in graph.initializer} | {o for n in graph.node for o in n.output}
            for inner in graph.node:
                names.update(name for name in inner.input if name and name not in produced)
                names.update(_captured(inner) - produced)
    return names


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """The nodes some graph output depends on (directly, or through what a subgraph reads), in their order."""
    needed = set(outputs)
    live = []
    for node in reversed(nodes):
        if any(name in needed for name in node.output):
            live.append(node)
            needed.update(name for name in node.input if name)
            needed.update(_captured(node))
    return live[::-1]


def blocked_session(
    proto: onnx.ModelProto,
    threads: int | None,
    what: str,
    current: ort.InferenceSession | None = None,
    spinning: bool = True,
) -> ort.InferenceSession:
    """A session for ``proto`` whose elementwise ops run on onnxruntime's blocked tensors (module docstring).

    ``current`` (a working session of the same graph, else a new one) is what runs when onnxruntime blocked
    nothing or anything on the way fails: a graph larger than protobuf can save, a temporary folder that cannot
    be written, an edited graph onnxruntime refuses (an error under ``STRICT``). ``spinning``: as
    ``runtime.create_session``."""
    try:
        with tempfile.TemporaryDirectory(prefix="espquant-") as folder:
            path = os.path.join(folder, "optimized.onnx")
            # Made only to write the optimized graph: sleeping workers close at once (runtime.create_session).
            create_session(proto, threads=threads, what=what, optimized_path=path, spinning=False)
            optimized = onnx.load(path)
        edited = keep_blocked(optimized)
        if edited is not None:
            return create_session(edited, threads=threads, what=what, optimize=False, spinning=spinning)
    except (ModelError, OSError, DecodeError) as error:
        if STRICT:
            raise
        logger.debug("%s: onnxruntime's own layout kept (%s)", what, error)
    return current if current is not None else create_session(proto, threads=threads, what=what, spinning=spinning)
