"""Calibrators: observe an activation's values batch by batch, then choose its clipping range.

Each calibrator streams (`observe` one tensor at a time, memory bounded by its histogram)
and returns `amax`, the magnitude mapped to the format's largest value (scale = amax / qmax).
Quantization is symmetric, so they look at |x|.

- max:        the largest |x| seen (no clipping; outliers cost resolution).
- percentile: the |x| below which a given share (default 99.99 %) of values fall.
- entropy:    TensorRT's KL-divergence search: the clipping point whose quantized histogram
              loses the least information about the observed one.
- mse:        the clipping point minimizing the mean squared quantization error over the histogram.

Histograms have a fixed number of bins over [0, range); when a larger value arrives, the
range doubles and neighbouring bins merge (exact, no re-binning guesswork).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from kiln.ops.quant import QuantFormat, quant_format

DEFAULT_BINS = 2048
DEFAULT_PERCENTILE = 99.99


class Calibrator:
    """Base: observe tensors, then `amax()`. `name` is what the registry calls it."""

    name = ""

    def __init__(self, fmt: str | QuantFormat = "int8") -> None:
        self.fmt = quant_format(fmt)
        self.count = 0  # values observed

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def amax(self) -> float:
        raise NotImplementedError

    def scale(self) -> float:
        return self.fmt.scale(self.amax())


class MaxCalibrator(Calibrator):
    name = "max"

    def __init__(self, fmt: str | QuantFormat = "int8") -> None:
        super().__init__(fmt)
        self._amax = 0.0

    def observe(self, x: torch.Tensor) -> None:
        if x.numel():
            self._amax = max(self._amax, float(x.detach().abs().max()))
            self.count += x.numel()

    def amax(self) -> float:
        return self._amax


class Histogram:
    """A streaming histogram of |x| over [0, range) in `bins` equal bins, bounded memory."""

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if bins < 16 or bins % 2:
            raise ValueError(f"a calibration histogram needs an even number of bins >= 16, got {bins}")
        self.bins = bins
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.range = 0.0
        self.zeros = 0  # exact zeros, kept out of the bins (zero is exact in a symmetric format)
        self.max = 0.0

    def add(self, x: torch.Tensor) -> None:
        a = x.detach().float().abs().flatten()
        if not a.numel():
            return
        finite = torch.isfinite(a)
        if not bool(finite.all()):
            a = a[finite]
        nonzero = a != 0
        if not bool(nonzero.all()):
            self.zeros += int(a.numel() - nonzero.sum())
            a = a[nonzero]
        if not a.numel():
            return
        top = float(a.max())
        self.max = max(self.max, top)
        if self.range == 0.0:  # the first range: this batch's max, nudged so no value sits on its closing edge
            self.range = top * (1.0 + 2.0 / self.bins)
        while top >= self.range:
            merged = self.counts.view(-1, 2).sum(1)
            self.counts = torch.cat([merged, torch.zeros(self.bins // 2, dtype=torch.float64)])
            self.range *= 2.0
        self.counts += torch.histc(a, self.bins, 0.0, self.range).double().cpu()  # counts live on the CPU

    @property
    def width(self) -> float:
        return self.range / self.bins

    @property
    def total(self) -> float:
        return float(self.counts.sum()) + self.zeros

    def centers(self) -> torch.Tensor:
        return (torch.arange(self.bins, dtype=torch.float64) + 0.5) * self.width


class HistogramCalibrator(Calibrator):
    def __init__(self, fmt: str | QuantFormat = "int8", bins: int = DEFAULT_BINS) -> None:
        super().__init__(fmt)
        self.hist = Histogram(bins)

    def observe(self, x: torch.Tensor) -> None:
        self.hist.add(x)
        self.count += x.numel()

    def amax(self) -> float:
        if self.hist.range == 0.0:
            return 0.0
        return min(self._choose(), self.hist.max)

    def _choose(self) -> float:
        raise NotImplementedError


class PercentileCalibrator(HistogramCalibrator):
    name = "percentile"

    def __init__(
        self, fmt: str | QuantFormat = "int8", percentile: float = DEFAULT_PERCENTILE, bins: int = DEFAULT_BINS
    ) -> None:
        super().__init__(fmt, bins)
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile

    def _choose(self) -> float:
        cdf = torch.cumsum(self.hist.counts, 0) + self.hist.zeros
        share = cdf / cdf[-1]
        idx = int(torch.searchsorted(share, torch.tensor([self.percentile / 100.0], dtype=torch.float64)))
        return (min(idx, self.hist.bins - 1) + 1) * self.hist.width


def _candidates(bins: int, start: int, limit: int) -> list[int]:
    """Clipping bin counts from `start` to `bins` inclusive, at most ~`limit` of them."""
    start = max(1, min(start, bins))
    stride = max(1, (bins - start) // limit)
    out = list(range(start, bins + 1, stride))
    if out[-1] != bins:
        out.append(bins)
    return out


class EntropyCalibrator(HistogramCalibrator):
    """TensorRT's entropy calibration. For each candidate clipping bin i: P is the histogram
    up to i with the clipped tail folded into its last bin; Q merges the (unfolded) bins into
    the format's levels — 128 equal groups for int8 as TensorRT does, the bins that round to
    the same fp8 value for fp8 — and spreads each group's mass evenly over the bins where P
    is non-empty; both are smoothed, and the chosen amax = i·width minimizes KL(P ‖ Q).
    Exact zeros (post-ReLU) are left out: zero is exact in a symmetric format."""

    name = "entropy"
    LEVELS = 128  # int8: 128 non-negative levels of the symmetric range, as TensorRT

    def __init__(self, fmt: str | QuantFormat = "int8", bins: int = DEFAULT_BINS, candidates: int = 512) -> None:
        super().__init__(fmt, bins)
        self.candidates = candidates

    def _choose(self) -> float:
        counts = self.hist.counts.numpy()
        width = self.hist.width
        best, best_i = np.inf, self.hist.bins
        for i in _candidates(self.hist.bins, self.LEVELS, self.candidates):
            inside = counts[:i]
            p = inside.copy()
            p[-1] += counts[i:].sum()
            if not p.any():
                continue
            group = self._groups(i, width)
            nonzero = (p > 0).astype(np.float64)
            mass = np.bincount(group, weights=inside)
            members = np.bincount(group, weights=nonzero)
            q = np.where(p > 0, mass[group] / np.maximum(members[group], 1.0), 0.0)
            kl = _kl(_smooth(p), _smooth(q))
            if kl < best:
                best, best_i = kl, i
        return best_i * width

    def _groups(self, i: int, width: float) -> np.ndarray:
        if not self.fmt.dtype.is_floating_point:
            merged = max(1, i // self.LEVELS)
            return np.minimum(np.arange(i) // merged, self.LEVELS - 1)
        centers = (torch.arange(i, dtype=torch.float32) + 0.5) * width
        codes = self.fmt.quantize(centers, self.fmt.scale(i * width)).float().numpy()
        # rounding is monotonic and the centers ascend: a new group starts where the code changes
        return np.concatenate([[0], np.cumsum(codes[1:] != codes[:-1])])


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """Move a little mass onto empty bins so KL stays finite (TensorRT's smoothing)."""
    zeros = p == 0
    n_zero, n_nonzero = int(zeros.sum()), int((~zeros).sum())
    if not n_nonzero:
        return p
    return p + np.where(zeros, eps, -eps * n_zero / n_nonzero)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    if not q.sum() > 0:
        return np.inf
    p = p / p.sum()
    q = q / q.sum()
    m = p > 0
    if np.any(q[m] <= 0):
        return np.inf
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


class MseCalibrator(HistogramCalibrator):
    """The amax minimizing Σ count · (center − fake_quantize(center))² over the histogram."""

    name = "mse"

    def __init__(self, fmt: str | QuantFormat = "int8", bins: int = DEFAULT_BINS, candidates: int = 512) -> None:
        super().__init__(fmt, bins)
        self.candidates = candidates

    def _choose(self) -> float:
        counts = self.hist.counts
        keep = counts > 0
        centers, weights = self.hist.centers()[keep], counts[keep]
        width = self.hist.width
        best, best_amax = float("inf"), self.hist.range
        for i in _candidates(self.hist.bins, 1, self.candidates):
            amax = i * width
            err = centers - self.fmt.fake_quantize(centers.float(), self.fmt.scale(amax)).double()
            mse = float((weights * err * err).sum())
            if mse < best:
                best, best_amax = mse, amax
        return best_amax


CALIBRATORS: dict[str, Callable[..., Calibrator]] = {
    c.name: c for c in (MaxCalibrator, PercentileCalibrator, EntropyCalibrator, MseCalibrator)
}


def make_calibrator(method: str, fmt: str | QuantFormat = "int8") -> Calibrator:
    """A calibrator by name: "max", "entropy", "mse", "percentile" or "percentile:99.9"."""
    name, _, arg = str(method).partition(":")
    name = name.strip().lower()
    if name not in CALIBRATORS:
        raise ValueError(f"unknown calibration method {method!r}; known: {', '.join(CALIBRATORS)} (percentile:P)")
    if arg:
        if name != "percentile":
            raise ValueError(f"calibration method {name!r} takes no argument (got {method!r})")
        try:
            return PercentileCalibrator(fmt, float(arg))
        except ValueError as exc:
            raise ValueError(f"calibration method {method!r}: {exc}") from None
    return CALIBRATORS[name](fmt)
