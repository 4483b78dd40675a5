"""``espquant evaluate``: float model vs the simulated chip on the user's data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.table import Table

from espquant.cli.app import data_option, err, main, out, table_option
from espquant.cli.calibrate import load_array_data


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@table_option
@data_option("Normalised float inputs: .npy (N, ...) or .npz with one array per input.")
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
    """
    from espquant.api import Evaluator
    from espquant.arrays import check_finite, check_labels, classes_of, load_labels
    from espquant.calibration.dataset import Chunking
    from espquant.errors import DatasetError
    from espquant.model_io import load_model
    from espquant.progress import progress_bar
    from espquant.runtime import create_session
    from espquant.table import QuantTable

    proto = load_model(model)
    table = QuantTable.load(table_path)
    data = load_array_data(data_path)
    bits = f"int{table.metadata.get('bits', 8)}"
    evaluator = Evaluator(bits, table.metadata.get("granularity"), target, library=library)
    evaluator.generate_quantized_model(proto, table)
    session = create_session(proto, evaluator.providers)
    names = [o.name for o in session.get_outputs()]
    input_names = [i.name for i in session.get_inputs()]
    arrays = data if isinstance(data, dict) else {input_names[0]: data}
    total = len(next(iter(arrays.values())))
    if total == 0:
        raise DatasetError(f"{data_path}: no samples (an empty first dimension).")
    chunking = Chunking.of(proto)  # a model with a fixed batch B runs B samples at a time
    chunking.check_total(total, str(data_path))
    step = chunking.step(batch_size)
    signal = {n: 0.0 for n in names}
    noise = {n: 0.0 for n in names}
    worst = {n: 0.0 for n in names}
    agree = correct_float = correct_quant = 0
    classes: int | None = None
    labels = load_labels(labels_path, total) if labels_path else None
    with progress_bar("evaluating", total, enabled=not as_json and err.is_terminal) as advance:
        for start in range(0, total, step):
            feeds = {k: np.asarray(v[start : start + step], dtype=np.float32) for k, v in arrays.items()}
            for values in feeds.values():
                check_finite(values, f"--data {data_path}")
            reference = chunking.run(lambda f: session.run(None, f), feeds)
            simulated, _ = evaluator.evaluate_quantized_model(feeds, to_float=True)
            for name, ref, sim in zip(names, reference, simulated):
                diff = sim.astype(np.float64) - ref
                signal[name] += float(np.sum(ref.astype(np.float64) ** 2))
                noise[name] += float(np.sum(diff**2))
                worst[name] = max(worst[name], float(np.abs(diff).max(initial=0)))
            if start == 0:
                classes = classes_of(reference[0])
                if labels is not None:
                    check_labels(labels, classes, labels_path)
            if classes is not None:  # top-1 means something only for (N, classes) scores
                ref_top, sim_top = reference[0].argmax(axis=-1), simulated[0].argmax(axis=-1)
                agree += int((ref_top == sim_top).sum())
                if labels is not None:
                    truth = labels[start : start + step]
                    correct_float += int((ref_top == truth).sum())
                    correct_quant += int((sim_top == truth).sum())
            advance(len(reference[0]))
    result: dict[str, Any] = {
        "model": str(model),
        "target": evaluator.target.name,
        "library": library,
        "bits": evaluator.bits,
        "samples": total,
        "top1_agreement": agree / total if classes is not None else None,
        "outputs": [
            {
                "name": n,
                "sqnr_db": 10 * np.log10(signal[n] / noise[n]) if noise[n] else float("inf"),
                "max_abs_error": worst[n],
            }
            for n in names
        ],
    }
    if labels is not None:
        result["float_accuracy"] = correct_float / total
        result["quantized_accuracy"] = correct_quant / total
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    summary = Table(
        title=f"{model}: float vs int{evaluator.bits} on {evaluator.target.name}"
        + (" (legacy ESP-DL library)" if library == "legacy" else "")
        + f" ({total} samples)",
        title_justify="left",
    )
    summary.add_column("measure")
    summary.add_column("value", justify="right")
    if labels is not None:
        summary.add_row("float accuracy (onnxruntime)", f"{100 * result['float_accuracy']:.2f}%")
        summary.add_row(f"int{evaluator.bits} accuracy (simulated)", f"{100 * result['quantized_accuracy']:.2f}%")
    if classes is not None:
        summary.add_row("top-1 agreement", f"{100 * result['top1_agreement']:.2f}%")
    for row in result["outputs"]:
        summary.add_row(f"{row['name']}: SQNR", f"{row['sqnr_db']:.1f} dB")
        summary.add_row(f"{row['name']}: max |error|", f"{row['max_abs_error']:.4g}")
    out.print(summary)
