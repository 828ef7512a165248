"""Scoring time of a decoder reward model, incremental against a full re-encode, for CD and RMOD.

The reward model has the policy's size: a two-output sequence-classification head (random, seeded) on the
bundled SmolLM2-135M-Instruct's own weights, its objectives ``rm@0`` and ``rm@1`` (one model, read once per pair).
CD-Uniform and RMOD with K=8, B=16 at 128 and 256 new tokens decode the same held-out HH prompts twice: with the
reward model scoring incrementally (each candidate reads only what is new since its parent) and with a full
re-encode of prompt + response for every candidate at every block. Reported from one run: the seconds spent in
scoring (the records' ``scorer_seconds``), the scorer tokens and FLOPs, the whole run's wall time, and whether the
two runs wrote the same responses.

    python benchmarks/incremental_scoring.py [--prompts 4] [--lengths 128,256]
"""

from __future__ import annotations

import time

import torch
from harness import SHARED_DATA, parser, start, write_result

from moalign.config import GenerateConfig, for_method
from moalign.data.prompts import load_prompts
from moalign.generate import generate
from moalign.objectives.reward_model import RewardModelObjective
from moalign.policies import load_policy


def policy_sized_reward_model(policy, incremental: bool, seed: int = 0) -> list[RewardModelObjective]:
    """``rm@0`` and ``rm@1``: a 2-output score head (seeded) on the policy's own transformer."""
    from transformers import LlamaForSequenceClassification

    cfg = policy.model.config.__class__.from_dict({**policy.model.config.to_dict(), "num_labels": 2,
                                                   "pad_token_id": policy.tokenizer.pad_token_id})  # fmt: skip
    torch.manual_seed(seed)
    rm = LlamaForSequenceClassification(cfg).eval()
    rm.model.load_state_dict(policy.model.model.state_dict())
    return [RewardModelObjective(rm, policy.tokenizer, index=i, name=f"rm@{i}", source="smollm2-135m-rm",
                                 incremental=incremental) for i in (0, 1)]  # fmt: skip


def main() -> None:
    ap = parser(__doc__.splitlines()[0], prompts=4)
    ap.add_argument("--lengths", default="128,256")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=16)
    args = start(ap.parse_args())
    lengths = [int(x) for x in args.lengths.split(",")]
    prompts = load_prompts(str(SHARED_DATA / "hh-harmless-base-test-2000.jsonl.gz"), limit=args.prompts)
    policy = load_policy()
    objectives = {mode: policy_sized_reward_model(policy, mode == "incremental") for mode in ("incremental", "re-encode")}
    base = GenerateConfig(k=args.k, block_size=args.block_size, batch_size=args.prompts, normalize="none",
                          seed=args.seed, lam=0.5)  # fmt: skip
    rows = {}
    for T in lengths:
        for method in ("cd", "rmod"):
            cfg = for_method(base, method, max_new_tokens=T)
            got = {}
            for mode, objs in objectives.items():
                t0 = time.perf_counter()
                recs = generate(cfg, policy=policy, objectives=objs, prompts=prompts, progress=False)
                got[mode] = {"wall": time.perf_counter() - t0,
                             "scorer_seconds": sum(r["scorer_seconds"] for r in recs),
                             "policy_seconds": sum(r["policy_seconds"] for r in recs),
                             "scorer_tokens": sum(r["scorer_tokens"] for r in recs),
                             "scorer_flops": sum(r["scorer_flops"] for r in recs),
                             "responses": [r["response"] for r in recs]}  # fmt: skip
            inc, full = got["incremental"], got["re-encode"]
            rows[f"{method}-T{T}"] = {
                "scoring_time_ratio": full["scorer_seconds"] / inc["scorer_seconds"],
                "scorer_token_ratio": full["scorer_tokens"] / inc["scorer_tokens"],
                "wall_ratio": full["wall"] / inc["wall"],
                "same_responses": inc["responses"] == full["responses"],
                **{mode: {k: v for k, v in g.items() if k != "responses"} for mode, g in got.items()},
            }
            r = rows[f"{method}-T{T}"]
            print(f"{method} T={T}: scoring {r['scoring_time_ratio']:.2f}x less time, {r['scorer_token_ratio']:.2f}x "
                  f"fewer tokens, whole run {r['wall_ratio']:.2f}x, same responses {r['same_responses']}", flush=True)
    summary = "incremental_scoring: re-encode / incremental scoring time " + ", ".join(
        f"{k} {v['scoring_time_ratio']:.2f}x (tokens {v['scorer_token_ratio']:.1f}x, same records {v['same_responses']})"
        for k, v in rows.items())  # fmt: skip
    write_result("incremental_scoring", {"config": vars(args), "rows": rows}, summary)


if __name__ == "__main__":
    main()
