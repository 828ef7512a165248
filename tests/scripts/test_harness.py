"""The benchmarks' shared harness (benchmarks/harness.py): arguments, intervals, best-of-N at matched compute."""

from __future__ import annotations

import math

import harness as H  # benchmarks/ (pytest's pythonpath)
import numpy as np
import pytest

from moalign.evaluation import bootstrap_ci, mean_ci, paired_win_ci  # noqa: E402


def test_parser_adds_only_the_common_arguments_asked_for():
    ap = H.parser("x", seed=None, threads=None)
    assert vars(ap.parse_args([])) == {}
    ap = H.parser("x", prompts=12, out_dir="runs/a", batch_size=4, seed=3, threads=1)
    a = ap.parse_args([])
    assert (a.prompts, a.out_dir, a.batch_size, a.seed, a.threads, a.analyse_only) == (12, "runs/a", 4, 3, 1, False)
    a = H.parser("x", out_dir="d", out_alias="--out", analyse_only=False).parse_args(["--out", "e"])
    assert a.out_dir == "e" and not hasattr(a, "analyse_only")
    with pytest.raises(SystemExit):
        H.parser("x", seed=None).parse_args(["--seed", "1"])


def test_intervals_are_the_librarys_bootstrap():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=40), rng.normal(size=40).round(1)
    assert H.ci(np.mean, x) == list(bootstrap_ci(np.mean, x, n_boot=2000, seed=0))
    assert H.ci(np.mean, x, digits=2) == [round(v, 2) for v in bootstrap_ci(np.mean, x, n_boot=2000, seed=0)]
    X = np.stack([x, y], 1)
    cols = H.mean_cis(X)
    for j in range(2):
        assert cols[j] == H.iv_list(mean_ci(X[:, j]))  # one resampling for all columns = each column's own
    assert H.mean_cis(x) == H.iv_list(mean_ci(x))
    assert H.tie_wins([1, 2, 3], [1, 1, 4]).tolist() == [0.5, 1.0, 0.0]
    assert H.iv_list(paired_win_ci(x.round(0), y.round(0)))[0] == pytest.approx(
        H.tie_wins(x.round(0), y.round(0)).mean(), abs=1e-4
    )
    assert H.worst_of_means([1.0, 3.0], [0.0, 1.0]) == 0.5


def _prompt(wc: list[float], tokens: list[int]) -> dict[str, np.ndarray]:
    wc_a = np.array(wc, float)
    return {"proxy_wc": wc_a, "judge_wc": -wc_a, "words": np.arange(len(wc), dtype=float),
            "policy_tokens": np.array(tokens, float), "scorer_tokens": 2.0 * np.array(tokens, float)}  # fmt: skip


def test_best_of_n_points_pick_the_worst_case_best_of_disjoint_groups():
    per_prompt = [_prompt([0.1, 0.5, -0.2, 0.3], [10, 20, 30, 40]), _prompt([1.0, 0.0, 2.0, -1.0], [5, 5, 5, 5])]
    bon = H.best_of_n_points(per_prompt, 4)
    assert sorted(bon) == [1, 2, 4]
    # N = 1: every sample, averaged; N = 2: the better of (0, 1) and of (2, 3); N = 4: the best of all
    assert bon[1]["proxy_wc"].tolist() == pytest.approx([0.175, 0.5])
    assert bon[2]["proxy_wc"].tolist() == pytest.approx([(0.5 + 0.3) / 2, (1.0 + 2.0) / 2])
    assert bon[2]["words"].tolist() == pytest.approx([(1 + 3) / 2, (0 + 2) / 2])  # the picked samples' own
    assert bon[4]["proxy_wc"].tolist() == [0.5, 2.0]
    assert bon[4]["judge_wc"].tolist() == [-0.5, -2.0]  # other arrays follow the proxy's pick
    # compute: what one best-of-N costs, the first N samples' policy and scorer tokens
    assert bon[2]["total_tokens"].tolist() == [3 * 30, 3 * 10]
    assert bon[4]["policy_tokens"].tolist() == [100, 20]
    assert "total_flops" not in bon[4]  # arrays without FLOPs (older records) give none


def test_best_of_n_at_interpolates_in_log_compute():
    bon = {n: {"proxy_wc": np.array([float(n)]), "total_tokens": np.array([100.0 * n]),
               "total_flops": np.array([1e9 * n])} for n in (1, 2, 4, 8)}  # fmt: skip
    # matched on FLOPs by default: 2 GFLOP is N = 2, whatever the tokens say
    pt, name = H.best_of_n_at(bon, 2e9)
    assert pt["proxy_wc"][0] == pytest.approx(2.0) and "N≈2.0" in name
    assert H.best_of_n_at(bon, 2e10)[1] == "best-of-8 (less compute: 8.00 GFLOP)"
    pt, name = H.best_of_n_at(bon, 200.0, unit="tokens")
    assert pt["proxy_wc"][0] == pytest.approx(2.0) and "N≈2.0" in name
    total = 100.0 * 2**1.5  # halfway between N = 2 and N = 4 in log compute
    pt, name = H.best_of_n_at(bon, total, unit="tokens")
    w = (math.log(total) - math.log(200)) / (math.log(400) - math.log(200))
    assert w == pytest.approx(0.5)
    assert pt["proxy_wc"][0] == pytest.approx(3.0) and "N≈2.8" in name
    pt, name = H.best_of_n_at(bon, 5000.0, unit="tokens")
    assert pt["proxy_wc"][0] == 8.0 and name == "best-of-8 (less compute: 800 tokens)"
    pt, name = H.best_of_n_at(bon, 50.0, unit="tokens")
    assert pt["proxy_wc"][0] == 1.0 and name == "best-of-1 (more compute: 100 tokens)"
