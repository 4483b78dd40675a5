"""Reductions, quantization nodes, normalisations and recurrent ops (ARITHMETIC.md sections 6 and 10)."""

from __future__ import annotations

import numpy as np

from espquant.ops.spec import Constraint, ExponentRule, NodeContext, OpSpec, activation, ignored, param

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


def _reduce(op_type: str, exponent: ExponentRule, ref: str, **extra) -> OpSpec:
    return OpSpec(op_type, "reduction", (activation("data"), param("axes", optional=True)), exponent, ref, **extra)


def _unspecified(op_type: str, category, inputs, what: str, min_opset: int = 13) -> OpSpec:
    return OpSpec(
        op_type,
        category,
        inputs,
        ExponentRule.OWN,
        "10, 14.6",
        min_opset=min_opset,
        status="unspecified",
        status_reason=f"the arithmetic spec does not specify ESP-DL's {what} (ARITHMETIC.md 10, 14.6)",
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
    *(
        _reduce(
            op_type,
            ExponentRule.OWN,
            "10",
            status="unspecified",
            status_reason=f"ESP-DL v3.3.9 has a {op_type} module but does not register it (dl_module_creator.hpp)",
        )
        for op_type in ("ReduceL1", "ReduceL2")
    ),
    *(
        _reduce(
            op_type,
            ExponentRule.OWN,
            "10",
            status="unspecified",
            status_reason=f"{op_type}'s float steps (dl_module_reduce_*.hpp) are not verified yet",
        )
        for op_type in ("ReduceProd", "ReduceLogSum", "ReduceLogSumExp")
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
    _unspecified(
        "LayerNormalization",
        "normalization",
        (activation("X"), activation("Scale"), activation("B", True)),
        "LayerNormalization integer details",
    ),
    _unspecified(
        "RMSNormalization",
        "normalization",
        (activation("X"), activation("scale")),
        "RMSNormalization integer details",
        min_opset=23,
    ),
    _unspecified("LpNormalization", "normalization", (activation("input"),), "LpNormalization integer details"),
    _unspecified(
        "GRU",
        "recurrent",
        (activation("X"), activation("W"), activation("R"), activation("B", True)),
        "GRU integer details",
    ),
    _unspecified(
        "LSTM",
        "recurrent",
        (activation("X"), activation("W"), activation("R"), activation("B", True)),
        "LSTM integer details",
    ),
)
