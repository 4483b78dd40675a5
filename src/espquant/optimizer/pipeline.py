"""The pass machinery: a pass edits a model in place and says how much it changed; the pipeline repeats the
fusion passes until a whole round changes nothing, and keeps a record of what every pass did.

The shape follows onnx-ir's pass manager (a ``modified`` flag and a repeat-until-stable loop), kept tiny:
a pass is a plain function ``(model) -> PassResult``, registered with a name and a one-line summary.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import onnx

from espquant.errors import OptionError

__all__ = ["PassResult", "OptimizerPass", "PassRecord", "OptimizationReport", "run_pipeline"]

logger = logging.getLogger(__name__)

Stage = Literal["prepare", "fixpoint", "finish"]


@dataclass(frozen=True)
class PassResult:
    """What one run of a pass did: the number of edits and a short human description of them."""

    changes: int = 0
    details: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return self.changes > 0


@dataclass(frozen=True)
class OptimizerPass:
    """A named pass.

    Attributes:
        name: the name used by ``--passes`` and in reports.
        run: edits the model in place and returns what it did.
        summary: one line for ``espquant optimize --list-passes``.
        stage: ``prepare`` passes run once first, ``fixpoint`` passes repeat until nothing changes,
            ``finish`` passes run once at the end.
        source: ``onnxoptimizer`` or ``espquant``, shown so users know whose code changed their model.
    """

    name: str
    run: Callable[[onnx.ModelProto], PassResult]
    summary: str
    stage: Stage = "fixpoint"
    source: str = "espquant"


@dataclass
class PassRecord:
    """The accumulated effect of one pass over all the rounds it ran."""

    name: str
    source: str
    runs: int = 0
    changes: int = 0
    seconds: float = 0.0
    details: Counter[str] = field(default_factory=Counter)

    def describe(self) -> str:
        """The details as one line, e.g. ``'folded 53 BatchNormalization into Conv'``."""
        return "; ".join(f"{text} (x{count})" if count > 1 else text for text, count in self.details.items())


@dataclass
class OptimizationReport:
    """Everything the optimizer did to a model, for the CLI table and ``--json``."""

    records: list[PassRecord]
    rounds: int
    nodes_before: Counter[str]
    nodes_after: Counter[str]
    warnings: list[str]
    seconds: float

    @property
    def total_changes(self) -> int:
        return sum(record.changes for record in self.records)

    def changes_of(self, name: str) -> int:
        """Changes made by the pass ``name`` (0 if it did not run)."""
        return sum(record.changes for record in self.records if record.name == name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "passes": [
                {
                    "name": r.name,
                    "source": r.source,
                    "runs": r.runs,
                    "changes": r.changes,
                    "details": r.describe(),
                    "seconds": round(r.seconds, 4),
                }
                for r in self.records
            ],
            "rounds": self.rounds,
            "nodes_before": sum(self.nodes_before.values()),
            "nodes_after": sum(self.nodes_after.values()),
            "op_types_before": dict(sorted(self.nodes_before.items())),
            "op_types_after": dict(sorted(self.nodes_after.items())),
            "warnings": list(self.warnings),
            "seconds": round(self.seconds, 4),
        }


def select_passes(available: Sequence[OptimizerPass], names: Sequence[str] | None) -> list[OptimizerPass]:
    """The passes to run, in pipeline order; ``names=None`` selects all of them.

    Raises:
        OptionError: a name that is not a pass, listing the valid names.
    """
    if names is None:
        return list(available)
    known = {p.name for p in available}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise OptionError(
            f"unknown optimizer pass(es): {', '.join(unknown)}. Valid passes: {', '.join(p.name for p in available)}."
        )
    wanted = set(names)
    return [p for p in available if p.name in wanted]


def run_pipeline(model: onnx.ModelProto, passes: Sequence[OptimizerPass], max_rounds: int = 16) -> OptimizationReport:
    """Run ``passes`` on ``model`` in place: prepare once, fixpoint until stable, finish once."""
    start = time.perf_counter()
    before = Counter(node.op_type for node in model.graph.node)
    records = {p.name: PassRecord(p.name, p.source) for p in passes}
    warnings: list[str] = []

    def apply(p: OptimizerPass) -> bool:
        t0 = time.perf_counter()
        result = p.run(model)
        record = records[p.name]
        record.runs += 1
        record.changes += result.changes
        record.seconds += time.perf_counter() - t0
        record.details.update(result.details)
        for message in result.warnings:
            if message not in warnings:
                warnings.append(message)
                logger.warning(message)
        if result.changed:
            logger.debug("pass %s: %s", p.name, "; ".join(result.details))
        return result.changed

    for p in passes:
        if p.stage == "prepare":
            apply(p)
    rounds = 0
    fixpoint = [p for p in passes if p.stage == "fixpoint"]
    while fixpoint and rounds < max_rounds:
        rounds += 1
        changed = [apply(p) for p in fixpoint]
        if not any(changed):
            break
    else:
        if fixpoint:
            warnings.append(f"the optimizer stopped after {max_rounds} rounds while passes still changed the model")
    for p in passes:
        if p.stage == "finish":
            apply(p)
    return OptimizationReport(
        records=list(records.values()),
        rounds=rounds,
        nodes_before=before,
        nodes_after=Counter(node.op_type for node in model.graph.node),
        warnings=warnings,
        seconds=time.perf_counter() - start,
    )
