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


_CHANNEL_ORDER_HINT = "use DepthToSpace mode 'CRD', or reorder the channels with a Reshape/Transpose instead"


def _depth_to_space_order(ctx: NodeContext) -> str | None:
    """ESP-DL's DCR loop (``depth_to_space_dcr``, ``esp-dl/dl/module/include/dl_module_depth_to_space.hpp``)
    takes the output channel as ``c % blocksize``: it is ONNX's DCR only when there are ``blocksize`` output
    channels. CRD is ONNX's."""
    if ctx.attrs.get("mode", "DCR") != "DCR":
        return None
    channels, size = _channels(ctx), int(ctx.attrs.get("blocksize", 0) or 0)
    if channels is None or size <= 0:
        return "DCR mode needs a 4-D input with a known channel count to tell whether ESP-DL computes it like ONNX"
    if channels // (size * size) != size:
        return (
            f"mode DCR with {channels // (size * size)} output channels: ESP-DL's DCR loop is ONNX's only with "
            f"blocksize ({size}) output channels (dl_module_depth_to_space.hpp)"
        )
    return None


def _channels(ctx: NodeContext) -> int | None:
    """The channel count of a 4-D NCHW input, when the model states it."""
    shape = ctx.input_shapes[0] if ctx.input_shapes else None
    return shape[1] if shape is not None and len(shape) == 4 and isinstance(shape[1], int) else None


def _space_to_depth_order(ctx: NodeContext) -> str | None:
    """ESP-DL's SpaceToDepth orders the output channels ``c * blocksize^2 + offset``
    (``esp-dl/dl/module/include/dl_module_space_to_depth.hpp``); ONNX orders them ``offset * C + c``. The two
    agree only for one input channel."""
    channels = _channels(ctx)
    if channels is None:
        return "SpaceToDepth needs a 4-D input with a known channel count to tell whether ESP-DL computes it like ONNX"
    if channels != 1:
        return (
            f"{channels} input channels: ESP-DL orders SpaceToDepth's output channels channel-major, ONNX "
            "block-major; they agree only for one channel (dl_module_space_to_depth.hpp)"
        )
    return None


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
    _move("DepthToSpace", constraints=(Constraint("attribute mode", _depth_to_space_order, _CHANNEL_ORDER_HINT),)),
    _move("SpaceToDepth", constraints=(Constraint("input X", _space_to_depth_order, _CHANNEL_ORDER_HINT),)),
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
        (activation("data"), param("indices"), activation("updates")),
        ExponentRule.SHARED,
        "2 (alignment only); slices copied, or combined with saturation (dl_module_scatter_nd.hpp)",
        constraints=(
            attr_in(
                "reduction",
                {"none", "add", "max", "min"},
                "ESP-DL multiplies the raw integers without rescaling: use reduction none, add, max or min",
            ),
        ),
        notes=(
            "data, updates and output share one exponent; the indices must be constant (written as INT64)",
            "repeated indices apply in order, the last slice wins (ONNX leaves that undefined)",
        ),
    ),
    OpSpec(
        "StreamingCache",
        "data_movement",
        (activation("x"),),
        ExponentRule.PASSTHROUGH,
        "9 (a copy); the last window_size - 1 frames kept between calls (dl_module_streaming_cache.hpp)",
        onnx_standard=False,
        espdl_refusal=(
            "StreamingCache is ESP-DL's own stateful node that Espressif's streaming export inserts; a float "
            "ONNX model cannot contain it (espquant runs it in .espdl files)"
        ),
        notes=("each run continues the stream; reset() starts a new one",),
    ),
)
