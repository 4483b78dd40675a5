"""Where quantization error comes from: every tensor of the simulated chip against the float model.

For each tensor both models have (the simulator's integers times ``2**exponent`` against onnxruntime's float
values on the same inputs) the analysis accumulates, over the whole data set:

- the *accumulated* error: cosine similarity, SQNR in dB and max absolute error of the full integer
  simulation at that tensor (everything upstream quantized too);
- the *own* error: the producing node alone simulated on the float model's inputs (quantized at their
  exponents as the chip would hold them), so a layer that is badly scaled stands out even when the error
  before it is small, and a layer that only inherits error does not;
- the *added* error: the own error minus what quantizing its inputs already cost (relative noise powers),
  so data movement and max pools, which add nothing, sink to the bottom and the layers that lose
  precision (weights, output exponent, saturation) come first;
- the fraction of float values the exponent clips (outside ``[qmin, qmax] * 2**e``).

A Conv whose only reader is a constant-bound Clip takes that Clip's range (``calibration/plan.py``) and
saturates, by design, values the Clip clamps anyway: it is compared within ``[min, max]`` of the Clip, where
its values matter (both sides clamped), so it is not reported as clipping what nobody reads.

Sorting by own SQNR puts the layers to fix first (a better exponent, int16 for that layer, or a different
calibration method). Histograms of the worst layers' float values are kept for the plots.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from espquant.calibration.collector import _exposing
from espquant.calibration.dataset import Chunking
from espquant.calibration.plan import QUANTIZED_COPY
from espquant.quant.pot import qmax, qmin
from espquant.simulator import kernels
from espquant.simulator.quantized_model import QNode, QuantizedModel
from espquant.table import QuantTable

__all__ = ["LayerError", "Analysis", "analyze"]

_HISTOGRAM_BINS = 128
_SAMPLES_PER_BATCH = 4096  # float values kept per tensor and batch for the histograms (memory stays bounded)


@dataclass
class _Accumulator:
    """Running sums for cosine / SQNR / max error over batches (no tensor kept)."""

    signal: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    simulated: float = 0.0
    worst: float = 0.0

    def add(self, reference: np.ndarray, simulated: np.ndarray) -> None:
        ref, sim = reference.astype(np.float64).reshape(-1), simulated.astype(np.float64).reshape(-1)
        diff = sim - ref
        self.signal += float(ref @ ref)
        self.noise += float(diff @ diff)
        self.dot += float(ref @ sim)
        self.simulated += float(sim @ sim)
        self.worst = max(self.worst, float(np.abs(diff).max(initial=0)))

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        return 10 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf

    @property
    def relative_noise(self) -> float:
        return self.noise / self.signal if self.signal > 0 else (0.0 if self.noise == 0 else math.inf)

    @property
    def cosine(self) -> float:
        norm = math.sqrt(self.signal * self.simulated)
        return self.dot / norm if norm > 0 else (1.0 if self.signal == self.simulated else 0.0)


@dataclass
class LayerError:
    """The error at one tensor (see the module docstring)."""

    tensor: str
    node: str
    op_type: str
    exponent: int
    cosine: float
    sqnr_db: float
    max_abs_error: float
    own_sqnr_db: float
    own_max_abs_error: float
    input_sqnr_db: float
    added_sqnr_db: float
    clipped_fraction: float
    float_min: float
    float_max: float

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


@dataclass
class Analysis:
    """Every analysed tensor in graph order, plus histograms of the float values for the plots."""

    target: str
    bits: int
    samples: int
    layers: list[LayerError]
    histograms: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def worst(self, count: int | None = None) -> list[LayerError]:
        """Layers ordered by the error they add on their own, worst (lowest added SQNR) first."""
        ordered = sorted(self.layers, key=lambda layer: (layer.added_sqnr_db, layer.own_sqnr_db, layer.sqnr_db))
        return ordered[:count] if count is not None else ordered

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "bits": self.bits,
            "samples": self.samples,
            "layers": [layer.to_dict() for layer in self.layers],
            "worst_first": [layer.tensor for layer in self.worst()],
        }


def _source(name: str) -> str:
    """The float-model tensor behind a simulator tensor (RequantizeLinear outputs and the integer copy of a
    Softmax output carry a suffix)."""
    return name.split("__requant_")[0].removesuffix(QUANTIZED_COPY)


def _added_sqnr(own: _Accumulator, inputs: _Accumulator) -> float:
    added = own.relative_noise - inputs.relative_noise
    return 10 * math.log10(1 / added) if added > 0 else math.inf


def _own_output(
    model: QuantizedModel, node: QNode, floats: dict[str, np.ndarray], inputs: _Accumulator
) -> np.ndarray | None:
    """``node`` alone on the float model's inputs, quantized at the exponents the chip holds them with (their
    quantization error goes into ``inputs``)."""
    env: dict[str, np.ndarray] = dict(model.constants)
    for tensor in node.inputs:
        if not tensor or tensor in env:
            continue
        value = floats.get(_source(tensor))
        if value is None:
            return None
        if tensor in model.float_tensors:
            env[tensor] = value.astype(np.float32)
        else:
            exponent = model.exponent(tensor)
            bits = model.width(tensor)  # the width the chip holds it at (mixed precision)
            env[tensor] = kernels.quantize_float(value, e_out=exponent, bits=bits, profile=model.profile)
            inputs.add(value, env[tensor] * 2.0**exponent)
    model.run_node(node, env)
    return env[node.outputs[0]]


def _kept_ranges(model_proto: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """Conv outputs that take their Clip reader's range -> the Clip's [min, max] (see the module docstring)."""
    from espquant.calibration.plan import plan_calibration
    from espquant.graph import GraphView

    view = GraphView(model_proto.graph)
    kept = {}
    for tensor, reader_output in plan_calibration(model_proto).range_from.items():
        bounds = view.clamp_bounds(view.producer[reader_output])  # None for an Add / Sub reader
        if bounds is not None:
            kept[tensor] = bounds
    return kept


def analyze(
    model_proto: onnx.ModelProto,
    table: QuantTable | str,
    data: np.ndarray | dict[str, np.ndarray],
    target: str = "esp32s3",
    batch_size: int = 64,
    histogram_layers: int = 6,
) -> Analysis:
    """Compare the float model with the simulated chip tensor by tensor on ``data`` (module docstring)."""
    from espquant.calibration.dataset import validated_feeds
    from espquant.runtime import create_session
    from espquant.simulator.lowering import lower_for_target

    table = table if isinstance(table, QuantTable) else QuantTable.load(table)
    quantized = lower_for_target(model_proto, table, target)
    # The float reference of every tensor: the model the table's integers come from (equalization rescales the
    # channels of the tensors between an equalized pair, nothing else).
    model_proto = table.model_for(model_proto)
    arrays = validated_feeds(model_proto, data, "the data")  # shapes, dtype, NaN: before onnxruntime sees it
    total = len(next(iter(arrays.values())))
    producers = {node.outputs[0]: node for node in quantized.nodes if node.outputs}
    compared = [t for t in producers if t == _source(t) and t not in quantized.float_tensors]
    exposed = _exposing(model_proto, compared)
    session = create_session(exposed, spinning=False)  # its runs alternate with the simulator's (api/measure.py)
    output_names = [o.name for o in session.get_outputs()]
    accumulated = {t: _Accumulator() for t in compared}
    own = {t: _Accumulator() for t in compared}
    quantized_inputs = {t: _Accumulator() for t in compared}
    clipped = dict.fromkeys(compared, 0)
    counts = dict.fromkeys(compared, 0)
    ranges = {t: [math.inf, -math.inf] for t in compared}
    kept: dict[str, list[np.ndarray]] = {t: [] for t in compared}
    kept_ranges = _kept_ranges(model_proto)

    def seen(tensor: str, value: np.ndarray) -> np.ndarray:
        """``value`` as the rest of the model sees it (within the Clip's bounds for a clamped Conv)."""
        return np.clip(value, *kept_ranges[tensor]) if tensor in kept_ranges else value

    # A model that fixes its batch to B runs B samples at a time, float and integer alike (dataset.Chunking);
    # the histogram samples are still drawn per slice of ``step`` samples, so their number does not grow with
    # the number of runs.
    chunking = Chunking.of(model_proto)
    chunking.check_total(total)
    step = chunking.step(batch_size)
    for start in range(0, total, step):
        batch = {k: np.asarray(v[start : start + step], dtype=np.float32) for k, v in arrays.items()}
        references: dict[str, list[np.ndarray]] = {t: [] for t in compared}
        for feeds in chunking.split(batch):
            floats = dict(zip(output_names, session.run(output_names, feeds)))
            floats.update(feeds)
            ints = {name: quantized.quantize_input(name, value) for name, value in feeds.items()}
            simulated = quantized.run(ints, keep=True)
            for tensor in compared:
                reference, exponent = seen(tensor, floats[tensor]), quantized.exponent(tensor)
                accumulated[tensor].add(reference, seen(tensor, simulated[tensor] * 2.0**exponent))
                alone = _own_output(quantized, producers[tensor], floats, quantized_inputs[tensor])
                if alone is not None:
                    own[tensor].add(reference, seen(tensor, alone * 2.0**exponent))
                width = quantized.width(tensor)  # an int16 layer of an int8 model, or an int8 fallback
                low, high = qmin(width) * 2.0**exponent, qmax(width) * 2.0**exponent
                clipped[tensor] += int(((reference < low) | (reference > high)).sum())
                counts[tensor] += reference.size
                ranges[tensor] = [
                    min(ranges[tensor][0], float(reference.min(initial=math.inf))),
                    max(ranges[tensor][1], float(reference.max(initial=-math.inf))),
                ]
                references[tensor].append(reference.reshape(-1))
        for tensor, parts in references.items():
            flat = parts[0] if len(parts) == 1 else np.concatenate(parts)
            kept[tensor].append(flat[:: max(1, flat.size // _SAMPLES_PER_BATCH)].copy())
    layers = [
        LayerError(
            tensor=t,
            node=producers[t].name,
            op_type=producers[t].op_type + ("+Relu" if producers[t].relu else ""),
            exponent=quantized.exponent(t),
            cosine=accumulated[t].cosine,
            sqnr_db=accumulated[t].sqnr_db,
            max_abs_error=accumulated[t].worst,
            own_sqnr_db=own[t].sqnr_db,
            own_max_abs_error=own[t].worst,
            input_sqnr_db=quantized_inputs[t].sqnr_db,
            added_sqnr_db=_added_sqnr(own[t], quantized_inputs[t]),
            clipped_fraction=clipped[t] / counts[t] if counts[t] else 0.0,
            float_min=ranges[t][0],
            float_max=ranges[t][1],
        )
        for t in compared
    ]
    analysis = Analysis(quantized.profile.name, quantized.bits, total, layers)
    for layer in analysis.worst(histogram_layers):
        # float64: a nearly constant float32 tensor (a stride map) has too narrow a range for 128 float32 bins
        values = np.concatenate(kept[layer.tensor]).astype(np.float64)
        analysis.histograms[layer.tensor] = np.histogram(values, bins=_HISTOGRAM_BINS)
    return analysis
