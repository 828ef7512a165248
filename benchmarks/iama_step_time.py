"""Step time and peak memory of non-linear GRPO (IAMA) over plain GRPO on the same batches (issue 9, item 6).

Each variant runs in its own process (so peak RSS is its own), from the same seed, policy and prompts, so the
first step's batch is identical; the variants alternate (on, off, on, off, ...) so that load on a shared
machine hits both alike. Per step: TRL's ``step_time``, and the time spent in ``_calculate_rewards`` (where
the only difference lies: the transform runs after the objectives). Target: median step time ratio <= 1.05.

    python benchmarks/iama_step_time.py --rounds 2 --steps 4

Writes benchmarks/results/iama_step_time.json and prints one summary line.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import SHARED_DATA, parser, start, write_result


def worker(args) -> None:
    start(args)
    from moalign.training.grpo import IAMAConfig, IAMATrainer, train_grpo

    spent: list[float] = []
    original = IAMATrainer._calculate_rewards

    def timed(self, *a, **k):
        t0 = time.perf_counter()
        out = original(self, *a, **k)
        spent.append(time.perf_counter() - t0)
        return out

    IAMATrainer._calculate_rewards = timed
    cfg = IAMAConfig(
        output_dir=args.out, prompts=str(SHARED_DATA / "hh-helpful-base-test.jsonl.gz"), skip_invalid=True,
        limit=args.steps, criterion=["helpful:bon:4", "harmless:bon:4"], nonlinear=args.variant,
        num_generations=8, per_device_train_batch_size=8, max_completion_length=args.max_tokens,
        max_steps=args.steps, use_lora=True, lora_r=16, learning_rate=5e-4, logging_steps=1, save_strategy="no",
        report_to="none", seed=0, disable_tqdm=True,
    )  # fmt: skip
    train_grpo(cfg)
    hist = json.loads(Path(args.out, "iama_run.json").read_text())["log_history"]
    steps = [h["step_time"] for h in hist if "step_time" in h]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"step_time": steps, "rewards_time": spent, "peak_rss_mb": peak_mb}))


def main() -> None:
    ap = parser(__doc__.splitlines()[0], seed=None, threads=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--variant", choices=["on", "off"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return worker(args)
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for r in range(args.rounds):
        for v in ("on", "off"):
            out = Path("/tmp") / f"iama_step_time_{v}_{r}"
            cmd = [sys.executable, __file__, "--variant", v, "--out", str(out), "--steps", str(args.steps),
                   "--max-tokens", str(args.max_tokens), "--threads", str(args.threads)]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[v].append(json.loads(res.stdout.strip().splitlines()[-1]))

    def med(v, key):
        return statistics.median(x for run in runs[v] for x in run[key])

    # the transform alone, at this run's shape (1 prompt x 8 completions x 2 criteria), for scale
    import torch

    from moalign.training.nonlinear import nonlinear_rewards

    r = torch.randn(1, 8, 2, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for _ in range(1000):
        nonlinear_rewards(r, ["helpful:bon:4", "harmless:bon:4"], "sum")
    transform_ms = (time.perf_counter() - t0)  # seconds per 1000 calls = ms per call

    ratio = med("on", "step_time") / med("off", "step_time")
    reward_extra = med("on", "rewards_time") - med("off", "rewards_time")
    peak = {v: max(run["peak_rss_mb"] for run in runs[v]) for v in runs}
    summary = (
        f"iama_step_time: non-linear/plain GRPO median step time = {ratio:.3f} (target <= 1.05); the transform "
        f"itself takes {transform_ms:.2f} ms per call ({transform_ms / 1000 / med('off', 'step_time') * 100:.3f}% of a "
        f"step; reward time on - off = {reward_extra * 1000:.0f} ms, noise); peak RSS {peak['on']:.0f} vs "
        f"{peak['off']:.0f} MB"
    )
    write_result("iama_step_time", {"args": vars(args), "runs": runs, "ratio": ratio,
                                    "reward_time_difference_s": reward_extra,
                                    "transform_ms_per_call": transform_ms, "peak_rss_mb": peak}, summary)  # fmt: skip


if __name__ == "__main__":
    main()
