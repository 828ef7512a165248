"""IAMA vs GRPO on two length targets (the paper's first experiment, scaled down to the bundled policy).

Two criteria on the completion's length in policy tokens, ``r_i = -(|len - L_i| / L_max)^2`` with targets
``L_1`` (short) and ``L_2`` (long), both served by best-of-4 at deployment. Plain GRPO on ``(r_1 + r_2) / 2``
is maximised by one length between the targets; IAMA's objective ``(R_1 + R_2) / 2`` with ``R_i`` the
best-of-4 value is maximised by a spread that covers both targets (best-of-4 then finds each). Both runs
use the same prompts (UltraFeedback), seed, LoRA, learning rate and number of steps; the lengths of fresh
samples on held-out prompts (UltraFeedback eval) are compared with the base policy's, as a histogram.

    python benchmarks/iama_length.py --steps 40        # ~30 CPU-minutes at one thread

Writes benchmarks/results/iama_length.{json,png} and prints one summary line. Runs and trained adapters go
to benchmarks/results/iama_length/ (resumes: a finished stage is not redone).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from _tasks import register_length_targets, short_prompts
from harness import RESULTS, SHARED_DATA, parser, save_plot, start, write_result

L_MAX = 32  # the completion cap; set by --max-tokens


def lengths_of(run: Path) -> list[list[int]]:
    """Generated lengths (tokens) per prompt, in file order."""
    from moalign.records import read_records

    groups: dict[str, list[int]] = {}
    for r in read_records(str(run)):
        groups.setdefault(r["prompt_id"], []).append(int(r["n_tokens"]))
    return list(groups.values())


def sample_lengths(
    policy: str, prompts: Path, out: Path, n: int, limit: int, targets, seed: int
) -> list[list[int]]:
    from moalign.config import GenerateConfig
    from moalign.generate import generate

    cfg = GenerateConfig(
        method="sample", policy=policy, prompts=str(prompts), out=str(out), n=n, limit=limit,
        objectives=",".join(f"len{t}" for t in targets), normalize="none", max_new_tokens=L_MAX,
        seed=seed, batch_size=8,
    )  # fmt: skip
    generate(cfg)
    return lengths_of(out)


def summarise(groups: list[list[int]], targets, tol: int, seed: int = 0) -> dict:
    """Per-prompt statistics of the samples, with 95% bootstrap intervals over prompts: the share within
    ``tol`` tokens of each target, best-of-n (the prompt's n samples) on each criterion, their mean (IAMA's
    objective with the sum), and the spread (std) of lengths."""
    L = torch.tensor(groups, dtype=torch.float64)  # [prompts, n]

    def stats(x: torch.Tensor) -> dict:
        out = {f"within_{tol}_of_{t}": float(((x - t).abs() <= tol).double().mean()) for t in targets}
        bon = [(-(((x - t).abs() / L_MAX) ** 2)).max(dim=1).values.mean() for t in targets]
        out.update({f"bon_len{t}": float(b) for t, b in zip(targets, bon)})
        out["bon_mean"] = float(sum(bon) / len(bon))
        out["std"] = float(x.std())
        return out

    from moalign.evaluation import bootstrap_ci  # a vector of statistics, one resampling

    keys = list(stats(L))
    est, low, high = bootstrap_ci(lambda x: np.array([stats(torch.from_numpy(x))[k] for k in keys]), L.numpy(),
                                  n_boot=2000, seed=seed)  # fmt: skip
    res = {k: [float(est[i]), float(low[i]), float(high[i])] for i, k in enumerate(keys)}
    flat = L.flatten()
    res.update({"prompts": len(L), "samples": int(flat.numel()), "mean": float(flat.mean()),
                "hist": torch.histc(flat, bins=16, min=0, max=L_MAX).int().tolist()})  # fmt: skip
    return res


def main() -> None:
    # --out-dir: the runs folder; its name also names the results files (default iama_length)
    ap = parser(
        __doc__.splitlines()[0], out_dir=RESULTS / "iama_length", analyse_only=False, seed=0, threads=1
    )
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--targets", default="4,28", help="two target lengths in tokens")
    ap.add_argument("--max-tokens", type=int, default=32, help="completion cap L_max (tokens)")
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--generations", type=int, default=8, help="group size M")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-prompts", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=4)
    args = start(ap.parse_args())
    tag = Path(args.out_dir).name
    global L_MAX
    L_MAX = args.max_tokens
    targets = [int(x) for x in args.targets.split(",")]
    register_length_targets(targets, l_max=L_MAX)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_prompts = short_prompts(
        SHARED_DATA / "ultrafeedback-binarized-1000.jsonl.gz", out / "train_prompts.jsonl"
    )
    eval_prompts = short_prompts(
        SHARED_DATA / "ultrafeedback-binarized-eval-200.jsonl.gz", out / "eval_prompts.jsonl"
    )

    from moalign.training.grpo import IAMAConfig, train_grpo

    runs = {"base": "smollm2-135m-instruct"}
    train_info = {}
    for name, nonlinear in (("grpo", "off"), ("iama", "on")):
        d = out / name
        if not (d / "iama_run.json").exists():
            from transformers.trainer_utils import get_last_checkpoint

            resume = "last" if d.exists() and get_last_checkpoint(str(d)) else None
            cfg = IAMAConfig(
                output_dir=str(d), prompts=str(train_prompts), limit=args.steps * args.prompts_per_step,
                criterion=[f"len{t}:bon:4" for t in targets], nonlinear=nonlinear, normalize="none",
                num_generations=args.generations, per_device_train_batch_size=args.prompts_per_step * args.generations,
                max_completion_length=L_MAX, max_steps=args.steps, learning_rate=args.lr, use_lora=True,
                lora_r=16, logging_steps=1, save_strategy="steps", save_steps=5, report_to="none",
                seed=args.seed, disable_tqdm=True, temperature=1.0, resume_from_checkpoint=resume,
            )  # fmt: skip
            train_grpo(cfg)
        rec = json.loads((d / "iama_run.json").read_text())
        hist = [h for h in rec["log_history"] if "completions/mean_length" in h]
        train_info[name] = {
            "seconds": rec["result"]["seconds"],
            "mean_length_first5": sum(h["completions/mean_length"] for h in hist[:5]) / max(1, len(hist[:5])),
            "mean_length_last5": sum(h["completions/mean_length"] for h in hist[-5:])
            / max(1, len(hist[-5:])),
            "step_time_mean": sum(h.get("step_time", 0) for h in hist) / max(1, len(hist)),
        }
        runs[name] = str(d)

    results = {}
    for name, pol in runs.items():
        lens = sample_lengths(pol, eval_prompts, out / f"eval-{name}.jsonl", args.eval_samples,
                              args.eval_prompts, targets, args.seed)  # fmt: skip
        results[name] = summarise(lens, targets, tol=8, seed=args.seed)
        results[name]["lengths"] = [x for g in lens for x in g]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = list(range(0, L_MAX + 5, 4))
    for name, color in (("base", "0.6"), ("grpo", "tab:blue"), ("iama", "tab:red")):
        ax.hist(results[name]["lengths"], bins=bins, histtype="step", lw=2, color=color,
                label=f"{name} (mean {results[name]['mean']:.0f})")  # fmt: skip
    for t in targets:
        ax.axvline(t, color="k", ls=":", lw=1)
    ax.set_xlabel(f"completion length (policy tokens; {L_MAX} = cut off)")
    ax.set_ylabel(f"samples ({args.eval_prompts} held-out prompts x {args.eval_samples})")
    ax.set_title(f"length targets {targets}, best-of-4 each; {args.steps} GRPO steps")
    ax.legend()
    fig.tight_layout()
    png = save_plot(fig, tag)

    def frac(name, L):
        return results[name][f"within_8_of_{L}"][0]

    def bon(name):
        return results[name]["bon_mean"][0]

    summary = (
        f"iama_length: within 8 tokens of {targets[0]}/{targets[1]}: base {frac('base', targets[0]):.2f}/"
        f"{frac('base', targets[1]):.2f}, GRPO {frac('grpo', targets[0]):.2f}/{frac('grpo', targets[1]):.2f}, "
        f"IAMA {frac('iama', targets[0]):.2f}/{frac('iama', targets[1]):.2f}; best-of-{args.eval_samples} mean "
        f"reward base {bon('base'):.3f}, GRPO {bon('grpo'):.3f}, IAMA {bon('iama'):.3f} ({args.steps} steps; "
        f"plot {png.name})"
    )
    write_result(tag, {"args": vars(args), "train": train_info, "eval": results}, summary)


if __name__ == "__main__":
    main()
