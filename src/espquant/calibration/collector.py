"""Runs the float model under onnxruntime once per batch, exposing every observed tensor as an output,
and feeds the observers. Only the current batch's activations are ever in memory."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from espquant.calibration.dataset import Batch
from espquant.calibration.observers import Observer

__all__ = ["collect"]


def _exposing(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs include ``names``."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in present:
            exposed.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return exposed


def collect(
    model: onnx.ModelProto,
    observers: dict[str, Observer],
    batches: Iterable[Batch],
    providers: Sequence[str],
    on_batch: Callable[[int], None] | None = None,
    threads: int | None = None,
) -> int:
    """Feed every batch through the model and the observers; returns the number of samples seen."""
    inputs = {i.name for i in model.graph.input}
    computed = [name for name in observers if name not in inputs]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(_exposing(model, computed).SerializeToString(), options, providers=list(providers))
    samples = 0
    for batch in batches:
        values = session.run(computed, batch) if computed else []
        for name, value in zip(computed, values):
            observers[name].update(np.asarray(value))
        for name, value in batch.items():
            if name in observers:
                observers[name].update(value)
        size = next(iter(batch.values())).shape[0]
        samples += size
        if on_batch is not None:
            on_batch(size)
    return samples
