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
  and a JSON result with a one-line summary (:func:`markdown_table`, :func:`write_result`), and saves plots
  beside them (:func:`save_plot`).

Scripts that time or train rather than compare decoded variants use the same parser (:func:`parser` with only
the arguments they take), :func:`start` (threads), :func:`ci` for bootstrap intervals and :func:`write_result`.
Every interval is the library's :func:`moalign.evaluation.bootstrap_ci` (2000 replicates, seed 0 unless given).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from _common import RESULTS, ROOT, SHARED_DATA, environment, write_result

from moalign.evaluation import bootstrap_ci, mean_ci, paired_diff_ci, paired_win_ci

__all__ = [
    "RESULTS", "ROOT", "SHARED_DATA", "best_of_n_at", "best_of_n_points", "ci", "environment", "fmt", "iv_list", "load_variants", "markdown_table", "mean_cis", "parser",
    "prompt_arrays", "run_variants", "save_plot", "start", "summary_row", "tie_wins", "worst_of_means",
    "write_result",
]  # fmt: skip

def parser(description: str, *, prompts: int | None = None, out_dir: Path | str | None = None,
           batch_size: int | None = None, seed: int | None = 0, threads: int | None = 2,
           analyse_only: bool | None = None, out_alias: str | None = None) -> argparse.ArgumentParser:  # fmt: skip
    """An argument parser with the arguments the experiments share (add the script's own to it).

    ``--seed`` and ``--threads`` (torch intra-op threads; :func:`start` applies them) unless ``None``; with a
    value, ``--prompts``, ``--out-dir`` (also spelled ``out_alias``, e.g. ``--out``, where a script always
    took that), ``--batch-size``; ``--analyse-only`` comes with ``--out-dir`` unless ``analyse_only=False``.
    """
    ap = argparse.ArgumentParser(description=description)
    if prompts is not None:
        ap.add_argument("--prompts", type=int, default=prompts, help="held-out prompts (a larger number appends)")
    if out_dir is not None:
        names = ["--out-dir"] + ([out_alias] if out_alias else [])
        ap.add_argument(*names, dest="out_dir", default=str(out_dir), help="where the runs are written and resumed")
    if seed is not None:
        ap.add_argument("--seed", type=int, default=seed)
    if threads is not None:
        ap.add_argument("--threads", type=int, default=threads, help="torch intra-op threads")
    if batch_size is not None:
        ap.add_argument("--batch-size", type=int, default=batch_size, help="prompts decoded together")
    if analyse_only or (analyse_only is None and out_dir is not None):
        ap.add_argument("--analyse-only", action="store_true", help="only analyse the runs there are")
    return ap


def start(args: argparse.Namespace) -> argparse.Namespace:
    """Apply the common arguments: torch's intra-op threads (``--threads``)."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return args


def ci(stat_fn, *arrays, digits: int | None = None, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """``[estimate, low, high]`` of ``stat_fn(*arrays)``: the library's paired percentile bootstrap (95%),
    rounded to ``digits`` when given."""
    vals = bootstrap_ci(stat_fn, *arrays, n_boot=n_boot, seed=seed)
    return [round(float(v), digits) if digits is not None else float(v) for v in vals]


def mean_cis(x, n_boot: int = 2000) -> list:
    """Column means of ``x`` ([n] or [n, d]) with 95% bootstrap CIs, one resampling for all columns, rounded to 4
    digits: ``[estimate, low, high]`` for [n], a list of them for [n, d]."""
    est, lo, hi = bootstrap_ci(lambda a: np.mean(a, axis=0), np.asarray(x, float), n_boot=n_boot, seed=0)
    return np.round(np.stack([est, lo, hi], -1), 4).tolist()


def worst_of_means(*arrays) -> float:
    """The lower of the arrays' means: the worst case of per-objective means."""
    return float(min(np.mean(a) for a in arrays))


def tie_wins(a, b) -> np.ndarray:
    """1 where ``a > b``, 0.5 on a tie, 0 otherwise (a win rate's per-item indicator)."""
    a, b = np.asarray(a), np.asarray(b)
    return (a > b).astype(float) + 0.5 * (a == b)


def save_plot(fig, name: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as ``RESULTS/NAME.png`` (or at ``name`` when it is a path) and close it."""
    import matplotlib.pyplot as plt

    path = Path(name)
    if path.suffix != ".png":
        path = RESULTS / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


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
        from moalign.evaluation import ensure_judges, judge_specs, parse_judges, score_judges

        specs = parse_judges(judge_specs(ensure_judges(RESULTS / "judges", SHARED_DATA)))
        for lab, recs in runs.items():
            score_judges(out_dir / f"{lab}.jsonl", recs, specs)
        names = [o.name for _, o in specs]
    return {"runs": runs, "prompts": order, "judges": names}


def prompt_arrays(records: Sequence[dict], objectives: Sequence[str], judges: Sequence[str], proxy_norm,
                  judge_norm) -> dict[str, np.ndarray]:  # fmt: skip
    """Per-record arrays: raw and z-scored proxy and judge scores, their worst cases, words and compute
    (policy and scorer tokens and FLOPs, and their totals; FLOPs NaN in records written before they were
    counted)."""
    praw = np.array([[r["scores"][g] for g in objectives] for r in records], float)
    jraw = np.array([[r["judge_scores"][n] for n in judges] for r in records], float) if judges else None
    pz = proxy_norm.apply(praw)
    out = {"proxy_raw": praw, "proxy_z": pz, "proxy_wc": pz.min(1),
           "words": np.array([len(str(r["response"]).split()) for r in records], float),
           "policy_tokens": np.array([r.get("policy_tokens", r.get("forward_tokens", 0)) for r in records], float),
           "scorer_tokens": np.array([r.get("scorer_tokens", 0) for r in records], float),
           "policy_flops": np.array([_num(r.get("policy_flops")) for r in records], float),
           "scorer_flops": np.array([_num(r.get("scorer_flops")) for r in records], float)}  # fmt: skip
    for unit in COMPUTE:
        out[f"total_{unit}"] = out[f"policy_{unit}"] + out[f"scorer_{unit}"]
    if jraw is not None:
        jz = judge_norm.apply(jraw)
        out.update(judge_raw=jraw, judge_z=jz, judge_wc=jz.min(1))
    return out


#: the compute units every per-prompt array carries (``policy_X``, ``scorer_X``, ``total_X``)
COMPUTE = ("tokens", "flops")
COMPUTE_KEYS = tuple(f"{part}_{unit}" for unit in COMPUTE for part in ("policy", "scorer", "total"))


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def whole_response_reads(records: Sequence[dict], objectives: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """What the objectives' models read (tokens, FLOPs) to score one prompt's records whole, in their order,
    from an empty cache: the prompt with the first, each distinct response once; so the first N records' sum
    is what best-of-N's final scoring of them reads."""
    from moalign.decoding.values import ObjectiveScorer
    from moalign.objectives.base import resolve_objectives

    reads = ObjectiveScorer(resolve_objectives(list(objectives))).reads(
        [r["prompt"] for r in records], [r["response"] for r in records])  # fmt: skip
    return np.array(reads.tokens(), float), np.array(reads.flops(), float)


def best_of_n_points(per_prompt: Sequence[Mapping[str, np.ndarray]], n_samples: int,
                     ns: Sequence[int] = (1, 2, 4, 8, 16, 32, 64)) -> dict[int, dict[str, np.ndarray]]:  # fmt: skip
    """Best-of-N (worst-case pick on the proxy) for every N in ``ns`` that divides into ``n_samples``, from each
    prompt's :func:`prompt_arrays` of its plain samples (in sample order, with the scorer compute of
    :func:`whole_response_reads`): the ``n_samples // N`` disjoint groups of N are averaged (the distribution of
    one best-of-N, less noise); compute is what one best-of-N costs, the first N samples' policy and scorer
    tokens and FLOPs.
    Returns ``N -> per-prompt arrays``."""
    bon = {}
    for n in [m for m in ns if m <= n_samples]:
        rows = []
        for a in per_prompt:
            picks = [g * n + int(np.argmax(a["proxy_wc"][g * n : (g + 1) * n])) for g in range(n_samples // n)]
            row = {k: v[picks].mean(0) for k, v in a.items() if k not in COMPUTE_KEYS}
            for unit in COMPUTE:
                if f"policy_{unit}" in a:
                    row[f"policy_{unit}"] = a[f"policy_{unit}"][:n].sum()
                    row[f"scorer_{unit}"] = a[f"scorer_{unit}"][:n].sum()
                    row[f"total_{unit}"] = row[f"policy_{unit}"] + row[f"scorer_{unit}"]
            rows.append(row)
        bon[n] = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    return bon


def best_of_n_at(bon: Mapping[int, Mapping[str, np.ndarray]], total: float, unit: str = "flops") -> tuple[dict, str]:
    """Best-of-N at a mean total compute ``total`` (policy + scorers per prompt, in ``unit``: FLOPs, or tokens
    for the older count): per-prompt arrays interpolated linearly in log compute between the two N that
    bracket it, and a name (``best-of-N@matched (N≈x)``); beyond the largest or below the smallest N, that N,
    named with its compute."""
    ns = sorted(bon)
    costs = [float(bon[n][f"total_{unit}"].mean()) for n in ns]
    if total >= costs[-1]:
        return dict(bon[ns[-1]]), f"best-of-{ns[-1]} (less compute: {human(costs[-1], unit)})"
    if total <= costs[0]:
        return dict(bon[ns[0]]), f"best-of-{ns[0]} (more compute: {human(costs[0], unit)})"
    j = max(i for i, c in enumerate(costs) if c <= total)
    lo, hi = ns[j], ns[j + 1]
    w = (math.log(total) - math.log(costs[j])) / (math.log(costs[j + 1]) - math.log(costs[j]))
    pt = {k: (1 - w) * bon[lo][k] + w * bon[hi][k] for k in bon[lo]}
    n_eff = math.exp((1 - w) * math.log(lo) + w * math.log(hi))
    return pt, f"best-of-N@matched (N≈{n_eff:.1f})"


def human(x: float, unit: str = "flops") -> str:
    """``3.2 GFLOP`` / ``812 tokens``."""
    if unit != "flops":
        return f"{x:.0f} tokens"
    for scale, name in ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {name}"
    return f"{x:.0f} FLOP"


def iv_list(iv, digits: int = 4) -> list[float]:
    """An :class:`~moalign.evaluation.Interval` as ``[estimate, low, high]`` rounded to ``digits``."""
    return [round(float(iv.estimate), digits), round(float(iv.low), digits), round(float(iv.high), digits)]


def summary_row(point: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray] | None = None,
                sides: Sequence[str] = ("proxy", "judge")) -> dict:  # fmt: skip
    """Means with CIs of one variant's per-prompt arrays and, with ``ref``, paired differences and win rates of
    the worst case against it."""
    row: dict = {"n_prompts": int(len(point["proxy_wc"]))}
    for side in sides:
        if f"{side}_wc" in point:
            row[f"{side}_worst_case_z"] = iv_list(mean_ci(point[f"{side}_wc"]))
            raw = point[f"{side}_raw"]
            row[f"{side}_means_raw"] = [iv_list(mean_ci(raw[:, j])) for j in range(raw.shape[1])]
            if ref is not None:
                row[f"{side}_worst_case_diff"] = iv_list(paired_diff_ci(point[f"{side}_wc"], ref[f"{side}_wc"]))
                row[f"{side}_win_rate"] = iv_list(paired_win_ci(point[f"{side}_wc"], ref[f"{side}_wc"]))
    row["words"] = iv_list(mean_ci(point["words"]))
    for k in COMPUTE_KEYS:
        if k in point:
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
