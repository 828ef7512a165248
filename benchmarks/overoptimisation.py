"""Over-optimisation, shown: selection pressure of each inference-time method against PROXY and JUDGE.

On held-out HH prompts (``_tasks.heldout_prompts``: half helpful-base, half harmless-base, never seen by the
shipped reward models), the decoding objectives are the shipped ``helpful``/``harmless`` reward models (the
PROXY, z-scored with the shipped statistics); every response is also scored by the JUDGES
(:mod:`moalign.evaluation.judges`, z-scored on the policy's own samples) and its length in words recorded.
Selection pressure swept:

* best-of-N, N = 1, 2, 4, 8, 16, from one run of 16 samples per prompt (best-of-N = the best of the first N;
  averaged over the 16/N disjoint groups of N, which is the same distribution with less noise), selected by
  the worst case (min over z-scored proxies) and by the uniform scalarisation;
* CD-Uniform, K = 2, 4, 8 (B = 16);
* RMOD, K = 4, 8 at lambda = 1, and lambda = 0.1, 1, 5 at K = 8 (K = 2 is analysed when generated:
  ``--runs rmod-k2-lam1``).

Per point: proxy worst case and judge worst case (mean over prompts of min over z-scored objectives, 95%
bootstrap CIs), per-objective means, words per response, forward tokens, and the KL-from-policy estimate where
the method has one: best-of-N's ``log N - (N - 1)/N`` (an upper bound, Beirami et al. 2024); for CD and RMOD,
which pick the argmax of K candidate blocks at each of the response's blocks, the same bound per block summed
over the blocks decoded (``blocks x (log K - (K - 1)/K)``, an upper-bound estimate by the chain rule).

Runs are resumable JSONL files in ``benchmarks/results/overopt/`` (shared with ``benchmarks/rmod_hh.py``);
``--generate`` runs (or resumes) them in priority order, the analysis uses every run complete on the prompts.

    python benchmarks/overoptimisation.py --prompts 48 --generate     # then, or later: without --generate

Writes ``benchmarks/results/overoptimisation.{json,md,png}`` (the table, paired contrasts, and the plot of proxy
and judge worst case against the KL estimate, with proxy gain vs judge gain and words per response).
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import _hh_runs as runs
import numpy as np
from harness import RESULTS, fmt, parser, save_plot, start, write_result

# generation order: the most informative first, so that a run cut short still answers the question
RUNS = [
    "sample16",
    "cd-k8",
    "rmod-k8-lam1",
    "rmod-k8-lam5",
    "cd-k4",
    "cd-k2",
    "rmod-k4-lam1",
    "rmod-k8-lam0.1",
]
EXTRA_RUNS = ["rmod-k2-lam1"]  # analysed when present (``--runs rmod-k2-lam1``)
BON_N = (1, 2, 4, 8, 16)


def main(argv=None) -> int:
    ap = parser(__doc__.splitlines()[0], prompts=48, out_dir=runs.OUT_DIR, batch_size=8, seed=0, threads=1,
                analyse_only=False)  # analysis only unless --generate  # fmt: skip
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--runs", nargs="*", default=RUNS)
    ap.add_argument("--generate", action="store_true", help="generate / resume the runs first")
    ap.add_argument("--stages", type=int, nargs="*", default=[16, 32, 48], help="prompt counts to stop at")
    args = start(ap.parse_args(argv))
    out_dir = Path(args.out_dir)
    if args.generate:  # in stages of prompts, every run at each stage: a run cut short leaves all runs paired
        target = args.prompts
        for n in [s for s in args.stages if s < target] + [target]:
            args.prompts = n
            runs.generate_runs(args.runs, args, out_dir)
        args.prompts = target
    return analyse(args, out_dir)


def kl_bon(n: int) -> float:
    """Best-of-N's KL from the policy, the usual upper bound ``log N - (N - 1) / N``."""
    return math.log(n) - (n - 1) / n


def points(data: dict) -> list[dict]:
    """Every sweep point: family, pressure, per-prompt arrays, KL estimate."""
    out = []
    for rule, fam in (("worst-case", "best-of-N (worst-case pick)"), ("uniform", "best-of-N (uniform pick)")):
        for n, pt in runs.best_of_points(data, BON_N, rule).items():
            out.append({"family": fam, "label": f"{fam.split(' (')[0].replace('N', str(n))} ({rule})",
                        "pressure": n, "pressure_name": "N", "kl": kl_bon(n), "pt": pt})  # fmt: skip
    for label in data["runs"]:
        if m := re.fullmatch(r"cd-k(\d+)", label):
            k, fam, extra = int(m[1]), "CD-Uniform", {}
        elif m := re.fullmatch(r"rmod-k(\d+)-lam([0-9.]+)", label):
            k, lam = int(m[1]), float(m[2])
            fam, extra = f"RMOD λ={lam:g}", {"lam": lam}
        else:
            continue
        pt = runs.single_point(label, data)
        out.append({"family": fam, "label": label, "pressure": k, "pressure_name": "K", **extra,
                    "kl": float(np.mean(pt["blocks"])) * kl_bon(k), "pt": pt})  # fmt: skip
    fam_order = {"best-of-N (worst-case pick)": 0, "best-of-N (uniform pick)": 1, "CD-Uniform": 2}
    return sorted(out, key=lambda r: (fam_order.get(r["family"], 3), r["family"], r["pressure"]))


CONTRASTS = [  # (a, b): a − b; "bonN" = best-of-N with the worst-case pick
    ("bon16", "bon4"), ("bon8", "bon4"), ("cd-k8", "cd-k2"), ("rmod-k4-lam1", "cd-k4"), ("rmod-k8-lam1", "cd-k8"),
    ("rmod-k8-lam5", "cd-k8"), ("rmod-k8-lam1", "bon8"), ("rmod-k8-lam1", "bon16"), ("rmod-k8-lam5", "rmod-k8-lam1"),
    ("rmod-k8-lam0.1", "cd-k8"),
]  # fmt: skip


def paired_contrasts(data: dict) -> dict:
    pts = {f"bon{n}": pt for n, pt in runs.best_of_points(data, BON_N, "worst-case").items()}
    pts.update({lab: runs.single_point(lab, data) for lab in data["runs"] if lab != "sample16"})
    out = {}
    for a, b in CONTRASTS:
        if a in pts and b in pts:
            out[f"{a} − {b}"] = {side: runs.paired(pts[a][f"{side}_wc"], pts[b][f"{side}_wc"])
                                 for side in ("proxy", "judge")}  # fmt: skip
    return out


def analyse(args, out_dir: Path) -> int:
    data = runs.load_judged(out_dir, RUNS + EXTRA_RUNS)
    pts = points(data)
    ref = next(p["pt"] for p in pts if p["family"].startswith("best-of-N") and p["pressure"] == 1)
    rows = []
    for p in pts:
        row = {k: v for k, v in p.items() if k != "pt"}
        row.update(runs.summarise(p["pt"], ref))
        rows.append(row)
    n = len(data["prompts"])
    md = [f"Selection pressure on {n} held-out HH prompts ({n // 2} helpful-base + {n // 2} harmless-base; "
          f"{args.max_new_tokens} new tokens, B={args.block_size}). PROXY = shipped `helpful`/`harmless` (what every "
          "method selects by), JUDGE = `judge_helpful` (UltraFeedback) / `judge_harmless` (PKU-SafeRLHF). Worst case "
          "= mean over prompts of min over z-scored objectives; Δ = paired difference from plain sampling (N=1). "
          "KL: best-of-N bound log N − (N−1)/N; CD/RMOD: blocks × (log K − (K−1)/K). 95% bootstrap CIs over "
          "prompts.", "",
          "| method | N or K | KL est. | PROXY worst case | JUDGE worst case | PROXY Δ vs sample | JUDGE Δ vs sample "
          "| words | forward tokens |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        md.append(f"| {r['family']} | {r['pressure_name']}={r['pressure']} | {r['kl']:.2f} | "
                  f"{fmt(r['proxy_worst_case_z'], True)} | {fmt(r['judge_worst_case_z'], True)} | "
                  f"{fmt(r['proxy_worst_case_diff'], True)} | {fmt(r['judge_worst_case_diff'], True)} | "
                  f"{r['words'][0]:.1f} | {r['policy_tokens']:.0f} |")  # fmt: skip
    contrasts = paired_contrasts(data)
    md += ["", "Paired contrasts (same prompts; worst case, z):", "", "| contrast | PROXY diff | JUDGE diff |",
           "|---|---|---|"]  # fmt: skip
    md += [f"| {k} | {fmt(v['proxy'], True)} | {fmt(v['judge'], True)} |" for k, v in contrasts.items()]
    (RESULTS / "overoptimisation.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    plot(rows, RESULTS / "overoptimisation.png", n)
    bon = {r["pressure"]: r for r in rows if r["family"] == "best-of-N (worst-case pick)"}
    top = max(bon)
    summary = (f"overoptimisation ({n} prompts): best-of-{top} (worst-case pick) − sample: PROXY "
               f"{fmt(bon[top]['proxy_worst_case_diff'], True)}, JUDGE {fmt(bon[top]['judge_worst_case_diff'], True)}; "
               f"judge-best point: {max(rows, key=lambda r: r['judge_worst_case_z'][0])['label']}")  # fmt: skip
    write_result("overoptimisation", {"args": vars(args), "n_prompts": n, "points": rows, "contrasts": contrasts,
                                      "judge_norm": data["judge_norm"].to_dict(), "runs": sorted(data["runs"])},
                 summary)  # fmt: skip
    return 0


def plot(rows: list[dict], path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(dict.fromkeys(r["family"] for r in rows))
    colors = dict(zip(fams, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    panels = [(axes[0, 0], "proxy_worst_case_z", "PROXY worst case (z): what the methods optimise"),
              (axes[0, 1], "judge_worst_case_z", "JUDGE worst case (z): held-out judges"),
              (axes[1, 1], "words", "words per response")]  # fmt: skip
    for ax, key, title in panels:
        for fam in fams:
            pts = [r for r in rows if r["family"] == fam]
            x = [max(r["kl"], 1e-2) for r in pts]
            y = np.array([r[key] for r in pts])
            ax.errorbar(x, y[:, 0], yerr=[y[:, 0] - y[:, 1], y[:, 2] - y[:, 0]], marker="o", capsize=3,
                        label=fam, color=colors[fam])  # fmt: skip
            for r, xi, yi in zip(pts, x, y[:, 0]):
                ax.annotate(f"{r['pressure_name']}={r['pressure']}", (xi, yi), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("KL-from-policy estimate (nats, log scale; N=1 / K=1 drawn at 0.01)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    # proxy vs judge gain over sampling: over-optimisation is proxy gain without judge gain
    ax = axes[1, 0]
    for fam in fams:
        pts = [r for r in rows if r["family"] == fam]
        px = np.array([r["proxy_worst_case_diff"] for r in pts])
        jy = np.array([r["judge_worst_case_diff"] for r in pts])
        ax.errorbar(px[:, 0], jy[:, 0], xerr=[px[:, 0] - px[:, 1], px[:, 2] - px[:, 0]],
                    yerr=[jy[:, 0] - jy[:, 1], jy[:, 2] - jy[:, 0]], marker="o", capsize=2, color=colors[fam],
                    label=fam, alpha=0.8)  # fmt: skip
    lim = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
    ax.plot(lim, lim, "k:", lw=1, label="judge gain = proxy gain")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("PROXY worst-case gain over sampling (z)")
    ax.set_ylabel("JUDGE worst-case gain over sampling (z)")
    ax.set_title("gain on the proxy vs gain on the judges", fontsize=10)
    ax.grid(alpha=0.3)
    fig.suptitle(f"Selection pressure on {n} held-out HH prompts: proxy vs judge (95% CIs)")
    fig.tight_layout()
    save_plot(fig, path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
