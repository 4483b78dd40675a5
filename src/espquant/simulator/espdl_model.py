"""Run ESP-DL ``.espdl`` models with the simulator: what the chip computes, from the file alone.

``load_espdl(path, target=None)`` decodes the file and binds it to a target profile (from the file's
``target`` metadata, or the ``target`` argument). ``model.run({name: int array})`` executes the nodes in file
order with the integer kernels and returns every graph output in the file's layout.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from espquant.errors import ModelError, TargetError, UnsupportedOpError
from espquant.export.espdl_reader import EspdlFile, EspdlNode, EspdlTensor, EspdlValue, read_espdl
from espquant.quant.profiles import TargetProfile, get_target
from espquant.quant.rounding import round_float, saturate
from espquant.simulator import kernels
from espquant.simulator.layouts import decode_conv_weight, decode_depthwise_weight, decode_kn_matrix

__all__ = ["EspdlModel", "load_espdl", "Value", "compare_output", "FLOAT_ULP"]

# Float outputs stored in reference files are host (PyTorch) values: compared within this many float32 ulp.
FLOAT_ULP = 8

_BITS = {"S8": 8, "S16": 16}
_INT_DTYPES = {"INT8": np.int8, "INT16": np.int16}
_PROFILE_ALIASES = {"c": "esp32"}


@dataclass
class Value:
    """A runtime tensor: integers (or floats for F32 edges) with their exponent."""

    data: np.ndarray
    exponent: int


class EspdlModel:
    """A decoded ``.espdl`` file bound to a target profile, runnable with the integer kernels."""

    def __init__(self, decoded: EspdlFile, profile: TargetProfile) -> None:
        self.file = decoded
        self.profile = profile

    @property
    def inputs(self) -> list[EspdlValue]:
        return self.file.inputs

    @property
    def outputs(self) -> list[EspdlValue]:
        return self.file.outputs

    @property
    def test_values(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
        """The embedded test inputs and expected outputs, or None when the file has none."""
        if not self.file.test_inputs:
            return None
        return (
            {name: t.data for name, t in self.file.test_inputs.items()},
            {name: t.data for name, t in self.file.test_outputs.items()},
        )

    def onnx_layout(self, name: str) -> tuple[int, ...] | None:
        """For a graph input or output of a file espquant exported: the permutation that takes the ONNX
        model's tensor to the file's layout (``np.transpose(onnx_array, perm)``), e.g. ``(0, 2, 3, 1)`` for
        an NHWC image; None when the file does not say (other writers)."""
        value = self.file.metadata.get(f"espquant.layout:{name}")
        return tuple(int(p) for p in value.split(",")) if value else None

    def run(self, int_inputs: dict[str, np.ndarray], keep: bool = False) -> dict[str, np.ndarray]:
        """Run the graph on quantized inputs (the file's layout) and return the graph outputs.

        With ``keep`` every intermediate variable is returned too.
        """
        env: dict[str, Value] = {n: Value(t.data, t.exponent) for n, t in self.file.initializers.items()}
        for declared in self.file.inputs:
            if declared.name not in int_inputs:
                raise ModelError(f"no value for model input {declared.name!r}")
            data = np.asarray(int_inputs[declared.name])
            if declared.shape and int(np.prod(declared.shape)) == data.size:
                data = data.reshape(declared.shape)
            env[declared.name] = Value(data, declared.exponent)
        for node in self.file.nodes:
            handler = _HANDLERS.get(node.op_type)
            if handler is None:
                raise UnsupportedOpError(f"node {node.name!r}: the simulator has no kernel for {node.op_type} yet")
            results = handler(self, node, env)
            for name, data in zip(node.outputs, results):
                env[name] = Value(np.asarray(data), self._exponent(name))
        names = list(env) if keep else [o.name for o in self.file.outputs]
        return {name: self._as_declared(name, env[name].data) for name in names if name in env}

    # --- helpers --------------------------------------------------------------------------------------------
    def _exponent(self, name: str) -> int:
        value = self.file.values.get(name) or next((v for v in self.file.outputs if v.name == name), None)
        return value.exponent if value is not None else 0

    def _as_declared(self, name: str, data: np.ndarray) -> np.ndarray:
        value = self.file.values.get(name)
        if value is not None and value.dtype in _INT_DTYPES:
            return data.astype(_INT_DTYPES[value.dtype])
        return data

    def _const(self, name: str) -> EspdlTensor:
        return self.file.initializers[name]


def _bits(node: EspdlNode) -> int | None:
    return _BITS.get(node.quant_type)


def _weight_exponents(tensor: EspdlTensor) -> np.ndarray:
    return np.asarray(tensor.exponents, dtype=np.int64)


def _conv(model: EspdlModel, node: EspdlNode, env: dict[str, Value]) -> list[np.ndarray]:
    x = env[node.inputs[0]]
    weight = model._const(node.inputs[1])
    bias = model._const(node.inputs[2]).data.reshape(-1) if len(node.inputs) > 2 and node.inputs[2] else None
    bits = _bits(node)
    attrs = node.attributes
    one_d = x.data.ndim == 3
    data = x.data[:, None] if one_d else x.data  # NWC -> N1WC
    kernel = list(attrs.get("kernel_shape", weight.dims[:-2]))
    kh, kw = (1, kernel[0]) if one_d else (kernel[0], kernel[1])
    pads = list(attrs.get("pads", [0, 0] * (1 if one_d else 2)))
    pads = [0, pads[0], 0, pads[1]] if one_d else pads
    strides = list(attrs.get("strides", [1])) if one_d else list(attrs.get("strides", [1, 1]))
    dilations = list(attrs.get("dilations", [1] * len(strides)))
    if one_d:
        strides, dilations = [1, strides[0]], [1, dilations[0]]
    group = int(attrs.get("group", 1))
    n = weight.dims[-1] if group == 1 else weight.dims[-2]
    blocked = model.profile.simd
    if group == 1:
        w = decode_conv_weight(weight.data, n, kh, kw, data.shape[-1], bits, blocked)
    else:
        w = decode_depthwise_weight(weight.data, n, kh, kw, bits, blocked)
    shift = model._exponent(node.outputs[0]) - x.exponent - _weight_exponents(weight)
    out = kernels.conv2d_nhwc(
        data,
        w,
        bias,
        strides=strides,
        pads=pads,
        dilations=dilations,
        depthwise=group != 1,
        shift=shift,
        relu=attrs.get("activation") == "Relu",
        bits=bits,
        profile=model.profile,
    )
    return [out[:, 0] if one_d else out]


def _gemm(model: EspdlModel, node: EspdlNode, env: dict[str, Value]) -> list[np.ndarray]:
    x = env[node.inputs[0]]
    weight = model._const(node.inputs[1])
    bias = model._const(node.inputs[2]).data.reshape(-1) if len(node.inputs) > 2 and node.inputs[2] else None
    bits = _bits(node)
    k, n = weight.dims[-2], weight.dims[-1]
    w = decode_kn_matrix(weight.data, k, n, bits, model.profile.simd)  # (K, N)
    rows = x.data.reshape(-1, k).astype(np.int64)
    shift = model._exponent(node.outputs[0]) - x.exponent - _weight_exponents(weight)
    acc = kernels._accumulate(rows, w, bias, bits, model.profile)
    out = kernels._finish(acc, shift, node.attributes.get("activation") == "Relu", bits, model.profile)
    return [out.reshape(*x.data.shape[:-1], n)]


def _matmul(model: EspdlModel, node: EspdlNode, env: dict[str, Value]) -> list[np.ndarray]:
    a, b = env[node.inputs[0]], env[node.inputs[1]]
    bits = _bits(node)
    data = b.data
    if data.ndim >= 2:  # every K x N slice is stored in the blocked (or plain [N][K]) order
        k, n = data.shape[-2], data.shape[-1]
        flat = data.reshape(-1, k * n)
        data = np.stack([decode_kn_matrix(s, k, n, bits, model.profile.simd) for s in flat]).reshape(data.shape)
    shift = model._exponent(node.outputs[0]) - a.exponent - b.exponent
    return [
        kernels.matmul_slices(
            a.data,
            data,
            shift=shift,
            relu=node.attributes.get("activation") == "Relu",
            bits=bits,
            profile=model.profile,
        )
    ]


def _elementwise(op: Callable[..., np.ndarray], float_op: Callable[..., np.ndarray]):
    def run(model: EspdlModel, node: EspdlNode, env: dict[str, Value]) -> list[np.ndarray]:
        a, b = env[node.inputs[0]], env[node.inputs[1]]
        bits = _bits(node)
        if bits is None:
            return [float_op(a.data, b.data)]
        return [op(a.data, b.data, bits)]

    return run


def _mul(model: EspdlModel, node: EspdlNode, env: dict[str, Value]) -> list[np.ndarray]:
    a, b = env[node.inputs[0]], env[node.inputs[1]]
    return [
        kernels.mul(
            a.data,
            b.data,
            e_a=a.exponent,
            e_b=b.exponent,
            e_out=model._exponent(node.outputs[0]),
            bits=_bits(node),
            profile=model.profile,
        )
    ]


def _average_pool(global_pool: bool):
    def run(model: EspdlModel, node: EspdlNode, env: dict[str, Value]) -> list[np.ndarray]:
        x = env[node.inputs[0]]
        return [
            kernels.average_pool_nhwc(
                x.data,
                **kernels.pool_arguments(node.attributes, x.data.shape[1:3], global_pool),
                e_in=x.exponent,
                e_out=model._exponent(node.outputs[0]),
                bits=_bits(node),
                profile=model.profile,
            )
        ]

    return run


def _max_pool(model: EspdlModel, node: EspdlNode, env: dict[str, Value]) -> list[np.ndarray]:
    x = env[node.inputs[0]]
    return [kernels.max_pool_nhwc(x.data, **kernels.pool_arguments(node.attributes, x.data.shape[1:3], False))]


def _ints(model: EspdlModel, name: str) -> list[int]:
    return [int(v) for v in model._const(name).data.reshape(-1)]


def _reshape(model: EspdlModel, node: EspdlNode, env: dict[str, Value]) -> list[np.ndarray]:
    x = env[node.inputs[0]].data
    shape = [x.shape[i] if d == 0 else d for i, d in enumerate(_ints(model, node.inputs[1]))]
    return [x.reshape(shape)]


def _transpose(model: EspdlModel, node: EspdlNode, env: dict[str, Value]) -> list[np.ndarray]:
    x = env[node.inputs[0]].data
    perm = node.attributes.get("perm", list(range(x.ndim))[::-1])
    return [np.transpose(x, [p % x.ndim for p in perm])]


def _flatten(model: EspdlModel, node: EspdlNode, env: dict[str, Value]) -> list[np.ndarray]:
    x = env[node.inputs[0]].data
    axis = int(node.attributes.get("axis", 1)) % (x.ndim + 1) if x.ndim else 0
    return [x.reshape(int(np.prod(x.shape[:axis])), -1)]


def _squeeze(model: EspdlModel, node: EspdlNode, env: dict[str, Value]) -> list[np.ndarray]:
    x = env[node.inputs[0]].data
    if len(node.inputs) > 1 and node.inputs[1]:
        axes = tuple(a % x.ndim for a in _ints(model, node.inputs[1]))
        return [np.squeeze(x, axis=tuple(a for a in axes if x.shape[a] == 1))]
    return [np.squeeze(x)]


def _unsqueeze(model: EspdlModel, node: EspdlNode, env: dict[str, Value]) -> list[np.ndarray]:
    x = env[node.inputs[0]].data
    axes = _ints(model, node.inputs[1])
    rank = x.ndim + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = np.expand_dims(x, axis)
    return [x]


def _concat(model: EspdlModel, node: EspdlNode, env: dict[str, Value]) -> list[np.ndarray]:
    parts = [env[name].data for name in node.inputs if name]
    return [np.concatenate(parts, axis=int(node.attributes.get("axis", 0)))]


def _slice(model: EspdlModel, node: EspdlNode, env: dict[str, Value]) -> list[np.ndarray]:
    x = env[node.inputs[0]].data
    starts, ends = _ints(model, node.inputs[1]), _ints(model, node.inputs[2])
    axes = _ints(model, node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else list(range(len(starts)))
    steps = _ints(model, node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[axis % x.ndim] = slice(*slice(start, end, step).indices(x.shape[axis % x.ndim]))
    return [x[tuple(index)]]


def _pad(model: EspdlModel, node: EspdlNode, env: dict[str, Value]) -> list[np.ndarray]:
    x = env[node.inputs[0]].data
    pads = _ints(model, node.inputs[1])
    rank = x.ndim
    widths = [(pads[i], pads[i + rank]) for i in range(rank)]
    mode = node.attributes.get("mode", "constant")
    if mode == "constant":
        value = model._const(node.inputs[2]).data.reshape(-1)[0] if len(node.inputs) > 2 and node.inputs[2] else 0
        return [np.pad(x, widths, mode="constant", constant_values=value)]
    return [np.pad(x, widths, mode="edge" if mode == "edge" else "reflect")]


def _resize(model: EspdlModel, node: EspdlNode, env: dict[str, Value]) -> list[np.ndarray]:
    x = env[node.inputs[0]]
    scales = model._const(node.inputs[2]).data.reshape(-1)
    if node.attributes.get("mode", "nearest") == "linear":
        return [
            kernels.resize_linear_nhwc(
                x.data,
                scale_h=float(scales[2]),
                scale_w=float(scales[3]),
                align_corners=node.attributes.get("coordinate_transformation_mode") == "align_corners",
                e_in=x.exponent,
                e_out=model._exponent(node.outputs[0]),
                bits=_bits(node),
                profile=model.profile,
            )
        ]
    return [
        kernels.resize_nearest_nhwc(
            x.data,
            scale_h=float(scales[2]),
            scale_w=float(scales[3]),
            e_in=x.exponent,
            e_out=model._exponent(node.outputs[0]),
            bits=_bits(node),
            profile=model.profile,
        )
    ]


def _activation(float_fn: Callable[[np.ndarray], np.ndarray] | None):
    """Int8 nodes with a ``lut`` attribute look their table up; F32 nodes compute in float32."""

    def run(model: EspdlModel, node: EspdlNode, env: dict[str, Value]) -> list[np.ndarray]:
        x = env[node.inputs[0]]
        table = node.attributes.get("lut")
        if table:
            return [kernels.lut_int8(x.data, model._const(table).data)]
        if _bits(node) is None and float_fn is not None:
            return [float_fn(x.data)]
        if node.op_type == "Relu" and x.exponent == model._exponent(node.outputs[0]):
            return [np.maximum(x.data, 0)]
        raise UnsupportedOpError(
            f"node {node.name!r}: {node.op_type} at {node.quant_type} without a table is not simulated yet"
        )

    return run


def _clip(model: EspdlModel, node: EspdlNode, env: dict[str, Value]) -> list[np.ndarray]:
    x = env[node.inputs[0]]
    if node.attributes.get("lut"):
        return [kernels.lut_int8(x.data, model._const(node.attributes["lut"]).data)]
    low = model._const(node.inputs[1]).data.reshape(-1)[0] if len(node.inputs) > 1 and node.inputs[1] else None
    high = model._const(node.inputs[2]).data.reshape(-1)[0] if len(node.inputs) > 2 and node.inputs[2] else None
    clamped = np.clip(x.data, low, high)
    e_out = model._exponent(node.outputs[0])
    if _bits(node) is None or x.exponent == e_out:
        return [clamped]
    scaled = (clamped.astype(np.float32) * np.float32(2.0 ** (x.exponent - e_out))).astype(np.float32)
    return [saturate(round_float(scaled, model.profile.rounding), _bits(node))]


def _softmax(model: EspdlModel, node: EspdlNode, env: dict[str, Value]) -> list[np.ndarray]:
    x = env[node.inputs[0]]
    declared = model.file.values.get(node.inputs[0])
    integer = declared is not None and declared.dtype in _INT_DTYPES
    bits = 8 if declared is not None and declared.dtype == "INT8" else (16 if integer else None)
    return [
        kernels.softmax_float(
            x.data, axis=int(node.attributes.get("axis", -1)), e_in=x.exponent if integer else None, bits=bits
        )
    ]


def _quantize(model: EspdlModel, node: EspdlNode, env: dict[str, Value]) -> list[np.ndarray]:
    """QuantizeLinear / RequantizeLinear (one runtime module): float -> int, or int -> int (6)."""
    x = env[node.inputs[0]]
    declared = model.file.values.get(node.outputs[0])
    bits = 16 if declared is not None and declared.dtype == "INT16" else 8
    e_out = model._exponent(node.outputs[0])
    if x.data.dtype.kind == "f":
        return [kernels.quantize_float(x.data, e_out=e_out, bits=bits, profile=model.profile)]
    return [kernels.requantize(x.data, e_out - x.exponent, bits, model.profile)]


def _dequantize(model: EspdlModel, node: EspdlNode, env: dict[str, Value]) -> list[np.ndarray]:
    """int -> float32: ``q * 2^e`` (6)."""
    x = env[node.inputs[0]]
    return [(x.data.astype(np.float32) * np.float32(2.0**x.exponent)).astype(np.float32)]


def _float_unary(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: fn(x.astype(np.float32) if x.dtype != np.float64 else x)


_HANDLERS: dict[str, Callable[[EspdlModel, EspdlNode, dict[str, Value]], list[np.ndarray]]] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Add": _elementwise(kernels.add, np.add),
    "Sub": _elementwise(kernels.sub, np.subtract),
    "Mul": _mul,
    "AveragePool": _average_pool(False),
    "GlobalAveragePool": _average_pool(True),
    "MaxPool": _max_pool,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Flatten": _flatten,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": _concat,
    "Slice": _slice,
    "Pad": _pad,
    "Resize": _resize,
    "Relu": _activation(_float_unary(lambda x: np.maximum(x, 0))),
    "LeakyRelu": _activation(None),
    "PRelu": _activation(None),
    "Sigmoid": _activation(None),
    "Tanh": _activation(None),
    "HardSigmoid": _activation(None),
    "HardSwish": _activation(None),
    "Exp": _activation(_float_unary(np.exp)),
    "Log": _activation(_float_unary(np.log)),
    "Sqrt": _activation(_float_unary(np.sqrt)),
    "Clip": _clip,
    "Softmax": _softmax,
    "QuantizeLinear": _quantize,
    "RequantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
}


def compare_output(got: np.ndarray, want: np.ndarray) -> tuple[bool, str]:
    """Simulated vs stored output: integers must be equal, floats within ``FLOAT_ULP`` float32 ulp (NaN where
    both are NaN and equal infinities count as equal: an overflowing int8 Softmax gives them on the chip)."""
    got = np.asarray(got).reshape(want.shape)
    if want.dtype.kind == "f":
        got64, want64 = got.astype(np.float64), want.astype(np.float64)
        special = (np.isnan(got64) & np.isnan(want64)) | (np.isinf(want64) & (got64 == want64))
        spacing = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
        with np.errstate(invalid="ignore"):
            ulp = np.where(special, 0.0, np.abs(got64 - want64) / spacing)
        worst = float(np.nan_to_num(ulp, nan=np.inf).max(initial=0))
        return worst <= FLOAT_ULP, f"max {worst:.1f} float32 ulp"
    differ = int((got.astype(np.int64) != want.astype(np.int64)).sum())
    return differ == 0, f"{differ}/{want.size} elements differ"


def load_espdl(path: str | os.PathLike[str], target: str | None = None) -> EspdlModel:
    """Decode an ``.espdl`` file and bind it to its target chip's arithmetic.

    Args:
        path: the model file (EDL1 or EDL2 container).
        target: the chip, needed when the file records none (files of ESP-DL 3.0.x); a file that records a
            target different from this one is refused.
    """
    decoded = read_espdl(path)
    recorded = decoded.target
    if recorded is not None:
        recorded = _PROFILE_ALIASES.get(recorded, recorded)
        if target is not None and get_target(target).family != get_target(recorded).family:
            raise TargetError(f"{path}: the file was exported for {recorded}, not {target}.")
        return EspdlModel(decoded, get_target(recorded))
    if target is None:
        raise TargetError(
            f"{path}: the file does not record its target chip; pass target= (on the command line --target), "
            "e.g. 'esp32s3'."
        )
    return EspdlModel(decoded, get_target(target))
