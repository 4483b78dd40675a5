"""The ``espquant`` command line.

Subcommands mirror the Python API. Errors that espquant explains (bad paths, bad options, models it
cannot handle) print as one line on stderr with exit code 1; bad usage exits with 2; neither shows a
traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from espquant._version import __version__
from espquant.errors import EspquantError, OptionError

logger = logging.getLogger("espquant")


def _console(stderr: bool = False) -> Console:
    """A console that is 120 columns wide when output goes to a file or pipe (rich's default is 80)."""
    probe = Console(stderr=stderr)
    width = None if probe.is_terminal or "COLUMNS" in os.environ else 120
    return Console(stderr=stderr, highlight=False, width=width)


out = _console()
err = _console(stderr=True)


class EspquantGroup(click.Group):
    """A click group that turns espquant errors into one clear line and the right exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OptionError as exc:
            err.print(f"[bold red]espquant: usage error:[/] {exc}", soft_wrap=True)
            ctx.exit(2)
        except EspquantError as exc:
            err.print(f"[bold red]espquant: error:[/] {exc}", soft_wrap=True)
            ctx.exit(1)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            err.print(
                f"[bold red]espquant: internal error:[/] {type(exc).__name__}: {exc}. "
                "Run again with --debug for the traceback and please report it.",
                soft_wrap=True,
            )
            ctx.exit(1)


@click.group(cls=EspquantGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="espquant")
@click.option("-v", "--verbose", count=True, help="Log more (-v: info, -vv: debug).")
@click.option("--debug", is_flag=True, help="Show Python tracebacks for unexpected errors.")
@click.pass_context
def main(ctx: click.Context, verbose: int, debug: bool) -> None:
    """Quantize ONNX models for Espressif ESP-DL chips and know what the chip will compute.

    \b
    Typical flow:
      espquant demo                                  # everything on a bundled MNIST model
      espquant optimize model.onnx                   # -> model_optimized.onnx
      espquant optimize model.onnx --input-shape input:1,3,96,96
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.ERROR if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logger.setLevel(level)


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
    help="Pin a dynamic input's shape, e.g. input:1,3,48,192. Repeat for several inputs.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("--list-passes", is_flag=True, help="List the passes in pipeline order and exit.")
def optimize(
    model: Path | None,
    output: Path | None,
    passes_text: str | None,
    input_shapes: tuple[str, ...],
    as_json: bool,
    list_passes: bool,
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
      espquant optimize mnist.onnx --passes fold_constants,fold_batchnorm
    """
    from espquant.optimizer import PASSES, optimize_file
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
    path, report = optimize_file(model, output, _parse_passes(passes_text), shapes or None)
    if as_json:
        click.echo(json.dumps({"model": str(model), "output": path, **report.to_dict()}, indent=2))
    else:
        print_report(report, path, title=f"optimizer passes on {model}")


def _load_calibration_data(path: Path) -> Any:
    """Arrays from ``.npy`` (memory-mapped, so large sets stream from disk) or ``.npz`` (one array per input)."""
    import numpy as np

    from espquant.errors import DatasetError

    if not path.is_file():
        raise DatasetError(
            f"{path}: no such data file. Give a .npy array (N, ...) or an .npz with one array per input."
        )
    try:
        if path.suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
            return next(iter(arrays.values())) if len(arrays) == 1 else arrays
    except (ValueError, OSError) as exc:
        raise DatasetError(f"{path}: cannot read it as numpy data ({exc}).") from exc
    raise DatasetError(f"{path}: calibration data must be a .npy or .npz file.")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--data",
    "data_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Calibration inputs, already normalised: .npy (N, ...) or .npz with one array per input name.",
)
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
    default="minmax",
    show_default=True,
    type=click.Choice(["minmax", "entropy", "percentile", "mse"]),
    help="How activation ranges are chosen.",
)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Table path (default: <model>_calib.pickle).")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON instead of a terminal table.")
def calibrate(
    model: Path,
    data_path: Path,
    bits: str,
    granularity: str,
    method: str,
    batch_size: int,
    output: Path | None,
    as_json: bool,
) -> None:
    """Measure activations on calibration data and write the quantization table.

    Runs the float model once per batch under onnxruntime (memory does not grow with the data set),
    chooses a power-of-two exponent for every tensor, applies ESP-DL's rules (fused Relu, pass-through
    ops, Concat sharing, no left shifts), and writes TABLE.pickle (legacy format) and TABLE.json.

    \b
    Examples:
      espquant calibrate mnist_optimized.onnx --data calib.npy
      espquant calibrate net.onnx --data calib.npz --granularity per-channel --method entropy -o t.pickle
    """
    from espquant.calibration import Calibrator
    from espquant.model_io import load_model
    from espquant.progress import progress_bar

    proto = load_model(model)
    data = _load_calibration_data(data_path)
    calibrator = Calibrator(bits, granularity, method)
    total = len(data) if hasattr(data, "__len__") and not isinstance(data, dict) else None
    target = output or model.with_name(f"{model.stem}_calib.pickle")
    with progress_bar("calibrating", total, enabled=not as_json and err.is_terminal) as advance:
        result = calibrator.calibrate(proto, data, batch_size, on_batch=advance)
    table_path, json_path = result.table.save(target)
    if as_json:
        click.echo(json.dumps({"table": str(table_path), **json.loads(json_path.read_text())}, indent=2))
        return
    print_calibration(result)
    out.print(f"wrote [bold]{table_path}[/] and [bold]{json_path}[/]")


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
    limit = (1 << (bits - 1)) - 1
    for name, observer in result.observers.items():
        exponent = result.table.exponents[name]
        clipped = observer.clipped_fraction(exponent, bits)
        table.add_row(
            name, f"{observer.max_abs:.4g}", str(exponent), f"±{limit * 2.0**exponent:.4g}", f"{100 * clipped:.3f}%"
        )
    console.print(table)
    others = [n for n in result.table.exponents if n not in result.observers]
    per_channel = sum(isinstance(result.table.exponents[n], list) for n in others)
    console.print(f"{len(others)} weights, biases and derived tensors ({per_channel} per-channel)")
    for r in result.requantize:
        console.print(
            f"RequantizeLinear before node {r.node!r} input {r.position} ({r.tensor}): "
            f"exponent {r.from_exponent} -> {r.to_exponent}",
            soft_wrap=True,
        )


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
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of tables.")
@click.pass_context
def check(ctx: click.Context, model: Path, target: str, bits: str, as_json: bool) -> None:
    """Check that ESP-DL can run a model on a target chip, and list every reason it cannot.

    Prints one row per op type (count, supported, reason) and then every problem with the node, the
    attribute or input at fault and a hint. Exit code 1 when the model is incompatible.
    Optimize the model first: BatchNormalization, Dropout and shape chains are the optimizer's job.

    \b
    Examples:
      espquant optimize net.onnx && espquant check net_optimized.onnx
      espquant check net_optimized.onnx --target esp32p4 --bits int16 --json
      espquant check net_optimized.onnx --target all
    """
    from espquant.checker import check_model
    from espquant.model_io import load_model

    proto = load_model(model)
    if target == "all":
        reports = support_matrix(proto)
        if as_json:
            click.echo(json.dumps({"model": str(model), "reports": [r.to_dict() for r in reports.values()]}, indent=2))
        else:
            print_support_matrix(reports, f"{model}: ESP-DL support per target")
        if not all(r.ok for r in reports.values()):
            ctx.exit(1)
        return
    report = check_model(proto, target=target, bits=bits, strict=False)
    if as_json:
        click.echo(json.dumps({"model": str(model), **report.to_dict()}, indent=2))
    else:
        print_check_report(report, str(model))
    if not report.ok:
        ctx.exit(1)


def support_matrix(model: Any) -> dict[tuple[str, int], Any]:
    """Check reports of ``model`` for every target chip at int8 and int16."""
    from espquant.checker import check_model
    from espquant.quant import target_names

    return {
        (target, bits): check_model(model, target=target, bits=f"int{bits}", strict=False)
        for target in target_names()
        for bits in (8, 16)
    }


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
            report = reports[(target, bits)]
            cells.append("[green]yes[/]" if report.ok else f"[red]no[/] ({len(report.problems)} problem(s))")
        table.add_row(target, *cells)
    console.print(table)
    seen: dict[str, list[str]] = {}
    for (target, bits), report in reports.items():
        for problem in report.problems:
            seen.setdefault(str(problem), []).append(f"{target}/int{bits}")
    for text, where in seen.items():
        scope = "every target" if len(where) == len(reports) else ", ".join(where)
        console.print(f"[red]-[/] {text} [dim]({scope})[/]", soft_wrap=True)


def print_check_report(report: Any, subject: str, console: Console = out) -> None:
    """The checker's table (one row per op type) followed by every problem."""
    table = Table(title=f"{subject} on {report.target}, int{report.bits}", title_justify="left")
    table.add_column("op type", no_wrap=True)
    table.add_column("count", justify="right")
    table.add_column("supported", justify="center")
    table.add_column("reason")
    for row in report.ops:
        mark = "[green]yes[/]" if row.supported else "[bold red]no[/]"
        table.add_row(row.op_type, str(row.count), mark, "; ".join(row.reasons))
    console.print(table)
    for problem in sorted(report.problems, key=lambda p: bool(p.op_type)):
        console.print(f"[red]-[/] {problem}", soft_wrap=True)
    if report.ok:
        console.print(f"[bold green]compatible[/]: ESP-DL can run this model on {report.target} at int{report.bits}")
    else:
        console.print(f"[bold red]incompatible[/]: {len(report.problems)} problem(s)")


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
    help="Normalised float inputs: .npy (N, ...) or .npz with one array per input.",
)
@click.option("--labels", "labels_path", type=click.Path(path_type=Path), help="Integer class labels (.npy, N).")
@click.option("--target", default="esp32s3", show_default=True, metavar="CHIP", help="Target chip to simulate.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
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
    import onnxruntime as ort

    from espquant.model_io import load_model
    from espquant.progress import progress_bar
    from espquant.simulator import Evaluator
    from espquant.table import QuantTable

    proto = load_model(model)
    table = QuantTable.load(table_path)
    data = _load_calibration_data(data_path)
    bits = f"int{table.metadata.get('bits', 8)}"
    evaluator = Evaluator(bits, table.metadata.get("granularity"), target)
    evaluator.generate_quantized_model(proto, table)
    session = ort.InferenceSession(proto.SerializeToString(), providers=evaluator.providers)
    names = [o.name for o in session.get_outputs()]
    input_names = [i.name for i in session.get_inputs()]
    arrays = data if isinstance(data, dict) else {input_names[0]: data}
    total = len(next(iter(arrays.values())))
    signal = {n: 0.0 for n in names}
    noise = {n: 0.0 for n in names}
    worst = {n: 0.0 for n in names}
    agree = correct_float = correct_quant = 0
    labels = np.load(labels_path, allow_pickle=False) if labels_path else None
    with progress_bar("evaluating", total, enabled=not as_json and err.is_terminal) as advance:
        for start in range(0, total, batch_size):
            feeds = {k: np.asarray(v[start : start + batch_size], dtype=np.float32) for k, v in arrays.items()}
            reference = session.run(None, feeds)
            simulated, _ = evaluator.evaluate_quantized_model(feeds, to_float=True)
            for name, ref, sim in zip(names, reference, simulated):
                diff = sim.astype(np.float64) - ref
                signal[name] += float(np.sum(ref.astype(np.float64) ** 2))
                noise[name] += float(np.sum(diff**2))
                worst[name] = max(worst[name], float(np.abs(diff).max(initial=0)))
            ref_top, sim_top = reference[0].argmax(axis=-1), simulated[0].argmax(axis=-1)
            agree += int((ref_top == sim_top).sum())
            if labels is not None:
                truth = labels[start : start + batch_size]
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


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", metavar="CHIP", help="Target chip, for files that do not record it (ESP-DL 3.0.x).")
@click.option("--self-test", is_flag=True, help="Run the file's embedded test inputs and compare with its outputs.")
@click.option(
    "--input",
    "input_paths",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Quantized input(s): NAME=file.npy, or file.npy for a single-input model.",
)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Save the outputs to this .npz file.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable result.")
@click.pass_context
def run(
    ctx: click.Context,
    model: Path,
    target: str | None,
    self_test: bool,
    input_paths: tuple[Path, ...],
    output: Path | None,
    as_json: bool,
) -> None:
    """Simulate an ESP-DL .espdl model: the integers the chip computes, from the file alone.

    \b
    Examples:
      espquant run model.espdl --self-test
      espquant run old_model.espdl --target esp32p4 --self-test --json
      espquant run model.espdl --input x.npy -o outputs.npz
    """
    from espquant.simulator.espdl_model import compare_output, load_espdl

    loaded = load_espdl(model, target)
    if self_test:
        values = loaded.test_values
        if values is None:
            raise OptionError(f"{model}: the file embeds no test values; give --input instead.")
        inputs, expected = values
        got = loaded.run(inputs, keep=True)
        rows = []
        for name, want in expected.items():
            equal, detail = compare_output(got[name], want)
            rows.append({"output": name, "equal": equal, "detail": detail})
        if as_json:
            click.echo(json.dumps({"model": str(model), "target": loaded.profile.name, "outputs": rows}, indent=2))
        else:
            table = Table(
                title=f"{model} on {loaded.profile.name}: simulation vs embedded outputs", title_justify="left"
            )
            for column in ("output", "equal", "detail"):
                table.add_column(column)
            for row in rows:
                table.add_row(row["output"], "[green]yes[/]" if row["equal"] else "[bold red]no[/]", row["detail"])
            out.print(table)
        if not all(row["equal"] for row in rows):
            ctx.exit(1)
        return
    if not input_paths:
        raise OptionError("give --input NAME=file.npy (or --self-test).")
    feeds = {}
    names = [v.name for v in loaded.inputs]
    for text in input_paths:
        name, _, file = str(text).rpartition("=")
        if not name:
            if len(names) != 1:
                raise OptionError(f"the model has inputs {names}: use --input NAME=file.npy.")
            name = names[0]
        feeds[name] = np.load(file, allow_pickle=False)
    results = loaded.run(feeds)
    if output is not None:
        import io

        from espquant.model_io import atomic_write_bytes

        buffer = io.BytesIO()
        np.savez(buffer, **results)
        atomic_write_bytes(output, buffer.getvalue())
    if as_json:
        click.echo(json.dumps({name: value.tolist() for name, value in results.items()}))
    else:
        for name, value in results.items():
            declared = next(v for v in loaded.outputs if v.name == name)
            out.print(f"{name}: {value.dtype} {list(value.shape)}, exponent {declared.exponent}")
            out.print(np.array2string(value, threshold=64))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the decoded file as JSON.")
def inspect(model: Path, as_json: bool) -> None:
    """Show what an ESP-DL .espdl file holds: nodes, exponents, constants and test values.

    Reads both containers (EDL2, and the EDL1 of ESP-DL 3.0.x).

    \b
    Examples:
      espquant inspect model.espdl
      espquant inspect model.espdl --json
    """
    from espquant.export import read_espdl

    decoded = read_espdl(model)
    if as_json:
        click.echo(json.dumps(_espdl_summary(decoded), indent=2))
        return
    out.print(
        f"[bold]{model}[/]: {decoded.container}, target {decoded.target or 'not recorded'}, "
        f"ir_version {decoded.ir_version}, graph {decoded.graph_name!r}"
    )
    nodes = Table(title=f"{len(decoded.nodes)} node(s)", title_justify="left")
    for column in ("node", "op", "quant", "inputs -> outputs", "attributes"):
        nodes.add_column(column, overflow="fold")
    for node in decoded.nodes:
        attrs = ", ".join(f"{k}={v}" for k, v in node.attributes.items() if k != "quant_type")
        nodes.add_row(
            node.name, node.op_type, node.quant_type, f"{', '.join(node.inputs)} -> {', '.join(node.outputs)}", attrs
        )
    out.print(nodes)
    tensors = Table(title="variables and constants", title_justify="left")
    for column in ("name", "kind", "dtype", "shape", "exponent(s)"):
        tensors.add_column(column, overflow="fold")
    for value in decoded.values.values():
        tensors.add_row(value.name, "variable", value.dtype, str(list(value.shape or [])), str(value.exponents))
    for tensor in decoded.initializers.values():
        layout = f" {tensor.doc}" if tensor.doc else ""
        tensors.add_row(tensor.name, f"constant{layout}", tensor.dtype, str(list(tensor.dims)), str(tensor.exponents))
    out.print(tensors)
    for label, values in (("test input", decoded.test_inputs), ("test output", decoded.test_outputs)):
        for tensor in values.values():
            out.print(
                f"{label} {tensor.name!r}: {tensor.dtype} {list(tensor.dims)}, exponent {tensor.exponent}, "
                f"values {np.array2string(tensor.data.reshape(-1)[:8], separator=' ')}"
                f"{' ...' if tensor.data.size > 8 else ''}"
            )


def _espdl_summary(decoded: Any) -> dict[str, Any]:
    def tensor(t: Any) -> dict[str, Any]:
        return {"name": t.name, "dtype": t.dtype, "dims": list(t.dims), "exponents": t.exponents, "doc": t.doc}

    return {
        "path": decoded.path,
        "container": decoded.container,
        "target": decoded.target,
        "ir_version": decoded.ir_version,
        "nodes": [
            {
                "name": n.name,
                "op_type": n.op_type,
                "inputs": n.inputs,
                "outputs": n.outputs,
                "attributes": {k: v for k, v in n.attributes.items() if not hasattr(v, "data")},
            }
            for n in decoded.nodes
        ],
        "values": [vars(v) for v in decoded.values.values()],
        "initializers": [tensor(t) for t in decoded.initializers.values()],
        "test_inputs": [tensor(t) for t in decoded.test_inputs.values()],
        "test_outputs": [tensor(t) for t in decoded.test_outputs.values()],
    }


@main.command()
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("espquant-demo"),
    show_default=True,
    help="Folder for the demo's output files (created if missing).",
)
def demo(workdir: Path) -> None:
    """Run espquant on the bundled MNIST CNN and real digits.

    The demo model (Conv, BatchNormalization, Relu, MaxPool, a residual Add, a depthwise Conv, Flatten,
    Gemm) and 3,000 MNIST digits ship inside the package. The demo copies the model to WORKDIR,
    optimizes it and prints what each pass changed, checks that ESP-DL can run it on every target
    chip, calibrates it on 1,000 training digits (int8 and int16 tables), and measures on 2,000 test
    digits the accuracy of the float model and of the integer model each chip family computes.
    """
    import onnx

    from espquant.demo import demo_model_path, float_accuracy, load_demo_data
    from espquant.model_io import atomic_write_bytes
    from espquant.optimizer import optimize_file

    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / "demo_mnist_cnn.onnx"
    atomic_write_bytes(source, demo_model_path().read_bytes())
    out.print(f"[bold]espquant demo[/]: MNIST CNN ({source.stat().st_size / 1024:.0f} KiB) -> {workdir}/")
    path, report = optimize_file(source)
    print_report(report, path, title="1. optimize: what each pass changed")
    reports = support_matrix(onnx.load(path))
    print_support_matrix(reports, f"2. check: can ESP-DL run {Path(path).name}?")
    data = load_demo_data()
    from espquant.calibration import Calibrator
    from espquant.simulator import Evaluator

    optimized = onnx.load(path)
    calibration = Calibrator("int8", "per-tensor", "minmax").calibrate(optimized, data.calib_inputs)
    table_path, _ = calibration.table.save(workdir / "demo_mnist_cnn_calib_int8.pickle")
    out.print(f"3. calibrate: {len(data.calib_images)} MNIST training digits, int8 per-tensor min-max")
    print_calibration(calibration)
    out.print(f"wrote [bold]{table_path}[/]")
    int16 = Calibrator("int16", "per-tensor", "minmax").calibrate(optimized, data.calib_inputs)
    int16_path, _ = int16.table.save(workdir / "demo_mnist_cnn_calib_int16.pickle")
    out.print(f"   and the int16 table: [bold]{int16_path}[/]")
    before = float_accuracy(source.read_bytes(), data.test_inputs, data.test_labels)
    after = float_accuracy(Path(path).read_bytes(), data.test_inputs, data.test_labels)
    table = Table(
        title=f"4. evaluate: top-1 accuracy on {len(data.test_labels)} MNIST test digits", title_justify="left"
    )
    table.add_column("model")
    table.add_column("arithmetic")
    table.add_column("top-1", justify="right")
    table.add_row(source.name, "float32 (onnxruntime)", f"{before:.2f}%")
    table.add_row(Path(path).name, "float32 (onnxruntime)", f"{after:.2f}%")
    for bits, table_file in (("int8", table_path), ("int16", int16_path)):
        for target in ("esp32s3", "esp32p4", "esp32c3"):
            evaluator = Evaluator(bits, "per-tensor", target)
            evaluator.generate_quantized_model(optimized, table_file)
            logits = evaluator.evaluate_quantized_model(data.test_inputs)[0][0]
            accuracy = 100.0 * float((logits.argmax(axis=1) == data.test_labels).mean())
            table.add_row(Path(path).name, f"{bits} on {target} (simulated)", f"{accuracy:.2f}%")
    out.print(table)
    if abs(before - after) > 1e-9:
        raise EspquantError(f"the optimized demo model's accuracy changed ({before:.2f}% -> {after:.2f}%)")


if __name__ == "__main__":  # pragma: no cover
    main()
