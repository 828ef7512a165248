"""Pareto fronts in objective space: preference-weight grids, non-dominated sets, hypervolume with bootstrap
intervals over prompts, and paired differences between methods' fronts. Higher is better on every objective.

Non-dominated sets and hypervolumes come from ``moocore`` (a maintained multi-objective library); this module
only arranges the data: each method is a set of points (one per preference weight, or one for a method without
weights), each point the mean over prompts of the per-prompt objective vectors, so resampling prompts (the same
resample for every method: paired) gives intervals for a front's hypervolume and for the difference of two.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from moalign.errors import MoalignError


def _moocore():
    try:
        import moocore
    except ImportError:
        raise MoalignError("fronts need moocore: pip install moocore") from None
    return moocore


def simplex_grid(n_objectives: int, steps: int) -> list[tuple[float, ...]]:
    """Every weight vector on the simplex with coordinates in multiples of ``1/steps`` (corners included):
    ``steps + 1`` vectors for two objectives, ``(steps + 1)(steps + 2) / 2`` for three."""
    if n_objectives < 2:
        raise MoalignError(f"a front needs at least two objectives, got {n_objectives}")
    if steps < 1:
        raise MoalignError(f"weight grid steps must be >= 1, got {steps}")
    out = []
    for c in itertools.product(range(steps + 1), repeat=n_objectives - 1):
        if sum(c) <= steps:
            out.append(tuple(x / steps for x in (*c, steps - sum(c))))
    return sorted(out, reverse=True)


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the points no other point dominates (maximising every column)."""
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2 or len(pts) == 0:
        raise MoalignError(f"points must be a non-empty [n, objectives] array, got shape {pts.shape}")
    return np.asarray(_moocore().is_nondominated(pts, maximise=True), dtype=bool)


def hypervolume(points: np.ndarray, ref: Sequence[float]) -> float:
    """The volume dominated by ``points`` and dominating ``ref`` (maximising every column); points not better
    than ``ref`` in every objective add nothing."""
    pts = np.asarray(points, dtype=float)
    ref = np.asarray(ref, dtype=float)
    if pts.ndim != 2 or pts.shape[1] != ref.shape[0]:
        raise MoalignError(f"points {pts.shape} and reference point {ref.shape} disagree on the objectives")
    pts = pts[(pts > ref).all(axis=1)]
    if len(pts) == 0:
        return 0.0
    return float(_moocore().hypervolume(pts, ref=ref, maximise=True))


@dataclass
class FrontSummary:
    """One method's front: ``points[w]`` the mean objective vector at its w-th weight (with a 95% bootstrap
    interval ``low``/``high`` per objective), ``front`` the mask of its non-dominated points, and its
    hypervolume with a 95% interval."""

    points: np.ndarray  # [W, G]
    low: np.ndarray
    high: np.ndarray
    front: np.ndarray  # [W] bool
    hypervolume: tuple[float, float, float]  # estimate, low, high


def summarise_fronts(per_prompt: Mapping[str, Sequence[np.ndarray]], ref: Sequence[float], *, n_boot: int = 1000,
                     seed: int = 0, conf: float = 0.95) -> tuple[dict[str, FrontSummary], dict]:  # fmt: skip
    """Fronts of several methods on the same prompts. ``per_prompt[method][w]`` is a ``[P, G]`` array of the
    per-prompt objective vectors at the method's w-th weight (prompts in the same order everywhere).

    Returns each method's :class:`FrontSummary` and, for every pair of methods, the paired bootstrap interval of
    the difference of their hypervolumes (``{(a, b): (estimate, low, high)}`` of HV(a) - HV(b))."""
    methods = list(per_prompt)
    if not methods:
        raise MoalignError("no method to summarise")
    arrays = {m: [np.asarray(a, dtype=float) for a in per_prompt[m]] for m in methods}
    shapes = {a.shape for v in arrays.values() for a in v}
    if len({s[0] for s in shapes}) != 1 or len({s[1] for s in shapes}) != 1:
        raise MoalignError(f"every method needs the same prompts and objectives, got shapes {sorted(shapes)}")
    P = next(iter(shapes))[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, P, size=(n_boot, P))
    alpha = (1 - conf) / 2
    boots: dict[str, np.ndarray] = {}
    out: dict[str, FrontSummary] = {}
    for m in methods:
        stack = np.stack(arrays[m])  # [W, P, G]
        means = stack.mean(axis=1)
        resampled = stack[:, idx, :].mean(axis=2)  # [W, B, G]
        hv_boot = np.array([hypervolume(resampled[:, b, :], ref) for b in range(n_boot)])
        boots[m] = hv_boot
        out[m] = FrontSummary(
            points=means, low=np.quantile(resampled, alpha, axis=1), high=np.quantile(resampled, 1 - alpha, axis=1),
            front=non_dominated(means),
            hypervolume=(hypervolume(means, ref), *map(float, np.quantile(hv_boot, [alpha, 1 - alpha]))),
        )  # fmt: skip
    diffs = {}
    for a, b in itertools.permutations(methods, 2):
        d = boots[a] - boots[b]
        est = out[a].hypervolume[0] - out[b].hypervolume[0]
        diffs[(a, b)] = (est, *map(float, np.quantile(d, [alpha, 1 - alpha])))
    return out, diffs
