"""Shapes: inference, the dynamic batch dimension, and pinning dynamic input dimensions.

ESP-DL plans memory from static shapes, so every tensor but the batch dimension must have a known size.
Shape inference runs on a light copy of the model in which large weights are declared as typed inputs
instead of carried as data: ONNX's inference serialises the whole model, and on a model with hundreds of
megabytes of weights that copy costs more than the inference itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import onnx
from onnx import helper, shape_inference

from espquant.errors import OptionError
from espquant.graph import GraphView, tensor_shape
from espquant.optimizer.pipeline import PassResult

__all__ = [
    "BATCH_DIM",
    "infer_shapes",
    "infer_shapes_pass",
    "inferred_value_info",
    "convert_model_batch_to_dynamic",
    "fix_input_shapes",
    "parse_input_shape",
]

logger = logging.getLogger(__name__)

BATCH_DIM = "N"
# Initializers up to this many elements stay as data: shape chains (Reshape targets, Slice bounds) need values.
_SMALL_INITIALIZER = 4096


def infer_shapes(model: onnx.ModelProto) -> list[str]:
    """Replace ``model.graph.value_info`` with freshly inferred shapes; returns warnings (never raises).

    Graph outputs get their inferred type where they had none.
    """
    graph = model.graph
    try:
        inferred, weight_names = _inferred(model)
    except Exception as exc:  # onnx raises InferenceError and plain RuntimeErrors
        return [f"shape inference failed ({exc}); shapes are left as they were"]
    del graph.value_info[:]
    graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in weight_names)
    inferred_outputs = {o.name: o for o in inferred.graph.output}
    for output in graph.output:
        better = inferred_outputs.get(output.name)
        if better is not None and _rank_known(better) and not _fully_static(output):
            output.type.CopyFrom(better.type)
    return []


def inferred_value_info(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The shapes inference gives ``model``'s tensors (weights excluded, graph outputs included), the model left
    as it is; none when inference fails."""
    try:
        inferred, weight_names = _inferred(model)
    except Exception:  # onnx raises InferenceError and plain RuntimeErrors
        return []
    return [v for v in [*inferred.graph.value_info, *inferred.graph.output] if v.name not in weight_names]


def _inferred(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """Shape inference on a light copy of ``model``: its large weights become typed inputs (their values are not
    copied), small ones stay as data (shape chains need them). Returns the inferred copy and the large weights'
    names."""
    graph = model.graph
    small, large = [], []
    for tensor in graph.initializer:
        count = 1
        for dim in tensor.dims:
            count *= dim
        (small if count <= _SMALL_INITIALIZER else large).append(tensor)
    declared = {i.name for i in graph.input}
    weight_inputs = [
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in large if t.name not in declared
    ]
    light_graph = helper.make_graph(
        list(graph.node), graph.name or "graph", [*graph.input, *weight_inputs], list(graph.output), small
    )
    light = helper.make_model(light_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    light.functions.extend(model.functions)
    return shape_inference.infer_shapes(light, strict_mode=False, data_prop=True), {t.name for t in large}


def _rank_known(info: onnx.ValueInfoProto) -> bool:
    return tensor_shape(info) is not None


def _fully_static(info: onnx.ValueInfoProto) -> bool:
    shape = tensor_shape(info)
    return shape is not None and all(isinstance(d, int) for d in shape)


def infer_shapes_pass(model: onnx.ModelProto) -> PassResult:
    """Pipeline form of :func:`infer_shapes`; it edits only shape annotations, so it reports no changes."""
    warnings = infer_shapes(model)
    return PassResult(0, (), tuple(warnings))


def _data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def convert_model_batch_to_dynamic(model_proto: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of the model whose inputs' and outputs' first dimension is the symbolic ``N``.

    Shapes are inferred again so intermediate tensors carry ``N`` too. A constant ``Reshape`` target that
    hard-codes batch 1 still fixes the batch; the optimizer's folding leaves such targets visible.
    """
    model = onnx.ModelProto()
    model.CopyFrom(model_proto)
    for info in [*_data_inputs(model), *model.graph.output]:
        dims = info.type.tensor_type.shape.dim
        if info.type.tensor_type.HasField("shape") and len(dims) > 0:
            dims[0].Clear()
            dims[0].dim_param = BATCH_DIM
    del model.graph.value_info[:]
    infer_shapes(model)
    for message in batch_pinning_reshapes(model):
        logger.warning(message)
    return model


def batch_pinning_reshapes(model: onnx.ModelProto) -> list[str]:
    """Warnings for Reshape nodes whose constant target starts with 1: they pin the batch to 1.

    Such targets usually come from exporting with batch 1; the user should export with a dynamic batch
    (or write ``x.view(x.size(0), -1)``) so the optimizer can make that dimension a copy (0).
    """
    view = GraphView(model.graph)
    messages = []
    for node in model.graph.node:
        if node.op_type == "Reshape" and len(node.input) > 1 and view.is_constant(node.input[1]):
            target = view.array(node.input[1]).reshape(-1)
            if target.size and int(target[0]) == 1:
                messages.append(
                    f"Reshape {node.name!r} has the constant target {target.tolist()}, which fixes the batch "
                    "to 1: batches larger than 1 will fail there. Export the model with a dynamic batch."
                )
    return messages


def fix_input_shapes(model_proto: onnx.ModelProto, shapes: Mapping[str, Sequence[int | str]]) -> onnx.ModelProto:
    """Return a copy of the model with the named inputs' dimensions pinned to ``shapes``.

    Many exporters declare height and width dynamic; the chip needs them static. Each given shape must have
    the input's rank and agree with its already-static dimensions. A name instead of a size (``"N"``) keeps that
    dimension dynamic under that name (the batch). Shapes are inferred again afterwards.

    Raises:
        OptionError: an unknown input name, a wrong rank, a non-positive size, or a conflict with a static dim.
    """
    model = onnx.ModelProto()
    model.CopyFrom(model_proto)
    inputs = {i.name: i for i in _data_inputs(model)}
    for name, shape in shapes.items():
        if name not in inputs:
            raise OptionError(
                f"input shape for {name!r}: the model has no such input; its inputs are {', '.join(inputs)}."
            )
        if any(not isinstance(d, str) and int(d) <= 0 for d in shape):
            raise OptionError(f"input shape for {name!r}: {list(shape)} has a non-positive dimension.")
        info = inputs[name]
        current = tensor_shape(info)
        if current is not None and len(current) != len(shape):
            raise OptionError(
                f"input shape for {name!r}: {list(shape)} has rank {len(shape)} but the input has rank "
                f"{len(current)} ({_show(current)})."
            )
        if current is not None:
            for axis, (old, new) in enumerate(zip(current, shape)):
                if isinstance(old, int) and (isinstance(new, str) or old != int(new)):
                    raise OptionError(
                        f"input shape for {name!r}: dimension {axis} is fixed to {old} in the model, not {new} "
                        f"(model shape {_show(current)})."
                    )
        tensor_type = info.type.tensor_type
        tensor_type.ClearField("shape")
        for size in shape:
            dim = tensor_type.shape.dim.add()
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = int(size)
    del model.graph.value_info[:]
    infer_shapes(model)
    return model


def _show(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def parse_input_shape(text: str) -> tuple[str, list[int | str]]:
    """Parse ``NAME:1,3,48,192`` (the CLI's ``--input-shape``) into ``(name, [1, 3, 48, 192])``; ``N`` as a size
    (``x:N,3,48,192``) keeps the batch dynamic."""
    name, sep, dims = text.rpartition(":")
    shape: list[int | str] = []
    for part in (d.strip() for d in dims.split(",") if d.strip()):
        if part.lstrip("-").isdigit():
            shape.append(int(part))
        elif part.isidentifier():
            shape.append(part)
        else:
            shape = []
            break
    if not sep or not name or not shape:
        raise OptionError(
            f"--input-shape {text!r}: expected NAME:D0,D1,... for example 'input:1,3,48,192' or 'input:N,3,48,192'."
        )
    return name, shape
