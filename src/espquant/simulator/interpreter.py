"""The interpreter: one numpy function per op type of the integer model, the reference path of the simulator
(``QuantizedModel.run_node``). The compiled path must give exactly these integers.

The graph keeps ONNX's layout (NCHW); conv-like kernels are called on NHWC views, which changes no value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import helper

from espquant.quant.pot import EXACT_FLOAT32
from espquant.quant.rounding import round_float, saturate, wrap
from espquant.simulator import kernels, normalization
from espquant.simulator.activations import FLOAT_FUNCTIONS, float_function, float_path
from espquant.simulator.recurrent import run_gru, run_lstm
from espquant.simulator.reductions import REDUCE_KINDS, reduce_integer

if TYPE_CHECKING:
    from espquant.simulator.quantized_model import QNode, QuantizedModel

__all__ = ["RUN", "FLOAT_RUN", "UNBLOCK_MATRIX", "table_lookup", "simulated_ops", "missing_kernels"]

F32 = np.float32
# Pseudo-op of the ``.espdl`` front end: a run-time MatMul operand back from the weight byte order.
UNBLOCK_MATRIX = "UnblockMatrix"


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, 1, -1)


def _nchw(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, -1, 1)


def _shift(m: QuantizedModel, out: str, e_in: int, weight: str) -> np.ndarray | int:
    e_w = m.exponents[weight]
    if isinstance(e_w, list):
        return m.exponent(out) - e_in - np.asarray(e_w, dtype=np.int64)
    return m.exponent(out) - e_in - e_w


def _conv_operands(node: QNode, env: dict[str, np.ndarray]) -> dict[str, Any]:
    """Input, weight, bias and geometry of a Conv / ConvTranspose node, 1-D lifted to 2-D (H = 1)."""
    x, w = env[node.inputs[0]], env[node.inputs[1]]
    one_d = x.ndim == 3
    if one_d:
        x, w = x[:, :, None, :], w[:, :, None, :]
    axes = 1 if one_d else 2
    pads = list(node.attrs.get("pads", [0] * 2 * axes))
    strides = list(node.attrs.get("strides", [1] * axes))
    dilations = list(node.attrs.get("dilations", [1] * axes))
    extra = list(node.attrs.get("output_padding", [0] * axes))
    if one_d:
        pads, strides, dilations, extra = [0, pads[0], 0, pads[1]], [1, *strides], [1, *dilations], [0, *extra]
    bias = env[node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2] else None
    return {
        "x": x,
        "w": w,
        "bias": bias,
        "one_d": one_d,
        "pads": pads,
        "strides": strides,
        "dilations": dilations,
        "output_padding": extra,
    }


def _conv(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    o = _conv_operands(node, env)
    out = _integer_conv(
        m, node, o["x"], o["w"], o["bias"], o["strides"], o["pads"], o["dilations"], int(node.attrs.get("group", 1))
    )
    return [out[:, :, 0, :] if o["one_d"] else out]


def _integer_conv(
    m: QuantizedModel,
    node: QNode,
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None,
    strides: list[int],
    pads: list[int],
    dilations: list[int],
    group: int,
) -> np.ndarray:
    """A 2-D convolution on NCHW integers as the chip computes it: exact sums (onnxruntime float32 when provably
    exact, else the numpy kernel with lane emulation), shift, fused ReLU, saturation."""
    shift = _shift(m, node.outputs[0], m.exponent(node.inputs[0]), node.inputs[1])
    sums = _float32_conv_sums(m, node, x, w, bias, strides, pads, dilations, group)
    if sums is not None:
        start = 0 if bias is None else bias.reshape(1, -1, 1, 1)
        channel_shift = shift.reshape(1, -1, 1, 1) if isinstance(shift, np.ndarray) else shift
        return kernels._finish(sums + start, channel_shift, node.relu, node.bits, m.profile)
    depthwise = group > 1
    weight = w[:, 0] if depthwise else np.moveaxis(w, 1, -1)  # (N, KH, KW[, C])
    out = kernels.conv2d_nhwc(
        _nhwc(x),
        weight,
        bias,
        strides=strides,
        pads=pads,
        dilations=dilations,
        depthwise=depthwise,
        shift=shift,
        relu=node.relu,
        bits=node.bits,
        profile=m.profile,
    )
    return _nchw(out)


def _conv_transpose(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    """ConvTranspose as ESP-DL runs it: InsertZeros (stride - 1 zeros between pixels) then a stride-1 Conv
    with the kernel flipped and its channel axes swapped (group 1)."""
    o = _conv_operands(node, env)
    x, w, strides, dilations, pads, extra = o["x"], o["w"], o["strides"], o["dilations"], o["pads"], o["output_padding"]
    batch, channels, height, width = x.shape
    kh, kw = w.shape[2:]
    inserted = np.zeros((batch, channels, (height - 1) * strides[0] + 1, (width - 1) * strides[1] + 1), np.int64)
    inserted[:, :, :: strides[0], :: strides[1]] = x
    begin = [dilations[0] * (kh - 1) - pads[0], dilations[1] * (kw - 1) - pads[1]]
    end = [dilations[0] * (kh - 1) - pads[2] + extra[0], dilations[1] * (kw - 1) - pads[3] + extra[1]]
    grow = [max(v, 0) for v in (*begin, *end)]
    padded = np.pad(inserted, [(0, 0), (0, 0), (grow[0], grow[2]), (grow[1], grow[3])])
    crop = [max(-v, 0) for v in (*begin, *end)]
    padded = padded[:, :, crop[0] : padded.shape[2] - crop[2], crop[1] : padded.shape[3] - crop[3]]
    flipped = np.ascontiguousarray(np.flip(w, axis=(2, 3)).transpose(1, 0, 2, 3))  # (C_out, C_in, KH, KW)
    out = _integer_conv(m, node, padded, flipped, o["bias"], [1, 1], [0, 0, 0, 0], dilations, 1)
    return [out[:, :, 0, :] if o["one_d"] else out]


def _float32_conv_sums(
    m: QuantizedModel,
    node: QNode,
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None,
    strides: list[int],
    pads: list[int],
    dilations: list[int],
    group: int,
) -> np.ndarray | None:
    """The integer sums of a convolution computed by onnxruntime's float32 Conv, or None when not provably exact.

    Every product and partial sum is an integer below ``max|x| * max_n sum|w_n| < 2**24``, so float32
    represents each exactly whatever order the kernel adds them in. Also required: no accumulator lane can
    saturate on this data (``sum |x||w| + |bias|`` below the narrowest lane, computed the same exact way),
    else the numpy path emulates the lanes.
    """
    x_max = max(int(x.max(initial=0)), -int(x.min(initial=0)))
    magnitudes = np.abs(w.astype(np.int64))
    products = float(x_max) * float(magnitudes.reshape(w.shape[0], -1).sum(axis=1).max(initial=0))
    if products >= EXACT_FLOAT32:
        return None
    bias_max = 0 if bias is None else max(int(bias.max(initial=0)), -int(bias.min(initial=0)))
    limit = 2.0 ** (min(m.profile.conv_acc_bits[node.bits], m.profile.tail_acc_bits[node.bits]) - 1)
    if products + bias_max >= limit:
        # The worst case could reach a lane's rail: check this data's own bound, sum |x||w| per output.
        bound = _conv_session(m, node.outputs[0] + "|abs", magnitudes, x.shape[1:], strides, pads, dilations, group)
        reach = bound.run(None, {"x": np.abs(x).astype(np.float32)})[0].max(initial=0)
        if float(reach) + bias_max >= limit:
            return None  # a lane does saturate: the numpy path emulates it tap by tap
    conv = _conv_session(m, node.outputs[0], w, x.shape[1:], strides, pads, dilations, group)
    return conv.run(None, {"x": x.astype(np.float32)})[0].astype(np.int64)


def _conv_session(
    m: QuantizedModel,
    key: str,
    w: np.ndarray,
    input_shape: tuple[int, ...],
    strides: list[int],
    pads: list[int],
    dilations: list[int],
    group: int,
) -> Any:
    """An onnxruntime session computing ``Conv(x, w)`` in float32, cached on the model under ``key`` (the
    node's output tensor name: unique, unlike node names)."""
    session = m._sessions.get(key)
    if session is None:
        from espquant.runtime import create_session

        conv = helper.make_node("Conv", ["x", "w"], ["y"], strides=strides, pads=pads, dilations=dilations, group=group)
        graph = helper.make_graph(
            [conv],
            "conv_sums",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", *input_shape])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
            [onnx.numpy_helper.from_array(w.astype(np.float32), "w")],
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        # Its runs alternate with the interpreter's numpy kernels: sleeping workers (runtime.create_session).
        session = create_session(proto, threads=m.threads, what="a convolution sum graph", spinning=False)
        m._sessions[key] = session
    return session


def _gemm(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``A (..., K) x B (K, N) + bias``: ONNX's 2-D Gemm, and ESP-DL's, which contracts the last axis of any
    rank (``.espdl`` files)."""
    a = env[node.inputs[0]]
    b = env[node.inputs[1]]
    b = b.T if node.attrs.get("transB", 0) else b
    bias = env[node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2] else None
    if bias is not None:  # C may be (N,), (1, N) (skl2onnx's intercepts) or a scalar
        flat = bias.reshape(-1)
        bias = np.broadcast_to(flat, (b.shape[1],)) if flat.size in (1, b.shape[1]) else flat
    rows = a.reshape(-1, a.shape[-1]).astype(np.int64)
    acc = kernels._accumulate(rows, b.astype(np.int64), bias, node.bits, m.profile)
    shift = _shift(m, node.outputs[0], m.exponent(node.inputs[0]), node.inputs[1])
    return [kernels._finish(acc, shift, node.relu, node.bits, m.profile).reshape(*a.shape[:-1], b.shape[1])]


def _matmul(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    a, b = env[node.inputs[0]], env[node.inputs[1]]
    shift = m.exponent(node.outputs[0]) - m.exponent(node.inputs[0]) - m.exponent(node.inputs[1])
    return [kernels.matmul_slices(a, b, shift=shift, relu=node.relu, bits=node.bits, profile=m.profile)]


def _binary(op):
    def run(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [op(env[node.inputs[0]], env[node.inputs[1]], node.bits)]

    return run


def _pool(kind: str):
    def run(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
        x = env[node.inputs[0]]
        one_d = x.ndim == 3
        x4 = x[:, :, None, :] if one_d else x
        args = kernels.pool_arguments(node.attrs, x4.shape[2:4], kind == "global")
        if one_d and kind != "global":
            args = {
                "kernel": [1, *args["kernel"]],
                "strides": [1, *args["strides"]],
                "pads": [0, args["pads"][0], 0, args["pads"][1]],
            }
        if kind == "max":
            out = kernels.max_pool_nhwc(_nhwc(x4), **args)
        else:
            out = kernels.average_pool_nhwc(
                _nhwc(x4),
                **args,
                e_in=m.exponent(node.inputs[0]),
                e_out=m.exponent(node.outputs[0]),
                bits=node.bits,
                profile=m.profile,
            )
        out = _nchw(out)
        return [out[:, :, 0, :] if one_d else out]

    return run


def table_lookup(m: QuantizedModel, node: QNode, x: np.ndarray) -> np.ndarray:
    """The runtime's LUT module: ``T[q + 128]`` at int8, the int16 table rule at int16 (ARITHMETIC.md 8.1, 8.2)."""
    assert node.table is not None
    if node.bits == 8:
        return kernels.lut_int8(x, node.table)
    return kernels.lut_int16(
        x,
        node.table,
        interpolate=bool(node.attrs.get("int16_lut_interpolate")),
        half_even=m.profile.rounding == "half_even",
    )


def _activation(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    x = env[node.inputs[0]]
    e_in, e_out = m.exponent(node.inputs[0]), m.exponent(node.outputs[0])
    if node.op_type == "Relu" and e_in == e_out:
        return [np.maximum(x, 0)]
    fn = float_function(node.op_type, node.attrs)
    return [float_path(fn, x, e_in, e_out, node.bits, m.profile.rounding)]


def _clip(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    x = env[node.inputs[0]]
    e_in, e_out = m.exponent(node.inputs[0]), m.exponent(node.outputs[0])
    low = env[node.inputs[1]] if len(node.inputs) > 1 and node.inputs[1] else None
    high = env[node.inputs[2]] if len(node.inputs) > 2 and node.inputs[2] else None
    clamped = np.clip(x, low, high)
    if e_in == e_out:
        return [clamped]
    scaled = (clamped.astype(F32) * F32(2.0 ** (e_in - e_out))).astype(F32)
    return [saturate(round_float(scaled, m.profile.rounding), node.bits)]


def _requantize(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    x = env[node.inputs[0]]
    return [kernels.requantize(x, m.exponent(node.outputs[0]) - m.exponent(node.inputs[0]), node.bits, m.profile)]


def _quantize_linear(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    """QuantizeLinear runs the same module as RequantizeLinear: float -> int, or int -> int (6)."""
    if node.inputs[0] in m.float_tensors:
        x = env[node.inputs[0]]
        return [kernels.quantize_float(x, e_out=m.exponent(node.outputs[0]), bits=node.bits, profile=m.profile)]
    return _requantize(m, node, env)


def _dequantize_linear(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    """int -> float32: ``q * 2^e`` (6)."""
    x = env[node.inputs[0]]
    return [(x.astype(F32) * F32(2.0 ** m.exponent(node.inputs[0]))).astype(F32)]


def _softmax(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    x = env[node.inputs[0]]
    if node.inputs[0] in m.float_tensors:  # a float input (an F32 edge of a file): plain float Softmax
        return [kernels.softmax_float(x, axis=int(node.attrs.get("axis", -1)), e_in=None, bits=None)]
    bits = m.width(node.inputs[0])
    return [kernels.softmax_float(x, axis=int(node.attrs.get("axis", -1)), e_in=m.exponent(node.inputs[0]), bits=bits)]


def _reshape(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    x = env[node.inputs[0]]
    shape = [x.shape[i] if int(d) == 0 else int(d) for i, d in enumerate(env[node.inputs[1]].reshape(-1))]
    return [x.reshape(shape)]


def _flatten(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    x = env[node.inputs[0]]
    axis = int(node.attrs.get("axis", 1)) % (x.ndim + 1) if x.ndim else 0
    return [x.reshape(int(np.prod(x.shape[:axis])), -1)]


def _transpose(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    x = env[node.inputs[0]]
    return [np.transpose(x, node.attrs.get("perm", list(range(x.ndim))[::-1]))]


def _concat(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [np.concatenate([env[t] for t in node.inputs if t], axis=int(node.attrs.get("axis", 0)))]


def _axes(node: QNode, env: dict[str, np.ndarray]) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1]:
        return [int(a) for a in env[node.inputs[1]].reshape(-1)]
    return list(node.attrs["axes"]) if "axes" in node.attrs else None


def _squeeze(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Squeeze the listed axes of size 1 (the runtime keeps a listed axis of another size,
    ``dl_module_squeeze.hpp``; ONNX would refuse it), or every axis of size 1."""
    x = env[node.inputs[0]]
    axes = _axes(node, env)
    if axes is None:
        return [np.squeeze(x)]
    return [np.squeeze(x, axis=tuple(a % x.ndim for a in axes if x.shape[a % x.ndim] == 1))]


def _unsqueeze(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    x = env[node.inputs[0]]
    axes = _axes(node, env) or []
    rank = x.ndim + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = np.expand_dims(x, axis)
    return [x]


def _identity(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [env[node.inputs[0]]]


def _reduce(kind: str):
    def run(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
        x = env[node.inputs[0]]
        axes = _axes(node, env)
        axis = tuple(range(x.ndim)) if not axes else tuple(sorted(a % x.ndim for a in axes))
        e_in, e_out = m.exponent(node.inputs[0]), m.exponent(node.outputs[0])
        keepdims = bool(node.attrs.get("keepdims", 1))
        common = dict(keepdims=keepdims, e_in=e_in, e_out=e_out, bits=node.bits, rounding=m.profile.rounding)
        return [reduce_integer(kind, x, axis, **common)]

    return run


def _slice(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    x = env[node.inputs[0]]
    starts, ends = (env[node.inputs[i]].reshape(-1).tolist() for i in (1, 2))
    axes = env[node.inputs[3]].reshape(-1).tolist() if len(node.inputs) > 3 and node.inputs[3] else range(len(starts))
    steps = env[node.inputs[4]].reshape(-1).tolist() if len(node.inputs) > 4 and node.inputs[4] else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[int(axis) % x.ndim] = slice(*slice(int(start), int(end), int(step)).indices(x.shape[int(axis) % x.ndim]))
    return [x[tuple(index)]]


def _pad(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    x = env[node.inputs[0]]
    pads = [int(p) for p in env[node.inputs[1]].reshape(-1)]
    axes = env[node.inputs[3]].reshape(-1).tolist() if len(node.inputs) > 3 and node.inputs[3] else range(x.ndim)
    widths = [(0, 0)] * x.ndim
    count = len(pads) // 2
    for k, axis in enumerate(axes):
        widths[int(axis) % x.ndim] = (pads[k], pads[k + count])
    mode = node.attrs.get("mode", "constant")
    if mode == "constant":
        value = env[node.inputs[2]].reshape(-1)[0] if len(node.inputs) > 2 and node.inputs[2] else 0
        return [np.pad(x, widths, mode="constant", constant_values=value)]
    return [np.pad(x, widths, mode="edge" if mode == "edge" else "reflect")]


def _resize(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    x = env[node.inputs[0]]
    if len(node.inputs) > 2 and node.inputs[2] and env[node.inputs[2]].size:
        scales = env[node.inputs[2]].reshape(-1).astype(float)
    else:
        sizes = env[node.inputs[3]].reshape(-1)
        scales = sizes / np.array(x.shape, dtype=float)
    common = dict(e_in=m.exponent(node.inputs[0]), e_out=m.exponent(node.outputs[0]), bits=node.bits, profile=m.profile)
    if node.attrs.get("mode", "nearest") == "linear":
        align = node.attrs.get("coordinate_transformation_mode") == "align_corners"
        out = kernels.resize_linear_nhwc(
            _nhwc(x), scale_h=float(scales[2]), scale_w=float(scales[3]), align_corners=align, **common
        )
    else:
        out = kernels.resize_nearest_nhwc(_nhwc(x), scale_h=float(scales[2]), scale_w=float(scales[3]), **common)
    return [_nchw(out)]


def _arith(kernel):
    def run(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
        a, b = node.inputs
        return [
            kernel(
                env[a],
                env[b],
                e_a=m.exponent(a),
                e_b=m.exponent(b),
                e_out=m.exponent(node.outputs[0]),
                bits=node.bits,
                profile=m.profile,
            )
        ]

    return run


def _prelu(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    x, slope = env[node.inputs[0]], env[node.inputs[1]]
    if node.table is not None:
        return [kernels.lut_int8(x, node.table)]
    return [
        kernels.prelu_per_channel(
            x,
            slope,
            e_in=m.exponent(node.inputs[0]),
            e_out=m.exponent(node.outputs[0]),
            e_slope=m.exponent(node.inputs[1]),
            bits=node.bits,
            profile=m.profile,
        )
    ]


def _neg(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [wrap(-env[node.inputs[0]].astype(np.int64), node.bits)]  # no saturation: -(-128) wraps to -128


def _compare(op):
    def run(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [op(env[node.inputs[0]], env[node.inputs[1]])]

    return run


def _split(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    x = env[node.inputs[0]]
    axis = int(node.attrs.get("axis", 0)) % x.ndim
    if len(node.inputs) > 1 and node.inputs[1]:
        sizes = [int(v) for v in env[node.inputs[1]].reshape(-1)]
    elif "split" in node.attrs:
        sizes = list(node.attrs["split"])
    else:
        count = len(node.outputs)
        chunk = -(-x.shape[axis] // count)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(count)]
    return np.split(x, np.cumsum(sizes)[:-1], axis=axis)


def _gather(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    x, indices = env[node.inputs[0]], env[node.inputs[1]].astype(np.int64)
    axis = int(node.attrs.get("axis", 0)) % x.ndim
    return [np.take(x, np.where(indices < 0, indices + x.shape[axis], indices), axis=axis)]


def _depth_to_space(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    x = env[node.inputs[0]]
    b, c, h, w = x.shape
    size = int(node.attrs["blocksize"])
    if node.attrs.get("mode", "DCR") == "DCR":
        y = x.reshape(b, size, size, c // size**2, h, w).transpose(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(b, c // size**2, size, size, h, w).transpose(0, 1, 4, 2, 5, 3)
    return [y.reshape(b, c // size**2, h * size, w * size)]


def _space_to_depth(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    x = env[node.inputs[0]]
    b, c, h, w = x.shape
    size = int(node.attrs["blocksize"])
    # ONNX orders the output channels block-major; ESP-DL's kernel channel-major, out_c = c * size^2 + offset
    # (dl_module_space_to_depth.hpp): the .espdl front end asks for that order, the checker keeps ONNX models
    # where both agree (one channel).
    order = (0, 1, 3, 5, 2, 4) if node.attrs.get("channel_major") else (0, 3, 5, 1, 2, 4)
    y = x.reshape(b, c, h // size, size, w // size, size).transpose(order)
    return [y.reshape(b, c * size**2, h // size, w // size)]


def _log_softmax(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    probabilities = _softmax(m, node, env)[0]
    with np.errstate(divide="ignore"):
        return [np.log(probabilities).astype(F32)]


def _unblock_matrix(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    """A run-time MatMul operand of a ``.espdl`` file: every ``K x N`` slice in the target's weight byte order
    (the file's own Reshape / Transpose nodes produced it), made plain ``(..., K, N)`` again."""
    from espquant.espdl.layouts import decode_kn_matrix

    x = env[node.inputs[0]]
    if x.ndim < 2:  # a vector operand has no byte order of its own
        return [x]
    k, n = x.shape[-2], x.shape[-1]
    bits, blocked = int(node.attrs["bits"]), bool(node.attrs["blocked"])
    slices = [decode_kn_matrix(s, k, n, bits, blocked) for s in x.reshape(-1, k * n)]
    return [np.stack(slices).reshape(x.shape)]


def _insert_zeros(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    """ESP-DL's InsertZeros on a channels-last tensor (a ``.espdl`` ConvTranspose's first half)."""
    x = env[node.inputs[0]]
    return [kernels.insert_zeros_channels_last(x, node.attrs.get("stride", [1]), node.attrs.get("output_padding", []))]


def _reverse_sequence(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Reverse the first ``sequence_lens[b]`` steps along the time axis of every batch entry."""
    x = env[node.inputs[0]].copy()
    lengths = env[node.inputs[1]].reshape(-1)
    batch_axis, time_axis = int(node.attrs.get("batch_axis", 1)), int(node.attrs.get("time_axis", 0))
    moved = np.moveaxis(x, (batch_axis, time_axis), (0, 1))
    for b, length in enumerate(lengths.tolist()):
        moved[b, : int(length)] = moved[b, : int(length)][::-1].copy()
    return [np.moveaxis(moved, (0, 1), (batch_axis, time_axis))]


def _scatter_nd(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Slices of ``updates`` written into a copy of ``data`` one by one, in order (dl_module_scatter_nd.hpp):
    ``add`` saturates the integer sum, ``max`` / ``min`` compare integers (the exponents are shared)."""
    data = env[node.inputs[0]].copy()
    indices = env[node.inputs[1]].astype(np.int64)
    depth = indices.shape[-1]
    positions = indices.reshape(-1, depth) % np.asarray(data.shape[:depth], dtype=np.int64)
    updates = env[node.inputs[2]].reshape(len(positions), *data.shape[depth:])
    reduction = node.attrs.get("reduction", "none")
    for where, update in zip(map(tuple, positions.tolist()), updates):
        if reduction == "add":
            data[where] = saturate(data[where].astype(np.int64) + update, node.bits)
        elif reduction == "max":
            data[where] = np.maximum(data[where], update)
        elif reduction == "min":
            data[where] = np.minimum(data[where], update)
        else:
            data[where] = update
    return [data]


def _streaming_cache(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    """ESP-DL's StreamingCache (dl_module_streaming_cache.hpp): the bytes of the last ``window_size - 1``
    frames, then the input, as one tensor with ``window_size - 1`` more frames; the cache (zeros at first)
    becomes the tail of that tensor. Each batch entry is one call on the chip, in order, and the cache lives
    on in the model until ``reset()``."""
    x = env[node.inputs[0]]
    window = int(node.attrs.get("window_size", 1))
    axis = int(node.attrs.get("frame_axis", 1))
    outputs = []
    for sample in np.split(x, x.shape[0], axis=0) if x.ndim and x.shape[0] > 1 else [x]:
        shape = list(sample.shape)
        shape[axis % sample.ndim] += window - 1
        cached = m.state.get(node.name)
        if cached is None:
            cached = np.zeros(int(np.prod(shape)) - sample.size, dtype=np.int64)
        joined = np.concatenate([cached, sample.reshape(-1).astype(np.int64)])
        m.state[node.name] = joined[sample.size :]
        outputs.append(joined.reshape(shape))
    return [np.concatenate(outputs, axis=0)]


def _optional(node: QNode, env: dict[str, np.ndarray], position: int) -> np.ndarray | None:
    return env[node.inputs[position]] if len(node.inputs) > position and node.inputs[position] else None


def _layer_normalization(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    scale, bias = _optional(node, env, 1), _optional(node, env, 2)
    return [
        normalization.layer_normalization(
            env[node.inputs[0]],
            scale,
            bias,
            axis=int(node.attrs.get("axis", -1)),
            epsilon=float(node.attrs.get("epsilon", 1e-5)),
            e_in=m.exponent(node.inputs[0]),
            e_scale=m.exponent(node.inputs[1]) if scale is not None else 0,
            e_bias=m.exponent(node.inputs[2]) if bias is not None else 0,
            e_out=m.exponent(node.outputs[0]),
            bits=node.bits,
            rounding=m.profile.rounding,
        )
    ]


def _rms_normalization(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [
        normalization.rms_normalization(
            env[node.inputs[0]],
            env[node.inputs[1]],
            axis=int(node.attrs.get("axis", -1)),
            epsilon=float(node.attrs.get("epsilon", 1e-5)),
            e_in=m.exponent(node.inputs[0]),
            e_out=m.exponent(node.outputs[0]),
            bits=node.bits,
            rounding=m.profile.rounding,
        )
    ]


def _lp_normalization(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [
        normalization.lp_normalization(
            env[node.inputs[0]],
            axis=int(node.attrs.get("axis", -1)),
            p=int(node.attrs.get("p", 2)),
            e_out=m.exponent(node.outputs[0]),
            bits=node.bits,
            rounding=m.profile.rounding,
        )
    ]


def _float_unary(fn: Any) -> Any:
    def run(x: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return np.asarray(fn(x.astype(F32)), dtype=F32)

    return run


# Nodes whose inputs and output are float32 (``quant_type`` F32 in a file): the runtime's float modules.
FLOAT_RUN = {
    "Add": lambda a, b: (a.astype(F32) + b.astype(F32)).astype(F32),
    "Sub": lambda a, b: (a.astype(F32) - b.astype(F32)).astype(F32),
    "Mul": lambda a, b: (a.astype(F32) * b.astype(F32)).astype(F32),
    "Relu": _float_unary(lambda x: np.maximum(x, F32(0))),
    "Exp": _float_unary(float_function("Exp", {})),
    "Log": _float_unary(np.log),
    "Sqrt": _float_unary(np.sqrt),
    "Sigmoid": _float_unary(float_function("Sigmoid", {})),
    "Tanh": _float_unary(np.tanh),
    "Clip": lambda x, low=None, high=None: np.clip(x, low, high).astype(F32),
}

RUN = {
    "ConvTranspose": _conv_transpose,
    "InsertZeros": _insert_zeros,
    UNBLOCK_MATRIX: _unblock_matrix,
    "LUT": _activation,
    "ReverseSequence": _reverse_sequence,
    "GRU": run_gru,  # simulator/recurrent.py
    "LSTM": run_lstm,
    "LayerNormalization": _layer_normalization,
    "ScatterND": _scatter_nd,
    "StreamingCache": _streaming_cache,
    "RMSNormalization": _rms_normalization,
    "LpNormalization": _lp_normalization,
    "Div": _arith(kernels.div),
    "Pow": _arith(kernels.pow_float),
    "Mod": _arith(kernels.mod_float),
    "PRelu": _prelu,
    "Neg": _neg,
    "Greater": _compare(np.greater),
    "GreaterOrEqual": _compare(np.greater_equal),
    "Less": _compare(np.less),
    "LessOrEqual": _compare(np.less_equal),
    "Equal": _compare(np.equal),
    "Split": _split,
    "Gather": _gather,
    "DepthToSpace": _depth_to_space,
    "SpaceToDepth": _space_to_depth,
    "LogSoftmax": _log_softmax,
    "Slice": _slice,
    "Pad": _pad,
    "Resize": _resize,
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Add": _binary(kernels.add),
    "Sub": _binary(kernels.sub),
    "Mul": _arith(kernels.mul),
    "MaxPool": _pool("max"),
    "AveragePool": _pool("average"),
    "GlobalAveragePool": _pool("global"),
    "Relu": _activation,
    **{op: _activation for op in FLOAT_FUNCTIONS if op != "Relu"},
    "Clip": _clip,
    "RequantizeLinear": _requantize,
    "QuantizeLinear": _quantize_linear,
    "DequantizeLinear": _dequantize_linear,
    "Softmax": _softmax,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Concat": _concat,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Identity": _identity,
    **{op_type: _reduce(kind) for op_type, kind in REDUCE_KINDS.items()},
}


def simulated_ops() -> set[str]:
    """Op types this simulator runs from an ONNX model."""
    return set(RUN)


def missing_kernels(model: onnx.ModelProto) -> list[str]:
    """Op types of ``model`` the simulator cannot run yet."""
    return sorted({n.op_type for n in model.graph.node} - set(RUN))
