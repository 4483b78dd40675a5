"""``espquant evaluate``: float model vs the simulated chip on the user's data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from espquant.cli.app import data_option, err, main, out, table_option
from espquant.cli.data import DATA_HELP, open_source, preprocess_option
from espquant.errors import DatasetError


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@table_option
@data_option(DATA_HELP)
@preprocess_option
@click.option("--labels", "labels_path", type=click.Path(path_type=Path), help="Integer class labels (.npy, N).")
@click.option("--target", default="esp32s3", show_default=True, metavar="CHIP", help="Target chip to simulate.")
@click.option(
    "--library",
    type=click.Choice(["v3", "legacy"]),
    default="v3",
    show_default=True,
    help="Runtime to simulate: ESP-DL v3, or the legacy C++ library (v1.1 / v2.0) `export --format cpp` writes for.",
)
@click.option(
    "--batch-size",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Samples per step (a model whose input fixes its batch to B runs B at a time).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
def evaluate(
    model: Path,
    table_path: Path,
    data_path: Path,
    preprocess: str | None,
    labels_path: Path | None,
    target: str,
    library: str,
    batch_size: int,
    as_json: bool,
) -> None:
    """Compare the float model with what the chip computes (bit-exact simulation) on your data.

    Prints, per output, the SQNR and max error of the simulated (dequantized) outputs against onnxruntime's
    float outputs; when the first output holds class scores (N, classes), the top-1 agreement and, with
    --labels (one class index per sample), both accuracies.

    \b
    Examples:
      espquant evaluate mnist_optimized.onnx --table mnist_calib.pickle --data test.npy --labels labels.npy
      espquant evaluate net.onnx --table t.pickle --data x.npz --target esp32p4 --json
      espquant evaluate net.onnx --table t.pickle --data x.npy --target esp32 --library legacy
      espquant evaluate net.onnx --table t.pickle --data images/ --preprocess resize=96x96,scale=1/255
    """
    from espquant.api.measure import measure
    from espquant.arrays import load_labels
    from espquant.calibration.dataset import Chunking
    from espquant.model_io import load_model
    from espquant.progress import progress_bar
    from espquant.table import QuantTable

    proto = load_model(model)
    table = QuantTable.load(table_path)
    source = open_source(data_path, proto, preprocess, batch_size)
    total = source.samples
    if total == 0:
        raise DatasetError(f"{data_path}: no samples (an empty first dimension).")
    if total is not None:
        Chunking.of(proto).check_total(total, str(data_path))  # a model with a fixed batch B runs B at a time
    if labels_path is not None:
        if total is None:
            raise DatasetError(f"--data {data_path}: its sample count is unknown, so --labels cannot be matched.")
        source = source.with_labels(load_labels(labels_path, total))
    with progress_bar("evaluating", total, enabled=not as_json and err.is_terminal) as advance:
        measured = measure(
            proto,
            table,
            source.batches(),
            target,
            library=library,
            batch_size=batch_size,
            labels_given=labels_path is not None,
            labels_source=str(labels_path),
            what=f"--data {data_path}",
            on_batch=advance,
        )
    total = measured.samples
    result: dict[str, Any] = {"model": str(model), **measured.to_dict()}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    summary = Table(
        title=f"{model}: float vs int{measured.bits} on {measured.target}"
        + (" (legacy ESP-DL library)" if library == "legacy" else "")
        + f" ({total} samples)",
        title_justify="left",
    )
    summary.add_column("measure")
    summary.add_column("value", justify="right")
    if measured.float_accuracy is not None:
        summary.add_row("float accuracy (onnxruntime)", f"{100 * result['float_accuracy']:.2f}%")
        summary.add_row(f"int{measured.bits} accuracy (simulated)", f"{100 * result['quantized_accuracy']:.2f}%")
    if measured.top1_agreement is not None:
        summary.add_row("top-1 agreement", f"{100 * result['top1_agreement']:.2f}%")
    for row in result["outputs"]:
        summary.add_row(f"{row['name']}: SQNR", f"{row['sqnr_db']:.1f} dB")
        summary.add_row(f"{row['name']}: max |error|", f"{row['max_abs_error']:.4g}")
    out.print(summary)
