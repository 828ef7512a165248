"""The statistics of every report: per-objective means, the worst case and worst-case win rates of score
matrices, and percentile bootstrap intervals (:class:`Interval`) over prompts, plain and paired."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from moalign.arrays import as_matrix as _as_matrix
from moalign.arrays import to_numpy as _to_numpy
from moalign.arrays import wins
from moalign.errors import MoalignError

# ----------------------------------------------------------------------------------------------------------
# point metrics


def per_objective_mean(scores: Any) -> np.ndarray:
    """Mean of each objective over responses: ``[n, G] -> [G]``."""
    return _as_matrix(scores, "scores").mean(axis=0)


def worst_case(scores: Any) -> np.ndarray:
    """Worst objective of each response: ``w_i = min_g scores[i, g]``, ``[n, G] -> [n]``."""
    return _as_matrix(scores, "scores", allow_empty=True).min(axis=1)


def worst_case_win_indicator(a: Any, b: Any, tol: float = 0.0) -> np.ndarray:
    """Per-pair outcome of ``a`` vs ``b`` on the worst case: 1 win, 0.5 tie, 0 loss (``[n]``).

    With ``d_i = min_g a_ig - min_g b_ig``: a tie is ``|d_i| <= tol`` (``tol=0``: exact equality), a win
    ``d_i > tol``.
    """
    a = _as_matrix(a, "a", allow_empty=True)
    b = _as_matrix(b, "b", allow_empty=True)
    if a.shape != b.shape:
        raise MoalignError(f"paired score matrices differ in shape: a {a.shape} vs b {b.shape}")
    if not (tol >= 0 and math.isfinite(tol)):
        raise MoalignError(f"tie tolerance must be finite and >= 0, got {tol}")
    d = a.min(axis=1) - b.min(axis=1)
    tie = np.abs(d) <= tol
    win = d > tol
    return win.astype(np.float64) + 0.5 * tie.astype(np.float64)


def worst_case_win_rate(a: Any, b: Any, tol: float = 0.0) -> float:
    """``P[min_g a_g > min_g b_g] + 0.5 P[tie]`` over paired rows of ``a`` and ``b`` (both ``[n, G]``).

    Ties are ``|min a - min b| <= tol``. ``win_rate(a, b) + win_rate(b, a) == 1`` for any inputs.
    """
    ind = worst_case_win_indicator(a, b, tol)
    if ind.size == 0:
        raise MoalignError("worst-case win rate of zero pairs is undefined")
    return float(ind.mean())


# ----------------------------------------------------------------------------------------------------------
# bootstrap


def bootstrap_ci(
    stat_fn: Callable[..., Any],
    *arrays: Any,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[Any, Any, Any]:
    """Paired percentile bootstrap: ``(estimate, low, high)`` of ``stat_fn(*arrays)``.

    Each replicate draws ``n`` row indices with replacement (one draw shared by all ``arrays``, which keeps
    pairs together) and evaluates ``stat_fn`` on the resampled arrays; the interval is the ``alpha/2`` and
    ``1 - alpha/2`` quantiles of the replicates. ``stat_fn`` may return a scalar (floats come back) or an
    array (arrays come back, quantiles taken elementwise). Reproducible for a given ``seed``.
    """
    if not arrays:
        raise MoalignError("bootstrap_ci needs at least one array")
    n_boot = int(n_boot)
    if n_boot < 1:
        raise MoalignError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise MoalignError(f"alpha must be in (0, 1), got {alpha}")
    arrs = [_to_numpy(a, f"bootstrap array {i}") for i, a in enumerate(arrays)]
    for i, a in enumerate(arrs):
        if a.ndim == 0:
            raise MoalignError(f"bootstrap array {i} is a scalar; rows are resampled along axis 0")
    n = arrs[0].shape[0]
    if any(a.shape[0] != n for a in arrs):
        raise MoalignError(f"bootstrap arrays differ in length: {[a.shape[0] for a in arrs]}")
    if n == 0:
        raise MoalignError("bootstrap_ci needs at least one row")

    estimate = np.asarray(stat_fn(*arrs), dtype=np.float64)
    rng = np.random.default_rng(seed)
    reps = np.empty((n_boot, *estimate.shape), dtype=np.float64)
    for k in range(n_boot):
        idx = rng.integers(0, n, size=n)
        reps[k] = np.asarray(stat_fn(*(a[idx] for a in arrs)), dtype=np.float64)
    low, high = np.quantile(reps, [alpha / 2, 1 - alpha / 2], axis=0)
    if estimate.ndim == 0:
        return float(estimate), float(low), float(high)
    return estimate, low, high


def mean_ci(values: Any, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> Interval:
    """The mean of ``values [n]`` (one per prompt) with its percentile bootstrap CI."""
    return Interval(*bootstrap_ci(np.mean, _to_numpy(values, "values"), n_boot=n_boot, alpha=alpha, seed=seed))


def paired_diff_ci(a: Any, b: Any, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> Interval:
    """``mean(a - b)`` over paired rows (the same prompts in the same order) with a paired bootstrap CI."""
    x, y = _to_numpy(a, "a"), _to_numpy(b, "b")
    if x.shape != y.shape:
        raise MoalignError(f"paired arrays differ in shape: {x.shape} vs {y.shape}")
    return Interval(*bootstrap_ci(np.mean, x - y, n_boot=n_boot, alpha=alpha, seed=seed))


def paired_win_ci(a: Any, b: Any, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> Interval:
    """Share of paired rows where ``a > b`` (ties count 1/2) with a paired bootstrap CI."""
    x, y = _to_numpy(a, "a"), _to_numpy(b, "b")
    if x.shape != y.shape:
        raise MoalignError(f"paired arrays differ in shape: {x.shape} vs {y.shape}")
    ind = wins(x, y).astype(np.float64)
    return Interval(*bootstrap_ci(np.mean, ind, n_boot=n_boot, alpha=alpha, seed=seed))


# ----------------------------------------------------------------------------------------------------------
# comparison of methods


@dataclass(frozen=True)
class Interval:
    """A point estimate with a confidence interval ``[low, high]``."""

    estimate: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def to_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Interval:
        return cls(float(d["estimate"]), float(d["low"]), float(d["high"]))
