"""``espquant export``: the quantized model in a form something else can load (the chip, Netron, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from espquant.cli.app import force_option, main, out, table_files, table_option
from espquant.cli.calibrate import load_array_data
from espquant.errors import OptionError

FORMATS = ("espdl", "qdq", "cpp")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@table_option
@click.option("--target", default="esp32s3", show_default=True, metavar="CHIP", help="The chip to export for.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="espdl",
    show_default=True,
    help="espdl: ESP-DL v3 model file for the chip. qdq: the float ONNX model with QuantizeLinear / "
    "DequantizeLinear pairs at the table's power-of-two scales (for Netron and onnxruntime). cpp: coefficient "
    "files for the legacy ESP-DL library (esp32, esp32s2, esp32c3, esp32s3); -o is then a folder.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output file [default: <model>_<target>.espdl, <model>_qdq.onnx; cpp: a folder, default the model's]. "
    "Existing files are replaced only with --force; the model, table and test input never.",
)
@click.option(
    "--test-input",
    "test_input",
    type=click.Path(path_type=Path),
    help="Float inputs (.npy / .npz). espdl: the first sample and the simulated outputs become the file's test "
    "values [default: fixed pseudo-random integers]. qdq: the data the agreement with the simulator is measured on. "
    "cpp: the data the legacy library's simulated outputs are compared with the float model on (next to v3's).",
)
@click.option(
    "--library-version",
    "library_version",
    type=click.Choice(("1.1", "2.0")),  # export/cpp/versions.py's table, literal: the exporter is imported lazily
    default="1.1",
    show_default=True,
    help="cpp only: the legacy ESP-DL release the C++ must compile against (1.1: esp-dl v1.1.0 / a95b00ea, the "
    "legacy toolkit's own; 2.0: the class names Relu / LeakyRelu / PRelu). v1.1 cannot build Sub, Mul, LeakyRelu "
    "and PRelu.",
)
@force_option
def export(
    model: Path,
    table_path: Path,
    target: str,
    fmt: str,
    output: Path | None,
    test_input: Path | None,
    library_version: str,
    force: bool,
) -> None:
    """Write the quantized model: an .espdl file ESP-DL v3 loads directly, or a QDQ ONNX model.

    The weights are laid out for the target (blocked SIMD lanes on ESP32-S3 / -P4, plain on the C chips),
    activations NHWC around convolutions, with every exponent, the int8 look-up tables and one test input
    whose outputs espquant simulates: ESP-DL's model test on the device compares against them. Before
    writing, the file's own contents are simulated and must reproduce those outputs bit for bit.

    The QDQ model runs in onnxruntime and opens in Netron; onnxruntime rounds and accumulates differently
    from the chip, so with --test-input the agreement with the simulator is printed.

    \b
    Examples:
      espquant export mnist_optimized.onnx --table mnist_calib.pickle --target esp32s3 -o mnist_s3.espdl
      espquant export net.onnx --table t.pickle --target esp32p4 --test-input sample.npy --force
      espquant run mnist_s3.espdl --self-test      # re-load it and check the embedded outputs
      espquant export net.onnx --table t.pickle --format qdq --target esp32p4 --test-input x.npy
      espquant export net.onnx --table t.pickle --format cpp --target esp32s3 -o main/model/
      espquant export net.onnx --table t.pickle --format cpp --library-version 2.0 -o main/model/
    """
    from espquant.api import Evaluator
    from espquant.export.cpp import cpp_file_paths, legacy_target
    from espquant.files import guard_outputs
    from espquant.model_io import load_model
    from espquant.quant import get_target
    from espquant.table import QuantTable

    inputs = [model, *table_files(table_path), test_input]
    legacy_target(target) if fmt == "cpp" else get_target(target)  # an unknown chip is the first thing to say
    if fmt == "cpp":
        folder = output or model.parent
        if folder.exists() and not folder.is_dir():
            raise OptionError(f"{folder}: --format cpp writes three files; give a folder with -o.")
        guard_outputs(cpp_file_paths(folder, f"{model.stem}_coefficient"), inputs, force)
    else:
        default = f"{model.stem}_{target}.espdl" if fmt == "espdl" else f"{model.stem}_qdq.onnx"
        destination = output or model.with_name(default)
        guard_outputs([destination], inputs, force)
    proto = load_model(model)
    table = QuantTable.load(table_path)
    samples = load_array_data(test_input) if test_input is not None else None
    if fmt == "cpp":
        _export_cpp(proto, table, model, target, folder, library_version)
        if samples is not None:
            _print_legacy_accuracy(proto, table, target, samples)
        return
    if fmt == "qdq":
        _export_qdq(proto, table, destination, target, samples)
        return
    bits = f"int{table.metadata.get('bits', 8)}"
    evaluator = Evaluator(bits, table.metadata.get("granularity"), target)
    evaluator.generate_quantized_model(proto, table)
    written = evaluator.export_espdl(destination, test_inputs=samples, force=force)
    out.print(f"wrote {written} ({written.stat().st_size:,} bytes, {evaluator.target.name}, {bits})")


def _export_qdq(proto: Any, table: Any, destination: Path, target: str, samples: Any) -> None:
    """Measure the agreement first (a bad test input fails before anything is written), then write."""
    from rich.table import Table

    from espquant.export.qdq import qdq_agreement, save_qdq

    agreement = qdq_agreement(proto, table, target, samples) if samples is not None else None
    written = save_qdq(proto, table, destination, force=True)
    out.print(f"wrote {written} ({written.stat().st_size:,} bytes, QDQ, int{table.metadata.get('bits', 8)})")
    if agreement is None:
        return
    report = Table(title=f"onnxruntime on the QDQ model vs the simulated {target}", title_justify="left")
    for column in ("output", "equal values", "max |difference|", "same top-1"):
        report.add_column(column, justify="left" if column == "output" else "right")
    for name, row in agreement.items():
        top1 = row.get("top1_agreement")
        report.add_row(
            name,
            f"{100 * row['equal_fraction']:.2f}%",
            f"{row['max_abs_diff']:.4g}",
            "-" if top1 is None else f"{100 * top1:.2f}%",
        )
    out.print(report)


def _export_cpp(proto: Any, table: Any, model: Path, target: str, folder: Path, library_version: str = "1.1") -> None:
    from espquant.export.cpp import export_coefficient_to_cpp

    written = export_coefficient_to_cpp(
        proto, table, target, folder, f"{model.stem}_coefficient", True, library_version=library_version
    )
    for path in written:
        out.print(f"wrote {path}")


def _print_legacy_accuracy(proto: Any, table: Any, target: str, samples: Any) -> None:
    """With --test-input: the first output's top-1 agreement with the float model and SQNR, simulated on ESP-DL
    v3 and on the legacy library the C++ files are for (docs/LEGACY_ARITHMETIC.md), side by side."""
    import numpy as np
    from rich.table import Table

    from espquant.api import Evaluator
    from espquant.calibration.dataset import Chunking
    from espquant.errors import UnsupportedModelError
    from espquant.runtime import create_session

    session = create_session(proto)
    feeds = samples if isinstance(samples, dict) else {session.get_inputs()[0].name: samples}
    feeds = {k: np.asarray(v, dtype=np.float32) for k, v in feeds.items()}
    reference = np.asarray(Chunking.of(proto).run(lambda f: session.run(None, f), feeds)[0], dtype=np.float64)
    bits = f"int{table.metadata.get('bits', 8)}"
    report = Table(title=f"first output vs the float model ({len(reference)} samples)", title_justify="left")
    for column in ("runtime simulated", "same top-1", "SQNR"):
        report.add_column(column, justify="left" if column == "runtime simulated" else "right")
    for library, label in (("v3", f"ESP-DL v3 on {target}"), ("legacy", f"legacy ESP-DL (C++ files) on {target}")):
        evaluator = Evaluator(bits, table.metadata.get("granularity"), target, library=library)
        try:
            evaluator.generate_quantized_model(proto, table)
        except UnsupportedModelError as exc:
            report.add_row(label, "-", "-")
            out.print(f"[yellow]no legacy simulation:[/yellow] {exc}")
            continue
        simulated = np.asarray(evaluator.evaluate_quantized_model(feeds, to_float=True)[0][0], dtype=np.float64)
        noise = float(np.sum((simulated - reference) ** 2))
        sqnr = 10 * np.log10(float(np.sum(reference**2)) / noise) if noise else float("inf")
        top1 = "-"
        if reference.ndim == 2 and reference.shape[1] > 1:
            top1 = f"{100 * float(np.mean(reference.argmax(axis=1) == simulated.argmax(axis=1))):.2f}%"
        report.add_row(label, top1, f"{sqnr:.1f} dB")
    out.print(report)
