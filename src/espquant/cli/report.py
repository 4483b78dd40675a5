"""``espquant report``: where the quantization error comes from, layer by layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from espquant.cli.app import data_option, force_option, main, out, table_files, table_option
from espquant.cli.calibrate import load_array_data
from espquant.errors import OptionError, OutputError


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@table_option
@data_option("Normalised float inputs: .npy (N, ...) or .npz with one array per input (a few hundred samples do).")
@click.option("--target", default="esp32s3", show_default=True, metavar="CHIP", help="Target chip to simulate.")
@click.option(
    "-o", "--output", "report_dir", type=click.Path(path_type=Path), help="Folder for report.md / .json / index.html."
)
@click.option("--top", default=15, show_default=True, type=click.IntRange(min=1), help="Rows of the terminal table.")
@click.option(
    "--suggest-int16",
    "suggest",
    type=click.IntRange(min=1),
    metavar="K",
    help="Make the K layers with the largest own error int16, re-calibrate, and compare accuracy and size.",
)
@click.option(
    "--budget",
    type=click.FloatRange(min=0),
    metavar="POINTS",
    help="Add int16 layers worst-first until the accuracy drop against float is at most POINTS.",
)
@click.option("--labels", "labels_path", type=click.Path(path_type=Path), help="Class labels (.npy) for accuracy.")
@click.option(
    "--calib-data",
    "calib_path",
    type=click.Path(path_type=Path),
    help="Calibration inputs for re-calibrating with int16 layers [default: --data].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON instead of a table.")
@force_option
def report(
    model: Path,
    table_path: Path,
    data_path: Path,
    target: str,
    report_dir: Path | None,
    top: int,
    suggest: int | None,
    budget: float | None,
    labels_path: Path | None,
    calib_path: Path | None,
    as_json: bool,
    force: bool,
) -> None:
    """Find the layers that lose accuracy: every tensor of the simulated chip against the float model.

    For each tensor: cosine similarity, SQNR and max error of the full integer simulation (accumulated),
    of the layer alone on float inputs (own), what the layer adds beyond its inputs' quantization, and the
    fraction of values the exponent clips. The worst layers come first. With -o, the report is written as
    Markdown, JSON and (with the plot extra) an HTML page with an SQNR chart and histograms.

    Mixed precision: --suggest-int16 K makes the K worst layers int16 (ESP-DL v3 runs mixed models), or
    --budget POINTS adds them one by one until the accuracy (with --labels; else top-1 agreement with the
    float model) is within POINTS of float; accuracy and weight size are printed per step, and the mixed
    table is written to the -o folder (or beside the table) for `espquant evaluate` / `export`.

    \b
    Examples:
      espquant report mnist_optimized.onnx --table mnist_calib.pickle --data test.npy --target esp32s3
      espquant report net.onnx --table t.pickle --data x.npy -o report/    # then open report/index.html
      espquant report net.onnx --table t.pickle --data x.npy --labels y.npy --budget 0.3
    """
    from rich.table import Table

    from espquant.files import guard_outputs
    from espquant.model_io import load_model
    from espquant.report import analyze
    from espquant.report.render import COLUMNS, layer_row, report_paths, write_report
    from espquant.table import table_paths

    if suggest is not None and budget is not None:
        raise OptionError("give --suggest-int16 K or --budget POINTS, not both.")
    outputs: list[Path] = []
    if report_dir is not None:
        if report_dir.exists() and not report_dir.is_dir():
            raise OutputError(f"{report_dir}: is a file; -o names the folder the report is written to.")
        outputs += report_paths(report_dir).values()
    if suggest is not None or budget is not None:
        outputs += table_paths(_mixed_table_path(table_path, report_dir))
    guard_outputs(outputs, [model, *table_files(table_path), data_path, labels_path, calib_path], force)
    analysis = analyze(load_model(model), table_path, load_array_data(data_path), target)
    document: dict[str, Any] = analysis.to_dict()  # --json: everything in one document on stdout
    if not as_json:
        title = f"worst layers first ({analysis.target}, int{analysis.bits}, {analysis.samples} samples)"
        table = Table(title=title, title_justify="left")
        for column in COLUMNS:
            table.add_column(column, justify="left" if column in ("tensor", "op") else "right")
        for layer in analysis.worst(top):
            table.add_row(*layer_row(layer))
        out.print(table)
    if report_dir is not None:
        written = write_report(analysis, report_dir)
        document["written"] = {kind: str(path) for kind, path in written.items()}
        if not as_json:
            for kind, path in written.items():
                out.print(f"{kind}: {path}")
    if suggest is not None or budget is not None:
        document["mixed_precision"] = _mixed(
            model, table_path, data_path, target, suggest, budget, labels_path, calib_path, report_dir, as_json
        )
    if as_json:
        click.echo(json.dumps(document, indent=2))


def _mixed(
    model: Path,
    table_path: Path,
    data_path: Path,
    target: str,
    count: int | None,
    budget: float | None,
    labels_path: Path | None,
    calib_path: Path | None,
    report_dir: Path | None,
    as_json: bool,
) -> dict[str, Any]:
    """The mixed-precision search: printed as a table, and returned for the --json document."""
    from rich.table import Table

    from espquant.arrays import load_labels
    from espquant.model_io import load_model
    from espquant.report.mixed import suggest_int16

    data = load_array_data(data_path)
    if isinstance(data, dict):
        raise OptionError("mixed-precision suggestions support one-input models (--data as one array).")
    labels = load_labels(labels_path, len(data)) if labels_path is not None else None
    calibration = load_array_data(calib_path) if calib_path is not None else None
    result = suggest_int16(
        load_model(model),
        table_path,
        data,
        target,
        count=count,
        budget=budget,
        labels=labels,
        calibration_data=calibration,
    )
    document = result.to_dict()
    if not as_json:
        title = f"mixed precision on {target}: {result.metric} (float {result.float_accuracy:.2f}%)"
        table = Table(title=title, title_justify="left")
        for column in ("int16 layers", result.metric, "vs float", "weights + biases"):
            table.add_column(column, justify="left" if column == "int16 layers" else "right")
        for step in result.steps:
            layers = ", ".join(step.int16_layers) if step.int16_layers else "none (all int8)"
            drop = step.accuracy - result.float_accuracy
            table.add_row(layers, f"{step.accuracy:.2f}%", f"{drop:+.2f}", f"{step.weight_bytes:,} B")
        out.print(table)
    if result.table is not None:
        saved, _ = result.table.save(_mixed_table_path(table_path, report_dir))
        document["table"] = str(saved)
        if not as_json:
            out.print(f"mixed table: {saved}")
    return document


def _mixed_table_path(table_path: Path, report_dir: Path | None) -> Path:
    """Where the mixed-precision table goes: ``<table>_mixed.pickle`` in the report folder or beside the table."""
    return (report_dir or table_path.parent) / f"{table_path.stem}_mixed.pickle"
