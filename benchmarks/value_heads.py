"""Held-out value error of CD-FUDGE value heads per prefix length, against the constant (mean) baseline.

    python benchmarks/value_heads.py --objectives helpful,harmless --n-prompts 32 --out runs/value_heads

Trains heads with ``moalign train values`` settings (any TrainValuesConfig field as ``--field value``),
prints the table (MSE in z-score units of the training samples; ``all`` weighs responses equally, ``final``
is the complete response) and the time a decode-time value call takes for K candidates of P prompts.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from moalign.cli import add_dataclass_flags, config_from_args
from moalign.decoding.value_heads import TrainValuesConfig, format_report, load_value_function, train_values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(parser, TrainValuesConfig)
    args = parser.parse_args()
    cfg = config_from_args(TrainValuesConfig, args, out="runs/value_heads")
    res = train_values(cfg)
    print(json.dumps({k: res[k] for k in ("data", "fit", "seconds")}, default=str))
    print(f"held-out value error, policy {cfg.policy}, objectives {cfg.objectives}, head {cfg.head}:")
    print(format_report(res["heldout"]))

    # decode-time cost of one value call (one forward pass over prompt + candidates, no engine hook)
    from moalign.data.prompts import to_prompt
    from moalign.decoding.engine import BlockwiseEngine, Selection
    from moalign.policies import load_policy

    policy = load_policy(cfg.policy)
    vf = load_value_function(cfg.out, policy)
    eng = BlockwiseEngine(policy)
    times = []

    def selector(step):
        t0 = time.perf_counter()
        vf(step)
        times.append(time.perf_counter() - t0)
        return Selection(torch.zeros(len(step.prompts), dtype=torch.long))

    prompts = [to_prompt(q) for q in ("How do I bake bread?", "Tell me a joke.", "Why is the sky blue?", "Hi!")]
    t0 = time.perf_counter()
    eng.decode(prompts, k=4, block_size=16, max_new_tokens=64, selector=selector, seed=0)
    total = time.perf_counter() - t0
    print(f"P=4, K=4, B=16, 64 tokens: {len(times)} value calls, {sum(times):.2f}s of {total:.2f}s decoding")


if __name__ == "__main__":
    main()
