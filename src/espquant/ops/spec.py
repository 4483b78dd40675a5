"""The vocabulary of the operator registry: what one entry says about one ONNX op type.

An :class:`OpSpec` holds everything the rest of espquant needs to know about an operator on ESP-DL:
which inputs are quantized activations, weights (with their per-channel axis), biases or plain integer
parameters; which tensors share an exponent; what fuses into it; which attribute values and bit widths
the runtime accepts (per target family where they differ).

The entries are data only: the simulator's integer kernels (``espquant.simulator.quantized_model``), the
compiled lowerings (``espquant.simulator.compiled``), the ``.espdl`` writer and the legacy C++ writer are
tables keyed by the same op types. Each entry says which backends take it (``espdl_refusal``,
``legacy_layer``), the checker refuses what the ``.espdl`` writer cannot write, and
``tests/test_ops_registry.py`` fails when a backend table and the registry disagree. ``espquant ops`` prints
the resulting support matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx

if TYPE_CHECKING:
    from espquant.quant.profiles import TargetProfile

__all__ = [
    "Role",
    "ExponentRule",
    "InputSpec",
    "NodeContext",
    "Constraint",
    "OpSpec",
    "attr_in",
    "attr_equals",
    "attr_all_ones",
    "input_rank_in",
    "activation",
    "weight",
    "bias",
    "param",
    "qparam",
    "index",
    "float_param",
    "ignored",
    "state",
]


class Role(Enum):
    """How an op input is represented on the chip."""

    ACTIVATION = "activation"  # a quantized tensor computed at run time (or a quantized constant operand)
    WEIGHT = "weight"  # constant, quantized, possibly per output channel
    BIAS = "bias"  # constant, int32/int64 at exponent e_in + e_w
    PARAM = "param"  # constant integer parameter: shapes, axes, pads, starts/ends
    QPARAM = "qparam"  # constant scalar quantized with the input's exponent (Pad value, Clip min/max)
    INDEX = "index"  # integer tensor, not quantized, may be computed at run time (Gather indices)
    IGNORED = "ignored"  # read by ONNX but not by the runtime (Resize roi, Quantize scale/zero point)
    FLOAT_PARAM = "float_param"  # constant the runtime reads as float32 (RMSNormalization's scale)
    # A recurrent op's initial state (GRU / LSTM initial_h, initial_c): the op fixes its exponent and width
    # (Y's for initial_h, int16 at the gate exponent for initial_c), so the generic rules leave it to the
    # recurrent ones (calibration/recurrent.py, simulator/recurrent.py).
    STATE = "state"


class ExponentRule(Enum):
    """How an op's output exponent relates to its inputs' (ARITHMETIC.md section 2)."""

    OWN = "own"  # the output has its own exponent; the kernel rescales
    PASSTHROUGH = "passthrough"  # output exponent = first input's exponent (pure data movement, MaxPool, Relu)
    SHARED = "shared"  # every activation input and the output share one exponent (Concat)
    ALIGN_TO_OUTPUT = "align_to_output"  # inputs requantized to the output exponent before the op (Add, Sub)
    ALIGN_TO_LARGEST = "align_to_largest"  # inputs requantized to the largest input exponent (comparisons)


@dataclass(frozen=True)
class InputSpec:
    """One input position of an op."""

    name: str
    role: Role
    optional: bool = False
    # Weights: the output-channel axis for per-channel exponents, or a function of the node's attributes
    # (Gemm's depends on transB); None: per-tensor only.
    channel_axis: int | Callable[[dict[str, Any]], int] | None = None
    may_be_runtime: bool = False  # a weight that may also be computed at run time (MatMul's B)

    @property
    def must_be_constant(self) -> bool:
        constant_roles = (Role.WEIGHT, Role.BIAS, Role.PARAM, Role.QPARAM, Role.FLOAT_PARAM)
        return self.role in constant_roles and not self.may_be_runtime

    def resolve_channel_axis(self, attrs: dict[str, Any]) -> int | None:
        """The output-channel axis of this weight for a node with ``attrs``."""
        return self.channel_axis(attrs) if callable(self.channel_axis) else self.channel_axis


def activation(name: str, optional: bool = False) -> InputSpec:
    return InputSpec(name, Role.ACTIVATION, optional)


def weight(
    name: str, channel_axis: int | Callable[[dict[str, Any]], int] | None, may_be_runtime: bool = False
) -> InputSpec:
    return InputSpec(name, Role.WEIGHT, channel_axis=channel_axis, may_be_runtime=may_be_runtime)


def bias(name: str = "B") -> InputSpec:
    return InputSpec(name, Role.BIAS, optional=True)


def param(name: str, optional: bool = False) -> InputSpec:
    return InputSpec(name, Role.PARAM, optional)


def qparam(name: str, optional: bool = True) -> InputSpec:
    return InputSpec(name, Role.QPARAM, optional)


def index(name: str) -> InputSpec:
    return InputSpec(name, Role.INDEX)


def float_param(name: str) -> InputSpec:
    return InputSpec(name, Role.FLOAT_PARAM)


def ignored(name: str, optional: bool = True) -> InputSpec:
    return InputSpec(name, Role.IGNORED, optional)


def state(name: str) -> InputSpec:
    return InputSpec(name, Role.STATE, optional=True)


@dataclass(frozen=True)
class NodeContext:
    """What a constraint may look at: the node, its attributes (ONNX defaults filled in), shapes, constants."""

    node: onnx.NodeProto
    attrs: dict[str, Any]
    input_shapes: list[list[int | str | None] | None]
    output_shapes: list[list[int | str | None] | None]
    constants: dict[int, np.ndarray]  # input position -> value, for constant inputs
    bits: int
    target: TargetProfile | None

    def has_input(self, position: int) -> bool:
        return position < len(self.node.input) and bool(self.node.input[position])

    def rank(self, position: int) -> int | None:
        shape = self.input_shapes[position] if position < len(self.input_shapes) else None
        return None if shape is None else len(shape)

    def static_shape(self, position: int) -> list[int] | None:
        shape = self.input_shapes[position] if position < len(self.input_shapes) else None
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        return shape  # type: ignore[return-value]


@dataclass(frozen=True)
class Constraint:
    """A rule a node must satisfy; ``test`` returns the reason when the node breaks it, else None.

    ``families`` limits the rule to some target families (``"s3"``, ``"p4"``, ``"c"``); ``bits`` to some
    activation widths. When the checker runs without a target, family-specific rules are skipped.
    """

    field: str
    test: Callable[[NodeContext], str | None]
    hint: str = ""
    families: frozenset[str] | None = None
    bits: frozenset[int] | None = None


def attr_in(name: str, allowed: set[Any] | frozenset[Any], hint: str = "", **scope: Any) -> Constraint:
    """Attribute ``name`` must take one of ``allowed``.

    The ONNX default counts when the attribute is absent; an attribute the node's opset does not have at
    all passes (it cannot ask for anything else).
    """
    shown = ", ".join(repr(v) for v in sorted(allowed, key=repr))

    def test(ctx: NodeContext) -> str | None:
        if name not in ctx.attrs:
            return None
        value = ctx.attrs[name]
        if value not in allowed:
            return f"{name}={value!r} is not supported (ESP-DL accepts {shown})"
        return None

    return Constraint(f"attribute {name}", test, hint, **scope)


def attr_equals(name: str, value: Any, hint: str = "", **scope: Any) -> Constraint:
    """Attribute ``name`` must equal ``value``."""
    return attr_in(name, {value}, hint, **scope)


def attr_all_ones(name: str, hint: str = "") -> Constraint:
    """A list attribute (dilations) must be absent or all ones."""

    def test(ctx: NodeContext) -> str | None:
        values = ctx.attrs.get(name)
        if values and any(int(v) != 1 for v in values):
            return f"{name}={list(values)} is not supported (ESP-DL needs all 1)"
        return None

    return Constraint(f"attribute {name}", test, hint)


def input_rank_in(position: int, ranks: set[int], hint: str = "", label: str = "X") -> Constraint:
    """Input ``position`` must have one of ``ranks`` (unknown ranks pass; the shape check reports them)."""

    def test(ctx: NodeContext) -> str | None:
        rank = ctx.rank(position)
        if rank is not None and rank not in ranks:
            return f"input {label} has rank {rank}; ESP-DL supports rank {' or '.join(map(str, sorted(ranks)))}"
        return None

    return Constraint(f"input {label}", test, hint)


Category = Literal[
    "linear",
    "elementwise",
    "compare",
    "activation",
    "pooling",
    "data_movement",
    "reduction",
    "softmax",
    "quantization",
    "normalization",
    "recurrent",
]


@dataclass(frozen=True)
class OpSpec:
    """Everything espquant knows about one ONNX op type on ESP-DL.

    Attributes:
        op_type: exact ONNX spelling.
        category: a family name used for reports and defaults.
        inputs: the input positions in ONNX order; with ``variadic`` the last entry repeats.
        exponent: how the output exponent relates to the inputs'.
        spec_ref: where ARITHMETIC.md specifies it.
        min_opset: oldest default-domain opset whose form of the op the registry describes.
        bits: activation widths the runtime implements for it.
        constraints: attribute, shape and per-target rules.
        fuses: activation op types that fold into this op (Relu into Conv/Gemm/MatMul).
        int8_lut: at int8 the exporter replaces it by a 256-entry table look-up.
        nonnegative_shift: the kernel cannot left-shift, so ``e_out - e_in - e_w >= 0`` must hold.
        output_dtype: ``quantized`` (int8/int16), ``float32`` (Softmax family) or ``bool`` (comparisons).
        status: ``supported``, or ``unspecified`` when the arithmetic spec does not say what the chip
            computes; the checker then rejects it with ``status_reason``.
        onnx_standard: False for ESP-DL's own op types (RequantizeLinear).
        notes: facts later stages must honour (calibration constraints, per-target quirks).
        espdl_refusal: why espquant cannot write this op into an ``.espdl`` file (empty: it can). The checker
            refuses such ops, so ``check`` says yes exactly when ``export`` can write the file.
        legacy_layer: the legacy ESP-DL library (v1.1 / v2.0) has a layer for it (``--format cpp``).
        rescaled_output: a ``PASSTHROUGH`` op whose output may still take an exponent of its own, finer than its
            input's, where the table gives one (``auto`` does, measured): some targets' kernels rescale, and
            the lowering adds a RequantizeLinear after the op on those whose kernels do not.
    """

    op_type: str
    category: Category
    inputs: tuple[InputSpec, ...]
    exponent: ExponentRule
    spec_ref: str
    min_opset: int = 13
    bits: frozenset[int] = frozenset({8, 16})
    constraints: tuple[Constraint, ...] = ()
    variadic: bool = False
    outputs: int = 1
    fuses: frozenset[str] = frozenset()
    int8_lut: bool = False
    nonnegative_shift: bool = False
    output_dtype: Literal["quantized", "float32", "bool"] = "quantized"
    status: Literal["supported", "unspecified"] = "supported"
    status_reason: str = ""
    onnx_standard: bool = True
    notes: tuple[str, ...] = ()
    espdl_refusal: str = ""
    legacy_layer: bool = False
    rescaled_output: bool = False

    def input_spec(self, position: int) -> InputSpec | None:
        """The spec of input ``position`` (the last one repeats for variadic ops)."""
        if position < len(self.inputs):
            return self.inputs[position]
        return self.inputs[-1] if self.variadic and self.inputs else None

    @property
    def weight_inputs(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.inputs) if s.role is Role.WEIGHT)

    @property
    def bias_inputs(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.inputs) if s.role is Role.BIAS)
