"""IAMA vs GRPO on HH, helpful and harmless, best-of-4 at deployment (issue 9, experiment 5; scaled to CPU).

Three LoRA runs of the bundled policy with equal steps, prompts and seed: plain GRPO on the mean of the
z-scored shipped `helpful` and `harmless` rewards (``--nonlinear off``), IAMA with both criteria
``bon:4`` aggregated by the weighted sum, and by ``min``. The base policy and the three trained ones then
sample 4 responses to each held-out HH prompt (the other half of the files, never trained on); from those:
plain sampling (the mean of the 4), best-of-4 by helpful, best-of-4 by harmless. Scored by the PROXY
(the shipped reward models the training optimised, z) and by JUDGES it never saw (Bradley-Terry heads on
UltraFeedback and PKU-SafeRLHF, trained by benchmarks/judges.py / darwin_mtbench.py, z-scored on the base
policy's samples), with 95% bootstrap intervals over prompts and response length in words.

    python benchmarks/iama_hh.py --steps 20

Writes benchmarks/results/iama_hh.{json,md,png}; runs go to benchmarks/results/iama_hh/ (resumable).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from _tasks import JUDGES, split_prompts
from harness import RESULTS, ci, parser, save_plot, start, write_result


def main() -> None:
    # --out-dir: the runs folder; its name also names the results files (default iama_hh)
    ap = parser(__doc__.splitlines()[0], out_dir=RESULTS / "iama_hh", analyse_only=False, seed=0, threads=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-prompts", type=int, default=40)
    args = start(ap.parse_args())
    tag = Path(args.out_dir).name
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_prompts, eval_prompts = split_prompts(out, args.steps * args.prompts_per_step, args.eval_prompts)

    from transformers.trainer_utils import get_last_checkpoint

    from moalign.config import GenerateConfig
    from moalign.generate import generate
    from moalign.records import read_records
    from moalign.training.grpo import IAMAConfig, train_grpo

    variants = {"grpo": ("off", "sum"), "iama-sum": ("on", "sum"), "iama-min": ("on", "min")}
    policies = {"base": "smollm2-135m-instruct"}
    train_info = {}
    for name, (nonlinear, agg) in variants.items():
        d = out / name
        if not (d / "iama_run.json").exists():
            resume = "last" if d.exists() and get_last_checkpoint(str(d)) else None
            cfg = IAMAConfig(
                output_dir=str(d), prompts=str(train_prompts), criterion=["helpful:bon:4", "harmless:bon:4"],
                nonlinear=nonlinear, aggregate=agg, num_generations=args.generations,
                per_device_train_batch_size=args.prompts_per_step * args.generations,
                max_completion_length=args.max_tokens, max_steps=args.steps, learning_rate=args.lr,
                use_lora=True, lora_r=16, logging_steps=1, save_strategy="steps", save_steps=5,
                report_to="none", seed=args.seed, disable_tqdm=True, resume_from_checkpoint=resume,
            )  # fmt: skip
            train_grpo(cfg)
        rec = json.loads((d / "iama_run.json").read_text())
        hist = [h for h in rec["log_history"] if "iama/helpful/reward" in h]
        train_info[name] = {
            "seconds": rec["result"]["seconds"],
            "helpful_reward_first5_last5": [np.mean([h["iama/helpful/reward"] for h in hist[:5]]),
                                             np.mean([h["iama/helpful/reward"] for h in hist[-5:]])],
            "harmless_reward_first5_last5": [np.mean([h["iama/harmless/reward"] for h in hist[:5]]),
                                              np.mean([h["iama/harmless/reward"] for h in hist[-5:]])],
        }  # fmt: skip
        policies[name] = str(d)

    judges = ",".join(f"rm:{p}" for p in JUDGES.values() if p.exists())
    objectives = "helpful,harmless" + ("," + judges if judges else "")
    runs = {}
    for name, pol in policies.items():
        f = out / f"eval-{name}.jsonl"
        generate(GenerateConfig(method="sample", policy=pol, prompts=str(eval_prompts), out=str(f), n=4,
                                objectives=objectives, normalize="none", max_new_tokens=args.max_tokens,
                                seed=args.seed, batch_size=8))  # fmt: skip
        runs[name] = read_records(str(f))

    # z-score every signal on the base policy's samples (proxy: shipped stats would do too; one rule for all)
    names = list(runs["base"][0]["scores"])
    base = np.array([[r["scores"][n] for n in names] for r in runs["base"]])
    mu, sd = base.mean(0), base.std(0)
    label = {names[0]: "proxy helpful", names[1]: "proxy harmless"}
    for n in names[2:]:
        label[n] = "judge helpful" if "helpful" in n else "judge harmless"

    table, objective = {}, {}
    for name, recs in runs.items():
        by_prompt: dict[str, list] = {}
        for r in sorted(recs, key=lambda r: r["prompt_id"]):  # the same prompt order in every run (pairing)
            by_prompt.setdefault(r["prompt_id"], []).append(r)
        rows = {"sample": [], "bon4-helpful": [], "bon4-harmless": []}
        words = {k: [] for k in rows}
        for group in by_prompt.values():
            z = (np.array([[r["scores"][n] for n in names] for r in group]) - mu) / sd
            w = np.array([len(r["response"].split()) for r in group], dtype=float)
            rows["sample"].append(z.mean(0))
            words["sample"].append(w.mean())
            for key, col in (("bon4-helpful", 0), ("bon4-harmless", 1)):
                j = int(np.argmax(z[:, col]))  # best-of-4 by that criterion's own (proxy) reward
                rows[key].append(z[j])
                words[key].append(w[j])
        # IAMA's objective with the sum, per prompt: mean over criteria of best-of-4's value on that
        # criterion (proxy: the criteria themselves; judge: the matching judge on the same selections)
        bh, bs = np.array(rows["bon4-helpful"]), np.array(rows["bon4-harmless"])
        jh = next((i for i, n in enumerate(names) if label[n] == "judge helpful"), None)
        js = next((i for i, n in enumerate(names) if label[n] == "judge harmless"), None)
        objective[name] = {"proxy": (bh[:, 0] + bs[:, 1]) / 2}
        if jh is not None and js is not None:
            objective[name]["judge"] = (bh[:, jh] + bs[:, js]) / 2
        table[name] = {
            k: {**{label[n]: ci(np.mean, np.array(v)[:, i], seed=args.seed) for i, n in enumerate(names)},
                "words": float(np.mean(words[k])), "prompts": len(v)}
            for k, v in rows.items()
        }  # fmt: skip

    paired = {}
    for a, b in (("iama-sum", "grpo"), ("iama-min", "grpo"), ("iama-sum", "base"), ("iama-min", "base"),
                 ("grpo", "base")):  # fmt: skip
        paired[f"{a} - {b}"] = {
            k: ci(np.mean, objective[a][k] - objective[b][k], seed=args.seed) for k in objective[a]
        }
    objective_ci = {
        n: {k: ci(np.mean, v, seed=args.seed) for k, v in o.items()} for n, o in objective.items()
    }

    lines = ["| policy | selection | " + " | ".join(label[n] for n in names) + " | words |",
             "|---" * (len(names) + 3) + "|"]  # fmt: skip
    for name, sel in table.items():
        for k, v in sel.items():
            cells = [f"{v[label[n]][0]:+.2f} [{v[label[n]][1]:+.2f}, {v[label[n]][2]:+.2f}]" for n in names]
            lines.append(f"| {name} | {k} | " + " | ".join(cells) + f" | {v['words']:.0f} |")
    lines += ["", "Best-of-4 objective (mean over the criteria of best-of-4's value by that criterion's reward):", "",
              "| policy or difference | PROXY | JUDGE |", "|---|---|---|"]  # fmt: skip
    for n, o in list(objective_ci.items()) + list(paired.items()):
        cells = [
            f"{o[k][0]:+.2f} [{o[k][1]:+.2f}, {o[k][2]:+.2f}]" if k in o else "—" for k in ("proxy", "judge")
        ]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    md = "\n".join(lines)
    (RESULTS / f"{tag}.md").write_text(md + "\n")
    print(md)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if judges else 1, figsize=(11 if judges else 6, 4.5), squeeze=False)
    colors = {"base": "0.5", "grpo": "tab:blue", "iama-sum": "tab:red", "iama-min": "tab:orange"}
    kinds = [("proxy", "proxy helpful", "proxy harmless")]
    if judges:
        kinds.append(("judge", "judge helpful", "judge harmless"))
    for ax, (kind, hx, hy) in zip(axes[0], kinds):
        for name, sel in table.items():
            s, bh, bs = sel["sample"], sel["bon4-helpful"], sel["bon4-harmless"]
            ax.scatter(s[hx][0], s[hy][0], marker="o", color=colors[name], alpha=0.5)
            ax.scatter(bh[hx][0], bs[hy][0], marker="*", s=160, color=colors[name], label=name)
            ax.plot([s[hx][0], bh[hx][0]], [s[hy][0], bs[hy][0]], color=colors[name], lw=0.8, alpha=0.5)
        ax.set_xlabel(f"{hx} (z)")
        ax.set_ylabel(f"{hy} (z)")
        ax.set_title(f"{kind.upper()}: o = sampling, * = best-of-4 by each criterion")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_plot(fig, tag)

    def bon(name, crit, kind="proxy"):
        return table[name][f"bon4-{crit}"][f"{kind} {crit}"][0]

    summary = "iama_hh: best-of-4 proxy helpful/harmless " + ", ".join(
        f"{n} {bon(n, 'helpful'):+.2f}/{bon(n, 'harmless'):+.2f}" for n in table
    )
    if judges:
        summary += "; judge " + ", ".join(
            f"{n} {bon(n, 'helpful', 'judge'):+.2f}/{bon(n, 'harmless', 'judge'):+.2f}" for n in table
        )
    write_result(tag, {"args": vars(args), "train": train_info, "table": table, "bon4_objective": objective_ci,
                       "paired": paired,
                             "signals": label}, summary + f" ({args.steps} steps, {args.eval_prompts} held-out prompts)")  # fmt: skip


if __name__ == "__main__":
    main()
