"""GRU and LSTM nodes of an ``.espdl`` file, as ESP-DL v3.3.9's ``deserialize`` reads them
(``esp-dl/dl/module/include/dl_module_gru.hpp``, ``dl_module_lstm.hpp``) and as ESP-PPQ writes them
(``QuantRNNPattern`` in ``esp_ppq/parser/espdl/export_patterns.py``; GRU / LSTM are in its ``OTHER_OP_SET``, so
they work in ONNX's layout):

- inputs ``(X, W, R, B, sequence_lens, initial_h[, initial_c])`` in ONNX order, an absent optional input as
  ``""`` (the runtime reads only positions 0-3, 5 and 6; ``sequence_lens`` is always written as ``""``: the
  checker accepts it only when it is the full length, which is what the runtime does anyway);
- W ``[dirs, G*H, input]`` and R ``[dirs, G*H, H]`` plain row-major (``mat_vec_dotprod`` walks rows of
  ``cols`` elements, no SIMD blocking), INT8 / INT16 with one exponent; B ``[dirs, 2*G*H]`` INT16 at the gate
  exponent; initial_h at Y's exponent and width; initial_c INT16 at the gate exponent;
- attributes ``hidden_size``, ``direction``, ``layout`` 0, ``gate_exponent`` (ESP-PPQ's name; the module's
  default is -8), GRU ``linear_before_reset`` 1, LSTM ``input_forget`` 0, plus ``quant_type``;
- all outputs the module writes (Y, Y_h and LSTM Y_c), Y_c declared INT16 at the gate exponent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from espquant.espdl.reader import EspdlNode
from espquant.ops.recurrent import GATES

if TYPE_CHECKING:
    from espquant.export.espdl_export import _Export
    from espquant.simulator.quantized_model import QNode

__all__ = ["export_recurrent"]


def _constant(e: _Export, name: str, dims: tuple[int, ...], dtype: str, exponent: int) -> str:
    """An integer initializer of the integer model, written with ``dims`` and one exponent."""
    data = np.asarray(e.model.constants[name]).astype(np.int64).reshape(dims)
    return e.constant(name, data, dtype, [int(exponent)])


def _state(e: _Export, node: QNode, position: int, dims: tuple[int, ...], dtype: str) -> str:
    """An initial state: a constant at its exponent, or the run-time tensor in ONNX layout."""
    tensor = node.inputs[position] if position < len(node.inputs) else ""
    if not tensor:
        return ""
    if tensor in e.model.constants:
        return _constant(e, tensor, dims, dtype, e.model.exponent(tensor))
    return e.ensure(tensor, tuple(range(e.values[tensor].ndim)))


def export_recurrent(e: _Export, node: QNode) -> EspdlNode:
    """One GRU / LSTM node (module docstring); ``node`` comes from ``simulator.recurrent.lower_recurrent``."""
    gates = GATES[node.op_type]
    hidden = int(node.attrs["hidden_size"])
    w = np.asarray(e.model.constants[node.inputs[1]])
    directions, rows, columns = w.reshape(-1, gates * hidden, w.shape[-1]).shape
    gate = int(node.attrs["gate_exponent"])
    inputs = [
        e.ensure(node.inputs[0], (0, 1, 2)),
        _constant(e, node.inputs[1], (directions, rows, columns), e.int_dtype, e.model.exponent(node.inputs[1])),
        _constant(e, node.inputs[2], (directions, rows, hidden), e.int_dtype, e.model.exponent(node.inputs[2])),
    ]
    bias = node.inputs[3] if len(node.inputs) > 3 else ""
    inputs.append(_constant(e, bias, (directions, 2 * rows), "INT16", gate) if bias else "")
    inputs.append("")  # sequence_lens: not read by the runtime
    batch = e.values[node.inputs[0]].shape[1]
    inputs.append(_state(e, node, 5, (directions, batch, hidden), e.int_dtype))
    if node.op_type == "LSTM":
        inputs.append(_state(e, node, 6, (directions, batch, hidden), "INT16"))
    while inputs and not inputs[-1]:
        inputs.pop()
    attrs: dict[str, Any] = {
        "hidden_size": hidden,
        "direction": "bidirectional" if directions == 2 else "forward",
        "layout": 0,
        "gate_exponent": gate,
    }
    if node.op_type == "GRU":
        attrs["linear_before_reset"] = 1
    else:
        attrs["input_forget"] = 0
    for output in node.outputs:
        e.declare(output, tuple(range(e.values[output].ndim)))
    return EspdlNode(node.name, node.op_type, inputs, list(node.outputs), attrs)
