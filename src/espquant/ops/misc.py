"""Reductions, quantization nodes, normalisations and recurrent ops (ARITHMETIC.md sections 6 and 10)."""

from __future__ import annotations

from espquant.ops.spec import ExponentRule, OpSpec, activation, ignored, param

__all__ = ["SPECS"]


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
    *(
        _reduce(
            op_type,
            ExponentRule.OWN,
            "10",
            status="unspecified",
            status_reason=f"{op_type} is not individually specified in ARITHMETIC.md 10",
        )
        for op_type in (
            "ReduceSum",
            "ReduceSumSquare",
            "ReduceL1",
            "ReduceL2",
            "ReduceProd",
            "ReduceLogSum",
            "ReduceLogSumExp",
        )
    ),
    OpSpec(
        "QuantizeLinear",
        "quantization",
        (activation("x"), ignored("y_scale", optional=False), ignored("y_zero_point")),
        ExponentRule.OWN,
        "6",
        notes=("only the output dtype and exponent matter; scale and zero point are ignored by the runtime",),
    ),
    OpSpec(
        "DequantizeLinear",
        "quantization",
        (activation("x"), ignored("x_scale", optional=False), ignored("x_zero_point")),
        ExponentRule.OWN,
        "6",
        output_dtype="float32",
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
