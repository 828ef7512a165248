"""Held-out value error of CD-FUDGE value heads per prefix length, against the constant (mean) baseline.

    python benchmarks/value_heads.py --objectives helpful,harmless --n-prompts 32 --output-dir runs/value_heads

Trains heads with ``moalign train values`` settings (any TrainValuesConfig field as ``--field value``),
prints the table (MSE in z-score units of the training samples; ``all`` weighs responses equally, ``final``
is the complete response) and the time a decode-time value call takes for K candidates of P prompts.
"""

from __future__ import annotations

import json
import time

import torch
from harness import parser, write_result

from moalign.cli import add_dataclass_flags, config_from_args
from moalign.decoding.value_heads import load_value_function
from moalign.training.values import TrainValuesConfig, format_report, train_values


def main() -> None:
    ap = parser(__doc__.splitlines()[0], seed=None, threads=None)  # TrainValuesConfig's own flags (--seed among them)
    add_dataclass_flags(ap, TrainValuesConfig)
    args = ap.parse_args()
    cfg = config_from_args(TrainValuesConfig, args, output_dir="runs/value_heads")
    res = train_values(cfg)
    print(json.dumps({k: res[k] for k in ("data", "fit", "seconds")}, default=str))
    print(f"held-out value error, policy {cfg.policy}, objectives {cfg.objectives}, head {cfg.head}:")
    print(format_report(res["heldout"]))

    # decode-time cost of the heads. "hook": the engine returns the last hidden state of every candidate with its
    # block (hidden=True, what `moalign generate --values PATH` does), the heads are a matmul on it;
    # "forward": no hook, one extra forward pass over prompt + candidates per block. Both against decoding with
    # no value call at all; interleaved repeats, same seeds (same tokens: the selector always keeps candidate 0).
    from moalign.data.prompts import to_prompt
    from moalign.decoding.backend import Selection
    from moalign.decoding.in_process import TransformersBackend
    from moalign.policies import load_policy

    policy = load_policy(cfg.policy)
    vf = load_value_function(cfg.output_dir, policy)
    prompts = [to_prompt(q) for q in ("How do I bake bread?", "Tell me a joke.", "Why is the sky blue?", "Hi!")]
    eng = TransformersBackend(policy)
    engines = {"none": False, "hook": True, "forward": False}  # mode -> the decode returns hidden states
    walls: dict[str, list[float]] = {m: [] for m in engines}
    calls: dict[str, list[float]] = {m: [] for m in engines}

    for rep in range(4):
        for mode, hidden in engines.items():

            def selector(step, mode=mode):
                if mode != "none":
                    t0 = time.perf_counter()
                    vf(step)
                    calls[mode].append(time.perf_counter() - t0)
                return Selection(torch.zeros(len(step.prompts), dtype=torch.long))

            t0 = time.perf_counter()
            eng.decode(prompts, k=4, block_size=16, max_new_tokens=64, selector=selector, seed=rep, hidden=hidden)
            if rep > 0:  # first round is warm-up
                walls[mode].append(time.perf_counter() - t0)
    total = {m: sum(v) for m, v in walls.items()}
    ratio = {m: total[m] / total["none"] for m in engines}
    print(f"P=4, K=4, B=16, 64 tokens: decode time with heads / without: hook {ratio['hook']:.3f}, "
          f"extra forward {ratio['forward']:.3f}")  # fmt: skip
    fin = res["heldout"]["final"]
    summary = (
        "value_heads: held-out MSE / constant baseline on complete responses: "
        + ", ".join(f"{g} {fin['mse'][g] / fin['baseline_mse'][g]:.3f}" for g in fin['mse'])
        + f"; decode time with heads / without: {ratio['hook']:.3f} (hidden-state hook), "
        + f"{ratio['forward']:.3f} (extra forward pass)"
    )
    write_result("value_heads", {"config": vars(args), "heldout": res["heldout"], "fit": res["fit"],
                                 "data": res["data"], "train_seconds": res["seconds"],
                                 "decode": {"wall_s": walls, "value_call_s": calls,
                                                                            "ratio_vs_no_values": ratio}}, summary)  # fmt: skip


if __name__ == "__main__":
    main()
