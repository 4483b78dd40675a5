"""AveragePool, GlobalAveragePool, MaxPool (ARITHMETIC.md section 7)."""

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
    input_rank_in,
)

__all__ = ["SPECS"]

_POOL_RANK = input_rank_in(0, {3, 4}, "ESP-DL pools 1-D and 2-D inputs (NCW / NCHW)")
_NO_CEIL = attr_equals("ceil_mode", 0, "the runtime ignores ceil_mode: add explicit end pads and use ceil_mode 0")
_AUTO_PAD = attr_in("auto_pad", {"NOTSET", "VALID"}, "export with explicit pads (auto_pad NOTSET)")


def _excluded_padding(ctx: NodeContext) -> str | None:
    pads = ctx.attrs.get("pads") or []
    if ctx.attrs.get("count_include_pad", 0) == 0 and any(int(p) > 0 for p in pads):
        return (
            "count_include_pad=0 with padding: the runtime always divides by the full kernel area, so border "
            "outputs would differ from ONNX"
        )
    return None


def _single_output(ctx: NodeContext) -> str | None:
    if len([o for o in ctx.node.output if o]) > 1:
        return "the Indices output is requested; ESP-DL's MaxPool returns values only"
    return None


NO_DILATION = attr_all_ones("dilations", "ESP-DL pools have no dilation")

SPECS: tuple[OpSpec, ...] = (
    OpSpec(
        "AveragePool",
        "pooling",
        (activation("X"),),
        ExponentRule.OWN,
        "7 (float32 emulation, full kernel area)",
        constraints=(
            _POOL_RANK,
            _NO_CEIL,
            _AUTO_PAD,
            NO_DILATION,
            Constraint(
                "attribute count_include_pad",
                _excluded_padding,
                "use count_include_pad=1 (PyTorch: count_include_pad=True) or remove the padding",
            ),
        ),
    ),
    OpSpec(
        "GlobalAveragePool",
        "pooling",
        (activation("X"),),
        ExponentRule.OWN,
        "7 (float32 emulation)",
        constraints=(_POOL_RANK,),
    ),
    OpSpec(
        "MaxPool",
        "pooling",
        (activation("X"),),
        ExponentRule.PASSTHROUGH,
        "7 (raw-integer max)",
        constraints=(
            _POOL_RANK,
            _NO_CEIL,
            _AUTO_PAD,
            NO_DILATION,
            Constraint("outputs", _single_output, "drop the Indices output"),
        ),
    ),
)
