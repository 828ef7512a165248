"""The held-out HH decoding runs that ``rmod_hh.py`` and ``overoptimisation.py`` share: run labels and their
generate configs, generation (resumable), loading with the judges' scores, and per-prompt arrays and summaries."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
from _tasks import heldout_prompts
from harness import RESULTS, SHARED_DATA, iv_list, mean_cis

from moalign.config import GenerateConfig, for_method
from moalign.evaluation import paired_diff_ci, paired_win_ci

OUT_DIR = RESULTS / "overopt"  # runs shared with benchmarks/overoptimisation.py (gitignored)


def run_config(label: str, base: GenerateConfig) -> GenerateConfig:
    """The generate config of a run label: ``sampleN``, ``cd-kK`` (CD-Uniform) or ``rmod-kK-lamL``."""
    if m := re.fullmatch(r"sample(\d+)", label):
        return for_method(base, "sample", n=int(m[1]))
    if m := re.fullmatch(r"cd-k(\d+)", label):
        return for_method(base, "cd", k=int(m[1]), scalarization="uniform")
    if m := re.fullmatch(r"rmod-k(\d+)-lam([0-9.]+)", label):
        return for_method(base, "rmod", k=int(m[1]), lam=float(m[2]))
    raise ValueError(f"unknown run label {label!r}")


def base_config(args) -> GenerateConfig:
    return GenerateConfig(objectives="helpful,harmless", max_new_tokens=args.max_new_tokens, k=8, n=8,
                          block_size=args.block_size, batch_size=args.batch_size, seed=args.seed)  # fmt: skip


def generate_runs(labels: list[str], args, out_dir: Path) -> dict[str, str]:
    """Generate (or resume) each run on the first ``args.prompts`` held-out prompts; label -> path."""
    from moalign.generate import generate
    from moalign.objectives.base import resolve_objectives
    from moalign.policies import load_policy

    out_dir.mkdir(parents=True, exist_ok=True)
    policy, objectives = load_policy(), resolve_objectives("helpful,harmless")
    test, base = heldout_prompts(args.prompts), base_config(args)
    paths = {}
    for label in labels:
        cfg = replace(run_config(label, base), out=str(out_dir / f"{label}.jsonl"))
        print(f"== {label}", flush=True)
        generate(cfg, policy=policy, objectives=objectives, prompts=test)
        paths[label] = cfg.out
    return paths


# ------------------------------------------------------------------------------------------------ analysis
OBJ = ["helpful", "harmless"]


def load_judged(out_dir: Path, labels: list[str], judge_dir: Path | None = None) -> dict:
    """Every run's records restricted to the prompts all of them answered, scored by the judges (cached in
    ``RUN.judges.jsonl``). Returns ``{"runs": {label: records}, "prompts": [ids], "judges": [names],
    "proxy_norm": NormStats, "judge_norm": NormStats}``; judge z-scores are fitted on ``sample16`` (all the
    policy's samples on these prompts), proxy z-scores are the runs' own (shipped) statistics."""
    from moalign.evaluation import ensure_judges, fit_norm_stats, judge_specs, parse_judges, score_judges
    from moalign.objectives.normalize import NormStats
    from moalign.records import meta_path, read_records

    runs = {}
    for label in labels:
        f = out_dir / f"{label}.jsonl"
        if f.exists() and (recs := read_records(f)):
            runs[label] = recs
    if "sample16" not in runs:
        raise SystemExit(f"no sample16 run in {out_dir}: generate first")
    counts = {lab: {} for lab in runs}
    for lab, recs in runs.items():
        for r in recs:
            counts[lab][r["prompt_id"]] = counts[lab].get(r["prompt_id"], 0) + 1
    full = {
        lab: {p for p, c in cnt.items() if c == (16 if lab == "sample16" else 1)}
        for lab, cnt in counts.items()
    }
    ref = full["sample16"]
    keep = [lab for lab in runs if len(full[lab] & ref) >= max(1, len(ref) // 2)]  # drop runs barely started
    common = set.intersection(*(full[lab] for lab in keep))
    order = [r["prompt_id"] for r in runs["sample16"] if r["sample_index"] == 0 and r["prompt_id"] in common]
    runs = {lab: [r for r in runs[lab] if r["prompt_id"] in common] for lab in keep}
    judges = ensure_judges(judge_dir or RESULTS / "judges", SHARED_DATA)
    specs = parse_judges(judge_specs(judges))
    for lab, recs in runs.items():
        score_judges(out_dir / f"{lab}.jsonl", recs, specs)
    names = [o.name for _, o in specs]
    meta = json.loads(meta_path(out_dir / "sample16.jsonl").read_text())
    pnorm = NormStats.from_dict(meta["norm"]).subset(OBJ)
    jraw = np.array([[r["judge_scores"][n] for n in names] for r in runs["sample16"]])
    jnorm = fit_norm_stats(jraw, names, source=f"judges on the policy's 16 samples x {len(order)} prompts")
    return {"runs": runs, "prompts": order, "judges": names, "proxy_norm": pnorm, "judge_norm": jnorm}


def _arrays(recs: list[dict], data: dict) -> dict:
    """Per-record arrays: raw and z-scored proxy and judge scores, worst cases, words, forward tokens, blocks."""
    praw = np.array([[r["scores"][g] for g in OBJ] for r in recs])
    jraw = np.array([[r["judge_scores"][n] for n in data["judges"]] for r in recs])
    pz, jz = data["proxy_norm"].apply(praw), data["judge_norm"].apply(jraw)
    return {"proxy_raw": praw, "proxy_z": pz, "proxy_wc": pz.min(1), "judge_raw": jraw, "judge_z": jz,
            "judge_wc": jz.min(1), "words": np.array([len(str(r["response"]).split()) for r in recs], float),
            "policy_tokens": np.array([r.get("policy_tokens", 0) for r in recs], float),
            "blocks": np.array([len(r.get("trace") or []) for r in recs], float)}  # fmt: skip


def single_point(label: str, data: dict) -> dict:
    """Per-prompt arrays (in ``data["prompts"]`` order) of a one-response-per-prompt run."""
    by = {r["prompt_id"]: r for r in data["runs"][label]}
    return _arrays([by[p] for p in data["prompts"]], data)


def best_of_points(data: dict, ns=(1, 2, 4, 8, 16), rule: str = "worst-case") -> dict[int, dict]:
    """Best-of-N from the 16 samples per prompt: the best of each of the 16/N disjoint groups of N samples
    (by ``rule``: ``worst-case`` = min of the z-scored proxies, ``uniform`` = their mean), per-prompt arrays
    averaged over the groups (the same distribution as one best-of-N, with less noise). Forward tokens: N
    samples' worth."""
    by: dict[str, list] = {}
    for r in data["runs"]["sample16"]:
        by.setdefault(r["prompt_id"], []).append(r)
    per_prompt = [_arrays(sorted(by[p], key=lambda r: r["sample_index"]), data) for p in data["prompts"]]
    out = {}
    for n in ns:
        rows = []
        for a in per_prompt:
            score = a["proxy_z"].min(1) if rule == "worst-case" else a["proxy_z"].mean(1)
            picks = [g * n + int(np.argmax(score[g * n : (g + 1) * n])) for g in range(16 // n)]
            rows.append(
                {k: (v[picks].mean(0) if k != "policy_tokens" else v[:n].sum()) for k, v in a.items()}
            )
        out[n] = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    return out


def sample_mean_point(data: dict) -> dict:
    """Plain sampling: per prompt, the mean over its 16 samples (worst case taken per sample first)."""
    by: dict[str, list] = {}
    for r in data["runs"]["sample16"]:
        by.setdefault(r["prompt_id"], []).append(r)
    rows = [_arrays(by[p], data) for p in data["prompts"]]
    out = {k: np.array([r[k].mean(0) for r in rows]) for k in rows[0]}
    out["policy_tokens"] = np.array([r["policy_tokens"].mean() for r in rows])
    return out


def paired(a, b) -> list[float]:
    """Paired mean difference ``a - b`` over prompts with its bootstrap CI."""
    return iv_list(paired_diff_ci(np.asarray(a, float), np.asarray(b, float)))


def win(a, b) -> list[float]:
    """Share of prompts where ``a`` beats ``b`` (ties 1/2), with a bootstrap CI."""
    return iv_list(paired_win_ci(np.asarray(a, float), np.asarray(b, float)))


def summarise(point: dict, ref: dict | None = None) -> dict:
    row = {"n_prompts": len(point["proxy_wc"]), "proxy_worst_case_z": mean_cis(point["proxy_wc"]),
           "judge_worst_case_z": mean_cis(point["judge_wc"]), "proxy_means_raw": mean_cis(point["proxy_raw"]),
           "judge_means_raw": mean_cis(point["judge_raw"]), "words": mean_cis(point["words"]),
           "policy_tokens": round(float(point["policy_tokens"].mean()), 1)}  # fmt: skip
    if ref is not None:
        for side in ("proxy", "judge"):
            row[f"{side}_worst_case_diff"] = paired(point[f"{side}_wc"], ref[f"{side}_wc"])
            row[f"{side}_win_rate"] = win(point[f"{side}_wc"], ref[f"{side}_wc"])
    return row
