"""The calibration engine: run the float model over the calibration set (streaming, one onnxruntime pass per
batch), observe every activation, and turn the ranges into the table's exponents. The legacy ``Calibrator``
(:mod:`espquant.api.calibrator`) is a thin facade over :func:`calibrate_model`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from espquant._version import __version__
from espquant.calibration.auto import (
    SEARCH_SAMPLES,
    VALIDATION_SAMPLES,
    channel_means,
    float_reference,
    rescaled_outputs,
    search_exponents,
    search_sample_count,
    simulated_values,
    simulation_budget,
)
from espquant.calibration.bias_correction import bias_corrected_inputs, bias_shifts
from espquant.calibration.collector import collect
from espquant.calibration.dataset import Batch, Chunking, InputSpec, iterate_batches
from espquant.calibration.exponents import Requantize, assign_exponents, cover_aligned_inputs
from espquant.calibration.observers import Observer, finite_range, make_observer
from espquant.calibration.plan import CalibrationPlan, plan_calibration
from espquant.calibration.precision import (
    Fallback,
    equivalent_exponent,
    int8_fallbacks,
    overflowing_softmax,
    resolve_int16_layers,
    tensor_widths,
)
from espquant.calibration.weight_rounding import RoundingStats, rounded_weight_model
from espquant.checker import check_model
from espquant.errors import EspquantError, OptionError
from espquant.graph import shift_biases, tensor_shape
from espquant.ops import ExponentRule
from espquant.ops.activations import SOFTMAX_FAMILY
from espquant.optimizer.equalize import equalization_factors, equalization_pairs, equalized_copy
from espquant.quant.pot import exponent_for_max_abs, qmax
from espquant.quant.profiles import TargetProfile, get_target
from espquant.table import FORMAT_VERSION, QuantTable, factors_metadata, graph_hash, shifts_metadata

__all__ = [
    "CalibrationResult",
    "calibrate_model",
    "validate_method",
    "sample_count",
    "CALIBRATION_METHODS",
    "GRANULARITIES",
]

logger = logging.getLogger(__name__)
# What the user should know about the table calibration chose (shown by the CLI by default, as data hints are).
advice = logging.getLogger("espquant.advice")

GRANULARITIES = ("per-tensor", "per-channel")
# Methods per bit width: the legacy set (int8 minmax/entropy, int16 minmax) plus percentile, mse and auto
# (the exponent of those four that the simulated model measures best, calibration/auto.py).
CALIBRATION_METHODS: dict[int, tuple[str, ...]] = {
    8: ("minmax", "entropy", "percentile", "mse", "auto"),
    16: ("minmax", "entropy", "percentile", "mse", "auto"),
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
    # The float model the table is for: the input model, or its equalized / bias-corrected twin (``transforms``
    # names what changed; the table's graph hash is this model's, so evaluate and export must be given it).
    model: onnx.ModelProto | None = None
    transforms: list[str] = field(default_factory=list)
    # Tensors that cross-layer equalization rescaled -> their largest |x| after it (the observers measured them
    # before): what a table printout shows for them.
    rescaled: dict[str, float] = field(default_factory=dict)

    @property
    def equalized_pairs(self) -> int:
        """The Conv pairs ``auto``'s equalization rescaled, when the table carries their weight factors."""
        return int(self.table.metadata.get("cle_pairs") or 0) if self.table.metadata.get("weight_factors") else 0


def with_factors_applied(result: CalibrationResult) -> CalibrationResult:
    """``result`` with the table's weight factors and bias shifts (``auto``'s equalization and bias correction)
    applied to its model: the table then describes a model with those weights, written beside it. For readers
    that know only the weights of the model they are given, the original toolkit's first of all (its legacy
    pickle holds neither)."""
    carried = [("cle", bool(result.table.weight_factors)), ("bias_correction", bool(result.table.bias_shifts))]
    applied = [name for name, present in carried if present]
    if result.model is None or not applied:
        return result
    model = result.table.model_for(result.model)
    transforms = [*result.transforms, *applied]
    metadata = {k: v for k, v in result.table.metadata.items() if k not in ("weight_factors", "bias_shifts")}
    metadata |= {"graph_hash": graph_hash(model), "model_transforms": transforms}
    table = QuantTable(dict(result.table.exponents), metadata)
    return replace(result, table=table, model=model, transforms=transforms)


# The auto search on a model with a fixed batch runs the simulator once per B samples, unless the simulator runs
# it many samples per call (simulator/batching.py: small batch-1 models): it simulates fewer samples there, so
# calibrating a large batch-1 TFLite / torch export stays within minutes.
FIXED_BATCH_SEARCH_SAMPLES = 8


def calibrate_model(
    model_proto: onnx.ModelProto,
    calib_dataset: object,
    bits: int,
    granularity: str = "per-tensor",
    method: str = "auto",
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    int16_layers: Sequence[str] = (),
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
    threads: int | None = None,
    strict: bool = False,
    cle: bool | None = None,
    bias_correction: bool | None = None,
    search_samples: int | None = None,
    weight_rounding: bool | None = None,
) -> CalibrationResult:
    """Measure the model on the data and choose every exponent; nothing is written.

    Args:
        bits, granularity, method: as the Calibrator's (validated by :func:`validate_method`); the default
            ``auto`` is what ``espquant calibrate`` and ``espquant quantize`` use (the legacy ``Calibrator``
            keeps its own default, ``minmax``).
        providers: onnxruntime execution providers for the float model.
        int16_layers: mixed precision: layers computed at int16 in an int8 model.
        batch_size: samples per onnxruntime run when the data is an array (iterables keep their batches); a
            model whose input fixes its batch to B is run B samples at a time (``dataset.Chunking``).
        on_batch: called with the number of samples after each batch (progress bars).
        threads: onnxruntime intra-op threads (None: onnxruntime's default).
        strict: refuse an int16 model with ops the chip has no int16 kernel for, instead of running those
            nodes at int8 (``precision.int8_fallbacks``; each is logged as a warning and listed in the result
            and the table's ``int8_fallback`` metadata).
        cle: cross-layer equalization of the float model first (``optimizer/equalize.py``). Off unless True:
            it changes the float weights, so the table is then for the equalized model (``result.model``,
            written beside the table by the CLI), not for the model the user passed to evaluate and export.
        bias_correction: compensate the mean shift of rounded weights in the float biases
            (``bias_correction.py``). ``auto``: on unless False, kept only when it measures better, carried by
            the table (``QuantTable.bias_shifts``) like its equalization. A fixed method: off unless True, for
            the same reason as CLE.
        search_samples: calibration samples the ``auto`` search (and bias correction) simulates, the first
            ones (default: ``auto.search_sample_count`` of the inputs' size; from a small calibration set all
            but the ``auto.VALIDATION_SAMPLES`` that follow, and never fewer than ``auto.SEARCH_SAMPLES``).
        weight_rounding: round each Conv / Gemm weight down or up by the layer's output error on those samples
            (``weight_rounding.py``; with ``auto`` kept only when the outputs measure better). Off unless True,
            for the same reason as CLE.

    When CLE, a fixed method's bias correction or weight rounding changes the model, ``result.model`` is the
    changed model: the table's graph hash is its, and evaluation and export must use it (the CLI writes it next
    to the table).

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
    transforms: list[str] = []
    extra: dict[str, object] = {}
    if cle:  # off unless asked: it changes the float weights, so the table then belongs to another model
        model_proto, pairs = equalized_copy(model_proto)
        extra["cle_pairs"] = pairs
        if pairs:
            transforms.append("cle")
            plan = plan_calibration(model_proto)
    # auto also measures the PRelu outputs, which may take a finer exponent than their inputs' (auto.py).
    rescaled = rescaled_outputs(plan) if method == "auto" else []
    measured = dict.fromkeys([*plan.observed, *plan.range_observed, *rescaled])
    observers = {name: make_observer("mse" if method == "auto" else method) for name in measured}
    chunking = Chunking.of(model_proto)  # a fixed batch B: B samples per onnxruntime run
    batches = iterate_batches(calib_dataset, inputs, batch_size, chunking)
    # Off unless asked for a fixed method, like CLE (the corrected model is written: the table belongs to it); on
    # for auto, whose table carries the corrections it keeps (``QuantTable.bias_shifts``) beside its factors.
    correct = bool(bias_correction) if bias_correction is not None else method == "auto"
    rounding = bool(weight_rounding)
    kept: list[Batch] = []
    limit: int | None = search_samples or SEARCH_SAMPLES
    fixed_limit = max(FIXED_BATCH_SEARCH_SAMPLES, chunking.fixed or 0)  # a run per B samples: kept short
    if search_samples is None and chunking.fixed is not None and method != "auto":
        limit = min(limit, fixed_limit)  # (auto decides once it knows whether the simulator batches the model)
    # auto's validation samples follow its search samples (a model with a fixed batch keeps its search short)
    validating = method == "auto" and chunking.fixed is None
    if method == "auto" and search_samples is None and chunking.fixed is None:
        limit = None  # from the inputs' size (search_sample_count), known at the first batch
    if method == "auto" or correct or rounding:
        batches = _capturing(batches, limit, VALIDATION_SAMPLES if validating else 0, kept)
    # auto measures cross-layer equalization too, clamped pairs (ReLU6) included: the peak of each channel of
    # the tensors it rescales says how far a clamped channel may move and what range each tensor gets then
    # (optimizer/equalize.py). Per-channel weights need it less, but the activations' one exponent gains.
    equalize = method == "auto" and not cle
    pairs = equalization_pairs(model_proto, clamped=True) if equalize else []
    peaks = {t: np.zeros(0) for p in pairs for t in p.tensors if t in observers}
    samples = collect(model_proto, observers, batches, list(providers), on_batch, threads, chunking, peaks)
    int16 = resolve_int16_layers(plan, list(int16_layers))
    widths = tensor_widths(model_proto, plan, bits, int16)
    widened = _softmax_needing_int16(model_proto, plan, observers, bits, widths, granularity == "per-channel")
    if widened:
        int16 = sorted({*int16, *widened})
        widths = tensor_widths(model_proto, plan, bits, int16)
    per_channel = granularity == "per-channel"
    weight_method = "mse" if method == "mse" else "minmax"  # the weights are known exactly: no histogram
    own = {t: finite_range(t, observers[t]).exponent(widths.get(t, bits)) for t in plan.range_observed}
    kept_samples = _joined(kept, chunking) if kept else {}  # what the search, bias correction and rounding see
    validation: Batch = {}
    if validating and kept_samples:
        captured = int(len(next(iter(kept_samples.values()))))
        if limit is None:  # a small calibration set keeps its validation samples: the search takes the rest
            limit = min(_search_limit(limit, kept[0]), max(SEARCH_SAMPLES, captured - VALIDATION_SAMPLES))
        validation = {name: value[limit:] for name, value in kept_samples.items()}
        kept_samples = {name: value[:limit] for name, value in kept_samples.items()}
    if method == "auto" and search_samples is None and chunking.fixed is not None and kept_samples:
        observed = _fixed_method_observed(observers, plan, widths, bits)  # any table: the graph decides
        cover_aligned_inputs(model_proto, plan, observed, own, bits, widths)
        assigned = assign_exponents(model_proto, plan, observed, bits, per_channel, widths, "minmax")
        table = QuantTable(assigned.exponents, {"bits": bits, "int16_layers": int16})
        if not _simulated_together(model_proto, table, _search_profile(per_channel), bits):
            kept_samples = _joined([{k: v[:fixed_limit] for k, v in kept_samples.items()}], chunking)
    kept_count = int(len(next(iter(kept_samples.values())))) if kept_samples else 0
    weights_model, weights_plan = model_proto, plan  # the float weights the integers are made from
    rescaled: dict[str, float] = {}
    if method == "auto":
        equalization = equalization_factors(model_proto, peaks) if equalize else None
        search = search_exponents(
            model_proto, plan, observers, plan.range_from, bits, per_channel, widths, int16,
            kept_samples, _search_profile(per_channel),
            bias_correction=correct, weight_rounding=rounding, own=own, providers=providers, threads=threads,
            max_simulations=simulation_budget(samples, kept_count),
            equalization=equalization, peaks=peaks, validation=validation,
        )
        observed = search.observed | plan.fixed
        weight_method = search.weight_method
        if search.rounded_layers:  # asked for: the rounded model is written (equalized too when CLE won)
            model_proto = search.model
            plan = plan_calibration(model_proto)
            weights_model, weights_plan = model_proto, plan
            transforms.extend([*(["cle"] if search.weight_factors else []), "weight_rounding"])
        elif search.weight_factors or search.bias_shifts:  # the table carries them: the user's model stays
            weights_model, weights_plan = search.model, plan_calibration(search.model)
            if search.weight_factors:
                extra["weight_factors"] = factors_metadata(search.weight_factors)
            if search.bias_shifts:
                extra["bias_shifts"] = shifts_metadata(search.bias_shifts)
        extra["cle_pairs"] = search.equalized_pairs
        if search.weight_factors and equalization is not None:
            divisors = equalization.divisors
            rescaled = {t: float(np.max(peaks[t] / divisors[t], initial=0.0)) for t in divisors if t in peaks}
        extra["auto"] = {
            "weight_method": search.weight_method,
            "output_error": search.error,
            "minmax_output_error": search.minmax_error,
            "simulations": search.evaluations,
            "search_samples": kept_count,
            "choices": search.choices,
            "narrowed_weights": search.narrowed_weights,
        }
    else:
        observed = _fixed_method_observed(observers, plan, widths, bits)
    cover_aligned_inputs(model_proto, plan, observed, own, bits, widths)
    assignment = assign_exponents(weights_model, weights_plan, observed, bits, per_channel, widths, weight_method)
    _warn_drowned_members(plan, observed, assignment.exponents, widths, bits)
    # Rounding first: its weights lie on the grid with their bias already corrected, so bias correction after
    # it finds nothing to move there and corrects only the layers rounding left at nearest (the other order
    # would take the nearest rounding's mean shift out of biases whose weights rounding then changes).
    if rounding and method != "auto":
        model_proto, stats = _weight_rounded(
            model_proto, plan, assignment.exponents, kept_samples, bits, widths, int16, per_channel, providers,
            threads,
        )
        if stats.flipped:
            transforms.append("weight_rounding")
            plan = plan_calibration(model_proto)
    if correct and method != "auto":
        model_proto, count = _bias_corrected(
            model_proto, plan, assignment.exponents, kept_samples, bits, widths, providers, threads
        )
        if count:
            transforms.append("bias_correction")
            plan = plan_calibration(model_proto)
    extra["bias_correction"] = "bias_correction" in transforms or bool(extra.get("bias_shifts"))
    extra["weight_rounding"] = "weight_rounding" in transforms
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
        "model_transforms": transforms,
        **extra,
    }
    table = QuantTable(assignment.exponents, metadata)
    return CalibrationResult(
        table, observers, samples, assignment.requantize, dict(plan.range_from), fallbacks, dict(widths),
        model_proto, transforms, rescaled,
    )


def _search_limit(limit: int | None, batch: Batch) -> int:
    """``limit``, or when it is None the search samples for this batch's inputs (``auto.search_sample_count``)."""
    if limit is not None:
        return limit
    return search_sample_count(sum(int(np.prod(np.shape(value)[1:])) for value in batch.values()))


def _capturing(batches: Iterable[Batch], limit: int | None, following: int, kept: list[Batch]) -> Iterator[Batch]:
    """Pass the batches on, keeping copies of the first ``limit`` samples (the search subset; None: as many as
    ``_search_limit`` gives for the first batch) and the ``following`` after them: the data is streamed once,
    whatever its size."""
    taken, total = 0, None
    for batch in batches:
        if total is None:
            total = _search_limit(limit, batch) + following
        if taken < total:
            part = {name: np.array(value[: total - taken]) for name, value in batch.items()}
            kept.append(part)
            taken += len(next(iter(part.values())))
        yield batch


# A Concat member whose own range sits this many bits below the shared exponent keeps at most two levels.
DROWNED_BITS = {8: 6, 16: 13}


def _warn_drowned_members(
    plan: CalibrationPlan,
    observed: dict[str, int],
    exponents: dict[str, int | list[int]],
    widths: dict[str, int],
    bits: int,
) -> None:
    """Say where a Concat joins tensors of very different ranges: they share one exponent on the chip, so the
    small one is rounded to a few levels (YOLO exports that concatenate box coordinates up to 640 with class
    scores in [0, 1]: at int8 every score becomes 0). Cut the model before such a Concat or make it int16."""
    for node, spec in plan.nodes:
        if spec.exponent is not ExponentRule.SHARED or not node.output:
            continue
        shared = exponents.get(node.output[0])
        width = widths.get(node.output[0], bits)
        if not isinstance(shared, int):
            continue
        for tensor in node.input:
            own = observed.get(tensor)
            if not isinstance(own, int):
                continue
            if shared - equivalent_exponent(own, widths.get(tensor, bits), width) >= DROWNED_BITS[width]:
                advice.warning(
                    "%s %r: input %r (range about %.3g) shares exponent %d with larger inputs, so int%d keeps it to "
                    "a few levels; cut the model before this node or list it in the int16 layers",
                    node.op_type,
                    node.name or node.output[0],
                    tensor,
                    (qmax(width) + 0.5) * 2.0**own,
                    shared,
                    width,
                )


def _softmax_needing_int16(
    model: onnx.ModelProto,
    plan: CalibrationPlan,
    observers: dict[str, Observer],
    bits: int,
    widths: dict[str, int],
    per_channel: bool,
) -> list[str]:
    """The Softmax layers that run at int16 because the chip's int8 exp table cannot hold their input's range
    (``precision.overflowing_softmax``; a classifier's logits beyond +-88), judged at the widest exponents the
    data allows (min-max), before any method narrows them: each is said in one line."""
    if bits != 8 or not any(node.op_type in SOFTMAX_FAMILY for node, _ in plan.nodes):
        return []
    widest = {name: exponent_for_max_abs(o.max_abs, widths.get(name, bits)) for name, o in observers.items()}
    for conv_output, reader_output in plan.range_from.items():
        widest[conv_output] = exponent_for_max_abs(observers[reader_output].max_abs, widths.get(conv_output, bits))
    exponents = assign_exponents(model, plan, widest | plan.fixed, bits, per_channel, widths, "minmax").exponents
    found = overflowing_softmax(plan, exponents, widths, bits)
    producers = {out: node for node, _ in plan.nodes for out in node.output}
    for tensor in found:
        node = producers[tensor]
        advice.warning(
            "%s %r runs at int16: its input reaches %.3g, beyond the +-88 the chip's int8 exp table holds (inf / "
            "NaN there); a RequantizeLinear widens the input",
            node.op_type,
            node.name or tensor,
            127 * 2.0 ** exponents[node.input[0]],  # type: ignore[operator]
        )
    return found


def _simulated_together(model: onnx.ModelProto, table: QuantTable, profile: TargetProfile, bits: int) -> bool:
    """Whether the simulator runs this batch-1 model many samples per call (``simulator/batching.py``: its graph
    and shapes decide, not the exponents); False when the table does not lower (the search then keeps its short
    subset)."""
    from espquant.simulator.batching import simulated_together
    from espquant.simulator.lowering import build_quantized_model

    try:
        return simulated_together(build_quantized_model(model, table, profile, bits))
    except EspquantError:
        return False


def _fixed_method_observed(
    observers: dict[str, Observer], plan: CalibrationPlan, widths: dict[str, int], bits: int
) -> dict[str, int]:
    """The exponents a fixed method's observers give, before ESP-DL's rules are applied (``assign_exponents``)."""
    observed = {name: finite_range(name, o).exponent(widths.get(name, bits)) for name, o in observers.items()}
    observed |= plan.fixed
    for conv_output, reader_output in plan.range_from.items():  # at the Conv's own width (mixed precision)
        observed[conv_output] = observers[reader_output].exponent(widths.get(conv_output, bits))
    return observed


def _joined(kept: list[Batch], chunking: Chunking) -> Batch:
    """The kept samples as one batch, cut to a multiple of a fixed batch B (the runs the model takes)."""
    joined = {name: np.concatenate([b[name] for b in kept]) for name in kept[0]}
    size = len(next(iter(joined.values())))
    if chunking.fixed is not None and size >= chunking.fixed:
        size -= size % chunking.fixed
    return {name: value[:size] for name, value in joined.items()}


def _search_profile(per_channel: bool) -> TargetProfile:
    """The chip simulated to judge a (target-independent) table: per-channel weights are ESP32-P4's rules,
    per-tensor ones ESP32-S3's."""
    return get_target("esp32p4" if per_channel else "esp32s3")


def _layer_inputs(
    model: onnx.ModelProto, plan: CalibrationPlan, samples: Batch, providers: Sequence[str], threads: int | None
) -> dict[str, np.ndarray]:
    """The float model's input of every layer bias correction and weight rounding reach, on the kept samples
    (empty when there is none)."""
    layer_inputs = [tensor for tensor, _ in bias_corrected_inputs(model, plan)]
    return float_reference(model, layer_inputs, samples, providers, threads) if layer_inputs else {}


def _bias_corrected(
    model: onnx.ModelProto,
    plan: CalibrationPlan,
    exponents: dict[str, int | list[int]],
    samples: Batch,
    bits: int,
    widths: dict[str, int],
    providers: Sequence[str],
    threads: int | None,
) -> tuple[onnx.ModelProto, int]:
    """Bias correction for a fixed method (opt-in): the input means measured on the kept samples."""
    reference = _layer_inputs(model, plan, samples, providers, threads)
    if not reference:
        return model, 0
    bits_of = plan.weight_widths(widths, bits)
    shifts = bias_shifts(model, plan, exponents, channel_means(reference, list(reference)), bits_of)
    return (shift_biases(model, shifts) if shifts else model), len(shifts)


def _weight_rounded(
    model: onnx.ModelProto,
    plan: CalibrationPlan,
    exponents: dict[str, int | list[int]],
    samples: Batch,
    bits: int,
    widths: dict[str, int],
    int16: list[str],
    per_channel: bool,
    providers: Sequence[str],
    threads: int | None,
) -> tuple[onnx.ModelProto, RoundingStats]:
    """Weight rounding for a fixed method (opt-in): the layer inputs of the float model and of the simulated
    chip with this table, on the kept samples."""
    reference = _layer_inputs(model, plan, samples, providers, threads)
    if not reference:
        return model, RoundingStats()
    table = QuantTable(exponents, {"bits": bits, "int16_layers": int16})
    profile = _search_profile(per_channel)
    simulated = simulated_values(model, table, profile, bits, samples, list(reference))
    if simulated is None:
        return model, RoundingStats()
    bits_of = plan.weight_widths(widths, bits)
    return rounded_weight_model(model, plan, exponents, reference, simulated, bits_of)
