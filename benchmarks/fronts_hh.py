"""Pareto fronts on held-out HH prompts: best-of-8 and CD K=8 swept over 5 preference weights, plain sampling
and RMOD K=8 as points; proxy (the shipped helpful/harmless) and judges (judge_helpful, judge_harmless, never
optimised) side by side, with hypervolume intervals and paired differences (``moalign front``).

Prompts: ``--prompts`` held-out HH prompts, helpful-base and harmless-base halves, after those rmod_hh.py and
rmod_200.py used (``--offset``). 48 new tokens, B=16, seed 0. Resumable.

With ``--trained DIR`` the trained policies of ``iama_kl.py --task hh`` (each arm's ``--step`` checkpoint in DIR)
join as points (plain samples, ``moalign front --trained``), on the same prompts and runs; the results are then
``fronts_hh_trained.*`` (the reference point moves with the points, so the decoding-only table stays apart).

    python benchmarks/fronts_hh.py [--prompts 64]
    python benchmarks/fronts_hh.py --trained benchmarks/results/iama_kl_hh --step 24
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from _common import RESULTS, SHARED_DATA, write_result
from _tasks import heldout_prompts
from harness import parser, start

OUT = RESULTS / "fronts_hh"  # runs (gitignored)


def main() -> None:
    ap = parser(__doc__.splitlines()[0], prompts=64, out_dir=OUT, batch_size=8)
    ap.add_argument("--offset", type=int, default=132, help="held-out prompts skipped per source")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--trained", default=None, help="iama_kl.py --task hh's runs folder: its arms join as points")
    ap.add_argument("--step", type=int, default=24, help="the trained arms' checkpoint")
    args = start(ap.parse_args())
    from moalign.config import FrontConfig
    from moalign.evaluation import ensure_judges, judge_specs
    from moalign.front import front, front_table

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts_file = out / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"messages": list(p.messages), "id": p.id}) + "\n"
                                    for p in heldout_prompts(args.prompts, offset=args.offset)))  # fmt: skip
    judges = ",".join(judge_specs(ensure_judges(RESULTS / "judges", SHARED_DATA)))
    trained, name = "", "fronts_hh"
    if args.trained:
        arms = [d for d in ("iama", "grpo-batch", "grpo-group", "gdpo") if (Path(args.trained) / d).is_dir()]
        trained = ",".join(f"{a}={Path(args.trained) / a / f'checkpoint-{args.step}'}" for a in arms)
        name = "fronts_hh_trained"
    cfg = FrontConfig(objectives="helpful,harmless", prompts=str(prompts_file), weighted="best-of-n,cd",
                      points="sample,rmod", steps=args.steps, n=8, k=8, block_size=16, max_new_tokens=48,
                      batch_size=args.batch_size, seed=args.seed, lam=5.0, judges=judges, out_dir=str(out),
                      trained=trained, n_boot=2000)  # fmt: skip
    res = front(cfg)
    table = front_table(res)
    (RESULTS / f"{name}.md").write_text(table + "\n")
    shutil.copy(out / "front.png", RESULTS / f"{name}.png")
    hv = {space: {m: f["hypervolume"] for m, f in s["methods"].items()} for space, s in res["spaces"].items()}
    summary = f"{name}: hypervolume " + "; ".join(
        f"{space} " + ", ".join(f"{m} {v[0]:.4f} [{v[1]:.4f}, {v[2]:.4f}]" for m, v in ms.items())
        for space, ms in hv.items())  # fmt: skip
    write_result(name, {"config": vars(args), "result": {k: v for k, v in res.items() if k != "config"}},
                 summary)  # fmt: skip
    print(table)


if __name__ == "__main__":
    main()
