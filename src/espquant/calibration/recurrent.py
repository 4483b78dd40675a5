"""Exponent rules of GRU and LSTM (ESP-DL v3.3.9, ``dl_module_gru.hpp`` / ``dl_module_lstm.hpp``).

The module computes the gate sums ``W x + Wb`` and ``R h + Rb`` as int16 at one gate exponent and adds the
int16 bias with a wrapping store, so a sum past 32767 steps does not saturate but flips sign, and a gate
flips from open to closed. The rules, applied after the generic ones for the node:

- **gate exponent**: the finest exponent, not finer than ESP-PPQ's -9 (``FINEST_GATE_EXPONENT``), at which no
  gate sum can wrap for *any* integers X and h can hold at their exponents: per row ``sum|W| max|x| + |Wb|``
  and ``sum|R| max|h| + |Rb|`` (GRU wraps each cache separately; the LSTM adds both, and its cell state, int16
  at the same exponent, grows by at most 1 per step: ``max|c0| + seq_len``), with the weights' rounding and two
  steps of the gate grid as slack. The bound is a worst case over the input range, so the chip never wraps
  on data inside the calibrated range;
- **W, R**: one exponent each from their largest value (per tensor: the module reads one exponent, on ESP32-P4
  too), raised where needed so that the shifts ``gate - e_x - e_W`` and ``gate - e_h - e_R`` stay at most
  ``MAX_RECURRENT_SHIFT`` (``DL_RESCALE`` computes ``1 << shift`` in int);
- **B**: the gate exponent (int16); **Y, Y_h, initial_h**: one exponent, the largest calibrated of the three (the
  module copies h between them as raw integers and shifts R by Y_h's); **LSTM Y_c, initial_c**: the gate
  exponent (int16, asserted by the module);
- an initial state read only by this node and given as a graph input takes that exponent itself; a computed
  one gets a RequantizeLinear (recorded like the generic rules' ones).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx

from espquant.calibration.precision import equivalent_exponent
from espquant.graph import GraphView
from espquant.ops.recurrent import FINEST_GATE_EXPONENT, MAX_RECURRENT_SHIFT, gate_exponent_key
from espquant.optimizer.shapes import infer_shapes
from espquant.quant.pot import exponent_for_max_abs, qmax

__all__ = ["assign_recurrent_exponents", "gate_exponent", "GateBound"]

logger = logging.getLogger(__name__)

_SLACK_STEPS = 2  # the dot product's and the bias's rounding, in steps of the gate grid


def _present(node: onnx.NodeProto, position: int) -> str:
    return node.input[position] if position < len(node.input) else ""


def _row_bound(matrix: np.ndarray, exponent: int, reach: float, bias: np.ndarray | None) -> np.ndarray:
    """Per row of ``(dirs, rows, cols)``: the largest ``|matrix . v + bias|`` for ``|v| <= reach``, with the
    matrix as the chip stores it (each weight off by at most half a step)."""
    magnitudes = np.abs(matrix.astype(np.float64)).sum(axis=-1) + matrix.shape[-1] * 2.0 ** (exponent - 1)
    bound = magnitudes * reach
    return bound if bias is None else bound + np.abs(bias.astype(np.float64))


class GateBound:
    """What a gate exponent must hold: the largest gate sum (and LSTM cell state) the node can produce."""

    def __init__(self, sums: float, steps: int = 0) -> None:
        self.sums = sums
        self.steps = steps  # the LSTM cell state's per-step rounding (one half step each)

    def fits(self, exponent: int) -> bool:
        step = 2.0**exponent
        slack = (_SLACK_STEPS + self.steps) * step
        return self.sums + slack <= qmax(16) * step


def gate_exponent(bound: GateBound) -> int:
    """The finest exponent (not finer than ``FINEST_GATE_EXPONENT``) that holds ``bound``."""
    exponent = max(FINEST_GATE_EXPONENT, exponent_for_max_abs(bound.sums, 16))
    while not bound.fits(exponent):
        exponent += 1
    return exponent


def _bound(
    node: onnx.NodeProto,
    view: GraphView,
    exps: dict,
    bits: int,
    e_x: int,
    e_h: int,
    steps: int | None,
    width: Callable[[str], int],
) -> GateBound:
    """The node's gate bound (module docstring) from its float weights and the exponents chosen so far."""
    w, r = view.array(node.input[1]), view.array(node.input[2])
    directions, rows = w.shape[0], w.shape[1]
    b_name = _present(node, 3)
    b = view.array(b_name).reshape(directions, 2 * rows) if b_name and view.is_constant(b_name) else None
    reach_x, reach_h = 2.0 ** (bits - 1 + e_x), 2.0 ** (bits - 1 + e_h)  # |x| and |h| as their integers allow
    from_x = _row_bound(w, int(exps[node.input[1]]), reach_x, None if b is None else b[:, :rows])
    from_h = _row_bound(r, int(exps[node.input[2]]), reach_h, None if b is None else b[:, rows:])
    if node.op_type == "GRU":
        return GateBound(float(max(from_x.max(), from_h.max())))
    sums = float((from_x + from_h).max())
    c0 = _present(node, 6)
    if c0 and view.is_constant(c0):
        start = float(np.abs(view.array(c0)).max(initial=0.0))
    elif c0 and isinstance(exps.get(c0), int):
        start = 2.0 ** (width(c0) - 1 + exps[c0])  # the range its calibrated exponent holds
    else:
        start = 0.0
    if steps is None:
        logger.warning("LSTM %r: the sequence length is not static; the cell state bound assumes 1 step", node.name)
    length = steps or 1
    return GateBound(max(sums, start + length), length)


def _clamp_weights(node: onnx.NodeProto, exps: dict, gate: int, e_x: int, e_h: int) -> bool:
    """Raise W's and R's exponents where a shift would pass ``MAX_RECURRENT_SHIFT``; True when one changed."""
    changed = False
    for position, reads in ((1, e_x), (2, e_h)):
        floor = gate - reads - MAX_RECURRENT_SHIFT
        if exps[node.input[position]] < floor:
            exps[node.input[position]] = floor
            changed = True
    return changed


def _state(
    node: onnx.NodeProto,
    position: int,
    target: int,
    view: GraphView,
    exps: dict,
    need: Callable[[onnx.NodeProto, int, str, int], None],
) -> None:
    """An initial state at ``target``: a constant or a graph input only this node reads takes it; anything else
    is requantized before the node."""
    tensor = _present(node, position)
    if not tensor:
        return
    sole_input = tensor in view.graph_inputs and len(view.consumers.get(tensor, [])) == 1
    if view.is_constant(tensor) or sole_input:
        exps[tensor] = target
    else:
        need(node, position, tensor, target)


def _sequence_length(model: onnx.ModelProto, view: GraphView, x: str) -> int | None:
    """X's static first dimension (the sequence), from the model's shapes or, when it records none, inferred."""
    shape = view.shape(x)
    if shape is None:
        inferred = onnx.ModelProto()
        inferred.CopyFrom(model)
        infer_shapes(inferred)
        shape = GraphView(inferred.graph).shape(x)
    return shape[0] if shape and isinstance(shape[0], int) else None


def assign_recurrent_exponents(
    model: onnx.ModelProto,
    node: onnx.NodeProto,
    view: GraphView,
    exps: dict,
    bits: int,
    input_exp: int,
    need: Callable[[onnx.NodeProto, int, str, int], None],
    width: Callable[[str], int],
) -> None:
    """Apply the module docstring's rules to ``node`` of ``model`` (``exps`` is updated in place; ``bits`` is the
    node's width and ``input_exp`` X's exponent at it; ``need`` records a RequantizeLinear; ``width`` gives a
    tensor's calibrated width: in a mixed model only Y may be listed as the int16 layer, Y_h is written at the
    node's width all the same)."""
    outputs = [*node.output, "", "", ""][:3]
    hidden_outputs = [t for t in outputs[:2] if t and isinstance(exps.get(t), int)]
    if not hidden_outputs:
        return  # nothing calibrated (a table without this node's outputs): the lowering reports it
    e_y = max(equivalent_exponent(exps[t], width(t), bits) for t in hidden_outputs)
    h0 = _present(node, 5)  # copied into h as raw integers: Y's exponent must hold it too
    if h0 and view.is_constant(h0):
        e_y = max(e_y, exponent_for_max_abs(float(np.abs(view.array(h0)).max(initial=0.0)), bits))
    elif h0 and isinstance(exps.get(h0), int):
        e_y = max(e_y, equivalent_exponent(exps[h0], width(h0), bits))
    for tensor in outputs[:2]:
        if tensor:
            exps[tensor] = e_y
    steps = _sequence_length(model, view, node.input[0]) if node.op_type == "LSTM" else None
    gate = gate_exponent(_bound(node, view, exps, bits, input_exp, e_y, steps, width))
    while _clamp_weights(node, exps, gate, input_exp, e_y):  # coarser weights: check the bound again
        gate = max(gate, gate_exponent(_bound(node, view, exps, bits, input_exp, e_y, steps, width)))
    exps[gate_exponent_key(node.output)] = gate
    if _present(node, 3):
        exps[node.input[3]] = gate
    if node.op_type == "LSTM" and outputs[2]:
        exps[outputs[2]] = gate
    _state(node, 5, e_y, view, exps, need)
    if node.op_type == "LSTM":
        _state(node, 6, gate, view, exps, need)
