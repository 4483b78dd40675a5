"""Runs the float model under onnxruntime once per batch and feeds the observers.

Every observed tensor is exposed as a graph output. Where shapes are static, onnxruntime writes those
outputs straight into buffers allocated once per batch size (IO binding), so no activation is copied;
otherwise plain ``run`` is used. Only the current batch's activations are ever in memory.

For min-max, two shortcuts keep calibration close to the cost of inference:
- the output of a Relu or of a Clip with constant bounds whose input is observed anyway is not exposed:
  its extremes are exactly the clamped extremes of its input;
- a tensor that cannot be negative (the output of a Relu, or of a Clip whose lower bound is >= 0) with
  static spatial dimensions is reduced inside the graph by a GlobalMaxPool, and only its (N, C) maxima
  are fetched. Its maximum is then its max |x|, exactly. onnxruntime runs the pool in its blocked
  (NCHWc) layout, next to the Conv + activation it keeps fused. Exposing the full tensor instead makes
  onnxruntime reorder it into NCHW for the caller, and on MobileNetV2 that reorder costs more than the
  convolutions (benchmarks/calibration.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from espquant.calibration.dataset import DYNAMIC_BATCH, Batch, Chunking
from espquant.calibration.observers import MinMaxObserver, Observer
from espquant.errors import DatasetError
from espquant.graph import GraphView
from espquant.optimizer.shapes import infer_shapes
from espquant.runtime import create_session

__all__ = ["collect"]


def _exposing(model: onnx.ModelProto, names: Sequence[str], pools: dict[str, str] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs include ``names``; ``pools`` maps a pooled output to the
    tensor that a new GlobalMaxPool node reduces into it."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    for pooled, source in (pools or {}).items():
        exposed.graph.node.append(helper.make_node("GlobalMaxPool", [source], [pooled], name=pooled))
    present = {o.name for o in exposed.graph.output}
    for name in names:
        if name not in present:
            exposed.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return exposed


def _session(model: onnx.ModelProto, providers: Sequence[str], threads: int | None) -> ort.InferenceSession:
    return create_session(model, providers, threads, what="the model for calibration")


class _Runner:
    """One session over the exposed model; outputs land in reusable buffers when shapes are static."""

    def __init__(
        self,
        model: onnx.ModelProto,
        fetched: list[str],
        providers: Sequence[str],
        threads: int | None,
        pools: dict[str, str] | None = None,
    ):
        self.model = _exposing(model, fetched, pools)
        self.fetched = fetched
        self.session = _session(self.model, providers, threads)
        # Per batch size: outputs bound once to their buffers (None: shapes not static, plain runs).
        self.bound: dict[int, tuple[ort.IOBinding, list[np.ndarray]] | None] = {}

    def _bind(self, batch: int) -> tuple[ort.IOBinding, list[np.ndarray]] | None:
        buffers = self._allocate(batch)
        if buffers is None:
            return None
        binding = self.session.io_binding()
        for name, buffer in buffers.items():
            binding.bind_output(name, "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
        return binding, [buffers[name] for name in self.fetched]

    def _allocate(self, batch: int) -> dict[str, np.ndarray] | None:
        sized = onnx.ModelProto()
        sized.CopyFrom(self.model)
        initializers = {t.name for t in sized.graph.initializer}
        for info in sized.graph.input:
            dims = info.type.tensor_type.shape.dim
            if info.name not in initializers and len(dims):
                dims[0].Clear()
                dims[0].dim_value = batch
        infer_shapes(sized)
        view = GraphView(sized.graph)
        buffers = {}
        for name in self.fetched:
            shape = view.shape(name)
            if shape is None or not all(isinstance(d, int) for d in shape):
                return None
            buffers[name] = np.empty(shape, dtype=np.float32)
        return buffers

    def run(self, batch: Batch) -> list[np.ndarray]:
        size = next(iter(batch.values())).shape[0]
        if size not in self.bound:
            self.bound[size] = self._bind(size)
        bound = self.bound[size]
        if bound is None:
            return [np.asarray(v) for v in self.session.run(self.fetched, batch)]
        binding, outputs = bound
        for name, value in batch.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        try:
            self.session.run_with_iobinding(binding)
        except Exception:  # inferred shapes disagree with what onnxruntime computes: plain runs from now on
            self.bound = dict.fromkeys(self.bound)
            return [np.asarray(v) for v in self.session.run(self.fetched, batch)]
        return outputs

    def run_kept(self, batch: Batch) -> list[np.ndarray]:
        """``run`` with outputs the next run does not overwrite (bound buffers are reused): what a model with a
        fixed batch needs, whose runs are joined into one batch before the observers see it."""
        return [np.array(v) for v in self.run(batch)]


def _clamp_derivations(model: onnx.ModelProto, observers: dict[str, Observer]) -> dict[str, tuple[str, float, float]]:
    """Observed outputs of Relu / constant-bound Clip nodes whose input is observed: output -> (input, lo, hi)."""
    view = GraphView(model.graph)
    derived: dict[str, tuple[str, float, float]] = {}
    for node in model.graph.node:
        bounds = view.clamp_bounds(node)
        if bounds is not None and node.output[0] in observers and node.input[0] in observers:
            derived[node.output[0]] = (node.input[0], *bounds)
    # A source must itself be measured, not derived (Relu after Relu): resolve chains to the measured root.
    for name, (source, low, high) in list(derived.items()):
        while source in derived:
            source, inner_low, inner_high = derived[source]
            low, high = max(low, inner_low), min(high, inner_high)
        derived[name] = (source, low, high)
    return derived


def _nonnegative(model: onnx.ModelProto, view: GraphView) -> set[str]:
    """Outputs that cannot hold a negative value: Relu outputs, and Clip outputs with a constant min >= 0."""
    bounds = {node.output[0]: view.clamp_bounds(node) for node in model.graph.node}
    return {output for output, bound in bounds.items() if bound is not None and bound[0] >= 0.0}


def _poolable(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, int]:
    """Of ``names``, the non-negative tensors of rank >= 3 with static spatial dimensions, with the number
    of values that each (sample, channel) maximum stands for."""
    shaped = onnx.ModelProto()
    shaped.CopyFrom(model)
    infer_shapes(shaped)
    view = GraphView(shaped.graph)
    positive = _nonnegative(shaped, view)
    result = {}
    for name in names:
        shape = view.shape(name)
        if name in positive and shape is not None and len(shape) >= 3:
            spatial = shape[2:]
            if all(isinstance(d, int) and d > 0 for d in spatial):
                result[name] = math.prod(spatial)  # type: ignore[arg-type]
    return result


def _update_peaks(peaks: dict[str, np.ndarray], values: dict[str, np.ndarray], pooled: dict[str, int]) -> None:
    """Raise each channel's peak in ``peaks`` to this batch's largest ``|x|`` (pooled tensors: their maxima)."""
    for name in peaks:
        value = values.get(name)
        if value is None or value.ndim < 2 or not value.size:
            continue
        axes = (0,) if name in pooled else tuple(a for a in range(value.ndim) if a != 1)
        batch_peak = np.abs(value).max(axis=axes).astype(np.float64)
        peaks[name] = np.maximum(peaks[name], batch_peak) if peaks[name].size else batch_peak


def collect(
    model: onnx.ModelProto,
    observers: dict[str, Observer],
    batches: Iterable[Batch],
    providers: Sequence[str],
    on_batch: Callable[[int], None] | None = None,
    threads: int | None = None,
    chunking: Chunking = DYNAMIC_BATCH,
    peaks: dict[str, np.ndarray] | None = None,
) -> int:
    """Feed every batch through the model and the observers; returns the number of samples seen.

    A model that fixes its batch to B (``chunking``) runs each batch B samples at a time and the observers see
    the joined batch, so statistics (the histograms' per-batch subsample) match a dynamic-batch twin's.

    ``peaks``: observed tensors whose largest ``|x|`` per channel (axis 1) is wanted too, each starting as an
    empty array and filled in place (cross-layer equalization through a clamped activation needs each channel's
    distance to the clamp)."""
    inputs = {i.name for i in model.graph.input}
    ranges_only = all(isinstance(o, MinMaxObserver) for o in observers.values())  # no histogram to fill
    derived = _clamp_derivations(model, observers) if ranges_only else {}
    measured = [name for name in observers if name not in inputs and name not in derived]
    pooled = _poolable(model, measured) if ranges_only else {}
    pool_outputs = {name: f"{name}__espquant_max" for name in pooled}
    fetched = [pool_outputs.get(name, name) for name in measured]
    runner = _Runner(model, fetched, providers, threads, {pool_outputs[n]: n for n in pooled})
    samples = 0
    for batch in batches:
        if not fetched:
            values = []
        elif chunking.fixed is None:
            values = runner.run(batch)
        else:
            values = chunking.run(runner.run_kept, batch, "the calibration batch")
        ranges: dict[str, tuple[float, float, int]] = {}
        for name, value in [*zip(measured, values), *((n, v) for n, v in batch.items() if n in observers)]:
            if name in pooled:  # (N, C) maxima of a tensor that cannot be negative
                if value.size:
                    ranges[name] = (0.0, float(value.max()), value.size * pooled[name])
                    observers[name].update_range(*ranges[name])
            elif ranges_only:
                if value.size:
                    ranges[name] = (float(value.min()), float(value.max()), value.size)
                    observers[name].update_range(*ranges[name])
            else:
                try:
                    observers[name].update(value)
                except ValueError as exc:  # a histogram of inf / NaN: say which tensor and why
                    if np.all(np.isfinite(value)):
                        raise
                    raise DatasetError(
                        f"tensor {name!r} reaches inf or NaN in the float model on this calibration data, which no "
                        "exponent represents: check the data's range (normalised as in training?) and the weights."
                    ) from exc
        if peaks is not None:
            _update_peaks(peaks, dict(zip(measured, values)), pooled)
        for name, (source, low, high) in derived.items():
            if source in ranges:
                lo, hi, count = ranges[source]
                observers[name].update_range(min(max(lo, low), high), min(max(hi, low), high), count)
        size = next(iter(batch.values())).shape[0]
        samples += size
        if on_batch is not None:
            on_batch(size)
    return samples
