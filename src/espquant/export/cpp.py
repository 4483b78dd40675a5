"""Export a quantized model as C++ coefficient files for the legacy ESP-DL library (v1.1 / v2.0).

The legacy toolkit's ``Calibrator.export_coefficient_to_cpp`` wrote ``<name>.cpp`` / ``<name>.hpp`` holding each
layer's quantized filter, bias and activation as constant arrays with getters (``get_<layer>_filter()`` ...), in
the form the C++ layer classes of ESP-DL v1.x / v2.0 take (``dl::Filter<T>``, ``dl::Bias<T>``,
``dl::Activation<T>``, ``dl::layer::Conv2D<T>`` ...). This module writes the same two files from espquant's
:class:`QuantizedModel`, so the integers are exactly the simulator's, plus ``<name>_model.hpp``: a
``dl::layer::Model<T>`` subclass that declares, builds and calls the layers in graph order.

Legacy facts relied on (ESP-DL git history, tag ``v2.0`` unless stated; v1.1.0 has the same signatures except
that ``Relu`` / ``LeakyRelu`` / ``PRelu`` were spelled ``ReLU`` / ``LeakyReLU`` / ``PReLU``; v1.0.0 lacks the
explicit ``padding`` argument, ``FullyConnected``, ``Flatten`` and ``Concat`` and is not a target):

- ``include/typedef/dl_constant.hpp``: ``Filter<T>(element, exponent, shape, dilation = {1, 1})`` with shape
  ``[filter_height, filter_width, input_channel, output_channel]`` (depthwise: ``[.., .., channels, 1]``) and the
  note that "the element sequence depends on optimization method"; the per-channel form
  ``Filter<T>(element, const int8_t *channel_exponent, channel_exponent_size, shape, dilation)``;
  ``Bias<T>(element, exponent, shape)``; ``Activation<T>(type, element = NULL, exponent = 0, shape = {0})`` with
  ``type`` one of ``Linear, ReLU, LeakyReLU, PReLU`` (``include/dl_define.hpp``, also ``padding_type_t``:
  ``PADDING_NOT_SET, PADDING_VALID, PADDING_SAME_BEGIN, PADDING_SAME_END``).
- ``include/layer/dl_layer_conv2d.hpp`` / ``dl_layer_depthwise_conv2d.hpp``: ``template <feature_t, bias_t =
  feature_t>``, ``(output_exponent, filter, bias, activation, padding_type, padding [top, bottom, left, right],
  stride_y, stride_x, name)``; ``bias_t`` is ``int16_t`` "for int16 quantization and int8 per-channel
  quantization". ``dl_layer_fullyconnected.hpp``: ``(output_exponent, filter [1, 1, in, out], bias, activation,
  flatten = true, name)``. Pools, ``Add2D`` / ``Sub2D`` / ``Mul2D`` (``output_exponent``, activation, name),
  ``Relu``, ``LeakyRelu(alpha, alpha_exponent, name)``, ``PRelu(element, exponent, name)``, ``Flatten``,
  ``Concat(axis, name)`` and ``dl_layer_model.hpp`` (``build`` / ``call`` / ``forward``): same folder.
- ``docs/en/tools/quantization-toolkit/quantization-specification.rst``: int16 is per-tensor only; per-tensor
  biases are stored at the **output** exponent in the feature type (int8 / int16); int8 per-channel biases are
  int16 at ``input_exponent + weight_exponent + 4``; ReLU, MaxPool, Flatten, Concat, LeakyReLU, PReLU keep the
  input exponent ("Input and output must have the same exponent"); Add2D / Sub2D / Mul2D / AvgPool2D /
  GlobalAveragePool2D carry no such restriction and their layer classes take an ``output_exponent``.
- ``tutorial/quantization_tool_example`` (``example.py`` calls ``calib.export_coefficient_to_cpp(model_proto,
  pickle_file_path, 'esp32s3', '.', 'mnist_coefficient', True)``) and its generated ``mnist_coefficient.cpp`` /
  ``.hpp``: ``const static __attribute__((aligned(16))) int16_t <layer>_filter_element[] = {..}``, ``const
  static Filter<int16_t> <layer>_filter(<layer>_filter_element, -15, {1, 1, 784, 128}, {1, 1})``, a getter
  returning its address, the same for ``_bias`` (exponent = output exponent) and ``Activation<int16_t>
  <layer>_activation(ReLU)``; the hand-written ``mnist_model.hpp`` shows the Model subclass pattern.
  Re-quantizing that example's ONNX weights reproduces its arrays bit for bit with the ESP32-S3 order below.
- ``tools/convert_tool`` (its logic ships compiled; its strings name ``transpose_with_tie728`` for ESP32-S3 and
  ``transpose_without_tie`` for the others). Running that v2.0 converter on index-valued filters gives the
  element orders (the tests keep some of its outputs as literals):

  * esp32 / esp32s2 / esp32c3: Conv2D / FullyConnected ``[N][H][W][C]``; DepthwiseConv2D ``[H][W][C]``.
  * esp32s3: lanes of 16 bytes, i.e. ``L = 16`` (int8) or ``8`` (int16) channels. Conv2D / FullyConnected:
    for each full block of ``L`` output channels ``[H][W][C][L]``, then each remaining output channel
    ``[H][W][C]``. DepthwiseConv2D: each full block of ``L`` channels ``[H][W][L]``, then the remaining
    channels together ``[H][W][rest]``.
  * per-channel: ``const static int8_t <layer>_filter_exponent[] = {..}``, ``Bias<int16_t>`` with values at
    ``e_in + e_w[n] + 4`` and ``-128`` in the (unused) exponent field; same layout as per-tensor.
  * LeakyReLU: one alpha element, shape ``{1,}``; PReLU: one alpha per channel, shape ``{C,}``.

Every target exports the same ops (``EXPORTABLE_OPS``): Conv (group 1 -> Conv2D, depthwise ->
DepthwiseConv2D, with a fused Relu as ``Activation(ReLU)``), Gemm and MatMul by a constant matrix ->
FullyConnected, Relu, LeakyRelu, PRelu, MaxPool -> MaxPool2D, AveragePool -> AvgPool2D, GlobalAveragePool ->
GlobalAveragePool2D, Add / Sub / Mul -> Add2D / Sub2D / Mul2D, Concat, Flatten and Reshape-to-2-D -> Flatten;
Identity and a RequantizeLinear before Add / Sub / Mul need no layer. Anything else is reported, node by node.

The constants are the legacy toolkit's, as the legacy runtime profile simulates them (simulator/legacy.py,
docs/LEGACY_ARITHMETIC.md; read off the original toolkit's Evaluator and checked against it bit for bit):

- filters: the float weights at the table's exponent(s), rounded half to even and saturated;
- biases: from the float bias, rounded half to even: at the output exponent in the feature type (int8 / int16)
  per tensor, int16 at ``e_in + e_w[n] + 4`` per channel, saturated. An int8 per-tensor bias can saturate: a
  warning names the layer (the legacy profile simulates the clipped value);
- LeakyReLU's alpha and PReLU's slopes: truncated toward zero to ``bits - 1`` fraction bits (exponent ``-7`` /
  ``-15``), not saturated;
- a RequantizeLinear the simulator inserts before Add / Sub / Mul is dropped: the legacy layers rescale each
  input from its own exponent to the output exponent. Anywhere else a RequantizeLinear cannot be expressed;
- Flatten / Reshape-to-2-D of a ``(1, C, H, W)`` tensor runs on ESP-DL's ``[H][W][C]`` data, so the rows of a
  following FullyConnected are permuted from ONNX's ``C, H, W`` order to ``H, W, C``;
- LeakyRelu, PRelu, Relu keep their input exponent (else: not expressible). The batch dimension is dropped.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from espquant._version import __version__
from espquant.errors import ModelError, OptionError, OutputError, QuantTableError, TargetError, UnsupportedModelError
from espquant.files import write_files
from espquant.graph import GraphView
from espquant.quant.pot import simd_lanes
from espquant.quant.profiles import LEGACY_TARGETS
from espquant.simulator.legacy import (
    PER_CHANNEL_BIAS_SHIFT,
    legacy_bias,
    legacy_profile,
    legacy_slope,
    quantize_half_even,
)
from espquant.simulator.lowering import build_quantized_model
from espquant.simulator.quantized_model import QNode, QuantizedModel
from espquant.table import QuantTable

__all__ = [
    "LEGACY_TARGETS",
    "EXPORTABLE_OPS",
    "PER_CHANNEL_BIAS_SHIFT",
    "LegacyConstant",
    "LegacyLayer",
    "export_coefficient_to_cpp",
    "legacy_filter_elements",
    "plan_legacy_layers",
]

logger = logging.getLogger(__name__)

_PER_CHANNEL_BIAS_EXPONENT = -128  # what the converter writes in the unused per-channel Bias exponent field

# The legacy header declaring each layer class (ESP-DL v2.0 include/layer/).
_HEADERS = {
    "Conv2D": "dl_layer_conv2d.hpp",
    "DepthwiseConv2D": "dl_layer_depthwise_conv2d.hpp",
    "FullyConnected": "dl_layer_fullyconnected.hpp",
    "MaxPool2D": "dl_layer_max_pool2d.hpp",
    "AvgPool2D": "dl_layer_avg_pool2d.hpp",
    "GlobalAveragePool2D": "dl_layer_global_avg_pool2d.hpp",
    "Add2D": "dl_layer_add2d.hpp",
    "Sub2D": "dl_layer_sub2d.hpp",
    "Mul2D": "dl_layer_mul2d.hpp",
    "Relu": "dl_layer_relu.hpp",
    "LeakyRelu": "dl_layer_leakyrelu.hpp",
    "PRelu": "dl_layer_prelu.hpp",
    "Flatten": "dl_layer_flatten.hpp",
    "Concat": "dl_layer_concat.hpp",
}

# Ops ESP-DL v2.0 has a layer for but whose integer form espquant cannot vouch for.
_NOT_EXPRESSIBLE = {
    "Sigmoid": "the legacy Sigmoid layer computes in float (QIFO by default); its integer form is not specified",
    "Tanh": "the legacy Tanh layer computes in float (QIFO by default); its integer form is not specified",
    "Softmax": "the legacy Softmax layer computes in float (QIFO by default); its integer form is not specified",
    "Transpose": "legacy tensors are [H][W][C]: an ONNX (NCHW) Transpose does not carry over",
    "Squeeze": "legacy tensors are [H][W][C]: an ONNX (NCHW) Squeeze does not carry over",
    "Unsqueeze": "legacy tensors are [H][W][C]: an ONNX (NCHW) Unsqueeze does not carry over",
    "Pad": "the legacy Pad layer's semantics are not analysed; fold the padding into the next Conv / pool",
    "GlobalMaxPool": "the simulator has no GlobalMaxPool kernel to take the integers from",
    "RequantizeLinear": "the legacy library has no requantize layer (only Add2D / Sub2D / Mul2D rescale inputs)",
}

_CPP_WORDS = (
    "alignas alignof and and_eq asm auto bitand bitor bool break case catch char char8_t char16_t char32_t class "
    "compl concept const consteval constexpr constinit const_cast continue co_await co_return co_yield decltype "
    "default delete do double dynamic_cast else enum explicit export extern false float for friend goto if inline "
    "int long mutable namespace new noexcept not not_eq nullptr operator or or_eq private protected public register "
    "reinterpret_cast requires return short signed sizeof static static_assert static_cast struct switch template "
    "this thread_local throw true try typedef typeid typename union unsigned using virtual void volatile wchar_t "
    "while xor xor_eq NULL input input_exponent build call forward"
)
_CPP_KEYWORDS = frozenset(_CPP_WORDS.split())  # C++ keywords and the model class's own member names


@dataclass
class LegacyConstant:
    """One constant the coefficient files hold: a filter, bias or activation with its exponent(s).

    ``elements`` are flat, already in the order the legacy runtime reads (see the module docstring).
    """

    kind: str  # "filter", "bias" or "activation"
    ctype: str  # "int8_t" / "int16_t"
    elements: np.ndarray | None  # None: an Activation without elements (ReLU)
    exponent: int | list[int]  # a list: per-channel filter exponents
    shape: list[int]
    dilation: list[int] | None = None  # filters only
    activation_type: str | None = None  # activations only: ReLU, LeakyReLU, PReLU


@dataclass
class LegacyLayer:
    """One layer of the generated model: its legacy class, constructor arguments and constants."""

    name: str  # C++ identifier, also the layer's name string
    node: str  # the ONNX node it comes from
    op_type: str
    cls: str  # legacy class, e.g. "Conv2D"
    template: str  # template arguments, e.g. "int8_t" or "int8_t, int16_t"
    inputs: list[str]  # tensors read, in argument order
    output: str
    args: list[str]  # constructor arguments as C++ text, without the trailing name
    input_shapes: list[tuple[int, ...]]
    output_shape: tuple[int, ...]
    output_exponent: int
    constants: dict[str, LegacyConstant] = field(default_factory=dict)
    saturated_bias: int = 0  # bias values the legacy bias type clips

    @property
    def activation(self) -> str:
        constant = self.constants.get("activation")
        return constant.activation_type if constant is not None and constant.activation_type else ""


def legacy_filter_elements(filter_hwcn: np.ndarray, target_chip: str, bits: int, depthwise: bool) -> np.ndarray:
    """Flatten a filter in legacy ``[H, W, C, N]`` form (depthwise: ``N = 1``) to the element order the legacy
    runtime of ``target_chip`` reads (module docstring; measured with the v2.0 converter).

    ESP32-S3 kernels load 16 bytes per SIMD register, so its filters are grouped in blocks of 16 (int8) or 8
    (int16) channels; the other chips' plain C loops read one output channel's taps contiguously.
    """
    hwcn = np.asarray(filter_hwcn)
    if hwcn.ndim != 4 or (depthwise and hwcn.shape[3] != 1):
        raise ValueError(f"expected an [H, W, C, N] filter{' with N = 1' if depthwise else ''}, got {hwcn.shape}")
    if target_chip != "esp32s3":
        return hwcn[..., 0].reshape(-1) if depthwise else hwcn.transpose(3, 0, 1, 2).reshape(-1)
    lanes = simd_lanes(bits)
    if depthwise:
        hwc = hwcn[..., 0]
        kh, kw, channels = hwc.shape
        full = channels // lanes * lanes
        blocks = hwc[..., :full].reshape(kh, kw, full // lanes, lanes).transpose(2, 0, 1, 3)
        return np.concatenate([blocks.reshape(-1), hwc[..., full:].reshape(-1)])
    kh, kw, channels, outputs = hwcn.shape
    full = outputs // lanes * lanes
    blocks = hwcn[..., :full].reshape(kh, kw, channels, full // lanes, lanes).transpose(3, 0, 1, 2, 4)
    return np.concatenate([blocks.reshape(-1), hwcn[..., full:].transpose(3, 0, 1, 2).reshape(-1)])


def _identifier(text: str, fallback: str) -> str:
    """A C++ identifier from an ONNX name: other characters become ``_``, no leading digit or underscore."""
    name = re.sub(r"_+", "_", re.sub(r"[^0-9A-Za-z_]", "_", text)).strip("_")
    if not name:
        name = fallback
    if name[0].isdigit():
        name = "l_" + name
    if name in _CPP_KEYWORDS:
        name += "_layer"
    return name


def _ctype(bits: int) -> str:
    return "int8_t" if bits == 8 else "int16_t"


def _hwc_perm(chw: tuple[int, ...]) -> np.ndarray | None:
    """Where each element of a flattened ``[H][W][C]`` tensor sits in ONNX's flattened ``C, H, W`` order
    (None when the orders agree)."""
    channels, height, width = chw
    if channels == 1 or height * width == 1:
        return None
    return np.arange(channels * height * width).reshape(channels, height, width).transpose(1, 2, 0).reshape(-1)


class _Planner:
    """Walks the quantized nodes, mapping each onto a legacy layer or recording why it cannot be."""

    def __init__(self, q: QuantizedModel, model: onnx.ModelProto, target: str) -> None:
        self.q = q
        self.target = target
        self.bits = q.bits
        self.ctype = _ctype(q.bits)
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except (onnx.shape_inference.InferenceError, ValueError):  # keep the shapes the model declares
            inferred = model
        self.view = GraphView(inferred.graph)
        self.layers: list[LegacyLayer] = []
        self.problems: list[str] = []
        self.producer: dict[str, LegacyLayer] = {}  # tensor -> the layer writing it
        self.alias: dict[str, str] = {}  # Identity outputs -> their input
        self.requant: dict[str, str] = {}  # RequantizeLinear outputs -> their input
        self.order: dict[str, np.ndarray] = {}  # flat tensors whose legacy order differs from ONNX's
        self.taken: set[str] = set()
        inputs = [name for name in q.inputs if name not in q.float_tensors]
        if len(q.inputs) != 1 or len(inputs) != 1:
            self.problems.append(
                f"the model has inputs {q.inputs}; a legacy dl::layer::Model takes exactly one integer input"
            )
        self.input = inputs[0] if inputs else ""

    # --- helpers ------------------------------------------------------------------------------------------

    def problem(self, node: QNode, reason: str) -> None:
        self.problems.append(f"node {node.name!r} ({node.op_type}): {reason}")

    def resolve(self, tensor: str) -> str:
        while tensor in self.alias:
            tensor = self.alias[tensor]
        return tensor

    def onnx_shape(self, tensor: str) -> tuple[int, ...] | None:
        """The ONNX shape without its batch dimension, or None when not static."""
        base = self.requant.get(tensor, tensor)
        shape = self.view.shape(base)
        if shape is None or len(shape) < 1 or not all(isinstance(d, int) for d in shape[1:]):
            return None
        return tuple(int(d) for d in shape[1:])  # type: ignore[arg-type]

    def shown_shape(self, tensor: str) -> str:
        """The full ONNX shape of ``tensor`` for messages, batch dimension included (``[unk__9, 128]``)."""
        shape = self.view.shape(self.requant.get(tensor, tensor))
        if shape is None:
            return "[unknown]"
        return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"

    @staticmethod
    def legacy_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
        """ESP-DL keeps one sample as ``[H, W, C]`` (or a flat ``[K]``)."""
        return (shape[1], shape[2], shape[0]) if len(shape) == 3 else shape

    def exponent(self, tensor: str) -> int:
        return self.q.exponent(tensor)

    def unique(self, node: QNode) -> str:
        base = _identifier(node.name, node.op_type.lower())
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name

    def activation_input(self, node: QNode, position: int, allow_requant: bool = False) -> str | None:
        """The tensor a layer reads at ``position``: produced by an earlier layer or the model input."""
        tensor = self.resolve(node.inputs[position])
        if tensor in self.requant:
            if not allow_requant:
                self.problem(
                    node,
                    f"input {tensor!r} needs a requantization from exponent {self.exponent(self.requant[tensor])} "
                    f"to {self.exponent(tensor)}; the legacy library has no requantize layer. Calibrate so "
                    "producer and consumer share the exponent",
                )
                return None
            tensor = self.resolve(self.requant[tensor])
        if tensor != self.input and tensor not in self.producer:
            if tensor in self.q.constants:
                self.problem(node, f"input {tensor!r} is a constant; the legacy layer takes tensors only")
            return None  # produced by a node already reported as a problem
        return tensor

    def same_exponent(self, node: QNode, tensor: str) -> bool:
        e_in, e_out = self.exponent(tensor), self.exponent(node.outputs[0])
        if e_in != e_out:
            self.problem(
                node,
                f"input exponent {e_in} differs from output exponent {e_out}; the legacy layer keeps the input "
                "exponent",
            )
        return e_in == e_out

    def emit(
        self,
        node: QNode,
        name: str,
        cls: str,
        inputs: list[str],
        args: list[str],
        shapes: list[tuple[int, ...]],
        out_shape: tuple[int, ...],
        **extra: object,
    ) -> None:
        """Append a layer; ``shapes`` / ``out_shape`` are ONNX shapes without the batch dimension."""
        layer = LegacyLayer(
            name=name,
            node=node.name,
            op_type=node.op_type,
            cls=cls,
            template=str(extra.pop("template", self.ctype)),
            inputs=inputs,
            output=node.outputs[0],
            args=args,
            input_shapes=[self.legacy_shape(s) for s in shapes],
            output_shape=self.legacy_shape(out_shape),
            output_exponent=self.exponent(node.outputs[0]),
            **extra,  # type: ignore[arg-type]
        )
        self.layers.append(layer)
        self.producer[layer.output] = layer

    def bias(
        self, node: QNode, layer_name: str, tensor: str, outputs: int, e_out: int, per_channel: bool
    ) -> tuple[LegacyConstant, int]:
        """The legacy bias from the float one (simulator/legacy.py ``legacy_bias``, what the legacy profile
        simulates): at the output exponent in the feature type, or int16 at ``e_in + e_w[n] + 4`` per channel."""
        values = np.asarray(self.view.array(tensor), dtype=np.float64).reshape(-1)
        values = np.broadcast_to(values, (outputs,)) if values.size == 1 else values
        e_in, e_w = self.q.exponent(node.inputs[0]), self.q.exponents[node.inputs[1]]
        clipped, e_bias = legacy_bias(values, e_in, e_w, e_out, self.bits)
        width, ctype = (16, "int16_t") if per_channel else (self.bits, self.ctype)
        exponent = _PER_CHANNEL_BIAS_EXPONENT if per_channel else e_out
        rounded = quantize_half_even(values, e_bias, 64)
        saturated = int(np.count_nonzero(clipped != rounded))
        if saturated:
            logger.warning(
                "layer %s (node %r): %d of %d bias value(s) saturate to %s at the legacy bias exponent; the "
                "layer's results there differ from the float model's (the legacy profile simulates the clipped bias)",
                layer_name,
                node.name,
                saturated,
                outputs,
                ctype,
            )
        return LegacyConstant("bias", ctype, clipped.astype(np.int64), exponent, [outputs]), saturated

    def legacy_weight(self, tensor: str, channel_axis: int) -> np.ndarray:
        """The filter as the legacy toolkit quantizes it (half to even, simulator/legacy.py), ONNX layout."""
        return quantize_half_even(self.view.array(tensor), self.q.exponents[tensor], self.bits, channel_axis)

    @staticmethod
    def relu(node: QNode, ctype: str) -> LegacyConstant | None:
        return LegacyConstant("activation", ctype, None, 0, [0], activation_type="ReLU") if node.relu else None

    def filter_constant(self, node: QNode, weight: str, hwcn: np.ndarray, depthwise: bool, dilation: list[int]):
        exponent = self.q.exponents[weight]
        if isinstance(exponent, list) and self.bits != 8:
            self.problem(node, "per-channel weights at int16; legacy ESP-DL runs per-channel int8 only")
        elements = legacy_filter_elements(hwcn, self.target, self.bits, depthwise)
        return LegacyConstant("filter", self.ctype, elements, exponent, list(hwcn.shape), dilation=dilation)

    # --- ops ----------------------------------------------------------------------------------------------

    def conv(self, node: QNode) -> None:
        x = self.activation_input(node, 0)
        shape = self.onnx_shape(node.inputs[0])
        if shape is None or len(shape) != 3:
            self.problem(node, "only 2-D convolutions on (N, C, H, W) inputs with static shapes are expressible")
            return
        weight = self.legacy_weight(node.inputs[1], 0)
        group = int(node.attrs.get("group", 1))
        depthwise = group > 1
        if depthwise and not (weight.shape[1] == 1 and weight.shape[0] == group == shape[0]):
            self.problem(node, f"group={group} is not a depthwise convolution with one filter per channel")
            return
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            self.problem(node, "auto_pad SAME_* is not expressible; export with explicit pads")
            return
        out_shape = self.onnx_shape(node.outputs[0])
        if x is None or out_shape is None:
            return
        name = self.unique(node)
        # ONNX (N, C, KH, KW) -> legacy [KH, KW, C, N]; depthwise (C, 1, KH, KW) -> [KH, KW, C, 1]
        hwcn = weight[:, 0].transpose(1, 2, 0)[..., None] if depthwise else weight.transpose(2, 3, 1, 0)
        dilation = [int(d) for d in node.attrs.get("dilations", [1, 1])]
        constants = {"filter": self.filter_constant(node, node.inputs[1], hwcn, depthwise, dilation)}
        per_channel = isinstance(self.q.exponents[node.inputs[1]], list)
        e_out = self.exponent(node.outputs[0])
        saturated = 0
        if len(node.inputs) > 2 and node.inputs[2]:
            constants["bias"], saturated = self.bias(
                node, name, node.inputs[2], hwcn.shape[2 if depthwise else 3], e_out, per_channel
            )
        activation = self.relu(node, self.ctype)
        if activation is not None:
            constants["activation"] = activation
        pads = [int(p) for p in node.attrs.get("pads", [0, 0, 0, 0])]
        strides = [int(s) for s in node.attrs.get("strides", [1, 1])]
        padding = _padding(pads)
        args = [
            str(e_out),
            f"{{ns}}::get_{name}_filter()",
            f"{{ns}}::get_{name}_bias()" if "bias" in constants else "NULL",
            f"{{ns}}::get_{name}_activation()" if activation is not None else "NULL",
            *padding,
            str(strides[0]),
            str(strides[1]),
        ]
        cls = "DepthwiseConv2D" if depthwise else "Conv2D"
        template = f"{self.ctype}, int16_t" if per_channel else self.ctype
        self.emit(
            node,
            name,
            cls,
            [x],
            args,
            [shape],
            out_shape,
            constants=constants,
            template=template,
            saturated_bias=saturated,
        )

    def fully_connected(self, node: QNode) -> None:
        """Gemm (transA = 0) and MatMul by a constant 2-D matrix: the legacy FullyConnected, flatten = true."""
        x = self.activation_input(node, 0)
        shape = self.onnx_shape(node.inputs[0])
        if node.inputs[1] not in self.q.constants:
            self.problem(node, "the second operand is not a constant; FullyConnected needs a constant filter")
            return
        channel_axis = 0 if node.op_type == "Gemm" and node.attrs.get("transB", 0) else 1
        matrix = self.legacy_weight(node.inputs[1], channel_axis)
        if shape is None or len(shape) != 1 or matrix.ndim != 2:
            self.problem(node, "only a 2-D (N, K) input times a constant 2-D matrix is expressible")
            return
        if node.op_type == "Gemm" and (
            node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0
        ):
            self.problem(node, "transA, alpha or beta differ from the defaults")
            return
        if x is None:
            return
        name = self.unique(node)
        matrix = matrix.T if node.attrs.get("transB", 0) else matrix  # (K, N)
        rows = self.order.get(x)
        if rows is not None:
            matrix = matrix[rows]  # legacy row i holds ONNX row rows[i] (the input is [H][W][C] data)
        outputs = matrix.shape[1]
        e_out = self.exponent(node.outputs[0])
        constants = {"filter": self.filter_constant(node, node.inputs[1], matrix[None, None], False, [1, 1])}
        per_channel = isinstance(self.q.exponents[node.inputs[1]], list)
        saturated = 0
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2]:
            constants["bias"], saturated = self.bias(node, name, node.inputs[2], outputs, e_out, per_channel)
        activation = self.relu(node, self.ctype)
        if activation is not None:
            constants["activation"] = activation
        args = [
            str(e_out),
            f"{{ns}}::get_{name}_filter()",
            f"{{ns}}::get_{name}_bias()" if "bias" in constants else "NULL",
            f"{{ns}}::get_{name}_activation()" if activation is not None else "NULL",
            "true",
        ]
        template = f"{self.ctype}, int16_t" if per_channel else self.ctype
        self.emit(
            node,
            name,
            "FullyConnected",
            [x],
            args,
            [shape],
            (outputs,),
            constants=constants,
            template=template,
            saturated_bias=saturated,
        )

    def pointwise(
        self,
        node: QNode,
        cls: str,
        args: Callable[[str, str], list[str]],
        constant: Callable[[str, tuple[int, ...], str], LegacyConstant | None] | None = None,
    ) -> None:
        """One-input layers that keep the input exponent and shape (Relu, LeakyRelu, PRelu)."""
        x = self.activation_input(node, 0)
        shape = self.onnx_shape(node.inputs[0])
        if shape is None:
            self.problem(node, "the input shape is not static")
            return
        if x is None or not self.same_exponent(node, x):
            return
        name = self.unique(node)
        constants = {}
        if constant is not None:
            made = constant(name, shape, x)
            if made is None:
                return
            constants["activation"] = made
        self.emit(node, name, cls, [x], args(name, x), [shape], shape, constants=constants)
        if x in self.order:
            self.order[node.outputs[0]] = self.order[x]

    def relu_layer(self, node: QNode) -> None:
        self.pointwise(node, "Relu", lambda name, x: [])

    def leaky_relu(self, node: QNode) -> None:
        values, exponent = legacy_slope(float(node.attrs.get("alpha", 0.01)), self.bits)
        value = int(values.reshape(-1)[0])

        def constant(name: str, shape: tuple[int, ...], x: str) -> LegacyConstant:
            return LegacyConstant("activation", self.ctype, np.array([value]), exponent, [1], None, "LeakyReLU")

        # The alpha goes in as literals: a model built before static initialisation would read it unset.
        self.pointwise(node, "LeakyRelu", lambda name, x: [str(value), str(exponent)], constant)

    def prelu(self, node: QNode) -> None:
        slope_name = node.inputs[1]
        if not self.view.is_constant(slope_name):
            self.problem(node, "the slope is not a constant")
            return
        slope, exponent = legacy_slope(self.view.array(slope_name).reshape(-1), self.bits)

        def constant(name: str, shape: tuple[int, ...], x: str) -> LegacyConstant | None:
            channels = shape[0] if len(shape) == 3 else int(np.prod(shape))
            if slope.size not in (1, channels):
                self.problem(node, f"slope of {slope.size} values for {channels} channels")
                return None
            values = np.broadcast_to(slope, (channels,)) if slope.size == 1 else slope
            if len(shape) != 3 and x in self.order:
                values = values[self.order[x]]
            return LegacyConstant(
                "activation", self.ctype, np.asarray(values), int(exponent), [channels], None, "PReLU"
            )

        self.pointwise(
            node, "PRelu", lambda name, x: [f"{{ns}}::get_{name}_activation()->element", str(exponent)], constant
        )

    def pool(self, node: QNode) -> None:
        x = self.activation_input(node, 0)
        shape, out_shape = self.onnx_shape(node.inputs[0]), self.onnx_shape(node.outputs[0])
        if shape is None or out_shape is None or len(shape) != 3:
            self.problem(node, "only 2-D pooling of (N, C, H, W) inputs with static shapes is expressible")
            return
        if x is None:
            return
        e_out = self.exponent(node.outputs[0])
        if node.op_type == "GlobalAveragePool":
            cls, args = "GlobalAveragePool2D", [str(e_out)]
        else:
            if node.attrs.get("ceil_mode", 0) or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
                self.problem(node, "ceil_mode or auto_pad SAME_* are not expressible")
                return
            if any(int(d) != 1 for d in node.attrs.get("dilations", [1, 1])):
                self.problem(node, "pools with dilation are not expressible")
                return
            kernel = [int(k) for k in node.attrs["kernel_shape"]]
            strides = [int(s) for s in node.attrs.get("strides", [1, 1])]
            geometry = [f"{{{kernel[0]}, {kernel[1]}}}", *_padding(node.attrs.get("pads", [0, 0, 0, 0]))]
            geometry += [str(strides[0]), str(strides[1])]
            if node.op_type == "MaxPool":
                if not self.same_exponent(node, x):
                    return
                cls, args = "MaxPool2D", geometry
            else:
                cls, args = "AvgPool2D", [str(e_out), *geometry]
        name = self.unique(node)
        self.emit(node, name, cls, [x], args, [shape], out_shape)

    def binary(self, node: QNode) -> None:
        cls = {"Add": "Add2D", "Sub": "Sub2D", "Mul": "Mul2D"}[node.op_type]
        a, b = (self.activation_input(node, i, allow_requant=True) for i in (0, 1))
        shapes = [self.onnx_shape(t) for t in node.inputs[:2]]
        if shapes[0] is None or shapes[0] != shapes[1]:
            shown = " and ".join(self.shown_shape(t) for t in node.inputs[:2])
            self.problem(node, f"input shapes {shown}: the legacy {cls} needs two tensors of one static shape")
            return
        if a is None or b is None:
            return
        if self.order.get(a) is not self.order.get(b) and not np.array_equal(self.order.get(a), self.order.get(b)):
            self.problem(node, "its inputs are flattened in different element orders")
            return
        name = self.unique(node)
        e_out = self.exponent(node.outputs[0])
        self.emit(node, name, cls, [a, b], [str(e_out), "NULL"], [shapes[0], shapes[0]], shapes[0])
        if a in self.order:
            self.order[node.outputs[0]] = self.order[a]

    def concat(self, node: QNode) -> None:
        positions = [i for i, t in enumerate(node.inputs) if t]
        tensors = [self.activation_input(node, i) for i in positions]
        shapes = [self.onnx_shape(node.inputs[i]) for i in positions]
        out_shape = self.onnx_shape(node.outputs[0])
        if out_shape is None or any(s is None for s in shapes):
            self.problem(node, "the input shapes are not static")
            return
        rank = len(out_shape) + 1
        axis = int(node.attrs.get("axis", 0)) % rank
        if axis == 0 or rank not in (2, 4):
            self.problem(node, f"concatenation along axis {axis} of a rank-{rank} tensor is not expressible")
            return
        if any(t is None for t in tensors):
            return
        if any(t in self.order for t in tensors):  # type: ignore[operator]
            self.problem(node, "concatenating flattened [H][W][C] data does not give ONNX's element order")
            return
        e_out = self.exponent(node.outputs[0])
        if any(self.exponent(t) != e_out for t in tensors):  # type: ignore[arg-type]
            self.problem(node, "its inputs and output do not share one exponent")
            return
        legacy_axis = {1: 2, 2: 0, 3: 1}[axis] if rank == 4 else 0  # ONNX C, H, W -> legacy [H, W, C]
        name = self.unique(node)
        self.emit(node, name, "Concat", tensors, [str(legacy_axis)], shapes, out_shape)  # type: ignore[arg-type]

    def flatten(self, node: QNode) -> None:
        """Flatten (axis 1) and a Reshape to (N, K): the legacy Flatten, which flattens ``[H][W][C]`` data."""
        x = self.activation_input(node, 0)
        shape, out_shape = self.onnx_shape(node.inputs[0]), self.onnx_shape(node.outputs[0])
        if shape is not None and len(shape) == 2:  # (N, H, W), e.g. tf2onnx's MNIST: ESP-DL's [H][W][1], same order
            shape = (1, *shape)
        axis = int(node.attrs.get("axis", 1)) if node.op_type == "Flatten" else 1
        if shape is None or out_shape is None or len(out_shape) != 1 or axis != 1 or len(shape) not in (1, 3):
            self.problem(
                node, "only flattening one sample to (N, K) from (N, K), (N, H, W) or (N, C, H, W) is expressible"
            )
            return
        if x is None or not self.same_exponent(node, x):
            return
        name = self.unique(node)
        self.emit(node, name, "Flatten", [x], [], [shape], out_shape)
        rows = _hwc_perm(shape) if len(shape) == 3 else self.order.get(x)
        if rows is not None:
            self.order[node.outputs[0]] = rows

    def identity(self, node: QNode) -> None:
        self.alias[node.outputs[0]] = node.inputs[0]

    def requantize(self, node: QNode) -> None:
        self.requant[node.outputs[0]] = node.inputs[0]


def _padding(pads: list[int]) -> list[str]:
    """ONNX ``[top, left, bottom, right]`` -> the legacy ``padding_type, {top, bottom, left, right}``."""
    top, left, bottom, right = (int(p) for p in pads)
    if not any((top, left, bottom, right)):
        return ["dl::PADDING_VALID", "{}"]
    return ["dl::PADDING_NOT_SET", f"{{{top}, {bottom}, {left}, {right}}}"]


_HANDLERS: dict[str, Callable[[_Planner, QNode], None]] = {
    "Conv": _Planner.conv,
    "Gemm": _Planner.fully_connected,
    "MatMul": _Planner.fully_connected,
    "Relu": _Planner.relu_layer,
    "LeakyRelu": _Planner.leaky_relu,
    "PRelu": _Planner.prelu,
    "MaxPool": _Planner.pool,
    "AveragePool": _Planner.pool,
    "GlobalAveragePool": _Planner.pool,
    "Add": _Planner.binary,
    "Sub": _Planner.binary,
    "Mul": _Planner.binary,
    "Concat": _Planner.concat,
    "Flatten": _Planner.flatten,
    "Reshape": _Planner.flatten,
    "Identity": _Planner.identity,
    "RequantizeLinear": _Planner.requantize,
}
# The same on every legacy target: only the filter element order differs between them.
EXPORTABLE_OPS = frozenset(_HANDLERS)


def plan_legacy_layers(q: QuantizedModel, model: onnx.ModelProto, target_chip: str) -> list[LegacyLayer]:
    """The legacy layers of ``q`` (built from ``model``) for ``target_chip``, in graph order.

    Raises:
        UnsupportedModelError: listing every node the legacy library cannot express, with the reason.
    """
    planner = _Planner(q, model, target_chip)
    for node in q.nodes:
        handler = _HANDLERS.get(node.op_type)
        if handler is not None:
            handler(planner, node)
        elif node.op_type in _NOT_EXPRESSIBLE:
            planner.problem(node, _NOT_EXPRESSIBLE[node.op_type])
        else:
            planner.problem(node, "the legacy ESP-DL library (v1.1 / v2.0) has no layer for this op")
    for output in q.outputs:  # e.g. a graph output that is a requantized tensor: no layer writes it
        tensor = planner.resolve(output)
        if tensor not in planner.producer and not planner.problems:
            planner.problems.append(f"graph output {output!r} is not produced by a legacy layer")
    if planner.problems:
        listed = "\n  ".join(planner.problems)
        raise UnsupportedModelError(
            f"the legacy ESP-DL library cannot run this model on {target_chip} ({len(planner.problems)} "
            f"problem(s)); nothing was written:\n  {listed}"
        )
    return planner.layers


# --- rendering ----------------------------------------------------------------------------------------------


def _array(values: np.ndarray, per_line: int = 16) -> str:
    flat = [int(v) for v in np.asarray(values).reshape(-1)]
    lines = []
    for start in range(0, len(flat), per_line):
        lines.append("        " + ", ".join(f"{v:6d}" for v in flat[start : start + per_line]))
    return ",\n".join(lines)


def _shape(values: list[int]) -> str:
    """A C++ initializer list; one value is written ``{n,}`` as the legacy converter does."""
    text = ", ".join(str(int(v)) for v in values)
    return "{" + text + (",}" if len(values) == 1 else "}")


def _comment(text: str) -> str:
    """ONNX names inside a ``//`` comment: no line breaks or other control characters."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", text)


def _getter_types(layer: LegacyLayer) -> list[tuple[str, str]]:
    classes = {"filter": "Filter", "bias": "Bias", "activation": "Activation"}
    return [(kind, f"dl::{classes[kind]}<{c.ctype}>") for kind, c in layer.constants.items()]


def _render_hpp(layers: list[LegacyLayer], namespace: str, banner: str) -> str:
    out = [
        banner,
        "#pragma once",
        "",
        "#include <stdint.h>",
        '#include "dl_constant.hpp"',
        "",
        f"namespace {namespace}",
        "{",
    ]
    for layer in layers:
        for kind, ctype in _getter_types(layer):
            out.append(f"    const {ctype} *get_{layer.name}_{kind}();")
    out += ["}", ""]
    return "\n".join(out)


def _render_cpp(layers: list[LegacyLayer], namespace: str, file_name: str, banner: str) -> str:
    classes = {"filter": "Filter", "bias": "Bias", "activation": "Activation"}
    out = [banner, f'#include "{file_name}.hpp"', "using namespace dl;", "", f"namespace {namespace}", "{"]
    for layer in layers:
        if not layer.constants:
            continue
        out.append(f"    // layer {layer.name}: ONNX node '{_comment(layer.node)}' ({layer.op_type}) -> {layer.cls}")
        for kind, c in layer.constants.items():
            var = f"{layer.name}_{kind}"
            cls = f"{classes[kind]}<{c.ctype}>"
            if c.elements is not None:
                out.append(f"    const static __attribute__((aligned(16))) {c.ctype} {var}_element[] = {{")
                out.append(_array(c.elements) + "};")
                out.append("")
            if kind == "filter":
                dilation = _shape(c.dilation or [1, 1])
                if isinstance(c.exponent, list):
                    values = ", ".join(str(e) for e in c.exponent)
                    out.append(f"    const static int8_t {var}_exponent[] = {{{values}}};")
                    out.append(
                        f"    const static {cls} {var}({var}_element, {var}_exponent, {len(c.exponent)}, "
                        f"{_shape(c.shape)}, {dilation});"
                    )
                else:
                    out.append(
                        f"    const static {cls} {var}({var}_element, {c.exponent}, {_shape(c.shape)}, {dilation});"
                    )
            elif kind == "bias":
                out.append(f"    const static {cls} {var}({var}_element, {c.exponent}, {_shape(c.shape)});")
            elif c.elements is None:
                out.append(f"    const static {cls} {var}({c.activation_type});")
            else:
                arguments = f"{c.activation_type}, {var}_element, {c.exponent}, {_shape(c.shape)}"
                out.append(f"    const static {cls} {var}({arguments});")
            out += [f"    const {cls} *get_{var}()", "    {", f"        return &{var};", "    }", ""]
    out += ["}", ""]
    return "\n".join(out)


def _class_name(namespace: str) -> str:
    camel = "".join(part[:1].upper() + part[1:] for part in namespace.split("_") if part)
    camel = camel if camel[:1].isalpha() else "M" + camel
    return camel if camel.endswith("Model") else camel + "Model"


def _render_model(
    layers: list[LegacyLayer], q: QuantizedModel, model_input: str, namespace: str, file_name: str, banner: str
) -> str:
    ctype = _ctype(q.bits)
    cls = _class_name(namespace)
    producer = {layer.output: layer for layer in layers}
    outputs = set(q.outputs)
    last_use: dict[str, int] = {}
    for index, layer in enumerate(layers):
        for tensor in layer.inputs:
            last_use[tensor] = index

    def ref(tensor: str) -> str:
        return "input" if tensor == model_input else f"this->{producer[tensor].name}.get_output()"

    input_shape: tuple[int, ...] = ()
    for layer in layers:
        if model_input in layer.inputs:
            input_shape = layer.input_shapes[layer.inputs.index(model_input)]
            break
    out_layers = [producer[o] for o in q.outputs if o in producer]
    headers = ["dl_layer_model.hpp", *dict.fromkeys(_HEADERS[layer.cls] for layer in layers)]
    out = [banner, "#pragma once", "", "#include <stdint.h>"]
    out += [f'#include "{h}"' for h in headers]
    out += [f'#include "{file_name}.hpp"', ""]
    out += [
        "/**",
        f" * @brief {cls}: the quantized model as legacy ESP-DL layers, in graph order.",
        " *",
        f" * Input: a dl::Tensor<{ctype}> of shape {_shape(list(input_shape))} ([height, width, channel]),",
        f" *        exponent {q.exponent(model_input)} (value = int * 2^exponent); call forward(input).",
    ]
    for layer in out_layers:
        out.append(
            f" * Output: this->{layer.name}.get_output(), shape {_shape(list(layer.output_shape))}, exponent "
            f"{layer.output_exponent} (ESP-DL [H][W][C] element order)."
        )
    out += [
        " * Construct the model after static initialisation (e.g. inside app_main), as the legacy examples do:",
        " * the layers keep pointers to the coefficients of the generated .cpp.",
        " */",
        f"class {cls} : public dl::layer::Model<{ctype}>",
        "{",
        "public:",
        f"    static constexpr int input_exponent = {q.exponent(model_input)};",
        "",
    ]
    for layer in layers:
        out.append(f"    dl::layer::{layer.cls}<{layer.template}> {layer.name}; // {_comment(layer.node)}")
    out.append("")
    inits = []
    for layer in layers:
        args = [a.replace("{ns}", namespace) for a in layer.args] + [f'"{layer.name}"']
        inits.append(f"{layer.name}({', '.join(args)})")
    out.append(f"    {cls}()")
    out.append("        : " + ",\n          ".join(inits))
    out += ["    {", "    }", ""]
    out += [f"    void build(dl::Tensor<{ctype}> &input)", "    {"]
    for layer in layers:
        if layer.cls == "Concat":
            refs = ", ".join(f"&{ref(t)}" for t in layer.inputs)
            out.append(f"        this->{layer.name}.build({{{refs}}});")
        else:
            out.append(f"        this->{layer.name}.build({', '.join(ref(t) for t in layer.inputs)});")
    out += ["    }", "", f"    void call(dl::Tensor<{ctype}> &input)", "    {"]
    for index, layer in enumerate(layers):
        if layer.cls == "Concat":
            refs = ", ".join(f"&{ref(t)}" for t in layer.inputs)
            out.append(f"        this->{layer.name}.call({{{refs}}});")
        else:
            out.append(f"        this->{layer.name}.call({', '.join(ref(t) for t in layer.inputs)});")
        for tensor in dict.fromkeys(layer.inputs):
            if last_use[tensor] == index and tensor not in outputs:
                out.append(f"        {ref(tensor)}.free_element();")
        out.append("")
    out[-1:] = ["    }", "};", ""]
    return "\n".join(out)


def _print_summary(layers: list[LegacyLayer], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    def exps(layer: LegacyLayer, kind: str) -> str:
        c = layer.constants.get(kind)
        if c is None:
            return ""
        if isinstance(c.exponent, list):
            return f"{min(c.exponent)}..{max(c.exponent)} ({len(c.exponent)} ch)"
        filter_constant = layer.constants.get("filter")
        if kind == "bias" and filter_constant is not None and isinstance(filter_constant.exponent, list):
            return f"e_in+e_w+{PER_CHANNEL_BIAS_SHIFT}"  # the Bias object itself holds the unused -128
        return str(c.exponent)

    table = Table(title=title)
    for column in (
        "layer",
        "ESP-DL layer",
        "ONNX op",
        "input [H,W,C]",
        "output",
        "filter",
        "e filter",
        "e bias",
        "activation",
        "e out",
    ):
        table.add_column(column, no_wrap=column in ("layer", "ESP-DL layer"))
    for layer in layers:
        f = layer.constants.get("filter")
        table.add_row(
            layer.name,
            layer.cls,
            layer.op_type,
            " ".join(str(list(s)) for s in layer.input_shapes),
            str(list(layer.output_shape)),
            str(f.shape) if f is not None else "",
            exps(layer, "filter"),
            exps(layer, "bias") + (f" ({layer.saturated_bias} sat.)" if layer.saturated_bias else ""),
            layer.activation,
            str(layer.output_exponent),
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=220)
    console.print(table)


# --- the entry point ----------------------------------------------------------------------------------------


def _table_bits(table: QuantTable, bits: int | None) -> int:
    recorded = table.metadata.get("bits")
    if bits is not None and bits not in (8, 16):
        raise OptionError(f"bits={bits!r}: use 8 or 16.")
    if recorded is not None and bits is not None and recorded != bits:
        raise QuantTableError(f"the table was calibrated for int{recorded}, not int{bits}.")
    value = recorded if recorded is not None else bits
    if value not in (8, 16):
        raise QuantTableError(
            "the table does not record its bit width (a table of the legacy toolkit?); pass bits=8 or bits=16."
        )
    return int(value)


def _output_folder(output_path: str | os.PathLike[str]) -> Path:
    folder = Path(output_path)
    if folder.exists() and not folder.is_dir():
        raise ModelError(f"{folder}: is a file, not a folder; pass the folder the C++ files should go to.")
    return folder


def legacy_target(target_chip: str) -> str:
    """The chip's name as the legacy library knows it (``ESP32-S3`` -> ``esp32s3``), or a TargetError."""
    key = str(target_chip).strip().lower().replace("-", "").replace("_", "")
    if key not in LEGACY_TARGETS:
        raise TargetError(
            f"target chip {target_chip!r} is not served by the legacy ESP-DL library; valid targets: "
            f"{', '.join(LEGACY_TARGETS)}."
        )
    return key


def cpp_file_paths(folder: str | os.PathLike[str], file_name: str) -> tuple[Path, Path, Path]:
    """The three files :func:`export_coefficient_to_cpp` writes: ``.cpp``, ``.hpp`` and ``_model.hpp``."""
    base = Path(folder)
    return base / f"{file_name}.cpp", base / f"{file_name}.hpp", base / f"{file_name}_model.hpp"


def _probe_writable(folder: Path) -> None:
    """Create the folder if needed and prove a file can be created in it, before the first real write."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".espquant-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write there ({exc.strerror or exc}); choose a writable folder.") from exc


def export_coefficient_to_cpp(
    model_proto: onnx.ModelProto,
    table: QuantTable | str | os.PathLike[str],
    target_chip: str,
    output_path: str | os.PathLike[str],
    file_name: str,
    print_model_info: bool = False,
    *,
    bits: int | None = None,
) -> list[Path]:
    """Write ``<file_name>.cpp``, ``<file_name>.hpp`` and ``<file_name>_model.hpp`` for the legacy ESP-DL library.

    The legacy toolkit's ``Calibrator.export_coefficient_to_cpp``, plus a generated model class. Everything is
    checked and rendered before the first file is written, and the three files are written all or nothing
    (:func:`espquant.files.write_files`).

    Args:
        model_proto: the (optimized) float model the table was calibrated on.
        table: its quantization table, or the path of one (pickle or JSON).
        target_chip: ``esp32``, ``esp32s2``, ``esp32c3`` or ``esp32s3`` (the filter byte order differs).
        output_path: the folder to write to (created when missing).
        file_name: base name of the files; also the C++ namespace (other characters become ``_``).
        print_model_info: print a per-layer summary table.
        bits: 8 or 16, for tables that do not record their bit width (legacy toolkit tables).

    Returns:
        The paths of the ``.cpp``, ``.hpp`` and ``_model.hpp`` files.

    Raises:
        TargetError: a target the legacy library does not serve.
        OptionError: a file name that is empty or contains a path separator.
        QuantTableError: a table of another model or bit width.
        UnsupportedModelError: nodes the legacy library cannot express (all listed, node and op named).
        ModelError: an output path that is a file, not a folder.
        OutputError: an output folder that cannot be written to.
    """
    key = legacy_target(target_chip)
    if not isinstance(model_proto, onnx.ModelProto):
        raise ModelError(f"expected an onnx.ModelProto, got {type(model_proto).__name__}; load it with onnx.load.")
    name = str(file_name)
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise OptionError(f"file_name {file_name!r}: give a plain base name such as 'mnist_coefficient'.")
    folder = _output_folder(output_path)
    quant_table = table if isinstance(table, QuantTable) else QuantTable.load(table)
    if quant_table.metadata.get("int16_layers"):
        raise OptionError("the legacy ESP-DL library runs one width per model: export an int8 or an int16 table.")
    width = _table_bits(quant_table, bits)
    # The layers and exponents come from the integer model; the legacy profile lets its int8 per-channel weights
    # through (the legacy library runs them on every chip it served); the constants are the legacy ones.
    q = build_quantized_model(model_proto, quant_table, legacy_profile(key), width)
    layers = plan_legacy_layers(q, model_proto, key)
    if not layers:
        raise UnsupportedModelError("the model has no layer to export.")
    namespace = _identifier(name, "coefficient")
    granularity = (
        "per-channel"
        if any(isinstance(layer.constants["filter"].exponent, list) for layer in layers if "filter" in layer.constants)
        else "per-tensor"
    )
    banner = (
        f"// Generated by espquant {__version__} for {key}, int{width} {granularity}, legacy ESP-DL (v1.1 / v2.0) "
        "layer API. Do not edit."
    )
    model_input = next(n for n in q.inputs if n not in q.float_tensors)
    cpp, hpp, model_hpp = cpp_file_paths(folder, name)
    texts = {
        cpp: _render_cpp(layers, namespace, name, banner),
        hpp: _render_hpp(layers, namespace, banner),
        model_hpp: _render_model(layers, q, model_input, namespace, name, banner),
    }
    _probe_writable(folder)
    written = write_files({path: text.encode() for path, text in texts.items()})
    if print_model_info:
        _print_summary(layers, f"{name}: {len(layers)} legacy layers for {key}, int{width} {granularity}")
    return written
