"""Lowering an ONNX float model and its quantization table to the integer model for one target: integer weights
and biases, exponents, fused Relu, int8 / int16 tables, a RequantizeLinear wherever a consumer needs another
exponent or width (or a PRelu another output exponent than the target's kernel can write); and the checks of
what the runtime can apply (shifts at most ``MAX_RIGHT_SHIFT``)."""

from __future__ import annotations

import logging

import numpy as np
import onnx

from espquant.calibration.plan import plan_calibration
from espquant.calibration.precision import equivalent_exponent, tensor_widths
from espquant.errors import QuantTableError
from espquant.graph import GraphView, node_attributes, opset_version
from espquant.ops import ExponentRule, OpSpec, Role
from espquant.ops.activations import SOFTMAX_FAMILY, int8_softmax_overflows
from espquant.ops.recurrent import RECURRENT_OPS
from espquant.optimizer.shapes import inferred_value_info
from espquant.quant.pot import EXPONENT_LIMIT, MAX_RIGHT_SHIFT
from espquant.quant.profiles import TargetProfile
from espquant.quant.rounding import round_float, saturate
from espquant.simulator.activations import (
    FLOAT_FUNCTIONS,
    INT16_LUT_STEP,
    TABLE_ONLY,
    float_function,
    lut_table,
    lut_table_int16,
)
from espquant.simulator.kernels import prelu_rescales_positives
from espquant.simulator.quantized_model import QNode, QuantizedModel
from espquant.simulator.recurrent import lower_recurrent
from espquant.table import QuantTable

__all__ = ["build_quantized_model", "lower_for_target", "check_shifts", "check_activation_exponents"]

F32 = np.float32
logger = logging.getLogger(__name__)



def _quantize_constant(value: np.ndarray, exponent: int | list[int], axis: int | None, bits: int, rounding: str):
    if isinstance(exponent, list):
        shape = [1] * value.ndim
        shape[axis if axis is not None else 0] = len(exponent)
        scale = (2.0 ** -np.asarray(exponent, dtype=np.float64)).reshape(shape)
    else:
        scale = 2.0**-exponent
    return saturate(round_float(value.astype(np.float64) * scale, rounding), bits)


def build_quantized_model(
    model: onnx.ModelProto, table: QuantTable, profile: TargetProfile, bits: int
) -> QuantizedModel:
    """Integer model of ``model`` under ``table`` for ``profile`` (see the module docstring)."""
    plan = plan_calibration(model)
    needed = set(plan.activations) | set(plan.fixed) | {w.tensor for w in plan.weights} | set(plan.constants)
    equalized = table.model_for(model, sorted(needed))  # the table's weight factors (equalization) applied
    if equalized is not model:  # the plan's nodes must be the nodes of the model lowered (fused Relu by identity)
        model, plan = equalized, plan_calibration(equalized)
    view = GraphView(model.graph)
    if not model.graph.value_info and len(model.graph.node) > 1:  # a model built in code, not optimized
        # What the compiled path decides from (a Mul's SIMD path, a layer small enough to stay in its segment,
        # runs of many samples at once) needs the shapes between the nodes: inferred here, the model left as is.
        for info in inferred_value_info(model):
            view.value_info.setdefault(info.name, info)
    opset = opset_version(model)
    for use in plan.weights:
        shape = view.array(use.tensor).shape
        channels = shape[use.channel_axis] if use.channel_axis is not None and shape else 1
        table.check_channels(use.tensor, int(channels))
        exponent = table.exponents.get(use.tensor)
        if isinstance(exponent, list) and len(exponent) > 1 and not profile.per_channel_weights:
            raise QuantTableError(
                f"{use.tensor!r} has one exponent per channel, which {profile.name} cannot run (its kernels take one "
                "weight exponent per layer); calibrate with granularity per-tensor, or target esp32p4."
            )
    exps = dict(table.exponents)
    widths = tensor_widths(model, plan, bits, table.metadata.get("int16_layers") or [])
    constants: dict[str, np.ndarray] = {}
    nodes: list[QNode] = []
    # The Relu nodes absorbed by their Conv/Gemm/MatMul, by identity (names may be empty in unoptimized models).
    fused_relu_nodes = {id(view.single_consumer(out)) for out in plan.fused}
    requantized = 0
    rounding = profile.rounding

    def requantize_to(tensor: str, target: int, consumer: str, width: int) -> str:
        """``tensor`` at exponent ``target`` and ``width`` bits: through one RequantizeLinear when it differs."""
        nonlocal requantized
        current = exps.get(tensor)
        if tensor in constants or view.is_constant(tensor) or not isinstance(current, int):
            return tensor
        if current == target and widths.get(tensor, bits) == width:
            return tensor
        name = f"{tensor}__requant_{target}" + ("" if width == bits else f"_int{width}")
        if name not in exps:
            nodes.append(QNode("RequantizeLinear", f"{consumer}__requant", [tensor], [name], {}, bits=width))
            exps[name] = target
            if width != bits:
                widths[name] = width
            requantized += 1
        return name

    def at_width(tensor: str, width: int) -> int | None:
        """The exponent that keeps ``tensor``'s range at ``width`` bits (int8 e -> int16 e - 8)."""
        value = exps.get(tensor)
        return equivalent_exponent(value, widths.get(tensor, bits), width) if isinstance(value, int) else None

    for node, spec in plan.nodes:
        if id(node) in fused_relu_nodes:
            continue
        attrs = node_attributes(node, opset)
        outputs = list(node.output)
        relu = False
        if outputs and outputs[0] in plan.fused:
            outputs[0] = plan.fused[outputs[0]]
            relu = True
        out_exp = exps.get(outputs[0]) if outputs else None
        node_bits = widths.get(outputs[0], bits) if outputs else bits
        # Ops that read their activation inputs at the output's exponent (PASSTHROUGH: the first input only).
        # A rescaled-output op (PRelu) reads its input at the input's own exponent and writes the output's.
        aligns_to_output = isinstance(out_exp, int) and (
            spec.exponent in (ExponentRule.ALIGN_TO_OUTPUT, ExponentRule.SHARED)
            or (spec.exponent is ExponentRule.PASSTHROUGH and not spec.rescaled_output)
        )
        inputs = list(node.input)
        if id(node) in plan.copy_readers:  # reads the integer copy of a float32 tensor (a Softmax output)
            inputs = [plan.quantized_copies.get(t, t) for t in inputs]
        for position, tensor in enumerate(inputs):
            role = spec.input_spec(position)
            if not tensor or role is None or not view.is_constant(tensor):
                continue
            value = view.array(tensor)
            if role.role is Role.WEIGHT:
                axis = role.resolve_channel_axis(attrs)
                constants[tensor] = _quantize_constant(value, exps[tensor], axis, node_bits, rounding)
            elif role.role is Role.BIAS:
                bias_bits = profile.bias_bits[node_bits]
                exps[tensor] = _bias_exponent(exps, tensor, at_width(inputs[0], node_bits), inputs, spec)
                constants[tensor] = _quantize_constant(value, exps[tensor], 0, bias_bits, rounding)
            elif role.role in (Role.ACTIVATION, Role.QPARAM):
                target = exps.get(tensor, out_exp)
                if spec.exponent in (ExponentRule.ALIGN_TO_OUTPUT, ExponentRule.SHARED) and isinstance(out_exp, int):
                    target = out_exp
                if role.role is Role.QPARAM:  # compared with the first input's integers as the node reads them
                    read_at = out_exp if aligns_to_output else at_width(inputs[0], node_bits)
                    target = read_at if read_at is not None else target
                name = tensor
                if tensor in constants and (exps.get(tensor) != target or widths.get(tensor, bits) != node_bits):
                    # One initializer read at several exponents (torch shares one Clip bound between every
                    # ReLU6): each exponent gets its own integer copy.
                    name = f"{tensor}__e{target}" + ("" if node_bits == bits else f"_int{node_bits}")
                exps[name] = target
                if node_bits != bits:
                    widths[name] = node_bits
                constants[name] = _quantize_constant(value, target, None, node_bits, rounding)
                inputs[position] = name
            else:  # integer parameters, indices, ignored inputs: as they are
                constants[tensor] = value
        # Every activation input at the exponent the rule asks for and at the node's width, in one step.
        activations = [
            i for i, t in enumerate(inputs) if t and spec.input_spec(i) and spec.input_spec(i).role is Role.ACTIVATION
        ]
        targets: dict[int, int | None] = {i: at_width(inputs[i], node_bits) for i in activations}
        if aligns_to_output:
            aligned = activations[:1] if spec.exponent is ExponentRule.PASSTHROUGH else activations
            targets.update(dict.fromkeys(aligned, out_exp))
        elif spec.exponent is ExponentRule.ALIGN_TO_LARGEST:
            present = [e for e in targets.values() if e is not None]
            if present:
                targets = dict.fromkeys(activations, max(present))
        for position, target in targets.items():
            if target is not None and inputs[position] not in constants:
                inputs[position] = requantize_to(inputs[position], target, node.name, node_bits)
        softmax_exponent = exps.get(inputs[0]) if node.op_type in SOFTMAX_FAMILY and node_bits == 8 else None
        if isinstance(softmax_exponent, int) and int8_softmax_overflows(softmax_exponent):  # tables not espquant's
            logger.warning(
                "int8 %s %r: input exponent %d lets the runtime's exp table overflow (inf / NaN on the chip, "
                "ARITHMETIC.md 10); calibrate again with espquant (it runs such a layer at int16) or list it in "
                "the int16 layers",
                node.op_type,
                node.name,
                softmax_exponent,
            )
        qnode = QNode(node.op_type, node.name, inputs, outputs, attrs, relu=relu, bits=node_bits)
        qnode.input_shapes = [view.shape(t) if t else None for t in node.input]
        if node_bits == 8 and spec.int8_lut and node.op_type in FLOAT_FUNCTIONS and isinstance(out_exp, int):
            in_exp = exps[inputs[0]]
            qnode.table = lut_table(float_function(node.op_type, attrs), in_exp, out_exp, rounding)  # type: ignore[arg-type]
        elif node_bits == 16 and node.op_type in TABLE_ONLY and isinstance(out_exp, int):
            fn = float_function(node.op_type, attrs)
            qnode.table = lut_table_int16(fn, exps[inputs[0]], out_exp, rounding)  # type: ignore[arg-type]
            qnode.attrs["int16_lut_step"] = INT16_LUT_STEP
        elif (
            node_bits == 8
            and node.op_type == "PRelu"
            and view.is_constant(inputs[1])
            and view.array(inputs[1]).size == 1
        ):
            slope = F32(view.array(inputs[1]).reshape(-1)[0])  # one slope: the int8 table (8.1)
            qnode.table = lut_table(
                lambda x, s=slope: np.where(x >= 0, x, x * s).astype(F32), exps[inputs[0]], out_exp, rounding
            )  # type: ignore[arg-type]
        if node.op_type in RECURRENT_OPS:  # gate exponent, int16 bias and states (simulator/recurrent.py)
            lower_recurrent(qnode, node, view, exps, widths, constants, bits, rounding, requantize_to)
        e_in = exps.get(inputs[0]) if inputs and inputs[0] else None
        if (
            node.op_type == "PRelu"
            and qnode.table is None
            and isinstance(e_in, int)
            and isinstance(out_exp, int)
            and e_in != out_exp
            and not prelu_rescales_positives(profile, node_bits)
        ):
            # This target's kernel copies positive values (8.4, C path): the PRelu writes its input's exponent,
            # and a RequantizeLinear (dl_module_requantize_linear.hpp) takes the output to the table's.
            at_input = f"{outputs[0]}__e{e_in}"
            exps[at_input] = e_in
            if node_bits != bits:
                widths[at_input] = node_bits
            qnode.outputs = [at_input, *outputs[1:]]
            nodes.append(qnode)
            qnode = QNode("RequantizeLinear", f"{node.name}__requant", [at_input], outputs[:1], {}, bits=node_bits)
            requantized += 1
        nodes.append(qnode)
        for output in outputs:
            if output in plan.quantized_copies:
                nodes.append(_quantize_copy(output, plan.quantized_copies[output], qnode, exps, widths, bits))
    graph_inputs = [i.name for i in model.graph.input if i.name in view.graph_inputs]
    quantized = QuantizedModel(
        nodes=nodes,
        constants=constants,
        exponents=exps,
        inputs=graph_inputs,
        outputs=[o.name for o in model.graph.output],
        profile=profile,
        bits=bits,
        float_tensors=set(plan.float_tensors),
        widths=widths,
        requantized=requantized,
    )
    check_shifts(quantized)
    check_activation_exponents(quantized)
    _warn_unknown_rules(quantized)
    return quantized


def _quantize_copy(
    tensor: str, copy: str, producer: QNode, exps: dict[str, int | list[int]], widths: dict[str, int], bits: int
) -> QNode:
    """The QuantizeLinear that gives a float32 output its integer copy at the tensor's table exponent, at the
    producer's width: ESP-DL's QuantizeLinear module (``RequantizeLinear``, dl_module_requantize_linear.hpp)
    rounds ``x * 2^-e`` and saturates (``TensorBase::assign``, dl_tensor_base.cpp)."""
    exponent = exps.get(tensor)
    if not isinstance(exponent, int):
        raise QuantTableError(
            f"{tensor!r} is read as integers by the next layer, so the table needs its exponent; calibrate again."
        )
    exps[copy] = exponent
    if producer.bits != bits:
        widths[copy] = producer.bits
    return QNode("QuantizeLinear", f"{producer.name or tensor}__quantize", [tensor], [copy], {}, bits=producer.bits)


def _bias_exponent(
    exps: dict[str, int | list[int]], bias: str, e_in: int | None, inputs: list[str], spec: OpSpec
) -> int | list[int]:
    """ESP-DL adds the bias to the accumulator, so its exponent is ``e_in + e_w`` (per channel with the weight),
    whatever the table says: the original toolkit's tables hold the legacy library's bias exponent there."""
    weights = [inputs[p] for p in spec.weight_inputs if p < len(inputs) and inputs[p] in exps]
    if e_in is None or not weights:
        return exps[bias]
    e_w = exps[weights[0]]
    return [e_in + e for e in e_w] if isinstance(e_w, list) else e_in + e_w


def _warn_unknown_rules(m: QuantizedModel) -> None:
    """Say where the chip's rule is not known and the simulation follows ESP-DL's C reference instead."""
    if m.profile.family != "p4":
        return
    for node in m.nodes:
        if node.op_type == "PRelu" and node.table is None and node.bits == 8:
            logger.warning(
                "PRelu %r with per-channel slopes on ESP32-P4 int8: the chip's esp.vprelu rounding of negative "
                "values is not documented; espquant takes ESP-DL's C reference (floor), which may differ by 1 LSB "
                "on the chip",
                node.name,
            )


def lower_for_target(model: onnx.ModelProto, table: QuantTable, target: str | TargetProfile) -> QuantizedModel:
    """The integer model of ``model`` under ``table`` for ``target``, at the table's width (8 when it does not
    say): what the engines (layer report, QDQ comparison) simulate without the legacy ``Evaluator``."""
    from espquant.quant.profiles import get_target

    profile = target if isinstance(target, TargetProfile) else get_target(target)
    return build_quantized_model(model, table, profile, int(table.metadata.get("bits", 8)))


def _shift_operands(m: QuantizedModel, node: QNode) -> tuple[str, list[str]] | None:
    """The tensor whose exponent sets a node's right shift, and the inputs the shift subtracts."""
    if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Mul") and len(node.inputs) > 1:
        return node.inputs[1], node.inputs[:2]
    if node.op_type == "PRelu" and node.table is None:
        return node.inputs[1], node.inputs[:2]
    if node.op_type == "RequantizeLinear":
        return node.inputs[0], node.inputs[:1]
    return None


def check_activation_exponents(m: QuantizedModel) -> None:
    """Activations must use exponents ESP-DL can scale by (``±EXPONENT_LIMIT``), naming the first that does not:
    beyond it the runtime's ``1 << e`` is undefined C and the simulated numbers mean nothing."""
    for node in m.nodes:
        for tensor in (*node.inputs, *node.outputs):
            if not tensor or tensor in m.constants or tensor in m.float_tensors or tensor not in m.exponents:
                continue
            exponent = m.exponents[tensor]
            if isinstance(exponent, int) and abs(exponent) > EXPONENT_LIMIT:
                raise QuantTableError(
                    f"the exponent of {tensor!r} is {exponent}; ESP-DL scales activations by 1 << |e|, defined for "
                    f"|e| <= {EXPONENT_LIMIT}. Calibrate again (espquant keeps exponents in that range)."
                )


def check_shifts(m: QuantizedModel) -> None:
    """Refuse exponents whose shifts the runtime cannot apply (more than ``MAX_RIGHT_SHIFT`` to the right),
    naming the tensor: its kernels shift int32 values with C shifts, undefined from 32 on."""
    problems = []
    for node in m.nodes:
        found = _shift_operands(m, node)
        if found is None or not node.outputs or node.outputs[0] in m.float_tensors:
            continue
        tensor, operands = found
        if any(t in m.float_tensors or t not in m.exponents for t in operands) or node.outputs[0] not in m.exponents:
            continue
        e_out = m.exponent(node.outputs[0])
        fixed = sum(m.exponent(t) for t in operands if t != tensor)
        own = np.asarray(m.exponents[tensor], dtype=np.int64).reshape(-1)
        shift = int((e_out - fixed - own).max(initial=0))
        if shift > MAX_RIGHT_SHIFT:
            where = f"node {node.name or node.outputs[0]!r} ({node.op_type})"
            problems.append(
                f"{where}: exponent {int(own.min())} of {tensor!r} makes a right shift of {shift} "
                f"(e_out {e_out}); the runtime shifts at most {MAX_RIGHT_SHIFT}"
            )
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise QuantTableError(
            f"the table asks for shifts the chip cannot apply: {shown}. Calibrate again with espquant (it keeps "
            f"every shift at most {MAX_RIGHT_SHIFT}), or raise the exponent of the tensor named."
        )


