"""MatMul + Add(constant) -> Gemm, also when the batch dimension is symbolic.

onnxoptimizer's ``fuse_matmul_add_bias_into_gemm`` needs the MatMul input's first dimension as a number, so
every model exported with a dynamic batch (tf2onnx writes ``unk__9``, PyTorch ``batch_size``) kept its
MatMul + Add pairs. ESP-DL (and the legacy library's FullyConnected) wants one Gemm with a bias, and its
calibration puts the bias at ``e_in + e_w``; a separate Add is a second quantized layer with its own rounding.
Gemm's output is ``A @ B + C`` with ``C`` broadcast to ``(N, M)``, which is what ``Add(MatMul(A, B), C)``
computes whenever ``A`` has rank 2 and ``C`` broadcasts to ``(N, M)`` without growing it, whatever ``N`` is.
"""

from __future__ import annotations

import onnx
from onnx import helper

from espquant.graph import GraphView, opset_version, replace_nodes, unique_name
from espquant.optimizer.pipeline import PassResult

__all__ = ["fuse_matmul_add_into_gemm"]

# Gemm's C broadcasts unidirectionally to (N, M) from opset 7 on; older Gemm had a ``broadcast`` attribute.
_MIN_OPSET = 7
# Gemm and MatMul share these element types; integer MatMul is left alone (ESP-DL quantizes float models).
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})


def _elem_type(view: GraphView, name: str) -> int | None:
    """The element type of tensor ``name`` from its initializer or value info, None when unknown."""
    if name in view.initializers:
        return view.initializers[name].data_type
    info = view.value_info.get(name)
    if info is None or not info.type.HasField("tensor_type"):
        return None
    return info.type.tensor_type.elem_type or None


def _bias_broadcasts(bias_shape: tuple[int, ...], rows: int | str | None, cols: int) -> bool:
    """True when a bias of ``bias_shape`` added to an ``(rows, cols)`` product leaves its shape unchanged.

    Every bias axis must be 1 or equal the product's axis it lines up with; a symbolic ``rows`` only lines
    up with 1, because the bias is a constant and the batch is not.
    """
    if len(bias_shape) > 2:
        return False
    product = (rows, cols)[2 - len(bias_shape) :]
    return all(b == 1 or (isinstance(p, int) and b == p) for b, p in zip(bias_shape, product))


def _fusible(view: GraphView, add: onnx.NodeProto) -> tuple[onnx.NodeProto, str] | None:
    """``(matmul, bias)`` when ``add`` is ``MatMul(A, B) + bias`` (either operand order) that a Gemm computes.

    Needs: A of rank 2 (any first dimension), a constant B of rank 2, a constant float bias that broadcasts
    without growing the product, and a MatMul output read only by this Add.
    """
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
        return None
    for position in (0, 1):
        product, bias = add.input[position], add.input[1 - position]
        matmul = view.producer.get(product)
        if matmul is None or matmul.op_type != "MatMul" or matmul.domain not in ("", "ai.onnx"):
            continue
        if view.single_consumer(product) is not add or not view.is_constant(bias):
            continue
        if not view.is_constant(matmul.input[1]):
            continue  # ESP-DL's Gemm needs a constant B; its MatMul also takes one computed at run time
        a_shape, b_shape = view.shape(matmul.input[0]), view.shape(matmul.input[1])
        if a_shape is None or b_shape is None or len(a_shape) != 2 or len(b_shape) != 2:
            continue
        cols = b_shape[1]
        if not isinstance(cols, int) or _elem_type(view, matmul.input[0]) not in _FLOAT_TYPES:
            continue
        if view.initializers[bias].data_type != _elem_type(view, matmul.input[0]):
            continue
        if _bias_broadcasts(tuple(view.initializers[bias].dims), a_shape[0], cols):
            return matmul, bias
    return None


def fuse_matmul_add_into_gemm(model: onnx.ModelProto) -> PassResult:
    """Replace ``Add(MatMul(A, B), bias)`` by ``Gemm(A, B, bias)`` when A is 2-D, whatever its batch size.

    Needs shape inference to have run (the pipeline refreshes shapes at the start of every round).
    """
    if opset_version(model) < _MIN_OPSET:
        return PassResult()
    graph = model.graph
    view = GraphView(graph)
    taken = {n.name for n in graph.node}
    replacements: dict[int, list[onnx.NodeProto]] = {}
    for add in graph.node:
        found = _fusible(view, add)
        if found is None or id(found[0]) in replacements:
            continue
        matmul, bias = found
        gemm = helper.make_node(
            "Gemm",
            [matmul.input[0], matmul.input[1], bias],
            [add.output[0]],
            name=matmul.name or unique_name(f"{add.name or 'MatMul'}_gemm", taken),
        )
        replacements[id(matmul)] = [gemm]
        replacements[id(add)] = []
    fused = len(replacements) // 2
    if not fused:
        return PassResult()
    replace_nodes(graph, replacements)
    _drop_stale_value_info(graph)
    return PassResult(fused, (f"fused {fused} MatMul + Add into Gemm",))


def _drop_stale_value_info(graph: onnx.GraphProto) -> None:
    """Remove value_info entries of tensors no node produces any more (the fused MatMul outputs)."""
    produced = {name for node in graph.node for name in node.output}
    kept = [v for v in graph.value_info if v.name in produced]
    if len(kept) == len(graph.value_info):
        return
    copies = [onnx.ValueInfoProto() for _ in kept]
    for copy, info in zip(copies, kept):
        copy.CopyFrom(info)
    del graph.value_info[:]
    graph.value_info.extend(copies)
