"""The IAMA length experiment's trained policies in objective space beside the decoding methods: best-of-4 and
CD (K=4, B=8) swept over 3 weights of the two length targets (len4, len28), plain sampling of the base policy,
and plain sampling (4 per prompt) of each arm's 24-step policy (``moalign front --trained``), on the held-out
prompts of ``iama_kl.py --task length``. The criteria are exact functions of length, so there is no judge space.

    python benchmarks/iama_kl.py --task length ...   # first: the trained arms
    python benchmarks/fronts_length.py

Writes benchmarks/results/fronts_length.{md,json} and fronts_length.png.
"""

from __future__ import annotations

import shutil

from _tasks import register_length_targets
from harness import RESULTS, parser, start, write_result

RUNS = RESULTS / "iama_kl_length"
ARMS = ("iama", "grpo-batch", "grpo-group", "gdpo")


def main() -> None:
    ap = parser(__doc__.splitlines()[0], out_dir=RESULTS / "fronts_length", seed=0, threads=2)
    ap.add_argument("--step", type=int, default=24, help="the trained arms' checkpoint")
    args = start(ap.parse_args())
    from moalign.config import FrontConfig
    from moalign.front import front, front_table

    register_length_targets((4, 28), l_max=32)
    trained = ",".join(f"{arm}={RUNS / arm / f'checkpoint-{args.step}'}" for arm in ARMS)
    cfg = FrontConfig(objectives="len4,len28", prompts=str(RUNS / "eval_prompts.jsonl"), weighted="best-of-n,cd",
                      points="sample", trained=trained, steps=2, n=4, k=4, block_size=8, max_new_tokens=32,
                      normalize="none", batch_size=8, seed=args.seed, out_dir=str(args.out_dir), n_boot=2000)  # fmt: skip
    res = front(cfg)
    table = front_table(res)
    (RESULTS / "fronts_length.md").write_text(table + "\n")
    shutil.copy(f"{args.out_dir}/front.png", RESULTS / "fronts_length.png")
    hv = {m: f["hypervolume"] for m, f in res["spaces"]["proxy"]["methods"].items()}
    summary = "fronts_length: hypervolume " + ", ".join(
        f"{m} {v[0]:.4f} [{v[1]:.4f}, {v[2]:.4f}]" for m, v in hv.items()
    )
    write_result("fronts_length", {"config": vars(args), "result": {k: v for k, v in res.items() if k != "config"}},
                 summary)  # fmt: skip
    print(table)


if __name__ == "__main__":
    main()
