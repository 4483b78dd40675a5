"""``espquant ops``: the operator support matrix, generated from the registry and the backends' own tables."""

from __future__ import annotations

import json
from dataclasses import dataclass

import click
from rich.table import Table

from espquant.cli.app import main, out

COLUMNS = ("op", "int8", "int16", "simulate", "fast path", ".espdl", "C++ (legacy)", "QDQ", "notes")


@dataclass(frozen=True)
class OpSupport:
    """One row of the matrix: what each part of espquant does with one ONNX op type."""

    op_type: str
    int8: bool
    int16: bool
    simulate: bool
    fast_path: bool
    espdl: bool
    cpp: bool
    qdq: bool
    notes: str

    def cells(self) -> tuple[str, ...]:
        def mark(value: bool) -> str:
            return "yes" if value else "-"

        flags = (self.int8, self.int16, self.simulate, self.fast_path, self.espdl, self.cpp, self.qdq)
        return (self.op_type, *(mark(v) for v in flags), self.notes)


def support_rows(target: str | None = None) -> list[OpSupport]:
    """Every registry entry with what the checker, the simulator and each exporter do with it.

    ``target`` limits the notes to rules of that chip's family."""
    from espquant.export.cpp import _HANDLERS as CPP_WRITERS
    from espquant.export.espdl_export import _EXPORT as ESPDL_WRITERS
    from espquant.ops import REGISTRY
    from espquant.quant import get_target
    from espquant.simulator.compiled import _LOWER
    from espquant.simulator.interpreter import simulated_ops

    family = get_target(target).family if target else None
    simulated = simulated_ops()
    rows = []
    for op_type, spec in sorted(REGISTRY.items()):
        accepted = spec.status == "supported" and not spec.espdl_refusal
        notes = [spec.status_reason or spec.espdl_refusal] if not accepted else []
        notes += [
            f"{', '.join(sorted(c.families))} only: {c.hint or c.field}"
            for c in spec.constraints
            if c.families is not None and (family is None or family in c.families)
        ]
        notes += [n for n in spec.notes if "ESP32-P4" not in n or family in (None, "p4")]
        rows.append(
            OpSupport(
                op_type=op_type,
                int8=accepted and 8 in spec.bits,
                int16=accepted and 16 in spec.bits,
                simulate=spec.status == "supported" and op_type in simulated,
                fast_path=op_type in _LOWER or spec.int8_lut,
                espdl=accepted and op_type in ESPDL_WRITERS,
                cpp=accepted and op_type in CPP_WRITERS,
                qdq=accepted and spec.onnx_standard,
                notes="; ".join(notes),
            )
        )
    return rows


def markdown_matrix(rows: list[OpSupport]) -> str:
    """The matrix as a Markdown table: the documentation's operator page (docs/reference/operators.md)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row.cells()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


@main.command()
@click.option("--target", metavar="CHIP", help="Only the notes that apply to this chip's family.")
@click.option("--json", "as_json", is_flag=True, help="Print the matrix as one JSON document.")
@click.option("--markdown", is_flag=True, help="Print the matrix as a Markdown table.")
def ops(target: str | None, as_json: bool, markdown: bool) -> None:
    """Which ONNX ops espquant takes, at which width, and what each part of it does with them.

    int8 / int16: `espquant check` accepts the op at that width (and then `export` writes it). simulate: the
    bit-exact simulator runs it; fast path: it runs inside the compiled onnxruntime graphs when provably exact
    (int8 tables included). .espdl / C++ / QDQ: the exporters write it. Ops the arithmetic spec does not pin
    down are listed with the reason they are refused.

    \b
    Examples:
      espquant ops
      espquant ops --target esp32p4
      espquant ops --json | jq '.[] | select(.int16 == false) | .op_type'
    """
    rows = support_rows(target)
    if as_json:
        click.echo(json.dumps([row.__dict__ for row in rows], indent=1))
        return
    if markdown:
        click.echo(markdown_matrix(rows), nl=False)
        return
    table = Table(title=f"operator support{f' on {target}' if target else ''}", title_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="center" if column not in ("op", "notes") else "left")
    for row in rows:
        table.add_row(*row.cells())
    out.print(table)
