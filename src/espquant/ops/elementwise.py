"""Element-wise arithmetic and comparisons (ARITHMETIC.md section 5)."""

from __future__ import annotations

from espquant.ops.broadcast import MAX_ELEMENTWISE_RANK, merged_broadcast_shapes
from espquant.ops.spec import Constraint, ExponentRule, NodeContext, OpSpec, activation

__all__ = ["SPECS"]


def _broadcast_rank(ctx: NodeContext) -> str | None:
    a, b = ctx.static_shape(0), ctx.static_shape(1)
    if a is None or b is None:
        return None
    try:
        merged = merged_broadcast_shapes(a, b)[2]
    except ValueError:
        return f"shapes {a} and {b} do not broadcast"
    if len(merged) > MAX_ELEMENTWISE_RANK:
        return (
            f"shapes {a} and {b} broadcast over {len(merged)} merged axes; ESP-DL supports at most "
            f"{MAX_ELEMENTWISE_RANK}"
        )
    return None


BROADCAST = Constraint("input shapes", _broadcast_rank, "reshape the operands so they broadcast over at most 4-D")
BINARY = (activation("A"), activation("B"))


def _binary(op_type: str, exponent: ExponentRule, ref: str, **extra) -> OpSpec:
    return OpSpec(op_type, "elementwise", BINARY, exponent, ref, constraints=(BROADCAST,), **extra)


def _compare(op_type: str) -> OpSpec:
    return OpSpec(
        op_type,
        "compare",
        BINARY,
        ExponentRule.ALIGN_TO_LARGEST,
        "5 (comparisons)",
        constraints=(BROADCAST,),
        output_dtype="bool",
    )


SPECS: tuple[OpSpec, ...] = (
    _binary(
        "Add",
        ExponentRule.ALIGN_TO_OUTPUT,
        "5 (Add/Sub)",
        notes=("the runtime adds raw integers: inputs must already carry the output exponent",),
    ),
    _binary(
        "Sub",
        ExponentRule.ALIGN_TO_OUTPUT,
        "5 (Add/Sub)",
        notes=("the runtime subtracts raw integers: inputs must already carry the output exponent",),
    ),
    _binary("Mul", ExponentRule.OWN, "5 (Mul)", nonnegative_shift=True),
    _binary("Div", ExponentRule.OWN, "5 (Div, float32 emulation)"),
    _binary("Pow", ExponentRule.OWN, "5 (Pow, float32)"),
    _binary(
        "Mod",
        ExponentRule.OWN,
        "5 (Mod: fmodf of the dequantized operands, esp-dl/dl/base/dl_base_mod.cpp)",
        notes=("the runtime always computes C's fmod (the sign of the dividend), ONNX's fmod=1",),
    ),
    OpSpec("Neg", "elementwise", (activation("X"),), ExponentRule.PASSTHROUGH, "5 (Neg: -q, no saturation)"),
    _compare("Greater"),
    _compare("GreaterOrEqual"),
    _compare("Less"),
    _compare("LessOrEqual"),
    _compare("Equal"),
)
