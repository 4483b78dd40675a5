"""``espquant check``: can ESP-DL run the model, per target, and every reason it cannot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from espquant.cli.app import main, out


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--target",
    default="esp32s3",
    show_default=True,
    metavar="CHIP",
    help="Target chip: esp32s3, esp32p4, esp32s31, esp32, esp32s2, esp32c2, esp32c3, esp32c5, esp32c6, "
    "or 'all' for a support matrix over every target at int8 and int16.",
)
@click.option(
    "--bits", default="int8", show_default=True, type=click.Choice(["int8", "int16"]), help="Quantization width."
)
@click.option(
    "--table",
    "table_path",
    type=click.Path(path_type=Path),
    help="Also check a quantization table against the target: every exponent and shift the runtime can apply.",
)
@click.option(
    "--strict",
    is_flag=True,
    help="int16: count ops without an int16 kernel (Resize) as problems instead of int8 fallbacks.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of tables.")
@click.pass_context
def check(
    ctx: click.Context, model: Path, target: str, bits: str, table_path: Path | None, strict: bool, as_json: bool
) -> None:
    """Check that ESP-DL can run a model on a target chip, and list every reason it cannot.

    Prints one row per op type (count, supported, reason) and then every problem with the node, the
    attribute or input at fault and a hint. Exit code 1 when the model is incompatible.
    Optimize the model first: BatchNormalization, Dropout and shape chains are the optimizer's job.

    At int16, an op with no int16 kernel on the chip (Resize) is a warning, not a problem: `espquant
    calibrate` runs that node at int8. With --strict it is a problem, as `calibrate --strict` refuses it.

    \b
    Examples:
      espquant optimize net.onnx && espquant check net_optimized.onnx
      espquant check net_optimized.onnx --target esp32p4 --bits int16 --json
      espquant check net_optimized.onnx --target all
      espquant check net_optimized.onnx --target esp32p4 --table t.pickle   # and the table's exponents
    """
    from espquant.checker import check_model
    from espquant.model_io import load_model

    proto = load_model(model)
    if table_path is not None:
        _check_table(proto, table_path, target)
    if target == "all":
        reports = support_matrix(proto, fallback=not strict)
        if as_json:
            click.echo(json.dumps({"model": str(model), "reports": [r.to_dict() for r in reports.values()]}, indent=2))
        else:
            print_support_matrix(reports, f"{model}: ESP-DL support per target")
        if not all(r.ok for r in reports.values()):
            ctx.exit(1)
        return
    report = check_model(proto, target=target, bits=bits, strict=False, fallback=not strict)
    if as_json:
        click.echo(json.dumps({"model": str(model), **report.to_dict()}, indent=2))
    else:
        print_check_report(report, str(model))
    if not report.ok:
        ctx.exit(1)


def _check_table(model: Any, table_path: Path, target: str) -> None:
    """The table's exponents lowered for ``target``: a QuantTableError names what the chip cannot apply."""
    from espquant.api import Evaluator
    from espquant.errors import OptionError
    from espquant.table import QuantTable

    if target == "all":
        raise OptionError("--table checks one target: give --target CHIP.")
    table = QuantTable.load(table_path)
    evaluator = Evaluator(f"int{table.metadata.get('bits', 8)}", table.metadata.get("granularity"), target)
    evaluator.generate_quantized_model(model, table)


def support_matrix(model: Any, fallback: bool = True) -> dict[tuple[str, int], Any]:
    """Check reports of ``model`` for every target chip at int8 and int16 (``fallback``: see ``check_model``)."""
    from espquant.checker import check_model
    from espquant.quant import target_names

    return {
        (target, bits): check_model(model, target=target, bits=f"int{bits}", strict=False, fallback=fallback)
        for target in target_names()
        for bits in (8, 16)
    }


def _verdict(report: Any) -> str:
    """One support-matrix cell: yes (and how many nodes fall back to int8), or the number of problems."""
    if not report.ok:
        return f"[red]no[/] ({len(report.problems)} problem(s))"
    if report.fallbacks:
        return f"[green]yes[/] ({len(report.fallbacks)} node(s) at int8)"
    return "[green]yes[/]"


def print_support_matrix(reports: dict[tuple[str, int], Any], title: str, console: Console = out) -> None:
    """One row per target: compatible or the number of problems, at int8 and int16; then the problems."""
    table = Table(title=title, title_justify="left")
    table.add_column("target", no_wrap=True)
    table.add_column("int8", justify="center")
    table.add_column("int16", justify="center")
    targets = list(dict.fromkeys(target for target, _ in reports))
    for target in targets:
        cells = []
        for bits in (8, 16):
            cells.append(_verdict(reports[(target, bits)]))
        table.add_row(target, *cells)
    console.print(table)
    seen: dict[tuple[str, str], list[str]] = {}
    for (target, bits), report in reports.items():
        for problem in report.problems:
            seen.setdefault(("[red]-[/]", str(problem)), []).append(f"{target}/int{bits}")
        for fallback in report.fallbacks:
            seen.setdefault(("[yellow]![/]", str(fallback)), []).append(f"{target}/int{bits}")
    for (mark, text), where in seen.items():
        scope = "every target" if len(where) == len(reports) else ", ".join(where)
        console.print(f"{mark} {text} [dim]({scope})[/]", soft_wrap=True)


def print_check_report(report: Any, subject: str, console: Console = out) -> None:
    """The checker's table (one row per op type) followed by every problem."""
    table = Table(title=f"{subject} on {report.target}, int{report.bits}", title_justify="left")
    table.add_column("op type", no_wrap=True)
    table.add_column("count", justify="right")
    table.add_column("supported", justify="center")
    table.add_column("reason")
    fallback_ops = {f.op_type for f in report.fallbacks}
    for row in report.ops:
        mark = "[green]yes[/]" if row.supported else "[bold red]no[/]"
        if row.supported and row.op_type in fallback_ops:
            mark = "[yellow]int8[/]"
        table.add_row(row.op_type, str(row.count), mark, "; ".join(row.reasons))
    console.print(table)
    for problem in sorted(report.problems, key=lambda p: bool(p.op_type)):
        console.print(f"[red]-[/] {problem}", soft_wrap=True)
    for fallback in report.fallbacks:
        console.print(f"[yellow]! int8 fallback:[/] {fallback}", soft_wrap=True)
    if report.ok:
        mixed = f" ({len(report.fallbacks)} node(s) at int8)" if report.fallbacks else ""
        console.print(
            f"[bold green]compatible[/]: ESP-DL can run this model on {report.target} at int{report.bits}{mixed}"
        )
    else:
        console.print(f"[bold red]incompatible[/]: {len(report.problems)} problem(s)")
