"""The calibration engine: run the float model over the calibration set (streaming, one onnxruntime pass per
batch), observe every activation, and turn the ranges into the table's exponents. The legacy ``Calibrator``
(:mod:`espquant.api.calibrator`) is a thin facade over :func:`calibrate_model`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import onnx

from espquant._version import __version__
from espquant.calibration.collector import collect
from espquant.calibration.dataset import Chunking, InputSpec, iterate_batches
from espquant.calibration.exponents import Requantize, assign_exponents
from espquant.calibration.observers import Observer, make_observer
from espquant.calibration.plan import plan_calibration
from espquant.calibration.precision import Fallback, int8_fallbacks, resolve_int16_layers, tensor_widths
from espquant.checker import check_model
from espquant.errors import OptionError
from espquant.graph import tensor_shape
from espquant.table import FORMAT_VERSION, QuantTable, graph_hash

__all__ = [
    "CalibrationResult",
    "calibrate_model",
    "validate_method",
    "sample_count",
    "CALIBRATION_METHODS",
    "GRANULARITIES",
]

logger = logging.getLogger(__name__)

GRANULARITIES = ("per-tensor", "per-channel")
# Methods per bit width: the legacy set (int8 minmax/entropy, int16 minmax) plus percentile and mse.
CALIBRATION_METHODS: dict[int, tuple[str, ...]] = {
    8: ("minmax", "entropy", "percentile", "mse"),
    16: ("minmax", "entropy", "percentile", "mse"),
}


def validate_method(bits: int, granularity: str, method: str) -> None:
    """Reject a combination the calibrator cannot honour, naming the valid choices."""
    if granularity not in GRANULARITIES:
        raise OptionError(f"granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}.")
    if bits == 16 and granularity != "per-tensor":
        raise OptionError("int16 quantization is per-tensor only (ESP-DL has no per-channel int16 weights).")
    if method not in CALIBRATION_METHODS[bits]:
        raise OptionError(
            f"calibration method {method!r} for int{bits}: use one of {', '.join(CALIBRATION_METHODS[bits])}."
        )


def sample_count(data: object) -> int | None:
    """The number of samples when the data says it up front (arrays, dicts of arrays), else None."""
    if isinstance(data, dict):
        data = next(iter(data.values()), None)
    shape = getattr(data, "shape", None)
    return int(shape[0]) if shape else None


@dataclass
class CalibrationResult:
    """The table plus what the terminal report shows: ranges, observers and needed requantizations."""

    table: QuantTable
    observers: dict[str, Observer]
    samples: int
    requantize: list[Requantize]
    range_from: dict[str, str] = field(default_factory=dict)  # Conv output -> the reader output it takes its range of
    fallbacks: list[Fallback] = field(default_factory=list)  # int16 model: nodes without an int16 kernel, at int8
    widths: dict[str, int] = field(default_factory=dict)  # tensors whose width is not the table's (mixed precision)


def calibrate_model(
    model_proto: onnx.ModelProto,
    calib_dataset: object,
    bits: int,
    granularity: str = "per-tensor",
    method: str = "minmax",
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    int16_layers: Sequence[str] = (),
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
    threads: int | None = None,
    strict: bool = False,
) -> CalibrationResult:
    """Measure the model on the data and choose every exponent; nothing is written.

    Args:
        bits, granularity, method: as the Calibrator's (validated by :func:`validate_method`).
        providers: onnxruntime execution providers for the float model.
        int16_layers: mixed precision: layers computed at int16 in an int8 model.
        batch_size: samples per onnxruntime run when the data is an array (iterables keep their batches); a
            model whose input fixes its batch to B is run B samples at a time (``dataset.Chunking``).
        on_batch: called with the number of samples after each batch (progress bars).
        threads: onnxruntime intra-op threads (None: onnxruntime's default).
        strict: refuse an int16 model with ops the chip has no int16 kernel for, instead of running those
            nodes at int8 (``precision.int8_fallbacks``; each is logged as a warning and listed in the result
            and the table's ``int8_fallback`` metadata).

    Raises:
        UnsupportedModelError: the model uses something ESP-DL cannot run (every problem listed).
        DatasetError: empty data, wrong shape or dtype, NaN/Inf (naming the first bad sample).
    """
    validate_method(bits, granularity, method)
    check_model(model_proto, target=None, bits=bits, strict=True, fallback=not strict)
    plan = plan_calibration(model_proto)
    fallbacks = int8_fallbacks(plan, bits)
    for fallback in fallbacks:
        logger.warning("%s", fallback)
    initializers = {t.name for t in model_proto.graph.initializer}
    inputs = [
        InputSpec(i.name, tuple(d if isinstance(d, int) else None for d in (tensor_shape(i) or [])))
        for i in model_proto.graph.input
        if i.name not in initializers
    ]
    observers = {name: make_observer(method) for name in dict.fromkeys(plan.observed)}
    chunking = Chunking.of(model_proto)  # a fixed batch B: B samples per onnxruntime run
    batches = iterate_batches(calib_dataset, inputs, batch_size, chunking)
    samples = collect(model_proto, observers, batches, list(providers), on_batch, threads, chunking)
    int16 = resolve_int16_layers(plan, list(int16_layers))
    widths = tensor_widths(model_proto, plan, bits, int16)
    observed = {name: o.exponent(widths.get(name, bits)) for name, o in observers.items()} | plan.fixed
    for conv_output, reader_output in plan.range_from.items():  # at the Conv's own width (mixed precision)
        observed[conv_output] = observers[reader_output].exponent(widths.get(conv_output, bits))
    per_channel = granularity == "per-channel"
    weight_method = "mse" if method == "mse" else "minmax"  # the weights are known exactly: no histogram
    assignment = assign_exponents(model_proto, plan, observed, bits, per_channel, widths, weight_method)
    metadata = {
        "format_version": FORMAT_VERSION,
        "bits": bits,
        "granularity": granularity,
        "method": method,
        "target_independent": True,
        "graph_hash": graph_hash(model_proto),
        "samples": samples,
        "espquant_version": __version__,
        "float_tensors": plan.float_tensors,
        "requantize": [vars(r) for r in assignment.requantize],
        "int16_layers": int16,
        "int8_fallback": [f.tensor for f in fallbacks],
    }
    table = QuantTable(assignment.exponents, metadata)
    return CalibrationResult(
        table, observers, samples, assignment.requantize, dict(plan.range_from), fallbacks, dict(widths)
    )
