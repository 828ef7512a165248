"""RMOD on held-out HH prompts, PROXY and JUDGE: sample, best-of-8, CD-Uniform, RMOD at several lambdas.

Default policy, decoding objectives ``helpful`` and ``harmless`` (the PROXY: the shipped reward models, z-scored
with the shipped statistics), K = 8, B = 16. Test prompts: the first N/2 prompts of HH helpful-base and of HH
harmless-base held out from the reward models' training split, interleaved (so a larger ``--prompts`` only
appends). Every response is also scored by the JUDGES (:mod:`moalign.evaluation.judges`: Bradley-Terry models
trained on first use on UltraFeedback and PKU-SafeRLHF, which share no data with the proxies; z-scored on the
policy's own samples) and its length in words is reported beside every score.

Runs (resumable JSONL files under ``--out-dir``, shared with ``benchmarks/overoptimisation.py``):
``sample16`` (16 plain samples per prompt: the ``sample`` row averages them, the ``best-of-8`` row keeps the
best of the first 8 by the uniform scalarisation of the z-scored proxies, exactly what ``best-of-n --n 8``
selects), ``cd-k8`` (CD-Uniform), ``rmod-k8-lamL`` for each lambda. (The distilled-RMOD row of the earlier,
proxy-only version of this benchmark is not part of the re-measure.)

    python benchmarks/rmod_hh.py --prompts 200 --max-new-tokens 48 [--analyse-only]
"""

from __future__ import annotations

from pathlib import Path

from _hh_runs import (
    OUT_DIR,
    best_of_points,
    generate_runs,
    load_judged,
    paired,
    sample_mean_point,
    single_point,
    summarise,
    win,
)
from harness import RESULTS, fmt, parser, start, write_result


def analyse(args, out_dir: Path) -> dict:
    lams = [f"{float(x):g}" for x in args.lams.split(",")]
    labels = ["sample16", "cd-k8"] + [f"rmod-k8-lam{lam}" for lam in lams]
    data = load_judged(out_dir, labels)
    pts = {"sample": sample_mean_point(data), "best-of-8 (uniform)": best_of_points(data, (8,), "uniform")[8]}
    if "cd-k8" in data["runs"]:
        pts["CD-Uniform"] = single_point("cd-k8", data)
    for lam in lams:
        if f"rmod-k8-lam{lam}" in data["runs"]:
            pts[f"RMOD λ={lam}"] = single_point(f"rmod-k8-lam{lam}", data)
    rows = {}
    for name, pt in pts.items():
        rows[name] = summarise(pt, pts["sample"] if name != "sample" else None)
        if "CD-Uniform" in pts and name != "CD-Uniform":
            rows[name]["vs_cd_uniform"] = {side: {"diff": paired(pt[f"{side}_wc"], pts["CD-Uniform"][f"{side}_wc"]),
                                                  "win_rate": win(pt[f"{side}_wc"], pts["CD-Uniform"][f"{side}_wc"])}
                                           for side in ("proxy", "judge")}  # fmt: skip
    n = len(data["prompts"])
    md = [f"RMOD on {n} held-out HH prompts ({n // 2} helpful-base + {n // 2} harmless-base), K=8, B=16, "
          f"{args.max_new_tokens} new tokens. PROXY = the shipped `helpful`/`harmless` reward models the methods "
          "decode with (z: shipped statistics); JUDGE = `judge_helpful` (UltraFeedback) / `judge_harmless` "
          "(PKU-SafeRLHF), never seen by any method (z: fitted on the policy's 16 samples per prompt). Worst case = "
          "mean over prompts of the lower z-score. `sample` averages 16 samples per prompt; `best-of-8` is the "
          "best of 8 of them by the uniform proxy scalarisation (both disjoint groups of 8 averaged). 95% "
          "bootstrap CIs over prompts.", "",
          "| method | PROXY helpful (raw) | PROXY harmless (raw) | PROXY worst case (z) | JUDGE helpful (raw) | "
          "JUDGE harmless (raw) | JUDGE worst case (z) | words |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        pm, jm = r["proxy_means_raw"], r["judge_means_raw"]
        md.append(f"| {name} | {pm[0][0]:+.3f} | {pm[1][0]:+.3f} | {fmt(r['proxy_worst_case_z'], True)} | "
                  f"{jm[0][0]:+.3f} | {jm[1][0]:+.3f} | {fmt(r['judge_worst_case_z'], True)} | "
                  f"{r['words'][0]:.1f} [{r['words'][1]:.1f}, {r['words'][2]:.1f}] |")  # fmt: skip
    md += ["", "Paired by prompt against CD-Uniform (worst case, z; win rate: share of prompts with a higher worst "
           "case, ties 1/2):", "", "| method | PROXY diff | PROXY win rate | JUDGE diff | JUDGE win rate |",
           "|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        if "vs_cd_uniform" in r:
            v = r["vs_cd_uniform"]
            md.append(f"| {name} − CD-Uniform | {fmt(v['proxy']['diff'], True)} | {fmt(v['proxy']['win_rate'])} | "
                      f"{fmt(v['judge']['diff'], True)} | {fmt(v['judge']['win_rate'])} |")  # fmt: skip
    (RESULTS / "rmod_hh.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return {"n_prompts": n, "rows": rows, "judge_norm": data["judge_norm"].to_dict(),
            "proxy_norm": data["proxy_norm"].to_dict(), "runs": sorted(data["runs"])}  # fmt: skip


def main() -> None:
    ap = parser(__doc__.splitlines()[0], prompts=200, out_dir=OUT_DIR, batch_size=8, seed=0, threads=1)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--lams", default="0.1,1,5")
    args = start(ap.parse_args())
    out = Path(args.out_dir)
    labels = ["sample16", "cd-k8"] + [f"rmod-k8-lam{float(x):g}" for x in args.lams.split(",")]
    if not args.analyse_only:
        generate_runs(labels, args, out)
    res = analyse(args, out)
    r = res["rows"]
    best = max(
        (k for k in r if k.startswith("RMOD")), key=lambda k: r[k]["proxy_worst_case_z"][0], default=None
    )
    summary = f"rmod_hh: {res['n_prompts']} prompts"
    if best and "vs_cd_uniform" in r[best]:
        v = r[best]["vs_cd_uniform"]
        summary += (f"; {best} − CD-Uniform worst case: PROXY {fmt(v['proxy']['diff'], True)}, "
                    f"JUDGE {fmt(v['judge']['diff'], True)}")  # fmt: skip
    write_result("rmod_hh", {"args": vars(args), **res}, summary)


if __name__ == "__main__":
    main()
