"""The integer model: what the chip holds (integer weights and biases, exponents, fused Relu, tables,
RequantizeLinear where needed) as nodes in ONNX's layout, and how it runs: the compiled fast path where it is
provably exact, the interpreter (:mod:`espquant.simulator.interpreter`) everywhere else. Both front ends build
it: :mod:`espquant.simulator.lowering` from an ONNX model and its table, :mod:`espquant.simulator.espdl_model`
from an ``.espdl`` file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from espquant.quant.pot import EXACT_FLOAT32
from espquant.quant.profiles import TargetProfile
from espquant.simulator import kernels
from espquant.simulator.blas import blas_threads
from espquant.simulator.compiled import QUANTIZE_INPUT, CompiledProgram, GuardTripped, compile_program
from espquant.simulator.interpreter import FLOAT_RUN, RUN, table_lookup

__all__ = ["QuantizedModel", "QNode"]

F32 = np.float32
logger = logging.getLogger(__name__)


@dataclass
class QNode:
    """One node as the chip runs it."""

    op_type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    relu: bool = False  # a fused Relu
    table: np.ndarray | None = None  # int8 activation table
    bits: int = 8  # the width the node computes and writes at (its quant_type)
    # The float model's inferred input shapes (ints, names for symbolic dims, None unknown): what the compiled
    # path may decide from before any data arrives (a Mul's SIMD or float path); None when not known.
    input_shapes: list[list[int | str | None] | None] | None = None


@dataclass
class QuantizedModel:
    """Integer constants, exponents and nodes for one target and bit width; ``run`` simulates the chip."""

    nodes: list[QNode]
    constants: dict[str, np.ndarray]
    exponents: dict[str, int | list[int]]
    inputs: list[str]
    outputs: list[str]
    profile: TargetProfile
    bits: int
    float_tensors: set[str] = field(default_factory=set)
    widths: dict[str, int] = field(default_factory=dict)  # tensors whose width is not ``bits`` (mixed precision)
    requantized: int = 0
    threads: int | None = None  # onnxruntime's and BLAS's threads (simulator/blas.py); None: their own choice
    compiled: bool = True  # run provably exact node runs as onnxruntime graphs (simulator/compiled.py)
    # From the program's third run its segments run on onnxruntime's blocked tensors (simulator/layout.py): an
    # edit that costs about one more session creation, which a model run a few times (each candidate table auto
    # simulates, in a few runs of its search samples) does not win back.
    blocked_layout: bool = True
    # What stateful nodes (StreamingCache) carry from one run to the next, as the chip's module does.
    state: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _sessions: dict[str, Any] = field(default_factory=dict, repr=False)
    _programs: dict[tuple[bool, int | None], CompiledProgram] = field(default_factory=dict, repr=False)
    _guarded: set[str] = field(default_factory=set, repr=False)  # nodes whose compiled guard tripped once
    # What ``simulate`` reads off the float model on every call (input shapes, chunking), kept for the last one.
    _float_facts: tuple[Any, ...] = field(default=(), repr=False)
    # The copy that runs many samples at once and how many (simulator/batching.py), once decided: [(copy, n)].
    _batch_free: list[Any] = field(default_factory=list, repr=False)

    def reset(self) -> None:
        """Forget what stateful nodes carry between runs (ESP-DL's ``Model::reset``: a new stream)."""
        self.state.clear()

    def width(self, name: str) -> int:
        """The integer width of tensor ``name`` (``bits`` except in the int16 layers of a mixed model)."""
        return self.widths.get(name, self.bits)

    def exponent(self, name: str) -> int:
        value = self.exponents[name]
        return value if isinstance(value, int) else max(value)

    def quantize_input(self, name: str, x: np.ndarray) -> np.ndarray:
        """The device's input quantization ``q = sat(R(x 2^-e))`` with the profile's rounding; an input the
        model keeps float (read only by QuantizeLinear nodes) stays float32."""
        if name in self.float_tensors:
            return np.asarray(x, dtype=F32)
        return kernels.quantize_float(
            np.asarray(x), e_out=self.exponent(name), bits=self.width(name), profile=self.profile
        )

    def run(self, int_inputs: dict[str, np.ndarray], keep: bool = False) -> dict[str, np.ndarray]:
        """Integer inputs in, the chip's integer outputs out (``keep``: every tensor, by the interpreter)."""
        ints = {k: np.asarray(v, dtype=F32 if k in self.float_tensors else np.int64) for k, v in int_inputs.items()}
        if self.compiled and not keep and all(_fits_float32(v) for v in ints.values() if v.dtype != F32):
            return self._run_compiled(ints, quantize_inputs=False)
        env = {**self.constants, **ints}
        with blas_threads(self.threads):
            for node in self.nodes:
                self.run_node(node, env)
        return dict(env) if keep else {name: env[name] for name in self.outputs}

    def run_float(self, float_inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``run`` on float inputs quantized as the device does (``quantize_input``), in one compiled pass."""
        if self.compiled:
            feeds = {k if k in self.float_tensors else _float_name(k): np.asarray(v) for k, v in float_inputs.items()}
            return self._run_compiled(feeds, True)
        return self.run({name: self.quantize_input(name, value) for name, value in float_inputs.items()})

    def _run_compiled(self, feeds: dict[str, np.ndarray], quantize_inputs: bool) -> dict[str, np.ndarray]:
        """Run the compiled program; a node whose guard trips becomes a rail step (an accumulating node) or moves
        to the interpreter for good (the program is rebuilt) and the batch runs again, so the loop ends after at
        most one trip per node. Only interpreter steps read the constants from the environment."""
        while True:
            program = self._program(quantize_inputs)
            env = {**self.constants, **feeds} if program.reads_constants else dict(feeds)
            try:
                with blas_threads(self.threads if program.uses_blas else None):
                    program.run(env, self.run_node, self.outputs)
            except GuardTripped as trip:
                logger.debug("compiled guard tripped for %s: rail steps or interpreter from now on", trip.nodes)
                if set(trip.nodes) <= self._guarded:  # a lowering that ignored its trip would loop forever here
                    raise RuntimeError(f"the compiled guards of {trip.nodes} tripped again") from trip
                self._guarded.update(trip.nodes)
                self._programs.clear()
                continue
            return {name: env[name] for name in self.outputs}

    def run_node(self, node: QNode, env: dict[str, np.ndarray]) -> None:
        """Interpret one node on ``env`` (its outputs are added): the numpy kernels, the reference path.

        A node with a stored table is the runtime's LUT module whatever its op type (``deserialize`` of every
        activation module picks LUT when the file names a table); a node on float tensors (``quant_type`` F32
        in a file) computes in float32."""
        if node.op_type == QUANTIZE_INPUT:
            env[node.outputs[0]] = self.quantize_input(node.outputs[0], env[node.inputs[0]])
            return
        if node.table is not None:
            env[node.outputs[0]] = table_lookup(self, node, env[node.inputs[0]])
            return
        floats = node.outputs and node.outputs[0] in self.float_tensors and node.op_type in FLOAT_RUN
        if floats and all(t in self.float_tensors or t in self.constants for t in node.inputs if t):
            env[node.outputs[0]] = FLOAT_RUN[node.op_type](*(env[t] if t else None for t in node.inputs))
            return
        env.update(zip(node.outputs, RUN[node.op_type](self, node, env)))

    def _program(self, quantize_inputs: bool) -> CompiledProgram:
        key = (quantize_inputs, self.threads)
        program = self._programs.get(key)
        if program is None:
            prologue = [
                QNode(QUANTIZE_INPUT, "", [_float_name(n)], [n], {}, bits=self.width(n))
                for n in self.inputs
                if n not in self.float_tensors
            ]
            nodes = prologue + self.nodes if quantize_inputs else self.nodes
            program = self._programs[key] = compile_program(self, nodes, self.threads, frozenset(self._guarded))
            program.blocked_layout = self.blocked_layout
            program.reads_constants = bool(program.interpreted_nodes) or any(n in self.constants for n in self.outputs)
        return program


def _float_name(name: str) -> str:
    return name + "::float"


def _fits_float32(values: np.ndarray) -> bool:
    """Integers a float32 holds exactly (the compiled segments' representation)."""
    return values.size == 0 or max(int(values.max()), -int(values.min())) < EXACT_FLOAT32
