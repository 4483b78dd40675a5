"""``espquant optimize``: clean a float model and show what each pass changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from espquant.cli.app import force_option, main, out
from espquant.errors import OptionError


def _parse_passes(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise OptionError("--passes: give a comma-separated list of pass names (see --list-passes).")
    return names


def print_report(report: Any, output: str | None, console: Console = out, title: str | None = None) -> None:
    """Print an optimization report as a table of passes and a summary line."""
    table = Table(title=title or "optimizer passes", title_justify="left", show_lines=False)
    table.add_column("pass", no_wrap=True)
    table.add_column("changes", justify="right")
    table.add_column("what changed")
    table.add_column("time", justify="right", style="dim", no_wrap=True)
    idle = []
    for record in report.records:
        if record.runs == 0:
            continue
        if not record.details:
            idle.append(record.name)
            continue
        table.add_row(
            record.name,
            str(record.changes) if record.changes else "-",
            record.describe(),
            f"{record.seconds:.2f}s",
        )
    console.print(table)
    if idle:
        console.print(f"[dim]{len(idle)} other passes found nothing to do (--list-passes shows them all)[/]")
    before, after = sum(report.nodes_before.values()), sum(report.nodes_after.values())
    diff = []
    for op in sorted(set(report.nodes_before) | set(report.nodes_after)):
        delta = report.nodes_after[op] - report.nodes_before[op]
        if delta:
            diff.append(f"{op} {delta:+d}")
    console.print(
        f"nodes {before} -> {after}"
        + (f" ({', '.join(diff)})" if diff else "")
        + f" in {report.rounds} round(s), {report.seconds:.2f}s"
    )
    for message in report.warnings:
        console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)
    if output:
        console.print(f"wrote [bold]{output}[/]")


@main.command()
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output path (default: <model>_optimized.onnx).")
@click.option("--passes", "passes_text", metavar="P1,P2,...", help="Run only these passes (see --list-passes).")
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME:D0,D1,...",
    help="Pin a dynamic input's shape, e.g. input:1,3,48,192 (N for a batch that stays dynamic: input:N,3,48,192). "
    "Repeat for several inputs.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("--list-passes", is_flag=True, help="List the passes in pipeline order and exit.")
@force_option
def optimize(
    model: Path | None,
    output: Path | None,
    passes_text: str | None,
    input_shapes: tuple[str, ...],
    as_json: bool,
    list_passes: bool,
    force: bool,
) -> None:
    """Clean a float ONNX model before quantization.

    Folds BatchNormalization into Conv/Gemm/ConvTranspose, fuses biases and pads, turns MatMul+Add
    into Gemm, removes no-ops, folds constant subgraphs (shape chains), upgrades old opsets to 13,
    names every node and infers shapes. The input file is never modified.

    \b
    Examples:
      espquant optimize mnist.onnx
      espquant optimize mnist.onnx -o clean.onnx --json
      espquant optimize ocr.onnx --input-shape x:1,3,48,192
      espquant optimize ocr.onnx --input-shape x:N,3,48,192     # paddle2onnx's [-1, 3, ?, ?], batch kept dynamic
      espquant optimize mnist.onnx --passes fold_constants,fold_batchnorm
      espquant optimize mnist.onnx --force      # replace an earlier mnist_optimized.onnx
    """
    from espquant.files import guard_outputs
    from espquant.optimizer import PASSES, optimize_file
    from espquant.optimizer.core import default_output_path
    from espquant.optimizer.shapes import parse_input_shape

    if list_passes:
        table = Table(title="optimizer passes, in pipeline order", title_justify="left")
        for column in ("pass", "stage", "from"):
            table.add_column(column, no_wrap=True)
        table.add_column("what it does")
        for p in PASSES:
            table.add_row(p.name, p.stage, p.source, p.summary)
        out.print(table)
        return
    if model is None:
        raise click.UsageError("missing argument MODEL (the .onnx file to optimize).")
    shapes = dict(parse_input_shape(text) for text in input_shapes)
    target = output or default_output_path(model)
    guard_outputs([target], [model], force)
    path, report = optimize_file(model, target, _parse_passes(passes_text), shapes or None)
    if as_json:
        click.echo(json.dumps({"model": str(model), "output": path, **report.to_dict()}, indent=2))
    else:
        print_report(report, path, title=f"optimizer passes on {model}")
