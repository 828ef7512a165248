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


def test_front_command_sweeps_weights_and_summarises_what_it_ran(tiny_policy_dir, prompts_file, tmp_path, one_thread):
    """``moalign front`` on the tiny policy with two lexical objectives: a run per weight for best-of-N and CD and
    one for sample; best-of-N draws the same candidates at every weight (same seed), so its pick at (1, 0)
    scores at least as high on the first objective on every prompt as at (0, 1), and the reverse; the summary's
    hypervolume is the one of the records' means; a second call decodes nothing."""
    import json

    from moalign.config import FrontConfig
    from moalign.front import front
    from moalign.records import read_records

    cfg = FrontConfig(policy=str(tiny_policy_dir), objectives="positive,concise", prompts=str(prompts_file),
                      weighted="best-of-n,cd", points="sample", steps=2, n=4, k=3, block_size=4, max_new_tokens=8,
                      normalize="none", out_dir=str(tmp_path / "front"), n_boot=100)  # fmt: skip
    res = front(cfg, progress=False)
    out = tmp_path / "front"
    labels = ["best-of-n-w1.00-0.00", "best-of-n-w0.50-0.50", "best-of-n-w0.00-1.00", "cd-w1.00-0.00",
              "cd-w0.50-0.50", "cd-w0.00-1.00", "sample"]  # fmt: skip
    assert list(res["runs"]) == labels and all((out / f"{lab}.jsonl").exists() for lab in labels)
    assert (out / "front.png").exists() and (out / "front.md").exists()
    first = {r["prompt_id"]: r["scores"] for r in read_records(out / "best-of-n-w1.00-0.00.jsonl")}
    last = {r["prompt_id"]: r["scores"] for r in read_records(out / "best-of-n-w0.00-1.00.jsonl")}
    assert all(first[i]["positive"] >= last[i]["positive"] - 1e-9 for i in first)
    assert all(last[i]["concise"] >= first[i]["concise"] - 1e-9 for i in first)
    assert read_records(out / "cd-w0.50-0.50.jsonl")[0]["config"]["scalarization"] == "positive=0.5,concise=0.5"
    proxy = res["spaces"]["proxy"]
    means = np.array([[np.mean([r["scores"][c] for r in read_records(out / f"{lab}.jsonl")])
                       for c in ("positive", "concise")] for lab in labels[:3]])  # fmt: skip
    assert np.allclose(proxy["methods"]["best-of-n"]["points"], means)
    assert proxy["methods"]["best-of-n"]["hypervolume"][0] == pytest.approx(hypervolume(means, proxy["ref"]))
    assert set(proxy["hypervolume_diffs"]) >= {"best-of-n - cd", "cd - sample"}
    assert json.loads((out / "front.json").read_text())["spaces"]["proxy"]["ref"] == proxy["ref"]
    before = {lab: (out / f"{lab}.jsonl").read_text() for lab in labels}
    again = front(cfg, progress=False)  # resumed: nothing decoded again
    assert {lab: (out / f"{lab}.jsonl").read_text() for lab in labels} == before
    assert again["spaces"]["proxy"]["methods"]["cd"]["points"] == proxy["methods"]["cd"]["points"]


def test_trained_policies_are_points_beside_the_methods(tiny_policy_dir, prompts_file, tmp_path, one_thread):
    """``--trained LABEL=POLICY``: plain samples of that policy (its own weights) as a point of its own, in the
    same summary and plot as the decoding methods."""
    import shutil

    import torch

    from moalign.config import FrontConfig
    from moalign.front import front
    from moalign.policies import load_policy
    from moalign.records import read_records

    tuned = tmp_path / "tuned"  # a "trained" policy: the tiny policy with its output layer perturbed
    shutil.copytree(tiny_policy_dir, tuned)
    pol = load_policy(str(tuned))
    with torch.no_grad():
        pol.model.lm_head.weight.add_(torch.randn_like(pol.model.lm_head.weight), alpha=0.5)
    pol.model.save_pretrained(tuned)
    cfg = FrontConfig(policy=str(tiny_policy_dir), objectives="positive,concise", prompts=str(prompts_file),
                      weighted="", points="sample", trained=f"tuned={tuned}", n=2, max_new_tokens=6,
                      normalize="none", out_dir=str(tmp_path / "front"), n_boot=50)  # fmt: skip
    res = front(cfg, progress=False)
    assert list(res["runs"]) == ["sample", "tuned"] and res["runs"]["tuned"]["method"] == "tuned"
    assert set(res["spaces"]["proxy"]["methods"]) == {"sample", "tuned"}
    base, trained = (read_records(tmp_path / "front" / f"{x}.jsonl") for x in ("sample", "tuned"))
    assert trained[0]["config"]["policy"] == str(tuned) and base[0]["config"]["policy"] == str(tiny_policy_dir)
    assert [r["response"] for r in trained] != [r["response"] for r in base]  # its own weights decoded
    from moalign.front import runs_of

    with pytest.raises(MoalignError, match="labels must differ from the methods' names"):
        runs_of(FrontConfig(weighted="", points="sample", trained=f"sample={tuned}"), ["a", "b"])
    with pytest.raises(MoalignError, match="entries must be LABEL=POLICY"):
        runs_of(FrontConfig(weighted="", points="sample", trained=str(tuned)), ["a", "b"])


def test_front_refuses_what_it_cannot_sweep(tmp_path, prompts_file):
    from moalign.config import FrontConfig
    from moalign.front import runs_of

    with pytest.raises(MoalignError, match="--lam belongs to rmod, none of the methods"):
        runs_of(FrontConfig(weighted="best-of-n", points="sample", lam=0.1), ["a", "b"])  # not silently dropped

    def cfg(**kw):
        return FrontConfig(**{"prompts": str(prompts_file), "out_dir": str(tmp_path), **kw})

    with pytest.raises(MoalignError, match="take.s. no preference weights"):
        runs_of(cfg(weighted="sample"), ["a", "b"])
    with pytest.raises(MoalignError, match="both --weighted and --points"):
        runs_of(cfg(weighted="cd", points="cd"), ["a", "b"])
    with pytest.raises(MoalignError, match="two objectives"):
        runs_of(cfg(), ["a"])
    assert len(runs_of(cfg(steps=4, points=""), ["a", "b", "c"])) == 2 * 15
