"""``espquant demo``: the whole pipeline on the bundled MNIST model and digits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from espquant.cli.app import force_option, main, out
from espquant.cli.calibrate import print_calibration
from espquant.cli.check import print_support_matrix, support_matrix
from espquant.cli.optimize import print_report
from espquant.errors import EspquantError

DEMO_TARGETS = ("esp32s3", "esp32p4", "esp32c3")
# Written into a folder the demo made, so a second run may replace the demo's own files without --force.
_MARKER = ".espquant-demo"


def demo_files(workdir: Path) -> list[Path]:
    """Every file the demo writes into ``workdir``."""
    names = ["demo_mnist_cnn.onnx", "demo_mnist_cnn_optimized.onnx"]
    for bits in ("int8", "int16"):
        names += [f"demo_mnist_cnn_calib_{bits}.pickle", f"demo_mnist_cnn_calib_{bits}.json"]
    names += [f"demo_mnist_cnn_{target}.espdl" for target in DEMO_TARGETS]
    return [workdir / name for name in names]


def _prepare_workdir(workdir: Path, force: bool) -> None:
    """Create the folder, or reuse one an earlier demo made; other people's files need --force."""
    from espquant.errors import OutputError
    from espquant.files import guard_outputs

    if workdir.exists() and not workdir.is_dir():
        raise OutputError(f"{workdir}: is a file; --workdir names a folder for the demo's files.")
    guard_outputs(demo_files(workdir), [], force or (workdir / _MARKER).is_file())
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / _MARKER).touch()
    except OSError as exc:
        raise OutputError(f"{workdir}: cannot write the demo's files there ({exc.strerror or exc}).") from exc


@main.command()
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("espquant-demo"),
    show_default=True,
    help="Folder for the demo's output files (created if missing; the demo's own files are replaced on a re-run).",
)
@force_option
def demo(workdir: Path, force: bool) -> None:
    """Run espquant on the bundled MNIST CNN and real digits.

    The demo model (Conv, BatchNormalization, Relu, MaxPool, a residual Add, a depthwise Conv, Flatten,
    Gemm) and 3,000 MNIST digits ship inside the package. The demo copies the model to WORKDIR,
    optimizes it and prints what each pass changed, checks that ESP-DL can run it on every target
    chip, calibrates it on 1,000 training digits (int8 and int16 tables), and measures on 2,000 test
    digits the accuracy of the float model and of the integer model each chip family computes.
    """
    import onnx

    from espquant.demo import demo_model_path, float_accuracy, load_demo_data
    from espquant.files import atomic_write_bytes
    from espquant.optimizer import optimize_file

    _prepare_workdir(workdir, force)
    source = workdir / "demo_mnist_cnn.onnx"
    atomic_write_bytes(source, demo_model_path().read_bytes())
    out.print(f"[bold]espquant demo[/]: MNIST CNN ({source.stat().st_size / 1024:.0f} KiB) -> {workdir}/")
    path, report = optimize_file(source)
    print_report(report, path, title="1. optimize: what each pass changed")
    reports = support_matrix(onnx.load(path))
    print_support_matrix(reports, f"2. check: can ESP-DL run {Path(path).name}?")
    data = load_demo_data()
    from espquant.api import Calibrator, Evaluator

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
        for target in DEMO_TARGETS:
            evaluator = Evaluator(bits, "per-tensor", target)
            evaluator.generate_quantized_model(optimized, table_file)
            logits = evaluator.evaluate_quantized_model(data.test_inputs)[0][0]
            accuracy = 100.0 * float((logits.argmax(axis=1) == data.test_labels).mean())
            table.add_row(Path(path).name, f"{bits} on {target} (simulated)", f"{accuracy:.2f}%")
    out.print(table)
    _export_step(optimized, table_path, data, workdir)
    if abs(before - after) > 1e-9:
        raise EspquantError(f"the optimized demo model's accuracy changed ({before:.2f}% -> {after:.2f}%)")


def _export_step(optimized: Any, table_path: Path, data: Any, workdir: Path) -> None:
    """5. export the int8 model for one chip of each family, re-load each file and simulate it from its
    own contents on every test digit: the integers must equal the in-memory model's."""
    import numpy as np

    from espquant.api import Evaluator
    from espquant.simulator.espdl_model import load_espdl

    table = Table(title="5. export: .espdl files, re-loaded and simulated", title_justify="left")
    for column in ("target", "file", "bytes", "outputs equal to the simulation", "top-1"):
        table.add_column(column, justify="left" if column in ("target", "file") else "right")
    for target in DEMO_TARGETS:
        evaluator = Evaluator("int8", "per-tensor", target)
        quantized = evaluator.generate_quantized_model(optimized, table_path)
        path = evaluator.export_espdl(workdir / f"demo_mnist_cnn_{target}.espdl", data.test_inputs, force=True)
        loaded = load_espdl(path)
        name = quantized.inputs[0]
        ints = quantized.quantize_input(name, data.test_inputs)
        expected = quantized.run({name: ints})[quantized.outputs[0]]
        output = loaded.outputs[0].name
        got = loaded.run({name: np.transpose(ints, loaded.onnx_layout(name))})[output]
        got = np.transpose(got, np.argsort(loaded.onnx_layout(output)))
        equal = int((got == expected).all(axis=tuple(range(1, got.ndim))).sum())
        accuracy = 100.0 * float((got.argmax(axis=1) == data.test_labels).mean())
        table.add_row(target, path.name, f"{path.stat().st_size:,}", f"{equal}/{len(got)}", f"{accuracy:.2f}%")
        if equal != len(got):
            raise EspquantError(f"{path}: the re-loaded file computes other integers than the in-memory model")
    out.print(table)
