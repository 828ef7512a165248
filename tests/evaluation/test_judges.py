"""Proxy and judges: every comparison scored by the decoding objectives (PROXY) and by other signals (JUDGES).

Judge columns are checked against numpy by hand; ``evaluate --judges`` and ``compare --judges`` score the
responses once, cache the scores in ``RUN.judges.jsonl`` and reuse them (calls to the judge are counted).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from moalign.config import CompareConfig, EvaluateConfig
from moalign.errors import MoalignError
from moalign.evaluation import bootstrap_ci, evaluate_methods, fit_norm_stats, worst_case_win_rate
from moalign.evaluation.evaluate import evaluate_files, judges_path, read_judge_cache
from moalign.evaluation.metrics import EvaluationResult
from moalign.objectives.base import CallableObjective, register_objective

CALLS: dict[str, int] = {}


def _counted(name, fn):
    def score(prompts, responses):
        CALLS[name] = CALLS.get(name, 0) + 1
        return fn(prompts, responses)

    return lambda: CallableObjective(name, score)


def _chars(p, r):
    return [len(x) / 10 for x in r]


def _vowels(p, r):
    return [sum(c in "aeiou" for c in x) / 5 for x in r]


def _hashy(p, r):
    return [sum(ord(c) % 7 for c in x) / 10 + 0.01 * len(q) for q, x in zip(p, r)]


register_objective("tj_chars", _counted("tj_chars", _chars))
register_objective("tj_vowels", _counted("tj_vowels", _vowels))
register_objective("tj_hashy", _counted("tj_hashy", _hashy))


# ----------------------------------------------------------------------------------------------- by hand
def _synthetic_runs(seed=0, p=25):
    """Three runs on p prompts: 'ref' and 'cd' one response each, 'two' two responses per prompt."""
    rng = np.random.default_rng(seed)
    runs, mats = {}, {}
    for k, (m, s) in enumerate([("ref", 1), ("cd", 1), ("two", 2)]):
        proxy = rng.normal(loc=[0.3 * k, 1.0], scale=[1.0, 2.0], size=(p, s, 2))
        judge = rng.normal(loc=[0.1 * k, -1.0], scale=[1.0, 3.0], size=(p, s, 2))
        words = rng.integers(1, 30 + 10 * k, size=(p, s))
        recs = []
        for i in range(p):
            for j in range(s):
                recs.append({
                    "record_id": f"{i}/{j}", "prompt_id": str(i), "sample_index": j, "prompt": f"q{i}",
                    "response": "  ".join(["word"] * int(words[i, j])) + ("\n" if j else ""),
                    "scores": {"helpful": proxy[i, j, 0], "harmless": proxy[i, j, 1]},
                    "judge_scores": {"jx": judge[i, j, 0], "helpful": judge[i, j, 1]},
                })  # fmt: skip
        runs[m], mats[m] = recs, (proxy, judge, words.astype(float))
    return runs, mats


def test_judge_columns_match_numpy_by_hand():
    runs, mats = _synthetic_runs()
    proxy_norm = fit_norm_stats(mats["ref"][0][:, 0], ["helpful", "harmless"], source="ref")
    judges = ["jx", "helpful"]
    res = evaluate_methods(runs, ["helpful", "harmless"], reference="ref", norm=proxy_norm, n_boot=200,
                           seed=3, judges=judges, optimised={"cd": ["helpful", "harmless"], "two": ["x"]})  # fmt: skip

    # judge statistics: fitted on the reference run's responses (ddof=0), recorded in the result
    ref_j = mats["ref"][1][:, 0]
    mu, sd = ref_j.mean(axis=0), ref_j.std(axis=0)
    np.testing.assert_allclose(res.judge_norm.mean, mu, rtol=1e-12)
    np.testing.assert_allclose(res.judge_norm.std, sd, rtol=1e-12)
    assert res.judge_norm.n == 25 and "reference run 'ref'" in res.judge_score_space

    wc_p = {}
    for m, (proxy, judge, words) in mats.items():
        s = res.methods[m].judge
        jz = (judge - mu) / sd  # [p, samples, judges]
        jwc = jz.min(axis=2).mean(axis=1)  # worst case per sample, then mean over a prompt's samples
        pwc = proxy_norm.apply(proxy.reshape(-1, 2)).reshape(proxy.shape).min(axis=2).mean(axis=1)
        wc_p[m] = jwc
        for k, j in enumerate(judges):
            assert s.objective_means[j].estimate == pytest.approx(judge[:, :, k].mean(), abs=1e-12)
        assert s.worst_case.estimate == pytest.approx(jwc.mean(), abs=1e-12)
        assert s.gap.estimate == pytest.approx((pwc - jwc).mean(), abs=1e-12)
        assert s.length_words.estimate == pytest.approx(words.mean(axis=1).mean(), abs=1e-12)
        # the intervals are the paired bootstrap of the same per-prompt arrays (prompts in order here)
        for iv, arr in ((s.worst_case, jwc), (s.gap, pwc - jwc), (s.length_words, words.mean(axis=1))):
            _, lo, hi = bootstrap_ci(np.mean, arr, n_boot=200, seed=3)
            assert (iv.low, iv.high) == pytest.approx((lo, hi), abs=1e-12)
        # proxy figures are untouched by the judges
        assert res.methods[m].worst_case.estimate == pytest.approx(pwc.mean(), abs=1e-12)
    assert res.methods["ref"].judge.win_rate is None
    assert res.methods["cd"].judge.win_rate.estimate == pytest.approx(
        worst_case_win_rate(wc_p["cd"][:, None], wc_p["ref"][:, None]), abs=1e-12
    )
    d = wc_p["two"] - wc_p["ref"]
    assert res.methods["two"].judge.win_rate.estimate == pytest.approx(((d > 0) + 0.5 * (d == 0)).mean())
    # the paired gain over the reference: mean per-prompt difference, its interval the paired bootstrap of it
    g = res.methods["two"].judge.gain
    _, lo, hi = bootstrap_ci(np.mean, d, n_boot=200, seed=3)
    assert (g.estimate, g.low, g.high) == pytest.approx((d.mean(), lo, hi), abs=1e-12)
    assert res.methods["ref"].judge.gain is None and res.methods["ref"].gain is None

    # optimised judges: 'helpful' is a judge and cd's decoding objective; 'two' decoded with none of them
    assert res.methods["cd"].judge.optimised == ["helpful"]
    assert res.methods["two"].judge.optimised == [] and res.methods["ref"].judge.optimised == []

    # JSON: proxy keys as before plus the judge block, and a lossless round trip
    dd = json.loads(json.dumps(res.to_dict()))
    assert dd["judges"] == judges and dd["judge_norm"]["mean"] == pytest.approx(mu.tolist())
    jcd = dd["methods"]["cd"]["judge"]
    assert set(jcd) == {"objective_means", "worst_case", "win_rate", "proxy_minus_judge_worst_case",
                        "length_words", "optimised", "gain"}  # fmt: skip
    assert jcd["optimised"] == ["helpful"]
    assert EvaluationResult.from_dict(dd).to_dict() == res.to_dict()

    # the table: proxy and judge groups side by side, the marker on cd's row only, length and gap columns
    table = res.table()
    lines = table.splitlines()
    assert "PROXY" in lines[0] and "JUDGES" in lines[0] and lines[0].index("PROXY") < lines[0].index("JUDGES")
    head = lines[1]
    for col in ("helpful (raw)", "jx (raw)", "length (words)", "win vs ref (%)", "proxy - judge"):
        assert col in head
    assert head.index("harmless (raw)") < head.index("jx (raw)") < head.index("length (words)")
    rows = {ln.split()[0]: ln for ln in lines[3:6]}
    assert "*" in rows["cd"] and "*" not in rows["ref"] and "*" not in rows["two"]
    cd = res.methods["cd"].judge
    assert (
        f"{cd.objective_means['helpful'].estimate:.3f} ± {cd.objective_means['helpful'].half_width:.3f}*"
        in rows["cd"]
    )
    assert f"{cd.length_words.estimate:.1f} ± {cd.length_words.half_width:.1f}" in rows["cd"]
    assert f"{cd.gap.estimate:+.3f} ±" in rows["cd"]
    assert "* optimised by this run: not an independent judge" in table
    assert len({len(ln) for ln in lines[1:6]}) == 1  # aligned


def test_judge_statistics_pooled_without_reference_and_when_constant_on_reference():
    runs, mats = _synthetic_runs(1, p=10)
    res = evaluate_methods(runs, ["helpful"], n_boot=20, judges=["jx"])
    pooled = np.concatenate([mats[m][1][:, :, 0].reshape(-1) for m in ("ref", "cd", "two")])
    assert res.judge_norm.mean == pytest.approx([pooled.mean()]) and res.judge_norm.std == pytest.approx(
        [pooled.std()]
    )
    assert res.judge_norm.n == 40 and "pooled" in res.judge_score_space
    assert "*" not in res.table() and "win vs" not in res.table()
    for r in runs["ref"]:
        r["judge_scores"]["jx"] = 1.5  # constant on the reference: z-scores need the pooled runs
    res = evaluate_methods(runs, ["helpful"], reference="ref", n_boot=20, judges=["jx"])
    assert "pooled" in res.judge_norm.source and "'jx' constant on 'ref'" in res.judge_norm.source


def test_without_judges_output_is_unchanged():
    runs, _ = _synthetic_runs(2, p=8)
    res = evaluate_methods(runs, ["helpful", "harmless"], reference="ref", n_boot=20)
    d = res.to_dict()
    assert (
        "judges" not in d and "judge_norm" not in d and all("judge" not in m for m in d["methods"].values())
    )
    assert "JUDGES" not in res.table() and "length" not in res.table()
    with pytest.raises(MoalignError, match=r"'ref'.*no score for judge 'nope'"):
        evaluate_methods(runs, ["helpful"], n_boot=5, judges=["nope"])


def test_judged_plot(tmp_path):
    from matplotlib import image as mpimg

    from moalign.evaluation.report import plot_comparison

    def _check_png(path):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(path)
        rgb = img[..., :3]
        assert rgb.var() > 1e-3 and ((rgb.max(axis=2) - rgb.min(axis=2)) > 0.2).sum() > 2_000
        return img

    runs, _ = _synthetic_runs(3, p=12)
    res = evaluate_methods(runs, ["helpful", "harmless"], reference="ref", n_boot=30, judges=["jx", "helpful"],
                           optimised={"cd": ["helpful"]})  # fmt: skip
    img = _check_png(plot_comparison(res, tmp_path / "j.png"))
    assert img.shape[0] > 600  # two rows of panels
    _check_png(plot_comparison(EvaluationResult.from_dict(res.to_dict()), tmp_path / "j2.png"))


# ------------------------------------------------------------------------------------- files and cache
def _write_run(path, responses, objectives="tj_vowels", meta=True):
    recs = [{"record_id": str(i), "prompt_id": str(i), "sample_index": 0, "prompt": f"prompt {i}", "response": r,
             "scores": {"tj_vowels": _vowels([], [r])[0]}} for i, r in enumerate(responses)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    if meta:
        mp = path.with_name(path.name.removesuffix(".jsonl") + ".meta.json")
        names = objectives.split(",")
        mp.write_text(json.dumps({"config": {"objectives": objectives}, "norm": None,
                                  "objectives": [{"name": n, "type": "callable"} for n in names]}))  # fmt: skip
    return recs


def test_evaluate_files_scores_judges_once_and_marks_optimised(tmp_path):
    a, b = tmp_path / "base.jsonl", tmp_path / "tuned.jsonl"
    ra = _write_run(a, ["hello there", "a b c", "sky is blue", "ok", "no way at all"])
    _write_run(
        b, ["hi", "the colour red is nice", "because of air", "fine thanks", "yes"], "tj_vowels,tj_chars"
    )
    cfg = EvaluateConfig(inputs=[str(a), str(b)], reference=str(a), normalize="none", n_boot=30,
                         judges="tj_chars,tj_hashy")  # fmt: skip
    CALLS.clear()
    res = evaluate_files(cfg)
    assert CALLS == {"tj_chars": 2, "tj_hashy": 2}  # one batch per run and judge
    assert res.judges == ["tj_chars", "tj_hashy"]
    # tuned decoded with tj_chars (its .meta.json): that judge is not independent of it
    assert res.methods["tuned"].judge.optimised == ["tj_chars"] and res.methods["base"].judge.optimised == []
    assert "*" in [ln for ln in res.table().splitlines() if ln.startswith("tuned")][0]
    # the sidecar holds every (record, judge) score, keyed by record_id
    cache = read_judge_cache(judges_path(a))
    assert set(cache) == {r["record_id"] for r in ra}
    assert cache["2"]["tj_chars"][0] == pytest.approx(len("sky is blue") / 10)
    assert res.methods["base"].judge.objective_means["tj_chars"].estimate == pytest.approx(
        np.mean([len(r["response"]) / 10 for r in ra]), rel=1e-6
    )
    assert res.methods["base"].judge.length_words.estimate == pytest.approx(np.mean([2, 3, 3, 1, 4]))
    assert res.extra["judge_files"]["base"]["newly_scored"] == 10

    # a rerun reads the cache: no judge call, same figures
    CALLS.clear()
    again = evaluate_files(cfg)
    assert CALLS == {} and again.to_dict()["methods"] == res.to_dict()["methods"]
    # a changed response is judged again, alone; a new judge scores every record, once
    lines = a.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["response"] = "a b c d"
    lines[1] = json.dumps(rec)
    a.write_text("\n".join(lines) + "\n")
    CALLS.clear()
    res3 = evaluate_files(EvaluateConfig(**{**cfg.__dict__, "judges": "tj_chars,tj_hashy,tj_vowels"}))
    assert CALLS == {"tj_chars": 1, "tj_hashy": 1, "tj_vowels": 2}
    assert res3.extra["judge_files"]["base"]["newly_scored"] == 2 + 5
    # tj_vowels is both runs' decoding objective
    assert all("tj_vowels" in m.judge.optimised for m in res3.methods.values())
    # --rescore scores everything again (the proxy tj_vowels too)
    CALLS.clear()
    evaluate_files(EvaluateConfig(**{**cfg.__dict__, "rescore": True}))
    assert CALLS == {"tj_chars": 2, "tj_hashy": 2, "tj_vowels": 2}
    # a partial last line (interrupted write) is skipped, not an error
    jp = judges_path(b)
    jp.write_text(jp.read_text() + '{"record_id": "0", "respo')
    CALLS.clear()
    evaluate_files(cfg)
    assert CALLS == {}


def test_hand_written_run_without_meta_counts_its_scored_objectives_as_decoding(tmp_path):
    a = tmp_path / "x.jsonl"
    _write_run(a, ["one two", "three", "four five six"], meta=False)
    res = evaluate_files(
        EvaluateConfig(inputs=[str(a)], normalize="none", n_boot=10, judges="tj_vowels,tj_chars")
    )
    assert res.methods["x"].judge.optimised == ["tj_vowels"]


# ---------------------------------------------------------------------------------------- compare, CLI
def test_compare_judges_writes_and_reuses_judge_scores(
    tmp_path, tiny_policy_dir, prompts_file, capsys, one_thread, run_cli
):
    out_dir = tmp_path / "cmp"
    argv = ["compare", "--policy", tiny_policy_dir, "--prompts", prompts_file, "--objectives", "tj_vowels,tj_chars",
            "--judges", "tj_hashy,tj_chars", "--methods", "sample:n=1,best-of-n:n=2", "--max-new-tokens", 4,
            "--normalize", "none", "--n-boot", 20, "--out-dir", out_dir]  # fmt: skip
    CALLS.clear()
    code, out, err = run_cli(*argv)
    assert code == 0, err
    assert CALLS["tj_hashy"] == 2  # one batch per method
    for label in ("sample-n1", "best-of-n-n2"):
        cache = read_judge_cache(out_dir / f"{label}.judges.jsonl")
        recs = [json.loads(x) for x in (out_dir / f"{label}.jsonl").read_text().splitlines()]
        assert set(cache) == {r["record_id"] for r in recs}
        for r in recs:
            assert cache[r["record_id"]]["tj_hashy"][0] == pytest.approx(
                _hashy([r["prompt"]], [r["response"]])[0], rel=1e-6
            )
            assert "judge_scores" not in r  # generate's run files are not rewritten
    summary = json.loads((out_dir / "summary.json").read_text())
    assert (
        summary["judges"] == ["tj_hashy", "tj_chars"]
        and "reference run 'sample-n1'" in summary["judge_score_space"]
    )
    for m in summary["methods"].values():
        assert m["judge"]["optimised"] == ["tj_chars"]  # every method decoded with tj_chars
    assert "JUDGES" in out and "* optimised by this run" in out and "length (words)" in out
    assert (out_dir / "comparison.png").stat().st_size > 5_000

    # a rerun: decoding resumes (nothing left to do) and the judges are not called again
    CALLS.clear()
    code, out2, err = run_cli(*argv)
    assert code == 0, err
    assert "tj_hashy" not in CALLS
    again = json.loads((out_dir / "summary.json").read_text())
    assert again["methods"] == summary["methods"]

    # without --judges the summary is as before: no judge keys
    code, _, err = run_cli(*[a for a in argv if a not in ("--judges", "tj_hashy,tj_chars")])
    assert code == 0, err
    plain = json.loads((out_dir / "summary.json").read_text())
    assert "judges" not in plain and all("judge" not in m for m in plain["methods"].values())


@pytest.mark.parametrize("command", ["compare", "evaluate"])
def test_unknown_judge_is_a_one_line_error(tmp_path, prompts_file, capsys, command, run_cli):
    run = tmp_path / "r.jsonl"
    _write_run(run, ["a", "b"])
    if command == "compare":
        argv = ["compare", "--prompts", prompts_file, "--objectives", "tj_vowels", "--judges", "tj_chars,nope",
                "--out-dir", tmp_path / "out"]  # fmt: skip
    else:
        argv = ["evaluate", "--inputs", run, "--judges", "nope"]
    code, _, err = run_cli(*argv)
    assert code == 2
    assert "unknown objective 'nope'" in err
    assert err.startswith("moalign: error:") and err.strip().count("\n") == 0
    assert not judges_path(run).exists()
    assert not list((tmp_path / "out").glob("*.jsonl")) if command == "compare" else True


def test_config_fields():
    assert EvaluateConfig().judges is None and CompareConfig().judges is None
    assert CompareConfig(judges="rm:/x,positive").judges == "rm:/x,positive"


# ------------------------------------------------------------------ moalign.evaluation.judges (trained judges)
def test_ensure_judges_trains_once_then_reuses(tmp_path):
    from moalign.evaluation import judges as J

    data = tmp_path / "data"
    data.mkdir()
    for s in J.JUDGE_SOURCES.values():
        (data / s["file"]).write_text("")
    calls = []

    def fake_train(cfg):  # saves as train_reward does, with a tiny head and no backbone to run
        from moalign.objectives.bradley_terry import Backbone, RewardHead
        from moalign.training.reward import save_reward_model

        calls.append((cfg.objective, cfg.data))
        bb = Backbone()
        bb.dim = 4
        save_reward_model(RewardHead(4), bb, cfg, {"heldout_accuracy": 0.6}, cfg.output_dir)

    paths = J.ensure_judges(tmp_path / "judges", data, trainer=fake_train)
    assert sorted(calls) == sorted((n, str(data / s["file"])) for n, s in J.JUDGE_SOURCES.items())
    conf = json.loads((paths["judge_harmless"] / "reward_config.json").read_text())
    assert "CC-BY-NC" in conf["licence"]  # the licence goes with the trained judge
    assert J.heldout_accuracy(paths["judge_helpful"]) == 0.6
    again = J.ensure_judges(tmp_path / "judges", data, trainer=fake_train)
    assert again == paths and len(calls) == 2  # trained on first use only
    assert J.judge_specs(paths) == [f"rm:{paths['judge_helpful']}", f"rm:{paths['judge_harmless']}"]


def test_ensure_judges_errors_are_one_line(tmp_path):
    from moalign.evaluation import judges as J

    with pytest.raises(MoalignError, match="not trained"):
        J.ensure_judges(tmp_path / "j", tmp_path, train=False)
    with pytest.raises(MoalignError, match="needs"):
        J.ensure_judges(tmp_path / "j", tmp_path / "nowhere")
    with pytest.raises(MoalignError, match="unknown judge"):
        J.ensure_judges(tmp_path / "j", tmp_path, names=["judge_honest"])


def test_judges_assume_no_data_folder(tmp_path, monkeypatch):
    """A library user who names no data folder is told what to pass; nothing is looked up relative to the
    working directory."""
    from moalign.evaluation import judges as J

    monkeypatch.delenv("MOALIGN_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path.parent / "shared" / "data").mkdir(parents=True, exist_ok=True)  # a ../shared/data is not used
    with pytest.raises(MoalignError, match="pass data_dir=FOLDER or set MOALIGN_DATA") as e:
        J.ensure_judges(tmp_path / "j")
    assert "\n" not in str(e.value) and "ultrafeedback" in str(e.value).lower()


def test_rank_agreement_matches_scipy_and_groups():
    from scipy import stats

    from moalign.evaluation.judges import rank_agreement

    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    g = np.repeat(np.arange(8), 5)
    r = rank_agreement(x, y, groups=g)
    assert r["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert r["kendall"] == pytest.approx(stats.kendalltau(x, y).statistic)
    within = np.mean([stats.spearmanr(x[g == k], y[g == k]).statistic for k in range(8)])
    assert r["within_group_spearman_mean"] == pytest.approx(within) and r["n_groups"] == 8
    assert rank_agreement(x, -x)["spearman"] == pytest.approx(-1.0)
    with pytest.raises(MoalignError):
        rank_agreement(x, y[:-1])
