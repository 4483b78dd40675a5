"""Reductions, quantization nodes, normalisations and recurrent ops (ARITHMETIC.md sections 6 and 10)."""

from __future__ import annotations

import numpy as np

from espquant.ops import recurrent
from espquant.ops.spec import (
    Constraint,
    ExponentRule,
    NodeContext,
    OpSpec,
    activation,
    attr_in,
    float_param,
    ignored,
    param,
)

__all__ = ["SPECS"]


def _power_of_two_scale(ctx: NodeContext) -> str | None:
    """ESP-DL ignores Q/DQ scales and zero points, so they must already say what the runtime does: one
    power-of-two scale (the exponent) and a zero zero-point."""
    scale = ctx.constants.get(1)
    if scale is None:
        return "the scale is computed at run time; ESP-DL needs a constant power-of-two scale"
    values = np.unique(np.asarray(scale, dtype=np.float64).reshape(-1))
    if values.size != 1 or not (values[0] > 0 and np.log2(values[0]).is_integer()):
        return f"scale {values[:4].tolist()} is not one power of two (ESP-DL numbers are int * 2^exponent)"
    zero_point = ctx.constants.get(2)
    if zero_point is not None and np.any(np.asarray(zero_point) != 0):
        return "the zero point is not 0 (ESP-DL quantization is symmetric)"
    return None


_QDQ_SCALE = Constraint(
    "input scale",
    _power_of_two_scale,
    "re-quantize the model with power-of-two scales and zero point 0, or remove the Q/DQ pairs and let "
    "espquant calibrate the float model",
)


def _reduced_axes(ctx: NodeContext) -> list[bool] | None:
    """Which input axes the node reduces (ONNX rules: axes input or attribute, empty means all unless
    ``noop_with_empty_axes``), or None when the rank or the axes are unknown."""
    rank = ctx.rank(0)
    if rank is None:
        return None
    if ctx.has_input(1):
        if 1 not in ctx.constants:
            return None
        axes = [int(a) for a in np.asarray(ctx.constants[1]).reshape(-1)]
    else:
        axes = [int(a) for a in ctx.attrs.get("axes", [])]
    if not axes:
        return [not ctx.attrs.get("noop_with_empty_axes", 0)] * rank
    return [axis in {a % rank for a in axes} for axis in range(rank)]


def _reduce_pattern(ctx: NodeContext) -> str | None:
    """ReduceBase::forward_template (dl_module_reduce_base.hpp) merges neighbouring axes that are both reduced
    or both kept, and has a loop only for up to 4 merged axes that alternate; any other pattern leaves the
    output unwritten. Reducing nothing is refused too (the runtime would reduce everything)."""
    flags = _reduced_axes(ctx)
    if flags is None:
        return None
    if not any(flags):
        return "the node reduces no axis (noop_with_empty_axes); ESP-DL would reduce every axis"
    merged = [flag for k, flag in enumerate(flags) if k == 0 or flag != flags[k - 1]]
    if len(merged) > 4:
        return (
            f"reduced axes {[k for k, f in enumerate(flags) if f]} of a rank-{len(flags)} input alternate "
            f"{len(merged)} times; ESP-DL's Reduce handles at most 4 alternating runs"
        )
    return None


_REDUCE_PATTERN = Constraint(
    "input axes", _reduce_pattern, "reshape the input so that the reduced axes form at most two runs"
)


def _reduce(op_type: str, exponent: ExponentRule, ref: str, **extra) -> OpSpec:
    return OpSpec(
        op_type,
        "reduction",
        (activation("data"), param("axes", optional=True)),
        exponent,
        ref,
        constraints=(_REDUCE_PATTERN,),
        **extra,
    )


def _only_y(ctx: NodeContext) -> str | None:
    """ESP-DL computes Mean / InvStdDev only for LayerNormalization, and quantizes them with the input's
    scale folded in twice (dl_module_layer_normalization.hpp); espquant supports Y alone."""
    extra = [o for o in ctx.node.output[1:] if o]
    return f"outputs {extra} are used; ESP-DL's normalisation is supported for its first output only" if extra else None


_ONLY_Y = Constraint("outputs", _only_y, "use only the normalised output Y")


def _normalized_operands(ctx: NodeContext) -> str | None:
    """Scale and B are read element by element over ``x.shape[axis:]``: they must broadcast to that shape."""
    shape = ctx.static_shape(0)
    if shape is None:
        return None
    axis = int(ctx.attrs.get("axis", -1)) % len(shape)
    normalized = shape[axis:]
    for position in (1, 2):
        if ctx.has_input(position) and position in ctx.constants:
            operand = tuple(np.shape(ctx.constants[position]))
            try:
                fits = np.broadcast_shapes(operand, tuple(normalized)) == tuple(normalized)
            except ValueError:
                fits = False
            if not fits:
                shown = list(operand)
                return f"input {position} of shape {shown} does not broadcast to the normalised shape {normalized}"
    return None


_NORMALIZED_OPERANDS = Constraint(
    "input scale", _normalized_operands, "give Scale and B the shape of the normalised axes"
)


SPECS: tuple[OpSpec, ...] = (
    _reduce("ReduceMean", ExponentRule.OWN, "10 (ReduceMean: integer sum, float32 scale)"),
    _reduce("ReduceMax", ExponentRule.PASSTHROUGH, "10 (passive)"),
    _reduce("ReduceMin", ExponentRule.PASSTHROUGH, "10 (passive)"),
    _reduce(
        "ReduceSum",
        ExponentRule.OWN,
        "10; integer sum (int32 / int64), then shift_and_round by e_out - e_in (dl_module_reduce_sum.hpp)",
    ),
    _reduce(
        "ReduceSumSquare",
        ExponentRule.OWN,
        "10; integer sum of squares, then shift_and_round by e_out - 2 e_in (dl_module_reduce_sum_square.hpp)",
    ),
    _reduce(
        "ReduceL1",
        ExponentRule.OWN,
        "10; integer sum of |x| (int32 / int64), then shift_and_round by e_out - e_in (dl_module_reduce_l1.hpp)",
    ),
    _reduce(
        "ReduceL2",
        ExponentRule.OWN,
        "10; integer sum of squares, then float32 sqrt_newton(sum 2^(2 e_in)) 2^-e_out (dl_module_reduce_l2.hpp)",
    ),
    _reduce(
        "ReduceProd",
        ExponentRule.OWN,
        "10; a sequential product of x 2^e_in, float32 at int8 and double at int16 (dl_module_reduce_prod.hpp)",
    ),
    _reduce(
        "ReduceLogSum",
        ExponentRule.OWN,
        "10; integer sum, then float32 log(sum 2^e_in) 2^-e_out (dl_module_reduce_log_sum.hpp)",
        notes=("a negative sum gives NaN, which the chip converts to the largest integer",),
    ),
    _reduce(
        "ReduceLogSumExp",
        ExponentRule.OWN,
        "10; a float32 sum of exp(x 2^e_in) (at int8 through a 256-entry table of expf), then log "
        "(dl_module_reduce_log_sum_exp.hpp)",
    ),
    OpSpec(
        "QuantizeLinear",
        "quantization",
        (activation("x"), ignored("y_scale", optional=False), ignored("y_zero_point")),
        ExponentRule.OWN,
        "6",
        constraints=(_QDQ_SCALE,),
        notes=(
            "only the output dtype and exponent matter; scale and zero point are ignored by the runtime",
            "espquant takes the output exponent from the power-of-two scale instead of calibrating it",
        ),
    ),
    OpSpec(
        "DequantizeLinear",
        "quantization",
        (activation("x"), ignored("x_scale", optional=False), ignored("x_zero_point")),
        ExponentRule.OWN,
        "6",
        output_dtype="float32",
        constraints=(_QDQ_SCALE,),
    ),
    OpSpec(
        "RequantizeLinear",
        "quantization",
        (activation("x"), ignored("y_scale", optional=False), ignored("y_zero_point")),
        ExponentRule.OWN,
        "6",
        onnx_standard=False,
        notes=(
            "inserted by the quantizer where a consumer needs another exponent or width than its producer",
            "ESP32-S3 int8 -> int8 with e_out - e_in <= -7 computes wrong results: avoid such left shifts",
        ),
    ),
    OpSpec(
        "LayerNormalization",
        "normalization",
        (activation("X"), activation("Scale"), activation("B", True)),
        ExponentRule.OWN,
        "10; float32 steps of dl_module_layer_normalization.hpp (int32 sum, float variance, 1/sqrt_newton)",
        min_opset=17,
        constraints=(_ONLY_Y, _NORMALIZED_OPERANDS),
        notes=(
            "Scale and B are int8 / int16 at their own exponents, written for every normalised element",
            "the chip's compiler may fuse normalized * scale + bias into one multiply-add: 1 LSB at ties",
        ),
    ),
    OpSpec(
        "RMSNormalization",
        "normalization",
        (activation("X"), float_param("scale")),
        ExponentRule.OWN,
        "10; exact integer sum of squares, 1/sqrtf, float32 scale (dl_module_rms_normalization.hpp)",
        min_opset=23,
        constraints=(_ONLY_Y, _NORMALIZED_OPERANDS),
        notes=("the scale stays float32 in the file, written for every normalised element",),
    ),
    OpSpec(
        "LpNormalization",
        "normalization",
        (activation("input"),),
        ExponentRule.OWN,
        "10; 1/sum|x| or 1/sqrtf(sum x^2) of the integers (dl_module_lp_normalization.hpp)",
        min_opset=1,
        constraints=(attr_in("p", {1, 2}),),
    ),
    *recurrent.SPECS,  # GRU, LSTM (ops/recurrent.py)
)
