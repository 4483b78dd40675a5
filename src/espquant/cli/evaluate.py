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
    batch_size: int,
    as_json: bool,
) -> None:
    """Compare the float model with what the chip computes (bit-exact simulation) on your data.

    Prints, per output, the SQNR and max error of the simulated (dequantized) outputs against onnxruntime's
    float outputs, the top-1 agreement of the first output, and with --labels both accuracies.

    \b
    Examples:
      espquant evaluate mnist_optimized.onnx --table mnist_calib.pickle --data test.npy --labels labels.npy
      espquant evaluate net.onnx --table t.pickle --data x.npz --target esp32p4 --json
    """
    from espquant.api import Evaluator
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
    evaluator = Evaluator(bits, table.metadata.get("granularity"), target)
    evaluator.generate_quantized_model(proto, table)
    session = create_session(proto, evaluator.providers)
    names = [o.name for o in session.get_outputs()]
    input_names = [i.name for i in session.get_inputs()]
    arrays = data if isinstance(data, dict) else {input_names[0]: data}
    total = len(next(iter(arrays.values())))
    chunking = Chunking.of(proto)  # a model with a fixed batch B runs B samples at a time
    chunking.check_total(total, str(data_path))
    step = chunking.step(batch_size)
    signal = {n: 0.0 for n in names}
    noise = {n: 0.0 for n in names}
    worst = {n: 0.0 for n in names}
    agree = correct_float = correct_quant = 0
    labels = np.load(labels_path, allow_pickle=False) if labels_path else None
    if labels is not None and len(labels) != total:
        raise DatasetError(f"{labels_path} holds {len(labels)} labels for {total} samples in {data_path}.")
    with progress_bar("evaluating", total, enabled=not as_json and err.is_terminal) as advance:
        for start in range(0, total, step):
            feeds = {k: np.asarray(v[start : start + step], dtype=np.float32) for k, v in arrays.items()}
            reference = chunking.run(lambda f: session.run(None, f), feeds)
            simulated, _ = evaluator.evaluate_quantized_model(feeds, to_float=True)
            for name, ref, sim in zip(names, reference, simulated):
                diff = sim.astype(np.float64) - ref
                signal[name] += float(np.sum(ref.astype(np.float64) ** 2))
                noise[name] += float(np.sum(diff**2))
                worst[name] = max(worst[name], float(np.abs(diff).max(initial=0)))
            ref_top, sim_top = reference[0].argmax(axis=-1), simulated[0].argmax(axis=-1)
            agree += int((ref_top == sim_top).sum())
            if labels is not None:
                truth = labels[start : start + step]
                correct_float += int((ref_top == truth).sum())
                correct_quant += int((sim_top == truth).sum())
            advance(len(ref_top))
    result: dict[str, Any] = {
        "model": str(model),
        "target": evaluator.target.name,
        "bits": evaluator.bits,
        "samples": total,
        "top1_agreement": agree / total,
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
        title=f"{model}: float vs int{evaluator.bits} on {evaluator.target.name} ({total} samples)",
        title_justify="left",
    )
    summary.add_column("measure")
    summary.add_column("value", justify="right")
    if labels is not None:
        summary.add_row("float accuracy (onnxruntime)", f"{100 * result['float_accuracy']:.2f}%")
        summary.add_row(f"int{evaluator.bits} accuracy (simulated)", f"{100 * result['quantized_accuracy']:.2f}%")
    summary.add_row("top-1 agreement", f"{100 * result['top1_agreement']:.2f}%")
    for row in result["outputs"]:
        summary.add_row(f"{row['name']}: SQNR", f"{row['sqnr_db']:.1f} dB")
        summary.add_row(f"{row['name']}: max |error|", f"{row['max_abs_error']:.4g}")
    out.print(summary)
