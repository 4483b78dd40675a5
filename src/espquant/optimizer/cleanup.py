"""Small rewrites that bring exported graphs into the form ESP-DL and the later tools expect.

Opsets below 13 are converted up (one operator semantics to support), inference-mode Dropout and
two-input Sum become what they are (nothing, and Add), PRelu slopes get the per-channel ``(C, 1, 1)`` shape,
and every node gets a unique, stable name so tables and reports can refer to it.
"""

from __future__ import annotations

import logging

import onnx
from onnx import version_converter

from espquant.graph import GraphView, opset_version, remove_nodes, set_initializer, unique_name
from espquant.optimizer.pipeline import PassResult

__all__ = [
    "MIN_OPSET",
    "upgrade_opset",
    "eliminate_inference_dropout",
    "nop_cast_to_identity",
    "sum_to_add",
    "reshape_prelu_slopes",
    "name_nodes",
]

logger = logging.getLogger(__name__)

MIN_OPSET = 13
# ONNX IR version that goes with opset 13 (ONNX 1.8).
_IR_FOR_MIN_OPSET = 7


def upgrade_opset(model: onnx.ModelProto) -> PassResult:
    """Convert a model whose default-domain opset is below 13 to opset 13 with ONNX's version converter."""
    current = opset_version(model)
    if current >= MIN_OPSET or current == 0:
        return PassResult()
    try:
        converted = version_converter.convert_version(model, MIN_OPSET)
    except Exception as exc:  # the converter raises plain RuntimeErrors from C++
        return PassResult(
            warnings=(
                f"could not convert opset {current} to {MIN_OPSET} ({exc}); the model keeps opset {current}, "
                "re-export it with opset >= 13 for best results",
            )
        )
    # The converter stamps the installed onnx's newest IR version; keep the input's (onnxruntime may be older).
    converted.ir_version = max(model.ir_version, _IR_FOR_MIN_OPSET)
    model.CopyFrom(converted)
    return PassResult(1, (f"opset {current} -> {MIN_OPSET}",))


def _rewire(model: onnx.ModelProto, old: str, new: str) -> None:
    """Make every reader of tensor ``old`` read ``new`` instead (graph outputs keep their name)."""
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new


def eliminate_inference_dropout(model: onnx.ModelProto) -> PassResult:
    """Remove Dropout nodes that are identities in inference (no training_mode input, mask unused)."""
    graph = model.graph
    view = GraphView(graph)
    doomed = []
    for node in graph.node:
        if node.op_type != "Dropout":
            continue
        training = node.input[2] if len(node.input) > 2 else ""
        if training and not (view.is_constant(training) and not bool(view.array(training))):
            continue
        if (
            len(node.output) > 1
            and node.output[1]
            and (view.consumers.get(node.output[1]) or node.output[1] in view.graph_outputs)
        ):
            continue
        source, result = node.input[0], node.output[0]
        if result in view.graph_outputs:
            if source in view.graph_inputs or source in view.graph_outputs:
                continue  # the output would vanish into an input: keep the node
            producer = view.producer.get(source)
            if producer is None:
                continue
            for index, name in enumerate(producer.output):
                if name == source:
                    producer.output[index] = result
            _rewire(model, source, result)
        else:
            _rewire(model, result, source)
        doomed.append(node)
    if not doomed:
        return PassResult()
    remove_nodes(graph, doomed)
    return PassResult(len(doomed), (f"removed {len(doomed)} inference Dropout",))


def _elem_type(view: GraphView, name: str) -> int:
    """The declared element type of ``name`` (0 when nothing says)."""
    if name in view.initializers:
        return int(view.initializers[name].data_type)
    info = view.value_info.get(name)
    return int(info.type.tensor_type.elem_type) if info is not None else 0


def nop_cast_to_identity(model: onnx.ModelProto) -> PassResult:
    """Turn a Cast to the type its input already has into an Identity (which ``eliminate_identity`` removes).

    skl2onnx begins every model with ``Cast(X, to=FLOAT)`` on its float input; ESP-DL has no Cast, and this one
    changes nothing."""
    view = GraphView(model.graph)
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx") or not node.input:
            continue
        to = next((a.i for a in node.attribute if a.name == "to"), 0)
        if to and _elem_type(view, node.input[0]) == to:
            node.op_type = "Identity"
            del node.attribute[:]
            changed += 1
    return PassResult(changed, (f"{changed} Cast to the same type -> Identity",) if changed else ())


def sum_to_add(model: onnx.ModelProto) -> PassResult:
    """Rename two-input ``Sum`` to ``Add`` (identical semantics, and Add is what ESP-DL implements)."""
    changed = 0
    for node in model.graph.node:
        if node.op_type == "Sum" and node.domain in ("", "ai.onnx") and len(node.input) == 2:
            node.op_type = "Add"
            changed += 1
    return PassResult(changed, (f"{changed} two-input Sum -> Add",) if changed else ())


def reshape_prelu_slopes(model: onnx.ModelProto) -> PassResult:
    """Give per-channel PRelu slopes the shape ``(C, 1, ..., 1)`` that broadcasts over NCHW.

    A slope of shape ``(1, C, 1, 1)`` is squeezed to ``(C, 1, 1)``. A flat ``(C,)`` slope on a rank-4 input
    is what some exporters write meaning "per channel"; ONNX would broadcast it over the last axis, so it is
    only reshaped when that cannot run (last axis != C); when the last axis happens to equal C the meaning
    is ambiguous and the slope is left alone with a warning.
    """
    graph = model.graph
    view = GraphView(graph)
    changed, warnings = 0, []
    for node in graph.node:
        if node.op_type != "PRelu" or len(node.input) < 2 or not view.is_constant(node.input[1]):
            continue
        shape = view.shape(node.input[0])
        if shape is None or len(shape) < 3:
            continue
        slope = view.array(node.input[1])
        channels = shape[1]
        if slope.size <= 1 or not isinstance(channels, int) or slope.size != channels:
            continue
        wanted = (channels,) + (1,) * (len(shape) - 2)
        if slope.shape == wanted:
            continue
        if slope.ndim == 1 and shape[-1] == channels:
            warnings.append(
                f"PRelu {node.name!r}: slope of shape ({channels},) on input {shape} broadcasts over the "
                "last axis, which has the same size as the channel axis; left as it is"
            )
            continue
        if slope.ndim == len(shape) and slope.shape[0] != 1:
            continue
        if slope.ndim not in (1, len(shape) - 1, len(shape)):
            continue
        target = node.input[1]
        if len(view.consumers.get(target, [])) > 1:
            target = unique_name(f"{node.name or 'PRelu'}_slope", set(view.initializers) | set(view.producer))
            node.input[1] = target
        set_initializer(graph, target, slope.reshape(wanted))
        changed += 1
    return PassResult(changed, (f"{changed} PRelu slope(s) -> (C, 1, 1)",) if changed else (), tuple(warnings))


def name_nodes(model: onnx.ModelProto) -> PassResult:
    """Give every unnamed or duplicate-named node a unique, stable name ``<op_type>_<n>``.

    Named nodes keep their names (the first of a duplicate keeps it), so running it again changes nothing.
    """
    taken: set[str] = set()
    unnamed = []
    for node in model.graph.node:
        if node.name and node.name not in taken:
            taken.add(node.name)
        else:
            unnamed.append(node)
    for node in unnamed:
        node.name = unique_name(f"{node.op_type}_{len(taken)}", taken)
    return PassResult(len(unnamed), (f"named {len(unnamed)} node(s)",) if unnamed else ())
