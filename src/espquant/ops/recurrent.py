"""GRU and LSTM as ESP-DL v3.3.9 runs them (``esp-dl/dl/module/include/dl_module_gru.hpp``,
``dl_module_lstm.hpp``): the registry entries, what the checker refuses and why, and the names the other stages
share (the gate exponent's table key, the runtime's constants).

What the runtime implements, read from ``forward_template`` and ``deserialize`` of both modules:

- one sequence at a time (``"currently only support batch_size = 1"``), layout 0 in practice: whatever
  ``layout`` says, ``get_output_shape`` gives Y as ``[seq, directions, batch, hidden]``;
- ``direction`` ``"bidirectional"`` runs both directions; every other value (``"reverse"`` too) runs forward;
- the default activations only (Sigmoid / Tanh through float tables ``SigmoidLUT`` / ``TanhLUT``); ``clip``,
  ``activations``, ``activation_alpha`` / ``_beta`` are not read; GRU needs ``linear_before_reset = 1`` (it
  refuses 0), LSTM ``input_forget = 0`` (it refuses 1) and has no peepholes (input P is not read);
- ``sequence_lens`` is not read (every sequence runs its full length);
- W and R: int8 / int16 like the layer, one exponent each; B: **int16 at the gate exponent** for both widths
  (``get_element_ptr<int16_t>``); Y, Y_h and initial_h: the layer's width, one exponent (the module copies h
  between them as raw integers); LSTM Y_c and initial_c: int16 at the gate exponent (asserted);
- ``gate_exponent`` (attribute, default -8; ESP-PPQ writes -9): the exponent of the int16 gate sums and of the
  two float tables' index.
"""

from __future__ import annotations

import onnx

from espquant.ops.spec import (
    Constraint,
    ExponentRule,
    NodeContext,
    OpSpec,
    activation,
    bias,
    ignored,
    param,
    state,
    weight,
)

__all__ = [
    "SPECS",
    "RECURRENT_OPS",
    "GATES",
    "FINEST_GATE_EXPONENT",
    "RUNTIME_GATE_EXPONENT",
    "MAX_RECURRENT_SHIFT",
    "gate_exponent_key",
    "int16_cell_state",
    "recurrent_outputs",
]

RECURRENT_OPS = frozenset({"GRU", "LSTM"})
# Gates per direction: GRU z, r, h (ONNX's zrh order is the module's); LSTM i, o, f, c (ONNX's iofc).
GATES = {"GRU": 3, "LSTM": 4}
# ESP-PPQ's GRU_QUANT_EXPONENT / LSTM_QUANT_EXPONENT (esp_ppq/core/common.py): the finest gate exponent espquant
# picks. A finer one doubles the module's float tables (SigmoidLUT holds 6.3 * 2^-e floats) for no gain at int8.
FINEST_GATE_EXPONENT = -9
# What the module uses when the file has no gate_exponent attribute (deserialize in dl_module_gru.hpp).
RUNTIME_GATE_EXPONENT = -8
# The module scales by DL_RESCALE(shift) = 1.0f / (1 << shift): from 31 on the int shift overflows (dl_define.hpp).
MAX_RECURRENT_SHIFT = 30

_DEFAULT_ACTIVATIONS = {"GRU": ("sigmoid", "tanh"), "LSTM": ("sigmoid", "tanh", "tanh")}


def gate_exponent_key(node_outputs: list[str] | tuple[str, ...]) -> str:
    """The quantization table's key for a GRU / LSTM node's gate exponent (named after its first output)."""
    first = next((o for o in node_outputs if o), "")
    return f"{first}::gate_exponent"


def int16_cell_state(node: onnx.NodeProto) -> set[str]:
    """An LSTM's Y_c and initial_c: int16 at the gate exponent whatever the layer's width (empty for other ops).

    One-width consumers (a QDQ model) leave them float."""
    if node.op_type != "LSTM":
        return set()
    return {t for t in (*node.output[2:3], *node.input[6:7]) if t}


def recurrent_outputs(op_type: str) -> int:
    """How many outputs the runtime module writes (Y, Y_h; LSTM also Y_c): all of them must exist in a file."""
    return 3 if op_type == "LSTM" else 2


def _source(ctx: NodeContext) -> str:
    """The runtime file that implements the node's op type (cited in every refusal)."""
    return f"dl_module_{ctx.node.op_type.lower()}.hpp"


def _directions(ctx: NodeContext) -> int:
    return 2 if ctx.attrs.get("direction", "forward") == "bidirectional" else 1


def _direction(ctx: NodeContext) -> str | None:
    direction = ctx.attrs.get("direction", "forward")
    if direction == "reverse":
        return (
            f"direction='reverse': ESP-DL runs every direction but 'bidirectional' forward (deserialize in "
            f"{_source(ctx)}), so it would process the sequence in the wrong order"
        )
    if direction not in ("forward", "bidirectional"):
        return f"direction={direction!r} is not one ESP-DL knows ('forward' or 'bidirectional')"
    return None


def _layout(ctx: NodeContext) -> str | None:
    if ctx.attrs.get("layout", 0) != 0:
        return (
            f"layout={ctx.attrs['layout']}: ESP-DL's module gives Y the shape [seq, directions, batch, hidden] "
            f"whatever the layout (get_output_shape in {_source(ctx)}), not ONNX's batch-first one"
        )
    return None


def _activations(ctx: NodeContext) -> str | None:
    given = ctx.attrs.get("activations")
    if not given:
        return None
    default = _DEFAULT_ACTIVATIONS[ctx.node.op_type]
    names = [a.decode() if isinstance(a, bytes) else str(a) for a in given]
    if [a.lower() for a in names] not in (list(default), list(default) * _directions(ctx)):
        return (
            f"activations={names}: ESP-DL always applies its sigmoid and tanh tables (the attribute is not "
            f"read, {_source(ctx)})"
        )
    return None


def _clip(ctx: NodeContext) -> str | None:
    if ctx.attrs.get("clip") is not None:
        return f"clip={ctx.attrs['clip']}: ESP-DL does not clip the gate inputs (not read, {_source(ctx)})"
    return None


def _batch(ctx: NodeContext) -> str | None:
    shape = ctx.input_shapes[0] if ctx.input_shapes else None
    if shape is None:
        return None
    if len(shape) != 3:
        return f"input X has rank {len(shape)}; GRU / LSTM take [seq, batch, input]"
    batch = shape[0] if ctx.attrs.get("layout", 0) else shape[1]
    if isinstance(batch, int) and batch != 1:
        return f"batch {batch}: ESP-DL runs one sequence at a time ('only support batch_size = 1', {_source(ctx)})"
    return None


def _sequence_lens(ctx: NodeContext) -> str | None:
    if not ctx.has_input(4):
        return None
    lengths = ctx.constants.get(4)
    if lengths is None:
        return None  # the checker reports the run-time parameter itself
    shape = ctx.input_shapes[0] if ctx.input_shapes else None
    steps = shape[1] if shape and ctx.attrs.get("layout", 0) else shape[0] if shape else None
    if not isinstance(steps, int):
        return "sequence_lens is given and the sequence length is not static: ESP-DL ignores sequence_lens"
    if any(int(v) != steps for v in lengths.reshape(-1)):
        return (
            f"sequence_lens={lengths.reshape(-1).tolist()} shorter than the sequence ({steps}): ESP-DL ignores "
            f"sequence_lens and runs every step ({_source(ctx)})"
        )
    return None


def _peepholes(ctx: NodeContext) -> str | None:
    if not ctx.has_input(7):
        return None
    peepholes = ctx.constants.get(7)
    if peepholes is None:
        return "P (peepholes) is computed at run time; ESP-DL's LSTM has no peephole connections"
    if peepholes.any():
        return f"non-zero peepholes P: ESP-DL's LSTM has no peephole connections (input 7 is not read, {_source(ctx)})"
    return None


def _linear_before_reset(ctx: NodeContext) -> str | None:
    if ctx.attrs.get("linear_before_reset", 0) != 1:
        return "linear_before_reset=0: ESP-DL's GRU refuses it ('linear_before_reset must be 1', dl_module_gru.hpp)"
    return None


def _input_forget(ctx: NodeContext) -> str | None:
    if ctx.attrs.get("input_forget", 0) != 0:
        return "input_forget=1: ESP-DL's LSTM refuses it ('input_forget must be 0', dl_module_lstm.hpp)"
    return None


def _common(op_type: str) -> tuple[Constraint, ...]:
    return (
        Constraint("input X", _batch, "run one sequence per inference (batch 1); loop over the batch outside"),
        Constraint(
            "attribute direction",
            _direction,
            "reverse the sequence before a forward op (flip the input when exporting, or ReverseSequence)",
        ),
        Constraint(
            "attribute layout",
            _layout,
            "export with batch_first=False (PyTorch then writes Transposes and layout 0), or transpose X to "
            "[seq, batch, input]",
        ),
        Constraint("attribute activations", _activations, f"use the default activations of {op_type}"),
        Constraint("attribute clip", _clip, "train and export without cell clipping"),
        Constraint("input sequence_lens", _sequence_lens, "pad or cut the sequences to one length, drop sequence_lens"),
    )


def _notes(op_type: str) -> tuple[str, ...]:
    """The registry notes: the exponent rules (calibration/recurrent.py) and what the simulation assumes."""
    cell = ("Y_c and initial_c: int16 at the gate exponent at any width (the module asserts it)",)
    return (
        "gate exponent: the finest, down to ESP-PPQ's -9, at which no int16 gate sum can wrap for any X and h "
        "(table key '<Y>::gate_exponent', file attribute gate_exponent)",
        "W, R: one exponent each, shifts within +-30; B: int16 at the gate exponent; Y, Y_h, initial_h: one "
        "exponent (the largest of theirs)",
        *(cell if op_type == "LSTM" else ()),
        "ESP32-S3 / -P4 sum rows of 16 int8 / 8 int16 columns exactly (40 bits); the C kernel rounds int16 sums "
        "above 2^24 to float32",
        "float steps unfused as in the C source; -ffast-math may fuse a*b + c on chips with an FPU (ESP32, -S3, "
        "-P4): 1 LSB at rare ties; tables from the C library's expf and exact bounds (an x86 -ffast-math build "
        "differs: simulator/recurrent.py)",
    )


SPECS: tuple[OpSpec, ...] = (
    OpSpec(
        "GRU",
        "recurrent",
        (
            activation("X"),
            weight("W", channel_axis=None),
            weight("R", channel_axis=None),
            bias("B"),
            param("sequence_lens", optional=True),
            state("initial_h"),
        ),
        ExponentRule.OWN,
        "10; dl_module_gru.hpp forward_template, dl_base_dotprod.cpp, dl_math.hpp SigmoidLUT / TanhLUT "
        "(simulator/recurrent.py)",
        constraints=(
            *_common("GRU"),
            Constraint(
                "attribute linear_before_reset",
                _linear_before_reset,
                "export the GRU from PyTorch (which writes linear_before_reset=1) or retrain with that form",
            ),
        ),
        outputs=2,
        notes=_notes("GRU"),
    ),
    OpSpec(
        "LSTM",
        "recurrent",
        (
            activation("X"),
            weight("W", channel_axis=None),
            weight("R", channel_axis=None),
            bias("B"),
            param("sequence_lens", optional=True),
            state("initial_h"),
            state("initial_c"),
            ignored("P"),
        ),
        ExponentRule.OWN,
        "10; dl_module_lstm.hpp forward_template, dl_base_dotprod.cpp, dl_math.hpp SigmoidLUT / TanhLUT "
        "(simulator/recurrent.py)",
        constraints=(
            *_common("LSTM"),
            Constraint(
                "attribute input_forget",
                _input_forget,
                "use an LSTM without coupled input and forget gates",
            ),
            Constraint("input P", _peepholes, "use an LSTM without peepholes"),
        ),
        outputs=3,
        notes=_notes("LSTM"),
    ),
)
