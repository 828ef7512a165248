"""Benchmark (not a test): step time and peak memory of each gradient combiner relative to ``linear``.

One process, one policy (default: the bundled SmolLM2-135M-Instruct with a LoRA adapter), the SAME batches
for every combiner: for each measured step the batch is fixed and every combiner runs one full
``MODPOTrainer.training_step`` (K per-objective forward/backward passes, Gram matrix, min-norm solve, writing
``d`` into ``.grad``) plus clipping and an SGD step with learning rate 0 (so the weights -- and therefore the
work -- are identical for every combiner). Combiners are interleaved within each step, in a rotating order,
so machine-load drift hits all of them alike; the figure is the median over measured steps.

Baselines: ``linear`` (per-objective gradients, like every other combiner: gives gradient norms/cosines) and
``linear-fused`` (one backward pass of ``sum_k w_k L_k``: what a plain DPO trainer on mixed data costs).
Reference log-probs are precomputed (shared by all combiners), so timing covers only the policy's work and
the ratios are the strictest.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the step. On CPU the allocator caches
memory, so a per-step resident-set peak (sampled every 2 ms by a thread) only shows growth for the first
variant; the table therefore also gives the exact gradient memory each variant holds: K per-objective
gradient buffers of the trainable parameters (``linear-fused``: one ``.grad``), activations being the same
for every combiner (each objective's graph is freed after its backward pass).

    python benchmarks/combiner_step_time.py --ks 2 4 --steps 5 --max-length 96
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from pathlib import Path

import torch
from harness import ROOT, SHARED_DATA, environment, parser, start

from moalign.data.pairs import load_pairs, split_pairs
from moalign.training.dpo import MultiObjectiveDPOConfig, build_trainer
from moalign.training.mo_data import tokenize_pair

DATA = SHARED_DATA
SOURCES = {
    "helpful": "hh-helpful-base-test.jsonl.gz",
    "harmless": "hh-harmless-base-test-2000.jsonl.gz",
    "helpful_rs": "hh-helpful-rejection-sampled-test.jsonl.gz",
    "safety": "pku-saferlhf-safer-5k.json.gz",
}
VARIANTS = ["linear-fused", "linear", "mgda", "mgda-normalized", "mgda-decoupled", "groupdro", "pcgrad"]


class RSSPeak:
    """Peak resident set size (bytes) between start() and stop(), sampled by a thread."""

    def __init__(self, every: float = 0.002):
        self.every = every
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def start(self):
        self.base = self.peak = self.rss()
        self.running = True
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every)

    def stop(self) -> int:
        self.running = False
        self.t.join()
        self.peak = max(self.peak, self.rss())
        return self.peak - self.base


def main() -> None:
    ap = parser(__doc__.split("\n")[0], seed=None, threads=1)
    ap.add_argument("--policy", default="smollm2-135m-instruct")
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, default=5, help="measured steps (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=1, help="pairs per objective")
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--max-prompt-length", type=int, default=48)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "combiner_step_time.json"))
    args = start(ap.parse_args())

    from moalign.policies import load_policy

    pol = load_policy(args.policy)
    tok = pol.tokenizer
    n_pairs = (args.steps + 1) * args.batch
    all_data = {}
    for name, f in SOURCES.items():
        train, _ = split_pairs(load_pairs(str(DATA / f)))
        all_data[name] = (train[:n_pairs], [])

    results: dict = {
        "config": vars(args),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "k": {},
    }
    for k in args.ks:
        names = list(SOURCES)[:k]
        data = {n: all_data[n] for n in names}
        toks = {
            n: [tokenize_pair(tok, p, args.max_length, args.max_prompt_length) for p in tr]
            for n, (tr, _) in data.items()
        }
        trainers, model = {}, None
        for v in VARIANTS:
            cfg = MultiObjectiveDPOConfig(
                objective=[f"{n}=unused" for n in names], combiner=v.replace("-fused", ""), output_dir=f"/tmp/cst-{k}-{v}",
                per_device_train_batch_size=args.batch, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                optim="sgd", learning_rate=1e-30, lr_scheduler_type="constant", per_objective_grads=(v != "linear-fused"),
                precompute_ref_log_probs=True, device=args.device if args.device == "cpu" else None, report_to=["none"],
            )  # fmt: skip
            if model is None:  # one LoRA model shared by every variant: identical weights and work
                run = build_trainer(
                    cfg, model=pol.model, tokenizer=tok, data=data, tokenized=toks
                )  # fills refs
                model = run.model
            else:
                cfg.use_lora = False  # already wrapped
                run = build_trainer(cfg, model=model, tokenizer=tok, data=data, tokenized=toks)
            tr = run.trainer
            tr.create_optimizer_and_scheduler(num_training_steps=args.steps + 1)
            for g in tr.optimizer.param_groups:
                g["lr"] = 0.0
            tr.current_gradient_accumulation_steps = 1
            tr.combiner_log = None
            tr.combine_seconds = []
            if v != "linear-fused":  # time the combiner's own work: Gram matrix, solve, writing d into .grad
                orig = tr._apply_combination

                def timed(params, _orig=orig, _tr=tr):
                    t = time.perf_counter()
                    _orig(params)
                    _tr.combine_seconds.append(time.perf_counter() - t)

                tr._apply_combination = timed
            trainers[v] = tr
        loader = trainers["linear"].get_train_dataloader()
        batches = [b for _, b in zip(range(args.steps + 1), loader)]
        times = {v: [] for v in VARIANTS}
        mem = {v: [] for v in VARIANTS}
        grad_copies = {}
        model.to(args.device)
        for s, batch in enumerate(batches):
            order = VARIANTS[s % len(VARIANTS) :] + VARIANTS[: s % len(VARIANTS)]
            for v in order:
                tr = trainers[v]
                model.zero_grad(set_to_none=True)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                else:
                    probe = RSSPeak()
                    probe.start()
                t0 = time.perf_counter()
                tr.training_step(model, batch)
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                tr.optimizer.step()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                peak = (
                    torch.cuda.max_memory_allocated() - base
                    if args.device.startswith("cuda")
                    else probe.stop()
                )
                if s > 0:  # step 0 is warm-up
                    times[v].append(dt)
                    mem[v].append(peak)
                if tr.last_stats is not None:
                    grad_copies[v] = len(tr.last_stats.get("alpha", []))
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        med = {v: statistics.median(times[v]) for v in VARIANTS}
        res = {
            "objectives": names,
            "trainable_params": n_train,
            "gradient_buffer_mb_per_objective": n_train * 4 / 2**20,
            "median_step_s": med,
            "all_step_s": times,
            "ratio_vs_linear": {v: med[v] / med["linear"] for v in VARIANTS},
            "ratio_vs_linear_fused": {v: med[v] / med["linear-fused"] for v in VARIANTS},
            # combine step (Gram + solve + write .grad), median over measured steps: far less noisy than the
            # whole step on a loaded machine; ratio_from_overhead = (linear step + extra combine time) / linear
            "median_combine_s": {
                v: statistics.median(trainers[v].combine_seconds[1:]) for v in VARIANTS if v != "linear-fused"
            },
            "peak_mem_increase_mb": {v: max(mem[v]) / 2**20 for v in VARIANTS},
            "gradient_memory_mb": {
                v: (1 if v == "linear-fused" else k) * n_train * 4 / 2**20 for v in VARIANTS
            },
        }
        cmb = res["median_combine_s"]
        res["ratio_from_overhead"] = {
            v: (med["linear"] + cmb[v] - cmb["linear"]) / med["linear"]
            for v in VARIANTS
            if v != "linear-fused"
        }
        results["k"][str(k)] = res
        print(
            f"K={k}: " + ", ".join(f"{v} {med[v]:.2f}s ({res['ratio_vs_linear'][v]:.3f}x)" for v in VARIANTS),
            flush=True,
        )
        model = model.unload() if hasattr(model, "unload") else model
        pol.model = model
    ratios = "; ".join(
        f"K={k}: mgda-decoupled {r['ratio_vs_linear']['mgda-decoupled']:.3f}x linear "
        f"(worst combiner {max(r['ratio_vs_linear'][v] for v in VARIANTS if v != 'linear-fused'):.3f}x)"
        for k, r in results["k"].items()
    )
    results["summary"] = f"combiner_step_time: {ratios}; target mgda-decoupled <= 1.15x linear"
    results["environment"] = {**environment(), "load_average_1min": os.getloadavg()[0]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    md = [
        "| K | combiner | median step (s) | x linear | x linear-fused | combine step (ms) | x linear from combine "
        "overhead | gradient memory (MB) | peak mem increase (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in results["k"].items():
        for v in VARIANTS:
            md.append(
                f"| {k} | {v} | {r['median_step_s'][v]:.3f} | {r['ratio_vs_linear'][v]:.3f} | "
                f"{r['ratio_vs_linear_fused'][v]:.3f} | "
                + (
                    f"{1e3 * r['median_combine_s'][v]:.1f} | {r['ratio_from_overhead'][v]:.4f} | "
                    if v in r["median_combine_s"]
                    else "- | - | "
                )
                + f"{r['gradient_memory_mb'][v]:.1f} | "
                f"{r['peak_mem_increase_mb'][v]:.1f} |"
            )
    Path(args.out).with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(results["summary"])


if __name__ == "__main__":
    main()
