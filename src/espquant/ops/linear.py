"""Conv, ConvTranspose, Gemm, MatMul: the integer multiply-accumulate ops (ARITHMETIC.md section 4)."""

from __future__ import annotations

from espquant.ops.spec import (
    Constraint,
    ExponentRule,
    NodeContext,
    OpSpec,
    activation,
    attr_all_ones,
    attr_equals,
    attr_in,
    bias,
    input_rank_in,
    weight,
)

__all__ = ["SPECS"]

RELU = frozenset({"Relu"})
_ONE_OR_TWO_D = "ESP-DL runs 1-D and 2-D convolutions (NCW / NCHW inputs)"


def _conv_groups(ctx: NodeContext) -> str | None:
    group = ctx.attrs.get("group", 1)
    if group == 1:
        return None
    w = ctx.constants.get(1)
    in_shape = ctx.static_shape(0)
    in_channels = in_shape[1] if in_shape is not None and len(in_shape) > 1 else None
    if w is not None and w.shape[1] == 1 and w.shape[0] == group and in_channels in (None, group):
        return None  # depthwise, one filter per channel
    return f"group={group} is a grouped convolution; ESP-DL supports group 1 or depthwise (group = in = out channels)"


def _gemm_beta(ctx: NodeContext) -> str | None:
    if ctx.has_input(2) and ctx.attrs.get("beta", 1.0) != 1.0:
        return f"beta={ctx.attrs['beta']} with a bias C; ESP-DL requires beta = 1"
    return None


def _matmul_batch(ctx: NodeContext) -> str | None:
    a, b = ctx.static_shape(0), ctx.static_shape(1)
    if a is None or b is None:
        return None
    if len(a) > 4 or len(b) > 4:
        return f"MatMul of rank {max(len(a), len(b))}; ESP-DL supports up to 4-D"
    batch_a, batch_b = a[:-2], b[:-2]
    width = max(len(batch_a), len(batch_b))
    batch_a = [1] * (width - len(batch_a)) + list(batch_a)
    batch_b = [1] * (width - len(batch_b)) + list(batch_b)
    for da, db in zip(batch_a, batch_b):
        if da != db and 1 not in (da, db):
            return f"batch dimensions {batch_a} and {batch_b} do not broadcast"
    return None


def _matmul_b(ctx: NodeContext) -> str | None:
    """ESP-DL reads a MatMul's B in the weight byte order. A constant B is stored that way; a B computed at run
    time gets Slice / Reshape / Transpose / Concat nodes that put it in that order. A vector B is not written
    yet."""
    constant = ctx.constants.get(1)
    shape = ctx.input_shapes[1] if len(ctx.input_shapes) > 1 else None
    rank = constant.ndim if constant is not None else (len(shape) if shape is not None else None)
    if rank is not None and rank < 2:
        return "B is a vector; espquant writes MatMul only with a matrix B yet"
    return None


SPECS: tuple[OpSpec, ...] = (
    OpSpec(
        "Conv",
        "linear",
        (activation("X"), weight("W", channel_axis=0), bias()),
        ExponentRule.OWN,
        "4.1-4.4",
        constraints=(
            input_rank_in(0, {3, 4}, _ONE_OR_TWO_D),
            Constraint("attribute group", _conv_groups, "split the grouped convolution into Convs and a Concat"),
            attr_in("auto_pad", {"NOTSET", "VALID"}, "export with explicit pads (auto_pad NOTSET)"),
        ),
        fuses=RELU,
        nonnegative_shift=True,
        notes=("weights per output channel only on targets whose profile allows it (ESP32-P4)",),
    ),
    OpSpec(
        "ConvTranspose",
        "linear",
        (activation("X"), weight("W", channel_axis=1), bias()),
        ExponentRule.OWN,
        "9 (InsertZeros + Conv), 4.1",
        constraints=(
            input_rank_in(0, {3, 4}, _ONE_OR_TWO_D),
            attr_equals("group", 1, "ESP-DL runs ConvTranspose as InsertZeros + Conv with group 1"),
            attr_all_ones("dilations", "ESP-DL runs ConvTranspose without dilation"),
            attr_equals("auto_pad", "NOTSET", "export with explicit pads"),
        ),
        fuses=RELU,
        nonnegative_shift=True,
        notes=("written as InsertZeros + Conv, as ESP-DL runs it",),
    ),
    OpSpec(
        "Gemm",
        "linear",
        (activation("A"), weight("B", channel_axis=lambda attrs: 0 if attrs.get("transB", 0) else 1), bias("C")),
        ExponentRule.OWN,
        "4.1 (Gemm = 1x1 conv)",
        constraints=(
            input_rank_in(0, {2}, "flatten the input to 2-D first", label="A"),
            attr_equals("transA", 0, "transpose A in the graph before the Gemm"),
            attr_equals("alpha", 1.0, "fold alpha into the weights (export with alpha = 1)"),
            Constraint("attribute beta", _gemm_beta, "fold beta into the bias (export with beta = 1)"),
        ),
        fuses=RELU,
        nonnegative_shift=True,
        notes=("the exporter transposes B so that transB = 0 on the chip",),
    ),
    OpSpec(
        "MatMul",
        "linear",
        (activation("A"), weight("B", channel_axis=None, may_be_runtime=True)),
        ExponentRule.OWN,
        "4.1, 4.6",
        constraints=(
            Constraint("input shapes", _matmul_batch, "reshape the operands to at most 4-D"),
            Constraint("input B", _matmul_b, "make B a matrix (unsqueeze a vector B to one column)"),
        ),
        fuses=RELU,
        nonnegative_shift=True,
        notes=("a constant B is quantized per tensor even on ESP32-P4",),
    ),
)
