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

__all__ = ["rewrite_ceil_mode_pools"]

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
