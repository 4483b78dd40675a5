"""Float model vs simulated chip over a stream of batches: the numbers ``espquant evaluate`` prints.

One function so that ``evaluate`` and ``quantize`` cannot drift apart: the same data through both must give
the same accuracy, agreement and SQNR (the tests assert equal numbers). Batches stream: only running sums are
kept, plus, when asked, the first few samples for the layer report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from espquant.api.evaluator import Evaluator
from espquant.arrays import check_labels, classes_of
from espquant.calibration.dataset import Chunking, validated_feeds
from espquant.calibration.sources import Labelled, as_feeds
from espquant.errors import DatasetError
from espquant.runtime import create_session
from espquant.table import QuantTable

__all__ = ["Measurement", "measure"]


@dataclass
class Measurement:
    """What evaluating on some data found: per-output SQNR and max error, top-1 agreement, accuracies."""

    target: str
    library: str
    bits: int
    samples: int
    outputs: list[dict[str, Any]]
    top1_agreement: float | None = None
    float_accuracy: float | None = None
    quantized_accuracy: float | None = None
    kept: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # the first samples (keep=...)

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "target": self.target,
            "library": self.library,
            "bits": self.bits,
            "samples": self.samples,
            "top1_agreement": self.top1_agreement,
            "outputs": self.outputs,
        }
        if self.float_accuracy is not None:
            document["float_accuracy"] = self.float_accuracy
            document["quantized_accuracy"] = self.quantized_accuracy
        return document


def measure(
    model: onnx.ModelProto,
    table: QuantTable,
    batches: Iterable[Labelled],
    target: str,
    *,
    library: str = "v3",
    batch_size: int = 64,
    labels_given: bool = False,
    labels_source: str = "",
    what: str = "--data",
    on_batch: Callable[[int], None] | None = None,
    keep: int = 0,
) -> Measurement:
    """Run the float model (onnxruntime) and the simulated chip on every batch and compare the outputs.

    Args:
        batches: ``(inputs, labels or None)``; arrays larger than ``batch_size`` are sliced (a model with a fixed
            batch B runs B samples at a time).
        labels_given: labels were asked for: every batch must carry them (accuracy is then reported).
        labels_source: where the labels come from (a path), for messages ("--labels <it>: ...").
        keep: keep the first ``keep`` samples' inputs (for the layer report), rounded to whole runs.

    Raises:
        DatasetError: no samples, NaN / Inf, labels that do not fit the model's classes, a size the model's fixed
            batch does not divide.
    """
    evaluator = Evaluator(f"int{table.metadata.get('bits', 8)}", table.metadata.get("granularity"), target, library)
    evaluator.generate_quantized_model(model, table)
    # Its runs alternate with the simulator's: sleeping workers leave it the cores (runtime.create_session; PP-OCR's
    # int16 classifier, batch 8, default threads: 10.7-11.4 ms a sample measured with spinning ones, 6.3-8.4 without).
    session = create_session(model, evaluator.providers, spinning=False)
    names = [o.name for o in session.get_outputs()]
    input_names = [i.name for i in session.get_inputs()]
    chunking = Chunking.of(model)
    step = chunking.step(batch_size)
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    worst = dict.fromkeys(names, 0.0)
    agree = correct_float = correct_quant = total = 0
    classes: int | None = None
    kept: list[dict[str, np.ndarray]] = []
    kept_count = 0
    for inputs, labels in batches:
        arrays = validated_feeds(model, as_feeds(inputs, input_names), what)
        size = len(next(iter(arrays.values())))
        if labels_given and labels is None:
            raise DatasetError(f"--labels {labels_source}: no labels for the samples from {total} on.")
        for start in range(0, size, step):
            feeds = {k: np.asarray(v[start : start + step], dtype=np.float32) for k, v in arrays.items()}
            reference = chunking.run(lambda f: session.run(None, f), feeds, what)
            simulated, _ = evaluator.evaluate_quantized_model(feeds, to_float=True)
            for name, ref, sim in zip(names, reference, simulated):
                diff = sim.astype(np.float64) - ref
                signal[name] += float(np.sum(ref.astype(np.float64) ** 2))
                noise[name] += float(np.sum(diff**2))
                worst[name] = max(worst[name], float(np.abs(diff).max(initial=0)))
            if total == 0:
                classes = classes_of(reference[0])
                if labels_given:
                    check_labels(np.asarray(labels), classes, labels_source)
            if classes is not None:  # top-1 means something only for (N, classes) scores
                ref_top, sim_top = reference[0].argmax(axis=-1), simulated[0].argmax(axis=-1)
                agree += int((ref_top == sim_top).sum())
                if labels_given and labels is not None:
                    truth = np.asarray(labels[start : start + step])
                    if len(truth) != len(ref_top):
                        raise DatasetError(f"--labels {labels_source}: {len(truth)} labels for {len(ref_top)} samples.")
                    check_labels(truth, classes, labels_source)
                    correct_float += int((ref_top == truth).sum())
                    correct_quant += int((sim_top == truth).sum())
            if kept_count < keep:
                kept.append(feeds)
                kept_count += len(next(iter(feeds.values())))
            count = len(reference[0])
            total += count
            if on_batch is not None:
                on_batch(count)
    if total == 0:
        raise DatasetError(f"{what}: no samples to evaluate on.")
    result = Measurement(
        target=evaluator.target.name,
        library=library,
        bits=evaluator.bits,
        samples=total,
        top1_agreement=agree / total if classes is not None else None,
        outputs=[
            {
                "name": n,
                "sqnr_db": 10 * np.log10(signal[n] / noise[n]) if noise[n] else float("inf"),
                "max_abs_error": worst[n],
            }
            for n in names
        ],
    )
    if labels_given:
        result.float_accuracy = correct_float / total
        result.quantized_accuracy = correct_quant / total
    if kept:
        result.kept = {k: np.concatenate([f[k] for f in kept])[: max(keep, 1)] for k in kept[0]}
        if chunking.fixed:  # whole runs only
            whole = len(next(iter(result.kept.values()))) // chunking.fixed * chunking.fixed
            result.kept = {k: v[: max(whole, chunking.fixed)] for k, v in result.kept.items()}
    return result
