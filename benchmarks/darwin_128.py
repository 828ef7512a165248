"""Darwin with a mutation operator that works, at 128 new tokens, against best-of-N at matched total compute:
PROXY and JUDGE, on all prompts and on the prompts whose mutation succeeded (issue 18 §2).

- prompts: MT-Bench and Vicuna first turns, interleaved (``--per-source`` each);
- Darwin: ``--mutation-mode one`` (the default), 5 beams, 3 cycles, replacement every 32 tokens (4 a cycle),
  top-3 kept, reward = the worst case of the z-scored ``helpful``/``harmless`` proxies; MC = 1, 2, 3 read from
  one run's best-so-far; its ablation ``sample-replace`` (no mutation) the same way;
- compute per prompt, counted for the policy and the scorers: Darwin's includes the seed sample (decoded as a
  row of the first cycle), the mutation replies, re-prefills and every replacement's scoring; best-of-N's is N
  samples' policy tokens + the proxies reading the N whole responses; best-of-N at Darwin's mean total for each
  MC is interpolated per prompt linearly in log compute between the two N (of 1..32, from 32 plain samples per
  prompt) that bracket it;
- PROXY = the shipped helpful/harmless reward models (what Darwin optimises; z: shipped statistics); JUDGE =
  judge_helpful (UltraFeedback) / judge_harmless (PKU-SafeRLHF), never seen (z: the 32 samples per prompt).

    python benchmarks/darwin_128.py [--per-source 20] [--max-new-tokens 128]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _common import RESULTS, SHARED_DATA, write_result
from _tasks import load_prompt_set
from harness import (
    COMPUTE,
    _num,
    best_of_n_at,
    best_of_n_points,
    ci,
    dump,
    fmt,
    iv_list,
    load_variants,
    markdown_table,
    mean_cis,
    parser,
    prompt_arrays,
    run_variants,
    start,
    summary_row,
    whole_response_reads,
)

from moalign.config import for_method
from moalign.evaluation import paired_diff_ci, paired_win_ci

OUT = RESULTS / "darwin_128"
OBJ = ["helpful", "harmless"]
SAMPLES, CYCLES, BEAMS = 32, 3, 5


def variants(args) -> dict:
    from moalign.config import GenerateConfig

    base = GenerateConfig(objectives="helpful,harmless", max_new_tokens=args.max_new_tokens, seed=args.seed,
                          batch_size=args.batch_size, mutations=BEAMS, cycles=CYCLES, replace_top_k=3,
                          replace_every=args.max_new_tokens // 4, scalarization="worst-case")  # fmt: skip
    return {
        "darwin": for_method(base, "darwin"),
        "sample-replace": for_method(base, "sample-replace"),
        f"sample{SAMPLES}": for_method(base, "sample", n=SAMPLES, batch_size=max(1, args.batch_size // 2)),
    }  # fmt: skip


def _score_texts(
    prompts: list[str], responses: list[str], judges: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Raw proxy and judge scores of (prompt, response) pairs (the best-so-far responses of earlier cycles)."""
    from moalign.decoding.values import ObjectiveScorer
    from moalign.evaluation import ensure_judges, judge_specs, parse_judges
    from moalign.objectives.base import resolve_objectives

    proxy = ObjectiveScorer(resolve_objectives(OBJ)).raw(prompts, responses).double().numpy()
    specs = parse_judges(judge_specs(ensure_judges(RESULTS / "judges", SHARED_DATA)))
    judge = np.stack([o.score(prompts, responses).double().numpy() for _, o in specs], axis=1)
    return proxy, judge


def mc_points(records: list[dict], order: list[str], judges: list[str], pnorm, jnorm) -> dict[int, dict]:
    """Per-prompt arrays of the best-so-far after each cycle (MC = 1..3), with the compute spent up to it."""
    by = {r["prompt_id"]: r for r in records}
    out = {}
    for c in range(1, CYCLES + 1):
        prompts, responses, pol, sc, pol_f, sc_f, ok = [], [], [], [], [], [], []
        for p in order:
            tr = by[p]["trace"]
            cycles = [e for e in tr if e.get("cycle", 0) >= 1][:c]
            prompts.append(by[p]["prompt"])
            responses.append(cycles[-1]["best_so_far"]["response"])
            pol.append(
                sum(
                    e["policy_tokens"] + ((e.get("mutation") or {}).get("policy_tokens", 0)) for e in cycles
                )
            )
            muts = [e.get("mutation") or {} for e in cycles]
            sc.append(
                sum(e.get("scorer_tokens", 0) + m.get("scorer_tokens", 0) for e, m in zip(cycles, muts))
            )
            # FLOPs (NaN in traces written before they were counted)
            pol_f.append(
                sum(
                    _num(e.get("policy_flops")) + _num(m.get("policy_flops", 0.0))
                    for e, m in zip(cycles, muts)
                )
            )
            sc_f.append(
                sum(
                    _num(e.get("scorer_flops")) + _num(m.get("scorer_flops", 0.0))
                    for e, m in zip(cycles, muts)
                )
            )
            first = cycles[0].get("mutation")
            ok.append(first is None or bool(first.get("complete")))
        praw, jraw = _score_texts(prompts, responses, judges)
        pz, jz = pnorm.apply(praw), jnorm.apply(jraw)
        pt = {"proxy_raw": praw, "proxy_z": pz, "proxy_wc": pz.min(1), "judge_raw": jraw, "judge_z": jz,
              "judge_wc": jz.min(1), "words": np.array([len(x.split()) for x in responses], float),
              "policy_tokens": np.array(pol, float), "scorer_tokens": np.array(sc, float),
              "policy_flops": np.array(pol_f, float), "scorer_flops": np.array(sc_f, float),
              "mutation_ok": np.array(ok)}  # fmt: skip
        for unit in COMPUTE:
            pt[f"total_{unit}"] = pt[f"policy_{unit}"] + pt[f"scorer_{unit}"]
        out[c] = pt
    return out


def mutation_stats(records: list[dict], sample: int = 50, seed: int = 1) -> dict:
    """Usable rewrites per mutation (share of the n beams, by cycle; cycle 1 mutates the original instruction),
    the verdicts of the judged replies, and ``sample`` replies drawn at random for a hand check of the rule."""
    import random
    from collections import Counter

    shares: dict[int, list[float]] = {}
    replies = []
    for r in records:
        for e in r["trace"]:
            m = e.get("mutation")
            if not m:
                continue
            shares.setdefault(e["cycle"], []).append(m["parsed"] / BEAMS)
            replies += [{"prompt_id": r["prompt_id"], "cycle": e["cycle"], "instruction": e["parent"], "reply": rep,
                         "verdict": v} for rep, v in zip(m.get("replies", []), m.get("verdicts", []))
                        if v != "enough rewrites"]  # fmt: skip
    every = [s for c in sorted(shares) for s in shares[c]]
    rows = {f"cycle {c}": shares[c] for c in sorted(shares)} | {"all cycles": every}
    return {"usable_share": {k: {"mutations": len(v), "share": ci(np.mean, np.array(v), digits=3),
                                 "all_n": round(float(np.mean(np.array(v) == 1.0)), 3)} for k, v in rows.items() if v},
            "verdicts": dict(Counter(x["verdict"] for x in replies).most_common()),
            "sample": random.Random(seed).sample(replies, min(sample, len(replies)))}  # fmt: skip


def analyse(args, out_dir: Path) -> dict:
    import json

    from moalign.evaluation import fit_norm_stats
    from moalign.objectives.normalize import NormStats
    from moalign.records import meta_path

    data = load_variants(out_dir, list(variants(args)), samples={f"sample{SAMPLES}": SAMPLES})
    runs, order, judges = data["runs"], data["prompts"], data["judges"]
    pnorm = NormStats.from_dict(
        json.loads(meta_path(out_dir / f"sample{SAMPLES}.jsonl").read_text())["norm"]
    ).subset(OBJ)
    samples = runs[f"sample{SAMPLES}"]
    jnorm = fit_norm_stats(np.array([[r["judge_scores"][n] for n in judges] for r in samples]), judges,
                           source=f"judges on the policy's {SAMPLES} samples x {len(order)} prompts")  # fmt: skip
    by: dict[str, list] = {}
    for r in samples:
        by.setdefault(r["prompt_id"], []).append(r)
    per_prompt = []
    for p in order:
        recs = sorted(by[p], key=lambda r: r["sample_index"])
        a = prompt_arrays(recs, OBJ, judges, pnorm, jnorm)
        a["scorer_tokens"], a["scorer_flops"] = whole_response_reads(recs, OBJ)
        for unit in COMPUTE:
            a[f"total_{unit}"] = a[f"policy_{unit}"] + a[f"scorer_{unit}"]
        per_prompt.append(a)
    bon = best_of_n_points(per_prompt, SAMPLES)

    result: dict = {"n_prompts": len(order), "judges": judges, "methods": {}}
    md = [f"Darwin at {args.max_new_tokens} new tokens on {len(order)} MT-Bench + Vicuna first turns against best-of-N "
          "at matched total compute (policy + scorer tokens; best-of-N interpolated in log compute from 32 samples per "
          "prompt). Reward = worst case of the z-scored PROXY (shipped helpful/harmless); JUDGE = judge_helpful / "
          "judge_harmless, never seen. 95% bootstrap CIs over prompts; paired by prompt."]  # fmt: skip
    for method in ("darwin", "sample-replace"):
        if method not in runs:
            continue
        mcs = mc_points(runs[method], order, judges, pnorm, jnorm)
        ok = mcs[1]["mutation_ok"]
        rows, table = {}, []
        for c, pt in mcs.items():
            bpt, bname = best_of_n_at(bon, float(pt["total_flops"].mean()))
            for subset, mask in (("all", np.ones(len(order), bool)), ("mutation succeeded", ok)):
                if method != "darwin" and subset != "all":
                    continue
                if mask.sum() < 2:
                    continue
                a = {k: v[mask] for k, v in pt.items()}
                b = {k: v[mask] for k, v in bpt.items()}
                row = summary_row(a, None)
                row["vs_best_of_n"] = {"matched": bname, **{side: {
                    "diff": list(iv_list(paired_diff_ci(a[f"{side}_wc"], b[f"{side}_wc"]))),
                    "win_rate": list(iv_list(paired_win_ci(a[f"{side}_wc"], b[f"{side}_wc"])))}
                    for side in ("proxy", "judge")}}  # fmt: skip
                rows[f"MC{c} {subset}"] = row
                v = row["vs_best_of_n"]
                table.append([f"{method} MC{c}", subset, int(mask.sum()), fmt(row["proxy_worst_case_z"], True),
                              fmt(row["judge_worst_case_z"], True), f"{row['words'][0]:.1f}",
                              f"{row['policy_tokens']:.0f} + {row['scorer_tokens']:.0f}",
                              f"{row['policy_flops'] / 1e9:.2f} + {row['scorer_flops'] / 1e9:.2f}", bname,
                              fmt(v["proxy"]["diff"], True), fmt(v["judge"]["diff"], True),
                              fmt(v["judge"]["win_rate"])])  # fmt: skip
        result["methods"][method] = {"rows": rows, "mutation_ok": float(ok.mean())}
        md += ["", f"### {method}" + (f" (mutation gave 5 usable rewrites in cycle 1 on {ok.mean():.0%} of prompts)"
                                     if method == "darwin" else ""), "",
               markdown_table(["method", "prompts", "n", "PROXY worst case (z)", "JUDGE worst case (z)", "words",
                               "policy + scorer tokens", "policy + scorer GFLOP", "best-of-N at that FLOPs", "PROXY diff vs it",
                               "JUDGE diff vs it", "JUDGE win rate vs it"], table)]  # fmt: skip
        if method == "darwin":
            mut = mutation_stats(runs[method])
            result["mutation"] = {k: v for k, v in mut.items() if k != "sample"}
            dump(RESULTS / "darwin_128_mutation_sample.json", mut["sample"])
            md += ["", "Usable rewrites per mutation (share of the 5 beams; the rule `parse_rewrite`; cycle 1 mutates "
                   "the original instruction): " + "; ".join(f"{k} {fmt(v['share'])} ({v['mutations']} mutations, "
                   f"all 5: {v['all_n']:.2f})" for k, v in mut["usable_share"].items())
                   + ". Verdicts of the judged replies: " + ", ".join(f"{k} {n}" for k, n in mut["verdicts"].items())]  # fmt: skip
    md += ["", "best-of-N from the samples (all prompts): " + "; ".join(
        f"N={n}: PROXY {fmt(mean_cis(bon[n]['proxy_wc']), True)}, JUDGE {fmt(mean_cis(bon[n]['judge_wc']), True)}, "
        f"{bon[n]['total_tokens'].mean():.0f} tokens, {bon[n]['total_flops'].mean() / 1e9:.2f} GFLOP" for n in sorted(bon))]  # fmt: skip
    (RESULTS / "darwin_128.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return result


def main() -> None:
    ap = parser(__doc__.splitlines()[0], prompts=0, out_dir=OUT, batch_size=8)
    ap.add_argument("--per-source", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    args = ap.parse_args()
    start(args)
    out = Path(args.out_dir)
    if not args.analyse_only:
        run_variants(variants(args), load_prompt_set(args.per_source), out, objectives="helpful,harmless")
    res = analyse(args, out)
    dump(RESULTS / "darwin_128_detail.json", res)
    d = res["methods"].get("darwin", {}).get("rows", {})
    parts = [f"{k}: PROXY {fmt(v['vs_best_of_n']['proxy']['diff'], True)}, JUDGE {fmt(v['vs_best_of_n']['judge']['diff'], True)}"
             f" vs {v['vs_best_of_n']['matched']}" for k, v in d.items() if k.endswith("all")]  # fmt: skip
    write_result("darwin_128", {"args": vars(args), **res}, f"darwin_128: {res['n_prompts']} prompts; Darwin − best-of-N "
                 "at matched total compute (worst case z): " + "; ".join(parts))  # fmt: skip


if __name__ == "__main__":
    main()
