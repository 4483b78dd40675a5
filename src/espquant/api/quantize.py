"""``espquant.quantize``: the whole chain in one call, as ESP-PPQ's ``espdl_quantize_onnx`` is one call.

optimize -> check (every problem listed before any work) -> calibrate -> evaluate on held-out data -> export ->
re-load the file and self-test it. Each step is the code the separate commands run (the optimizer, the checker,
the calibration engine, :func:`espquant.api.measure.measure`, the exporters, the ``.espdl`` loader), so the
numbers equal those of the manual chain with the same settings. Argument names follow ESP-PPQ where they mean
the same thing (``calib_steps``, ``input_shape``, ``target``, ``num_of_bits``, ``export_test_values``,
``espdl_export_file``, ``calib_dataloader``), so a migration is a rename.

Intermediate files (the optimized model and the table) are written beside the output, or into ``workdir``,
under the same rules as every output (:mod:`espquant.files`): checked before any work, never over an input,
an existing one only with ``force``.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from espquant.api.calibrator import Calibrator
from espquant.api.evaluator import Evaluator
from espquant.api.measure import Measurement, measure
from espquant.calibration import engine
from espquant.calibration.dataset import Chunking, InputSpec
from espquant.calibration.sources import ArraySource, DataSource, open_data
from espquant.checker import check_model, parse_bits
from espquant.errors import ModelError, OptionError, UnsupportedModelError
from espquant.files import guard_outputs
from espquant.graph import tensor_shape
from espquant.model_io import load_model, save_model
from espquant.optimizer import fix_input_shapes
from espquant.optimizer.core import optimize_model_with_report
from espquant.progress import progress_bar
from espquant.table import table_paths

__all__ = ["quantize", "QuantizeResult", "FORMATS", "default_method", "self_test"]

logger = logging.getLogger(__name__)

FORMATS = ("espdl", "qdq", "cpp")
EVAL_FRACTION = 0.2  # the last 20% of --data is held out for evaluation when no eval data is given
EVAL_BATCH = 64  # `espquant evaluate --batch-size`'s default
REPORT_SAMPLES = 32  # samples the worst-layer analysis runs on (it simulates every layer twice)


def default_method() -> str:
    """The calibration engine's own default method (never hard-coded here: the engine decides)."""
    declared = getattr(engine, "DEFAULT_METHOD", None)
    if isinstance(declared, str):
        return declared
    return str(inspect.signature(engine.calibrate_model).parameters["method"].default)


@dataclass
class QuantizeResult:
    """Everything ``quantize`` did and measured; :meth:`to_dict` is the ``--json`` document."""

    output: Path
    written: list[Path]
    optimized_model: Path
    table: Path
    target: str
    bits: int
    format: str
    method: str
    calibration_samples: int
    evaluation: Measurement
    evaluated_on: str
    file_bytes: int
    fused: list[str]
    fallbacks: list[str]
    worst_layers: list[dict[str, Any]]
    self_test: list[dict[str, Any]] = field(default_factory=list)
    qdq_agreement: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    model_transforms: list[str] = field(default_factory=list)  # what calibration changed in the float weights
    equalized_pairs: int = 0  # Conv pairs that auto's cross-layer equalization rescaled (factors in the table)

    def to_dict(self) -> dict[str, Any]:
        evaluation = self.evaluation.to_dict()
        evaluation["outputs"] = [  # JSON has no infinity (an output the chip reproduces exactly)
            {**row, "sqnr_db": row["sqnr_db"] if np.isfinite(row["sqnr_db"]) else None} for row in evaluation["outputs"]
        ]
        return {
            "output": str(self.output),
            "written": [str(p) for p in self.written],
            "optimized_model": str(self.optimized_model),
            "table": str(self.table),
            "target": self.target,
            "bits": self.bits,
            "format": self.format,
            "method": self.method,
            "calibration_samples": self.calibration_samples,
            "evaluated_on": self.evaluated_on,
            "evaluation": evaluation,
            "file_bytes": self.file_bytes,
            "optimizer_fused": self.fused,
            "int8_fallback": self.fallbacks,
            "worst_layers": self.worst_layers,
            "self_test": self.self_test,
            "self_test_passed": all(row["equal"] for row in self.self_test) if self.self_test else None,
            "qdq_agreement": self.qdq_agreement,
            "warnings": self.warnings,
            "model_transforms": self.model_transforms,
            "equalized_pairs": self.equalized_pairs,
        }


def _shapes(input_shape: Any, inputs: list[str]) -> dict[str, list[int | str]]:
    """ESP-PPQ's ``input_shape`` (one shape, a list of shapes in input order) or a dict name -> shape."""
    if input_shape is None:
        return {}
    if isinstance(input_shape, Mapping):
        return {str(k): list(v) for k, v in input_shape.items()}
    shapes = list(input_shape)
    if shapes and all(isinstance(d, (int, str)) for d in shapes):
        shapes = [shapes]
    if len(shapes) > len(inputs):
        raise OptionError(f"input_shape: {len(shapes)} shapes for the model's {len(inputs)} input(s) {inputs}.")
    return {name: list(shape) for name, shape in zip(inputs, shapes)}


def _data_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {t.name for t in model.graph.initializer}
    return [
        InputSpec(i.name, tuple(d if isinstance(d, int) else None for d in (tensor_shape(i) or [])))
        for i in model.graph.input
        if i.name not in initializers
    ]


def _limited(data: object, steps: int | None, batch_size: int) -> object:
    """The first ``calib_steps`` batches of the calibration data (all of it for None)."""
    if steps is None:
        return data
    if isinstance(data, (np.ndarray, Mapping)):
        count = steps * batch_size
        return {k: v[:count] for k, v in data.items()} if isinstance(data, Mapping) else data[:count]
    return islice(data, steps)  # type: ignore[call-overload]


def _paths(
    model: Any, output: Any, target: str, fmt: str, bits: int, workdir: Any
) -> tuple[Path, Path, Path, list[Path]]:
    """(output, optimized model, table, every file written): chosen before any work so all can be guarded."""
    if output is None:
        if not isinstance(model, (str, os.PathLike)):
            raise OptionError("espdl_export_file: give the output path (the model was given in memory).")
        source = Path(model)
        suffix = {"espdl": f"_{target}.espdl", "qdq": f"_{target}_qdq.onnx", "cpp": ""}[fmt]
        output = source.parent if fmt == "cpp" else source.with_name(f"{source.stem}{suffix}")
    output = Path(output)
    if fmt == "cpp":
        if output.exists() and not output.is_dir():
            raise OptionError(f"{output}: format 'cpp' writes three files; give a folder.")
        stem = f"{Path(model).stem if isinstance(model, (str, os.PathLike)) else 'model'}_{target}_int{bits}"
        folder = Path(workdir) if workdir is not None else output
    else:
        stem = output.stem
        folder = Path(workdir) if workdir is not None else (output.parent if str(output.parent) else Path("."))
    optimized = folder / f"{stem}_optimized.onnx"
    table = folder / f"{stem}_calib.pickle"
    written = [*table_paths(table), optimized]
    if fmt == "cpp":
        from espquant.export.cpp import cpp_file_paths

        written += list(cpp_file_paths(output, f"{stem}_coefficient"))
    else:
        written.append(output)
    return output, optimized, table, written


def self_test(path: Path, target: str | None = None) -> list[dict[str, Any]]:
    """What ``espquant run --self-test`` does: the content digest, then the embedded test inputs re-simulated
    from the file alone and compared with the embedded outputs (one row per output)."""
    from espquant.espdl import verify_digest
    from espquant.simulator.espdl_model import compare_output, load_espdl

    loaded = load_espdl(path, target)
    if verify_digest(loaded.file) is False:
        raise ModelError(f"{path}: the contents do not match the digest stored at export: the file is damaged.")
    values = loaded.test_values
    if values is None:
        raise ModelError(f"{path}: the exported file embeds no test values.")
    inputs, expected = values
    got = loaded.run(inputs, keep=True)
    rows = []
    for name, want in expected.items():
        equal, detail = compare_output(got[name], want)
        rows.append({"output": name, "equal": equal, "detail": detail})
    return rows


def _fused(report: Any) -> list[str]:
    """The optimizer passes that changed something, as 'pass: what it did' lines."""
    return [f"{r.name}: {r.describe()}" for r in report.records if r.changes and r.details]


def quantize(
    model: str | os.PathLike[str] | onnx.ModelProto,
    calib_dataloader: object,
    espdl_export_file: str | os.PathLike[str] | None = None,
    *,
    calib_steps: int | None = None,
    input_shape: Any = None,
    target: str = "esp32s3",
    num_of_bits: int = 8,
    export_test_values: bool = True,
    eval_data: object = None,
    labels: Any = None,
    batch_size: int = 32,
    granularity: str = "per-tensor",
    method: str | None = None,
    format: str = "espdl",  # noqa: A002 - the CLI's --format
    preprocess: str | None = None,
    workdir: str | os.PathLike[str] | None = None,
    strict: bool = False,
    force: bool = False,
    progress: bool | None = None,
    on_step: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Quantize a float ONNX model for an ESP-DL chip, evaluate it, export it, and self-test the file.

    Args:
        model: an ``.onnx`` path or an ``onnx.ModelProto`` (not modified).
        calib_dataloader: calibration data in any form :func:`espquant.calibration.sources.open_data` takes
            (a .npy / .npz path, a folder of images or .npy files, an array, a dict, an iterable of batches, a
            torch DataLoader). Without ``eval_data`` its last 20% (at least one sample) is held out and used
            for evaluation only.
        espdl_export_file: the output (a folder for ``format="cpp"``); default ``<model>_<target>.espdl`` beside
            the model.
        calib_steps: use at most this many calibration batches (of ``batch_size`` samples).
        input_shape: pin dynamic input shapes: one shape (``[1, 3, 96, 96]``), a list per input, or a dict.
        target: the chip (``esp32s3``, ``esp32p4``, ``esp32c3`` ...).
        num_of_bits: 8 or 16.
        export_test_values: embed the first evaluation sample and its simulated outputs as the file's test
            values; False embeds fixed pseudo-random inputs instead (an espquant file always carries one test
            pair: ``run --self-test`` and ESP-DL's on-device model test use it).
        eval_data, labels: evaluate on this data (and with class labels: accuracy) instead of the held-out part;
            ``labels`` alone label ``calib_dataloader`` sample by sample (the held-out part uses its share).
        method: calibration method; None takes the calibration engine's default.
        format: ``"espdl"``, ``"qdq"`` or ``"cpp"`` (the exporters of ``espquant export``).
        preprocess: for a folder of images, the ``--preprocess`` spec.
        workdir: where the optimized model and the table go (default: beside the output).
        strict: int16: refuse ops without an int16 kernel instead of running them at int8.
        force: replace outputs that exist (inputs are never replaced).
        progress: progress bars on stderr (default: when stderr is a terminal).
        on_step: called with the name of each step as it starts.

    Raises:
        UnsupportedModelError: the model cannot run on the target (every problem listed; nothing is calibrated).
        DatasetError, OptionError, OutputError, QuantTableError: as the separate commands raise them.
    """
    if format not in FORMATS:
        raise OptionError(f"format {format!r}: use one of {', '.join(FORMATS)}.")
    bits = parse_bits(num_of_bits)
    chosen_method = method or default_method()
    engine.validate_method(bits, granularity, chosen_method)
    if calib_steps is not None and calib_steps < 1:
        raise OptionError(f"calib_steps {calib_steps}: give at least 1 batch.")
    if format == "cpp":
        from espquant.export.cpp import legacy_target

        legacy_target(target)
    else:
        from espquant.quant import get_target

        get_target(target)
    step = (lambda name: on_step(name)) if on_step is not None else (lambda name: None)
    show = progress

    def bar(label: str, total: int | None) -> AbstractContextManager[Callable[[int], None]]:
        return progress_bar(label, total, enabled=show) if show is not False else nullcontext(lambda n: None)

    output, optimized_path, table_path, written = _paths(model, espdl_export_file, target, format, bits, workdir)
    inputs = [p for p in (model, calib_dataloader, eval_data, labels) if isinstance(p, (str, os.PathLike))]
    guard_outputs(written, inputs, force)

    step("optimize")
    proto = load_model(model) if isinstance(model, (str, os.PathLike)) else model
    if not isinstance(proto, onnx.ModelProto):
        raise ModelError(f"model of type {type(model).__name__}: give an .onnx path or an onnx.ModelProto.")
    shapes = _shapes(input_shape, [i.name for i in _data_inputs(proto)])
    if shapes:
        proto = fix_input_shapes(proto, shapes)
    optimized, report = optimize_model_with_report(proto)

    step("check")
    checked = check_model(optimized, target=target, bits=bits, strict=False, fallback=not strict)
    if not checked.ok:
        subject = str(model) if isinstance(model, (str, os.PathLike)) else "the model"
        raise UnsupportedModelError(checked.message(f"{subject} (optimized)"))

    step("data")
    specs = _data_inputs(optimized)
    chunking = Chunking.of(optimized)
    run_size = chunking.step(batch_size)
    source = open_data(calib_dataloader, specs, preprocess=preprocess, batch_size=run_size, what="--data")
    label_array = _labels(labels)
    warnings: list[str] = []
    if eval_data is not None:
        calibration: DataSource = source
        evaluation = open_data(eval_data, specs, preprocess=preprocess, batch_size=run_size, what="--eval-data")
        if label_array is not None:
            evaluation = evaluation.with_labels(label_array)
        evaluated_on = evaluation.label
    else:
        if label_array is not None:
            source = source.with_labels(label_array)
        calibration, evaluation = source.split(EVAL_FRACTION, chunking.fixed or 1)
        if calibration is evaluation:
            warnings.append(f"{source.label}: too few samples to hold any out; evaluated on the calibration data")
        evaluated_on = evaluation.label
    if hasattr(evaluation, "batch_size"):  # the slices `espquant evaluate` runs: equal sums, equal numbers
        evaluation.batch_size = chunking.step(EVAL_BATCH)
    if source.samples is not None:
        chunking.check_total(source.samples, source.label)

    step("calibrate")
    calibrator = Calibrator(f"int{bits}", granularity, chosen_method, strict=strict)
    calib_data = calibration.calibration_data()
    calib_input = _limited(calib_data, calib_steps, run_size)
    calib_total = calibration.samples if calib_steps is None or calibration.samples is None else None
    if isinstance(calibration, ArraySource) and calib_steps is not None:
        calib_total = min(calibration.samples, calib_steps * run_size)
    with bar("calibrating", calib_total) as advance:
        result = calibrator.calibrate(optimized, calib_input, batch_size, on_batch=advance)
    if not evaluation.ready:  # a generator's held-out end: read the rest of the stream (calib_steps stopped early)
        _drain(calib_data)
    # Calibration may change the float weights (cross-layer equalization, bias correction): the table is then
    # for that model, and it is what is kept, evaluated and exported (as `calibrate` writes <table>_model.onnx).
    transforms = list(getattr(result, "transforms", None) or [])
    calibrated = result.model if transforms and getattr(result, "model", None) is not None else optimized
    if transforms:
        result.table.metadata["calibrated_model"] = optimized_path.name
    save_model(calibrated, optimized_path)
    result.table.save(table_path)

    step("evaluate")
    with bar("evaluating", evaluation.samples) as advance:
        measured = measure(
            calibrated,
            result.table,
            evaluation.batches(),
            target,
            batch_size=EVAL_BATCH,
            labels_given=evaluation.labels is not None,
            labels_source=str(labels) if isinstance(labels, (str, os.PathLike)) else "(given as an array)",
            what=evaluation.label,
            on_batch=advance,
            keep=REPORT_SAMPLES,
        )
    worst = _worst_layers(calibrated, result.table, measured.kept, target)

    step("export")
    sample = measured.kept if export_test_values else None
    agreement = None
    if format == "espdl":
        evaluator = Evaluator(f"int{bits}", result.table.metadata.get("granularity"), target)
        evaluator.generate_quantized_model(calibrated, result.table)
        evaluator.export_espdl(output, test_inputs=sample, force=True)  # guarded above
        files = [output]
    elif format == "qdq":
        from espquant.export.qdq import qdq_agreement, save_qdq

        agreement = qdq_agreement(calibrated, result.table, target, measured.kept)
        save_qdq(calibrated, result.table, output, force=True)
        files = [output]
    else:
        from espquant.export.cpp import export_coefficient_to_cpp

        files = export_coefficient_to_cpp(calibrated, result.table, target, output, _cpp_name(written))

    step("self-test")
    rows = self_test(output, target) if format == "espdl" else []
    if rows and not all(row["equal"] for row in rows):
        bad = ", ".join(f"{r['output']} ({r['detail']})" for r in rows if not r["equal"])
        raise ModelError(f"{output}: the re-loaded file does not reproduce its embedded outputs: {bad}.")
    return QuantizeResult(
        output=output,
        written=[table_path, table_path.with_suffix(".json"), optimized_path, *files],
        optimized_model=optimized_path,
        table=table_path,
        target=measured.target,
        bits=bits,
        format=format,
        method=chosen_method,
        calibration_samples=result.samples,
        evaluation=measured,
        evaluated_on=evaluated_on,
        file_bytes=sum(Path(f).stat().st_size for f in files),
        fused=_fused(report),
        fallbacks=[str(f) for f in result.fallbacks],
        worst_layers=worst,
        self_test=rows,
        qdq_agreement=agreement,
        warnings=warnings + list(report.warnings),
        model_transforms=transforms,
        equalized_pairs=result.equalized_pairs,
    )


def _cpp_name(written: Sequence[Path]) -> str:
    """The base name of the C++ files among ``written`` (``<name>.cpp``)."""
    return next(p.stem for p in written if p.suffix == ".cpp")


def _drain(data: object) -> None:
    """Read a one-shot calibration stream to its end, so the batches it held back for evaluation are complete."""
    if isinstance(data, Iterator):
        for _ in data:
            pass


def _labels(labels: Any) -> np.ndarray | None:
    if labels is None:
        return None
    if isinstance(labels, (str, os.PathLike)):
        from espquant.arrays import load_arrays

        loaded = load_arrays(labels, "--labels")
        if isinstance(loaded, dict):
            raise OptionError(f"--labels {labels}: an archive of {len(loaded)} arrays; give one array.")
        labels = loaded
    array = np.asarray(labels)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1 or (array.dtype.kind not in "iu" and not np.all(np.mod(array, 1) == 0)):
        raise OptionError("labels: give one integer class index per sample (N,).")
    return array.astype(np.int64)


def _worst_layers(model: onnx.ModelProto, table: Any, samples: dict[str, np.ndarray], target: str) -> list[dict]:
    """The 3 layers that add the most error on their own (``espquant report`` has the full list)."""
    if not samples:
        return []
    from espquant.report import analyze

    analysis = analyze(model, table, samples, target)
    return [
        {
            "tensor": layer.tensor,
            "node": layer.node,
            "op_type": layer.op_type,
            "added_sqnr_db": layer.added_sqnr_db if np.isfinite(layer.added_sqnr_db) else None,
            "sqnr_db": layer.sqnr_db if np.isfinite(layer.sqnr_db) else None,
            "clipped_fraction": layer.clipped_fraction,
        }
        for layer in analysis.worst(3)
    ]
