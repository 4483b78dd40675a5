"""ESP-DL's quantized GRU and LSTM, bit for bit (ESP-DL v3.3.9, commit 12c0616d).

What the chip computes, step by step, from the source (paths under ``esp-dl/dl/``):

- ``module/include/dl_module_gru.hpp`` / ``dl_module_lstm.hpp`` ``forward_template<T>``: per direction and time
  step, ``mat_vec_dotprod`` of W with x_t and of R with h_{t-1} into int16 caches at the gate exponent, the int16
  bias added with C's wrap-around store, the gates read from float tables, the new h (and c) in float32, rounded
  with ``tool::round`` and saturated (c is stored into int16 without saturation: it wraps);
- ``base/dl_base_dotprod.cpp`` ``dotprod``: the ESP32-S3 (``isa/tie728/dl_tie728_dotprod.S``) and ESP32-P4
  (``isa/esp32p4/dl_esp32p4_dotprod.S``) assembly when a row has a multiple of 16 (int8) / 8 (int16) columns and
  the shift is not negative: an exact sum in the 40-bit ACCX / XACC (saturating after every 16 / 8 products),
  a right shift (S3: a preloaded 2^(s-1) then floor, i.e. half-up; P4: half-to-even, ``dl_esp32p4_cfg_round``),
  then a clamp to int16. Otherwise ``dotprod_c``: the integer sum converted to float32, times ``DL_RESCALE``,
  ``tool::round``, ``truncate`` to int16;
- ``math/include/dl_math.hpp`` ``SigmoidLUT`` / ``TanhLUT``: float tables of ``sigmoid(i 2^gate)`` over
  +-6.3 / +-3.5, read by index with the symmetric rules of ``get`` (``1 - table[-i]``, ``-table[-i]``);
- ``tool/src/dl_tool.cpp``: ``round_half_up(float) = (int)floorf(value + 0.5)`` (the sum narrowed to float32 by
  ``floorf``) on ESP32-S3 and the plain-C chips; ``fcvt.w.s`` round-to-nearest-even on ESP32-P4.

Every float operation is one numpy float32 operation in the C source's order (no fused multiply-add: see the
registry notes for chips with an FPU). The sigmoid of the tables is computed as the C code does,
``1.0 / (1.0 + expf(-x))`` in double, with the C library's ``expf``, and the tables' bounds with an exact
division (``(int)(3.5f / 2^gate) + 1``).

Where ESP-DL built for x86-64 with ``-O3 -ffast-math`` (``../shared/tools/espdl-host``) computes otherwise, the
chip's rule is kept: GCC there divides the table bounds with ``rcpps`` (TanhLUT ends one entry early) and
vectorises the tables' ``expf`` with libmvec (last-bit differences in some entries). ``tests/test_recurrent.py``
reproduces both to compare with that binary bit for bit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from espquant.errors import ModelError, QuantTableError
from espquant.graph import GraphView
from espquant.ops.recurrent import (
    GATES,
    MAX_RECURRENT_SHIFT,
    RUNTIME_GATE_EXPONENT,
    gate_exponent_key,
    recurrent_outputs,
)
from espquant.quant.profiles import TargetProfile
from espquant.quant.rounding import round_float, saturate, shift_round, wrap
from espquant.simulator import libm

if TYPE_CHECKING:
    from espquant.simulator.quantized_model import QNode, QuantizedModel

__all__ = [
    "GateTables",
    "gate_tables",
    "c_round",
    "dotprod",
    "RecurrentExponents",
    "gru",
    "lstm",
    "run_gru",
    "run_lstm",
    "lower_recurrent",
]

F32 = np.float32
_ACC_BITS = 40  # ACCX (ESP32-S3) / XACC (ESP32-P4)
_SIGMOID_RANGE = 6.3  # SigmoidLUT(gate, -6.3, 6.3): "+-6.3 is the boundary for sigmoid" (dl_module_gru.hpp)
_TANH_RANGE = 3.5  # TanhLUT(gate, -3.5, 3.5)


# --- float32 helpers of the C code -------------------------------------------------------------------------------


def dl_scale(exponent: int) -> np.float32:
    """``DL_SCALE(e)`` (dl_define.hpp): ``1 << e`` for e > 0, else ``(float)1.0 / (1 << -e)``: 2^e in float32."""
    return F32(1 << exponent) if exponent > 0 else F32(F32(1.0) / F32(1 << -exponent))


def dl_rescale(exponent: int) -> np.float32:
    """``DL_RESCALE(e)`` (dl_define.hpp): ``(float)1.0 / (1 << e)`` for e > 0, else ``1 << -e``: 2^-e in float32."""
    return F32(F32(1.0) / F32(1 << exponent)) if exponent > 0 else F32(1 << -exponent)


def c_round(values: np.ndarray, rounding: str) -> np.ndarray:
    """``tool::round(float)`` (dl_tool.cpp) on float32 values, as int64.

    Half-up is ``(int)floorf(value + 0.5)``: the double sum is narrowed to float32 by ``floorf``, so a value just
    below one half (0.49999997) rounds up, as on the chip. ESP32-P4's ``fcvt.w.s ..., rne`` is round-half-even of
    the float32 value."""
    values = np.asarray(values, dtype=F32)
    if rounding == "half_up":
        return np.floor((values + F32(0.5)).astype(F32)).astype(np.int64)
    if rounding == "half_even":
        return np.rint(values).astype(np.int64)
    raise ValueError(f"unknown rounding {rounding!r}")


@functools.cache
def _libm_expf() -> Callable[[float], float] | None:
    """The C library's scalar ``expf``: the stand-in for the chip's newlib one (glibc's and newlib's current
    ``expf`` are the same Arm optimized-routines code; an older newlib may differ in the last bit)."""
    name = ctypes.util.find_library("m")
    try:
        library = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        function = library.expf
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_float
    function.argtypes = [ctypes.c_float]
    return function


def expf(x: np.ndarray) -> np.ndarray:
    """float32 ``expf`` of every element: the C library's when it can be called, else the correctly rounded one."""
    x = np.asarray(x, dtype=F32)
    function = _libm_expf()
    if function is None:
        return libm.expf(x)
    return np.fromiter((function(float(v)) for v in x.reshape(-1)), dtype=F32, count=x.size).reshape(x.shape)


def c_sigmoid(x: np.ndarray) -> np.ndarray:
    """``math::sigmoid`` (dl_math.hpp): ``1.0 / (1.0 + expf(-x))`` in double, returned as float."""
    x = np.asarray(x, dtype=F32)
    return (1.0 / (1.0 + expf(-x).astype(np.float64))).astype(F32)


def c_tanh(x: np.ndarray) -> np.ndarray:
    """``math::tanh`` (dl_math.hpp): ``2 * sigmoid(2 * x) - 1`` in float32."""
    x = np.asarray(x, dtype=F32)
    doubled = (F32(2) * c_sigmoid((F32(2) * x).astype(F32))).astype(F32)
    return (doubled - F32(1)).astype(F32)


# --- SigmoidLUT / TanhLUT ----------------------------------------------------------------------------------------


def _table_size(gate: int, bound: float) -> int:
    """``m_quant_max`` of a table built for ``[-bound, bound]`` (dl_math.hpp): ``(int)(bound / scale) + 1`` with the
    float parameter truncated toward zero, made symmetric with the lower end's ``(int)(-bound / scale) - 1``."""
    scale = dl_scale(gate)
    low = int(np.trunc(F32(F32(-bound) / scale))) - 1
    high = int(np.trunc(F32(F32(bound) / scale))) + 1
    return max(-low, high)


@dataclass(frozen=True)
class GateTables:
    """The two float tables of one gate exponent, indexed as ``SigmoidLUT::get`` / ``TanhLUT::get`` do."""

    gate: int
    sigmoid_table: np.ndarray  # float32, sigmoid(i 2^gate) for i = 0..quant_max
    tanh_table: np.ndarray

    def sigmoid(self, index: np.ndarray) -> np.ndarray:
        """``SigmoidLUT::get``: ``table[min(i, max)]`` for i >= 0, ``1 - table[min(-i, max)]`` below."""
        index = np.asarray(index, dtype=np.int64)
        value = self.sigmoid_table[np.minimum(np.abs(index), len(self.sigmoid_table) - 1)]
        return np.where(index >= 0, value, (F32(1) - value).astype(F32)).astype(F32)

    def tanh(self, index: np.ndarray) -> np.ndarray:
        """``TanhLUT::get``: ``table[min(i, max)]`` for i >= 0, ``-table[min(-i, max)]`` below."""
        index = np.asarray(index, dtype=np.int64)
        value = self.tanh_table[np.minimum(np.abs(index), len(self.tanh_table) - 1)]
        return np.where(index >= 0, value, -value).astype(F32)


@functools.lru_cache(maxsize=16)
def gate_tables(gate: int) -> GateTables:
    """The tables a GRU / LSTM module builds in its constructor for ``gate_exponent`` ``gate``."""
    scale = dl_scale(gate)

    def inputs(bound: float) -> np.ndarray:
        return (np.arange(_table_size(gate, bound) + 1).astype(F32) * scale).astype(F32)  # i * input_scale

    return GateTables(gate, c_sigmoid(inputs(_SIGMOID_RANGE)), c_tanh(inputs(_TANH_RANGE)))


# --- mat_vec_dotprod -----------------------------------------------------------------------------------------------


def _simd(profile: TargetProfile, bits: int, columns: int, shift: int) -> bool:
    """Whether ``dotprod`` takes the assembly kernel (dl_base_dotprod.cpp): S3 / P4, whole 128-bit rows, shift >= 0."""
    return profile.simd and shift >= 0 and columns % (16 if bits == 8 else 8) == 0


def _accumulate_saturating(matrix: np.ndarray, vectors: np.ndarray, start: int, bits: int) -> np.ndarray:
    """ACCX / XACC after ``start`` and one saturating ``vmulas`` per 16 (int8) / 8 (int16) products, in column
    order: ``(batch, rows)``. The plain sum is returned when no partial sum can reach the 40-bit rail."""
    limit = 1 << (_ACC_BITS - 1)
    exact = vectors @ matrix.T + start
    worst = abs(start) + int(np.abs(vectors).max(initial=0)) * int(np.abs(matrix).sum(axis=1).max(initial=0))
    if worst < limit:
        return exact
    group = 16 if bits == 8 else 8
    acc = np.full(exact.shape, start, dtype=np.int64)
    for begin in range(0, matrix.shape[1], group):
        part = vectors[:, begin : begin + group] @ matrix[:, begin : begin + group].T
        acc = np.clip(acc + part, -limit, limit - 1)
    return acc


def dotprod(matrix: np.ndarray, vectors: np.ndarray, shift: int, bits: int, profile: TargetProfile) -> np.ndarray:
    """``mat_vec_dotprod(matrix, vector, result, rows, cols, shift)`` for each row of ``vectors``.

    ``matrix`` (rows, cols) and ``vectors`` (batch, cols) hold int8 / int16 values; the result (batch, rows) holds
    the int16 values the chip stores (see the module docstring for the two paths)."""
    matrix = np.asarray(matrix, dtype=np.int64)
    vectors = np.asarray(vectors, dtype=np.int64)
    if _simd(profile, bits, matrix.shape[1], shift):
        if profile.rounding == "half_up":  # S3: ee.ld.accx.ip of rounding_offset, ee.srs.accx (arithmetic shift)
            offset = (1 << (shift - 1)) if shift > 0 else 0
            acc = _accumulate_saturating(matrix, vectors, offset, bits)
            shifted = acc >> shift
        else:  # P4: esp.zero.xacc, esp.srs.s.xacc with CFG rounding HALF_EVEN
            acc = _accumulate_saturating(matrix, vectors, 0, bits)
            shifted = shift_round(acc, shift, "half_even")
        return saturate(saturate(shifted, 32), 16)  # srs saturates to int32; the kernel clamps to int16
    total = vectors @ matrix.T  # int32_t (int8) / int64_t (int16) result in dotprod_c: exact
    if bits == 8 and np.abs(total).max(initial=0) >= 1 << 31:
        raise ModelError("an int8 GRU / LSTM row sum passes int32 (more than 131071 columns): ESP-DL would overflow")
    scaled = (total.astype(F32) * dl_rescale(shift)).astype(F32)  # result * scale: the sum converted to float
    return saturate(c_round(scaled, profile.rounding), 16)


# --- the two modules ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecurrentExponents:
    """The exponents a module reads: X, W, R, Y (``rescale``), Y_h (``m_h_prev``: the R shift), Y_c, gate."""

    x: int
    w: int
    r: int
    y: int
    h: int
    gate: int
    c: int = 0

    @property
    def w_shift(self) -> int:
        return self.gate - (self.x + self.w)

    @property
    def r_shift(self) -> int:
        return self.gate - (self.h + self.r)


@dataclass(frozen=True)
class RecurrentInputs:
    """One node's integers: X (seq, batch, input), W (dirs, G*H, input), R (dirs, G*H, H), B (dirs, 2*G*H) or
    None, initial states (dirs, batch, H) or None."""

    x: np.ndarray
    w: np.ndarray
    r: np.ndarray
    b: np.ndarray | None
    h0: np.ndarray | None
    c0: np.ndarray | None = None


def _steps(length: int, direction: int) -> range:
    """Time steps of one direction: forward, then (direction 1) from the last step back to the first."""
    return range(length) if direction == 0 else range(length - 1, -1, -1)


def gru(
    inputs: RecurrentInputs, e: RecurrentExponents, hidden: int, bits: int, profile: TargetProfile
) -> tuple[np.ndarray, np.ndarray]:
    """``GRU::forward_template<T>`` (dl_module_gru.hpp): Y (seq, dirs, batch, H) and Y_h (dirs, batch, H)."""
    tables = gate_tables(e.gate)
    rescale = dl_rescale(e.y)
    rounding = profile.rounding
    steps, batch = inputs.x.shape[:2]
    directions = inputs.w.shape[0]
    y = np.zeros((steps, directions, batch, hidden), dtype=np.int64)
    y_h = np.zeros((directions, batch, hidden), dtype=np.int64)
    size = 3 * hidden
    for d in range(directions):
        h = inputs.h0[d].astype(np.int64) if inputs.h0 is not None else np.zeros((batch, hidden), np.int64)
        for t in _steps(steps, d):
            x_part = dotprod(inputs.w[d], inputs.x[t], e.w_shift, bits, profile)  # input_cache
            h_part = dotprod(inputs.r[d], h, e.r_shift, bits, profile)  # hidden_cache
            if inputs.b is not None:  # int16 += int16: the store wraps
                x_part = wrap(x_part + inputs.b[d, :size], 16)
                h_part = wrap(h_part + inputs.b[d, size:], 16)
            gates = tables.sigmoid(x_part[:, : 2 * hidden] + h_part[:, : 2 * hidden])
            z, reset = gates[:, :hidden], gates[:, hidden:]
            recurrent = (reset * h_part[:, 2 * hidden :].astype(F32)).astype(F32)
            n = tables.tanh(c_round((x_part[:, 2 * hidden :].astype(F32) + recurrent).astype(F32), rounding))
            temp = ((((F32(1) - z).astype(F32) * n).astype(F32)) * rescale).astype(F32)
            temp = (temp + (z * h.astype(F32)).astype(F32)).astype(F32)
            h = saturate(c_round(temp, rounding), bits)
            y[t, d] = h
        y_h[d] = h
    return y, y_h


def lstm(
    inputs: RecurrentInputs, e: RecurrentExponents, hidden: int, bits: int, profile: TargetProfile
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``LSTM::forward_template<T>`` (dl_module_lstm.hpp): Y, Y_h and the int16 cell state Y_c."""
    tables = gate_tables(e.gate)
    rescale_y, rescale_c = dl_rescale(e.y), dl_rescale(e.c)
    rounding = profile.rounding
    steps, batch = inputs.x.shape[:2]
    directions = inputs.w.shape[0]
    y = np.zeros((steps, directions, batch, hidden), dtype=np.int64)
    y_h = np.zeros((directions, batch, hidden), dtype=np.int64)
    y_c = np.zeros((directions, batch, hidden), dtype=np.int64)
    size = 4 * hidden
    for d in range(directions):
        h = inputs.h0[d].astype(np.int64) if inputs.h0 is not None else np.zeros((batch, hidden), np.int64)
        c = inputs.c0[d].astype(np.int64) if inputs.c0 is not None else np.zeros((batch, hidden), np.int64)
        for t in _steps(steps, d):
            total = dotprod(inputs.w[d], inputs.x[t], e.w_shift, bits, profile)
            total = total + dotprod(inputs.r[d], h, e.r_shift, bits, profile)
            if inputs.b is not None:
                total = total + inputs.b[d, :size] + inputs.b[d, size:]
            total = wrap(total, 16)  # input_cache[i] += wb[i] + hidden_cache[i] + rb[i], stored in int16
            i_gate = tables.sigmoid(total[:, :hidden])
            o_gate = tables.sigmoid(total[:, hidden : 2 * hidden])
            f_gate = tables.sigmoid(total[:, 2 * hidden : 3 * hidden])
            g_gate = tables.tanh(total[:, 3 * hidden :])
            kept = (f_gate * c.astype(F32)).astype(F32)
            added = (((i_gate * g_gate).astype(F32)) * rescale_c).astype(F32)
            c = wrap(c_round((kept + added).astype(F32), rounding), 16)  # c_prev = tool::round(temp): int -> int16
            temp = (((o_gate * tables.tanh(c)).astype(F32)) * rescale_y).astype(F32)
            h = saturate(c_round(temp, rounding), bits)
            y[t, d] = h
        y_h[d] = h
        y_c[d] = c
    return y, y_h, y_c


# --- the interpreter's entries -----------------------------------------------------------------------------------


def _optional(node: QNode, env: dict[str, np.ndarray], position: int) -> np.ndarray | None:
    name = node.inputs[position] if position < len(node.inputs) else ""
    return np.asarray(env[name], dtype=np.int64) if name else None


def _read(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> tuple[RecurrentInputs, int, int]:
    """The node's integers in the module's shapes, its hidden size and direction count (the file's attributes
    as ``deserialize`` reads them: any direction but 'bidirectional' runs forward)."""
    directions = 2 if node.attrs.get("direction", "forward") == "bidirectional" else 1
    r = np.asarray(env[node.inputs[2]], dtype=np.int64)
    hidden = int(node.attrs.get("hidden_size") or r.shape[-1])
    x = np.asarray(env[node.inputs[0]], dtype=np.int64)
    if int(node.attrs.get("layout", 0)):  # seq_length = x_shape[1]: [batch, seq, input] -> [seq, batch, input]
        x = x.transpose(1, 0, 2)
    rows = GATES[node.op_type] * hidden
    w = np.asarray(env[node.inputs[1]], dtype=np.int64).reshape(directions, rows, -1)
    b = _optional(node, env, 3)
    batch = x.shape[1]
    states = [_optional(node, env, p) for p in (5, 6)]
    h0, c0 = (s.reshape(directions, batch, hidden) if s is not None else None for s in states)
    inputs = RecurrentInputs(
        x, w, r.reshape(directions, rows, hidden), None if b is None else b.reshape(directions, 2 * rows), h0, c0
    )
    return inputs, hidden, directions


def _exponents(m: QuantizedModel, node: QNode) -> RecurrentExponents:
    e_y, e_h = m.exponent(node.outputs[0]), m.exponent(node.outputs[1])
    gate = int(node.attrs.get("gate_exponent", RUNTIME_GATE_EXPONENT))
    e_c = m.exponent(node.outputs[2]) if node.op_type == "LSTM" else 0
    x, w, r = (m.exponent(t) for t in node.inputs[:3])
    e = RecurrentExponents(x, w, r, e_y, e_h, gate, e_c)
    shifts = {"W": e.w_shift, "R": e.r_shift, "gate": gate, "Y": e_y, "Y_c": e_c}
    wrong = {k: v for k, v in shifts.items() if abs(v) > MAX_RECURRENT_SHIFT}
    if wrong:
        raise ModelError(
            f"{node.op_type} {node.name!r}: shifts / exponents {wrong} pass +-{MAX_RECURRENT_SHIFT}: ESP-DL's "
            "DL_SCALE / DL_RESCALE compute 1 << n in int, which overflows (dl_define.hpp); calibrate again"
        )
    return e


def run_gru(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The interpreter's GRU: outputs Y, Y_h."""
    inputs, hidden, _ = _read(m, node, env)
    return list(gru(inputs, _exponents(m, node), hidden, node.bits, m.profile))


def run_lstm(m: QuantizedModel, node: QNode, env: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The interpreter's LSTM: outputs Y, Y_h, Y_c (the runtime asserts Y_c is int16 at the gate exponent)."""
    e = _exponents(m, node)
    if e.c != e.gate or m.width(node.outputs[2]) != 16:
        raise ModelError(
            f"LSTM {node.name!r}: Y_c is int{m.width(node.outputs[2])} at exponent {e.c}; ESP-DL asserts int16 at "
            f"the gate exponent {e.gate} (dl_module_lstm.hpp) and aborts"
        )
    inputs, hidden, _ = _read(m, node, env)
    return list(lstm(inputs, e, hidden, node.bits, m.profile))


# --- lowering an ONNX node with its table (simulator/lowering.py) --------------------------------------------------


def _quantized(value: np.ndarray, exponent: int, bits: int, rounding: str) -> np.ndarray:
    return saturate(round_float(np.asarray(value, dtype=np.float64) * 2.0**-exponent, rounding), bits)


def lower_recurrent(
    qnode: QNode,
    node: onnx.NodeProto,
    view: GraphView,
    exps: dict[str, int | list[int]],
    widths: dict[str, int],
    constants: dict[str, np.ndarray],
    base_bits: int,
    rounding: str,
    requantize: Callable[[str, int, str, int], str],
) -> None:
    """Finish a GRU / LSTM node of the integer model after the generic lowering (its weights are quantized):

    - every output the module writes gets a name (a node may leave Y, Y_h or Y_c unnamed in ONNX);
    - the gate exponent from the table becomes the ``gate_exponent`` attribute, with ``hidden_size``;
    - B becomes int16 at the gate exponent; initial_h takes Y's exponent and the layer's width, initial_c int16 at
      the gate exponent (constants quantized so, computed tensors through a RequantizeLinear: ``requantize`` is
      the lowering's ``(tensor, exponent, consumer, width) -> tensor``); LSTM Y_c is int16.

    Raises:
        QuantTableError: the table has no gate exponent for the node, or its exponents give shifts past
            ``MAX_RECURRENT_SHIFT``.
    """
    key = gate_exponent_key(node.output)
    gate = exps.get(key)
    where = f"{node.op_type} {node.name or node.output[0]!r}"
    if not isinstance(gate, int):
        raise QuantTableError(f"{where}: the table has no gate exponent ({key!r}); calibrate the model again.")
    node_bits = qnode.bits
    labels = ("Y", "Y_h", "Y_c")[: recurrent_outputs(node.op_type)]
    outputs = [*qnode.outputs, *[""] * len(labels)][: len(labels)]
    named = [t for t in outputs[:2] if t and isinstance(exps.get(t), int)]
    if not named:
        raise QuantTableError(f"{where}: the table has no exponent for Y or Y_h; calibrate the model again.")
    e_y = exps[named[0]]
    base = node.name or next(o for o in node.output if o)
    for k, label in enumerate(labels):
        if not outputs[k]:
            outputs[k] = f"{base}::{label}"
            exps[outputs[k]] = gate if label == "Y_c" else e_y
        if node_bits != base_bits and label != "Y_c":  # the module writes h at its width (a mixed model's layer)
            widths[outputs[k]] = node_bits
    if node.op_type == "LSTM":
        exps[outputs[2]] = gate
        if base_bits != 16:
            widths[outputs[2]] = 16
    qnode.outputs = outputs
    r = constants[node.input[2]]
    qnode.attrs.update(gate_exponent=gate, hidden_size=int(r.shape[-1]))
    qnode.attrs.setdefault("direction", "forward")
    if len(node.input) > 3 and node.input[3]:
        constants[node.input[3]] = _quantized(view.array(node.input[3]), gate, 16, rounding)
        exps[node.input[3]] = gate
    targets = {5: (e_y, node_bits)} | ({6: (gate, 16)} if node.op_type == "LSTM" else {})
    for position, (exponent, width) in targets.items():
        tensor = node.input[position] if position < len(node.input) else ""
        if not tensor:
            continue
        if view.is_constant(tensor):
            shared = exps.get(tensor) not in (None, exponent)  # one initializer read at another exponent too
            name = f"{tensor}__{node.name or base}" if shared else tensor
            constants[name] = _quantized(view.array(tensor), exponent, width, rounding)
        else:
            if tensor in view.graph_inputs and len(view.consumers.get(tensor, [])) == 1 and width != base_bits:
                widths[tensor] = width  # the chip quantizes this input at the state's width (calibration/recurrent.py)
            name = requantize(tensor, exponent, node.name, width)
        exps[name] = exponent
        if width != base_bits:
            widths[name] = width
        qnode.inputs[position] = name
    _check_shifts(where, exps, qnode, gate)


def _check_shifts(where: str, exps: dict[str, int | list[int]], qnode: QNode, gate: int) -> None:
    x, w, r, y, h = (exps[t] for t in (*qnode.inputs[:3], *qnode.outputs[:2]))
    shifts = {"W": gate - x - w, "R": gate - h - r, "gate": gate, "Y": y}  # type: ignore[operator]
    wrong = {k: v for k, v in shifts.items() if not isinstance(v, int) or abs(v) > MAX_RECURRENT_SHIFT}
    if wrong:
        raise QuantTableError(
            f"{where}: shifts / exponents {wrong} pass +-{MAX_RECURRENT_SHIFT} (ESP-DL computes 1 << n in int, "
            "dl_define.hpp); calibrate the model again with espquant, which keeps them in range."
        )
