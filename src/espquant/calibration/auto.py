"""``auto`` calibration: choose each activation exponent (and, for per-tensor weights, each widely spread
weight's) by the error the chip would really make.

The four observers (min-max, entropy, percentile, mse) each propose an exponent from the same statistics
(one calibration pass, one histogram per tensor); which is best differs per tensor and per model, because
none of them sees what the next layers do with the rounding and clipping. Exponents are few and discrete,
and espquant's simulator is bit-exact and fast, so instead of guessing we measure, on a bounded subset of
the calibration data (``SEARCH_SAMPLES``, more for small inputs: ``search_sample_count``):

0. the four fixed methods' own tables (their weights' method included), for the model as given and for its
   cross-layer equalized twin (``optimizer/equalize.py``, ReLU6 pairs included where the calibration peaks
   allow: ``_equalized``), and the best of them with bias correction (``bias_correction.py``; on unless the
   caller turns it off, the table then carries the corrections as ``bias_shifts``), the better one being the
   starting point;
1. layer by layer in topological order, with the earlier layers already at their chosen exponents, the
   candidate that gives that tensor the smallest simulated error against the float model;
2. greedy refinement on the model's outputs: for each tensor, try ``e - 1`` and ``e + 1`` and keep a move
   when the outputs' error drops (at most ``GREEDY_PASSES`` sweeps, stopping when one changes nothing);
   stages 1-2 run for the plain and the equalized model both when their best starts are within
   ``FAMILY_MARGIN`` of each other (each with its own share of the budget), and the better result goes on;
3. each output's head (``output_heads``: the output and the tensors it copies its exponent from through
   data-movement ops and Concats, back to the layers that compute it; for a Softmax's float probabilities,
   its logits) walks its exponent down, then up, one
   step at a time while the outputs' error drops, at most ``HEAD_STEPS`` trials per output and
   ``MAX_HEAD_SIMULATIONS`` in all, on top of the budget. The stages above move one tensor at a time, but a
   detector's score head is often several convolutions whose outputs are concatenated: only moving them
   together changes the step the chip rounds the scores to;
4. per-tensor weights only (ESP32-S3, the plain-C chips): the weights whose channels differ widely in range
   (``spread_weights``: a depthwise layer after BatchNorm folding often has one channel 20-30x its median
   one, and one exponent for them all leaves the median channel a handful of levels) take finer exponents,
   which saturate their largest weights: first all of them one step at a time together, then each on its
   own, while the outputs' error drops, at most ``MAX_WEIGHT_SIMULATIONS`` simulations on top of the budget.
   Cross-layer equalization cannot help there when a ReLU6 sits between the layers (MobileNetV2, MediaPipe);
5. when asked (``weight_rounding``), the weights rounded by layer output for the chosen table
   (``weight_rounding.py``, one simulation to see the layer inputs the chip computes), kept when the outputs'
   error drops;
at most ``simulation_budget(N, S)`` simulations in stages 0-2: about as many simulated samples as there are
calibration samples, between ``MIN_SIMULATIONS`` and ``MAX_SIMULATIONS`` (a count, so the result does not
depend on the machine).

Every candidate table is made by ``assign_exponents`` from the searched exponents, so ESP-DL's rules (fused
Relu, pass-through ops, shared Concat exponents, no left shifts, shift bounds) hold for each one exactly as
for the fixed methods. Every fixed method's table is one of the candidates and the result is the best table
measured, so ``auto`` is never worse than any fixed method on the search data. Everything is
deterministic: the subset is the first samples, and the budget counts simulations, not seconds.

The activations searched include each PRelu's output (``rescaled_outputs``): with a slope below 1 its range
can be smaller than its input's, and every candidate table gives it the exponent of its own range where that
is finer (the lowering adds a RequantizeLinear on targets whose PRelu kernel cannot rescale).

The error of an inner tensor is its mean squared error over the mean square of the float values (a
relative error, so tensors of different scales weigh alike): the noise power the next layers receive. The
error of an output is its mean absolute error over the mean absolute float value (over 1 for probabilities,
``probability_outputs``), and the outputs' error is the mean of theirs. Absolute, not squared: an output's
far tail (a detector's background logits at -200, which any threshold or sigmoid reads as "no") would
otherwise outweigh the resolution of its every other value, and the search would buy that tail with a
rounding step of 2 at the decision threshold. Measured on
MediaPipe's BlazeFace, S3 int8: the squared error keeps the score head at exponent 0 or 1 (detection
agreement with float 55-69 %), the absolute error takes it to -3 (84 %); no classifier's table changed.
"""

from __future__ import annotations

import logging
from collections import ChainMap
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from espquant.calibration.bias_correction import bias_corrected_inputs, bias_shifts
from espquant.calibration.collector import _exposing
from espquant.calibration.dataset import Batch, Chunking
from espquant.calibration.exponents import assign_exponents, cover_aligned_inputs
from espquant.calibration.observers import OBSERVER_METHODS, Observer, candidate_exponents, finite_range
from espquant.calibration.plan import CalibrationPlan, plan_calibration
from espquant.calibration.weight_rounding import rounded_weight_model
from espquant.errors import EspquantError
from espquant.graph import BiasShift, GraphView, WeightFactor, scale_initializers, shift_biases
from espquant.ops import ExponentRule, get_op_spec
from espquant.ops.activations import SOFTMAX_FAMILY
from espquant.optimizer.equalize import Equalization
from espquant.quant.pot import exponent_for_max_abs, qmax
from espquant.quant.profiles import TargetProfile
from espquant.runtime import create_session
from espquant.table import QuantTable

__all__ = [
    "SearchResult",
    "search_exponents",
    "simulation_budget",
    "output_heads",
    "SEARCH_SAMPLES",
    "search_sample_count",
    "VALIDATION_SAMPLES",
    "GREEDY_PASSES",
    "HEAD_STEPS",
]

logger = logging.getLogger(__name__)

SEARCH_SAMPLES = 32  # calibration samples the search simulates (the first ones), at least
# Small inputs (an MNIST digit, a 24x24 face crop) take more search samples, up to MAX_SEARCH_SAMPLES, as many as
# hold SEARCH_VALUES input values (``search_sample_count``): simulating them costs little more than 32 (a
# candidate's cost is mostly its lowering and sessions there), and 32 samples decide too little. Measured on a
# trained MNIST MLP (ESP32-S3, 500 test digits): with 32 the search fitted its few uncertain digits and ended
# at 28.6 dB output SQNR, 4 dB below the fixed methods' tables it started from; with 64 or more, 33.4 dB.
SEARCH_VALUES = 1 << 17
MAX_SEARCH_SAMPLES = 256
VALIDATION_SAMPLES = 64  # the next ones, on which the plain and the equalized model's best tables are compared
# Fewer validation samples than search samples (a small calibration set) say no more than the search samples:
# those decide then.
MIN_VALIDATION = SEARCH_SAMPLES
GREEDY_PASSES = 1
HEAD_STEPS = 6  # trials per output for its head's exponent walk (stage 3), beyond the budget
MAX_HEAD_SIMULATIONS = 24  # the walk's simulations in all
MEDIAN_LEVELS = 32  # per-tensor weights whose median channel keeps fewer levels than this are walked (stage 4)
WEIGHT_STEPS = 3  # finer weight exponents tried per layer (stage 4), at most log2 of its spread
MAX_WEIGHT_SIMULATIONS = 24  # the weight walk's simulations in all, beyond the budget
MAX_SIMULATIONS = 40  # a count, not seconds: the same data gives the same table on any machine
MIN_SIMULATIONS = 8  # the fixed methods' four tables, bias correction, and a few layer-wise trials
# Simulated samples per calibration sample: the search's budget grows with the calibration set, so its cost
# stays a bounded multiple of the calibration pass (the simulator costs a few float passes per sample).
SIMULATED_SHARE = 1.0
REFERENCE_RUN_VALUES = 1 << 20  # input values per onnxruntime run of ``float_reference`` (4 MB of float32)
RUN_VALUES = 1 << 20  # values of the largest activation one simulated run holds (``samples_per_run``: 4 MB of float32)


def search_sample_count(values_per_sample: int) -> int:
    """How many calibration samples the search simulates for inputs of ``values_per_sample`` values (all inputs
    together): as many as hold ``SEARCH_VALUES``, within ``[SEARCH_SAMPLES, MAX_SEARCH_SAMPLES]``."""
    return max(SEARCH_SAMPLES, min(MAX_SEARCH_SAMPLES, SEARCH_VALUES // max(values_per_sample, 1)))


def simulation_budget(calibration_samples: int, search_samples: int) -> int:
    """How many candidate tables the search may simulate: ``SIMULATED_SHARE * N / S``, within
    ``[MIN_SIMULATIONS, MAX_SIMULATIONS]``. Deterministic: it depends on the data's size, not on the clock."""
    budget = int(SIMULATED_SHARE * calibration_samples / max(search_samples, 1))
    return max(MIN_SIMULATIONS, min(MAX_SIMULATIONS, budget))


TINY = 1e-30
_UNSEEN = object()  # a table not simulated yet (``_Search.errors``)


@dataclass
class SearchResult:
    """What the search chose, and what it measured (errors on the search samples)."""

    observed: dict[str, int]  # the exponents fed to assign_exponents
    weight_method: str
    model: onnx.ModelProto  # the float model the table is for (equalized, bias-corrected, weights rounded, or as given)
    bias_shifts: list[BiasShift]  # bias correction kept (``model`` has them applied, after the weight factors)
    error: float
    minmax_error: float
    evaluations: int
    choices: dict[str, str] = field(default_factory=dict)  # tensor -> the method(s) whose exponent won
    rounded_layers: int = 0  # layers whose weights were rounded by layer output (weight_rounding.py)
    narrowed_weights: dict[str, int] = field(default_factory=dict)  # weight -> its exponent's offset from the method's
    # Cross-layer equalization kept (``model`` has them applied): the factors, and the pairs they rescale.
    weight_factors: list[WeightFactor] = field(default_factory=list)
    equalized_pairs: int = 0


@dataclass
class _Variant:
    """One float model the search simulates (the model, or its equalized, bias-corrected or rounded twin) with
    its plan."""

    model: onnx.ModelProto
    plan: CalibrationPlan
    weight_method: str
    shifts: list[BiasShift] = field(default_factory=list)  # bias correction, applied to ``model``
    rounded: int = 0
    equalization: Equalization | None = None  # applied to ``model``
    # The float values of the tensors equalization rescales (the search's reference holds the plain model's).
    reference: Mapping[str, np.ndarray] = field(default_factory=dict)
    _powers: dict[str, float] = field(default_factory=dict, repr=False)

    def power(self, tensor: str) -> float:
        """The mean square of ``reference[tensor]``, computed once (every layer-wise trial of it reads it)."""
        if tensor not in self._powers:
            self._powers[tensor] = _power(self.reference[tensor])
        return self._powers[tensor]


class _Rescaled(Mapping[str, np.ndarray]):
    """The float values of the tensors equalization rescales, from the plain model's: each channel (axis 1, the
    channels of a Conv pair) divided by its divisor, as equalization divides it (exactly, in real arithmetic),
    made when read (the last one kept: the layer-wise stage reads one tensor for each of its candidates). Not a
    second copy of every activation of the search samples: on MediaPipe's 224x224 hand landmarks that was another
    gigabyte, and a float pass of the equalized model exposing them all."""

    def __init__(self, plain: Mapping[str, np.ndarray], divisors: dict[str, np.ndarray]) -> None:
        self.plain = plain
        self.divisors = {name: divisor for name, divisor in divisors.items() if name in plain}
        self._last: tuple[str, np.ndarray] | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        values = self.plain[name]
        divisor = np.asarray(self.divisors[name], dtype=np.float64).reshape(1, -1, *[1] * (values.ndim - 2))
        rescaled = (values / divisor).astype(np.float32)
        self._last = (name, rescaled)
        return rescaled

    def __iter__(self) -> Iterator[str]:
        return iter(self.divisors)

    def __len__(self) -> int:
        return len(self.divisors)


def _relative_error(simulated: np.ndarray, reference: np.ndarray, power: float) -> float:
    """Mean squared error over the float values' mean square (``power``, computed once per tensor). The
    difference is taken in place in ``simulated`` when that is a double array (the caller's own, read no more):
    a second array of an activation's size in double is a large model's biggest allocation here."""
    if not reference.size:
        return 0.0
    scratch = simulated if simulated.dtype == np.float64 and simulated.flags.writeable else None
    difference = np.subtract(simulated, reference, out=scratch, dtype=np.float64)
    return float(np.vdot(difference, difference).real) / difference.size / max(power, TINY)


def _relative_deviation(simulated: np.ndarray, reference: np.ndarray, magnitude: float) -> float:
    """Mean absolute error over the float values' mean absolute value (``magnitude``, computed once)."""
    if not reference.size:
        return 0.0
    return float(np.mean(np.abs(np.subtract(simulated, reference, dtype=np.float64)))) / max(magnitude, TINY)


def _magnitude(values: np.ndarray) -> float:
    """The mean absolute float value, in double."""
    return float(np.mean(np.abs(values), dtype=np.float64)) if values.size else 0.0


def _power(values: np.ndarray) -> float:
    """The mean square of the float values, in double."""
    return float(np.mean(np.square(values, dtype=np.float64))) if values.size else 0.0


def float_reference(
    model: onnx.ModelProto, names: Sequence[str], samples: Batch, providers: Sequence[str], threads: int | None
) -> dict[str, np.ndarray]:
    """The float model's values of ``names`` on ``samples`` (onnxruntime), run a few samples at a time (a free
    batch: ``REFERENCE_RUN_VALUES`` input values a run; a fixed batch B: B) and written into one array per
    tensor. One run of 32 224x224 images exposing every activation held each twice, onnxruntime's and numpy's;
    so did joining 32 single-image runs. A tensor without the samples first takes the runs the model takes
    (``Chunking.run``)."""
    fetched = [n for n in dict.fromkeys(names) if n not in samples]
    session = create_session(_exposing(model, fetched), list(providers), threads, what="the model for auto calibration")
    kept = {n: v for n, v in samples.items() if n in names}
    chunking = Chunking.of(model)

    def in_model_runs() -> dict[str, np.ndarray]:
        values = chunking.run(lambda feeds: session.run(fetched, feeds), samples, "the search samples")
        return {**dict(zip(fetched, values)), **kept}

    sizes = {len(v) for v in samples.values()}
    per_sample = sum(int(np.prod(np.shape(v)[1:])) for v in samples.values())
    step = chunking.fixed or max(2, REFERENCE_RUN_VALUES // max(per_sample, 1))  # 2: a tensor without samples shows
    if len(sizes) != 1 or step >= min(sizes):
        return in_model_runs()
    total = sizes.pop()
    chunking.check_total(total, "the search samples")
    joined: dict[str, np.ndarray] = {}
    for start in range(0, total, step):
        part = session.run(fetched, {k: v[start : start + step] for k, v in samples.items()})
        count = min(step, total - start)
        if any(np.ndim(value) == 0 or len(value) != count for value in part):
            return in_model_runs()
        for name, value in zip(fetched, part):
            if name not in joined:
                joined[name] = np.empty((total, *value.shape[1:]), value.dtype)
            joined[name][start : start + count] = value
    return joined | kept


def samples_per_run(model: onnx.ModelProto, reference: dict[str, np.ndarray]) -> int | None:
    """How many samples one simulated run of a candidate table takes: as many as keep the largest activation of
    ``reference`` (float values with the samples on their first axis) within ``RUN_VALUES``; None (all in one
    run) for a model with a fixed batch (simulated B at a time anyway) or a tensor without the samples first.

    Every candidate runs on new onnxruntime sessions, whose first run allocates each intermediate tensor
    afresh: on MediaPipe's 224x224 hand landmarks, 32 samples in one run took 0.69 s, in runs of 4 0.42 s
    (warm sessions take the same time either way). Small models keep one run (runs cost calls)."""
    sizes = {len(values) for values in reference.values() if values.ndim}
    if Chunking.of(model).fixed is not None or len(sizes) != 1:
        return None
    largest = max(values.size // max(len(values), 1) for values in reference.values() if values.ndim)
    return max(1, RUN_VALUES // max(largest, 1))


def simulated_values(
    model: onnx.ModelProto,
    table: QuantTable,
    profile: TargetProfile,
    bits: int,
    samples: Batch,
    tensors: Sequence[str] = (),
    per_run: int | None = None,
) -> dict[str, np.ndarray] | None:
    """The simulated chip's outputs and ``tensors`` on ``samples``, dequantized (float64), ``per_run`` samples
    a run (``samples_per_run``; None: one run); None when the lowering refuses the table (a candidate the chip
    cannot run)."""
    from espquant.simulator.lowering import build_quantized_model
    from espquant.simulator.simulate import simulate

    lowering_log = logging.getLogger("espquant.simulator.lowering")
    level = lowering_log.level
    lowering_log.setLevel(logging.ERROR)  # its per-layer warnings are the final table's to give, once
    try:
        quantized = build_quantized_model(model, table, profile, bits)
        quantized.blocked_layout = False  # a few runs only (QuantizedModel.blocked_layout)
        produced = {o for node in quantized.nodes for o in node.outputs} | set(quantized.inputs)
        extra = [t for t in tensors if t in produced]
        quantized.outputs = list(dict.fromkeys([*quantized.outputs, *extra]))
        total = len(next(iter(samples.values())))
        if per_run is None or per_run >= total:
            values = simulate(quantized, model, samples, to_float=True)[0]
        else:
            runs = [
                simulate(quantized, model, {k: v[i : i + per_run] for k, v in samples.items()}, to_float=True)[0]
                for i in range(0, total, per_run)
            ]
            values = [np.concatenate(parts) for parts in zip(*runs)]
        return {n: np.asarray(v, dtype=np.float64) for n, v in zip(quantized.outputs, values)}
    except EspquantError as error:
        logger.debug("auto calibration: candidate refused: %s", error)
        return None
    finally:
        lowering_log.setLevel(level)


def channel_means(values: Mapping[str, np.ndarray], tensors: Sequence[str]) -> dict[str, np.ndarray]:
    """Mean of every channel of each layer input: axis 1 of a Conv input (rank >= 3), the last of a Gemm's."""
    means = {}
    for name in tensors:
        value = np.asarray(values[name], dtype=np.float64)
        axis = 1 if value.ndim >= 3 else value.ndim - 1
        means[name] = value.mean(axis=tuple(a for a in range(value.ndim) if a != axis))
    return means


class _Search:
    """Simulates candidate tables (cached by their final exponents) and scores them."""

    def __init__(
        self,
        plan: CalibrationPlan,
        bits: int,
        per_channel: bool,
        widths: dict[str, int],
        int16: list[str],
        samples: Batch,
        reference: dict[str, np.ndarray],
        outputs: list[str],
        profile: TargetProfile,
        own: dict[str, int],
        per_run: int | None = None,
    ):
        self.bits, self.per_channel, self.widths, self.int16 = bits, per_channel, widths, int16
        self.own = own
        self.samples, self.profile = samples, profile
        # Kept as onnxruntime gave them (float32): errors and powers are taken in double where they are used, so
        # a double copy of every activation of every search sample is not held (nor made, about a tenth of the
        # search's time on MobileNetV3).
        self.reference = reference
        self.power = {name: _power(v) for name, v in reference.items()}
        self.magnitude = {name: _magnitude(reference[name]) for name in outputs}
        self.fixed = dict(plan.fixed)
        self.per_run = per_run  # samples per simulated run (``samples_per_run``)
        self.outputs = outputs
        # table -> (outputs' error, {tensor: its error}) of its simulation, None for a table the lowering refuses
        self.cache: dict[tuple, tuple[float, dict[str, float]] | None] = {}
        self.evaluations = 0

    def table(self, variant: _Variant, observed: dict[str, int]) -> QuantTable:
        """The table ``assign_exponents`` makes from these activation exponents (ESP-DL's rules applied), after
        ``cover_aligned_inputs`` as the final table is: what is measured is what is written."""
        chosen = observed | self.fixed
        cover_aligned_inputs(variant.model, variant.plan, chosen, self.own, self.bits, self.widths)
        assignment = assign_exponents(
            variant.model,
            variant.plan,
            chosen,
            self.bits,
            self.per_channel,
            self.widths,
            variant.weight_method,
        )
        return QuantTable(assignment.exponents, {"bits": self.bits, "int16_layers": self.int16})

    def errors(self, variant: _Variant, observed: dict[str, int], tensor: str | None = None) -> tuple[float, float]:
        """The outputs' error of the table these exponents make and, when asked, ``tensor``'s (0 without one, or
        for a tensor the integer model does not hold); both infinite when the lowering refuses the table.

        Only what is scored is fetched: exposing every activation would keep onnxruntime from fusing the
        compiled segments and cost a copy of each. Only the errors are kept, by table: the simulated values of
        every table tried (an activation of 32 samples each, in double) filled gigabytes on 640x640 inputs."""
        table = self.table(variant, observed)
        key = (id(variant), tensor, tuple(sorted((k, repr(v)) for k, v in table.exponents.items())))
        scores = self.cache.get(key, _UNSEEN)
        if scores is _UNSEEN:
            plain = self.cache.get((key[0], None, key[2]), _UNSEEN)
            if tensor is not None and plain is not _UNSEEN and (plain is None or tensor in plain[1]):
                scores = plain
        if scores is _UNSEEN:
            self.evaluations += 1
            extra = [tensor] if tensor else []
            values = simulated_values(variant.model, table, self.profile, self.bits, self.samples, extra, self.per_run)
            scores = None if values is None else self._scores(values, variant)
            self.cache[key] = scores
        if scores is None:
            return float("inf"), float("inf")
        return scores[0], scores[1].get(tensor, 0.0) if tensor is not None else 0.0

    def error(self, variant: _Variant, observed: dict[str, int]) -> float:
        """The outputs' error of the table these exponents make (``errors``)."""
        return self.errors(variant, observed)[0]

    def _scores(self, values: dict[str, np.ndarray], variant: _Variant) -> tuple[float, dict[str, float]]:
        """The outputs' error and each simulated tensor's, the outputs' first (a tensor's error may take its
        difference in place: ``_relative_error``)."""
        deviations = [_relative_deviation(values[o], self.reference[o], self.magnitude[o]) for o in self.outputs]
        return float(np.mean(deviations)), {name: self._tensor_error(values, name, variant) for name in values}

    def _tensor_error(self, values: dict[str, np.ndarray], tensor: str, variant: _Variant) -> float:
        if tensor in variant.reference:
            return _relative_error(values[tensor], variant.reference[tensor], variant.power(tensor))
        if tensor not in self.reference:
            return 0.0
        return _relative_error(values[tensor], self.reference[tensor], self.power[tensor])

    def reference_of(self, variant: _Variant) -> Mapping[str, np.ndarray]:
        """The float values of ``variant``'s model: the plain model's, with what equalization rescales."""
        return ChainMap(variant.reference, self.reference) if variant.reference else self.reference


def _candidates(
    observers: dict[str, Observer], source: dict[str, str], width: Callable[[str], int]
) -> dict[str, dict[str, int]]:
    """Tensor -> {method: exponent}; a tensor whose range comes from its reader (``range_from``) takes the
    reader's candidates at its own width."""
    return {name: candidate_exponents(finite_range(src, observers[src]), width(name)) for name, src in source.items()}


def _layerwise(
    search: _Search,
    variant: _Variant,
    order: list[str],
    options: dict[str, list[int]],
    current: dict[str, int],
    best: list,
    budget: int,
) -> None:
    """Stage 1: each tensor in topological order takes the candidate with the least error of its own."""
    for name in order:
        if len(options[name]) < 2 or search.evaluations >= budget:
            continue
        scores = []
        for exponent in options[name]:
            trial = current | {name: exponent}
            output_error, tensor_error = search.errors(variant, trial, name)
            scores.append((tensor_error, -exponent))
            _remember(best, output_error, trial)
        current[name] = -min(scores)[1]


def _remember(best: list, error: float, observed: dict[str, int]) -> bool:
    """Keep ``observed`` in ``best = [error, observed]`` when its output error is lower."""
    if error < best[0]:
        best[0], best[1] = error, dict(observed)
        return True
    return False


def _greedy(search: _Search, variant: _Variant, order: list[str], best: list, passes: int, budget: int) -> None:
    """Stage 2: +-1 moves per tensor kept when the outputs' error drops."""
    for _ in range(passes):
        moved = False
        for name in order:
            for step in (-1, 1):
                if search.evaluations >= budget:
                    return
                trial = best[1] | {name: best[1][name] + step}
                if _remember(best, search.error(variant, trial), trial):
                    moved = True
                    break
        if not moved:
            return


def rescaled_outputs(plan: CalibrationPlan) -> list[str]:
    """The outputs of the pass-through ops that may still take a finer exponent of their own
    (``OpSpec.rescaled_output``: PRelu), in topological order. ``auto`` measures them like every other
    activation, so each candidate table (the four it starts from included) gives a PRelu the exponent of its own
    output's range where that is finer than its input's: with a slope below 1 the negatives shrink (ESP-PPQ
    gives every PRelu its own exponent; on MTCNN P-Net it is worth about 1 dB)."""
    return [node.output[0] for node, spec in plan.nodes if spec.rescaled_output and node.output and node.output[0]]


def spread_weights(plan: CalibrationPlan, model: onnx.ModelProto, widths: dict[str, int], bits: int) -> dict[str, int]:
    """Per-tensor weight -> how many finer exponents may pay off: ``log2`` of its spread (largest channel
    range over the median one), for weights whose median channel keeps fewer than ``MEDIAN_LEVELS`` levels at
    their layer's width (int8: a spread of 4 or more; int16 layers hardly ever); widest spread first.

    One exponent covers every channel of a per-tensor weight (ESP32-S3, the plain-C chips), so a depthwise
    layer whose largest channel is 28x its median one leaves that median channel about 4 of int8's 127 levels.
    A finer exponent saturates the few largest weights and doubles the levels of every other channel; only
    the model's outputs can say whether that trade pays."""
    view = GraphView(model.graph)
    layer_bits = plan.weight_widths(widths, bits)
    spreads = {}
    for use in plan.weights:  # constants by construction (plan_calibration)
        if use.channel_axis is None or use.tensor in spreads:
            continue
        values = np.abs(view.array(use.tensor).astype(np.float64))
        if values.ndim < 2 or not np.isfinite(values).all():
            continue
        ranges = np.moveaxis(values, use.channel_axis, 0).reshape(values.shape[use.channel_axis], -1).max(axis=1)
        median = float(np.median(ranges))
        spread = float(ranges.max()) / median if median > 0 else 0.0
        if spread > 0 and qmax(layer_bits[use.tensor]) / spread < MEDIAN_LEVELS:
            spreads[use.tensor] = spread
    ordered = sorted(spreads, key=lambda t: -spreads[t])
    return {t: min(WEIGHT_STEPS, int(np.log2(spreads[t]))) for t in ordered}


def _walk_weights(search: _Search, variant: _Variant, weights: dict[str, int], best: list) -> dict[str, int]:
    """Stage 4: the widely spread per-tensor weights (``spread_weights``) step their exponents down from the
    ones their weight method gives, first all together (each at most its own steps), then each on its own,
    while the outputs' error drops; at most ``MAX_WEIGHT_SIMULATIONS`` simulations in all. Returns weight ->
    steps taken (negative), for those moved."""
    stop = search.evaluations + MAX_WEIGHT_SIMULATIONS
    exponents = search.table(variant, best[1]).exponents
    starts = {w: exponents[w] for w in weights if isinstance(exponents.get(w), int)}
    for step in range(1, max([weights[w] for w in starts], default=0) + 1):  # together: a trunk's worth of layers
        if search.evaluations >= stop:
            break
        trial = best[1] | {w: start - min(step, weights[w]) for w, start in starts.items()}
        if not _remember(best, search.error(variant, trial), trial):
            break
    for weight, start in starts.items():  # then each on its own, further down
        for exponent in range(best[1].get(weight, start) - 1, start - weights[weight] - 1, -1):
            if search.evaluations >= stop:
                break
            trial = best[1] | {weight: exponent}
            if not _remember(best, search.error(variant, trial), trial):
                break
    return {w: best[1][w] - start for w, start in starts.items() if best[1].get(w, start) != start}


PROBABILITY_OPS = frozenset({"Sigmoid", "Softmax", "HardSigmoid"})


def probability_outputs(model: onnx.ModelProto, outputs: Sequence[str]) -> list[str]:
    """The outputs computed by a Sigmoid, Softmax or HardSigmoid (through data-movement ops): probabilities.

    Their error is measured in probability units (magnitude 1), not relative to their mean value: a hand
    detector's "hand present" score on calibration images without hands is about 1e-5, and relative to that
    any rounding is a 100 % error, so that one output would steer the whole search (on MediaPipe's hand
    landmarks: finer and finer steps for a score nobody reads below 0.5, at the landmarks' expense)."""
    producer = {o: node for node in model.graph.node for o in node.output}
    found = []
    for output in outputs:
        node = producer.get(output)
        while node is not None and node.input and get_op_spec(node.op_type) is not None:
            if node.op_type in PROBABILITY_OPS:
                found.append(output)
                break
            if get_op_spec(node.op_type).exponent is not ExponentRule.PASSTHROUGH:
                break
            node = producer.get(node.input[0])
    return found


def output_heads(model: onnx.ModelProto, outputs: Sequence[str], searched: set[str]) -> dict[str, list[str]]:
    """Output -> the searched tensors whose exponents its value is made at: the output, and backwards through
    the ops that keep their input's exponent (Reshape, Transpose, ...) or share it (Concat), the outputs of
    the layers that compute it: the exponents at which the chip rounds and clips that output. A Softmax's float
    probabilities are made at its logits' step: on a trained MNIST MLP (ESP32-S3) one step finer than min-max,
    clipping the confident digits' far logits, took the probabilities from 36.4 to 39.1 dB."""
    producer = {o: node for node in model.graph.node for o in node.output}
    heads = {}
    for output in outputs:
        head, pending = [], [output]
        while pending:
            tensor = pending.pop()
            if tensor in head:
                continue
            head.append(tensor)
            node = producer.get(tensor)
            spec = get_op_spec(node.op_type) if node is not None else None
            if spec is not None and spec.exponent is ExponentRule.SHARED:
                pending += [i for i in node.input if i]
            elif spec is not None and spec.exponent is ExponentRule.PASSTHROUGH and node.input:
                pending.append(node.input[0])
            elif node is not None and node.op_type in SOFTMAX_FAMILY and tensor not in searched and node.input:
                pending.append(node.input[0])  # float probabilities: the logits' step is their resolution
        heads[output] = [t for t in head if t in searched]
    return heads


def _walk_heads(search: _Search, variant: _Variant, heads: dict[str, list[str]], best: list) -> None:
    """Stage 3: each head's exponent steps down (its coarsest members first), then up, while the error drops;
    at most ``HEAD_STEPS`` trials per head and ``MAX_HEAD_SIMULATIONS`` simulations in all (a model with
    many outputs walks the first ones)."""
    stop = search.evaluations + MAX_HEAD_SIMULATIONS
    for head in heads.values():
        if not head:
            continue
        tried = 0
        for step, limit in ((-1, min), (1, max)):
            moved = False
            edge = max(best[1][t] for t in head) if step < 0 else min(best[1][t] for t in head)
            while tried < HEAD_STEPS and search.evaluations < stop:
                edge += step
                trial = best[1] | {t: limit(best[1][t], edge) for t in head}
                tried += 1
                if not _remember(best, search.error(variant, trial), trial):
                    break
                moved = True
            if moved:  # a head that got finer is not tried coarser
                break


def _refined(
    search: _Search,
    variant: _Variant,
    order: list[str],
    candidates: dict[str, dict[str, int]],
    observed: dict[str, int],
    error: float,
    greedy_passes: int,
    stop: int,
) -> list:
    """Stages 1-2 from the table ``observed`` (output error ``error``) until ``stop`` evaluations: the best
    table found, as ``[error, observed]``."""
    options = {name: sorted(set(c.values()), reverse=True) for name, c in candidates.items()}
    best = [error, dict(observed)]
    current = dict(observed)
    _layerwise(search, variant, order, options, current, best, stop)
    _remember(best, search.error(variant, current), current)
    _greedy(search, variant, order, best, greedy_passes, stop)
    return best


def _validated(
    search: _Search,
    finalists: list[tuple[float, int, _Variant, list]],
    validation: Batch | None,
    outputs: list[str],
    probabilities: list[str],
    providers: Sequence[str],
    threads: int | None,
) -> tuple[float, int, _Variant, list]:
    """The finalist (one per family: ``(error, family, variant, [error, observed])``) with the least output error
    on the validation samples, when there are two and at least ``MIN_VALIDATION`` samples; else the one with the
    least error on the search samples.

    The search samples decide thousands of small choices and are few: on PP-OCR's direction classifier the
    equalized table measured 0.017 there (plain 0.029) and 0.073 on the test images (plain 0.046), the first 32
    samples holding none of the uncertain lines. Equalization changes every layer at once, so it is judged on
    samples the search did not fit."""
    size = len(next(iter(validation.values()))) if validation else 0
    if len(finalists) < 2 or size < MIN_VALIDATION:
        return min(finalists, key=lambda f: f[:2])
    reference = float_reference(finalists[0][2].model, outputs, validation, providers, threads)
    magnitude = {o: 1.0 if o in probabilities else _magnitude(reference[o]) for o in outputs}
    scored = []
    for error, family, variant, best in finalists:
        search.evaluations += 1
        table = search.table(variant, best[1])
        values = simulated_values(variant.model, table, search.profile, search.bits, validation, (), search.per_run)
        checked = float("inf") if values is None else _validation_error(values, reference, magnitude, outputs)
        logger.info("auto calibration: family %d output error %.4g (search samples %.4g)", family, checked, error)
        scored.append((checked, family, variant, best))
    return min(scored, key=lambda f: f[:2])


def _validation_error(
    values: dict[str, np.ndarray], reference: dict[str, np.ndarray], magnitude: dict[str, float], outputs: list[str]
) -> float:
    """The outputs' error (as ``_Search.errors``) against another set of samples' float values."""
    return float(np.mean([_relative_deviation(values[o], reference[o], magnitude[o]) for o in outputs]))


EQUALIZED_TOLERANCE = 1e-4  # largest change of an output, relative to its largest value, equalization may make
FAMILY_MARGIN = 0.1  # a family (plain, equalized) whose best start is this close to the best is searched too


def _equalized(
    search: _Search,
    model: onnx.ModelProto,
    equalization: Equalization | None,
    peaks: dict[str, np.ndarray],
    candidates: dict[str, dict[str, int]],
    source: dict[str, str],
    width: Callable[[str], int],
    outputs: Sequence[str],
    providers: Sequence[str],
    threads: int | None,
) -> tuple[dict[str, _Variant], dict[str, dict[str, int]]] | None:
    """The equalized twins of the model (per weight method) and the candidates of the tensors they rescale, or
    None when there is nothing to equalize or the float outputs on the search samples move by more than
    ``EQUALIZED_TOLERANCE`` (a clamp reached after all: equalization must not change the float model).

    A rescaled tensor's candidates keep each method's offset from min-max; its min-max exponent is that of its
    largest channel after rescaling (``peaks``, over all the calibration data)."""
    if equalization is None or not equalization.factors:
        return None
    equalized = scale_initializers(model, equalization.factors)
    values = float_reference(equalized, outputs, search.samples, providers, threads)
    for output in outputs:
        reference = search.reference[output]
        change = float(np.max(np.abs(values[output] - reference), initial=0.0))
        if change > EQUALIZED_TOLERANCE * float(np.max(np.abs(reference), initial=TINY)):
            logger.info("equalization left out: it changes output %r by %.3g on the search samples", output, change)
            return None
    moved = {}
    for name, src in source.items():
        if src in equalization.divisors and src in peaks and name in candidates:
            top = float(np.max(peaks[src] / equalization.divisors[src], initial=0.0))
            shift = exponent_for_max_abs(top, width(name)) - candidates[name]["minmax"]
            moved[name] = {method: exponent + shift for method, exponent in candidates[name].items()}
    plan = plan_calibration(equalized)
    rescaled_values = _Rescaled(search.reference, equalization.divisors)
    variants = {
        w: _Variant(equalized, plan, w, equalization=equalization, reference=rescaled_values) for w in ("minmax", "mse")
    }
    return variants, candidates | moved


def search_exponents(
    model: onnx.ModelProto,
    plan: CalibrationPlan,
    observers: dict[str, Observer],
    range_from: dict[str, str],
    bits: int,
    per_channel: bool,
    widths: dict[str, int],
    int16: list[str],
    samples: Batch,
    profile: TargetProfile,
    *,
    bias_correction: bool = True,
    weight_rounding: bool = False,
    own: dict[str, int] | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    threads: int | None = None,
    greedy_passes: int = GREEDY_PASSES,
    max_simulations: int = MAX_SIMULATIONS,
    equalization: Equalization | None = None,
    peaks: dict[str, np.ndarray] | None = None,
    validation: Batch | None = None,
) -> SearchResult:
    """Choose the activation exponents by simulated error (module docstring).

    Args:
        observers: histogram observers of the measured tensors (any method: every candidate is computed).
        range_from: Conv output -> the reader output whose observer gives its candidates.
        samples: the search samples (float inputs by name).
        own: the exponents of the tensors' own ranges where the table gives them their reader's
            (``cover_aligned_inputs``).
        profile: the target simulated (the table stays target-independent).
        equalization: cross-layer equalization to measure against the plain weights; ``peaks`` (the
            largest ``|x|`` of each channel of the tensors it rescales, on the calibration data) give the
            rescaled tensors their candidate exponents.
        validation: calibration samples the search does not see, on which the plain and the equalized model's
            best tables are compared (``_validated``).
    """
    width = lambda name: widths.get(name, bits)  # noqa: E731
    source = {name: name for name in observers} | dict(range_from)
    candidates = _candidates(observers, source, width)
    positions = {o: i for i, node in enumerate(model.graph.node) for o in node.output}
    order = sorted(source, key=lambda name: positions.get(name, -1))
    outputs = [o.name for o in model.graph.output]
    wanted = bias_correction or weight_rounding
    layer_inputs = [tensor for tensor, _ in bias_corrected_inputs(model, plan)] if wanted else []
    reference = float_reference(model, [*order, *outputs, *layer_inputs], samples, providers, threads)
    per_run = samples_per_run(model, reference)
    search = _Search(plan, bits, per_channel, widths, int16, samples, reference, outputs, profile, own or {}, per_run)
    probabilities = probability_outputs(model, outputs)
    search.magnitude |= dict.fromkeys(probabilities, 1.0)
    plain = {w: _Variant(model, plan, w) for w in ("minmax", "mse")}
    families = [(plain, candidates)]
    equalized = _equalized(
        search, model, equalization, peaks or {}, candidates, source, width, outputs, providers, threads
    )
    if equalized is not None:
        families.append(equalized)
    starts = []  # the four fixed methods' own tables (with and without equalization): the best is the start
    for family, (bases, family_candidates) in enumerate(families):
        for method in OBSERVER_METHODS:
            observed = {name: c.get(method, c["minmax"]) for name, c in family_candidates.items()}
            variant = bases["mse" if method == "mse" else "minmax"]
            error = search.error(variant, observed)
            starts.append((error, family, OBSERVER_METHODS.index(method), variant, observed))
    minmax_error = starts[0][0]
    first = min(starts, key=lambda s: s[:3])[0]
    # A family whose best start is close to the best one's is searched too: the layer-wise and +-1 stages
    # often gain more than the few percent between two starts (PP-OCRv4 det on ESP32-P4: the plain start was
    # 3 % behind the equalized one and ended 10 % ahead).
    searched = []
    for family, (_, family_candidates) in enumerate(families):
        error, _, _, variant, observed = min((s for s in starts if s[1] == family), key=lambda s: s[:3])
        if error > first * (1 + FAMILY_MARGIN):
            searched.append((error, family, variant, [error, dict(observed)]))  # its start, for the validation
            continue
        if bias_correction:
            corrected = _corrected(search, variant, observed, layer_inputs, variant.weight_method)
            corrected_error = search.error(corrected, observed) if corrected else error
            if corrected is not None and corrected_error < error:
                variant, error = corrected, corrected_error
        stop = search.evaluations + max(max_simulations - len(OBSERVER_METHODS), 0)  # each family's own share
        best = _refined(search, variant, order, family_candidates, observed, error, greedy_passes, stop)
        searched.append((best[0], family, variant, best))
    _, family, variant, best = _validated(search, searched, validation, outputs, probabilities, providers, threads)
    bases, candidates = families[family]
    _walk_heads(search, variant, output_heads(model, outputs, set(order)), best)
    spread = {} if per_channel else spread_weights(variant.plan, variant.model, widths, bits)  # per-channel: own
    narrowed = _walk_weights(search, variant, spread, best)
    error, chosen = best
    if weight_rounding:  # the plain model's weights rounded for the chosen exponents: kept when it measures better
        rounded = _rounded(search, bases[variant.weight_method], chosen, layer_inputs)
        rounded_error = search.error(rounded, chosen) if rounded else error
        logger.info("weight rounding: output error %.4g (nearest rounding %.4g)", rounded_error, error)
        if rounded is not None and rounded_error < error:
            variant, error = rounded, rounded_error
    choices = {
        name: "/".join(m for m, e in candidates[name].items() if e == chosen[name])
        or f"{chosen[name] - candidates[name]['minmax']:+d} from minmax"
        for name in order
    }
    logger.info(
        "auto calibration: output error %.4g (min-max %.4g) after %d simulations",
        error,
        minmax_error,
        search.evaluations,
    )
    return SearchResult(
        chosen,
        variant.weight_method,
        variant.model,
        variant.shifts,
        error,
        minmax_error,
        search.evaluations,
        choices,
        variant.rounded,
        narrowed,
        variant.equalization.factors if variant.equalization else [],
        variant.equalization.pairs if variant.equalization else 0,
    )


def _corrected(
    search: _Search, base: _Variant, observed: dict[str, int], layer_inputs: list[str], weight_method: str
) -> _Variant | None:
    """The bias-corrected twin of ``base`` for the weight exponents of this table (None: nothing to correct)."""
    weighted = _Variant(base.model, base.plan, weight_method)
    exponents = search.table(weighted, observed).exponents
    bits_of = base.plan.weight_widths(search.widths, search.bits)
    means = channel_means(search.reference_of(base), layer_inputs)
    shifts = bias_shifts(base.model, base.plan, exponents, means, bits_of)
    if not shifts:
        return None
    model = shift_biases(base.model, shifts)
    return _Variant(model, plan_calibration(model), weight_method, shifts, 0, base.equalization, base.reference)


def _rounded(search: _Search, base: _Variant, observed: dict[str, int], layer_inputs: list[str]) -> _Variant | None:
    """``base`` with its weights rounded by layer output for this table (``weight_rounding.py``), from one
    simulation that exposes the layer inputs; None when no layer changed or the table cannot run."""
    table = search.table(base, observed)
    search.evaluations += 1
    simulated = simulated_values(
        base.model, table, search.profile, search.bits, search.samples, layer_inputs, search.per_run
    )
    if simulated is None:
        return None
    bits_of = base.plan.weight_widths(search.widths, search.bits)
    reference = search.reference_of(base)
    model, stats = rounded_weight_model(base.model, base.plan, table.exponents, reference, simulated, bits_of)
    if not stats.flipped:
        return None
    logger.info(
        "weight rounding: %d of %d weights off nearest in %d layers (layer error %.4g -> %.4g)",
        stats.flipped,
        stats.weights,
        stats.layers,
        stats.cost_nearest,
        stats.cost_chosen,
    )
    return _Variant(
        model, plan_calibration(model), base.weight_method, [], stats.layers, base.equalization, base.reference
    )
