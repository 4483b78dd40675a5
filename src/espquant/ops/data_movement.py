"""Shape and data-movement ops, Pad and Resize (ARITHMETIC.md section 9): no arithmetic, e_in = e_out,
except Resize, which rescales when exponents differ."""

from __future__ import annotations

from espquant.ops.spec import (
    Constraint,
    ExponentRule,
    NodeContext,
    OpSpec,
    activation,
    attr_equals,
    attr_in,
    ignored,
    index,
    param,
    qparam,
)

__all__ = ["SPECS"]


def _move(op_type: str, *inputs, constraints=(), variadic=False, outputs=1, exponent=ExponentRule.PASSTHROUGH):
    return OpSpec(
        op_type,
        "data_movement",
        inputs or (activation("X"),),
        exponent,
        "9 (pure data movement)",
        constraints=tuple(constraints),
        variadic=variadic,
        outputs=outputs,
    )


def _pad_rank(ctx: NodeContext) -> str | None:
    rank = ctx.rank(0)
    mode = ctx.attrs.get("mode", "constant")
    if rank is None or mode == "constant" or rank <= 4:
        return None
    pads = ctx.constants.get(1)
    if rank == 5 and pads is not None and int(pads[0]) == 0 and int(pads[5]) == 0:
        return None
    return f"{mode} padding of a rank-{rank} tensor; ESP-DL supports it up to rank 4 (rank 5 without axis-0 pads)"


def _reflect_size(ctx: NodeContext) -> str | None:
    shape, pads = ctx.static_shape(0), ctx.constants.get(1)
    if ctx.attrs.get("mode") != "reflect" or shape is None or pads is None or len(pads) != 2 * len(shape):
        return None
    rank = len(shape)
    for axis, size in enumerate(shape):
        if int(pads[axis]) > size - 1 or int(pads[axis + rank]) > size - 1:
            return f"reflect pads {list(pads)} exceed size - 1 on axis {axis} (size {size})"
    return None


def _resize_scales(ctx: NodeContext) -> str | None:
    scales = ctx.constants.get(2)
    if scales is not None and scales.size:
        if len(scales) != 4 or float(scales[0]) != 1.0 or float(scales[1]) != 1.0:
            return f"scales={[float(s) for s in scales]}; ESP-DL resizes only the two spatial axes of NCHW"
        return None
    if ctx.has_input(3):
        return None  # sizes given: the exporter turns them into scales
    return "neither scales nor sizes is a constant"


def _resize_coordinates(ctx: NodeContext) -> str | None:
    mode = ctx.attrs.get("mode", "nearest")
    transform = ctx.attrs.get("coordinate_transformation_mode", "half_pixel")
    if mode == "nearest":
        nearest = ctx.attrs.get("nearest_mode", "round_prefer_floor")
        if transform != "asymmetric" or nearest != "floor":
            return (
                f"nearest with coordinate_transformation_mode={transform!r} and nearest_mode={nearest!r}; the "
                "runtime computes asymmetric coordinates with floor (PyTorch's default 'nearest'), so results "
                "would differ from ONNX"
            )
    elif transform not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        return f"linear with coordinate_transformation_mode={transform!r}; ESP-DL has half_pixel and align_corners"
    return None


SPECS: tuple[OpSpec, ...] = (
    _move(
        "Reshape",
        activation("data"),
        param("shape"),
        constraints=(attr_equals("allowzero", 0, "export without allowzero"),),
    ),
    _move("Flatten"),
    _move("Squeeze", activation("data"), param("axes", optional=True)),
    _move("Unsqueeze", activation("data"), param("axes")),
    _move("Transpose"),
    _move(
        "Slice",
        activation("data"),
        param("starts"),
        param("ends"),
        param("axes", optional=True),
        param("steps", optional=True),
    ),
    _move("Split", activation("input"), param("split", optional=True), outputs=-1),
    _move("Gather", activation("data"), index("indices")),
    _move("Concat", activation("inputs"), variadic=True, exponent=ExponentRule.SHARED),
    _move("DepthToSpace"),
    _move("SpaceToDepth"),
    _move("Identity"),
    _move("ReverseSequence", activation("input"), index("sequence_lens")),
    OpSpec(
        "Pad",
        "data_movement",
        (activation("data"), param("pads"), qparam("constant_value"), param("axes", optional=True)),
        ExponentRule.PASSTHROUGH,
        "9 (Pad)",
        constraints=(
            attr_in("mode", {"constant", "edge", "reflect"}, "ESP-DL has no 'wrap' padding"),
            Constraint("input data", _pad_rank),
            Constraint("input pads", _reflect_size, "reflect pads must be smaller than the padded axis"),
        ),
    ),
    OpSpec(
        "Resize",
        "data_movement",
        (activation("X"), ignored("roi"), param("scales", optional=True), param("sizes", optional=True)),
        ExponentRule.OWN,
        "9 (Resize, int8 only)",
        bits=frozenset({8}),
        constraints=(
            attr_in("mode", {"nearest", "linear"}, "use nearest or (bi)linear interpolation"),
            attr_equals("antialias", 0, "export without antialias"),
            Constraint("input scales", _resize_scales, "resize only H and W, with constant scales or sizes"),
            Constraint(
                "attribute coordinate_transformation_mode",
                _resize_coordinates,
                "export nearest as asymmetric + floor (torch 'nearest'), linear as half_pixel or align_corners",
            ),
        ),
        notes=("exponents are aligned to the output by the quantizer",),
    ),
    OpSpec(
        "ScatterND",
        "data_movement",
        (activation("data"), index("indices"), activation("updates")),
        ExponentRule.SHARED,
        "2 (alignment only)",
        status="unspecified",
        status_reason="the arithmetic spec does not describe ESP-DL's ScatterND kernel",
    ),
)
