"""MaxPool / AveragePool with ``ceil_mode=1`` -> ``ceil_mode=0`` with larger end pads, where that is exact.

PyTorch nets such as MTCNN pool with ``ceil_mode=True``; ESP-DL's pools have no ceil mode. In ceil mode the
output along an axis has ``ceil((L + pads - d*(k-1) - 1) / s) + 1`` cells, minus the last one when that window
would start in the right padding (ONNX's rule since onnx#5741, and what onnxruntime computes). Every window
starts where floor mode with ``e`` more end padding starts it, for the smallest ``e`` that gives the same
count, so the rewrite only has to make each window see the same cells:

- MaxPool ignores padding (pads act as -inf), so the extra pad changes nothing;
- AveragePool with ``count_include_pad=0`` divides by the input cells in the window, the same in both forms;
- AveragePool with ``count_include_pad=1`` divides the last ceil-mode window by its cells up to the declared end
  padding only (onnxruntime clips it there; the tests show it on every undilated case), while with ``e`` more
  padding it would divide by the full kernel: exact only when ``e == 0`` on every axis, otherwise the node is
  left as it is and the checker says why.

onnxruntime also refuses pads that are not smaller than the kernel, which dilated pools can reach. The
arithmetic (:func:`espquant.ops.pooling.ceil_mode_pads`) lives with the operator registry, whose checker tells
users whether this pass can rewrite a node.
"""

from __future__ import annotations

from typing import Any

import onnx
from onnx import helper

from espquant.graph import GraphView
from espquant.ops.pooling import ceil_mode_pads
from espquant.optimizer.pipeline import PassResult

__all__ = ["rewrite_ceil_mode_pools", "resolve_same_auto_pad"]

_POOLS = ("MaxPool", "AveragePool")


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _rewrite(node: onnx.NodeProto, pads: list[int]) -> None:
    """Set ``pads`` and ``ceil_mode=0`` on ``node``; a VALID node becomes NOTSET with those explicit pads."""
    kept = [a for a in node.attribute if a.name not in ("ceil_mode", "pads", "auto_pad")]
    del node.attribute[:]
    node.attribute.extend(kept)
    if any(pads):
        node.attribute.append(helper.make_attribute("pads", pads))


def rewrite_ceil_mode_pools(model: onnx.ModelProto) -> PassResult:
    """Turn every ``ceil_mode=1`` MaxPool / AveragePool into floor mode with explicit end pads, where exact.

    Needs the inputs' spatial sizes (shape inference runs at the start of every round). A node that cannot be
    rewritten exactly is left as it is, with a warning saying why.
    """
    view = GraphView(model.graph)
    rewritten: dict[str, int] = {}
    warnings = []
    for node in model.graph.node:
        if node.op_type not in _POOLS or node.domain not in ("", "ai.onnx"):
            continue
        attrs = _attributes(node)
        if not attrs.get("ceil_mode", 0):
            continue
        shape = view.shape(node.input[0])
        pads, reason = ceil_mode_pads(node.op_type, attrs, None if shape is None else shape[2:])
        if pads is None:
            warnings.append(f"{node.op_type} {node.name!r}: ceil_mode=1 kept, because {reason}")
            continue
        _rewrite(node, pads)
        rewritten[node.op_type] = rewritten.get(node.op_type, 0) + 1
    details = tuple(f"{n} {op} ceil_mode=1 -> explicit end pads" for op, n in sorted(rewritten.items()))
    return PassResult(sum(rewritten.values()), details, tuple(warnings))


# Ops whose ``auto_pad`` SAME_UPPER / SAME_LOWER means "pad so that the output is ceil(L / stride)" (ConvTranspose's
# SAME is about its output size and is left alone).
_SAME_PADDED = ("Conv", "MaxPool", "AveragePool")


def same_pads(mode: str, sizes: list[int], attrs: dict[str, Any]) -> list[int]:
    """The explicit ``pads`` (begins, then ends) that ``auto_pad=mode`` stands for on these spatial sizes.

    ONNX (and onnxruntime): the output has ``ceil(L / s)`` cells; the total padding is what that needs,
    ``max((out - 1) * s + d * (k - 1) + 1 - L, 0)``, split in two with the odd cell at the end (SAME_UPPER) or
    at the beginning (SAME_LOWER). With these pads floor mode gives exactly ``out`` cells, so ``ceil_mode``
    does not matter either."""
    rank = len(sizes)
    kernel = [int(k) for k in attrs["kernel_shape"]]
    strides = [int(v) for v in attrs.get("strides") or [1] * rank]
    dilations = [int(v) for v in attrs.get("dilations") or [1] * rank]
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + d * (k - 1) + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else large)
        ends.append(large if mode == "SAME_UPPER" else small)
    return begins + ends


def resolve_same_auto_pad(model: onnx.ModelProto) -> PassResult:
    """Write ``auto_pad=SAME_UPPER / SAME_LOWER`` Conv / MaxPool / AveragePool nodes with explicit pads.

    tflite2onnx (and TensorFlow's 'same' padding in general) leaves the padding to the runtime; ESP-DL only
    takes explicit pads. Needs static spatial sizes (shape inference runs at the start of every round) and,
    for Conv, a known kernel: the weight's spatial dims when ``kernel_shape`` is not written.
    """
    view = GraphView(model.graph)
    resolved: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in _SAME_PADDED or node.domain not in ("", "ai.onnx"):
            continue
        attrs = _attributes(node)
        mode = attrs.get("auto_pad", "NOTSET")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in ("SAME_UPPER", "SAME_LOWER"):
            continue
        shape = view.shape(node.input[0])
        if node.op_type == "Conv" and "kernel_shape" not in attrs:
            weight = view.shape(node.input[1]) if len(node.input) > 1 else None
            if weight is None or not all(isinstance(d, int) for d in weight[2:]):
                continue
            attrs["kernel_shape"] = weight[2:]
        sizes = None if shape is None else shape[2:]
        if not sizes or not all(isinstance(d, int) for d in sizes) or len(attrs.get("kernel_shape", [])) != len(sizes):
            continue  # the checker still names auto_pad as the problem, with its hint
        pads = same_pads(mode, sizes, attrs)  # type: ignore[arg-type]
        if node.op_type != "Conv" and any(p >= k for p, k in zip(pads, list(attrs["kernel_shape"]) * 2)):
            continue  # onnxruntime refuses explicit pool pads that reach the kernel (dilated pools)
        kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads", "ceil_mode")]
        del node.attribute[:]
        node.attribute.extend(kept)
        if any(pads):
            node.attribute.append(helper.make_attribute("pads", pads))
        resolved[node.op_type] = resolved.get(node.op_type, 0) + 1
    details = tuple(f"{n} {op} auto_pad=SAME -> explicit pads" for op, n in sorted(resolved.items()))
    return PassResult(sum(resolved.values()), details)
