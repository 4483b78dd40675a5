"""The model checker: can ESP-DL run this model, and if not, every reason why.

It reads only the operator registry (``espquant.ops``) and the target profiles, and reports all problems
at once (every node, every attribute), each with the node, the op type, the field at fault, the reason
and what to do, so a user fixes a model in one round instead of one error at a time.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from espquant.errors import OptionError, UnsupportedModelError
from espquant.graph import GraphView, node_attributes, opset_version, tensor_shape
from espquant.ops import UNREGISTERED_HINTS, NodeContext, OpSpec, Role, get_op_spec
from espquant.optimizer.cleanup import MIN_OPSET
from espquant.optimizer.shapes import infer_shapes
from espquant.quant.profiles import TargetProfile, get_target
from espquant.runtime import runtime_limits

__all__ = ["Problem", "OpSummary", "CheckReport", "check_model", "parse_bits", "runs_at", "FALLBACK_BITS"]

logger = logging.getLogger(__name__)

MODEL = "<model>"
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})
_SUBGRAPH_ATTRS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
_RUN_OPTIMIZER = "run `espquant optimize` first"
_DYNAMIC_HINT = "pin dynamic input dimensions (`espquant optimize --input-shape NAME:1,3,H,W`) and optimize again"
_CONSTANT_HINTS = {
    Role.PARAM: "a shape parameter computed at run time: run `espquant optimize` to fold the shape chain "
    "(with --input-shape for dynamic inputs)",
    Role.QPARAM: "make it a constant (an initializer); `espquant optimize` folds constant subgraphs",
    Role.WEIGHT: "weights must be initializers; `espquant optimize` folds constant subgraphs into them",
    Role.BIAS: "biases must be initializers; `espquant optimize` folds constant subgraphs into them",
    Role.FLOAT_PARAM: "make it a constant (an initializer); `espquant optimize` folds constant subgraphs",
}


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}


def _cycle_node(graph: onnx.GraphProto) -> str | None:
    """A node on a cycle of the graph, or None (Kahn's algorithm over tensor producers)."""
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    pending = [sum(1 for t in node.input if t in producers) for node in graph.node]
    readers: dict[int, list[int]] = {}
    for i, node in enumerate(graph.node):
        for tensor in node.input:
            if tensor in producers:
                readers.setdefault(producers[tensor], []).append(i)
    ready = [i for i, count in enumerate(pending) if count == 0]
    while ready:
        for reader in readers.get(ready.pop(), []):
            pending[reader] -= 1
            if pending[reader] == 0:
                ready.append(reader)
    stuck = [i for i, count in enumerate(pending) if count > 0]
    if not stuck:
        return None
    node = graph.node[stuck[0]]
    return node.name or (node.output[0] if node.output else "?")


FALLBACK_BITS = 8  # the width an op without an int16 kernel runs at in an int16 model


def runs_at(spec: OpSpec, bits: int, fallback: bool = True) -> int | None:
    """The width a node of this op computes at in a model quantized at ``bits``, or None when it cannot run.

    ``bits`` when the runtime implements the op at that width. Otherwise, in an int16 model, int8 when the op
    has an int8 kernel (ESP-DL's int16 Resize is an empty function): ESP-DL v3 runs each node at its own
    width, so the node computes at int8 between RequantizeLinear conversions, as a mixed-precision layer
    would, instead of the whole model being refused. ``fallback`` False (``--strict``) refuses instead.
    """
    if bits in spec.bits:
        return bits
    if fallback and bits > FALLBACK_BITS and FALLBACK_BITS in spec.bits:
        return FALLBACK_BITS
    return None


@dataclass(frozen=True)
class Problem:
    """One reason the model cannot run as it is: where, what, why, and what to do."""

    node: str
    op_type: str
    field: str
    reason: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"node {self.node!r} ({self.op_type})" if self.op_type else self.node
        text = f"{where}: {self.field}: {self.reason}"
        return f"{text}; hint: {self.hint}" if self.hint else text


@dataclass
class OpSummary:
    """One row of the checker's table: an op type, how often it occurs, and whether it can run."""

    op_type: str
    count: int
    supported: bool
    reasons: list[str] = field(default_factory=list)


@dataclass
class CheckReport:
    """Everything the checker found."""

    target: str | None
    bits: int
    problems: list[Problem]
    ops: list[OpSummary]
    fallbacks: list[Problem] = field(default_factory=list)  # nodes of an int16 model that run at int8 (warnings)

    @property
    def ok(self) -> bool:
        return not self.problems

    def message(self, subject: str = "the model") -> str:
        """All problems as one multi-line message (the text of :class:`UnsupportedModelError`)."""
        where = f"{self.target} " if self.target else ""
        lines = [f"{subject} cannot run on {where}ESP-DL at int{self.bits}: {len(self.problems)} problem(s)"]
        lines += [f"  - {problem}" for problem in self.problems]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "bits": self.bits,
            "compatible": self.ok,
            "ops": [vars(summary) for summary in self.ops],
            "problems": [vars(problem) for problem in self.problems],
            "int8_fallback": [vars(fallback) for fallback in self.fallbacks],
        }


def parse_bits(bits: str | int) -> int:
    """``"int8"``/``8`` -> 8, ``"int16"``/``16`` -> 16; anything else is an :class:`OptionError`."""
    text = str(bits).strip().lower()
    if text in ("8", "int8", "s8"):
        return 8
    if text in ("16", "int16", "s16"):
        return 16
    raise OptionError(f"quantization bits {bits!r}: use 'int8' or 'int16'.")


def _is_dynamic(shape: list[int | str | None] | None) -> bool:
    """True when a shape is unknown or has an unknown dimension beyond the batch axis."""
    return shape is None or any(not isinstance(d, int) for d in shape[1:])


class _Checker:
    def __init__(self, model: onnx.ModelProto, target: TargetProfile | None, bits: int, fallback: bool) -> None:
        self.model = model
        self.target = target
        self.bits = bits
        self.fallback = fallback
        self.view = GraphView(model.graph)
        self.opset = opset_version(model)
        self.problems: list[Problem] = []
        self.fallbacks: list[Problem] = []
        self.node_problems: dict[str, list[Problem]] = {}
        self.node_fallbacks: dict[str, list[Problem]] = {}

    def add(self, problem: Problem) -> None:
        self.problems.append(problem)
        if problem.op_type:
            self.node_problems.setdefault(problem.op_type, []).append(problem)

    def check_model_level(self) -> None:
        graph = self.model.graph
        if self.opset < MIN_OPSET:
            self.add(
                Problem(
                    MODEL,
                    "",
                    "opset",
                    f"default-domain opset {self.opset} is older than {MIN_OPSET}",
                    f"{_RUN_OPTIMIZER}: it converts the model to opset {MIN_OPSET}",
                )
            )
        initializers = set(self.view.initializers)
        for info in graph.input:
            if info.name in initializers:
                self.add(
                    Problem(
                        f"graph input {info.name!r}",
                        "",
                        "graph inputs",
                        "an initializer is also declared as a graph input, so it could be overridden",
                        f"{_RUN_OPTIMIZER}: it removes initializers from the graph inputs",
                    )
                )
                continue
            elem = info.type.tensor_type.elem_type
            if elem != onnx.TensorProto.FLOAT:
                name = onnx.TensorProto.DataType.Name(elem) if elem else "not a tensor"
                self.add(
                    Problem(
                        f"graph input {info.name!r}",
                        "",
                        "dtype",
                        f"input type is {name}; ESP-DL quantizes float32 inputs",
                        "export the model with float32 inputs and convert the data outside the model",
                    )
                )
            shape = tensor_shape(info)
            if shape and any(d == 0 for d in shape):
                self.add(
                    Problem(
                        f"graph input {info.name!r}",
                        "",
                        "shape",
                        f"shape {shape} has a dimension of 0: the input holds no values",
                        "export the model with the input's real size",
                    )
                )
            if _is_dynamic(shape):
                shown = "unknown" if shape is None else str(["?" if not isinstance(d, int) else d for d in shape])
                self.add(
                    Problem(
                        f"graph input {info.name!r}",
                        "",
                        "shape",
                        f"shape {shown} is not static beyond the batch dimension",
                        _DYNAMIC_HINT,
                    )
                )

        self.check_graph_integrity()

    def check_graph_integrity(self) -> None:
        """What makes a model unrunnable whatever its ops: a newer opset than onnxruntime knows, weights that
        are not finite numbers, repeated node names, a cycle."""
        limit = runtime_limits().opset
        if self.opset > limit:
            self.add(
                Problem(
                    MODEL,
                    "",
                    "opset",
                    f"default-domain opset {self.opset} is newer than this onnxruntime knows ({limit})",
                    "export the model with an older opset, or upgrade onnxruntime",
                )
            )
        for name, tensor in self.view.initializers.items():
            if tensor.data_type in _FLOAT_TYPES:
                values = onnx.numpy_helper.to_array(tensor)
                if not np.all(np.isfinite(values)):
                    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
                    self.add(
                        Problem(
                            f"initializer {name!r}",
                            "",
                            "values",
                            f"{bad} of its {values.size} values are NaN or infinite",
                            "fix the training or the export; a quantized weight must be a finite number",
                        )
                    )
        names = [n.name for n in self.model.graph.node if n.name]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            self.add(
                Problem(
                    MODEL,
                    "",
                    "node names",
                    f"node names {repeated[:5]} are used more than once; ESP-DL addresses nodes by name",
                    f"{_RUN_OPTIMIZER}: it makes node names unique",
                )
            )
        cycle = _cycle_node(self.model.graph)
        if cycle is not None:
            self.add(
                Problem(cycle, "", "graph", "the graph has a cycle through this node", "export an acyclic graph")
            )

    def check_node(self, node: onnx.NodeProto) -> None:
        name = node.name or (node.output[0] if node.output else "?")
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            self.add(
                Problem(
                    name,
                    op,
                    "domain",
                    f"custom domain {node.domain!r}; ESP-DL runs standard ONNX ops",
                    "replace the custom op with standard ONNX ops when exporting",
                )
            )
            return
        if op in _CONTROL_FLOW or any(a.type in _SUBGRAPH_ATTRS for a in node.attribute):
            self.add(
                Problem(
                    name,
                    op,
                    "op type",
                    "control flow (a subgraph) cannot run on ESP-DL",
                    UNREGISTERED_HINTS.get(op, "export a graph without control flow"),
                )
            )
            return
        spec = get_op_spec(op)
        if spec is None:
            self.add(Problem(name, op, "op type", f"ESP-DL has no {op} operator", UNREGISTERED_HINTS.get(op, "")))
            return
        if spec.status != "supported":
            self.add(Problem(name, op, "op type", spec.status_reason))
            return
        if spec.espdl_refusal:
            self.add(Problem(name, op, "op type", spec.espdl_refusal))
            return
        if self.opset < spec.min_opset:
            self.add(Problem(name, op, "opset", f"{op} needs opset {spec.min_opset}, the model has {self.opset}"))
        node_bits = self.check_bits(name, op, spec)
        constants = self.check_inputs(name, node, spec)
        context = NodeContext(
            node=node,
            attrs=node_attributes(node, self.opset),
            input_shapes=[self.view.shape(i) if i else None for i in node.input],
            output_shapes=[self.view.shape(o) if o else None for o in node.output],
            constants=constants,
            bits=node_bits,
            target=self.target,
        )
        for constraint in spec.constraints:
            if constraint.families is not None and (
                self.target is None or self.target.family not in constraint.families
            ):
                continue
            if constraint.bits is not None and node_bits not in constraint.bits:
                continue
            reason = constraint.test(context)
            if reason:
                self.add(Problem(name, op, constraint.field, reason, constraint.hint))
        self.check_output_shapes(name, node)

    def check_bits(self, name: str, op: str, spec: OpSpec) -> int:
        """The width the node runs at (``runs_at``): a fallback to int8 is recorded as a warning, an op with
        no kernel at any usable width as a problem (then the node's rules are checked at the model's width)."""
        width = runs_at(spec, self.bits, self.fallback)
        if width == self.bits:
            return width
        if width is not None:
            fallback = Problem(
                name,
                op,
                "bits",
                f"ESP-DL has no int{self.bits} {op} kernel: this node runs at int{width}, with a RequantizeLinear "
                f"where its neighbours are int{self.bits}",
                "check the accuracy with `espquant evaluate`, or replace the op to stay "
                f"int{self.bits} throughout (`--strict` refuses the model instead)",
            )
            self.fallbacks.append(fallback)
            self.node_fallbacks.setdefault(op, []).append(fallback)
            return width
        widths = " and ".join(f"int{b}" for b in sorted(spec.bits))
        hint = "quantize this layer with another width (mixed precision) or replace the op"
        if runs_at(spec, self.bits) is not None:  # refused only because fallback is off
            hint = f"without --strict (strict=False) espquant runs it at int{FALLBACK_BITS}, or replace the op"
        self.add(Problem(name, op, "bits", f"ESP-DL implements {op} for {widths} only, not int{self.bits}", hint))
        return self.bits

    def check_inputs(self, name: str, node: onnx.NodeProto, spec: OpSpec) -> dict[int, np.ndarray]:
        constants: dict[int, np.ndarray] = {}
        for position, tensor in enumerate(node.input):
            if not tensor:
                continue
            if self.view.is_constant(tensor):
                constants[position] = self.view.array(tensor)
                continue
            role = spec.input_spec(position)
            if role is not None and role.must_be_constant:
                self.add(
                    Problem(
                        name,
                        node.op_type,
                        f"input {role.name}",
                        f"{tensor!r} is computed at run time; ESP-DL needs a constant {role.role.value} here",
                        _CONSTANT_HINTS.get(role.role, ""),
                    )
                )
        return constants

    def check_output_shapes(self, name: str, node: onnx.NodeProto) -> None:
        """Report a dynamic output shape only where it starts (the node's activation inputs are static)."""
        inputs = [i for i in node.input if i and not self.view.is_constant(i)]
        if any(_is_dynamic(self.view.shape(i)) for i in inputs):
            return
        for output in node.output:
            if output and _is_dynamic(self.view.shape(output)):
                shape = self.view.shape(output)
                shown = "unknown" if shape is None else str(["?" if not isinstance(d, int) else d for d in shape])
                self.add(
                    Problem(
                        name,
                        node.op_type,
                        f"output {output}",
                        f"shape {shown} is not static beyond the batch dimension",
                        _DYNAMIC_HINT,
                    )
                )

    def summaries(self) -> list[OpSummary]:
        counts = Counter(node.op_type for node in self.model.graph.node)
        rows = []
        for op, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
            problems = self.node_problems.get(op, [])
            notes = problems + self.node_fallbacks.get(op, [])
            reasons = list(dict.fromkeys(f"{p.field}: {p.reason}" for p in notes))
            rows.append(OpSummary(op, count, not problems, reasons))
        return rows


def check_model(
    model_proto: onnx.ModelProto,
    target: str | TargetProfile | None = "esp32s3",
    bits: str | int = "int8",
    strict: bool = True,
    fallback: bool = True,
) -> CheckReport:
    """Check that ESP-DL can run ``model_proto`` on ``target`` at ``bits``.

    Args:
        model_proto: the float model (ideally optimized first); it is not modified.
        target: a target chip name (see ``espquant.quant.target_names()``), or None to check only what
            holds on every target.
        bits: ``"int8"`` or ``"int16"``.
        strict: raise :class:`UnsupportedModelError` listing every problem when the model is incompatible;
            with False the report is returned either way.
        fallback: in an int16 model, ops with an int8 kernel only run at int8 (``report.fallbacks``, not
            problems; see :func:`runs_at`); False refuses them (the CLI's ``--strict``).

    Returns:
        The report: every problem, the int8 fallbacks, and a per-op-type summary.
    """
    profile = get_target(target) if target is not None else None
    width = parse_bits(bits)
    model = onnx.ModelProto()
    model.CopyFrom(model_proto)
    infer_shapes(model)
    checker = _Checker(model, profile, width, fallback)
    checker.check_model_level()
    for node in model.graph.node:
        checker.check_node(node)
    summaries = checker.summaries()
    report = CheckReport(profile.name if profile else None, width, checker.problems, summaries, checker.fallbacks)
    if strict and not report.ok:
        raise UnsupportedModelError(report.message())
    return report


def legacy_check(
    model_proto: onnx.ModelProto, target: str | TargetProfile | None, bits: str | int, fallback: bool = True
) -> int:
    """The legacy toolkit's contract: log every problem and return -1 when incompatible, else 0 (int8 fallbacks
    of an int16 model are logged as warnings: the model runs)."""
    report = check_model(model_proto, target=target, bits=bits, strict=False, fallback=fallback)
    for problem in report.problems:
        logger.error("%s", problem)
    for note in report.fallbacks:
        logger.warning("%s", note)
    return 0 if report.ok else -1
