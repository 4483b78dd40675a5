"""onnxoptimizer's passes, wrapped so each reports what it changed and stays cheap on large models.

onnxoptimizer rewrites a serialised copy of the model and gives no account of its edits, so the wrapper
compares op-type and initializer counts before and after; every wrapped pass removes nodes or
initializers, so that comparison sees every edit.

Serialising a model with hundreds of megabytes of weights costs seconds, so two things keep the passes
cheap: a pass runs only when a precise test says it could change something, and passes whose decisions
never read weight values run on a *skeleton*, a copy in which every large initializer is replaced by a
tiny stand-in carrying a digest of its dtype, shape and bytes (so duplicate detection stays exact). The
skeleton's resulting nodes are kept and its stand-ins swapped back for the real tensors by name.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Callable

import numpy as np
import onnx
import onnxoptimizer
from onnx import helper, numpy_helper

from espquant.graph import GraphView
from espquant.optimizer.constants import fold_constants
from espquant.optimizer.pipeline import OptimizerPass, PassResult

__all__ = ["ONNXOPTIMIZER_PASSES"]

logger = logging.getLogger(__name__)

# Initializers with more elements than this are replaced by stand-ins in skeleton runs.
_LARGE = 1024
Applicable = Callable[[onnx.ModelProto], bool]


def _digest(tensor: onnx.TensorProto) -> bytes:
    """A digest of dtype, shape and value (raw bytes hashed directly when the tensor stores them)."""
    hasher = hashlib.sha256(f"{tensor.data_type}:{list(tensor.dims)}:".encode())
    hasher.update(tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes())
    return hasher.digest()


def _skeleton(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """A copy of ``model`` whose large initializers are replaced by digest stand-ins; returns the originals."""
    graph = model.graph
    small, stubbed = [], {}
    for tensor in graph.initializer:
        if np.prod(tensor.dims, dtype=np.int64) > _LARGE:
            stubbed[tensor.name] = tensor
            small.append(numpy_helper.from_array(np.frombuffer(_digest(tensor), dtype=np.uint8), tensor.name))
        else:
            small.append(tensor)
    light = helper.make_graph(
        list(graph.node),
        graph.name,
        list(graph.input),
        list(graph.output),
        small,
        value_info=list(graph.value_info),
    )
    skeleton = helper.make_model(light, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    skeleton.functions.extend(model.functions)
    return skeleton, stubbed


def _restore(model: onnx.ModelProto, result: onnx.ModelProto, stubbed: dict[str, onnx.TensorProto]) -> None:
    """Write the skeleton run's graph into ``model``, swapping the real tensors back in for the stand-ins."""
    tensors = [stubbed.get(t.name, t) for t in result.graph.initializer]
    graph = helper.make_graph(
        list(result.graph.node),
        result.graph.name,
        list(result.graph.input),
        list(result.graph.output),
        tensors,
        value_info=list(result.graph.value_info),
    )
    model.graph.CopyFrom(graph)


def _describe(before: Counter[str], after: Counter[str], inits_before: int, inits_after: int) -> list[str]:
    details = []
    for op in sorted(set(before) | set(after)):
        delta = after[op] - before[op]
        if delta:
            details.append(f"{'removed' if delta < 0 else 'added'} {abs(delta)} {op}")
    if inits_after != inits_before:
        delta = inits_after - inits_before
        details.append(f"{'removed' if delta < 0 else 'added'} {abs(delta)} initializer(s)")
    return details


def _wrap(
    name: str,
    applicable: Applicable,
    summary: str,
    skeleton: bool = False,
    then: Callable[[onnx.ModelProto], PassResult] | None = None,
) -> OptimizerPass:
    """Wrap onnxoptimizer's pass ``name``.

    Args:
        applicable: a cheap, exact-or-conservative test; the pass is skipped when it says False.
        skeleton: run on a skeleton (only for passes whose decisions never read large weight values).
        then: a pass run right after, counted as part of this one (constant folding of the weight
            arithmetic that onnxoptimizer's batch-norm fusion writes as nodes).
    """

    def run(model: onnx.ModelProto) -> PassResult:
        if not applicable(model):
            return PassResult()
        before = Counter(node.op_type for node in model.graph.node)
        inits_before = len(model.graph.initializer)
        try:
            light, stubbed = _skeleton(model) if skeleton else (model, {})
            result = onnxoptimizer.optimize(light, [name])
        except Exception as exc:  # onnxoptimizer raises bare RuntimeErrors from C++
            message = f"onnxoptimizer pass {name} failed and was skipped: {exc}"
            logger.warning(message)
            return PassResult(warnings=(message,))
        if then is not None:
            then(result)
        twice = sorted(set(_defined_twice(result)) - set(_defined_twice(model)))
        if twice:  # its new tensors took names the graph already uses (torch's numbered outputs: "82")
            message = f"onnxoptimizer pass {name} named new tensors like existing ones ({twice[0]!r}) and was skipped"
            logger.warning(message)
            return PassResult(warnings=(message,))
        if skeleton:
            _restore(model, result, stubbed)
        else:
            model.CopyFrom(result)
        after = Counter(node.op_type for node in model.graph.node)
        inits_after = len(model.graph.initializer)
        details = _describe(before, after, inits_before, inits_after)
        edits = sum(abs(after[op] - before[op]) for op in set(before) | set(after))
        return PassResult(changes=edits + abs(inits_after - inits_before), details=tuple(details))

    return OptimizerPass(name=name, run=run, summary=summary, source="onnxoptimizer")


def _defined_twice(model: onnx.ModelProto) -> list[str]:
    """Tensor names that two definitions share (node outputs, initializers, graph inputs): an invalid graph."""
    initializers = [t.name for t in model.graph.initializer]
    names = [o for node in model.graph.node for o in node.output if o] + initializers
    names += [i.name for i in model.graph.input if i.name not in set(initializers)]
    return [name for name, count in Counter(names).items() if count > 1]


def _has_op(*op_types: str) -> Applicable:
    wanted = set(op_types)
    return lambda model: any(node.op_type in wanted for node in model.graph.node)


def _feeds(producer_types: set[str], consumer_type: str, constant_operand: bool = False) -> Applicable:
    """True when a node of ``consumer_type`` reads the output of one of ``producer_types``
    (and, with ``constant_operand``, its other input is a constant)."""

    def test(model: onnx.ModelProto) -> bool:
        view = GraphView(model.graph)
        for node in model.graph.node:
            if node.op_type != consumer_type:
                continue
            for name in node.input:
                producer = view.producer.get(name)
                if producer is None or producer.op_type not in producer_types:
                    continue
                if not constant_operand or any(view.is_constant(o) for o in node.input if o != name):
                    return True
        return False

    return test


def _has_dead_node(model: onnx.ModelProto) -> bool:
    """True when some node's outputs are all unread (fusions such as MatMul+Add leave the MatMul behind)."""
    view = GraphView(model.graph)
    return any(
        not any(name and (view.consumers.get(name) or name in view.graph_outputs) for name in node.output)
        for node in model.graph.node
    )


def _has_unused_initializer(model: onnx.ModelProto) -> bool:
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for node in model.graph.node
        for a in node.attribute
    ):
        return True  # subgraphs may read outer initializers: let onnxoptimizer decide
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    return any(t.name not in used for t in model.graph.initializer)


def _has_duplicate_initializer(model: onnx.ModelProto) -> bool:
    groups: dict[tuple[int, tuple[int, ...]], list[onnx.TensorProto]] = defaultdict(list)
    for tensor in model.graph.initializer:
        groups[(tensor.data_type, tuple(tensor.dims))].append(tensor)
    for group in groups.values():
        if len(group) > 1:
            digests = [_digest(t) for t in group]
            if len(set(digests)) < len(digests):
                return True
    return False


ONNXOPTIMIZER_PASSES: dict[str, OptimizerPass] = {
    p.name: p
    for p in [
        _wrap("eliminate_identity", _has_op("Identity"), "remove Identity nodes", skeleton=True),
        _wrap("eliminate_nop_dropout", _has_op("Dropout"), "remove Dropout with ratio 0", skeleton=True),
        _wrap("eliminate_nop_flatten", _has_op("Flatten"), "remove Flatten that keeps the shape", skeleton=True),
        _wrap("eliminate_nop_pad", _has_op("Pad"), "remove Pad with all-zero pads", skeleton=True),
        _wrap("eliminate_nop_transpose", _has_op("Transpose"), "remove identity Transpose", skeleton=True),
        _wrap(
            "fuse_pad_into_conv",
            _feeds({"Pad"}, "Conv"),
            "fold a constant Pad into the next Conv's pads",
            skeleton=True,
        ),
        _wrap(
            "fuse_bn_into_conv",
            _feeds({"Conv"}, "BatchNormalization"),
            "fold BatchNormalization into Conv",
            then=fold_constants,
        ),
        _wrap(
            "fuse_add_bias_into_conv",
            _feeds({"Conv"}, "Add", constant_operand=True),
            "turn Conv + Add(constant) into Conv's bias",
        ),
        _wrap(
            "fuse_transpose_into_gemm",
            _feeds({"Transpose"}, "Gemm"),
            "fold Transpose into Gemm's transA/transB",
            skeleton=True,
        ),
        _wrap("eliminate_deadend", _has_dead_node, "remove nodes whose outputs nothing reads", skeleton=True),
        _wrap(
            "eliminate_unused_initializer",
            _has_unused_initializer,
            "drop initializers no node reads",
            skeleton=True,
        ),
        _wrap(
            "eliminate_duplicate_initializer",
            _has_duplicate_initializer,
            "merge initializers with identical values",
            skeleton=True,
        ),
    ]
}
