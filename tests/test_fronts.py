"""Fronts (moalign.evaluation.fronts): moocore's hypervolume and non-dominated sets against brute force, the
weight grid, and bootstrap intervals of hypervolumes and their paired differences."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moalign.errors import MoalignError
from moalign.evaluation.fronts import hypervolume, non_dominated, simplex_grid, summarise_fronts


def _hv_inclusion_exclusion(points: np.ndarray, ref: np.ndarray) -> float:
    """The exact hypervolume (maximising) as the measure of a union of boxes [ref, p], by inclusion-exclusion."""
    total = 0.0
    for r in range(1, len(points) + 1):
        for subset in itertools.combinations(points, r):
            corner = np.min(subset, axis=0)
            total += (-1) ** (r + 1) * float(np.prod(np.clip(corner - ref, 0, None)))
    return total


def _nondominated_pairwise(points: np.ndarray) -> np.ndarray:
    n = len(points)
    keep = np.ones(n, bool)
    for i in range(n):
        for j in range(n):
            if i != j and (points[j] >= points[i]).all() and (points[j] > points[i]).any():
                keep[i] = False
    return keep


@pytest.mark.parametrize("dim", [2, 3])
def test_hypervolume_and_non_dominated_set_against_brute_force(dim):
    rng = np.random.default_rng(dim)
    for _ in range(30):
        pts = rng.normal(size=(rng.integers(1, 8), dim))
        ref = pts.min(axis=0) - rng.uniform(0.0, 1.0, size=dim)
        assert hypervolume(pts, ref) == pytest.approx(_hv_inclusion_exclusion(pts, ref), rel=1e-9, abs=1e-12)
        assert (non_dominated(pts) == _nondominated_pairwise(pts)).all()
    # points not above the reference point add nothing; ties in one objective are handled
    assert hypervolume(np.array([[1.0, 1.0], [-1.0, 5.0]]), [0.0, 0.0]) == pytest.approx(1.0)
    assert non_dominated(np.array([[1.0, 1.0], [1.0, 2.0], [0.0, 3.0]])).tolist() == [False, True, True]
    with pytest.raises(MoalignError, match="disagree"):
        hypervolume(np.ones((2, 3)), [0.0, 0.0])


def test_simplex_grid():
    g2 = simplex_grid(2, 4)
    assert len(g2) == 5 and g2[0] == (1.0, 0.0) and g2[-1] == (0.0, 1.0)
    g3 = simplex_grid(3, 4)
    assert len(g3) == 15 and all(abs(sum(w) - 1) < 1e-12 and min(w) >= 0 for w in g3)
    assert len(set(g3)) == 15
    with pytest.raises(MoalignError, match="two objectives"):
        simplex_grid(1, 3)


def test_front_summaries_and_paired_hypervolume_differences():
    rng = np.random.default_rng(0)
    P = 60
    base = [rng.normal(size=(P, 2)) * 0.3 + np.array(c) for c in ([1.0, 0.0], [0.7, 0.7], [0.0, 1.0])]
    worse = [a - 0.5 for a in base]  # the same front moved down by 0.5 in both objectives
    point = [rng.normal(size=(P, 2)) * 0.3 + 0.2]  # a method without weights: one point
    ref = [-2.0, -2.0]
    fronts, diffs = summarise_fronts({"a": base, "b": worse, "c": point, "a2": base}, ref, n_boot=300, seed=1)
    a = fronts["a"]
    means = np.stack([x.mean(0) for x in base])
    assert np.allclose(a.points, means) and a.front.tolist() == non_dominated(means).tolist()
    assert a.hypervolume[0] == pytest.approx(hypervolume(means, ref))
    assert a.hypervolume[1] <= a.hypervolume[0] <= a.hypervolume[2]
    assert (a.low <= a.points).all() and (a.points <= a.high).all()
    est, lo, hi = diffs[("a", "b")]
    assert est > 0 and lo > 0  # a front moved down everywhere has clearly less hypervolume
    assert diffs[("a", "a2")] == (0.0, 0.0, 0.0)  # paired: the same data gives exactly zero
    assert diffs[("b", "a")][0] == pytest.approx(-est)
    assert fronts["c"].points.shape == (1, 2)
    with pytest.raises(MoalignError, match="same prompts"):
        summarise_fronts({"a": base, "short": [x[:10] for x in base]}, ref)
