"""The quantized model as a standard ONNX QDQ model: the float graph plus QuantizeLinear / DequantizeLinear.

Why: the espquant simulator says what the chip computes, but users also want to *look* at the quantized
model (Netron) and run it with ordinary tools (onnxruntime). The QDQ form is the one every ONNX tool reads:
each quantized tensor passes through ``QuantizeLinear(scale=2^e, zero_point=0)`` and ``DequantizeLinear``,
so its values are exactly the chip's grid ``q * 2^e``. What is exported:

- every activation the table gives an exponent (graph inputs and node outputs) gets a Q/DQ pair right after
  its producer. The producer's output is renamed and the DequantizeLinear writes the original name, so the
  consumers and the graph outputs keep their names. A Conv/Gemm/MatMul that absorbs its Relu on the chip
  gets the pair after the Relu only (the chip never stores the pre-Relu tensor);
- weights become int8/int16 initializers followed by a DequantizeLinear, per output channel (the ``axis``
  attribute) when the table holds one exponent per channel; biases become int32 at the table's bias exponent
  (``e_in + e_w``). These are the simulator's integer constants, so ORT and the chip multiply the same
  numbers. Constants quantized like activations (a constant Add operand, Clip bounds) are exported the same
  way at the exponent the chip gives them;
- where the chip inserts a RequantizeLinear (an Add input brought to the output's exponent, Concat inputs
  brought to the shared one) the edge gets its own Q/DQ pair at the new exponent, so ORT rounds there too;
- tensors the table keeps float (Softmax outputs and what only moves them) get no pair.

Every exponent, integer constant and requantized edge is read off the integer model the simulator runs
(``build_quantized_model`` for the ESP32-P4, which rounds half-to-even like onnxruntime and takes per-channel
weights): one lowering for the simulator, the ``.espdl`` writer and this exporter. The ESP32-S3 and plain-C
chips round constants half-up, so on an exact tie (``w * 2^-e`` ending in .5) their integer weight may be one
larger than the exported one. An int16 bias whose integer does not fit in int32 (ESP-DL keeps 40/64-bit
biases) stays a float initializer holding the float32 nearest to ``q * 2^e``: exactly what a
DequantizeLinear would output for it, since DequantizeLinear computes in float32 anyway.

int8 QuantizeLinear / DequantizeLinear with per-axis scales need ONNX opset 13, int16 ones opset 21
(opsets 19 and 21 widened their types); older models are upgraded with ``onnx.version_converter``.

Why ORT on the QDQ model and the chip still differ a little (``qdq_agreement`` measures how much):
onnxruntime computes each layer in float between the Q/DQ pairs and its QuantizeLinear rounds the float
result half-to-even, while the chip rounds an integer accumulator with a right shift (half-up on ESP32-S3
and the plain-C chips, half-even on ESP32-P4); the ESP32-S3 saturates its 20-bit int8 accumulator lanes and
its 20-bit biases; average pools, int8 activations (lookup tables) and Softmax run in the chip's own float32
steps or tables. At int16 onnxruntime's float32 sums cannot hold every product of two 16-bit integers exactly
(24-bit mantissa), so an output can land one step off where the chip's 40/64-bit accumulator is exact. With
graph optimizations on, onnxruntime may also fuse int8 DQ -> Conv -> Q into integer kernels with their own
requantization. On the ESP32-P4 (half-even, like onnxruntime) int8 values agree exactly on the demo model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from espquant.calibration.dataset import Chunking
from espquant.calibration.plan import CalibrationPlan, plan_calibration
from espquant.calibration.precision import int8_fallbacks
from espquant.checker import parse_bits
from espquant.errors import DatasetError, ModelError, OptionError, QuantTableError
from espquant.graph import GraphView, node_attributes, opset_version, unique_name
from espquant.model_io import save_model
from espquant.ops import Role, get_op_spec
from espquant.quant.profiles import get_target
from espquant.quant.rounding import saturate
from espquant.simulator.lowering import build_quantized_model
from espquant.table import QuantTable

__all__ = ["export_qdq", "save_qdq", "qdq_agreement", "QDQ_OPSET"]

logger = logging.getLogger(__name__)

# The oldest default-domain opset whose QuantizeLinear / DequantizeLinear take the activation width
# (per-axis scales since 13; int16 since 21).
QDQ_OPSET: dict[int, int] = {8: 13, 16: 21}

_INT_DTYPE: dict[int, type[np.integer]] = {8: np.int8, 16: np.int16}
_BIAS_BITS = 32
# float32 normal exponents: a scale 2^e outside them is not exactly a normal float32.
_MIN_EXPONENT, _MAX_EXPONENT = -126, 127

NodeKey = tuple[str, ...]


@dataclass(frozen=True)
class _ConstantQuant:
    """How one constant input of one node is quantized: tensor, exponent(s), per-axis axis, integer kind, and
    the integers the chip holds for it (from the integer model)."""

    tensor: str
    exponent: int | tuple[int, ...]
    axis: int | None
    kind: str  # "weight" (activation width), "bias" (int32), "activation" (a constant operand, activation width)
    ints: np.ndarray = field(compare=False, hash=False, repr=False)


_QUANTIZED_ROLES = {Role.WEIGHT: "weight", Role.BIAS: "bias", Role.ACTIVATION: "activation", Role.QPARAM: "activation"}
# QDQ carries the integers of ESP32-P4's lowering: it rounds half to even like onnxruntime's QuantizeLinear and
# takes per-channel weights, so every table has its integers there.
QDQ_PROFILE = "esp32p4"


@dataclass
class _QdqPlan:
    """Every edit, keyed by tensor names and node output tuples (they survive an opset conversion)."""

    activations: dict[str, int]  # tensor -> exponent of its Q/DQ pair (graph inputs and node outputs)
    constants: dict[tuple[NodeKey, int], _ConstantQuant]  # (node, input position) -> constant quantization
    requantize: dict[tuple[NodeKey, int], int]  # (node, input position) -> the exponent the chip requantizes to


def _node_key(node: onnx.NodeProto) -> NodeKey:
    return tuple(node.output)


def _load_table(table: QuantTable | str | os.PathLike[str]) -> tuple[QuantTable, str]:
    if isinstance(table, QuantTable):
        return table, "the quantization table"
    return QuantTable.load(table), str(table)


def _resolve_bits(table: QuantTable, bits: int | str | None, source: str) -> int:
    """The activation width: the table's, or ``bits`` for a legacy table that does not record it."""
    recorded = table.metadata.get("bits")
    asked = parse_bits(bits) if bits is not None else None
    if recorded is not None and recorded not in (8, 16):
        raise QuantTableError(f"{source}: its metadata says bits={recorded!r}; a table is int8 or int16.")
    if asked is not None and recorded is not None and asked != recorded:
        raise QuantTableError(
            f"{source} was calibrated for int{recorded}, not int{asked}; calibrate again or drop bits."
        )
    resolved = asked if asked is not None else recorded
    if resolved is None:
        raise OptionError(f"{source} does not record its bit width (a legacy table): pass bits='int8' or 'int16'.")
    return int(resolved)


def _exponent_tuple(value: int | list[int]) -> int | tuple[int, ...]:
    return tuple(value) if isinstance(value, list) else value


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor onnx's shape inference can tell (pairs go on float tensors only)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is a help here; unknown types are treated as float
        inferred = model
    graph = inferred.graph
    types = {info.name: info.type.tensor_type.elem_type for info in [*graph.input, *graph.value_info, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _plan_qdq(model: onnx.ModelProto, table: QuantTable, plan: CalibrationPlan, bits: int) -> _QdqPlan:
    """Every pair, constant and requantized edge, read off the integer model (``build_quantized_model``), so the
    QDQ model shows exactly the chip's exponents and integers: one lowering for the simulator, the ``.espdl``
    writer and this exporter."""
    quantized = build_quantized_model(model, table, get_target(QDQ_PROFILE), bits)
    view = GraphView(model.graph)
    types = _tensor_types(model)
    result = _QdqPlan({}, {}, {})

    def pair(name: str) -> None:
        exponent = quantized.exponents.get(name)
        if not isinstance(exponent, int) or name in quantized.float_tensors or quantized.width(name) != bits:
            return  # float tensors, and an LSTM's int16 cell state in an int8 model (one width per QDQ model)
        if types.get(name, TensorProto.FLOAT) not in (TensorProto.FLOAT, TensorProto.UNDEFINED):
            return  # an integer tensor (a QuantizeLinear already in the model, and what moves it)
        result.activations[name] = exponent

    for name in quantized.inputs:
        pair(name)
    onnx_nodes = {node.output[0]: node for node in model.graph.node if node.output}
    fused_from = {relu_out: conv_out for conv_out, relu_out in plan.fused.items()}
    # What the lowering inserted: RequantizeLinear nodes, and the QuantizeLinear giving a Softmax output its
    # integer copy; each is a pair on its reader's edge.
    inserted = [
        q
        for q in quantized.nodes
        if q.op_type in ("RequantizeLinear", "QuantizeLinear") and q.outputs[0] not in view.producer
    ]
    requantized = {q.outputs[0] for q in inserted}
    for qnode in quantized.nodes:
        for output in qnode.outputs:
            if output in view.producer or output in quantized.inputs:
                pair(output)
        node = onnx_nodes.get(fused_from.get(qnode.outputs[0], qnode.outputs[0])) if qnode.outputs else None
        if node is None or qnode.outputs[0] in requantized:
            continue  # a RequantizeLinear the lowering inserted: its consumer's edge below
        spec = get_op_spec(node.op_type)
        attrs = node_attributes(node, opset_version(model))
        key = _node_key(node)
        for position, tensor in enumerate(qnode.inputs):
            original = node.input[position] if position < len(node.input) else ""
            role = spec.input_spec(position) if spec is not None else None
            if not tensor or not original or role is None:
                continue
            if tensor in requantized:
                result.requantize[(key, position)] = quantized.exponent(tensor)
            elif view.is_constant(original) and tensor in quantized.constants and role.role in _QUANTIZED_ROLES:
                axis = role.resolve_channel_axis(attrs) if role.role is Role.WEIGHT else 0
                result.constants[(key, position)] = _ConstantQuant(
                    original,
                    _exponent_tuple(quantized.exponents[tensor]),
                    axis,
                    _QUANTIZED_ROLES[role.role],
                    np.asarray(quantized.constants[tensor], dtype=np.int64),
                )
    return result


def _check_exponents(name: str, exponent: int | Iterable[int], source: str) -> None:
    values = [exponent] if isinstance(exponent, int) else list(exponent)
    bad = [e for e in values if not _MIN_EXPONENT <= e <= _MAX_EXPONENT]
    if bad:
        raise QuantTableError(
            f"{source}: exponent {bad[0]} of {name!r} gives a scale 2^{bad[0]} that is not a normal float32 "
            f"(exponents {_MIN_EXPONENT}..{_MAX_EXPONENT}); calibrate this model again."
        )


def _scale_array(exponent: int | tuple[int, ...]) -> np.ndarray:
    values = np.asarray(exponent, dtype=np.float64)
    return np.power(2.0, values).astype(np.float32)


def _per_axis(use: _ConstantQuant, value: np.ndarray, source: str) -> int | None:
    """The normalized axis of a per-channel exponent list (None for one exponent), its length checked."""
    if not isinstance(use.exponent, tuple):
        return None
    if value.ndim == 0:
        raise QuantTableError(f"{source}: {use.tensor!r} is a scalar but has {len(use.exponent)} exponents.")
    axis = (use.axis if use.axis is not None else 0) % value.ndim
    if use.kind != "weight" and value.shape[axis] != len(use.exponent):
        axis = value.ndim - 1  # a (1, N) Gemm bias: its channels are the last axis
    if value.shape[axis] != len(use.exponent):
        raise QuantTableError(
            f"{source}: {use.tensor!r} has {len(use.exponent)} per-channel exponents but {value.shape[axis]} "
            f"channels along axis {axis}; the table belongs to another model, calibrate it again."
        )
    return axis


class _Builder:
    """Applies a :class:`_QdqPlan` to a (copied, opset-upgraded) model."""

    def __init__(self, model: onnx.ModelProto, bits: int, source: str) -> None:
        self.model = model
        self.graph = model.graph
        self.bits = bits
        self.source = source
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.new_initializers: list[TensorProto] = []
        self.taken: set[str] = set(self.initializers)
        for node in self.graph.node:
            self.taken.update(node.input)
            self.taken.update(node.output)
            self.taken.add(node.name)
        self.taken.update(info.name for info in [*self.graph.input, *self.graph.output, *self.graph.value_info])
        self.constant_outputs: dict[_ConstantQuant, str] = {}
        self.requantized: dict[tuple[str, int], str] = {}
        self.replaced: set[str] = set()

    def _initializer(self, base: str, value: np.ndarray) -> str:
        name = unique_name(base, self.taken)
        # np.array keeps a 0-d scale 0-d (np.ascontiguousarray would make it shape (1,)).
        self.new_initializers.append(numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def _zero_point(self, base: str, size: int | None, bits: int) -> str:
        dtype = _INT_DTYPE[bits]
        value = np.zeros(size, dtype=dtype) if size is not None else np.zeros((), dtype=dtype)
        return self._initializer(f"{base}_zero_point", value)

    def pair(self, source: str, output: str, exponent: int, label: str) -> list[onnx.NodeProto]:
        """``source`` -> QuantizeLinear -> DequantizeLinear -> ``output`` at scale ``2^exponent``."""
        _check_exponents(label, exponent, self.source)
        scale = self._initializer(f"{label}_scale", _scale_array(exponent))
        zero = self._zero_point(label, None, self.bits)
        quantized = unique_name(f"{label}_quantized", self.taken)
        return [
            helper.make_node(
                "QuantizeLinear",
                [source, scale, zero],
                [quantized],
                name=unique_name(f"{label}_QuantizeLinear", self.taken),
            ),
            helper.make_node(
                "DequantizeLinear",
                [quantized, scale, zero],
                [output],
                name=unique_name(f"{label}_DequantizeLinear", self.taken),
            ),
        ]

    def constant(self, use: _ConstantQuant, emitted: list[onnx.NodeProto]) -> str:
        """The DequantizeLinear output standing for ``use`` (one per distinct quantization of a constant)."""
        existing = self.constant_outputs.get(use)
        if existing is not None:
            return existing
        tensor = self.initializers.get(use.tensor)
        if tensor is None:
            raise ModelError(f"the constant {use.tensor!r} disappeared while upgrading the model's opset.")
        value = numpy_helper.to_array(tensor)
        _check_exponents(use.tensor, use.exponent, self.source)
        axis = _per_axis(use, value, self.source)
        ints = use.ints.reshape(value.shape)
        self.replaced.add(use.tensor)
        if use.kind == "bias" and not np.array_equal(ints, saturate(ints, _BIAS_BITS)):
            if self.bits == 8:
                ints = saturate(ints, _BIAS_BITS)  # the chip keeps at most 32 bits of an int8 model's bias too
            else:
                return self._float_bias(use, ints, axis)
        dtype = np.int32 if use.kind == "bias" else _INT_DTYPE[self.bits]
        quantized = self._initializer(f"{use.tensor}_quantized", ints.astype(dtype))
        scale = self._initializer(f"{use.tensor}_scale", _scale_array(use.exponent))
        inputs = [quantized, scale]
        if use.kind != "bias":  # an int32 DequantizeLinear takes no zero point (it is 0 by definition)
            inputs.append(self._zero_point(use.tensor, len(use.exponent) if axis is not None else None, self.bits))
        output = unique_name(f"{use.tensor}_dequantized", self.taken)
        attrs = {"axis": axis} if axis is not None else {}
        emitted.append(
            helper.make_node(
                "DequantizeLinear",
                inputs,
                [output],
                name=unique_name(f"{use.tensor}_DequantizeLinear", self.taken),
                **attrs,
            )
        )
        self.constant_outputs[use] = output
        return output

    def _float_bias(self, use: _ConstantQuant, ints: np.ndarray, axis: int | None) -> str:
        """An int16 model's bias beyond int32: the float32 of ``q * 2^e`` (what DequantizeLinear would give)."""
        scale = _scale_array(use.exponent)
        if axis is not None:
            shape = [1] * ints.ndim
            shape[axis] = scale.size
            scale = scale.reshape(shape)
        name = self._initializer(f"{use.tensor}_quantized_value", (ints.astype(np.float64) * scale).astype(np.float32))
        logger.info("bias %r does not fit in int32: kept as the float32 of its quantized value", use.tensor)
        self.constant_outputs[use] = name
        return name

    def apply(self, plan: _QdqPlan) -> None:
        graph = self.graph
        nodes: list[onnx.NodeProto] = []
        renamed_inputs: dict[str, str] = {}
        for info in graph.input:
            exponent = plan.activations.get(info.name)
            if exponent is not None and info.name not in self.initializers:
                output = unique_name(f"{info.name}_dequantized", self.taken)
                nodes.extend(self.pair(info.name, output, exponent, info.name))
                renamed_inputs[info.name] = output
        for original in graph.node:
            node = onnx.NodeProto()
            node.CopyFrom(original)
            key = _node_key(original)
            for position, name in enumerate(node.input):
                if name in renamed_inputs:
                    node.input[position] = renamed_inputs[name]
            for position in range(len(node.input)):
                use = plan.constants.get((key, position))
                if use is not None:
                    node.input[position] = self.constant(use, nodes)
                target = plan.requantize.get((key, position))
                if target is not None:
                    node.input[position] = self._requantized(node.input[position], target, nodes)
            nodes.append(node)
            for position, output in enumerate(node.output):
                exponent = plan.activations.get(output)
                if not output or exponent is None:
                    continue
                float_name = unique_name(f"{output}_float", self.taken)
                node.output[position] = float_name
                nodes.extend(self.pair(float_name, output, exponent, output))
        del graph.node[:]
        graph.node.extend(nodes)
        self._drop_replaced()
        graph.initializer.extend(self.new_initializers)

    def _requantized(self, tensor: str, exponent: int, emitted: list[onnx.NodeProto]) -> str:
        """``tensor`` brought to ``2^exponent`` as the chip's RequantizeLinear does, once per target."""
        existing = self.requantized.get((tensor, exponent))
        if existing is None:
            existing = unique_name(f"{tensor}_requantized", self.taken)
            emitted.extend(self.pair(tensor, existing, exponent, f"{tensor}_requant"))
            self.requantized[(tensor, exponent)] = existing
        return existing

    def _drop_replaced(self) -> None:
        """Remove float initializers that every reader now takes through a DequantizeLinear."""
        used = set(_referenced(self.graph))
        kept = [t for t in self.graph.initializer if t.name not in self.replaced or t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)


def _referenced(graph: onnx.GraphProto) -> Iterable[str]:
    """Every tensor name read by a node (subgraphs included) or declared as a graph output."""
    for node in graph.node:
        yield from node.input
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _referenced(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _referenced(sub)
    yield from (o.name for o in graph.output)


def _upgrade_opset(model: onnx.ModelProto, required: int, bits: int) -> onnx.ModelProto:
    """``model`` at default-domain opset ``required`` or newer (converted with onnx's version converter)."""
    current = opset_version(model)
    if current >= required:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, required)
    except Exception as exc:  # noqa: BLE001 - the converter raises many types; all mean the same to the user
        raise ModelError(
            f"the model imports ONNX opset {current}, int{bits} QuantizeLinear/DequantizeLinear need opset "
            f"{required}, and onnx could not convert it ({type(exc).__name__}: {exc}). Export the float model at "
            f"opset {required} or newer."
        ) from exc
    # The converter stamps the installed onnx's newest IR version, which an older onnxruntime refuses: keep the
    # input's, raised only as far as the new opset needs.
    minimum_ir = helper.find_min_ir_version_for([helper.make_opsetid("", required)])
    converted.ir_version = max(model.ir_version, minimum_ir)
    return converted


def export_qdq(
    model_proto: onnx.ModelProto, table: QuantTable | str | os.PathLike[str], bits: int | str | None = None
) -> onnx.ModelProto:
    """The float model with QuantizeLinear/DequantizeLinear pairs at the table's power-of-two scales.

    Args:
        model_proto: the float model the table was calibrated on (not modified).
        table: its quantization table, or the path of one.
        bits: ``"int8"``/``"int16"``; only needed for a legacy table that does not record its width.

    Returns:
        A new, checked ONNX model that opens in Netron and runs in onnxruntime (see the module docstring).

    Raises:
        QuantTableError: a table of another model or width, missing tensors, or exponents no float32 scale has.
        OptionError: a legacy table without its width and no ``bits``.
        UnsupportedModelError: an op ESP-DL cannot run.
        ModelError: the opset upgrade int16 needs failed, or the result is not valid ONNX.
    """
    quant_table, source = _load_table(table)
    if quant_table.metadata.get("int16_layers"):
        raise OptionError(
            f"{source}: a mixed-precision table (int16 layers) cannot be exported as QDQ yet; export the int8 "
            "table, or use --format espdl, which runs mixed models."
        )
    width = _resolve_bits(quant_table, bits, source)
    quant_table.check_model(model_proto, (), source)  # another model's table first: the clearest message
    plan = plan_calibration(model_proto)
    narrow = int8_fallbacks(plan, width)
    if narrow:  # the pairs below carry one width
        raise OptionError(
            f"{source}: {', '.join(f'{f.node!r} ({f.op_type})' for f in narrow)} run(s) at int8 in this int16 model "
            "(no int16 kernel on the chip); a QDQ model holds one width: use --format espdl, which runs them."
        )
    qdq_plan = _plan_qdq(model_proto, quant_table, plan, width)
    copy = onnx.ModelProto()
    copy.CopyFrom(model_proto)
    model = _upgrade_opset(copy, QDQ_OPSET[width], width)
    builder = _Builder(model, width, source)
    builder.apply(qdq_plan)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"the exported QDQ model is not valid ONNX ({first}); please report this model.") from exc
    except ValueError:
        pass  # above 2 GiB the in-memory checker cannot run; save_model writes external data
    return model


def save_qdq(
    model_proto: onnx.ModelProto,
    table: QuantTable | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    bits: int | str | None = None,
) -> Path:
    """Export the QDQ model and write it to ``path`` atomically (never a half-written file).

    An existing ``path`` is refused unless ``force``: a finished model is not overwritten by accident. The
    caller makes sure ``path`` is not the input model.
    """
    target = Path(path)
    if target.exists() and not force:
        raise OptionError(f"{target}: the file already exists; use --force (force=True) to overwrite it.")
    model = export_qdq(model_proto, table, bits)
    save_model(model, target)
    return target


def _feeds(model: onnx.ModelProto, data: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    if not isinstance(data, dict):
        if len(names) != 1:
            raise DatasetError(f"the model has {len(names)} inputs {names}: pass the data as a dict name -> array.")
        data = {names[0]: data}
    if set(data) != set(names):
        raise DatasetError(f"inputs {sorted(data)} do not match the model's {names}.")
    feeds = {}
    for name, value in data.items():
        array = np.asarray(value)
        if array.dtype.kind not in "fiu":
            raise DatasetError(f"input {name!r}: dtype {array.dtype} is not numeric.")
        if array.ndim == 0 or array.shape[0] == 0:
            raise DatasetError(f"input {name!r}: no samples (shape {array.shape}).")
        if not np.all(np.isfinite(array)):
            raise DatasetError(f"input {name!r}: contains NaN or Inf.")
        feeds[name] = array.astype(np.float32)
    return feeds


def qdq_agreement(
    model_proto: onnx.ModelProto,
    table: QuantTable | str | os.PathLike[str],
    target: str,
    data: np.ndarray | dict[str, np.ndarray],
    *,
    bits: int | str | None = None,
) -> dict[str, dict[str, float | int | None]]:
    """How far onnxruntime on the QDQ model is from the espquant simulation of ``target``.

    Both run on ``data`` (float inputs, batch first). Per graph output: ``equal_fraction`` (values exactly
    equal), ``max_abs_diff``, ``top1_agreement`` (same argmax per row, for 2-D ``(N, classes)`` outputs,
    else None) and ``elements``. The module docstring explains why they are not always equal.
    """
    from espquant.quant.profiles import get_target
    from espquant.runtime import create_session
    from espquant.simulator.lowering import build_quantized_model
    from espquant.simulator.simulate import simulate

    quant_table, source = _load_table(table)
    if quant_table.metadata.get("int16_layers"):
        raise OptionError(
            f"{source}: a mixed-precision table (int16 layers) cannot be exported as QDQ yet; export the int8 "
            "table, or use --format espdl, which runs mixed models."
        )
    width = _resolve_bits(quant_table, bits, source)
    qdq = export_qdq(model_proto, quant_table, width)
    feeds = _feeds(model_proto, data)
    quantized = build_quantized_model(model_proto, quant_table, get_target(target), width)
    simulated, names = simulate(quantized, model_proto, feeds, to_float=True)
    session = create_session(qdq, what="the QDQ model")
    # The QDQ model keeps the float model's inputs: a fixed batch B runs B samples at a time, as simulate does.
    runtime = Chunking.of(model_proto).run(lambda f: session.run(names, f), feeds)
    report: dict[str, dict[str, float | int | None]] = {}
    for name, ours, theirs in zip(names, runtime, simulated):
        a, b = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
        if a.shape != b.shape:
            raise ModelError(f"output {name!r}: onnxruntime gives shape {a.shape}, the simulator {b.shape}.")
        top1 = float(np.mean(a.argmax(axis=1) == b.argmax(axis=1))) if a.ndim == 2 and a.shape[1] > 1 else None
        report[name] = {
            "equal_fraction": float(np.mean(a == b)) if a.size else 1.0,
            "max_abs_diff": float(np.max(np.abs(a - b))) if a.size else 0.0,
            "top1_agreement": top1,
            "elements": int(a.size),
        }
    return report
