"""The benchmarks' shared harness: common arguments, variants run and resumed, proxy and judge arrays per
prompt, paired CIs, markdown and JSON tables.

A benchmark script declares its variants (``label -> GenerateConfig``) and its analysis; the harness

- parses the arguments every experiment takes (:func:`parser`: ``--prompts``, ``--out-dir``, ``--seed``,
  ``--threads``, ``--batch-size``, ``--analyse-only``);
- generates each variant into ``OUT_DIR/LABEL.jsonl`` with ``moalign.generate`` (appended as produced; a rerun
  resumes where it stopped, and asking for more prompts only appends) (:func:`run_variants`);
- scores every record with the judges (signals no method decodes with; cached beside each run) and returns,
  per variant, per-prompt arrays of proxy and judge scores, worst cases, words and compute
  (:func:`load_variants`, :func:`prompt_arrays`);
- summarises them with the library's own statistics (:func:`moalign.evaluation.mean_ci`,
  :func:`~moalign.evaluation.paired_diff_ci`, :func:`~moalign.evaluation.paired_win_ci`) into markdown tables
  and a JSON result with a one-line summary (:func:`markdown_table`, :func:`_common.write_result`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from _common import RESULTS, SHARED_DATA

from moalign.evaluation import mean_ci, paired_diff_ci, paired_win_ci

__all__ = ["fmt", "load_variants", "markdown_table", "parser", "prompt_arrays", "run_variants", "summary_row"]


def parser(description: str, *, prompts: int, out_dir: Path) -> argparse.ArgumentParser:
    """An argument parser with the arguments every experiment takes (add the script's own to it)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--prompts", type=int, default=prompts, help="held-out prompts (a larger number appends)")
    ap.add_argument("--out-dir", default=str(out_dir), help="where the runs are written and resumed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    ap.add_argument("--analyse-only", action="store_true", help="only analyse the runs there are")
    return ap


def run_variants(variants: Mapping[str, object], prompts: Sequence, out_dir: Path, *, objectives: str,
                 policy=None) -> dict[str, Path]:  # fmt: skip
    """Generate (or resume) every variant on ``prompts`` into ``out_dir/LABEL.jsonl``; label -> path."""
    from moalign.generate import generate
    from moalign.objectives.base import resolve_objectives
    from moalign.policies import load_policy

    out_dir.mkdir(parents=True, exist_ok=True)
    policy = policy or load_policy()
    objs = resolve_objectives(objectives)
    paths = {}
    for label, cfg in variants.items():
        path = out_dir / f"{label}.jsonl"
        print(f"== {label}", flush=True)
        generate(replace(cfg, out=str(path)), policy=policy, objectives=objs, prompts=list(prompts))
        paths[label] = path
    return paths


def load_variants(out_dir: Path, labels: Iterable[str], *, samples: Mapping[str, int] | None = None,
                  judges: bool = True) -> dict:  # fmt: skip
    """Every variant's records restricted to the prompts all of them answered in full (``samples[label]``
    responses for multi-sample runs, else one), scored by the judges (trained on first use; scores cached in
    ``RUN.judges.jsonl``). Returns ``{"runs": {label: records}, "prompts": [ids in order], "judges": [names]}``."""
    from moalign.records import read_records

    samples = dict(samples or {})
    runs = {}
    for label in labels:
        f = out_dir / f"{label}.jsonl"
        if f.exists() and (recs := read_records(f)):
            runs[label] = recs
    if not runs:
        raise SystemExit(f"no runs in {out_dir}: generate first")
    complete = {}
    for lab, recs in runs.items():
        counts: dict[str, int] = {}
        for r in recs:
            counts[r["prompt_id"]] = counts.get(r["prompt_id"], 0) + 1
        complete[lab] = {p for p, c in counts.items() if c == samples.get(lab, 1)}
    common = set.intersection(*complete.values())
    first = next(iter(runs))
    order = list(dict.fromkeys(r["prompt_id"] for r in runs[first] if r["prompt_id"] in common))
    runs = {lab: [r for r in recs if r["prompt_id"] in common] for lab, recs in runs.items()}
    names: list[str] = []
    if judges:
        from moalign.evaluation.evaluate import parse_judges, score_judges
        from moalign.evaluation.judges import ensure_judges, judge_specs

        specs = parse_judges(judge_specs(ensure_judges(RESULTS / "judges", SHARED_DATA)))
        for lab, recs in runs.items():
            score_judges(out_dir / f"{lab}.jsonl", recs, specs)
        names = [o.name for _, o in specs]
    return {"runs": runs, "prompts": order, "judges": names}


def prompt_arrays(records: Sequence[dict], objectives: Sequence[str], judges: Sequence[str], proxy_norm,
                  judge_norm) -> dict[str, np.ndarray]:  # fmt: skip
    """Per-record arrays: raw and z-scored proxy and judge scores, their worst cases, words and compute
    (policy tokens, scorer tokens, their total)."""
    praw = np.array([[r["scores"][g] for g in objectives] for r in records], float)
    jraw = np.array([[r["judge_scores"][n] for n in judges] for r in records], float) if judges else None
    pz = proxy_norm.apply(praw)
    out = {"proxy_raw": praw, "proxy_z": pz, "proxy_wc": pz.min(1),
           "words": np.array([len(str(r["response"]).split()) for r in records], float),
           "policy_tokens": np.array([r.get("policy_tokens", r.get("forward_tokens", 0)) for r in records], float),
           "scorer_tokens": np.array([r.get("scorer_tokens", 0) for r in records], float)}  # fmt: skip
    out["total_tokens"] = out["policy_tokens"] + out["scorer_tokens"]
    if jraw is not None:
        jz = judge_norm.apply(jraw)
        out.update(judge_raw=jraw, judge_z=jz, judge_wc=jz.min(1))
    return out


def _iv(iv) -> list[float]:
    return [round(float(iv.estimate), 4), round(float(iv.low), 4), round(float(iv.high), 4)]


def summary_row(point: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray] | None = None,
                sides: Sequence[str] = ("proxy", "judge")) -> dict:  # fmt: skip
    """Means with CIs of one variant's per-prompt arrays and, with ``ref``, paired differences and win rates of
    the worst case against it."""
    row: dict = {"n_prompts": int(len(point["proxy_wc"]))}
    for side in sides:
        if f"{side}_wc" in point:
            row[f"{side}_worst_case_z"] = _iv(mean_ci(point[f"{side}_wc"]))
            raw = point[f"{side}_raw"]
            row[f"{side}_means_raw"] = [_iv(mean_ci(raw[:, j])) for j in range(raw.shape[1])]
            if ref is not None:
                row[f"{side}_worst_case_diff"] = _iv(paired_diff_ci(point[f"{side}_wc"], ref[f"{side}_wc"]))
                row[f"{side}_win_rate"] = _iv(paired_win_ci(point[f"{side}_wc"], ref[f"{side}_wc"]))
    row["words"] = _iv(mean_ci(point["words"]))
    for k in ("policy_tokens", "scorer_tokens", "total_tokens"):
        row[k] = round(float(np.mean(point[k])), 1)
    return row


def fmt(iv: Sequence[float], signed: bool = False, digits: int = 3) -> str:
    """``estimate [low, high]``."""
    e, lo, hi = iv
    s = "+" if signed else ""
    return f"{e:{s}.{digits}f} [{lo:{s}.{digits}f}, {hi:{s}.{digits}f}]"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
