"""RMOD against CD-Uniform and best-of-N at matched total compute on 200 held-out HH prompts: PROXY and JUDGE.

Settles the K = 8 judge gain (issue 18 §3): the 64-prompt measurement saw RMOD's worst-case lead over CD-Uniform
confirmed by the judges at K = 8 but not at K = 4, and another held-out measurement saw the opposite. Here:

- prompts: 200 held-out HH prompts (100 helpful-base + 100 harmless-base, interleaved), *after* the first 32 of
  each used by ``benchmarks/rmod_hh.py`` (``--offset``), so none was looked at before;
- variants, all with the proxies ``helpful``/``harmless`` (shipped reward models, shipped z statistics), B = 16,
  48 new tokens: CD-Uniform and RMOD (lambda 0.5 and 5, argmax rule) at K = 4, 8, 16; 32 plain samples per
  prompt, from which best-of-N (worst-case pick) for N = 1..32;
- best-of-N at matched *total* compute: every record counts the tokens the policy read and the tokens the
  scorers read (``policy_tokens`` + ``scorer_tokens``); best-of-N's total for N samples is the N samples' policy
  tokens plus the scorers reading the N whole responses; at a method's mean total, best-of-N's per-prompt
  scores are interpolated linearly in log compute between the two N that bracket it;
- JUDGE: ``judge_helpful`` (UltraFeedback) and ``judge_harmless`` (PKU-SafeRLHF), trained on first use, never
  seen by any method; z-scored on the 32 samples per prompt. PROXY z: the shipped statistics.

Reports per K: worst case (z) and per-objective means (raw) for PROXY and JUDGE with 95% bootstrap CIs, words,
policy and scorer tokens; paired by prompt: RMOD - CD-Uniform and RMOD - best-of-N@matched (worst case and
each judge), win rates, and which objective decides the judged worst case. Resumable; ``--analyse-only`` reads
what exists (prompts every present run has answered).

    python benchmarks/rmod_200.py [--prompts 200] [--ks 4,8,16] [--lams 0.5,5]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _common import RESULTS, write_result
from _tasks import heldout_prompts
from harness import (
    COMPUTE,
    best_of_n_at,
    best_of_n_points,
    dump,
    fmt,
    iv_list,
    load_variants,
    markdown_table,
    parser,
    prompt_arrays,
    run_variants,
    start,
    summary_row,
    whole_response_reads,
)

from moalign.evaluation import paired_diff_ci, paired_win_ci

OUT = RESULTS / "rmod_200"  # runs (gitignored)
OBJ = ["helpful", "harmless"]
SAMPLES = (
    32  # plain samples per prompt (--samples): best-of-N for N = 1, 2, 4, ... up to it, and the judges' z
)


def variants(args) -> dict:
    from moalign.config import GenerateConfig, for_method

    base = GenerateConfig(objectives="helpful,harmless", max_new_tokens=args.max_new_tokens, block_size=16,
                          batch_size=args.batch_size, seed=args.seed)  # fmt: skip
    out = {}
    for k in args.ks:  # the central K first: results exist early for it
        out[f"cd-k{k}"] = for_method(base, "cd", k=k, scalarization="uniform")
        for lam in args.lams:
            out[f"rmod-k{k}-lam{lam:g}"] = for_method(base, "rmod", k=k, lam=lam)
        if k == args.ks[0]:
            out[f"sample{args.samples}"] = for_method(base, "sample", n=args.samples)
    return out


def analyse(args, out_dir: Path) -> dict:
    from moalign.evaluation import fit_norm_stats
    from moalign.objectives.normalize import NormStats
    from moalign.records import meta_path

    labels = list(variants(args))
    n_samples = args.samples
    data = load_variants(out_dir, labels, samples={f"sample{n_samples}": n_samples})
    runs, order, judges = data["runs"], data["prompts"], data["judges"]
    if f"sample{n_samples}" not in runs:
        raise SystemExit("the analysis needs the sample run (best-of-N and the judges' statistics)")
    import json

    meta = json.loads(meta_path(out_dir / f"sample{n_samples}.jsonl").read_text())
    pnorm = NormStats.from_dict(meta["norm"]).subset(OBJ)
    samples = runs[f"sample{n_samples}"]
    jnorm = fit_norm_stats(np.array([[r["judge_scores"][n] for n in judges] for r in samples]), judges,
                           source=f"judges on the policy's {n_samples} samples x {len(order)} prompts")  # fmt: skip

    def arrays(recs):
        return prompt_arrays(recs, OBJ, judges, pnorm, jnorm)

    # best-of-N from the samples: disjoint groups of N averaged (the distribution of one best-of-N, less noise)
    by: dict[str, list] = {}
    for r in samples:
        by.setdefault(r["prompt_id"], []).append(r)
    per_prompt = []
    for p in order:
        recs = sorted(by[p], key=lambda r: r["sample_index"])
        a = arrays(recs)
        a["scorer_tokens"], a["scorer_flops"] = whole_response_reads(recs, OBJ)
        for unit in COMPUTE:
            a[f"total_{unit}"] = a[f"policy_{unit}"] + a[f"scorer_{unit}"]
        per_prompt.append(a)
    bon = best_of_n_points(per_prompt, n_samples)
    sample_pt = {k: np.array([a[k].mean(0) for a in per_prompt]) for k in per_prompt[0]}
    for unit in COMPUTE:
        sample_pt[f"scorer_{unit}"] = np.zeros(len(order))
        sample_pt[f"total_{unit}"] = sample_pt[f"policy_{unit}"]

    def single(label):
        index = {r["prompt_id"]: r for r in runs[label]}
        return arrays([index[p] for p in order])

    result: dict = {"n_prompts": len(order), "judges": judges, "by_k": {},
                    "best_of_n": {n: summary_row(bon[n], sample_pt) for n in bon}}  # fmt: skip
    md = [f"RMOD, CD-Uniform and best-of-N at matched total compute on {len(order)} held-out HH prompts "
          f"({len(order) // 2} helpful-base + {len(order) // 2} harmless-base, none used before), B=16, "
          f"{args.max_new_tokens} new tokens. PROXY = the shipped helpful/harmless reward models the methods decode "
          "with (z: shipped statistics); JUDGE = judge_helpful (UltraFeedback) / judge_harmless (PKU-SafeRLHF), "
          f"never seen by any method (z: the policy's {n_samples} samples per prompt). Worst case = mean over prompts "
          "of the lower z-score; 95% bootstrap CIs over prompts; compute per response in tokens and in FLOPs "
          "(2 x non-embedding parameters x tokens read, per model; policy + scorers = total FLOPs, what 'matched "
          "compute' holds equal)."]  # fmt: skip
    for k in args.ks:
        cd = f"cd-k{k}"
        lams = [lam for lam in args.lams if f"rmod-k{k}-lam{lam:g}" in runs]  # the λ that have run at this K
        if cd not in runs or not lams:
            continue
        pts = {"sample": sample_pt, f"CD-Uniform K={k}": single(cd)}
        for lam in lams:
            pts[f"RMOD K={k} λ={lam:g}"] = single(f"rmod-k{k}-lam{lam:g}")
        total = float(np.mean([pts[f"RMOD K={k} λ={lam:g}"]["total_flops"].mean() for lam in lams]))
        bpt, bname = best_of_n_at(bon, total)
        pts[bname] = bpt
        rows = {name: summary_row(pt, sample_pt if name != "sample" else None) for name, pt in pts.items()}
        comps = {}
        for lam in lams:
            r = pts[f"RMOD K={k} λ={lam:g}"]
            for other_name in (f"CD-Uniform K={k}", bname):
                o = pts[other_name]
                key = f"RMOD λ={lam:g} − {other_name.split(' (')[0]}"
                comps[key] = {side: {"diff": list(iv_list(paired_diff_ci(r[f"{side}_wc"], o[f"{side}_wc"]))),
                                     "win_rate": list(iv_list(paired_win_ci(r[f"{side}_wc"], o[f"{side}_wc"]))),
                                     "per_objective": [list(iv_list(paired_diff_ci(r[f"{side}_z"][:, j], o[f"{side}_z"][:, j])))
                                                       for j in range(2)]}
                              for side in ("proxy", "judge")}  # fmt: skip
        decides = {name: [float(np.mean(pt["judge_z"].argmin(1) == j)) for j in range(2)] for name, pt in pts.items()
                   if pt["judge_z"].ndim == 2}  # fmt: skip
        result["by_k"][k] = {"rows": rows, "comparisons": comps, "judge_min_share": decides, "matched": bname}
        md += ["", f"### K = {k}", "",
               markdown_table(["method", "PROXY worst case (z)", "PROXY helpful / harmless (raw)", "JUDGE worst case (z)",
                               "JUDGE helpful / harmless (raw)", "words", "policy + scorer tokens",
                               "policy + scorer GFLOP"],
                              [[name, fmt(r["proxy_worst_case_z"], True), f"{r['proxy_means_raw'][0][0]:+.3f} / "
                                f"{r['proxy_means_raw'][1][0]:+.3f}", fmt(r["judge_worst_case_z"], True),
                                f"{r['judge_means_raw'][0][0]:+.3f} / {r['judge_means_raw'][1][0]:+.3f}",
                                f"{r['words'][0]:.1f}", f"{r['policy_tokens']:.0f} + {r['scorer_tokens']:.0f}",
                                f"{r['policy_flops'] / 1e9:.2f} + {r['scorer_flops'] / 1e9:.2f}"]
                               for name, r in rows.items()]), "",
               markdown_table(["paired (worst case, z)", "PROXY diff", "PROXY win rate", "JUDGE diff", "JUDGE win rate",
                               "JUDGE per objective diff (helpful / harmless z)"],
                              [[name, fmt(c["proxy"]["diff"], True), fmt(c["proxy"]["win_rate"]),
                                fmt(c["judge"]["diff"], True), fmt(c["judge"]["win_rate"]),
                                f"{fmt(c['judge']['per_objective'][0], True)} / {fmt(c['judge']['per_objective'][1], True)}"]
                               for name, c in comps.items()]), "",
               "Which judge decides the judged worst case (share of prompts where it is the lower z): "
               + "; ".join(f"{name}: helpful {s[0]:.2f}, harmless {s[1]:.2f}" for name, s in decides.items())]  # fmt: skip
    (RESULTS / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return result


def main() -> None:
    ap = parser(__doc__.splitlines()[0], prompts=200, out_dir=OUT, batch_size=8)
    ap.add_argument("--ks", default="8,4,16", help="candidates per block, the first run first")
    ap.add_argument("--lams", default="0.5,5")
    ap.add_argument(
        "--samples", type=int, default=SAMPLES, help="plain samples per prompt (best-of-N, judge z)"
    )
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--offset", type=int, default=32, help="held-out prompts skipped per source")
    ap.add_argument(
        "--name", default="rmod_200", help="the results' file names (benchmarks/results/NAME.{md,json})"
    )
    args = ap.parse_args()
    args.ks = [int(x) for x in args.ks.split(",")]
    args.lams = [float(x) for x in args.lams.split(",")]
    start(args)
    out = Path(args.out_dir)
    if not args.analyse_only:
        run_variants(variants(args), heldout_prompts(args.prompts, offset=args.offset), out,
                     objectives="helpful,harmless")  # fmt: skip
    res = analyse(args, out)
    dump(RESULTS / f"{args.name}_detail.json", res)
    parts = []
    for k, v in res["by_k"].items():
        c = v["comparisons"]
        key = next((n for n in c if "CD-Uniform" in n and "λ=5" in n), None)
        if key:
            parts.append(f"K={k} RMOD λ=5 − CD-Uniform: PROXY {fmt(c[key]['proxy']['diff'], True)}, "
                         f"JUDGE {fmt(c[key]['judge']['diff'], True)}")  # fmt: skip
    write_result(
        args.name,
        {"args": vars(args), **res},
        f"{args.name}: {res['n_prompts']} prompts; " + "; ".join(parts),
    )


if __name__ == "__main__":
    main()
