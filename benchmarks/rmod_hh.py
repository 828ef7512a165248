"""RMOD on real HH prompts: sample, best-of-8 (uniform), CD-Uniform, RMOD at several lambdas, distilled RMOD.

Default policy, objectives ``helpful`` and ``harmless`` (z-scored with the shipped statistics), K = 8, B = 16.
Test prompts: the first N/2 prompts of HH helpful-base and of HH harmless-base (held out from the reward
models' training split). The distilled policy is trained on RMOD outputs for *other* HH prompts (never the test
ones). Every run is a resumable JSONL under ``--out-dir``; rerunning continues where it stopped.

    python benchmarks/rmod_hh.py --prompts 200 --max-new-tokens 48 [--skip-distill]
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from _common import SHARED_DATA, write_result

from moalign.config import EvaluateConfig, GenerateConfig
from moalign.data.pairs import load_pairs, split_pairs
from moalign.data.prompts import Prompt
from moalign.evaluation.evaluate import evaluate_files, load_runs
from moalign.evaluation.metrics import bootstrap_ci, worst_case, worst_case_win_indicator
from moalign.evaluation.report import plot_comparison, plot_tradeoff, tradeoff_points
from moalign.generate import generate
from moalign.objectives.base import resolve_objectives
from moalign.policies import load_policy


def heldout_prompts(n: int, offset: int = 0) -> list[Prompt]:
    """n prompts alternating helpful / harmless, from the reward models' held-out split."""
    out: list[Prompt] = []
    for name in ("hh-helpful-base-test.jsonl.gz", "hh-harmless-base-test-2000.jsonl.gz"):
        _, held = split_pairs(load_pairs(str(SHARED_DATA / name)), heldout_frac=0.2, seed=0)
        seen, ps = set(), []
        for pair in held:
            if pair.prompt.text not in seen:
                seen.add(pair.prompt.text)
                ps.append(pair.prompt)
        tag = name.split("-")[1]
        out.append([Prompt(p.messages, id=f"{tag}-{i}") for i, p in enumerate(ps[offset : offset + n // 2])])
    return [p for pair in zip(*out) for p in pair]


def paired_vs(res, paths: dict[str, str], ref: str, n_boot: int, seed: int) -> dict:
    """Each method against ``ref`` on the same prompts: mean worst-case difference and head-to-head worst-case
    win rate (ties 1/2), both with paired 95% bootstrap CIs, in the evaluation's z-score space."""
    runs, _ = load_runs(list(paths.values()))

    def z_by_prompt(recs):
        raw = np.array([[r["scores"][g] for g in res.objectives] for r in recs])
        return dict(zip([r["prompt_id"] for r in recs], res.norm.apply(raw), strict=True))

    ref_z = z_by_prompt(runs[ref])
    out = {}
    for label, recs in runs.items():
        if label == ref:
            continue
        mine = z_by_prompt(recs)
        ids = [i for i in mine if i in ref_z]
        za, zb = np.array([mine[i] for i in ids]), np.array([ref_z[i] for i in ids])
        diff = bootstrap_ci(lambda x, y: (worst_case(x) - worst_case(y)).mean(), za, zb, n_boot=n_boot, seed=seed)
        win = bootstrap_ci(np.mean, worst_case_win_indicator(za, zb), n_boot=n_boot, seed=seed)
        out[label] = {"n": len(ids), "worst_case_diff": diff, "win_rate": win}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--train-prompts", type=int, default=100, help="prompts whose RMOD outputs are distilled")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--lams", default="0.1,0.5,1,5")
    ap.add_argument("--distill-lam", type=float, default=0.5)
    ap.add_argument("--skip-distill", action="store_true")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out-dir", default="benchmarks/results/rmod_hh")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    policy = load_policy()
    objectives = resolve_objectives("helpful,harmless")
    test = heldout_prompts(args.prompts)
    base = GenerateConfig(objectives="helpful,harmless", max_new_tokens=args.max_new_tokens, k=args.k, n=args.k,
                          block_size=args.block_size, batch_size=args.batch_size, seed=args.seed)  # fmt: skip
    runs = {
        "sample": replace(base, method="sample", n=1),
        "best-of-8": replace(base, method="best-of-n"),
        "cd-uniform": replace(base, method="cd", scalarization="uniform"),
    }
    for lam in [float(x) for x in args.lams.split(",")]:
        runs[f"rmod-lam{lam:g}"] = replace(base, method="rmod", lam=lam)
    paths = {}
    for label, cfg in runs.items():
        cfg.out = str(out / f"{label}.jsonl")
        print(f"== {label}", flush=True)
        generate(cfg, policy=policy, objectives=objectives, prompts=test)
        paths[label] = cfg.out

    if not args.skip_distill:
        from moalign.training.distill import DistillConfig, train_distill

        train = heldout_prompts(args.train_prompts, offset=args.prompts // 2)
        dcfg = replace(base, method="rmod", lam=args.distill_lam, out=str(out / "distill-train-rmod.jsonl"))
        print("== rmod outputs for distillation", flush=True)
        generate(dcfg, policy=policy, objectives=objectives, prompts=train)
        ddir = out / "distilled-rmod-policy"
        if not (ddir / "adapter_config.json").exists():
            train_distill(DistillConfig(inputs=[dcfg.out], output_dir=str(ddir), seed=args.seed, epochs=2.0))
        distilled = load_policy(str(ddir))
        scfg = replace(base, method="sample", n=1, policy=str(ddir), out=str(out / "distilled-rmod.jsonl"),
                       normalize=str(out / "sample.meta.json"))  # fmt: skip
        print("== distilled-rmod", flush=True)
        generate(scfg, policy=distilled, objectives=objectives, prompts=test)
        paths["distilled-rmod"] = scfg.out

    res = evaluate_files(EvaluateConfig(inputs=list(paths.values()), reference=paths["sample"], n_boot=2000,
                                        seed=args.seed))  # fmt: skip
    plot_comparison(res, out / "comparison.png")
    plot_tradeoff(tradeoff_points(res, "helpful", "harmless"), ["helpful", "harmless"], out / "tradeoff.png")
    table = res.table()
    vs_cd = paired_vs(res, paths, "cd-uniform", n_boot=2000, seed=args.seed)
    lines = ["", "vs cd-uniform (paired by prompt; 95% bootstrap CI):", "method          worst-case diff          "
             "worst-case win rate"]  # fmt: skip
    for k, v in vs_cd.items():
        d, w = v["worst_case_diff"], v["win_rate"]
        lines.append(f"{k:15s} {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]   {w[0]:.3f} [{w[1]:.3f}, {w[2]:.3f}]")
    table += "\n".join(lines) + "\n"
    (out / "table.txt").write_text(table)
    print(table)
    m = res.methods
    best_rmod = max((k for k in m if k.startswith("rmod")), key=lambda k: m[k].worst_case.estimate)
    summary = (
        f"rmod_hh: n={m['sample'].n}; worst case (z) cd-uniform {m['cd-uniform'].worst_case.estimate:.3f} vs "
        f"best RMOD ({best_rmod}) {m[best_rmod].worst_case.estimate:.3f} (paired diff "
        + "{:+.3f} [{:+.3f}, {:+.3f}]".format(*vs_cd[best_rmod]["worst_case_diff"])
        + "); win rate vs sample: "
        + ", ".join(f"{k} {v.win_rate.estimate:.3f}" for k, v in m.items() if v.win_rate is not None)
    )
    write_result("rmod_hh", {"args": vars(args), "result": res.to_dict(), "runs": paths, "vs_cd_uniform": vs_cd,
                             "config": asdict(base)}, summary)  # fmt: skip


if __name__ == "__main__":
    main()
