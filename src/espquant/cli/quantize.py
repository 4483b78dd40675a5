"""``espquant quantize``: optimize, check, calibrate, evaluate, export and self-test in one command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from espquant.cli.app import err, force_option, main, out
from espquant.cli.data import DATA_HELP, preprocess_option
from espquant.errors import OptionError


def _input_shapes(texts: tuple[str, ...]) -> Any:
    """``--input-shape 1,3,96,96`` (the first input) or ``NAME:1,3,96,96`` (repeatable), as quantize takes them."""
    from espquant.optimizer.shapes import parse_input_shape

    if not texts:
        return None
    if len(texts) == 1 and ":" not in texts[0]:
        return [parse_input_shape(f"input:{texts[0]}")[1]]
    if any(":" not in t for t in texts):
        raise OptionError("--input-shape: with several inputs, name each one: NAME:D0,D1,...")
    return dict(parse_input_shape(t) for t in texts)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path), help=DATA_HELP)
@preprocess_option
@click.option("--target", default="esp32s3", show_default=True, metavar="CHIP", help="Target chip.")
@click.option("--bits", default="8", show_default=True, type=click.Choice(["8", "16", "int8", "int16"]))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output [default: <model>_<target>.espdl, <model>_<target>_qdq.onnx; cpp: a folder, default the model's].",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["espdl", "qdq", "cpp"]),
    default="espdl",
    show_default=True,
    help="What to write, as `espquant export --format`.",
)
@click.option("--calib-steps", type=click.IntRange(min=1), help="Calibrate on at most this many batches.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Calibration batch.")
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="[NAME:]D0,D1,...",
    help="Pin dynamic input shapes before optimizing (1,3,96,96 for a one-input model).",
)
@click.option(
    "--eval-data",
    "eval_path",
    type=click.Path(path_type=Path),
    help="Evaluate on this data [default: the last 20% of --data, held out of calibration].",
)
@click.option(
    "--labels",
    "labels_path",
    type=click.Path(path_type=Path),
    help="Class labels (.npy, one per sample) of --eval-data (or of --data): accuracies, not only agreement.",
)
@click.option(
    "--granularity", default="per-tensor", show_default=True, type=click.Choice(["per-tensor", "per-channel"])
)
@click.option("--method", help="Calibration method [default: the calibration engine's default].")
@click.option("--no-test-values", is_flag=True, help="Embed fixed pseudo-random test inputs, not a data sample.")
@click.option("--strict", is_flag=True, help="int16: refuse ops without an int16 kernel instead of int8 fallback.")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for the intermediate optimized model and table [default: beside the output].",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (the summary) on stdout.")
@force_option
def quantize(
    model: Path,
    data_path: Path,
    preprocess: str | None,
    target: str,
    bits: str,
    output: Path | None,
    fmt: str,
    calib_steps: int | None,
    batch_size: int,
    input_shapes: tuple[str, ...],
    eval_path: Path | None,
    labels_path: Path | None,
    granularity: str,
    method: str | None,
    no_test_values: bool,
    strict: bool,
    workdir: Path | None,
    as_json: bool,
    force: bool,
) -> None:
    """Quantize a float model for a chip in one step: optimize, check, calibrate, evaluate, export, self-test.

    Every problem the checker finds is listed before any work (an incompatible model stops there). The last
    20% of --data (at least one sample) is held out of calibration and evaluated on, unless --eval-data is
    given. The optimized model and the table are kept beside the output (or in --workdir) for `espquant
    report`, `evaluate` and `export`; every output is refused if it exists (--force replaces it) and inputs
    are never replaced. The exported .espdl is re-loaded and its embedded outputs re-simulated, as `espquant
    run --self-test` does. Arguments follow ESP-PPQ's espdl_quantize_onnx (calib_steps, input_shape, target,
    num_of_bits, export_test_values) and the Python API is espquant.quantize(...).

    \b
    Examples:
      espquant quantize net.onnx --data calib.npy --target esp32p4
      espquant quantize net.onnx --data images/ --preprocess resize=96x96,scale=1/255 --bits 16
      espquant quantize net.onnx --data calib.npy --eval-data test.npy --labels y.npy --json
      espquant quantize net.onnx --data calib.npy --format qdq -o net_qdq.onnx --workdir build/
    """
    from espquant.api.quantize import quantize as run_quantize

    show = not as_json and err.is_terminal

    def announce(step: str) -> None:
        if show:
            err.print(f"[dim]espquant quantize: {step}[/]")

    result = run_quantize(
        model,
        data_path,
        output,
        calib_steps=calib_steps,
        input_shape=_input_shapes(input_shapes),
        target=target,
        num_of_bits=int(bits.removeprefix("int")),
        export_test_values=not no_test_values,
        eval_data=eval_path,
        labels=labels_path,
        batch_size=batch_size,
        granularity=granularity,
        method=method,
        format=fmt,
        preprocess=preprocess,
        workdir=workdir,
        strict=strict,
        force=force,
        progress=show,
        on_step=announce,
    )
    if as_json:
        click.echo(json.dumps({"model": str(model), **result.to_dict()}, indent=2))
        return
    for fallback in result.fallbacks:
        err.print(f"[yellow]espquant: int8 fallback:[/] {fallback}", soft_wrap=True)
    print_summary(result, model)


def print_summary(result: Any, model: Path, console: Console = out) -> None:
    """One table: accuracy or agreement, SQNR per output, worst layers, size, fusions, fallbacks, self-test."""
    evaluation = result.evaluation
    table = Table(
        title=f"{model} -> {result.output} ({result.target}, int{result.bits}, {result.format})", title_justify="left"
    )
    table.add_column("measure")
    table.add_column("value", overflow="fold")
    table.add_row("calibration", f"{result.calibration_samples} samples, {result.method}")
    table.add_row("evaluated on", f"{evaluation.samples} samples: {result.evaluated_on}")
    if evaluation.float_accuracy is not None:
        table.add_row("float accuracy (onnxruntime)", f"{100 * evaluation.float_accuracy:.2f}%")
        table.add_row(f"int{result.bits} accuracy (chip, simulated)", f"{100 * evaluation.quantized_accuracy:.2f}%")
    if evaluation.top1_agreement is not None:
        table.add_row("top-1 agreement float vs chip", f"{100 * evaluation.top1_agreement:.2f}%")
    for row in evaluation.outputs:
        table.add_row(f"{row['name']}: SQNR", f"{row['sqnr_db']:.1f} dB")
    for rank, layer in enumerate(result.worst_layers, start=1):
        added = "-" if layer["added_sqnr_db"] is None else f"{layer['added_sqnr_db']:.1f} dB added"
        table.add_row(f"worst layer {rank}", f"{layer['node']} ({layer['op_type']}): {added}")
    if result.worst_layers:
        table.add_row("", f"every layer: espquant report {result.optimized_model} --table {result.table} --data ...")
    table.add_row("file size", f"{result.file_bytes:,} bytes")
    table.add_row("optimizer", "; ".join(result.fused) or "nothing to fuse")
    if result.equalized_pairs:
        table.add_row("equalization", f"{result.equalized_pairs} Conv pair(s) rescaled (weight factors in the table)")
    table.add_row("int8 fallback", ", ".join(result.fallbacks) or "none")
    if result.self_test:
        passed = all(row["equal"] for row in result.self_test)
        table.add_row("self-test (re-loaded file)", "[green]passed[/]" if passed else "[bold red]FAILED[/]")
    if result.qdq_agreement:
        for name, row in result.qdq_agreement.items():
            table.add_row(f"QDQ vs chip: {name}", f"{100 * row['equal_fraction']:.2f}% equal values")
    console.print(table)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
    console.print("wrote " + ", ".join(str(p) for p in result.written))
