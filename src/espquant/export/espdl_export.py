"""Export a quantized model as an ESP-DL v3 ``.espdl`` file (ESPDL_FORMAT.md section 9, the exporter checklist).

The in-memory :class:`QuantizedModel` already holds what the chip computes with (integer weights and biases,
exponents, fused ReLU, RequantizeLinear where exponents change, int8 tables). Exporting re-expresses it in the
runtime's terms:

- layouts (5.1): 4-D tensors entering or leaving Conv and the pools are NHWC; element-wise ops, activations
  and (re)quantization inherit their input's layout; every other op (Gemm, Flatten, Reshape, Transpose, ...)
  works in ONNX layout, so a ``Transpose`` is inserted wherever a tensor must change layout. A graph input
  is stored NHWC when its first reader is a conv-like op;
- weights in the target's byte order (5.2: blocked 16 / 8 lanes on ESP32-S3 and -P4, plain on the C chips),
  biases INT32 (int8 ops) / INT64 (int16 ops) at ``e_in + e_w``, per-channel exponent lists where the table
  has them (only on targets that run them);
- ``quant_type``, ``activation`` and ``lut`` attributes, int8 tables as ``<Op>_lut_<k>`` initializers,
  scales / zero points of the (re)quantize nodes, every variable in ``value_info`` with dtype and exponent;
- test values: one input and the integers the simulator computes for it, so the chip's own model test
  compares against espquant.

Before anything is written the exported graph is simulated from its own contents (the same reader path
``load_espdl`` uses) and must reproduce those integers bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from espquant._version import __version__
from espquant.errors import ModelError, OptionError, OutputError, TargetError, UnsupportedOpError
from espquant.espdl.digest import DIGEST_KEY, content_digest
from espquant.espdl.layouts import encode_conv_weight, encode_depthwise_weight, encode_kn_matrix
from espquant.espdl.reader import EspdlFile, EspdlNode, EspdlTensor, EspdlValue, decode_espdl
from espquant.espdl.writer import encode_espdl, write_espdl
from espquant.export.espdl_recurrent import export_recurrent
from espquant.quant.pot import qmax, qmin, simd_lanes
from espquant.simulator import kernels
from espquant.simulator.quantized_model import QNode, QuantizedModel
from espquant.simulator.reductions import REDUCE_KINDS

__all__ = ["EXPORTABLE_OPS", "LAYOUT_KEY", "build_espdl", "check_exportable", "export_espdl"]

LAYOUT_KEY = "espquant.layout:"

_CONV_LIKE = {"Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "Resize"}
_BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Mod"}
_COMPARE = {"Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual"}  # int8 / int16 in, BOOL out
# Activations: an int8 table when the node has one; the runtime's float32 module at int16 for these (8.3).
_FLOAT_AT_INT16 = {"Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Swish", "Elu", "Exp", "Log", "Sqrt"}
_ACTIVATIONS = _FLOAT_AT_INT16 | {"LeakyRelu", "PRelu", "Gelu"}
_INHERIT = {"Relu", "Clip", "RequantizeLinear", "QuantizeLinear", "DequantizeLinear", "Neg"} | _BINARY | _ACTIVATIONS
_INHERIT |= _COMPARE
_ONNX_LAYOUT = {"Gemm", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Softmax", "Concat", "Identity"}
_REDUCE = set(REDUCE_KINDS)
_ONNX_LAYOUT |= {"Slice", "Pad", "Split", "Gather", "LogSoftmax"} | _REDUCE
_ONNX_LAYOUT |= {"ReverseSequence", "ScatterND"}
_CHANNELS_LAST = {"DepthToSpace", "SpaceToDepth"}  # pure data movement the runtime does on NHWC tensors
_NHWC = {4: (0, 2, 3, 1), 3: (0, 2, 1)}
_INT_DTYPES = {8: "INT8", 16: "INT16"}


@dataclass
class _Export:
    """The file being assembled, with each tensor's current layout (a permutation of its ONNX axes)."""

    model: QuantizedModel
    values: dict[str, np.ndarray]  # every tensor of one simulated sample, ONNX layout
    nodes: list[EspdlNode] = field(default_factory=list)
    initializers: dict[str, EspdlTensor] = field(default_factory=dict)
    declared: dict[str, EspdlValue] = field(default_factory=dict)
    layout: dict[str, tuple[int, ...]] = field(default_factory=dict)
    alias: dict[str, str] = field(default_factory=dict)  # Identity outputs -> their input
    luts: int = 0
    bits: int = 8  # the width of the node being converted (mixed models have int8 and int16 nodes)
    # Tensors the file has and the integer model has not (ConvTranspose's zero-inserted input): -> the tensor
    # whose exponent and width they carry.
    twins: dict[str, str] = field(default_factory=dict)

    @property
    def int_dtype(self) -> str:
        return _INT_DTYPES[self.bits]

    def quant_type(self, tensor: str) -> str:
        tensor = self.twins.get(tensor, tensor)
        if tensor in self.model.float_tensors:
            return "F32"
        return "S8" if self.model.width(tensor) == 8 else "S16"

    def name(self, tensor: str) -> str:
        return self.alias.get(tensor, tensor)

    def perm(self, tensor: str) -> tuple[int, ...]:
        return self.layout.get(self.name(tensor), tuple(range(self.values[tensor].ndim)))

    def declare(self, tensor: str, perm: tuple[int, ...], stored: str | None = None) -> None:
        """value_info for ``tensor`` (stored under ``stored``) in layout ``perm``."""
        name = stored or tensor
        self.layout[name] = perm
        value = self.values[tensor]
        source = self.twins.get(tensor, tensor)
        floating = source in self.model.float_tensors
        exponent = 0 if floating else self.model.exponent(source)
        shape = tuple(int(value.shape[p]) for p in perm)
        dtype = "FLOAT" if floating else _INT_DTYPES[self.model.width(source)]
        if value.dtype == np.bool_:  # a comparison's result
            dtype = "BOOL"
        self.declared[name] = EspdlValue(name, dtype, shape, [exponent])

    def constant(self, name: str, data: np.ndarray, dtype: str, exponents: list[int], doc: str = "") -> str:
        """Store a constant and return its name in the file. One ONNX initializer read by several nodes in
        different forms (paddle2onnx shares a scalar ``1.0`` between a 3-D and a 4-D Mul: padded to each
        output's rank) gets one stored copy per form: overwriting would change the other readers' broadcast."""
        dims = tuple(int(d) for d in np.shape(data)) or (1,)
        values = np.asarray(data).reshape(dims)
        stored, copy = name, 1
        while stored in self.initializers and not _same_constant(self.initializers[stored], dtype, values, exponents):
            copy += 1
            stored = f"{name}__{copy}"
        self.initializers[stored] = EspdlTensor(stored, dtype, dims, values, exponents, doc)
        return stored

    def ensure(self, tensor: str, perm: tuple[int, ...]) -> str:
        """``tensor`` in layout ``perm``: the stored name, behind a Transpose node when it is elsewhere."""
        current = self.perm(tensor)
        if current == perm:
            return self.name(tensor)
        stored = f"{self.name(tensor)}__{'_'.join(map(str, perm))}"
        if stored not in self.declared:
            step = [current.index(p) for p in perm]  # x_cur.transpose(step) is the tensor in layout perm
            self.nodes.append(
                EspdlNode(
                    f"{stored}_transpose",
                    "Transpose",
                    [self.name(tensor)],
                    [stored],
                    {"perm": step, "quant_type": self.quant_type(tensor)},
                )
            )
            self.declare(tensor, perm, stored)
        return stored


def _identity(rank: int) -> tuple[int, ...]:
    return tuple(range(rank))


def _weight_doc(kind: str, n: int, bits: int, blocked: bool) -> str:
    if not blocked:
        return f"layout ==> {'HWCN' if kind == 'depthwise' else 'NHWC'}"
    lanes = simd_lanes(bits)
    return f"layout ==> (N/{lanes})HWC{lanes}" + ("_UNALIGNED" if n % lanes else "")


def _exponent_list(model: QuantizedModel, name: str) -> list[int]:
    value = model.exponents[name]
    return list(value) if isinstance(value, list) else [int(value)]


def _bias(e: _Export, node: QNode, channels: int) -> list[str]:
    if len(node.inputs) < 3 or not node.inputs[2]:
        return []
    bias = np.broadcast_to(np.asarray(e.model.constants[node.inputs[2]]).reshape(-1), (channels,))
    dtype = "INT32" if e.bits == 8 else "INT64"
    return [e.constant(node.inputs[2], bias.astype(np.int64), dtype, _exponent_list(e.model, node.inputs[2]))]


def _conv(e: _Export, node: QNode) -> EspdlNode:
    """Conv over NHWC (2-D) or NWC (1-D) data."""
    weight = np.asarray(e.model.constants[node.inputs[1]])
    geometry = {key: list(node.attrs[key]) for key in ("dilations", "pads", "strides") if key in node.attrs}
    return _conv_node(e, node, node.inputs[0], weight, int(node.attrs.get("group", 1)), geometry)


def _conv_node(
    e: _Export, node: QNode, source: str, weight: np.ndarray, group: int, geometry: dict[str, list[int]]
) -> EspdlNode:
    """An ESP-DL Conv reading ``source`` with ``weight`` (ONNX ``OIHW`` / ``OIW``); a 1-D kernel is stored as a
    2-D one of height 1, dims without it (``(K, C, N)``, as ESP-PPQ writes the 1-D convolutions of
    Espressif's speaker-verification model)."""
    if weight.ndim not in (3, 4):
        raise UnsupportedOpError(f"node {node.name!r}: only 1-D and 2-D convolutions can be exported")
    one_d = weight.ndim == 3
    lifted = weight[:, :, None, :] if one_d else weight
    n, c, kh, kw = lifted.shape
    blocked = e.model.profile.simd
    if group == 1:
        flat = encode_conv_weight(lifted.transpose(0, 2, 3, 1), e.bits, blocked)
        dims, kind = (kh, kw, c, n), "conv"
    elif c == 1 and group == n:
        flat = encode_depthwise_weight(lifted[:, 0], e.bits, blocked)
        dims, kind = (kh, kw, n, 1), "depthwise"
    else:
        raise UnsupportedOpError(f"node {node.name!r}: grouped convolution (group {group}) has no ESP-DL kernel")
    rank = 3 if one_d else 4
    x = e.ensure(source, _NHWC[rank])
    w = e.constant(
        node.inputs[1],
        flat.reshape(dims[1:] if one_d else dims),
        e.int_dtype,
        _exponent_list(e.model, node.inputs[1]),
        _weight_doc(kind, n, e.bits, blocked).replace("HWC", "WC" if one_d else "HWC"),
    )
    axes = rank - 2
    attrs = {
        "activation": "Relu" if node.relu else "Linear",
        "dilations": geometry.get("dilations", [1] * axes),
        "group": group,
        "kernel_shape": [kw] if one_d else [kh, kw],
        "pads": geometry.get("pads", [0] * 2 * axes),
        "strides": geometry.get("strides", [1] * axes),
    }
    e.declare(node.outputs[0], _NHWC[rank])
    return EspdlNode(node.name, "Conv", [x, w, *_bias(e, node, n)], list(node.outputs), attrs)


def _conv_transpose(e: _Export, node: QNode) -> EspdlNode:
    """ConvTranspose as ESP-DL runs it (and the simulator computes it): InsertZeros puts ``stride - 1`` zeros
    between the input's pixels, then a stride-1 Conv with the kernel flipped and its channel axes swapped
    pads ``dilation (k - 1) - pad`` (plus ``output_padding`` at the end)."""
    weight = np.asarray(e.model.constants[node.inputs[1]])  # (C_in, C_out, K...)
    if int(node.attrs.get("group", 1)) != 1:
        raise UnsupportedOpError(f"node {node.name!r}: grouped ConvTranspose has no ESP-DL kernel")
    axes = weight.ndim - 2
    kernel = weight.shape[2:]
    strides = list(node.attrs.get("strides", [1] * axes))
    dilations = list(node.attrs.get("dilations", [1] * axes))
    pads = list(node.attrs.get("pads", [0] * 2 * axes))
    extra = list(node.attrs.get("output_padding", [0] * axes))
    begin = [dilations[i] * (kernel[i] - 1) - pads[i] for i in range(axes)]
    end = [dilations[i] * (kernel[i] - 1) - pads[axes + i] + extra[i] for i in range(axes)]
    if min(begin + end) < 0:
        raise UnsupportedOpError(
            f"node {node.name!r}: ConvTranspose pads larger than dilation * (kernel - 1) cannot be exported"
        )
    source = node.inputs[0]
    rank = axes + 2
    x = e.ensure(source, _NHWC[rank])
    spread = f"{node.outputs[0]}__inserted"
    channels_last = kernels.insert_zeros_channels_last(np.moveaxis(e.values[source], 1, -1), strides, [0] * axes)
    e.values[spread] = np.moveaxis(channels_last, -1, 1)
    e.twins[spread] = source
    e.declare(spread, _NHWC[rank])
    e.nodes.append(
        EspdlNode(
            f"{node.name or node.outputs[0]}_insert_zeros",
            "InsertZeros",
            [x],
            [spread],
            {"stride": strides, "output_padding": [0] * axes, "quant_type": e.quant_type(source)},
        )
    )
    flipped = np.ascontiguousarray(np.flip(weight, axis=tuple(range(2, rank))).swapaxes(0, 1))
    geometry = {"dilations": dilations, "pads": begin + end, "strides": [1] * axes}
    return _conv_node(e, node, spread, flipped, 1, geometry)


def _gemm(e: _Export, node: QNode) -> EspdlNode:
    if node.attrs.get("transA", 0):
        raise UnsupportedOpError(f"node {node.name!r}: Gemm with transA has no ESP-DL kernel")
    matrix = np.asarray(e.model.constants[node.inputs[1]])
    matrix = matrix.T if node.attrs.get("transB", 0) else matrix  # (K, N)
    k, n = matrix.shape
    blocked = e.model.profile.simd
    x = e.ensure(node.inputs[0], _identity(2))
    w = e.constant(
        node.inputs[1],
        encode_kn_matrix(matrix, e.bits, blocked).reshape(1, 1, k, n),
        e.int_dtype,
        _exponent_list(e.model, node.inputs[1]),
        _weight_doc("conv", n, e.bits, blocked),
    )
    attrs = {"activation": "Relu" if node.relu else "Linear", "alpha": 1.0, "beta": 1.0, "transB": 0}
    e.declare(node.outputs[0], _identity(2))
    return EspdlNode(node.name, "Gemm", [x, w, *_bias(e, node, n)], list(node.outputs), attrs)


def _matmul(e: _Export, node: QNode) -> EspdlNode:
    """MatMul: every trailing K x N slice of B in the Gemm byte order (ESPDL_FORMAT.md 5.2), dims kept. A constant
    B is stored that way; a B computed at run time is brought there by layout nodes, as ESP-PPQ writes them."""
    if e.values[node.inputs[1]].ndim < 2:
        raise UnsupportedOpError(f"node {node.name!r}: MatMul with a 1-D B cannot be exported yet")
    a = e.ensure(node.inputs[0], _identity(e.values[node.inputs[0]].ndim))
    if node.inputs[1] in e.model.constants:
        matrix = np.asarray(e.model.constants[node.inputs[1]])
        k, n = matrix.shape[-2:]
        slices = matrix.reshape(-1, k, n)
        flat = np.concatenate([encode_kn_matrix(s, e.bits, e.model.profile.simd) for s in slices])
        exponents = _exponent_list(e.model, node.inputs[1])
        b = e.constant(node.inputs[1], flat.reshape(matrix.shape), e.int_dtype, exponents)
    else:
        b = _blocked_operand(e, node)
    e.declare(node.outputs[0], _identity(e.values[node.outputs[0]].ndim))
    return EspdlNode(node.name, "MatMul", [a, b], [node.outputs[0]], {"activation": "Relu" if node.relu else "Linear"})


def _blocked_operand(e: _Export, node: QNode) -> str:
    """A run-time B in the weight byte order (``encode_kn_matrix``), by data-movement nodes the runtime runs.

    SIMD targets read each ``K x N`` slice as blocks of ``lanes`` output columns, ``(N / lanes, K, lanes)``,
    then the tail columns as ``[N_tail][K]``; the plain-C kernels read it as ``[N][K]``. With a tail the two
    parts are sliced, ordered and flattened apart, then concatenated. The last Reshape keeps the ``(..., K, N)``
    label the runtime takes the sizes from."""
    source = node.inputs[1]
    value = e.values[source]
    *batch, k, n = value.shape
    rank = value.ndim
    swap = [*range(rank - 2), rank - 1, rank - 2]
    current = e.ensure(source, _identity(rank))
    steps = _LayoutSteps(e, node.outputs[0], source)
    if not e.model.profile.simd:
        plain = steps.add("Transpose", [current], swap)
        return steps.add("Reshape", [plain], [*batch, k, n])
    lanes = simd_lanes(e.bits)
    head_n = n - n % lanes
    parts = []
    if head_n:
        head = steps.add("Slice", [current], (0, head_n)) if head_n < n else current
        blocks = steps.add("Reshape", [head], [*batch, k, head_n // lanes, lanes])
        ordered = steps.add("Transpose", [blocks], [*range(rank - 2), rank - 1, rank - 2, rank])
        parts.append(steps.add("Reshape", [ordered], [*batch, head_n * k]))
    if head_n < n:
        tail = steps.add("Slice", [current], (head_n, n)) if head_n else current
        plain = steps.add("Transpose", [tail], swap)
        parts.append(steps.add("Reshape", [plain], [*batch, (n - head_n) * k]))
    joined = steps.add("Concat", parts, len(batch)) if len(parts) > 1 else parts[0]
    return steps.add("Reshape", [joined], [*batch, k, n])


class _LayoutSteps:
    """Data-movement nodes that reorder one tensor's bytes; each result has the source's exponent and width."""

    def __init__(self, e: _Export, prefix: str, source: str) -> None:
        self.e, self.prefix, self.source = e, prefix, source
        self.count = 0

    def add(self, op_type: str, inputs: list[str], argument: Any) -> str:
        e = self.e
        name = f"{self.prefix}__b{self.count}"
        self.count += 1
        data = [e.values[t] for t in inputs]
        attrs: dict[str, Any] = {"quant_type": e.quant_type(self.source)}
        node_inputs = list(inputs)
        if op_type == "Reshape":
            result = data[0].reshape(argument)
            node_inputs.append(e.constant(f"{name}_shape", np.asarray(argument, np.int64), "INT64", [0]))
        elif op_type == "Transpose":
            result = np.transpose(data[0], argument)
            attrs["perm"] = list(argument)
        elif op_type == "Slice":  # columns [start, end) of the last axis
            start, end = argument
            result = data[0][..., start:end]
            for suffix, values in (("starts", [start]), ("ends", [end]), ("axes", [data[0].ndim - 1])):
                node_inputs.append(e.constant(f"{name}_{suffix}", np.asarray(values, np.int64), "INT64", [0]))
        else:  # Concat along ``argument``
            result = np.concatenate(data, axis=argument)
            attrs["axis"] = int(argument)
        e.values[name] = result
        e.twins[name] = self.source
        e.declare(name, _identity(result.ndim))
        e.nodes.append(EspdlNode(f"{name}_{op_type.lower()}", op_type, node_inputs, [name], attrs))
        return name


def _pool(e: _Export, node: QNode) -> EspdlNode:
    """Pools over NHWC (2-D) or NWC (1-D) data."""
    rank = e.values[node.inputs[0]].ndim
    if rank not in _NHWC:
        raise UnsupportedOpError(f"node {node.name!r}: only 1-D and 2-D pools can be exported")
    x = e.ensure(node.inputs[0], _NHWC[rank])
    attrs: dict[str, Any] = {}
    if node.op_type != "GlobalAveragePool":
        axes = rank - 2
        attrs = {
            "kernel_shape": list(node.attrs["kernel_shape"]),
            "pads": list(node.attrs.get("pads", [0] * 2 * axes)),
            "strides": list(node.attrs.get("strides", [1] * axes)),
        }
    e.declare(node.outputs[0], _NHWC[rank])
    return EspdlNode(node.name, node.op_type, [x], [node.outputs[0]], attrs)


def _channels_last(e: _Export, node: QNode) -> EspdlNode:
    """DepthToSpace / SpaceToDepth: the runtime moves NHWC data (``dl_module_depth_to_space.hpp``)."""
    x = e.ensure(node.inputs[0], _NHWC[4])
    attrs = {"blocksize": int(node.attrs["blocksize"])}
    if node.op_type == "DepthToSpace":
        attrs["mode"] = str(node.attrs.get("mode", "DCR"))
    e.declare(node.outputs[0], _NHWC[4])
    return EspdlNode(node.name, node.op_type, [x], [node.outputs[0]], attrs)


def _resize(e: _Export, node: QNode) -> EspdlNode:
    """Resize on NHWC data; the runtime takes ``(X, roi or "", scales FLOAT[4] in NCHW order)``."""
    source, result = e.values[node.inputs[0]], e.values[node.outputs[0]]
    if source.ndim != 4:
        raise UnsupportedOpError(f"node {node.name!r}: only 4-D Resize can be exported")
    x = e.ensure(node.inputs[0], _NHWC[4])
    scales = np.array([r / s for r, s in zip(result.shape, source.shape)], np.float32)
    attrs = {
        key: node.attrs[key]
        for key in ("mode", "coordinate_transformation_mode", "nearest_mode", "cubic_coeff_a")
        if key in node.attrs
    }
    e.declare(node.outputs[0], _NHWC[4])
    scale_name = e.constant(f"{node.outputs[0]}_scales", scales, "FLOAT", [0])
    return EspdlNode(node.name, "Resize", [x, "", scale_name], [node.outputs[0]], attrs)


def _operand(e: _Export, tensor: str, perm: tuple[int, ...], rank: int) -> str:
    """An element-wise operand in layout ``perm``: constants are permuted in place (after padding their shape
    to the output rank, as broadcasting does), activations through ``ensure``."""
    if tensor in e.model.constants:
        value = np.asarray(e.model.constants[tensor])
        value = value.reshape((1,) * (rank - value.ndim) + value.shape).transpose(perm)
        return e.constant(tensor, value.astype(np.int64), e.int_dtype, _exponent_list(e.model, tensor))
    if e.values[tensor].ndim != len(perm):  # a broadcast activation operand of lower rank
        if perm != _identity(len(perm)) or e.perm(tensor) != _identity(e.values[tensor].ndim):
            raise UnsupportedOpError(
                f"{tensor!r}: a broadcast operand across a layout change (NHWC) cannot be exported yet"
            )
        return e.name(tensor)
    return e.ensure(tensor, perm)


def _same_constant(stored: EspdlTensor, dtype: str, values: np.ndarray, exponents: list[int]) -> bool:
    return (
        stored.dtype == dtype
        and stored.data.shape == values.shape
        and list(stored.exponents) == list(exponents)
        and np.array_equal(stored.data, values)
    )


def _elementwise(e: _Export, node: QNode) -> EspdlNode:
    """Activations, Add / Sub / Mul, Clip and (re)quantization: computed in the first input's layout."""
    first = node.inputs[0]
    rank = e.values[node.outputs[0]].ndim
    # The layout of the first activation operand (a constant first operand takes the other's layout).
    lead = next((t for t in node.inputs[:2] if t and t not in e.model.constants), first)
    perm = e.perm(lead) if e.values[lead].ndim == rank else _identity(rank)
    inputs = [_operand(e, first, perm, rank)]
    attrs: dict[str, Any] = {}
    op_type = node.op_type
    if op_type in _BINARY | _COMPARE:
        inputs.append(_operand(e, node.inputs[1], perm, rank))
    elif op_type == "Clip":
        for tensor in node.inputs[1:3]:
            inputs.append(_operand(e, tensor, (0,), 1) if tensor else "")
        if len(inputs) == 3 and not inputs[2]:
            inputs.pop()
    elif op_type in ("RequantizeLinear", "QuantizeLinear", "DequantizeLinear"):
        inputs += _scale_and_zero_point(e, node)
    elif op_type == "PRelu" and node.table is None:
        return _prelu_per_channel(e, node)
    elif op_type in ("Relu",) and node.table is None:
        if e.model.exponent(first) != e.model.exponent(node.outputs[0]):
            raise UnsupportedOpError(f"node {node.name!r}: a rescaling Relu without a table cannot be exported yet")
    elif op_type in _FLOAT_AT_INT16 and node.table is None and e.bits == 16:
        pass  # the runtime computes it in float32 at int16, as the simulator does (ARITHMETIC.md 8.3)
    elif op_type in _ACTIVATIONS and node.table is None:
        raise UnsupportedOpError(
            f"node {node.name!r}: {op_type} at int{e.bits} (no int8 look-up table) cannot be exported yet"
        )
    if node.table is not None:
        table = f"{op_type}_lut_{e.luts}"
        e.luts += 1
        attrs["lut"] = e.constant(
            table, node.table.reshape(-1).astype(np.int64), e.int_dtype, [e.model.exponent(node.outputs[0])]
        )
        inputs = inputs[:1]
        if e.bits == 16:  # an int16 table is the runtime's LUT module (ESP-PPQ's form, ARITHMETIC.md 8.2)
            attrs.update(int16_lut_step=int(node.attrs["int16_lut_step"]), original_op_type=op_type)
            op_type = "LUT"
    for key in ("alpha", "beta"):
        if key in node.attrs and op_type in ("LeakyRelu", "HardSigmoid", "Elu"):
            attrs[key] = float(node.attrs[key])
    e.declare(node.outputs[0], perm)
    return EspdlNode(node.name, op_type, inputs, [node.outputs[0]], attrs)


def _prelu_per_channel(e: _Export, node: QNode) -> EspdlNode:
    """PRelu with one slope per channel: the runtime applies ``alpha[c]`` along the last axis of an NHWC tensor
    and reads the slope as ``[C, 1, 1]`` at its own exponent (``dl_module_prelu.hpp``)."""
    rank = e.values[node.inputs[0]].ndim
    if rank == 2:
        return _prelu_rows(e, node)
    if rank not in _NHWC:
        raise UnsupportedOpError(f"node {node.name!r}: per-channel PRelu needs a 2-D, 3-D or 4-D input to export")
    x = e.ensure(node.inputs[0], _NHWC[rank])
    slope = np.asarray(e.model.constants[node.inputs[1]]).reshape(-1)
    channels = e.values[node.inputs[0]].shape[1]
    slope = np.broadcast_to(slope, (channels,)).reshape(channels, 1, 1)
    alpha = e.constant(node.inputs[1], slope.astype(np.int64), e.int_dtype, _exponent_list(e.model, node.inputs[1]))
    e.declare(node.outputs[0], _NHWC[rank])
    return EspdlNode(node.name, "PRelu", [x, alpha], [node.outputs[0]], {})


def _prelu_rows(e: _Export, node: QNode) -> EspdlNode:
    """PRelu over ``(N, C)`` rows (after a Gemm: MTCNN's RNet / ONet). ESP-DL's module takes the channel count
    from axis 3 (``dl_module_prelu.hpp``), so the rows pass through it as ``(N, 1, 1, C)`` between two Reshapes;
    with H = W = 1 the NHWC bytes are the rows' bytes."""
    source, target = node.inputs[0], node.outputs[0]
    channels = e.values[source].shape[1]
    rows = _LayoutSteps(e, target, source).add("Reshape", [e.ensure(source, (0, 1))], [-1, 1, 1, channels])
    slope = np.broadcast_to(np.asarray(e.model.constants[node.inputs[1]]).reshape(-1), (channels,))
    alpha = e.constant(
        node.inputs[1],
        slope.reshape(channels, 1, 1).astype(np.int64),
        e.int_dtype,
        _exponent_list(e.model, node.inputs[1]),
    )
    activated = f"{target}__nhwc"
    e.values[activated] = e.values[target].reshape(-1, 1, 1, channels)
    e.twins[activated] = target
    e.declare(activated, _identity(4))
    attrs = {"quant_type": e.quant_type(target)}
    e.nodes.append(EspdlNode(f"{node.name}__nhwc", "PRelu", [rows, alpha], [activated], attrs))
    shape = e.constant(f"{target}__rows", np.array([-1, channels], np.int64), "INT64", [0])
    e.declare(target, _identity(2))
    return EspdlNode(node.name, "Reshape", [activated, shape], [target], {"allowzero": 0})


def _scale_and_zero_point(e: _Export, node: QNode) -> list[str]:
    """Scale and zero point of a (re)quantize node: informational for the runtime (ESPDL_FORMAT.md 4)."""
    source, target = node.inputs[0], node.outputs[0]
    if node.op_type == "DequantizeLinear":
        scale = 2.0 ** e.model.exponent(source)
    elif source in e.model.float_tensors:
        scale = 2.0 ** e.model.exponent(target)
    else:
        scale = 2.0 ** (e.model.exponent(target) - e.model.exponent(source))
    scale_name = e.constant(f"{target}_scale", np.array([scale], np.float32), "FLOAT", [0])
    zero_name = e.constant(f"{target}_zero_point", np.zeros(1, np.int64), e.int_dtype, [0])
    return [scale_name, zero_name]


def _onnx_layout(e: _Export, node: QNode) -> EspdlNode | None:
    """Ops that work in the original ONNX layout; shape-like operands become INT64 inputs."""
    op_type = node.op_type
    if op_type == "Identity":
        e.alias[node.outputs[0]] = e.name(node.inputs[0])
        return None
    if op_type == "Concat":
        parts = [t for t in node.inputs if t]
        perms = {e.perm(t) for t in parts}
        perm = perms.pop() if len(perms) == 1 else _identity(e.values[parts[0]].ndim)
        axis = int(node.attrs.get("axis", 0)) % len(perm)
        e.declare(node.outputs[0], perm)
        inputs = [e.ensure(t, perm) for t in parts]
        return EspdlNode(node.name, "Concat", inputs, [node.outputs[0]], {"axis": perm.index(axis)})
    rank = e.values[node.inputs[0]].ndim
    inputs = [e.ensure(node.inputs[0], _identity(rank))]
    attrs: dict[str, Any] = {}
    if op_type == "Reshape":
        shape = np.asarray(e.model.constants[node.inputs[1]]).astype(np.int64).reshape(-1)
        inputs.append(e.constant(node.inputs[1], shape, "INT64", [0]))
        # ESP-DL's Reshape reads allowzero into an uninitialised int when the attribute is absent and asserts on
        # a 0 target entry unless it reads 0 (dl_module_reshape.hpp); written as ESP-PPQ does, the 0 copies.
        attrs["allowzero"] = 0
    elif op_type in ("Squeeze", "Unsqueeze"):
        axes = node.inputs[1] if len(node.inputs) > 1 and node.inputs[1] else None
        values = np.asarray(e.model.constants[axes] if axes else node.attrs.get("axes", []), np.int64).reshape(-1)
        if op_type == "Unsqueeze" or values.size:
            inputs.append(e.constant(axes or f"{node.outputs[0]}_axes", values, "INT64", [0]))
    elif op_type == "Slice":
        for tensor in node.inputs[1:]:
            if tensor:
                inputs.append(e.constant(tensor, np.asarray(e.model.constants[tensor]).astype(np.int64), "INT64", [0]))
    elif op_type == "Pad":
        if len(node.inputs) > 3 and node.inputs[3]:
            raise UnsupportedOpError(f"node {node.name!r}: Pad with an axes input cannot be exported yet")
        pads = np.asarray(e.model.constants[node.inputs[1]]).astype(np.int64).reshape(-1)
        inputs.append(e.constant(node.inputs[1], pads, "INT64", [0]))
        if len(node.inputs) > 2 and node.inputs[2]:
            inputs.append(_operand(e, node.inputs[2], (0,), 1))
        attrs["mode"] = node.attrs.get("mode", "constant")
    elif op_type in ("Flatten", "Softmax", "LogSoftmax"):
        attrs["axis"] = int(node.attrs.get("axis", 1 if op_type == "Flatten" else -1))
    elif op_type == "ReverseSequence":
        lengths = np.asarray(e.model.constants[node.inputs[1]]).astype(np.int64).reshape(-1)
        inputs.append(e.constant(node.inputs[1], lengths, "INT64", [0]))
        attrs = {key: int(node.attrs.get(key, default)) for key, default in (("batch_axis", 1), ("time_axis", 0))}
    elif op_type == "Transpose":
        attrs["perm"] = list(node.attrs.get("perm", list(range(rank))[::-1]))
    elif op_type == "Split":
        sizes = [e.values[o].shape[int(node.attrs.get("axis", 0)) % rank] for o in node.outputs]
        inputs.append(e.constant(f"{node.outputs[0]}_split", np.asarray(sizes, np.int64), "INT64", [0]))
        attrs["axis"] = int(node.attrs.get("axis", 0)) % rank
        attrs["num_outputs"] = len(node.outputs)
    elif op_type in _REDUCE:
        axes = _reduce_axes(e, node, rank)
        inputs.append(e.constant(f"{node.outputs[0]}_axes", np.asarray(axes, np.int64), "INT64", [0]))
        attrs["keepdims"] = int(node.attrs.get("keepdims", 1))
    elif op_type == "ScatterND":
        indices = np.asarray(e.model.constants[node.inputs[1]]).astype(np.int64)
        dims = np.asarray(e.values[node.inputs[0]].shape[: indices.shape[-1]], dtype=np.int64)
        inputs.append(e.constant(node.inputs[1], indices % dims, "INT64", [0]))  # the runtime has no negative index
        updates = node.inputs[2]
        inputs.append(_operand(e, updates, _identity(e.values[updates].ndim), e.values[updates].ndim))
        attrs["reduction"] = str(node.attrs.get("reduction", "none"))
    elif op_type == "Gather":
        if node.inputs[1] not in e.model.constants:
            raise UnsupportedOpError(f"node {node.name!r}: Gather with run-time indices cannot be exported")
        indices = np.asarray(e.model.constants[node.inputs[1]]).astype(np.int64)
        inputs.append(e.constant(node.inputs[1], indices, "INT64", [0]))
        attrs["axis"] = int(node.attrs.get("axis", 0)) % rank
    for output in node.outputs:
        e.declare(output, _identity(e.values[output].ndim))
    return EspdlNode(node.name, op_type, inputs, list(node.outputs), attrs)


def _normalization(e: _Export, node: QNode) -> EspdlNode:
    """Layer / RMS / Lp normalisation in ONNX layout. The runtime reads Scale and B element by element over the
    normalised axes, so constants are written at that full shape: integers at their own exponents, RMS's
    scale as float32 (dl_module_*_normalization.hpp)."""
    x = node.inputs[0]
    rank = e.values[x].ndim
    axis = int(node.attrs.get("axis", -1)) % rank
    inputs = [e.ensure(x, _identity(rank))]
    normalized = e.values[x].shape[axis:]
    for tensor in node.inputs[1:]:
        if not tensor:
            break
        if tensor not in e.model.constants:
            inputs.append(e.ensure(tensor, _identity(e.values[tensor].ndim)))
            continue
        value = np.broadcast_to(np.asarray(e.model.constants[tensor]), normalized)
        if node.op_type == "RMSNormalization":
            inputs.append(e.constant(tensor, value.astype(np.float32), "FLOAT", [0]))
        else:
            inputs.append(e.constant(tensor, value.astype(np.int64), e.int_dtype, _exponent_list(e.model, tensor)))
    attrs: dict[str, Any] = {"axis": axis}
    if node.op_type == "LpNormalization":
        attrs["p"] = int(node.attrs.get("p", 2))
    else:
        attrs["epsilon"] = float(node.attrs.get("epsilon", 1e-5))
    e.declare(node.outputs[0], _identity(rank))
    return EspdlNode(node.name, node.op_type, inputs, [node.outputs[0]], attrs)


def _reduce_axes(e: _Export, node: QNode, rank: int) -> list[int]:
    """The reduced axes, non-negative; no axes means all of them (``noop_with_empty_axes`` is not written)."""
    if len(node.inputs) > 1 and node.inputs[1]:
        axes = np.asarray(e.model.constants[node.inputs[1]]).reshape(-1).tolist()
    else:
        axes = list(node.attrs.get("axes", []))
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            raise UnsupportedOpError(f"node {node.name!r}: a Reduce that reduces nothing cannot be exported")
        axes = list(range(rank))
    return sorted(int(a) % rank for a in axes)


_EXPORT: dict[str, Callable[[_Export, QNode], EspdlNode | None]] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    **{op: _pool for op in ("MaxPool", "AveragePool", "GlobalAveragePool")},
    "Resize": _resize,
    "GRU": export_recurrent,  # export/espdl_recurrent.py
    "LSTM": export_recurrent,
    **{op: _channels_last for op in _CHANNELS_LAST},
    **{op: _elementwise for op in _INHERIT},
    **{op: _onnx_layout for op in _ONNX_LAYOUT - {"Gemm"}},
    **{op: _normalization for op in ("LayerNormalization", "RMSNormalization", "LpNormalization")},
}
EXPORTABLE_OPS = frozenset(_EXPORT)


def check_exportable(model: QuantizedModel) -> None:
    """Everything that would stop an export, raised before anything is computed or written."""
    profile = model.profile
    per_channel = [name for name, value in model.exponents.items() if isinstance(value, list)]
    if per_channel and not profile.per_channel_weights:
        raise TargetError(
            f"{profile.name} runs per-tensor weights only, but the table gives per-channel exponents to "
            f"{', '.join(sorted(per_channel)[:4])}: calibrate with granularity 'per-tensor' for this chip "
            "(per-channel weights run on esp32p4)."
        )
    unknown = sorted({f"{n.op_type} ({n.name or n.outputs[0]})" for n in model.nodes if n.op_type not in _EXPORT})
    if unknown:
        raise UnsupportedOpError(
            f"cannot export to .espdl yet: {', '.join(unknown)}; exportable op types: {', '.join(sorted(_EXPORT))}."
        )


def _sample_inputs(model: QuantizedModel, float_model: onnx.ModelProto, test_inputs: Any) -> dict[str, np.ndarray]:
    """One sample per input: the first of ``test_inputs`` (float data, quantized as the chip does), or fixed
    pseudo-random integers over the whole integer range (saturation and signs included)."""
    from espquant.graph import tensor_shape

    shapes = {i.name: tensor_shape(i) for i in float_model.graph.input}
    if test_inputs is not None:
        from espquant.calibration.dataset import validated_feeds

        feeds = validated_feeds(float_model, test_inputs, "the test input")
        # One sample: the first row, or the first rows of a model whose first axis is fixed above 1.
        count = {name: (shapes.get(name) or [1])[0] for name in model.inputs}
        first = {
            name: np.asarray(feeds[name])[: count[name] if isinstance(count[name], int) and count[name] > 1 else 1]
            for name in model.inputs
        }
        for name, value in first.items():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise OptionError(f"test_inputs: the first sample of {name!r} holds NaN or Inf.")
        return {name: model.quantize_input(name, value) for name, value in first.items()}
    rng = np.random.default_rng(0)
    samples = {}
    for name in model.inputs:
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in (shapes.get(name) or [])]
        shape[:1] = [1]
        if name in model.float_tensors:
            samples[name] = rng.normal(0, 1, shape).astype(np.float32)
        else:
            samples[name] = rng.integers(qmin(model.bits), qmax(model.bits) + 1, shape)
    return samples


def build_espdl(
    model: QuantizedModel, float_model: onnx.ModelProto, test_inputs: Any = None, check: bool = True
) -> EspdlFile:
    """The ``.espdl`` contents for ``model`` (see the module docstring); ``check`` simulates the result from its
    own contents and refuses it unless it reproduces the in-memory model's integers."""
    from espquant.checker import check_model

    check_model(float_model, target=model.profile.name, bits=model.bits, strict=True)  # the target's own rules
    check_exportable(model)
    inputs = _sample_inputs(model, float_model, test_inputs)
    values = model.run(inputs, keep=True)
    e = _Export(model, values)
    readers = {t: [n for n in model.nodes if t in n.inputs] for t in model.inputs}
    for name in model.inputs:
        rank = values[name].ndim
        first = readers[name][0] if readers[name] else None
        nhwc = first is not None and first.op_type in _CONV_LIKE and rank in _NHWC
        e.declare(name, _NHWC[rank] if nhwc else _identity(rank))
    used: set[str] = set()
    for node in model.nodes:
        e.bits = node.bits
        converted = _EXPORT[node.op_type](e, node)
        if converted is None:
            continue
        converted.attributes["quant_type"] = e.quant_type(node.outputs[0])
        # Float output, but the module picks its kernel from quant_type: it must name the input's width (ESP-DL's
        # Softmax reads an int8 input as float32 under F32, dl_module_softmax.hpp).
        if node.op_type in ("DequantizeLinear", "Softmax", "LogSoftmax") or node.op_type in _COMPARE:
            converted.attributes["quant_type"] = e.quant_type(node.inputs[0])
        converted.name = converted.name or f"{node.op_type}_{len(e.nodes)}"
        while converted.name in used:  # e.g. two RequantizeLinear nodes before one Add
            converted.name += "_"
        used.add(converted.name)
        e.nodes.append(converted)
    outputs = [e.name(o) for o in model.outputs]
    test_in = {name: _test_tensor(e, name, values[name], e.declared[name]) for name in model.inputs}
    test_out = {}
    for original, stored in zip(model.outputs, outputs):
        test_out[stored] = _test_tensor(e, stored, values[original], e.declared[stored])
    espdl = EspdlFile(
        path="",
        container="EDL2",
        ir_version=int(float_model.ir_version),
        metadata={
            "target": model.profile.name,
            "producer": f"espquant {__version__}",
            # Where a graph input / output is stored permuted: its axes as ONNX axes (read by onnx_layout).
            **{f"{LAYOUT_KEY}{name}": ",".join(map(str, e.layout[name])) for name in [*model.inputs, *outputs]},
        },
        graph_name=float_model.graph.name or "main_graph",
        nodes=e.nodes,
        initializers=e.initializers,
        inputs=[e.declared[name] for name in model.inputs],
        outputs=[e.declared[name] for name in outputs],
        values=dict(e.declared),
        test_inputs=test_in,
        test_outputs=test_out,
    )
    decoded = decode_espdl(encode_espdl(espdl), "the exported file")  # the bytes as the chip will read them
    if check:
        _self_check(decoded, model)
    espdl.metadata[DIGEST_KEY] = content_digest(decoded)
    return espdl


def _test_tensor(e: _Export, name: str, value: np.ndarray, declared: EspdlValue) -> EspdlTensor:
    perm = e.layout[name]
    data = np.transpose(value, perm)
    dtype = {"INT8": "INT8", "INT16": "INT16", "BOOL": "BOOL"}.get(declared.dtype, "FLOAT")
    data = data.astype(np.float32) if dtype == "FLOAT" else data.astype(np.bool_ if dtype == "BOOL" else np.int64)
    return EspdlTensor(name, dtype, tuple(int(d) for d in data.shape) or (1,), data, list(declared.exponents))


def _self_check(espdl: EspdlFile, model: QuantizedModel) -> None:
    from espquant.simulator.espdl_model import EspdlModel, compare_output

    simulated = EspdlModel(espdl, model.profile).run({n: t.data for n, t in espdl.test_inputs.items()})
    for name, expected in espdl.test_outputs.items():
        same, detail = compare_output(simulated[name], expected.data)
        if not same:
            raise ModelError(
                f"internal error: the exported graph does not reproduce output {name!r} ({detail}); nothing was "
                "written. Please report this with the model."
            )


def export_espdl(
    model: QuantizedModel,
    float_model: onnx.ModelProto,
    path: str | os.PathLike[str],
    test_inputs: Any = None,
    force: bool = False,
) -> Path:
    """Write ``model`` as an ``.espdl`` file at ``path`` (atomically); an existing file needs ``force``."""
    target = Path(path)
    if target.exists() and not force:
        raise OptionError(f"{target} exists; pass force=True (--force on the command line) to overwrite it.")
    if not target.parent.is_dir():  # refused before the work of building the file
        raise OutputError(f"{target}: the folder {target.parent} does not exist; create it or choose another path.")
    espdl = build_espdl(model, float_model, test_inputs)
    write_espdl(espdl, target)  # atomic; a read-only folder or a full disk is an OutputError naming the path
    return target
