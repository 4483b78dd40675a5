"""BatchNormalization removal: folded into the preceding Conv / ConvTranspose / Gemm, or, where there is
nothing to fold into, rewritten as a per-channel Mul + Add that ESP-DL can run.

In inference BatchNormalization is ``y = s * (x - mean) + beta`` with ``s = gamma / sqrt(var + eps)``, a
per-channel affine map. After a linear layer it folds into the layer's weights (scaled by ``s`` along the
output channel) and bias (``s * (b - mean) + beta``), leaving one node the chip runs in integers.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from espquant.graph import GraphView, remove_nodes, replace_nodes, set_initializer, unique_name
from espquant.optimizer.affine import LINEAR, fold_output_affine
from espquant.optimizer.pipeline import PassResult

__all__ = ["fold_batchnorm", "batchnorm_to_mul_add"]

_FOLD_TARGETS = LINEAR


def _bn_affine(view: GraphView, bn: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray] | None:
    """``(scale, shift)`` of an inference-mode BatchNormalization with constant parameters, else None."""
    if len(bn.input) < 5 or not all(view.is_constant(name) for name in bn.input[1:5]):
        return None
    attrs = {a.name: a for a in bn.attribute}
    if "training_mode" in attrs and attrs["training_mode"].i != 0:
        return None
    if len([o for o in bn.output if o]) != 1:
        return None  # running mean/var outputs requested: a training graph
    epsilon = attrs["epsilon"].f if "epsilon" in attrs else 1e-5
    gamma, beta, mean, var = (view.array(name).astype(np.float64) for name in bn.input[1:5])
    scale = gamma / np.sqrt(var + epsilon)
    return scale, beta - mean * scale


def fold_batchnorm(model: onnx.ModelProto) -> PassResult:
    """Fold BatchNormalization into the preceding Conv, ConvTranspose or Gemm when that layer feeds only it."""
    graph = model.graph
    view = GraphView(graph)
    taken = {t.name for t in graph.initializer} | {n.name for n in graph.node} | set(view.producer)
    doomed: list[onnx.NodeProto] = []
    folded: dict[str, int] = {}
    for bn in list(graph.node):
        if bn.op_type != "BatchNormalization":
            continue
        layer = view.producer.get(bn.input[0])
        if layer is None or layer.op_type not in _FOLD_TARGETS or view.single_consumer(bn.input[0]) is not bn:
            continue
        affine = _bn_affine(view, bn)
        if affine is None or not fold_output_affine(model, view, layer, *affine, taken, "bnfold"):
            continue
        layer.output[0] = bn.output[0]
        doomed.append(bn)
        folded[layer.op_type] = folded.get(layer.op_type, 0) + 1
    if not doomed:
        return PassResult()
    remove_nodes(graph, doomed)
    return PassResult(len(doomed), tuple(f"folded {n} BatchNormalization into {op}" for op, n in folded.items()))


def batchnorm_to_mul_add(model: onnx.ModelProto) -> PassResult:
    """Rewrite a BatchNormalization with nothing to fold into as ``Mul(x, scale) + shift``, per channel.

    Needs the input's rank (from shape inference) to shape the constants as ``(C, 1, ..., 1)``.
    """
    graph = model.graph
    view = GraphView(graph)
    taken = {t.name for t in graph.initializer} | {n.name for n in graph.node} | set(view.producer)
    replaced: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] = []
    warnings = []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization":
            continue
        producer = view.producer.get(bn.input[0])
        if producer is not None and producer.op_type in _FOLD_TARGETS and view.single_consumer(bn.input[0]) is bn:
            continue  # fold_batchnorm's job
        affine = _bn_affine(view, bn)
        shape = view.shape(bn.input[0])
        if affine is None:
            continue
        if shape is None or len(shape) < 2:
            warnings.append(
                f"BatchNormalization {bn.name!r}: input rank unknown, cannot rewrite it as Mul+Add; "
                "give the model static input shapes (--input-shape) and optimize again."
            )
            continue
        scale, shift = affine
        dtype = np.float32
        broadcast = (scale.shape[0],) + (1,) * (len(shape) - 2)
        base = bn.name or "BatchNormalization"
        scale_name = unique_name(f"{base}_scale", taken)
        shift_name = unique_name(f"{base}_shift", taken)
        mid = unique_name(f"{base}_scaled", taken)
        set_initializer(graph, scale_name, scale.reshape(broadcast).astype(dtype))
        set_initializer(graph, shift_name, shift.reshape(broadcast).astype(dtype))
        mul = helper.make_node("Mul", [bn.input[0], scale_name], [mid], name=unique_name(f"{base}_mul", taken))
        add = helper.make_node("Add", [mid, shift_name], [bn.output[0]], name=unique_name(f"{base}_add", taken))
        replaced.append((bn, [mul, add]))
    if not replaced:
        return PassResult(warnings=tuple(warnings))
    replace_nodes(graph, {id(bn): nodes for bn, nodes in replaced})
    return PassResult(len(replaced), (f"{len(replaced)} BatchNormalization -> Mul + Add",), tuple(warnings))
