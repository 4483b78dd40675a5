"""Constant affine steps beside a linear layer, folded into its weights and bias.

A converter often leaves ``y = c * x + d`` with constant ``c``, ``d`` next to a Conv or Gemm: BatchNormalization
it could not fold (``batchnorm.py`` handles the BatchNormalization node itself), the "learnable affine blocks"
of PP-LCNet / PP-OCRv4 (``Conv -> Mul(a) -> Add(b) -> HardSwish -> Mul(c) -> Add(d) -> Conv``), Caffe ``Scale``
layers, a network's built-in input normalisation. On the chip every such node is one more int8 rounding of the
whole tensor (PP-OCRv4's detector: 93 of its 129 Mul / Add nodes fold into its 62 convolutions), while folded
into the layer it costs nothing: the weights are rounded once either way.

- After a layer (``fold_affine_into_linear``): ``c * L(x) + d`` with ``c``, ``d`` one value per output channel
  (or one for all) is ``L'(x)`` with ``W' = c W``, ``b' = c b + d``: exact in real arithmetic.
- Before a Conv / Gemm (``fold_affine_into_next_layer``): ``L(c * x)`` with ``c`` per input channel is ``L'(x)``
  with ``W'`` scaled along the input channels: exact, zero padding included (``c * 0 = 0``). ``L(x + d)`` is
  ``L(x)`` with ``b' = b + sum W d`` only when the layer pads nothing (the padded border would see 0, not
  ``d``); before a padded Conv, ``c * x + d`` is rewritten ``c * (x + d / c)`` so the scale still folds.

Folding changes the float results only by float32 rounding (checked against onnxruntime in the tests).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from espquant.graph import GraphView, layer_output_channels, remove_nodes, set_initializer, unique_name
from espquant.optimizer.pipeline import PassResult

__all__ = ["LINEAR", "fold_affine", "fold_affine_into_linear", "fold_affine_into_next_layer", "fold_output_affine"]

LINEAR = ("Conv", "ConvTranspose", "Gemm")
_SCALES = ("Mul", "Div")
_SHIFTS = ("Add", "Sub")


def _attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _attr_float(node: onnx.NodeProto, name: str, default: float) -> float:
    return next((a.f for a in node.attribute if a.name == name), default)


def _write_param(
    model: onnx.ModelProto,
    view: GraphView,
    node: onnx.NodeProto,
    index: int,
    value: np.ndarray,
    taken: set[str],
    suffix: str,
) -> None:
    """Store ``value`` as input ``index`` of ``node``: in place if only this node reads the old tensor,
    else under a fresh name, so a weight shared with another node is never changed behind its back."""
    old = node.input[index] if index < len(node.input) else ""
    if old and len(view.consumers.get(old, [])) == 1 and old not in view.graph_outputs:
        set_initializer(model.graph, old, value)
        return
    name = unique_name(f"{node.name or node.op_type}_{suffix}", taken)
    set_initializer(model.graph, name, value)
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = name


def _float_params(view: GraphView, layer: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The layer's constant float weight and bias (None when it has none); None when they are not constant."""
    if len(layer.input) < 2 or not view.is_constant(layer.input[1]):
        return None
    has_bias = len(layer.input) > 2 and bool(layer.input[2])
    if has_bias and not view.is_constant(layer.input[2]):
        return None
    weight = view.array(layer.input[1])
    if weight.dtype.kind != "f":
        return None
    return weight, view.array(layer.input[2]).astype(np.float64) if has_bias else None


def fold_output_affine(
    model: onnx.ModelProto,
    view: GraphView,
    layer: onnx.NodeProto,
    scale: np.ndarray,
    shift: np.ndarray,
    taken: set[str],
    suffix: str = "fold",
) -> bool:
    """Fold ``y = scale * layer(x) + shift`` (one value per output channel) into ``layer``'s parameters; False
    when it cannot."""
    params = _float_params(view, layer)
    if params is None:
        return False
    weight, bias = params
    channels = scale.shape[0]
    w = weight.astype(np.float64)
    if layer.op_type == "Conv":
        if w.shape[0] != channels:
            return False
        w = w * scale.reshape((channels,) + (1,) * (w.ndim - 1))
    elif layer.op_type == "ConvTranspose":
        group = _attr_int(layer, "group", 1)
        if w.shape[1] * group != channels:
            return False
        per_group = w.shape[1]
        grouped = w.reshape((group, w.shape[0] // group, per_group) + w.shape[2:])
        grouped = grouped * scale.reshape((group, 1, per_group) + (1,) * (w.ndim - 2))
        w = grouped.reshape(w.shape)
    else:  # Gemm: Y = alpha * A' B' + beta * C, the affine map over its second axis
        if w.ndim != 2:
            return False
        trans_b = _attr_int(layer, "transB", 0)
        if (w.shape[0] if trans_b else w.shape[1]) != channels:
            return False
        w = w * (scale[:, None] if trans_b else scale[None, :])
    if bias is not None:
        if layer.op_type == "Gemm":
            bias = bias * _attr_float(layer, "beta", 1.0)
            if bias.size not in (1, channels):
                return False
            bias = np.broadcast_to(bias.reshape(-1), (channels,))
        new_bias = bias * scale + shift
    else:
        new_bias = shift
    if layer.op_type == "Gemm":
        for attr in layer.attribute:
            if attr.name == "beta":
                attr.f = 1.0
    _write_param(model, view, layer, 1, w.astype(weight.dtype), taken, f"weight_{suffix}")
    _write_param(model, view, layer, 2, np.asarray(new_bias, dtype=weight.dtype), taken, f"bias_{suffix}")
    return True


def _constant_operand(view: GraphView, node: onnx.NodeProto) -> tuple[str, np.ndarray] | None:
    """``(data input, constant)`` of a float Mul / Div / Add / Sub by a constant (Div and Sub: the divisor /
    subtrahend only), as the factor or the addend it applies: Div by ``c`` is Mul by ``1 / c``, Sub is Add of
    ``-d``."""
    if node.op_type not in _SCALES + _SHIFTS or len(node.input) != 2 or len(node.output) != 1:
        return None
    a, b = node.input
    positions = [1] if node.op_type in ("Div", "Sub") else [1, 0]
    for position in positions:
        constant, data = (b, a) if position == 1 else (a, b)
        if view.is_constant(constant) and not view.is_constant(data):
            value = view.array(constant)
            if value.dtype.kind != "f" or not np.isfinite(value).all():
                return None
            value = value.astype(np.float64)
            if node.op_type == "Div":
                if (value == 0).any():
                    return None
                value = 1.0 / value
            elif node.op_type == "Sub":
                value = -value
            return data, value
    return None


def _per_channel(value: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``value`` as one number per channel of axis 1 of a rank-``rank`` tensor, when it broadcasts along that
    axis only (a scalar, ``(C, 1, 1)``, ``(1, C, 1, 1)`` ...) and does not widen the tensor's shape."""
    if value.ndim > rank or rank < 2:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(d != 1 for axis, d in enumerate(shape) if axis != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float64)


def fold_affine_into_linear(model: onnx.ModelProto) -> PassResult:
    """``Conv / ConvTranspose / Gemm -> Mul / Div / Add / Sub by a per-channel constant`` -> the layer alone,
    when the layer feeds only that node."""
    graph = model.graph
    view = GraphView(graph)
    taken = {t.name for t in graph.initializer} | {n.name for n in graph.node} | set(view.producer)
    doomed: list[onnx.NodeProto] = []
    for node in list(graph.node):
        found = _constant_operand(view, node)
        if found is None:
            continue
        data, value = found
        layer = view.producer.get(data)
        if layer is None or layer.op_type not in LINEAR or view.single_consumer(data) is not node:
            continue
        if data in view.graph_outputs:
            continue
        shape = layer_output_channels(view, layer)
        per_channel = None if shape is None else _per_channel(value, *shape)
        if per_channel is None:
            continue
        ones, zeros = np.ones_like(per_channel), np.zeros_like(per_channel)
        scale, shift = (per_channel, zeros) if node.op_type in _SCALES else (ones, per_channel)
        if not fold_output_affine(model, view, layer, scale, shift, taken, "affine"):
            continue
        layer.output[0] = node.output[0]
        doomed.append(node)
    if not doomed:
        return PassResult()
    remove_nodes(graph, doomed)
    return PassResult(len(doomed), (f"folded {len(doomed)} constant Mul / Add into the layer before",))


def _input_channels(view: GraphView, layer: onnx.NodeProto) -> int | None:
    """Input channels of a Conv (weight ``(M, C / group, ...)``) or features of a Gemm reading ``A`` as is."""
    weight = view.array(layer.input[1])
    if layer.op_type == "Conv":
        return weight.shape[1] * _attr_int(layer, "group", 1)
    if layer.op_type == "Gemm" and weight.ndim == 2 and not _attr_int(layer, "transA", 0):
        return weight.shape[1] if _attr_int(layer, "transB", 0) else weight.shape[0]
    return None


def _weight_per_input(layer: onnx.NodeProto, weight: np.ndarray, per_input: np.ndarray) -> np.ndarray:
    """``per_input`` (one value per input channel / feature) laid out like ``weight``, for each weight element."""
    if layer.op_type == "Gemm":
        return per_input[None, :] if _attr_int(layer, "transB", 0) else per_input[:, None]
    group = _attr_int(layer, "group", 1)
    outputs, per_group = weight.shape[0], weight.shape[1]
    index = (np.arange(outputs) // (outputs // group))[:, None] * per_group + np.arange(per_group)[None, :]
    return per_input[index].reshape(weight.shape[:2] + (1,) * (weight.ndim - 2))


def _pads_nothing(layer: onnx.NodeProto) -> bool:
    if layer.op_type == "Gemm":
        return True
    auto_pad = next((a.s.decode() for a in layer.attribute if a.name == "auto_pad"), "NOTSET")
    pads = next((list(a.ints) for a in layer.attribute if a.name == "pads"), [])
    return auto_pad in ("NOTSET", "VALID") and not any(pads)


def _readers(view: GraphView, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """The Conv / Gemm nodes reading ``node``'s output as their data input with constant float parameters,
    when they are all its readers (and it is no graph output)."""
    output = node.output[0]
    readers = view.consumers.get(output, [])
    if not readers or output in view.graph_outputs:
        return None
    for reader in readers:
        if reader.op_type not in ("Conv", "Gemm") or reader.input[0] != output or output in reader.input[1:]:
            return None
        params = _float_params(view, reader)
        if params is None or _input_channels(view, reader) is None:
            return None
        if reader.op_type == "Gemm":  # alpha / beta 1 and a bias of one value per output (or one for all)
            outputs = layer_output_channels(view, reader)
            if _attr_float(reader, "alpha", 1.0) != 1.0 or _attr_float(reader, "beta", 1.0) != 1.0:
                return None
            if outputs is None or (params[1] is not None and params[1].size not in (1, outputs[1])):
                return None
    return readers


def _reader_rank(view: GraphView, reader: onnx.NodeProto) -> int:
    """The rank of a Conv's (its weight's) or a Gemm's (2) data input."""
    return view.array(reader.input[1]).ndim if reader.op_type == "Conv" else 2


def fold_affine_into_next_layer(model: onnx.ModelProto) -> PassResult:
    """``Mul / Div by a per-channel constant -> Conv / Gemm``, and ``Add / Sub`` before a layer that pads
    nothing, folded into those layers; ``Mul -> Add`` before a padded Conv becomes ``Add(d / c) -> Mul`` so
    the scale folds on the next round (module docstring)."""
    graph = model.graph
    view = GraphView(graph)
    taken = {t.name for t in graph.initializer} | {n.name for n in graph.node} | set(view.producer)
    doomed: list[onnx.NodeProto] = []
    touched: set[int] = set()
    swapped = 0
    for node in list(graph.node):
        found = _constant_operand(view, node)
        readers = _readers(view, node) if found is not None else None
        if found is None or readers is None or any(id(r) in touched for r in readers):
            if found is not None and node.op_type in _SCALES:
                swapped += _swap_before_padded(model, view, node, found, taken, touched)
            continue
        data, value = found
        channels = {_input_channels(view, r) for r in readers}
        rank = _reader_rank(view, readers[0])
        per_input = _per_channel(value, rank, channels.pop()) if len(channels) == 1 else None
        if per_input is None:
            continue
        if node.op_type in _SHIFTS and not all(_pads_nothing(r) for r in readers):
            continue
        for reader in readers:
            weight, bias = _float_params(view, reader)  # type: ignore[misc]
            spread = _weight_per_input(reader, weight, per_input)
            if node.op_type in _SCALES:
                _write_param(model, view, reader, 1, (weight * spread).astype(weight.dtype), taken, "weight_affine")
            else:
                added = _shift_through(reader, weight.astype(np.float64), spread)
                total = added if bias is None else np.broadcast_to(bias.reshape(-1), added.shape) + added
                _write_param(model, view, reader, 2, total.astype(weight.dtype), taken, "bias_affine")
            reader.input[0] = data
            touched.add(id(reader))
        doomed.append(node)
    if doomed:
        remove_nodes(graph, doomed)
    details = [f"folded {len(doomed)} constant Mul / Add into the layer after"] if doomed else []
    details += [f"{swapped} Mul -> Add before a padded Conv -> Add -> Mul"] if swapped else []
    return PassResult(len(doomed) + swapped, tuple(details))


def _shift_through(layer: onnx.NodeProto, weight: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """What adding ``d`` (spread like the weight) to every input adds to each output: ``sum W d`` per output."""
    if layer.op_type == "Gemm":
        product = weight * spread
        return product.sum(axis=0 if not _attr_int(layer, "transB", 0) else 1)
    return (weight * spread).reshape(weight.shape[0], -1).sum(axis=1)


def _swap_before_padded(
    model: onnx.ModelProto,
    view: GraphView,
    mul: onnx.NodeProto,
    found: tuple[str, np.ndarray],
    taken: set[str],
    touched: set[int],
) -> int:
    """``x * c -> + d -> padded Conv`` as ``(x + d / c) * c -> Conv``: the scale then folds into the Conv, and
    one rounding of the tensor is gone. Only for per-channel ``c`` without zeros and a lone Add reader."""
    data, scale = found
    add = view.single_consumer(mul.output[0])
    if add is None or mul.output[0] in view.graph_outputs or id(add) in touched:
        return 0
    shift = _constant_operand(view, add)
    readers = _readers(view, add) if shift is not None and add.op_type in _SHIFTS else None
    if shift is None or readers is None or all(_pads_nothing(r) for r in readers):
        return 0
    channels = {_input_channels(view, r) for r in readers}
    if len(channels) != 1:
        return 0
    rank = _reader_rank(view, readers[0])
    count = channels.pop()
    c, d = _per_channel(scale, rank, count), _per_channel(shift[1], rank, count)
    if c is None or d is None or (c == 0).any():
        return 0
    broadcast = (count,) + (1,) * (rank - 2)
    dtype = view.array(mul.input[1] if view.is_constant(mul.input[1]) else mul.input[0]).dtype
    shift_name = unique_name(f"{add.name or 'Add'}_shift_before_scale", taken)
    scale_name = unique_name(f"{mul.name or 'Mul'}_scale", taken)
    set_initializer(model.graph, shift_name, (d / c).reshape(broadcast).astype(dtype))
    set_initializer(model.graph, scale_name, c.reshape(broadcast).astype(dtype))
    shifted = unique_name(f"{add.output[0]}_before_scale", taken)
    add_name, mul_name = add.name or unique_name("Add", taken), mul.name or unique_name("Mul", taken)
    new_add = helper.make_node("Add", [data, shift_name], [shifted], name=add_name)
    new_mul = helper.make_node("Mul", [shifted, scale_name], [add.output[0]], name=mul_name)
    for old, new in ((mul, new_add), (add, new_mul)):
        old.CopyFrom(new)
    touched.update({id(mul), id(add)})
    return 1


def fold_affine(model: onnx.ModelProto) -> PassResult:
    """Both folds (module docstring), the layer before first."""
    before = fold_affine_into_linear(model)
    after = fold_affine_into_next_layer(model)
    return PassResult(before.changes + after.changes, before.details + after.details)
