"""Wall time of RMOD over CD-Uniform at the same K, B and values, measured in one run (interleaved repeats).

Both methods run the same engine with the same value function (``helpful`` and ``harmless`` scored on the
partial text, z-scored with the shipped statistics); they differ only in the selection rule: fixed uniform
weights versus the worst-case weights solved every block. Same seeds, so both sample comparable amounts.

    python benchmarks/rmod_overhead.py [--prompts 8] [--k 8] [--block-size 16] [--max-new-tokens 48]
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

from harness import SHARED_DATA, parser, write_result

from moalign.config import GenerateConfig, for_method
from moalign.data.prompts import load_prompts
from moalign.generate import generate
from moalign.objectives.base import resolve_objectives
from moalign.policies import load_policy


def main() -> None:
    ap = parser(__doc__.splitlines()[0], prompts=8, seed=None, threads=None)  # torch's default threads
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    prompts = load_prompts(str(SHARED_DATA / "hh-harmless-base-test-2000.jsonl.gz"), limit=args.prompts)
    policy = load_policy()
    objectives = resolve_objectives("helpful,harmless")
    base = GenerateConfig(k=args.k, block_size=args.block_size, max_new_tokens=args.max_new_tokens,
                          batch_size=args.prompts, lam=args.lam)  # fmt: skip
    cfgs = {"cd-uniform": for_method(base, "cd"), "rmod": for_method(base, "rmod")}
    times: dict[str, list[float]] = {k: [] for k in cfgs}
    tokens: dict[str, list[int]] = {k: [] for k in cfgs}
    generate(cfgs["cd-uniform"], policy=policy, objectives=objectives, prompts=prompts[:2], progress=False)
    for rep in range(args.repeats):
        for name, cfg in cfgs.items():
            t0 = time.perf_counter()
            recs = generate(replace(cfg, seed=rep), policy=policy, objectives=objectives, prompts=prompts,
                            progress=False)  # fmt: skip
            times[name].append(time.perf_counter() - t0)
            tokens[name].append(sum(r["n_tokens"] for r in recs))
    med = {k: statistics.median(v) for k, v in times.items()}
    # per generated token, since the two rules may pick candidates that end at different lengths
    per_tok = {k: sum(times[k]) / max(1, sum(tokens[k])) for k in cfgs}
    ratio = med["rmod"] / med["cd-uniform"]
    ratio_tok = per_tok["rmod"] / per_tok["cd-uniform"]
    summary = (f"rmod_overhead: RMOD/CD-Uniform wall time = {ratio:.3f} (per token {ratio_tok:.3f}; "
               f"target <= 1.03; paper ~1.045)")  # fmt: skip
    write_result("rmod_overhead", {"config": vars(args), "seconds": times, "tokens": tokens,
                                   "ratio_wall": ratio, "ratio_per_token": ratio_tok}, summary)  # fmt: skip


if __name__ == "__main__":
    main()
