"""``espquant report``: where the quantization error comes from, layer by layer."""

from __future__ import annotations

import json
from pathlib import Path

import click

from espquant.cli.app import main, out
from espquant.cli.calibrate import load_array_data


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--table",
    "table_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Quantization table from `espquant calibrate` (.pickle or .json).",
)
@click.option(
    "--data",
    "data_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Normalised float inputs: .npy (N, ...) or .npz with one array per input (a few hundred samples do).",
)
@click.option("--target", default="esp32s3", show_default=True, metavar="CHIP", help="Target chip to simulate.")
@click.option(
    "-o", "--output", "report_dir", type=click.Path(path_type=Path), help="Folder for report.md / .json / index.html."
)
@click.option("--top", default=15, show_default=True, type=click.IntRange(min=1), help="Rows of the terminal table.")
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON instead of a table.")
def report(
    model: Path, table_path: Path, data_path: Path, target: str, report_dir: Path | None, top: int, as_json: bool
) -> None:
    """Find the layers that lose accuracy: every tensor of the simulated chip against the float model.

    For each tensor: cosine similarity, SQNR and max error of the full integer simulation (accumulated),
    of the layer alone on float inputs (own), what the layer adds beyond its inputs' quantization, and the
    fraction of values the exponent clips. The worst layers come first. With -o, the report is written as
    Markdown, JSON and (with the plot extra) an HTML page with an SQNR chart and histograms.

    \b
    Examples:
      espquant report mnist_optimized.onnx --table mnist_calib.pickle --data test.npy --target esp32s3
      espquant report net.onnx --table t.pickle --data x.npy -o report/    # then open report/index.html
    """
    from rich.table import Table

    from espquant.model_io import load_model
    from espquant.report import analyze
    from espquant.report.render import COLUMNS, layer_row, write_report

    analysis = analyze(load_model(model), table_path, load_array_data(data_path), target)
    if as_json:
        out.print_json(json.dumps(analysis.to_dict()))
    else:
        title = f"worst layers first ({analysis.target}, int{analysis.bits}, {analysis.samples} samples)"
        table = Table(title=title, title_justify="left")
        for column in COLUMNS:
            table.add_column(column, justify="left" if column in ("tensor", "op") else "right")
        for layer in analysis.worst(top):
            table.add_row(*layer_row(layer))
        out.print(table)
    if report_dir is not None:
        written = write_report(analysis, report_dir)
        for kind, path in written.items():
            out.print(f"{kind}: {path}")
