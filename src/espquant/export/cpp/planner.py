"""From the integer model to legacy ESP-DL layers: one handler per ONNX op, the legacy constants (as the legacy
runtime profile simulates them), and every reason a node cannot become a layer."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx

from espquant.errors import UnsupportedModelError
from espquant.export.cpp.layers import (
    _NOT_EXPRESSIBLE,
    _PER_CHANNEL_BIAS_EXPONENT,
    LegacyConstant,
    LegacyLayer,
    _ctype,
    _hwc_perm,
    _identifier,
    legacy_filter_elements,
)
from espquant.export.cpp.versions import LibraryVersion, library_version
from espquant.graph import GraphView
from espquant.simulator.legacy import (
    legacy_bias,
    legacy_slope,
    quantize_half_even,
)
from espquant.simulator.quantized_model import QNode, QuantizedModel

logger = logging.getLogger("espquant.export.cpp")


class _Planner:
    """Walks the quantized nodes, mapping each onto a legacy layer or recording why it cannot be."""

    def __init__(self, q: QuantizedModel, model: onnx.ModelProto, target: str, version: LibraryVersion) -> None:
        self.q = q
        self.target = target
        self.version = version
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
        """Append a layer of kind ``cls``, spelled and built as the library version does, or report why that
        version cannot build it; ``shapes`` / ``out_shape`` are ONNX shapes without the batch dimension."""
        api = self.version.api(cls)
        if api.refused:  # reported; the layer is still planned so that every later refusal is named too
            self.problem(node, api.refused)
        layer = LegacyLayer(
            name=name,
            node=node.name,
            op_type=node.op_type,
            cls=api.cls,
            header=api.header,
            in_place=api.in_place,
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


def _check_in_place(planner: _Planner) -> None:
    """An in-place layer overwrites its input tensor: no later layer may read that tensor and it may not be a
    graph output (v1.1 builds ReLU / Flatten in place only, see versions.py)."""
    outputs = {planner.resolve(o) for o in planner.q.outputs}
    for index, layer in enumerate(planner.layers):
        if not layer.in_place:
            continue
        tensor = layer.inputs[0]
        later = [other.name for other in planner.layers[index + 1 :] if tensor in other.inputs]
        if later or tensor in outputs:
            readers = f"layer(s) {', '.join(later)} read it later" if later else "it is a graph output"
            planner.problems.append(
                f"node {layer.node!r} ({layer.op_type}): ESP-DL v{planner.version.name}'s {layer.cls} works only in "
                f"place ({layer.header}: build() allocates no output otherwise), which overwrites its input "
                f"{tensor!r}, but {readers}; export with library_version='2.0' (--library-version 2.0)"
            )


def plan_legacy_layers(
    q: QuantizedModel, model: onnx.ModelProto, target_chip: str, version: LibraryVersion | str | None = None
) -> list[LegacyLayer]:
    """The legacy layers of ``q`` (built from ``model``) for ``target_chip`` and the library ``version``
    (versions.py; default ``DEFAULT_LIBRARY_VERSION``), in graph order.

    Raises:
        UnsupportedModelError: listing every node the legacy library cannot express, with the reason.
    """
    version = version if isinstance(version, LibraryVersion) else library_version(version)
    planner = _Planner(q, model, target_chip, version)
    for node in q.nodes:
        handler = _HANDLERS.get(node.op_type)
        if handler is not None:
            handler(planner, node)
        elif node.op_type in _NOT_EXPRESSIBLE:
            planner.problem(node, _NOT_EXPRESSIBLE[node.op_type])
        else:
            planner.problem(node, "the legacy ESP-DL library (v1.1 / v2.0) has no layer for this op")
    _check_in_place(planner)
    for output in q.outputs:  # e.g. a graph output that is a requantized tensor: no layer writes it
        tensor = planner.resolve(output)
        if tensor not in planner.producer and not planner.problems:
            planner.problems.append(f"graph output {output!r} is not produced by a legacy layer")
    if planner.problems:
        listed = "\n  ".join(planner.problems)
        raise UnsupportedModelError(
            f"the legacy ESP-DL library v{version.name} cannot run this model on {target_chip} "
            f"({len(planner.problems)} problem(s)); nothing was written:\n  {listed}"
        )
    return planner.layers


# --- rendering ----------------------------------------------------------------------------------------------
