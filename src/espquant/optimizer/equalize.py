"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization").

With per-tensor weights (ESP32-S3, the plain-C chips) one exponent covers every output channel of a Conv,
so a channel whose weights are 100x smaller than the largest keeps only a few integer levels. For two Convs
``Conv1 -> [Relu] -> Conv2`` the float model is unchanged when output channel ``c`` of Conv1 (weights and
bias) is divided by ``s_c > 0`` and input channel ``c`` of Conv2 is multiplied by ``s_c``, because Relu is
positive-homogeneous (``relu(x / s) = relu(x) / s``). Choosing ``s_c = sqrt(r1_c / r2_c)`` (``r1_c`` the
range of Conv1's output channel ``c``, ``r2_c`` that of Conv2's input channel ``c``) gives both the same
range ``sqrt(r1_c r2_c)``, so every channel uses more of the per-tensor grid.

Only what is exact is equalized: the intermediate tensor has exactly one reader (Conv2's data input) and is
no graph output; the activation between is Relu or nothing (ReLU6 / Clip, PRelu, LeakyRelu, sigmoid-like
ops are not positive-homogeneous and stop the pair); the weights and biases are initializers read by that
node only. Depthwise and grouped convolutions are handled on either side. The pass is deterministic, so the
same float model always gives the same equalized model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from espquant.graph import GraphView
from espquant.optimizer.pipeline import PassResult

__all__ = ["EqualizationPair", "equalization_pairs", "equalize_cross_layer", "equalized_copy"]

ROUNDS = 4  # sweeps over all pairs: a chain Conv-Conv-Conv converges in a few
SCALE_LIMIT = 1e4  # no channel is rescaled by more than this (a near-dead channel would otherwise explode)


@dataclass(frozen=True)
class EqualizationPair:
    """``first`` writes the channels ``second`` reads (through ``relu`` when not None)."""

    first: onnx.NodeProto
    second: onnx.NodeProto
    relu: onnx.NodeProto | None


def _private_initializer(view: GraphView, model: onnx.ModelProto, name: str, reader: onnx.NodeProto) -> bool:
    """``name`` is an initializer read by ``reader`` only: rescaling it changes nothing else."""
    inits = {t.name for t in model.graph.initializer}
    return name in inits and all(r is reader for r in view.consumers.get(name, []))


def _is_plain_conv(view: GraphView, model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    """A Conv with initializer weights (and bias, if any) private to it."""
    if node.op_type != "Conv" or len(node.input) < 2:
        return False
    params = [t for t in node.input[1:3] if t]
    return all(_private_initializer(view, model, t, node) for t in params)


def equalization_pairs(model: onnx.ModelProto) -> list[EqualizationPair]:
    """Every Conv -> [Relu] -> Conv pair that can be equalized exactly (module docstring), in graph order."""
    view = GraphView(model.graph)
    outputs = {o.name for o in model.graph.output}
    pairs = []
    for node in model.graph.node:
        if not _is_plain_conv(view, model, node):
            continue
        tensor, relu = node.output[0], None
        reader = view.single_consumer(tensor)
        if tensor in outputs or reader is None:
            continue
        if reader.op_type == "Relu":
            relu, tensor = reader, reader.output[0]
            reader = view.single_consumer(tensor)
            if tensor in outputs or reader is None:
                continue
        if _is_plain_conv(view, model, reader) and reader.input[0] == tensor:
            pairs.append(EqualizationPair(node, reader, relu))
    return pairs


def _group(node: onnx.NodeProto) -> int:
    return next((int(a.i) for a in node.attribute if a.name == "group"), 1)


def _input_channel_ranges(weight: np.ndarray, group: int) -> np.ndarray:
    """max |w| over everything that reads each input channel of a (grouped) Conv weight ``[O, C/g, ...]``."""
    out_channels, per_group = weight.shape[0], weight.shape[1]
    blocks = np.abs(weight).reshape(group, out_channels // group, per_group, -1)
    return blocks.max(axis=(1, 3)).reshape(-1)  # channel c = group * per_group + index


def _scale_input_channels(weight: np.ndarray, scale: np.ndarray, group: int) -> np.ndarray:
    out_channels, per_group = weight.shape[0], weight.shape[1]
    factors = scale.reshape(group, 1, per_group)  # [g, 1, C/g]
    blocks = weight.reshape(group, out_channels // group, per_group, -1) * factors[..., None]
    return blocks.reshape(weight.shape)


def _equalize_pair(arrays: dict[str, np.ndarray], pair: EqualizationPair) -> bool:
    """Rescale one pair in ``arrays`` (name -> float64 values); False when nothing changed."""
    w1 = arrays[pair.first.input[1]]
    w2 = arrays[pair.second.input[1]]
    group2 = _group(pair.second)
    channels = w1.shape[0]
    if w2.shape[1] * group2 != channels:
        return False
    r1 = np.abs(w1.reshape(channels, -1)).max(axis=1)
    r2 = _input_channel_ranges(w2, group2)
    scale = np.ones(channels)
    alive = (r1 > 0) & (r2 > 0)
    scale[alive] = np.sqrt(r1[alive] / r2[alive])
    scale = np.clip(scale, 1.0 / SCALE_LIMIT, SCALE_LIMIT)
    if np.allclose(scale, 1.0, rtol=1e-6, atol=0.0):
        return False
    arrays[pair.first.input[1]] = w1 / scale.reshape((-1,) + (1,) * (w1.ndim - 1))
    if len(pair.first.input) > 2 and pair.first.input[2]:
        arrays[pair.first.input[2]] = arrays[pair.first.input[2]] / scale
    arrays[pair.second.input[1]] = _scale_input_channels(w2, scale, group2)
    return True


def equalize_cross_layer(model: onnx.ModelProto, rounds: int = ROUNDS) -> PassResult:
    """Equalize every eligible pair of ``model`` in place (optimizer-pass signature).

    The weights are rescaled in float64 and stored back as float32 once, so the float model differs from
    the original only by float32 rounding of the new weights (checked against onnxruntime in the tests)."""
    pairs = equalization_pairs(model)
    if not pairs:
        return PassResult()
    names = {t for p in pairs for node in (p.first, p.second) for t in node.input[1:3] if t}
    inits = {t.name: t for t in model.graph.initializer if t.name in names}
    arrays = {name: numpy_helper.to_array(t).astype(np.float64) for name, t in inits.items()}
    changed: set[int] = set()
    for _ in range(rounds):
        moved = [index for index, pair in enumerate(pairs) if _equalize_pair(arrays, pair)]
        changed.update(moved)
        if not moved:
            break
    for name, tensor in inits.items():
        dtype = numpy_helper.to_array(tensor).dtype
        tensor.CopyFrom(numpy_helper.from_array(arrays[name].astype(dtype), name))
    return PassResult(len(changed), tuple(f"equalized {len(changed)} Conv pair(s)" for _ in [0] if changed))


def equalized_copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with cross-layer equalization applied, and the number of pairs it changed."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy, equalize_cross_layer(copy).changes
