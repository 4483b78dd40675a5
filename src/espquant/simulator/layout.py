"""Keep onnxruntime's blocked layout across the elementwise steps between compiled convolutions.

onnxruntime runs a float Conv fastest in its blocked layout (NCHWc: channels in blocks of 8 or 16 values, made
by the NchwcTransformer of its full optimization level), and a chain of Convs stays blocked. But every op that
onnxruntime does not run blocked, Floor and Round among them, gets a ReorderOutput before it and a
ReorderInput after it: two copies of the tensor per layer. Rounding after every integer layer is exactly what
the compiled simulator needs, so those copies cost a quarter to a third of an int8 model's time.

An elementwise op computes each value from the values at the same position, so on a blocked tensor it computes
the same numbers, only stored in another order. :func:`keep_blocked` edits the graph onnxruntime optimized
(saved by the first session) accordingly: each elementwise op whose tensor inputs are all blocked copies
(same channel count; constants only as scalars) runs on them; a ReorderInput of its result becomes the
blocked result itself; a consumer that needs the plain layout gets one ReorderOutput after the op instead of
before it. The padding lanes of a block (channels beyond a multiple of the block size) hold zeros after a
Conv; only ops that keep finite values finite are moved (no Div, Sqrt, Log: a NaN in a padding lane would
reach the next Conv's sums through its zero weights), so those lanes stay harmless.

The edited graph is loaded without further optimization; it holds nothing but onnxruntime's own ops. When
onnxruntime blocked nothing, or its saved graph cannot be read back, the first session is kept as it is.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import helper

from espquant.errors import ModelError

__all__ = ["keep_blocked", "blocked_session"]

logger = logging.getLogger(__name__)

NCHWC = "com.microsoft.nchwc"
# Elementwise ops that compute each value from the same position of their inputs and keep finite values finite.
ELEMENTWISE = frozenset({"Floor", "Round", "Clip", "Relu", "Abs", "Neg", "Add", "Sub", "Mul", "Max", "Min"})


def _attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _is_reorder(node: onnx.NodeProto, op_type: str) -> bool:
    return node.domain == NCHWC and node.op_type == op_type and not _attribute(node, "channels_last", 0)


def keep_blocked(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """``model`` (a graph onnxruntime optimized) with its elementwise ops moved onto the blocked tensors and the
    reorders that made unnecessary dropped; None when there is nothing to move."""
    graph = model.graph
    scalars = {init.name for init in graph.initializer if _size(init) == 1}
    blocked: dict[str, tuple[str, onnx.NodeProto]] = {}  # plain tensor -> (blocked tensor, its ReorderOutput)
    nodes: list[onnx.NodeProto] = []
    moved = 0
    for node in graph.node:
        if _is_reorder(node, "ReorderOutput"):
            blocked[node.output[0]] = (node.input[0], node)
        elif node.domain == "" and node.op_type in ELEMENTWISE and len(node.output) == 1:
            tensors = [name for name in node.input if name and name not in scalars]
            sources = [blocked.get(name) for name in tensors]
            if tensors and all(sources) and len({_attribute(s[1], "channels") for s in sources if s}) == 1:
                reorder = sources[0][1] if sources[0] else None
                twin = onnx.NodeProto()
                twin.CopyFrom(node)
                twin.name = ""
                for index, name in enumerate(node.input):
                    if name in blocked:
                        twin.input[index] = blocked[name][0]
                twin.output[0] = node.output[0] + "::blocked"
                nodes.append(twin)
                # The plain result, for consumers that need it: one reorder after the op, not one before it.
                plain = helper.make_node("ReorderOutput", [twin.output[0]], [node.output[0]], domain=NCHWC)
                plain.attribute.extend(reorder.attribute if reorder is not None else [])
                nodes.append(plain)
                blocked[node.output[0]] = (twin.output[0], plain)
                moved += 1
                continue
        nodes.append(node)
    if not moved:
        return None
    rename = {}
    kept = []
    for node in nodes:
        if _is_reorder(node, "ReorderInput") and node.input[0] in blocked:
            rename[node.output[0]] = blocked[node.input[0]][0]
            continue
        kept.append(node)
    outputs = {o.name for o in graph.output}
    if outputs & set(rename):
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


def _size(init: onnx.TensorProto) -> int:
    size = 1
    for dim in init.dims:
        size *= dim
    return size


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """The nodes some graph output depends on, in their order."""
    needed = set(outputs)
    live = []
    for node in reversed(nodes):
        if any(name in needed for name in node.output):
            live.append(node)
            needed.update(name for name in node.input if name)
    return live[::-1]


def blocked_session(proto: onnx.ModelProto, threads: int | None, what: str) -> ort.InferenceSession:
    """A session for ``proto`` whose elementwise ops run on onnxruntime's blocked tensors (module docstring)."""
    from espquant.runtime import create_session

    with tempfile.TemporaryDirectory(prefix="espquant-") as folder:
        path = os.path.join(folder, "optimized.onnx")
        session = create_session(proto, threads=threads, what=what, optimized_path=path)
        try:
            optimized = onnx.load(path)
        except (OSError, DecodeError) as error:
            logger.debug("%s: onnxruntime's optimized graph not read back (%s)", what, error)
            return session
    edited = keep_blocked(optimized)
    if edited is None:
        return session
    try:
        return create_session(edited, threads=threads, what=what, optimize=False)
    except ModelError as error:
        logger.debug("%s: the blocked graph did not load (%s); the optimized one runs", what, error)
        return session
