"""Darwin's mutation operator on the bundled policy: how many usable rewrites it gives per instruction.

Runs only the mutation step (no beams) on the first turn of every MT-Bench and Vicuna question, in both modes:
``one`` (the default: few-shot request for one rewrite, ``--mutation-oversample`` x n sampled replies, the
first n usable kept, :func:`moalign.decoding.darwin.parse_rewrite`) and ``list`` (one numbered-list reply, the
earlier operator). Reports per mode: usable rewrites per prompt (the share of the n slots filled, mean over
prompts, 95% bootstrap CI), the share of prompts with all n, the verdicts of the replies, the policy tokens per
prompt and the seconds. Writes ``benchmarks/results/darwin_mutation.{json,md}`` and, for a hand check of the
rule, ``darwin_mutation_sample.md``: 50 random replies of ``one`` mode with the rule's verdict.

    python benchmarks/darwin_mutation.py [--per-source 80] [--mutations 5]
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import numpy as np
from harness import RESULTS, SHARED_DATA, ci, parser, start, write_result

from moalign.config import GenerateConfig
from moalign.data.prompts import load_prompts
from moalign.decoding.darwin import DarwinDecoder
from moalign.decoding.in_process import TransformersBackend
from moalign.decoding.registry import MethodContext
from moalign.decoding.values import ObjectiveScorer
from moalign.objectives.base import CallableObjective
from moalign.policies import load_policy


def main() -> None:
    ap = parser(__doc__.splitlines()[0], seed=0, threads=2)
    ap.add_argument("--per-source", type=int, default=80)
    ap.add_argument("--offset", type=int, default=0, help="questions skipped per source (unseen prompts for a hand check)")
    ap.add_argument("--mutations", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--modes", default="one,list", help="mutation modes to measure")
    ap.add_argument("--sample-seed", type=int, default=0, help="seed of the 50 replies drawn for the hand check")
    ap.add_argument("--oversample", type=int, default=None, help="--mutation-oversample (default: the library's)")
    ap.add_argument("--min-similarity", type=float, default=None,
                    help="--mutation-min-similarity, the drift check (default: the library's; 0: off)")
    ap.add_argument("--out-name", default="darwin_mutation", help="results file names (RESULTS/<name>{.json,.md,_sample.*})")
    args = start(ap.parse_args())
    lim, off = args.offset + args.per_source, args.offset
    prompts = (load_prompts(str(SHARED_DATA / "mt-bench-questions.jsonl"), limit=lim)[off:]
               + load_prompts(str(SHARED_DATA / "vicuna-bench-questions.jsonl"), limit=lim)[off:])  # fmt: skip
    policy = load_policy()
    backend = TransformersBackend(policy)
    scorer = ObjectiveScorer([CallableObjective("none", lambda p, r: [0.0] * len(p))])
    out: dict = {}
    replies_one: list[tuple[str, str, str, float | None]] = []
    beams_one: list[tuple[str, str, bool]] = []  # (instruction, the slot's instruction, a rewrite or the fallback)
    for mode in args.modes.split(","):
        extra = {} if args.oversample is None else {"mutation_oversample": args.oversample}
        if args.min_similarity is not None:
            extra["mutation_min_similarity"] = args.min_similarity
        cfg = GenerateConfig(method="darwin", mutations=args.mutations, mutation_mode=mode, normalize="none", **extra)
        decoder = DarwinDecoder(MethodContext(cfg, policy, backend, scorer), cfg.method_args(), mutate=True,
                                replace=True)  # fmt: skip
        shares, tokens, scorer_tokens, verdicts = [], [], [], Counter()
        t0 = time.perf_counter()
        for first in range(0, len(prompts), args.batch):
            batch = prompts[first : first + args.batch]
            instr, info, _ = decoder._mutate(batch, seed=args.seed + first)
            for p, i, slots in zip(batch, info, instr):
                shares.append(i["parsed"] / args.mutations)
                tokens.append(i["policy_tokens"])
                scorer_tokens.append(i.get("scorer_tokens", 0))
                if mode == "one":
                    verdicts.update(i["verdicts"])
                    sims = i.get("similarity") or [None] * len(i["replies"])
                    replies_one += [(p.messages[-1]["content"], r, v, s) for r, v, s in zip(i["replies"], i["verdicts"], sims)
                                    if v != "enough rewrites"]  # rows cut once n were usable: not replies
                    beams_one += [(p.messages[-1]["content"], t, j < i["parsed"]) for j, t in enumerate(slots)]
                else:
                    verdicts.update([f"{i['parsed']} items"])
            print(mode, first + len(batch), f"{np.mean(shares):.3f}", flush=True)
        shares_a = np.asarray(shares)
        est, lo, hi = ci(np.mean, shares_a)
        out[mode] = {
            "usable_share": [float(est), float(lo), float(hi)],
            "all_n": float(np.mean(shares_a == 1.0)),
            "none": float(np.mean(shares_a == 0.0)),
            "policy_tokens_per_prompt": float(np.mean(tokens)),
            "scorer_tokens_per_prompt": float(np.mean(scorer_tokens)),
            "seconds_per_prompt": (time.perf_counter() - t0) / len(prompts),
            "verdicts": dict(verdicts.most_common()),
        }
    cell = lambda t: t.replace("|", "\\|").replace("\n", " ⏎ ")[:220]  # noqa: E731
    rng = random.Random(args.sample_seed)
    sample = rng.sample(replies_one, 50)
    lines = ["# 50 random replies of `--mutation-mode one` with the rule's verdict", "",
             "| # | instruction | reply | rule | similarity |", "|---|---|---|---|---|"]  # fmt: skip
    for j, (ins, rep, v, sim) in enumerate(sample, 1):
        lines.append(f"| {j} | {cell(ins)} | {cell(rep)} | {v} | {'' if sim is None else f'{sim:.2f}'} |")
    (RESULTS / f"{args.out_name}_sample.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{args.out_name}_sample.json").write_text(json.dumps(sample, indent=1))
    # 50 beams drawn uniformly from every prompt's n slots: the hand check of what Darwin decodes from (a slot
    # left to the parent instruction is no rewrite)
    beams = random.Random(args.sample_seed + 1).sample(beams_one, min(50, len(beams_one)))
    lines = ["# 50 random beams (mutation slots) of `--mutation-mode one`", "",
             "| # | instruction | the beam's instruction | rewrite |", "|---|---|---|---|"]  # fmt: skip
    for j, (ins, slot, rewritten) in enumerate(beams, 1):
        lines.append(f"| {j} | {cell(ins)} | {cell(slot) if rewritten else '(the parent instruction)'} | {rewritten} |")
    (RESULTS / f"{args.out_name}_beams.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{args.out_name}_beams.json").write_text(json.dumps(beams, indent=1))
    md = ["| mode | usable rewrites per prompt (share of n) | prompts with all n | with none | policy tokens / prompt | encoder tokens / prompt | s / prompt |",
          "|---|---|---|---|---|---|---|"]  # fmt: skip
    for mode, r in out.items():
        e, lo, hi = r["usable_share"]
        md.append(f"| {mode} | {e:.3f} [{lo:.3f}, {hi:.3f}] | {r['all_n']:.3f} | {r['none']:.3f} | "
                  f"{r['policy_tokens_per_prompt']:.0f} | {r['scorer_tokens_per_prompt']:.0f} | {r['seconds_per_prompt']:.2f} |")  # fmt: skip
    (RESULTS / f"{args.out_name}.md").write_text("\n".join(md) + "\n")
    summary = (f"{args.out_name}: usable rewrites per prompt, {len(prompts)} MT-Bench+Vicuna prompts, n={args.mutations}: "
               + ", ".join(f"{m} {r['usable_share'][0]:.3f} [{r['usable_share'][1]:.3f}, {r['usable_share'][2]:.3f}]"
                           for m, r in out.items()))  # fmt: skip
    write_result(args.out_name, {"config": vars(args), "prompts": len(prompts), "results": out}, summary)


if __name__ == "__main__":
    main()
