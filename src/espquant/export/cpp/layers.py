"""What one legacy ESP-DL layer is made of (constants, shapes, exponents) and the filter byte orders the legacy
library reads per chip: the vocabulary the planner fills and the renderer writes."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np

from espquant.quant.pot import simd_lanes

logger = logging.getLogger("espquant.export.cpp")

_PER_CHANNEL_BIAS_EXPONENT = -128  # what the converter writes in the unused per-channel Bias exponent field

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
    cls: str  # the library version's class, e.g. "Conv2D", "ReLU" (v1.1) / "Relu" (v2.0)
    template: str  # template arguments, e.g. "int8_t" or "int8_t, int16_t"
    inputs: list[str]  # tensors read, in argument order
    output: str
    args: list[str]  # constructor arguments as C++ text, without the trailing name
    input_shapes: list[tuple[int, ...]]
    output_shape: tuple[int, ...]
    output_exponent: int
    constants: dict[str, LegacyConstant] = field(default_factory=dict)
    saturated_bias: int = 0  # bias values the legacy bias type clips
    header: str = ""  # the include/layer/ header declaring ``cls``
    in_place: bool = False  # constructed with ``inplace = true``: its output is its input tensor

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
