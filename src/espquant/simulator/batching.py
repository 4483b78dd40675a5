"""Many samples in one run of a model whose float graph fixes its batch to 1.

Exports from TFLite, Paddle and many PyTorch scripts pin the batch to 1. The chip runs one sample at a time,
and so did the simulator, one run per sample, where per-call overhead costs more than a small model's
arithmetic. But one sample's integers never depend on another's when every node computes each sample on
its own and keeps the batch on the first axis: the same integer graph run on N samples at once then gives
every sample exactly its batch-1 integers. :func:`batch_free` decides this node by node from what the node is
and where its attributes put the batch axis, and makes the copy that takes any batch (a Reshape that spells
the batch as 1 says 0, "as the input"). A node it does not know, or one that could mix samples (an axis-0
Concat, a Transpose that moves the batch, a constant with its own batch of values), keeps the sample-by-sample
runs: this is a speed-up, never a change of the numbers.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import numpy as np

from espquant.simulator.activations import FLOAT_FUNCTIONS
from espquant.simulator.quantized_model import QNode, QuantizedModel

__all__ = ["batch_free", "batched_runs", "samples_per_run", "simulated_together"]

MAX_SAMPLES_PER_RUN = 64
# Values of the largest tensor one run may hold (1 MB of float32). Calls cost what a small model computes, so
# MTCNN's P-Net ran 1.5x faster 8 samples a run; a large model's runs are arithmetic, and past the caches a
# bigger batch costs more memory traffic (MediaPipe's 224x224 hand-landmark model: as fast 2-8 samples a run
# as one by one, 1.25x slower at 32). Large models keep running sample by sample.
TENSOR_BUDGET = 1 << 18

# Each output element comes from the same position of its inputs (and from broadcast constants).
_ELEMENTWISE = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Neg", "Relu", "Clip", "PRelu", "LUT", "Identity", "RequantizeLinear"}
    | {"Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Equal"}
    | set(FLOAT_FUNCTIONS)
)
# Each sample's output from that sample's input alone, whatever the attributes (a batch axis first).
_PER_SAMPLE = frozenset(
    {"Conv", "ConvTranspose", "InsertZeros", "MaxPool", "AveragePool", "GlobalAveragePool", "DepthToSpace"}
    | {"SpaceToDepth"}
)


def _rank(node: QNode, position: int = 0) -> int | None:
    shapes = node.input_shapes or []
    shape = shapes[position] if position < len(shapes) else None
    return len(shape) if shape is not None else None


def _off_batch(axes: list[int], rank: int | None) -> bool:
    """Whether none of ``axes`` is the batch axis (a negative axis needs the rank)."""
    if any(a < 0 for a in axes) and rank is None:
        return False
    return all((a % rank if a < 0 and rank else a) != 0 for a in axes)


def _constant_axes(model: QuantizedModel, node: QNode, position: int) -> list[int] | None:
    if len(node.inputs) > position and node.inputs[position]:
        value = model.constants.get(node.inputs[position])
        return None if value is None else [int(a) for a in np.asarray(value).reshape(-1)]
    return None


def _broadcast_keeps_batch(model: QuantizedModel, node: QNode) -> bool:
    """The operands of an elementwise node keep every sample apart: the activations share one known rank (so
    their batch axes align), and a constant has fewer axes, or as many with one value on the batch axis."""
    activations = [i for i, t in enumerate(node.inputs) if t and t not in model.constants]
    ranks = {_rank(node, i) for i in activations}
    rank = ranks.pop() if len(ranks) == 1 else None
    if not activations or (rank is None and len(activations) > 1) or ranks:
        return False
    for tensor in node.inputs:
        value = model.constants.get(tensor) if tensor else None
        if value is None or np.size(value) == 1 and np.ndim(value) <= 1:
            continue  # an activation, or one value
        if rank is None or np.ndim(value) > rank or (np.ndim(value) == rank and np.shape(value)[0] != 1):
            return False
    return True


def _reshape(model: QuantizedModel, node: QNode) -> bool:
    target = model.constants.get(node.inputs[1]) if len(node.inputs) > 1 else None
    return target is not None and np.asarray(target).size > 0 and int(np.asarray(target).reshape(-1)[0]) in (0, 1)


def _gemm(model: QuantizedModel, node: QNode) -> bool:
    """Rows of an activation (any rank, the batch first) times constant weights."""
    return (
        not node.attrs.get("transA", 0) and node.inputs[0] not in model.constants and node.inputs[1] in model.constants
    )


def _matmul(model: QuantizedModel, node: QNode) -> bool:
    """Activation rows (rank >= 2) times a constant; two activations only as batched products of one rank >= 3."""
    a, b = (t in model.constants for t in node.inputs[:2])
    first, second = _rank(node, 0), _rank(node, 1)
    if a or first is None:
        return False
    return first >= 2 if b else first >= 3 and first == second


def _constant_weights(model: QuantizedModel, node: QNode) -> bool:
    return all(t in model.constants for t in node.inputs[1:] if t)


def _axis(default: int) -> Callable[[QuantizedModel, QNode], bool]:
    def rule(model: QuantizedModel, node: QNode) -> bool:
        return _off_batch([int(node.attrs.get("axis", default))], _rank(node))

    return rule


def _concat(model: QuantizedModel, node: QNode) -> bool:
    joined = [t for t in node.inputs if t]
    return not any(t in model.constants for t in joined) and _off_batch([int(node.attrs.get("axis", 0))], _rank(node))


def _flatten(model: QuantizedModel, node: QNode) -> bool:
    axis = int(node.attrs.get("axis", 1))
    return axis > 0 or (axis < 0 and _rank(node) is not None and axis % (_rank(node) or 1) > 0)


def _transpose(model: QuantizedModel, node: QNode) -> bool:
    perm = node.attrs.get("perm")
    return perm is not None and int(perm[0]) == 0


def _listed_axes(position: int) -> Callable[[QuantizedModel, QNode], bool]:
    """Squeeze / Unsqueeze / reductions / Slice: the axes they name (an attribute, or a constant input) avoid
    the batch; no axes named (or an empty list) means every axis, the batch included."""

    def rule(model: QuantizedModel, node: QNode) -> bool:
        axes = _constant_axes(model, node, position)
        if axes is None and "axes" in node.attrs:
            axes = [int(a) for a in node.attrs["axes"]]
        rank = _rank(node)
        if node.op_type == "Unsqueeze" and rank is not None and axes is not None:
            rank += len(axes)
        return bool(axes) and _off_batch(axes, rank)  # type: ignore[arg-type]

    return rule


def _pad(model: QuantizedModel, node: QNode) -> bool:
    pads = _constant_axes(model, node, 1)
    axes = _constant_axes(model, node, 3)
    rank = _rank(node)
    if pads is None or (axes is not None and not _off_batch(axes, rank)):
        return False
    if axes is not None:
        return True
    half = len(pads) // 2
    return half > 0 and pads[0] == 0 and pads[half] == 0


def _resize(model: QuantizedModel, node: QNode) -> bool:
    """Scales that keep the batch (sizes name the batch as a number and are not rewritten)."""
    if len(node.inputs) > 3 and node.inputs[3]:
        sizes = model.constants.get(node.inputs[3])
        if sizes is not None and np.asarray(sizes).size:
            return False
    scales = model.constants.get(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
    return scales is not None and np.asarray(scales).size > 0 and float(np.asarray(scales).reshape(-1)[0]) == 1.0


_RULES: dict[str, Callable[[QuantizedModel, QNode], bool]] = {
    "Reshape": _reshape,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Concat": _concat,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Softmax": _axis(-1),
    "LogSoftmax": _axis(-1),
    "Split": _axis(0),
    "Gather": lambda model, node: _axis(0)(model, node) and _constant_weights(model, node),  # constant indices
    "Squeeze": _listed_axes(1),
    "Unsqueeze": _listed_axes(1),
    "Slice": _listed_axes(3),
    "Pad": _pad,
    "Resize": _resize,
    "LayerNormalization": _axis(-1),
    # A per-axis scale follows ``axis``, not broadcasting: any axis but the batch's.
    "QuantizeLinear": _axis(1),
    "DequantizeLinear": _axis(1),
}


def _samplewise(model: QuantizedModel, node: QNode) -> bool:
    """Whether ``node`` computes every sample from that sample alone, the batch staying on axis 0."""
    if node.op_type in _PER_SAMPLE:
        return _constant_weights(model, node)  # a convolution's weights and bias, no second activation
    if node.op_type in _ELEMENTWISE or node.table is not None:
        return _broadcast_keeps_batch(model, node)
    if node.op_type.startswith("Reduce"):
        return _listed_axes(1)(model, node)
    rule = _RULES.get(node.op_type)
    return rule is not None and rule(model, node)


def batch_free(model: QuantizedModel) -> QuantizedModel | None:
    """A copy of ``model`` (built from a float model that fixes its batch to 1) that runs any number of samples
    at once, each with its batch-1 integers; None when some node could mix samples (module docstring)."""
    if any(o in model.constants for o in model.outputs) or not all(_samplewise(model, n) for n in model.nodes):
        return None  # a constant output has no batch to join along
    constants = dict(model.constants)
    nodes = []
    for node in model.nodes:
        if node.op_type == "Reshape":
            target = np.asarray(model.constants[node.inputs[1]]).reshape(-1).copy()
            target[0] = 0  # "as the input": the batch, whatever its size
            node = copy.copy(node)
            node.inputs = [node.inputs[0], f"{node.inputs[1]}::batch_free", *node.inputs[2:]]
            constants[node.inputs[1]] = target
        nodes.append(node)
    # Its own compiled programs, guards and state: nothing run on the copy is mistaken for the original's.
    return dataclasses.replace(
        model,
        nodes=nodes,
        constants=constants,
        state={},
        _sessions={},
        _programs={},
        _guarded=set(),
        _float_facts=(),
        _batch_free=[],
    )


def samples_per_run(model: QuantizedModel) -> int:
    """How many samples one run of the batch-free copy takes: as many as keep its largest tensor within
    ``TENSOR_BUDGET`` values (the float model's shapes, per sample), at most ``MAX_SAMPLES_PER_RUN``; 1 when a
    shape is unknown."""
    largest = 1
    for node in model.nodes:
        for tensor, shape in zip(node.inputs, node.input_shapes or []):
            if not tensor or tensor in model.constants:
                continue
            if shape is None or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
                return 1
            largest = max(largest, int(np.prod(shape[1:], dtype=np.int64)))
    return int(min(MAX_SAMPLES_PER_RUN, max(1, TENSOR_BUDGET // largest)))


def batched_runs(model: QuantizedModel) -> tuple[QuantizedModel | None, int]:
    """The batch-free copy of a batch-1 model and its samples per run, decided once per model (kept on it); the
    copy is None when batching is not worth it (``samples_per_run`` 1) or could change a number."""
    if not model._batch_free:
        step = samples_per_run(model)
        model._batch_free.append((batch_free(model) if step > 1 else None, step))
    return model._batch_free[0]


def simulated_together(model: QuantizedModel) -> bool:
    """Whether ``simulate`` runs this batch-1 model many samples per call (what the auto search may afford)."""
    return batched_runs(model)[0] is not None
