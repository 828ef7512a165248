"""Tests of moalign.evaluation.report: the plots write valid, non-blank PNG files."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import image as mpimg

from moalign.errors import MoalignError
from moalign.evaluation import evaluate_methods, fit_norm_stats
from moalign.evaluation.report import plot_comparison, plot_tradeoff, plot_weight_trajectory, tradeoff_points

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path, min_bytes: int = 5_000, min_coloured: int = 500) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    rgb = img[..., :3]
    assert rgb.var() > 1e-3  # not a blank canvas
    # something other than white and black was drawn (bars / areas / markers in colour)
    coloured = (rgb.max(axis=2) - rgb.min(axis=2)) > 0.2
    assert coloured.sum() >= min_coloured
    return img


def _result(reference: str | None = "base", norm: bool = True):
    rng = np.random.default_rng(0)
    n = 40
    runs, mats = {}, {}
    for k, m in enumerate(["base", "cd", "rmod", "best_of_n"]):
        s = rng.normal(loc=[0.2 * k, 1.0 - 0.3 * k], scale=1.0, size=(n, 2))
        mats[m] = s
        runs[m] = [
            {"prompt_id": str(i), "scores": {"helpful": float(a), "harmless": float(b)}}
            for i, (a, b) in enumerate(s)
        ]
    ns = fit_norm_stats(mats["base"], ["helpful", "harmless"], source="base") if norm else None
    return evaluate_methods(runs, ["helpful", "harmless"], reference=reference, norm=ns, n_boot=100)


def test_plot_comparison_with_win_rate(tmp_path):
    res = _result()
    out = plot_comparison(res, tmp_path / "sub" / "cmp.png")
    assert out == tmp_path / "sub" / "cmp.png"
    img = _check_png(out)
    assert img.shape[1] > img.shape[0]  # three panels side by side


def test_plot_comparison_without_reference_raw(tmp_path):
    res = _result(reference=None, norm=False)
    _check_png(plot_comparison(res, tmp_path / "cmp.png"))


def test_plot_comparison_from_saved_dict(tmp_path):
    from moalign.evaluation import EvaluationResult

    res = EvaluationResult.from_dict(_result().to_dict())
    _check_png(plot_comparison(res, tmp_path / "cmp.png"))


def test_plot_weight_trajectory_simplex_and_lines(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.dirichlet([1.0, 1.0, 1.0], size=12)
    _check_png(plot_weight_trajectory(w.tolist(), ["helpful", "harmless", "concise"], tmp_path / "w.png"))
    # one block only
    _check_png(plot_weight_trajectory([[0.3, 0.7]], ["a", "b"], tmp_path / "w1.png", title="single block"))
    # not on the simplex: drawn as lines
    _check_png(
        plot_weight_trajectory(rng.normal(size=(8, 2)), ["a", "b"], tmp_path / "w2.png"), min_bytes=3_000
    )


def test_plot_tradeoff(tmp_path):
    res = _result()
    pts = tradeoff_points(res, "helpful", "harmless")
    assert set(pts) == set(res.methods)
    assert pts["cd"][0] == pytest.approx(res.methods["cd"].objective_means["helpful"].estimate)
    _check_png(
        plot_tradeoff(pts, ["helpful", "harmless"], tmp_path / "t.png"), min_bytes=3_000, min_coloured=200
    )
    _check_png(
        plot_tradeoff({"only": (1.0, 1.0)}, ["x", "y"], tmp_path / "t1.png"), min_bytes=3_000, min_coloured=40
    )


def test_pareto_mask_matches_brute_force():
    from moalign.evaluation.report import _pareto_mask

    rng = np.random.default_rng(2)
    pts = np.round(rng.normal(size=(30, 2)), 1)
    mask = _pareto_mask(pts)
    for i, p in enumerate(pts):
        dominated = any(q[0] >= p[0] and q[1] >= p[1] and (q[0] > p[0] or q[1] > p[1]) for q in pts)
        assert mask[i] == (not dominated)
    assert mask[np.argmax(pts[:, 0])] or (pts[:, 0] == pts[:, 0].max()).sum() > 1


def test_plot_errors(tmp_path):
    res = _result()
    with pytest.raises(MoalignError, match=".png"):
        plot_comparison(res, tmp_path / "cmp.pdf")
    with pytest.raises(MoalignError, match="names"):
        plot_weight_trajectory([[0.5, 0.5]], ["a"], tmp_path / "w.png")
    with pytest.raises(MoalignError):
        plot_weight_trajectory([], ["a"], tmp_path / "w.png")
    with pytest.raises(MoalignError):
        plot_weight_trajectory([[0.5, 0.5], [1.0]], ["a", "b"], tmp_path / "w.png")
    with pytest.raises(MoalignError):
        plot_tradeoff({}, ["x", "y"], tmp_path / "t.png")
    with pytest.raises(MoalignError):
        plot_tradeoff({"a": (1.0, 2.0)}, ["x"], tmp_path / "t.png")
    with pytest.raises(MoalignError):
        plot_tradeoff({"a": (1.0, float("nan"))}, ["x", "y"], tmp_path / "t.png")
    with pytest.raises(MoalignError, match="'nope'"):
        tradeoff_points(res, "helpful", "nope")
    assert not list(tmp_path.iterdir())  # nothing written on error
