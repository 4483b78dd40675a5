"""``espquant calibrate``: measure activations and write the quantization table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from espquant.cli.app import err, force_option, main, out
from espquant.cli.data import DATA_HELP, open_source, preprocess_option


def load_array_data(path: Path) -> Any:
    """Arrays from ``.npy`` (memory-mapped, so large sets stream from disk) or ``.npz`` (one array per input)."""
    from espquant.arrays import load_arrays

    return load_arrays(path, "--data", mmap=True)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path), help=DATA_HELP)
@preprocess_option
@click.option("--bits", default="int8", show_default=True, type=click.Choice(["int8", "int16"]))
@click.option(
    "--granularity",
    default="per-tensor",
    show_default=True,
    type=click.Choice(["per-tensor", "per-channel"]),
    help="Weights: one exponent, or one per channel.",
)
@click.option(
    "--method",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "minmax", "entropy", "percentile", "mse"]),
    help="How activation ranges are chosen. auto: per tensor, the exponent of the other four that the "
    "simulated chip measures best on the first calibration samples; it also gives PRelu outputs their own "
    "range and, with per-tensor weights, finer steps to weights whose channels differ widely, where that "
    "measures better.",
)
@click.option(
    "--cle/--no-cle",
    default=None,
    help="Cross-layer equalization of Conv -> [Relu] -> Conv pairs first (off by default; helps per-tensor "
    "weights). The changed model is written next to the table (<table>_model.onnx): evaluate and export that one.",
)
@click.option(
    "--bias-correction/--no-bias-correction",
    default=None,
    help="Compensate weight rounding in the float biases. auto (the default method) does, kept in the table and "
    "only when it measures better; off for the fixed methods, which then write the changed model next to the table, "
    "like --cle.",
)
@click.option(
    "--weight-rounding/--no-weight-rounding",
    default=None,
    help="Round each Conv / Gemm weight down or up so that the layer's output on the calibration data moves "
    "least, instead of to nearest (AdaRound's aim; off by default; with auto kept only when it measures "
    "better). Like --cle, the changed model is written next to the table.",
)
@click.option(
    "--batch-size",
    default=32,
    show_default=True,
    type=click.IntRange(min=1),
    help="Samples per onnxruntime run (a model whose input fixes its batch to B runs B at a time).",
)
@click.option(
    "--strict",
    is_flag=True,
    help="int16: refuse ops the chip has no int16 kernel for (Resize) instead of running them at int8.",
)
@click.option(
    "--table-format",
    default="exponents",
    show_default=True,
    type=click.Choice(["exponents", "legacy"]),
    help="The pickle: integer exponents (espquant), or float scales 2^e that the original ESP-DL toolkit's "
    "Evaluator and export_coefficient_to_cpp read (the metadata then lives in the .json twin). espquant reads both.",
)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Table path (default: <model>_calib.pickle).")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON instead of a terminal table.")
@force_option
def calibrate(
    model: Path,
    data_path: Path,
    preprocess: str | None,
    bits: str,
    granularity: str,
    method: str,
    cle: bool | None,
    bias_correction: bool | None,
    weight_rounding: bool | None,
    batch_size: int,
    strict: bool,
    table_format: str,
    output: Path | None,
    as_json: bool,
    force: bool,
) -> None:
    """Measure activations on calibration data and write the quantization table.

    Runs the float model once per batch under onnxruntime (memory does not grow with the data set),
    chooses a power-of-two exponent for every tensor, applies ESP-DL's rules (fused Relu, pass-through
    ops, Concat sharing, no left shifts), and writes TABLE.pickle and TABLE.json, both or neither; existing
    ones are replaced only with --force. --table-format legacy writes the scales the original ESP-DL
    toolkit reads.

    At int16, an op the chip has no int16 kernel for (Resize) runs at int8 in the int16 model, with a
    RequantizeLinear where its neighbours are int16; one line per such node says so. --strict refuses the
    model instead.

    \b
    Examples:
      espquant calibrate mnist_optimized.onnx --data calib.npy   # auto: the best exponents the chip measures
      espquant calibrate net.onnx --data calib.npy --method mse --cle --bias-correction   # writes <table>_model.onnx
      espquant calibrate net.onnx --data calib.npy --weight-rounding   # likewise
      espquant calibrate net.onnx --data calib.npz --granularity per-channel --method entropy -o t.pickle
      espquant calibrate net.onnx --data calib.npy -o t.pickle --force   # replace t.pickle and t.json
      espquant calibrate unet.onnx --data calib.npy --bits int16 --strict  # no int8 fallback
      espquant calibrate net.onnx --data calib.npy --table-format legacy  # for the original toolkit
      espquant calibrate net.onnx --data images/ --preprocess resize=96x96,mean=0.5,std=0.5
    """
    from espquant.api import Calibrator
    from espquant.api.calibrator import calibrated_model_path, save_calibration
    from espquant.files import guard_outputs
    from espquant.model_io import load_model
    from espquant.progress import progress_bar
    from espquant.table import table_paths

    proto = load_model(model)
    source = open_source(data_path, proto, preprocess, batch_size)
    target = output or model.with_name(f"{model.stem}_calib.pickle")
    model_out = calibrated_model_path(target)  # written only when CLE / bias correction / rounding change weights
    may_change = bool(cle) or (bool(bias_correction) and method != "auto") or bool(weight_rounding)
    may_change |= table_format == "legacy" and method == "auto"  # equalization baked into the model (legacy pickle)
    outputs = [*table_paths(target), *([model_out] if may_change else [])]
    guard_outputs(outputs, [model, data_path], force)  # before the work, not after it
    calibrator = Calibrator(
        bits, granularity, method, strict=strict, cle=cle, bias_correction=bias_correction,
        weight_rounding=weight_rounding,
    )
    with progress_bar("calibrating", source.samples, enabled=not as_json and err.is_terminal) as advance:
        result = calibrator.calibrate(proto, source.calibration_data(), batch_size, on_batch=advance)
    for fallback in result.fallbacks:  # stderr: the --json document on stdout stays one document
        err.print(f"[yellow]espquant: int8 fallback:[/] {fallback}", soft_wrap=True)
    table_path, json_path, model_path = save_calibration(result, target, table_format)
    if as_json:
        written = {"table": str(table_path), "model": str(model_path or model)}
        click.echo(json.dumps({**written, **json.loads(json_path.read_text())}, indent=2))
        return
    print_calibration(result)
    out.print(f"wrote [bold]{table_path}[/] and [bold]{json_path}[/]")
    if model_path is not None:
        out.print(
            f"wrote [bold]{model_path}[/]: {' and '.join(result.transforms)} changed the float weights; the table is "
            "for this model, give it to evaluate / export / report",
            soft_wrap=True,
        )


def print_calibration(result: Any, console: Console = out) -> None:
    """Activations with their range, exponent and clipped fraction; then weights and requantizations."""
    bits = result.table.metadata["bits"]
    table = Table(
        title=f"activations ({result.samples} samples, {result.table.metadata['method']}, int{bits})",
        title_justify="left",
    )
    table.add_column("tensor", overflow="fold")
    table.add_column("max |x|", justify="right")
    table.add_column("exponent", justify="right")
    table.add_column("range", justify="right")
    table.add_column("clipped", justify="right")

    def limit(name: str) -> int:
        """The largest integer of the tensor's own width (an int16 layer, or an int8 fallback, in a mixed table)."""
        return (1 << (result.widths.get(name, bits) - 1)) - 1

    rescaled = result.rescaled  # equalized: the observers measured these before the rescaling
    for name, observer in result.observers.items():
        exponent = result.table.exponents[name]
        kept = f"±{limit(name) * 2.0**exponent:.4g}"
        if name in rescaled:
            table.add_row(name, f"{rescaled[name]:.4g}", str(exponent), kept, "equalized")
            continue
        clipped = observer.clipped_fraction(exponent, result.widths.get(name, bits))
        table.add_row(name, f"{observer.max_abs:.4g}", str(exponent), kept, f"{100 * clipped:.3f}%")
    for name, reader in result.range_from.items():  # not measured: the range its reader keeps (plan.py)
        exponent = result.table.exponents[name]
        table.add_row(name, f"as {reader}", str(exponent), f"±{limit(name) * 2.0**exponent:.4g}", "-")
    console.print(table)
    others = [n for n in result.table.exponents if n not in result.observers and n not in result.range_from]
    per_channel = sum(isinstance(result.table.exponents[n], list) for n in others)
    console.print(f"{len(others)} weights, biases and derived tensors ({per_channel} per-channel)")
    if result.equalized_pairs:
        console.print(
            f"cross-layer equalization: {result.equalized_pairs} Conv pair(s) rescaled (kept because the simulated "
            "outputs measured better); the table carries the weight factors, so evaluate and export the same model",
            soft_wrap=True,
        )
    shifted = len(result.table.bias_shifts)
    if shifted:
        console.print(
            f"bias correction: {shifted} layer bias(es) compensate their weights' rounding (kept because the "
            "simulated outputs measured better); the table carries the corrections, so evaluate and export the "
            "same model",
            soft_wrap=True,
        )
    for r in result.requantize:
        console.print(
            f"RequantizeLinear before node {r.node!r} input {r.position} ({r.tensor}): "
            f"exponent {r.from_exponent} -> {r.to_exponent}",
            soft_wrap=True,
        )
