"""Activations and unary math (ARITHMETIC.md section 8), and the Softmax family (section 10)."""

from __future__ import annotations

from espquant.ops.spec import Constraint, ExponentRule, NodeContext, OpSpec, activation, qparam, weight

__all__ = ["SPECS", "SOFTMAX_FAMILY", "int8_softmax_overflows"]

SOFTMAX_FAMILY = ("Softmax", "LogSoftmax")
# ESP-DL's int8 Softmax / LogSoftmax look up exp(q * 2^e) in a 256-entry float32 table without subtracting the
# maximum first (dl_module_softmax.hpp, ARITHMETIC.md 10): expf is inf above ~88.7.
_EXPF_LIMIT = 88.0


def int8_softmax_overflows(input_exponent: int) -> bool:
    """Whether an int8 Softmax whose input has ``input_exponent`` gets inf (then NaN) from the chip's exp table:
    its largest input, 127 * 2^e, beyond what expf holds. At int16 the runtime subtracts the maximum in float."""
    return 127 * 2.0**input_exponent > _EXPF_LIMIT


def _unary(op_type: str, ref: str, min_opset: int = 13, **extra) -> OpSpec:
    """A float function applied per element: int8 via a stored table, int16 by float32 emulation."""
    return OpSpec(
        op_type, "activation", (activation("X"),), ExponentRule.OWN, ref, min_opset=min_opset, int8_lut=True, **extra
    )


def _prelu_slope(ctx: NodeContext) -> str | None:
    slope = ctx.constants.get(1)
    if slope is None or slope.size <= 1:
        return None
    shape = ctx.static_shape(0)
    channels = shape[1] if shape is not None and len(shape) > 1 else None
    if channels is not None and slope.size != channels:
        return f"slope of shape {list(slope.shape)} is neither one value nor one per channel ({channels})"
    return None


def _softmax(op_type: str) -> OpSpec:
    return OpSpec(
        op_type,
        "softmax",
        (activation("X"),),
        ExponentRule.OWN,
        "10 (Softmax: float32 output)",
        output_dtype="float32",
        notes=("the output is float32; a QuantizeLinear brings it back to integers when a consumer needs them",),
    )


SPECS: tuple[OpSpec, ...] = (
    OpSpec(
        "Relu",
        "activation",
        (activation("X"),),
        ExponentRule.PASSTHROUGH,
        "8.3 (Relu: max(q, 0) when e_in = e_out)",
        notes=("fused into a preceding Conv/Gemm/MatMul whose only consumer it is",),
    ),
    _unary("LeakyRelu", "8.1, 8.3"),
    OpSpec(
        "PRelu",
        "activation",
        (activation("X"), weight("slope", channel_axis=None)),
        # The output keeps the input's exponent unless the table gives it one of its own: with |slope| < 1 the
        # negatives shrink, and a finer output step pays where the input's range was set by them (MTCNN, palm
        # detection). The ESP32-S3 and ESP32-P4 int8 kernels rescale positives (8.4); the C kernel (plain-C
        # chips, ESP32-P4 int16) copies them, so there the lowering writes the input's exponent and adds a
        # RequantizeLinear (kernels.prelu_rescales_positives).
        ExponentRule.PASSTHROUGH,
        "8.1 (one slope: table), 8.4 (per channel)",
        int8_lut=True,
        rescaled_output=True,
        constraints=(
            Constraint("input slope", _prelu_slope, "give the slope shape (C, 1, 1) or a single value"),
        ),
        notes=(
            "int8 with one slope: table look-up; per channel: integer kernel with its own slope exponent",
            "the output keeps the input's exponent unless the table gives a finer one (auto, when it measures "
            "better); where the kernel copies positive values unchanged (plain-C chips, ESP32-P4 int16) a "
            "RequantizeLinear after the PRelu gives the output that exponent",
            "ESP32-P4 int8 per channel: positives rescaled as dl_esp32p4_prelu.S does (half-even); the "
            "esp.vprelu rounding of negatives is not documented, espquant takes the C reference's floor "
            "(prelu_11c, esp-dl/dl/base/dl_base_prelu.cpp) and warns; P4 int16 runs that C code",
        ),
    ),
    OpSpec(
        "Clip",
        "activation",
        (activation("X"), qparam("min"), qparam("max")),
        ExponentRule.OWN,
        "8.1 (int8 table), 8.5 (int16: clamp then rescale)",
        int8_lut=True,
    ),
    _unary("Sigmoid", "8.1, 8.3"),
    _unary("Tanh", "8.1, 8.3"),
    _unary("HardSigmoid", "8.1, 8.3"),
    _unary("HardSwish", "8.1, 8.3", min_opset=14),
    _unary("Swish", "8.1, 8.3", min_opset=24),
    _unary("Elu", "8.1, 8.3"),
    _unary("Exp", "8.1, 8.3"),
    _unary("Log", "8.1, 8.3"),
    _unary("Sqrt", "8.1, 8.3"),
    _unary(
        "Gelu",
        "8.2 (table-driven at int8 and int16)",
        min_opset=20,
        notes=("the runtime runs it only through a table, also at int16 (a LUT node with a 2049-entry table)",),
    ),
    *(_softmax(op_type) for op_type in SOFTMAX_FAMILY),
)
