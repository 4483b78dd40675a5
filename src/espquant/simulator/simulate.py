"""Float inputs in, the chip's outputs out: the one entry the legacy ``Evaluator``, the mixed-precision search and
the QDQ comparison share (inputs checked against the float model: names, dtype, shape, finite values).

The integer model cares about the batch as much as the float one: a model that declares a fixed batch B keeps
the Reshape targets it was exported with (``[1, K]``), and both the compiled segments (onnxruntime graphs) and
the interpreter apply them as they are. So such a model is simulated B samples at a time
(:class:`~espquant.calibration.dataset.Chunking`), as onnxruntime runs its float twin; except that a batch-1
model whose every node computes each sample on its own, and whose tensors are small, runs many samples at a time
on its batch-free copy (``simulator/batching.py``): the same integers for every sample in far fewer calls."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx

from espquant.calibration.dataset import Chunking
from espquant.errors import DatasetError
from espquant.graph import tensor_shape
from espquant.simulator.batching import batched_runs
from espquant.simulator.quantized_model import QuantizedModel

__all__ = ["simulate"]


def simulate(
    model: QuantizedModel,
    float_model: onnx.ModelProto | None,
    batch: np.ndarray | dict[str, np.ndarray],
    to_float: bool = False,
) -> tuple[list[np.ndarray], list[str]]:
    """Quantize the float inputs as the chip does, run the integer model, return its outputs.

    Returns:
        ``(outputs, output_names)`` in the ONNX model's order and layout: the integers the chip produces, or
        with ``to_float`` those integers times ``2**exponent``.

    A ``float_model`` that fixes its batch to B is simulated B samples at a time (module docstring).

    Raises:
        DatasetError: inputs that do not match the model (names, dtype, shape) or hold NaN / Inf, or a
            number of samples the fixed batch B does not divide.
    """
    if isinstance(batch, dict):
        feeds = batch
        if set(feeds) != set(model.inputs):
            raise DatasetError(f"inputs {sorted(feeds)} do not match the model's {model.inputs}.")
    elif len(model.inputs) == 1:
        feeds = {model.inputs[0]: batch}
    else:
        raise DatasetError(f"the model takes the inputs {model.inputs}: give them as a dict of arrays by name.")
    shapes, chunking = _float_facts(model, float_model)
    checked = {}
    for name, value in feeds.items():
        checked[name] = _checked_input(name, np.asarray(value), shapes.get(name))
    sizes = {len(value) for value in checked.values()}
    total = sizes.pop() if len(sizes) == 1 else 0
    batched, step = batched_runs(model) if chunking.fixed == 1 and total > 1 else (None, 1)
    if batched is None and chunking.fixed is None:  # one run as the batch is (a batch-1 caller's every call)
        return _run_once(model, checked, to_float), list(model.outputs)
    if batched is None:
        outputs = chunking.run(lambda feeds: _run_once(model, feeds, to_float), checked)
        return outputs, list(model.outputs)
    batched.compiled, batched.threads = model.compiled, model.threads  # the caller's settings, as set now
    parts = [
        _run_once(batched, {name: value[i : i + step] for name, value in checked.items()}, to_float)
        for i in range(0, total, step)
    ]
    return [np.concatenate([part[k] for part in parts], axis=0) for k in range(len(model.outputs))], list(model.outputs)


def _float_facts(model: QuantizedModel, float_model: onnx.ModelProto | None) -> tuple[dict[str, list[Any]], Chunking]:
    """The float model's input shapes and chunking, read once per float model (a batch-1 caller simulates one
    sample per call: walking the model's inputs and initializers each time cost more than a small model's run).
    The model itself is kept with them, so a new model object is never mistaken for an old one."""
    if model._float_facts and model._float_facts[0] is float_model:
        return model._float_facts[1], model._float_facts[2]
    shapes, chunking = _input_shapes(float_model), Chunking.of(float_model)
    model._float_facts = (float_model, shapes, chunking)
    return shapes, chunking


def _run_once(model: QuantizedModel, feeds: dict[str, np.ndarray], to_float: bool) -> list[np.ndarray]:
    """One run of the integer model on checked float inputs: its outputs in the model's order."""
    results = model.run_float(feeds)
    outputs = []
    for name in model.outputs:
        value = results[name]
        if to_float and name not in model.float_tensors:
            value = value.astype(np.float64) * 2.0 ** model.exponent(name)
        outputs.append(value)
    return outputs


def _checked_input(name: str, array: np.ndarray, expected: list[int | None] | None) -> np.ndarray:
    if array.dtype.kind not in "fiu":
        raise DatasetError(f"input {name!r}: dtype {array.dtype} is not numeric.")
    if expected is not None and (
        array.ndim != len(expected) or any(e is not None and e != g for e, g in zip(expected[1:], array.shape[1:]))
    ):
        raise DatasetError(f"input {name!r}: shape {array.shape} does not match the model's {expected}.")
    if array.dtype.kind == "f" and not _all_finite(array):
        bad = ~np.isfinite(array.reshape(len(array), -1))
        sample = int(np.flatnonzero(bad.any(axis=1))[0])
        raise DatasetError(f"input {name!r}: sample {sample} holds NaN or Inf; the chip has no such integers.")
    return array


def _all_finite(array: np.ndarray) -> bool:
    """Whether every value is finite. One BLAS pass first: the sum of the squares is NaN or infinite when any
    value is, and finite proves them all finite; only a sum that overflows (or a real NaN / Inf) is checked
    value by value. A batch-1 caller pays this check on every call: between two onnxruntime runs of a small
    model ``isfinite(x).all()`` added about 8 us (half the run), the dot product 1-4 us."""
    return math.isfinite(np.vdot(array, array)) or bool(np.isfinite(array).all())


def _input_shapes(model: onnx.ModelProto | None) -> dict[str, list[Any]]:
    if model is None:
        return {}
    shapes = {}
    for info in model.graph.input:
        shape = tensor_shape(info)
        if shape is not None:
            shapes[info.name] = [d if isinstance(d, int) else None for d in shape]
    return shapes
