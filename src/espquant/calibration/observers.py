"""Observers: running statistics of one tensor over the calibration set, and the exponent they choose.

One interface (``update`` with each batch, ``exponent(bits)`` at the end, ``clipped_fraction``), four
methods. Memory is fixed per tensor whatever the data set size: min-max keeps two numbers; the others a
histogram of |x| with a fixed number of bins over a power-of-two range that doubles when a larger value
arrives (merging bin pairs, which is exact). Because exponents are powers of two, bin edges and
quantization steps line up exactly, and the entropy and MSE methods simply evaluate each candidate
exponent near the min-max one.

Speed: the maximum is always exact. Histograms are built from a deterministic strided subsample of at
most ``SAMPLES_PER_BATCH`` values of each tensor per batch (an odd stride, so it does not alias with
power-of-two layouts), which keeps calibration close to the cost of inference on large activations.
"""

from __future__ import annotations

import math

import numpy as np

from espquant.errors import DatasetError
from espquant.quant.pot import exponent_for_max_abs, qmax

__all__ = [
    "Observer",
    "MinMaxObserver",
    "HistogramObserver",
    "make_observer",
    "candidate_exponents",
    "OBSERVER_METHODS",
]

OBSERVER_METHODS = ("minmax", "entropy", "percentile", "mse")
BINS = 8192  # power of two: bin edges align with every power-of-two quantization step down to R / 8192
CANDIDATES = 6  # exponents tried below the min-max exponent by entropy and mse
DEFAULT_PERCENTILE = 99.99
SAMPLES_PER_BATCH = 1 << 14


def _largest(*values: float) -> float:
    """``max`` that keeps a NaN (Python's ``max`` drops it when it is not first): ``finite_range`` must see it."""
    return math.nan if any(math.isnan(v) for v in values) else max(values)


class Observer:
    """Statistics of one tensor; subclasses choose the exponent."""

    method = "minmax"

    def __init__(self) -> None:
        self.max_abs = 0.0
        self.count = 0

    def update(self, values: np.ndarray) -> None:
        if values.size:
            self.update_range(float(values.min()), float(values.max()), values.size)

    def update_range(self, low: float, high: float, count: int) -> None:
        """Fold in a batch known by its extremes only (enough for min-max, not for histograms)."""
        self.max_abs = _largest(self.max_abs, high, -low)
        self.count += count

    def exponent(self, bits: int) -> int:
        return exponent_for_max_abs(self.max_abs, bits)

    def clipped_fraction(self, exponent: int, bits: int) -> float:
        """Fraction of observed values outside the range of ``exponent`` (0 when it covers the maximum)."""
        return 0.0 if self.max_abs <= (qmax(bits) + 0.5) * 2.0**exponent else float("nan")


class MinMaxObserver(Observer):
    """max |x| over everything seen; exponent = the smallest that keeps it in range."""


class HistogramObserver(Observer):
    """A fixed-size histogram of |x| for the entropy, percentile and mse methods."""

    def __init__(self, method: str, percentile: float = DEFAULT_PERCENTILE) -> None:
        super().__init__()
        self.method = method
        self.percentile = percentile
        self.range_log2: int | None = None  # histogram covers [0, 2**range_log2)
        self.counts = np.zeros(BINS, dtype=np.int64)
        self.zeros = 0  # exact zeros (every ReLU output below 0) are kept out of the bins: always exact
        self.sampled = 0  # values that went into the histogram (zeros included)
        self.batches = 0

    def update(self, values: np.ndarray) -> None:
        if not values.size:
            return
        flat = values.reshape(-1)
        batch_max = _largest(float(flat.max()), -float(flat.min()))
        self.max_abs = _largest(self.max_abs, batch_max)
        self.count += flat.size
        if not math.isfinite(batch_max):  # inf / NaN: finite_range names the tensor; nothing to bin
            return
        if flat.size > SAMPLES_PER_BATCH:
            stride = -(-flat.size // SAMPLES_PER_BATCH) | 1
            flat = flat[self.batches % stride :: stride]
        self.batches += 1
        self.sampled += flat.size
        magnitudes = np.abs(flat)
        zeros = magnitudes.size - int(np.count_nonzero(magnitudes))
        self.zeros += zeros
        if zeros == magnitudes.size:
            return
        needed = math.frexp(float(magnitudes.max()))[1]  # smallest k with every sampled value < 2**k
        if self.range_log2 is None:
            self.range_log2 = needed
        while needed > self.range_log2:
            self.counts = np.concatenate([self.counts.reshape(-1, 2).sum(axis=1), np.zeros(BINS // 2, np.int64)])
            self.range_log2 += 1
        scale = BINS / 2.0**self.range_log2
        # Below BINS without clamping: every value < 2**needed <= 2**range_log2, and scaling by a power of
        # two is exact in float64.
        index = (magnitudes.astype(np.float64) * scale).astype(np.int64)
        counts = np.bincount(index, minlength=BINS)
        counts[0] -= zeros  # binned with the rest (cheaper than filtering them out), then taken back out
        self.counts += counts

    # --- helpers over the histogram -------------------------------------------------------------------
    def _bin_width(self) -> float:
        return 2.0 ** (self.range_log2 or 0) / BINS

    def _centers(self) -> np.ndarray:
        return (np.arange(BINS) + 0.5) * self._bin_width()

    def clipped_fraction(self, exponent: int, bits: int) -> float:
        if self.sampled == 0 or self.range_log2 is None:
            return 0.0
        limit = (qmax(bits) + 0.5) * 2.0**exponent
        if self.max_abs <= limit:
            return 0.0
        return float(self.counts[self._centers() > limit].sum()) / self.sampled

    def exponent(self, bits: int) -> int:
        top = exponent_for_max_abs(self.max_abs, bits)
        if self.range_log2 is None or self.method == "minmax":
            return top
        if self.method == "percentile":
            return self._percentile_exponent(bits, top)
        candidates = list(range(top - CANDIDATES, top + 1))
        if self.method == "mse":
            scores = [self._squared_error(e, bits) for e in candidates]
        elif self.method == "entropy":
            scores = [self._divergence(e, bits) for e in candidates]
        else:
            raise ValueError(f"unknown observer method {self.method!r}")
        best = min(scores)
        # Ties go to the larger exponent: equal error, less clipping.
        return max(e for e, s in zip(candidates, scores) if s <= best)

    def _percentile_exponent(self, bits: int, top: int) -> int:
        cumulative = np.cumsum(self.counts)
        target = self.percentile / 100.0 * cumulative[-1]
        index = int(np.searchsorted(cumulative, target))
        value = min((index + 1) * self._bin_width(), self.max_abs)
        return min(exponent_for_max_abs(value, bits), top)

    def _squared_error(self, exponent: int, bits: int) -> float:
        """Expected squared quantization error of the histogram (bin centres) at ``exponent``."""
        step = 2.0**exponent
        centers = self._centers()
        quantized = np.clip(np.round(centers / step), 0, qmax(bits)) * step
        return float(np.sum(self.counts * (centers - quantized) ** 2))

    def _divergence(self, exponent: int, bits: int) -> float:
        """KL(P || Q): P the histogram clipped at the range of ``exponent`` (outliers folded into the last
        kept bin), Q that range quantized to ``qmax + 1`` levels of |q| and spread back over the bins."""
        step = 2.0**exponent
        width = self._bin_width()
        kept = int(min(BINS, math.ceil((qmax(bits) + 0.5) * step / width)))
        kept = max(kept, 1)
        reference = self.counts[:kept].astype(np.float64)
        candidate_source = reference.copy()
        reference[-1] += float(self.counts[kept:].sum())
        bins_per_step = step / width
        if bins_per_step <= 1.0:
            quantized = candidate_source  # the grid is finer than the bins: only clipping differs
        else:
            levels = np.floor((np.arange(kept) + 0.5) / bins_per_step + 0.5).astype(np.int64)
            sums = np.bincount(levels, weights=candidate_source)
            nonzero = np.bincount(levels, weights=(candidate_source > 0).astype(np.float64))
            spread = np.divide(sums, nonzero, out=np.zeros_like(sums), where=nonzero > 0)
            quantized = np.where(candidate_source > 0, spread[levels], 0.0)
        p = reference / reference.sum()
        total = quantized.sum()
        if total == 0:
            return float("inf")
        q = quantized / total
        mask = p > 0
        q_masked = np.maximum(q[mask], 1e-12)
        return float(np.sum(p[mask] * np.log(p[mask] / q_masked)))


def finite_range(name: str, observer: Observer) -> Observer:
    """``observer`` when the tensor ``name`` stayed finite on the calibration data; else a DatasetError naming
    it: an infinite or NaN activation (data near float32's limit, an overflowing layer) has no exponent."""
    if not math.isfinite(float(observer.max_abs)):
        raise DatasetError(
            f"tensor {name!r} reaches {observer.max_abs} in the float model on this calibration data, which no "
            "exponent represents: check the data's range (normalised as in training?) and the model's weights."
        )
    return observer


def candidate_exponents(observer: Observer, bits: int) -> dict[str, int]:
    """The exponent every method would choose from the same statistics (``auto`` calibration searches
    among them): min-max from the exact maximum, entropy / percentile / mse from the histogram when the
    observer keeps one. One calibration pass thus serves all four methods."""
    top = exponent_for_max_abs(observer.max_abs, bits)
    result = {"minmax": top}
    if isinstance(observer, HistogramObserver) and observer.range_log2 is not None:
        own = observer.method
        try:
            for method in ("entropy", "percentile", "mse"):
                observer.method = method
                result[method] = observer.exponent(bits)
        finally:
            observer.method = own
    return result


def make_observer(method: str) -> Observer:
    """A fresh observer for ``method``."""
    if method == "minmax":
        return MinMaxObserver()
    if method in ("entropy", "percentile", "mse"):
        return HistogramObserver(method)
    raise ValueError(f"unknown calibration method {method!r}; use one of {', '.join(OBSERVER_METHODS)}")
