"""IAMA against GRPO at matched KL to the base policy (issue 18 §1), on HH or on the two length targets.

LoRA runs of the bundled policy with the same prompts, seed, learning rate, steps and a KL term
(``--beta``, TRL's ``beta``; the earlier experiments ran with TRL's default 0, no KL term):

- ``iama``: IAMA's non-linear transform of best-of-4 per criterion, aggregated by the sum, batch-scaled;
- ``grpo-batch``: plain GRPO on the mean of the criteria's rewards, batch-scaled (``scale_rewards="batch"``,
  what IAMAConfig uses for both so that one learning rate means the same step size);
- ``grpo-group``: TRL's default GRPO (``scale_rewards="group"``: each group divided by its own std);
- ``gdpo``: GRPO as TRL runs several rewards with ``multi_objective_aggregation="normalize_then_sum"`` (GDPO:
  each reward normalised within its group, then summed).

Every ``--eval-every`` steps the checkpoint (and the base policy, at KL 0) is measured on held-out prompts:
``KL(policy || base)`` in nats per response (:func:`moalign.evaluation.sampled_kl`, ``--eval-samples`` plain
samples per prompt), and the best-of-4 objective IAMA optimises (mean over the criteria of the value of
best-of-4 picked by that criterion), for the PROXY (the criteria themselves) and, on HH, the JUDGES (Bradley-
Terry heads on UltraFeedback and PKU-SafeRLHF that no run saw, on the same picks), z-scored on the base
policy's samples. The comparison at matched KL interpolates a GRPO arm's per-prompt objective linearly in KL
between its two checkpoints that bracket IAMA's KL (paired by prompt; no extrapolation).

    python benchmarks/iama_kl.py --task hh --steps 30 --eval-every 10
    python benchmarks/iama_kl.py --task length --steps 24 --eval-every 8

Writes benchmarks/results/iama_kl_<task>.{json,md,png}; runs, checkpoints and per-checkpoint evaluations go to
benchmarks/results/iama_kl_<task>/ (everything resumes: finished training and evaluations are not redone).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from _tasks import JUDGES, register_length_targets, short_prompts, split_prompts
from harness import RESULTS, SHARED_DATA, ci, fmt, markdown_table, parser, save_plot, start, write_result

ARMS = {
    "iama": ("on", "batch"),
    "grpo-batch": ("off", "batch"),
    "grpo-group": ("off", "group"),
    "gdpo": ("off", "group"),
}
#: TRL's aggregation of several rewards per arm (default: sum_then_normalize); gdpo: each reward normalised in
#: its group, then summed (TRL's normalize_then_sum, the GDPO paper's)
AGGREGATION = {"gdpo": "normalize_then_sum"}
BASE = "smollm2-135m-instruct"


def train(arm: str, d: Path, prompts: Path, criteria: list[str], args) -> dict:
    from transformers.trainer_utils import get_last_checkpoint

    from moalign.training.grpo import IAMAConfig, train_grpo

    nonlinear, scale = ARMS[arm]
    if not (d / "iama_run.json").exists():
        resume = "last" if d.exists() and get_last_checkpoint(str(d)) else None
        cfg = IAMAConfig(
            output_dir=str(d), prompts=str(prompts), limit=args.steps * args.prompts_per_step, criterion=criteria,
            nonlinear=nonlinear, aggregate="sum", scale_rewards=scale, beta=args.beta, normalize=args.normalize,
            num_generations=args.generations, per_device_train_batch_size=args.prompts_per_step * args.generations,
            max_completion_length=args.max_tokens, max_steps=args.steps, learning_rate=args.lr, use_lora=True,
            lora_r=16, logging_steps=1, save_strategy="steps", save_steps=args.eval_every, report_to="none",
            seed=args.seed, disable_tqdm=True, resume_from_checkpoint=resume,
            **({"multi_objective_aggregation": AGGREGATION[arm]} if arm in AGGREGATION else {}),
        )  # fmt: skip
        train_grpo(cfg)
    rec = json.loads((d / "iama_run.json").read_text())
    hist = [h for h in rec["log_history"] if "kl" in h]
    return {"seconds": rec["result"]["seconds"], "train_kl_per_token": [[h["step"], h["kl"]] for h in hist]}


def evaluate(name: str, policy: str, eval_prompts: Path, objectives: str, out: Path, args) -> dict:
    """One policy's held-out samples (scored) and its sampled KL to the base policy; cached in out/."""
    cache = out / f"eval-{name}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from moalign.config import GenerateConfig
    from moalign.data.prompts import load_prompts
    from moalign.evaluation import sampled_kl
    from moalign.generate import generate
    from moalign.policies import load_policy
    from moalign.records import read_records

    f = out / f"eval-{name}.jsonl"
    f.unlink(missing_ok=True)
    generate(GenerateConfig(method="sample", policy=policy, prompts=str(eval_prompts), out=str(f),
                            n=args.eval_samples, objectives=objectives, normalize="none",
                            max_new_tokens=args.max_tokens, seed=args.seed, batch_size=8))  # fmt: skip
    recs = read_records(str(f))
    by_prompt: dict[str, list] = {}
    for r in sorted(recs, key=lambda r: (r["prompt_id"], r["sample_index"])):
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    if name == "base":
        kl = {"per_prompt": [0.0] * len(by_prompt), "mean": 0.0, "tokens": None}
    else:
        pol, base = load_policy(policy), load_policy(BASE)
        kl = sampled_kl(pol, base, load_prompts(str(eval_prompts)), n=args.eval_samples,
                        max_new_tokens=args.max_tokens, seed=args.seed)  # fmt: skip
    res = {"prompt_ids": list(by_prompt), "kl": kl,
           "scores": [[[r["scores"][k] for k in r["scores"]] for r in g] for g in by_prompt.values()],
           "signals": list(recs[0]["scores"]), "words": [[len(r["response"].split()) for r in g] for g in by_prompt.values()],
           "n_tokens": [[r["n_tokens"] for r in g] for g in by_prompt.values()]}  # fmt: skip
    cache.write_text(json.dumps(res))
    return res


def bon_objective(
    ev: dict, crit_cols: list[int], signal_cols: list[list[int]], mu, sd
) -> dict[str, np.ndarray]:
    """Per prompt, mean over criteria c of signal(c) at best-of-4 picked by criterion c's proxy, per kind."""
    z = (np.array(ev["scores"], dtype=float) - mu) / sd  # [prompts, samples, signals]
    out = {}
    for kind, cols in zip(("proxy", "judge"), signal_cols):
        if not cols:
            continue
        vals = []
        for c_pick, c_val in zip(crit_cols, cols):
            j = z[:, :, c_pick].argmax(1)
            vals.append(z[np.arange(len(z)), j, c_val])
        out[kind] = np.mean(vals, axis=0)
    return out


def at_kl(curve: list[tuple[float, dict[str, np.ndarray]]], kl: float) -> dict[str, np.ndarray] | None:
    """A curve's per-prompt objective at ``kl``, linear between its two bracketing points; None outside."""
    pts = sorted(curve, key=lambda p: p[0])
    for (k0, v0), (k1, v1) in zip(pts, pts[1:]):
        if k0 <= kl <= k1:
            w = 0.0 if k1 == k0 else (kl - k0) / (k1 - k0)
            return {k: (1 - w) * v0[k] + w * v1[k] for k in v0}
    return None


def main() -> None:
    ap = parser(__doc__.splitlines()[0], out_dir=None, seed=0, threads=1)
    ap.add_argument("--task", choices=["hh", "length"], default="hh")
    ap.add_argument("--out-dir", default=None, help="runs folder (default benchmarks/results/iama_kl_<task>)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--beta", type=float, default=0.04, help="the KL coefficient (TRL's beta)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=10, help="evaluate every this many steps (checkpoints)")
    ap.add_argument("--prompts-per-step", type=int, default=1)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=4)
    args = start(ap.parse_args())
    out = Path(args.out_dir or RESULTS / f"iama_kl_{args.task}")
    args.out_dir = str(out)
    tag = out.name
    out.mkdir(parents=True, exist_ok=True)
    arms = args.arms.split(",")

    if args.task == "hh":
        train_prompts, eval_prompts = split_prompts(
            out, args.steps * args.prompts_per_step, args.eval_prompts
        )
        criteria, crit_names = ["helpful:bon:4", "harmless:bon:4"], ["helpful", "harmless"]
        judges = [f"rm:{JUDGES[c]}" for c in crit_names if JUDGES[c].exists()]
        args.normalize = "none"  # the shipped proxies' scales are comparable; the same as iama_hh
    else:
        targets = (4, 28)
        register_length_targets(targets, l_max=args.max_tokens)
        train_prompts = short_prompts(
            SHARED_DATA / "ultrafeedback-binarized-1000.jsonl.gz", out / "train_prompts.jsonl"
        )
        eval_prompts = short_prompts(
            SHARED_DATA / "ultrafeedback-binarized-eval-200.jsonl.gz", out / "eval_all.jsonl"
        )
        lines = eval_prompts.read_text().splitlines()[: args.eval_prompts]
        eval_prompts = out / "eval_prompts.jsonl"
        eval_prompts.write_text("\n".join(lines) + "\n")
        criteria, crit_names, judges = [f"len{t}:bon:4" for t in targets], [f"len{t}" for t in targets], []
        args.normalize = "none"
    objectives = ",".join(crit_names + judges)

    train_info = {arm: train(arm, out / arm, train_prompts, criteria, args) for arm in arms}

    evals = {("base", 0): evaluate("base", BASE, eval_prompts, objectives, out, args)}
    for arm in arms:
        for step in range(args.eval_every, args.steps + 1, args.eval_every):
            ck = out / arm / f"checkpoint-{step}"
            evals[(arm, step)] = evaluate(f"{arm}-{step}", str(ck), eval_prompts, objectives, out, args)

    base = evals[("base", 0)]
    base_z = np.array(base["scores"], dtype=float).reshape(-1, len(base["signals"]))
    mu, sd = (
        (base_z.mean(0), base_z.std(0))
        if args.task == "hh"
        else (np.zeros(base_z.shape[1]), np.ones(base_z.shape[1]))
    )
    crit_cols = list(range(len(crit_names)))
    signal_cols = [crit_cols, list(range(len(crit_names), len(crit_names) + len(judges)))]
    kinds = ["proxy"] + (["judge"] if judges else [])

    points, curves = {}, {}
    for (arm, step), ev in evals.items():
        obj = bon_objective(ev, crit_cols, signal_cols, mu, sd)
        kl = np.array(ev["kl"]["per_prompt"])
        points[f"{arm}-{step}"] = {
            "arm": arm, "step": step, "kl": ci(np.mean, kl, seed=args.seed) if step else [0.0, 0.0, 0.0],
            **{k: ci(np.mean, v, seed=args.seed) for k, v in obj.items()},
            "words": float(np.mean(ev["words"])), "tokens": float(np.mean(ev["n_tokens"])),
        }  # fmt: skip
        for a in [arm] if arm != "base" else arms:  # the base policy starts every curve at KL 0
            curves.setdefault(a, []).append((float(kl.mean()), obj))

    matched = {}
    for other in [a for a in arms if a != "iama"]:
        for kl_i, obj_i in sorted(curves.get("iama", []), key=lambda p: p[0])[1:]:
            o = at_kl(curves[other], kl_i)
            key = f"iama - {other} at KL {kl_i:.2f}"
            matched[key] = (
                {k: ci(np.mean, obj_i[k] - o[k], seed=args.seed) for k in kinds} if o else "outside"
            )

    rows = [[n, f"{p['step']}", fmt(p["kl"], digits=2), *[fmt(p[k], signed=True, digits=2) for k in kinds],
             f"{p['words']:.0f}", f"{p['tokens']:.1f}"] for n, p in points.items()]  # fmt: skip
    md = markdown_table(["policy", "step", "KL to base (nats/response)", *[f"best-of-4 objective {k.upper()}" for k in kinds],
                         "words", "tokens"], rows)  # fmt: skip
    md += "\n\nAt matched KL (IAMA's checkpoints; the other arm interpolated linearly in KL, paired by prompt):\n\n"
    md += markdown_table(["difference", *[k.upper() for k in kinds]],
                         [[k, *([fmt(v[kk], signed=True, digits=2) for kk in kinds] if v != "outside"
                                else ["outside the other arm's KL range"] * len(kinds))] for k, v in matched.items()])  # fmt: skip
    (RESULTS / f"{tag}.md").write_text(md + "\n")
    print(md)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    colors = {"iama": "tab:red", "grpo-batch": "tab:blue", "grpo-group": "tab:green", "gdpo": "tab:purple"}
    for ax, kind in zip(axes[0], kinds):
        for arm in arms:
            ps = [points["base-0"]] + [p for p in points.values() if p["arm"] == arm]
            ax.errorbar([p["kl"][0] for p in ps], [p[kind][0] for p in ps],
                        yerr=[[p[kind][0] - p[kind][1] for p in ps], [p[kind][2] - p[kind][0] for p in ps]],
                        marker="o", capsize=3, color=colors.get(arm), label=arm)  # fmt: skip
        ax.set_xlabel("KL(policy || base), nats per response (sampled, held-out prompts)")
        ax.set_ylabel("best-of-4 objective (mean over criteria)" + (" (z)" if args.task == "hh" else ""))
        what = "the criteria the runs optimised" if kind == "proxy" else "judges no run saw"
        ax.set_title(f"{kind.upper()} ({what}); beta={args.beta}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = save_plot(fig, tag)

    last = {arm: points[f"{arm}-{args.steps}"] for arm in arms if f"{arm}-{args.steps}" in points}
    summary = (
        f"{tag}: after {args.steps} steps (beta {args.beta}) KL / best-of-4 objective "
        + ", ".join(
            f"{a} {p['kl'][0]:.2f} / {p['proxy'][0]:+.2f}"
            + (f" (judge {p['judge'][0]:+.2f})" if "judge" in p else "")
            for a, p in last.items()
        )
        + f"; base {points['base-0']['proxy'][0]:+.2f}; plot {png.name}"
    )
    write_result(
        tag, {"args": vars(args), "train": train_info, "points": points, "matched_kl": matched}, summary
    )


if __name__ == "__main__":
    main()
