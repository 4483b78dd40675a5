"""Bounds on what an ``.espdl`` file asks the simulator to allocate, checked before anything runs.

A damaged or hostile file can name a MaxPool window of 7e10 or a pad of 9e6 in a few bytes. The reader bounds
every tensor it stores (``MAX_TENSOR_ELEMENTS``); this module bounds the sizes nodes derive from attributes
and parameters: window, pad, stride, dilation, block and cache sizes may not exceed the largest dimension the
node itself declares, and the tensors a Pad, Resize or InsertZeros makes stay within what any ESP32 can hold.
A file that breaks a bound is refused naming the node; real files are far inside them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from espquant.errors import ModelError
from espquant.espdl.reader import MAX_TENSOR_ELEMENTS, EspdlNode, EspdlTensor, EspdlValue

__all__ = ["check_node_bounds"]

# Attributes whose values size a window, a pad or a step over the node's own tensors.
_SIZE_ATTRIBUTES = ("kernel_shape", "pads", "strides", "dilations", "output_padding", "blocksize", "window_size")
_AT_LEAST_ONE = ("strides", "dilations", "blocksize", "window_size")


def _ints(value: object) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)] if isinstance(value, (int, np.integer)) else []


def check_node_bounds(
    node: EspdlNode, declared: Mapping[str, EspdlValue], constants: Mapping[str, EspdlTensor]
) -> None:
    """Refuse ``node`` when an attribute or parameter sizes more than its own tensors allow."""
    shapes = [declared[t].shape for t in (*node.inputs, *node.outputs) if t in declared and declared[t].shape]
    limit = max([1, *(d for shape in shapes for d in shape if d > 0)])  # type: ignore[union-attr]
    for name in _SIZE_ATTRIBUTES:
        for value in _ints(node.attributes.get(name)):
            low = 1 if name in _AT_LEAST_ONE else 0
            if not low <= value <= limit:
                _refuse(node, f"attribute {name}={value} is outside {low}..{limit}, the node's own tensor sizes")
    source = declared.get(node.inputs[0]) if node.inputs else None
    shape = list(source.shape) if source is not None and source.shape else None
    if node.op_type == "Pad" and len(node.inputs) > 1 and node.inputs[1] in constants:
        pads = _ints(constants[node.inputs[1]].data.reshape(-1).tolist())
        if any(not 0 <= p <= limit for p in pads):
            _refuse(node, f"pads {pads[:8]} are outside 0..{limit}, the node's own tensor sizes")
    if node.op_type == "Resize" and shape is not None:
        _check_resize(node, shape, constants)
    if node.op_type == "InsertZeros" and shape is not None:
        strides = _ints(node.attributes.get("strides", []))
        grown = [d * s for d, s in zip(shape[1:], strides)] + shape[1 + len(strides) :]
        _check_elements(node, [shape[0], *grown])


def _check_resize(node: EspdlNode, shape: Sequence[int], constants: Mapping[str, EspdlTensor]) -> None:
    """The output a Resize's scales or sizes ask for must fit in an ESP32."""
    if len(node.inputs) > 3 and node.inputs[3] in constants:
        sizes = [int(v) for v in constants[node.inputs[3]].data.reshape(-1)]
        _check_elements(node, sizes)
    elif len(node.inputs) > 2 and node.inputs[2] in constants:
        scales = np.asarray(constants[node.inputs[2]].data, dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(scales)) or np.any(scales <= 0):
            _refuse(node, f"scales {scales[:8].tolist()} are not positive numbers")
        if scales.size == len(shape):
            _check_elements(node, [int(d * s) for d, s in zip(shape, scales)])


def _check_elements(node: EspdlNode, shape: Sequence[int]) -> None:
    count = 1
    for dim in shape:
        if dim < 0:
            _refuse(node, f"it makes a tensor of shape {list(shape)[:8]}")
        count *= dim
    if count > MAX_TENSOR_ELEMENTS:
        _refuse(node, f"it makes a tensor of {count} elements; no ESP32 holds more than {MAX_TENSOR_ELEMENTS}")


def _refuse(node: EspdlNode, why: str) -> None:
    raise ModelError(f"node {node.name!r} ({node.op_type}): {why}; the file is damaged")
