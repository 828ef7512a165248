"""Tests of moalign.evaluation.metrics against numpy/scipy references and closed forms."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from scipy import stats

from moalign.errors import MoalignError
from moalign.evaluation import (
    EvaluationResult,
    NormStats,
    bootstrap_ci,
    evaluate_methods,
    fit_norm_stats,
    normalize_scores,
    per_objective_mean,
    worst_case,
    worst_case_win_indicator,
    worst_case_win_rate,
)

# ------------------------------------------------------------------------------------------------ point metrics


def test_worst_case_matches_numpy_min_and_accepts_torch():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(40, 3))
    np.testing.assert_array_equal(worst_case(s), np.min(s, axis=1))
    np.testing.assert_allclose(worst_case(torch.tensor(s)), np.min(s, axis=1), rtol=0, atol=0)
    np.testing.assert_allclose(per_objective_mean(s), s.mean(axis=0), rtol=1e-15)
    assert worst_case(s).dtype == np.float64


def test_worst_case_single_objective_is_identity():
    s = np.array([[1.0], [-2.0], [3.5]])
    np.testing.assert_array_equal(worst_case(s), [1.0, -2.0, 3.5])


@pytest.mark.parametrize("bad", [np.zeros(3), np.zeros((2, 0)), np.array([[1.0, np.nan]])])
def test_point_metrics_reject_bad_shapes_and_nan(bad):
    with pytest.raises(MoalignError):
        per_objective_mean(bad)


def test_win_rate_all_ties_is_half():
    a = np.array([[1.0, 2.0], [0.0, 5.0], [3.0, 3.0]])
    assert worst_case_win_rate(a, a) == 0.5
    # equal minima, different other objectives: still ties
    b = a.copy()
    b[:2, 1] += 10.0  # rows 0, 1: same minimum (objective 0), larger objective 1
    assert worst_case_win_rate(a[:2], b[:2]) == 0.5


def test_win_rate_dominating_is_one_and_zero():
    rng = np.random.default_rng(2)
    b = rng.normal(size=(50, 3))
    a = b + 0.1
    assert worst_case_win_rate(a, b) == 1.0
    assert worst_case_win_rate(b, a) == 0.0


def test_win_rate_symmetry_and_brute_force():
    rng = np.random.default_rng(3)
    # rounded so that exact ties happen
    a = np.round(rng.normal(size=(200, 2)), 1)
    b = np.round(rng.normal(size=(200, 2)), 1)
    wab = worst_case_win_rate(a, b)
    wba = worst_case_win_rate(b, a)
    assert math.isclose(wab + wba, 1.0, abs_tol=1e-12)
    # brute-force reference with a python loop
    ref = 0.0
    n_ties = 0
    for ra, rb in zip(a.tolist(), b.tolist()):
        ma, mb = min(ra), min(rb)
        ref += 1.0 if ma > mb else 0.5 if ma == mb else 0.0
        n_ties += ma == mb
    assert n_ties > 0  # the test exercises ties
    assert math.isclose(wab, ref / 200, abs_tol=1e-12)


def test_win_rate_tolerance():
    a = np.array([[1.0, 1.00], [2.0, 2.0], [0.0, 0.0]])
    b = np.array([[1.05, 9.0], [1.0, 9.0], [0.2, 9.0]])
    # exact: loss, win, loss
    np.testing.assert_array_equal(worst_case_win_indicator(a, b), [0.0, 1.0, 0.0])
    # tol=0.1: tie, win, loss
    np.testing.assert_array_equal(worst_case_win_indicator(a, b, tol=0.1), [0.5, 1.0, 0.0])
    assert math.isclose(worst_case_win_rate(a, b, tol=0.1), 0.5)
    for t in (0.0, 0.1, 0.5):
        assert math.isclose(worst_case_win_rate(a, b, t) + worst_case_win_rate(b, a, t), 1.0)
    with pytest.raises(MoalignError):
        worst_case_win_rate(a, b, tol=-1.0)


def test_win_rate_shape_mismatch_and_empty():
    with pytest.raises(MoalignError, match="shape"):
        worst_case_win_rate(np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(MoalignError):
        worst_case_win_rate(np.zeros((0, 2)), np.zeros((0, 2)))


# ------------------------------------------------------------------------------------------------ normalisation


def test_normalisation_round_trip_and_fit():
    rng = np.random.default_rng(4)
    s = rng.normal(loc=[3.0, -1.0, 10.0], scale=[0.5, 2.0, 7.0], size=(300, 3))
    ns = fit_norm_stats(s, ["a", "b", "c"], source="unit test")
    np.testing.assert_allclose(ns.mean, s.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(ns.std, s.std(axis=0), rtol=1e-12)
    z = normalize_scores(s, ns.mean, ns.std)
    # z-scores of the fitting set have mean 0 and std 1 (scipy.stats.zscore as independent reference)
    np.testing.assert_allclose(z, stats.zscore(s, axis=0), atol=1e-12)
    # inverse transform recovers the scores
    np.testing.assert_allclose(z * np.array(ns.std) + np.array(ns.mean), s, atol=1e-12)
    # dict round trip (through JSON)
    ns2 = NormStats.from_dict(json.loads(json.dumps(ns.to_dict())))
    assert ns2 == ns
    assert ns2.n == 300 and ns2.source == "unit test"
    assert "z-score" in ns2.describe() and "unit test" in ns2.describe()
    # subset reorders columns
    sub = ns.subset(["c", "a"])
    np.testing.assert_allclose(sub.apply(s[:, [2, 0]]), z[:, [2, 0]], atol=1e-12)
    with pytest.raises(MoalignError, match="'d'"):
        ns.subset(["a", "d"])


def test_normalisation_errors():
    s = np.array([[1.0, 2.0], [1.0, 3.0]])
    with pytest.raises(MoalignError, match="'const'"):
        fit_norm_stats(s, ["const", "ok"])
    with pytest.raises(MoalignError, match="std"):
        normalize_scores(s, [0.0, 0.0], [1.0, 0.0])
    with pytest.raises(MoalignError):
        normalize_scores(s, [0.0], [1.0])
    with pytest.raises(MoalignError):
        fit_norm_stats(s, ["only_one"])
    with pytest.raises(MoalignError):
        NormStats(mean=[0.0], std=[0.0], names=["a"])
    with pytest.raises(MoalignError):
        NormStats.from_dict({"mean": [0.0]})


# ------------------------------------------------------------------------------------------------ bootstrap


@pytest.mark.parametrize("alpha, low, high", [(0.05, 0.89, 0.97), (0.5, 0.43, 0.57)])
def test_bootstrap_coverage_matches_its_level(alpha, low, high):
    """Seeded simulation (400 samples of a skewed distribution, n=60): the 1 - alpha percentile interval of
    the mean covers the true mean at about its nominal rate. The bands are nominal +- ~2.5 binomial standard
    errors (sd 0.011 at 95%, 0.025 at 50%), shifted down a little at 95% for the percentile bootstrap's known
    under-coverage on skewed data at this n (observed 0.920 and 0.485). A wrong tail (alpha vs alpha/2) gives
    90% or 75% coverage and fails."""
    rng = np.random.default_rng(123)
    reps, covered = 400, 0
    for r in range(reps):
        x = rng.exponential(scale=2.0, size=60)  # skewed, true mean 2
        est, lo, hi = bootstrap_ci(np.mean, x, n_boot=300, seed=r, alpha=alpha)
        assert lo <= est <= hi
        covered += lo <= 2.0 <= hi
    assert low <= covered / reps <= high


def test_bootstrap_matches_normal_theory_and_scipy():
    rng = np.random.default_rng(5)
    x = rng.normal(loc=1.0, scale=3.0, size=1500)
    est, lo, hi = bootstrap_ci(np.mean, x, n_boot=2000, seed=0)
    assert est == pytest.approx(x.mean(), abs=1e-12)
    se = x.std(ddof=1) / math.sqrt(len(x))
    z = stats.norm.ppf(0.975)
    assert lo == pytest.approx(x.mean() - z * se, abs=0.12 * z * se)
    assert hi == pytest.approx(x.mean() + z * se, abs=0.12 * z * se)
    ref = stats.bootstrap((x,), np.mean, n_resamples=2000, method="percentile", random_state=1)
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.12 * z * se)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.12 * z * se)


def test_bootstrap_reproducible_paired_and_vector():
    rng = np.random.default_rng(6)
    a = rng.normal(size=80)
    b = a + rng.normal(scale=0.1, size=80)
    r1 = bootstrap_ci(lambda u, v: np.mean(u - v), a, b, n_boot=200, seed=7)
    r2 = bootstrap_ci(lambda u, v: np.mean(u - v), a, b, n_boot=200, seed=7)
    r3 = bootstrap_ci(lambda u, v: np.mean(u - v), a, b, n_boot=200, seed=8)
    assert r1 == r2
    assert r1 != r3
    # pairing: resampling rows jointly keeps the narrow interval of a strongly correlated difference;
    # an unpaired bootstrap would give a much wider one (sd of a - b is 0.1 vs sd of a about 1)
    assert r1[2] - r1[1] < 0.1
    # identical arrays: a paired bootstrap of the difference is exactly zero everywhere
    assert bootstrap_ci(lambda u, v: np.mean(u - v), a, a, n_boot=50) == (0.0, 0.0, 0.0)
    # vector-valued statistics give elementwise intervals
    m = np.column_stack([a, b, 10 + a])
    est, lo, hi = bootstrap_ci(lambda s: s.mean(axis=0), m, n_boot=200, seed=0)
    assert est.shape == lo.shape == hi.shape == (3,)
    assert (lo <= est).all() and (est <= hi).all()
    np.testing.assert_allclose(hi[2] - lo[2], hi[0] - lo[0], atol=1e-9)  # shift invariance
    # torch input
    assert bootstrap_ci(np.mean, torch.tensor(a), n_boot=200, seed=7)[0] == pytest.approx(a.mean())


def test_bootstrap_errors():
    with pytest.raises(MoalignError, match="length"):
        bootstrap_ci(np.mean, np.zeros(3), np.zeros(4))
    with pytest.raises(MoalignError):
        bootstrap_ci(np.mean, np.zeros(0))
    with pytest.raises(MoalignError):
        bootstrap_ci(np.mean, np.zeros(3), n_boot=0)
    with pytest.raises(MoalignError):
        bootstrap_ci(np.mean, np.zeros(3), alpha=1.5)
    with pytest.raises(MoalignError):
        bootstrap_ci(np.mean)


# ------------------------------------------------------------------------------------------------ evaluate_methods


def _records(method: str, ids, scores: np.ndarray, names=("helpful", "harmless")) -> list[dict]:
    return [
        {
            "prompt_id": pid,
            "prompt": f"prompt {pid}",
            "response": f"{method} answer {pid}",
            "method": method,
            "scores": {g: float(v) for g, v in zip(names, row)},
        }
        for pid, row in zip(ids, scores)
    ]


def _synthetic(seed: int = 0):
    rng = np.random.default_rng(seed)
    n = 60
    ids = [str(i) for i in range(n)]
    base = rng.normal(loc=[0.0, 5.0], scale=[1.0, 10.0], size=(n, 2))
    cd = base + rng.normal(loc=[0.5, 0.0], scale=[1.0, 10.0], size=(n, 2))
    rmod = base + rng.normal(loc=[0.3, 4.0], scale=[1.0, 10.0], size=(n, 2))
    return ids, {"base": base, "cd": cd, "rmod": rmod}


def test_evaluate_methods_end_to_end_pairs_by_prompt_id():
    ids, sc = _synthetic()
    runs = {}
    order_rng = random.Random(0)
    for m, s in sc.items():
        recs = _records(m, ids, s)
        order_rng.shuffle(recs)  # pairing must use prompt_id, not position
        runs[m] = recs
    # one cd record uses an int id: ids are compared as strings
    for r in runs["cd"]:
        if r["prompt_id"] == "7":
            r["prompt_id"] = 7
    # rmod is missing 10 prompts: only the overlap is paired
    runs["rmod"] = [r for r in runs["rmod"] if int(r["prompt_id"]) >= 10]
    norm = fit_norm_stats(sc["base"], ["helpful", "harmless"], source="base run")

    res = evaluate_methods(runs, ["helpful", "harmless"], reference="base", norm=norm, n_boot=300, seed=1)
    assert list(res.methods) == ["base", "cd", "rmod"]
    assert res.score_space == norm.describe() and "z-score" in res.score_space
    z = {m: norm.apply(s) for m, s in sc.items()}
    for m in ("base", "cd"):
        s = res.methods[m]
        assert s.n == 60
        for j, g in enumerate(["helpful", "harmless"]):
            iv = s.objective_means[g]
            assert iv.estimate == pytest.approx(sc[m][:, j].mean(), abs=1e-12)  # raw means
            assert iv.low <= iv.estimate <= iv.high
        assert s.worst_case.estimate == pytest.approx(z[m].min(axis=1).mean(), abs=1e-12)
    assert res.methods["base"].win_rate is None
    cd = res.methods["cd"]
    assert cd.n_paired == 60
    assert cd.win_rate.estimate == pytest.approx(worst_case_win_rate(z["cd"], z["base"]), abs=1e-12)
    assert cd.win_rate.low <= cd.win_rate.estimate <= cd.win_rate.high
    rm = res.methods["rmod"]
    assert rm.n == 50 and rm.n_paired == 50
    assert rm.win_rate.estimate == pytest.approx(
        worst_case_win_rate(z["rmod"][10:], z["base"][10:]), abs=1e-12
    )
    assert rm.objective_means["harmless"].estimate == pytest.approx(sc["rmod"][10:, 1].mean(), abs=1e-12)

    # reproducible with the seed; JSON round trip
    res2 = evaluate_methods(runs, ["helpful", "harmless"], reference="base", norm=norm, n_boot=300, seed=1)
    assert res2.to_dict() == res.to_dict()
    d = json.loads(json.dumps(res.to_dict()))
    assert EvaluationResult.from_dict(d).to_dict() == res.to_dict()
    assert d["score_space"] == res.score_space and d["norm"]["source"] == "base run"

    table = res.table()
    lines = table.splitlines()
    for m in ("base", "cd", "rmod"):
        assert any(line.startswith(m) for line in lines)
    assert "helpful" in lines[0] and "harmless" in lines[0] and "win vs base" in lines[0]
    assert "(reference)" in table and "z-score" in table
    assert f"{100 * cd.win_rate.estimate:.1f} ±" in table
    # aligned: header and method rows have equal width
    assert len({len(line) for line in lines[:5]}) == 1


def test_evaluate_methods_raw_space_and_scale_sensitivity():
    ids, sc = _synthetic(1)
    runs = {m: _records(m, ids, s) for m, s in sc.items()}
    res = evaluate_methods(runs, ["helpful", "harmless"], reference="base", n_boot=100)
    assert res.score_space == "raw"
    assert res.norm is None
    cd = res.methods["cd"]
    assert cd.worst_case.estimate == pytest.approx(sc["cd"].min(axis=1).mean(), abs=1e-12)
    assert cd.win_rate.estimate == pytest.approx(worst_case_win_rate(sc["cd"], sc["base"]), abs=1e-12)
    # no reference: no win rates
    res2 = evaluate_methods(runs, ["helpful"], n_boot=50)
    assert all(s.win_rate is None for s in res2.methods.values())
    assert "win vs" not in res2.table()
    assert res2.methods["cd"].worst_case.estimate == pytest.approx(sc["cd"][:, 0].mean(), abs=1e-12)


def test_evaluate_methods_errors():
    ids, sc = _synthetic(2)
    runs = {m: _records(m, ids, s) for m, s in sc.items()}
    obj = ["helpful", "harmless"]

    bad = {**runs, "cd": [dict(r) for r in runs["cd"]]}
    bad["cd"][3] = {**bad["cd"][3], "scores": {"helpful": 1.0}}
    with pytest.raises(MoalignError, match=r"'cd'.*'3'.*harmless"):
        evaluate_methods(bad, obj, n_boot=10)

    bad["cd"][3] = {**bad["cd"][3], "scores": {"helpful": 1.0, "harmless": float("nan")}}
    with pytest.raises(MoalignError, match=r"'cd'.*'3'"):
        evaluate_methods(bad, obj, n_boot=10)

    bad["cd"][3] = {**bad["cd"][3], "scores": {"helpful": 1.0, "harmless": "high"}}
    with pytest.raises(MoalignError, match="not a number"):
        evaluate_methods(bad, obj, n_boot=10)

    disjoint = {"base": runs["base"][:10], "cd": runs["cd"][10:20]}
    with pytest.raises(MoalignError, match="share no prompt_id"):
        evaluate_methods(disjoint, obj, reference="base", n_boot=10)
    # ... but without a reference there is nothing to pair
    evaluate_methods(disjoint, obj, n_boot=10)

    with pytest.raises(MoalignError, match="more than once"):
        evaluate_methods({"base": runs["base"] + runs["base"][:1]}, obj, n_boot=10)
    with pytest.raises(MoalignError, match="reference"):
        evaluate_methods(runs, obj, reference="nope", n_boot=10)
    with pytest.raises(MoalignError, match="no records"):
        evaluate_methods({"base": []}, obj, n_boot=10)
    with pytest.raises(MoalignError, match="prompt_id"):
        evaluate_methods({"base": [{"scores": {"helpful": 1.0, "harmless": 0.0}}]}, obj, n_boot=10)
    with pytest.raises(MoalignError):
        evaluate_methods(runs, [], n_boot=10)
    with pytest.raises(MoalignError):
        evaluate_methods({}, obj, n_boot=10)
    norm = NormStats(mean=[0.0], std=[1.0], names=["helpful"])
    with pytest.raises(MoalignError, match="harmless"):
        evaluate_methods(runs, obj, norm=norm, n_boot=10)
    with pytest.raises(MoalignError):
        EvaluationResult.from_dict({"objectives": []})


# ------------------------------------------------------------------------------------------ several samples a prompt


def test_evaluate_methods_two_samples_vs_one_by_hand():
    """A run with 2 responses per prompt (plain sampling, n=2) against a 1-response run, checked by hand."""
    rng = np.random.default_rng(5)
    names = ["helpful", "harmless"]
    p = 30
    two = rng.normal(loc=[0.0, 2.0], scale=[1.0, 4.0], size=(p, 2, 2))  # [prompt, sample, objective]
    one = rng.normal(loc=[0.2, 2.0], scale=[1.0, 4.0], size=(p, 2))
    norm = fit_norm_stats(one, names, source="one-sample run")
    recs_two = [
        {
            "record_id": f"{i}/{j}",
            "prompt_id": str(i),
            "sample_index": j,
            "response": f"answer {i}/{j}",
            "scores": dict(zip(names, two[i, j].tolist())),
        }
        for i in range(p)
        for j in range(2)
    ]
    del recs_two[0]["sample_index"]  # a record without sample_index is sample 0
    random.Random(1).shuffle(recs_two)  # grouping is by prompt_id, not position
    runs = {"one": _records("one", [str(i) for i in range(p)], one), "two": recs_two}

    res = evaluate_methods(runs, names, reference="one", norm=norm, n_boot=200, seed=4)

    # by hand: per-objective means of each prompt's samples, then over prompts (raw)
    raw_prompt = two.mean(axis=1)
    # worst case per sample (z-scores), then the mean per prompt
    z_two = (two - np.array(norm.mean)) / np.array(norm.std)
    w_two = z_two.min(axis=2).mean(axis=1)
    w_one = ((one - np.array(norm.mean)) / np.array(norm.std)).min(axis=1)
    # the order matters: the worst case of the mean sample differs
    assert not np.allclose(w_two, z_two.mean(axis=1).min(axis=1))
    d = w_two - w_one
    win = ((d > 0) + 0.5 * (d == 0)).astype(float)

    s = res.methods["two"]
    assert s.n == p and s.n_responses == 2 * p and s.n_paired == p and s.samples_per_prompt == 2
    for j, g in enumerate(names):
        assert s.objective_means[g].estimate == pytest.approx(raw_prompt[:, j].mean(), abs=1e-12)
    assert s.worst_case.estimate == pytest.approx(w_two.mean(), abs=1e-12)
    assert s.win_rate.estimate == pytest.approx(win.mean(), abs=1e-12)
    # the bootstrap resamples prompts (first-seen order of prompt_id in the shuffled records)
    order = list(dict.fromkeys(r["prompt_id"] for r in recs_two))
    w_ordered = w_two[[int(pid) for pid in order]]
    est, lo, hi = bootstrap_ci(np.mean, w_ordered, n_boot=200, seed=4)
    assert (s.worst_case.low, s.worst_case.high) == pytest.approx((lo, hi), abs=1e-12)
    est, lo, hi = bootstrap_ci(
        per_objective_mean, raw_prompt[[int(pid) for pid in order]], n_boot=200, seed=4
    )
    assert s.objective_means["harmless"].low == pytest.approx(lo[1], abs=1e-12)

    o = res.methods["one"]
    assert o.n == p and o.n_responses == p and o.win_rate is None
    assert o.worst_case.estimate == pytest.approx(w_one.mean(), abs=1e-12)

    # the other way round: the one-sample run against the two-sample reference
    rev = evaluate_methods(runs, names, reference="two", norm=norm, n_boot=50)
    assert rev.methods["one"].win_rate.estimate == pytest.approx(1 - win.mean(), abs=1e-12)

    # a prompt with one sample only counts that sample; the raw space without norm
    runs_missing = {"one": runs["one"], "two": [r for r in recs_two if r["record_id"] != "3/1"]}
    res_m = evaluate_methods(runs_missing, names, reference="one", n_boot=20)
    w_raw = two.min(axis=2)
    w_raw_prompt = w_raw.mean(axis=1)
    w_raw_prompt[3] = w_raw[3, 0]
    assert res_m.methods["two"].worst_case.estimate == pytest.approx(w_raw_prompt.mean(), abs=1e-12)
    assert res_m.methods["two"].n == p and res_m.methods["two"].n_responses == 2 * p - 1

    # JSON round trip and the table's responses column
    assert EvaluationResult.from_dict(json.loads(json.dumps(res.to_dict()))).to_dict() == res.to_dict()
    table = res.table()
    assert "responses" in table.splitlines()[0] and "prompt's samples" in table
    assert "responses" not in evaluate_methods({"one": runs["one"]}, names, n_boot=10).table()


def test_evaluate_methods_duplicate_sample_is_an_error():
    names = ["helpful", "harmless"]
    rec = {"prompt_id": "3", "scores": {"helpful": 1.0, "harmless": 0.0}}
    with pytest.raises(
        MoalignError, match=r"'two': prompt_id '3' with sample_index 1 appears more than once"
    ):
        evaluate_methods(
            {"two": [{**rec, "sample_index": 0}, {**rec, "sample_index": 1}, {**rec, "sample_index": 1}]},
            names,
        )
    # no sample_index is sample 0
    with pytest.raises(MoalignError, match=r"prompt_id '3' with sample_index 0 appears more than once"):
        evaluate_methods({"two": [{**rec, "sample_index": 0}, rec]}, names)
    for bad in ("1", -1, 1.5, True):
        with pytest.raises(MoalignError, match="sample_index must be an integer"):
            evaluate_methods({"two": [{**rec, "sample_index": bad}]}, names)
    # distinct samples of one prompt are fine
    ok = evaluate_methods(
        {"two": [{**rec, "sample_index": 0}, {**rec, "sample_index": 1, "prompt_id": 3}]}, names
    )
    assert ok.methods["two"].n == 1 and ok.methods["two"].n_responses == 2


def test_compute_per_response_is_shown_beside_the_scores():
    """Each method's mean policy and scorer tokens per response (older records: forward_tokens), in the
    summary, its JSON and the table; runs without the counts show none."""
    a = [{"prompt_id": str(i), "response": "x", "scores": {"g": float(i)}, "forward_tokens": 10 + i,
          "scorer_tokens": 2 * i} for i in range(4)]  # fmt: skip
    b = [{"prompt_id": str(i), "response": "y", "scores": {"g": 1.0}, "policy_tokens": 7, "scorer_tokens": 30}
         for i in range(4)]  # fmt: skip
    c = [{"prompt_id": str(i), "response": "z", "scores": {"g": 0.0}} for i in range(4)]
    d = [{**r, "response": "w", "policy_flops": 2e9 * (i + 1), "scorer_flops": 1e9} for i, r in enumerate(b)]
    res = evaluate_methods({"a": a, "b": b, "c": c, "d": d}, ["g"], reference="a", n_boot=50)
    assert res.methods["a"].compute == {"policy_tokens": 11.5, "scorer_tokens": 3.0, "total_tokens": 14.5}
    assert res.methods["d"].compute == {"policy_tokens": 7.0, "scorer_tokens": 30.0, "total_tokens": 37.0,
                                        "policy_flops": 5e9, "scorer_flops": 1e9, "total_flops": 6e9}
    assert res.methods["b"].compute == {"policy_tokens": 7.0, "scorer_tokens": 30.0, "total_tokens": 37.0}
    assert res.methods["c"].compute is None
    again = EvaluationResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert again.methods["b"].compute == res.methods["b"].compute
    lines = res.table().splitlines()
    assert "policy tok" in lines[0] and "scorer tok" in lines[0]
    row_b = next(line for line in lines if line.startswith("b "))
    assert row_b.split()[-3:] == ["7", "30", "-"]  # no FLOPs in these records
    assert next(line for line in lines if line.startswith("d ")).split()[-3:] == ["7", "30", "6.00"]
    assert "GFLOP" in lines[0]
    assert "matched compute" in res.table()
    plain = evaluate_methods({"c": c}, ["g"], n_boot=50)
    assert "policy tok" not in plain.table()
