"""AveragePool, GlobalAveragePool, MaxPool (ARITHMETIC.md section 7), and the arithmetic of ceil mode.

ESP-DL's pools have no ceil mode. :func:`ceil_mode_pads` gives the explicit end pads under which floor mode has
the same windows as a ``ceil_mode=1`` node (or why none exist); the optimizer's ``rewrite_ceil_mode_pools``
applies them, and the checker uses them to say whether the optimizer will fix a node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from espquant.ops.spec import (
    Constraint,
    ExponentRule,
    NodeContext,
    OpSpec,
    activation,
    attr_all_ones,
    attr_in,
    input_rank_in,
)

__all__ = ["SPECS", "ceil_mode_pads", "ceil_output_size"]


def ceil_output_size(size: int, kernel: int, stride: int, begin: int, end: int, dilation: int) -> int:
    """Output cells of a ceil-mode pool along one axis of ``size`` cells, as onnxruntime computes them."""
    span = size + begin + end - dilation * (kernel - 1) - 1
    count = -(-span // stride) + 1
    if (count - 1) * stride >= size + begin:  # the last window would start in the right padding: dropped
        count -= 1
    return count


def _axis_extra(size: int, kernel: int, stride: int, begin: int, end: int, dilation: int) -> int | str:
    """The end padding to add along one axis so floor mode yields the ceil-mode windows, or why none can."""
    window = dilation * (kernel - 1) + 1
    if size + begin + end < window:
        return f"the window ({window} cells) is larger than the padded input ({size + begin + end})"
    wanted = ceil_output_size(size, kernel, stride, begin, end, dilation)
    extra = max(0, (wanted - 1) * stride + window - (size + begin + end))
    if end + extra >= kernel:
        return (
            f"it needs an end pad of {end + extra}, not smaller than the kernel ({kernel}), which onnxruntime refuses"
        )
    return extra


def ceil_mode_pads(
    op_type: str, attrs: Mapping[str, Any], spatial: Sequence[int | str | None] | None
) -> tuple[list[int] | None, str]:
    """The ``pads`` that make a ``ceil_mode=1`` pool exact in floor mode, or ``(None, why not)``.

    Args:
        op_type: ``MaxPool`` or ``AveragePool``.
        attrs: the node's attributes (absent ones take ONNX's defaults).
        spatial: the input's spatial dimensions (after N and C), None when the rank is unknown.
    """
    auto_pad = attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return None, f"auto_pad={auto_pad} computes its own pads; export with explicit pads"
    kernel = [int(k) for k in attrs.get("kernel_shape") or []]
    if spatial is None or not kernel or len(spatial) != len(kernel):
        return None, "the input's rank or kernel_shape is unknown"
    if not all(isinstance(d, int) for d in spatial):
        return None, "the input's spatial dimensions are not static (pin them with --input-shape)"
    rank = len(kernel)
    strides = [int(s) for s in attrs.get("strides") or [1] * rank]
    dilations = [int(d) for d in attrs.get("dilations") or [1] * rank]
    pads = [0] * (2 * rank) if auto_pad == "VALID" else [int(p) for p in attrs.get("pads") or [0] * (2 * rank)]
    ends = list(pads[rank:])
    for axis in range(rank):
        size = int(spatial[axis])  # type: ignore[arg-type]
        extra = _axis_extra(size, kernel[axis], strides[axis], pads[axis], pads[rank + axis], dilations[axis])
        if isinstance(extra, str):
            return None, f"along spatial axis {axis}, {extra}"
        ends[axis] += extra
    if op_type == "AveragePool" and int(attrs.get("count_include_pad", 0)) and ends != pads[rank:]:
        return None, (
            "with count_include_pad=1, ONNX divides the last window, which overhangs the end padding, by its cells "
            "up to that padding only, and no explicit padding reproduces that divisor"
        )
    return pads[:rank] + ends, ""


_POOL_RANK = input_rank_in(0, {3, 4}, "ESP-DL pools 1-D and 2-D inputs (NCW / NCHW)")


def _ceil_rewrite(ctx: NodeContext) -> tuple[list[int] | None, str] | None:
    """None for ceil_mode=0; else the optimizer's exact floor-mode pads for this node, or why there are none."""
    if not ctx.attrs.get("ceil_mode", 0):
        return None
    shape = ctx.input_shapes[0] if ctx.input_shapes else None
    return ceil_mode_pads(ctx.node.op_type, ctx.attrs, None if shape is None else shape[2:])


def _ceil_rewritable(ctx: NodeContext) -> str | None:
    """ceil_mode=1 that espquant's optimizer turns into explicit end pads: refused here, the optimizer fixes it."""
    plan = _ceil_rewrite(ctx)
    if plan is None or plan[0] is None:
        return None
    return (
        "ceil_mode=1 is not supported (the runtime has no ceil mode); espquant's optimizer rewrites this node "
        f"exactly as ceil_mode=0 with pads={plan[0]}"
    )


def _ceil_not_rewritable(ctx: NodeContext) -> str | None:
    """ceil_mode=1 that no floor-mode pads reproduce (or whose input sizes are unknown)."""
    plan = _ceil_rewrite(ctx)
    if plan is None or plan[0] is not None:
        return None
    return f"ceil_mode=1 is not supported (the runtime has no ceil mode) and cannot be rewritten exactly: {plan[1]}"


_NO_CEIL = (
    Constraint(
        "attribute ceil_mode",
        _ceil_rewritable,
        "run espquant's optimizer first (optimize_fp_model, or espquant optimize)",
    ),
    Constraint(
        "attribute ceil_mode",
        _ceil_not_rewritable,
        "export the pool with ceil_mode=0, padding the input so that the last window fits",
    ),
)
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
            *_NO_CEIL,
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
            *_NO_CEIL,
            _AUTO_PAD,
            NO_DILATION,
            Constraint("outputs", _single_output, "drop the Indices output"),
        ),
    ),
)
