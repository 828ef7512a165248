"""The serving backend against the in-process engine: best-of-8 and CD (K = 8, B = 16) on the same prompts.

In-process: the bundled SmolLM2-135M-Instruct de-quantised to float32, batched through transformers on one
torch thread. Server: llama-cpp-python's OpenAI-compatible server on the same model's GGUF (Q4_1), one
thread, started here (``moalign.decoding.llama_server``); the client falls back to text prompts and one
choice per request there (no token ids, no ``n``). Objectives ``helpful`` and ``harmless`` (shipped reward
models, shipped z-score statistics) score the candidates in both, so wall time includes the same scoring.

Reported per (method, backend): wall time of decoding the batch, the tokens sampled by the policy (every
candidate's tokens, counted block by block from the selector's view), sampled tokens per second, the
records' ``forward_tokens`` (same accounting in both backends) and, for the server, the requests sent and the
prompt tokens it was sent (what its prefix cache may save). Policy load and server start-up are timed apart.

    python benchmarks/server_backend.py [--prompts 4] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import write_result  # noqa: E402
from llama_server import LlamaServer  # noqa: E402  (scripts/, on the path through _common)

from moalign.config import GenerateConfig  # noqa: E402
from moalign.data.prompts import demo_prompts_path, load_prompts  # noqa: E402
from moalign.decoding.backend import SamplingConfig, first_candidate, strip_eos  # noqa: E402
from moalign.decoding.in_process import TransformersBackend  # noqa: E402
from moalign.decoding.registry import MethodContext, get_method  # noqa: E402
from moalign.decoding.values import ObjectiveScorer  # noqa: E402
from moalign.objectives.base import resolve_objectives  # noqa: E402
from moalign.objectives.normalize import shipped_norm_stats  # noqa: E402
from moalign.policies import DEFAULT_POLICY, load_policy  # noqa: E402


class CountingEngine:
    """An engine whose ``decode`` counts the tokens the policy sampled (every row, every block)."""

    def __init__(self, engine):
        self.engine, self.sampled = engine, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def decode(self, prompts, *, selector=first_candidate, **kw):
        eos = list(
            self.engine.eos_ids.tolist() if torch.is_tensor(self.engine.eos_ids) else self.engine.eos_ids
        )
        base: list[int] | None = None

        def counting(step):
            nonlocal base
            P, K = step.done.shape
            lengths = [len(strip_eos(step.token_ids[p, j].tolist(), eos)) + int(bool(step.done[p, j]))
                       for p in range(P) for j in range(K)]  # fmt: skip
            start = base or [0] * len(lengths)
            self.sampled += sum(max(0, a - b) for a, b in zip(lengths, start))
            sel = selector(step)
            chosen = torch.as_tensor(sel.chosen).reshape(-1)
            parents = sel.parents if sel.parents is not None else chosen[:, None].expand(P, K)
            parents = torch.as_tensor(parents).reshape(P, K)
            base = [lengths[p * K + int(parents[p, j])] for p in range(P) for j in range(K)]
            return sel

        return self.engine.decode(prompts, selector=counting, **kw)


def run(engine, policy, cfg: GenerateConfig, scorer, prompts, stats=None) -> dict:
    spec = get_method(cfg.method)
    counting = CountingEngine(engine)
    decoder = spec.build(
        MethodContext(cfg=cfg, policy=policy, engine=counting, scorer=scorer), cfg.method_args()
    )
    before = stats.to_dict() if stats is not None else None
    t0 = time.perf_counter()
    out = decoder(prompts, seed=cfg.seed, prompt_indices=list(range(len(prompts))))
    wall = time.perf_counter() - t0
    recs = [r for rs in out for r in rs]
    res = {
        "wall_s": round(wall, 2),
        "sampled_tokens": counting.sampled,
        "sampled_tokens_per_s": round(counting.sampled / wall, 1),
        "output_tokens": sum(len(r.token_ids) for r in recs),
        "forward_tokens": sum(r.forward_tokens for r in recs),
        "finished": sum(r.finished for r in recs),
    }
    if stats is not None:
        after = stats.to_dict()
        res["server"] = {k: round(after[k] - before[k], 2) for k in ("requests", "prompt_tokens", "completion_tokens",
                                                                      "retries")}  # fmt: skip
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-concurrency", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    prompts = load_prompts(demo_prompts_path(), limit=args.prompts)
    objectives = resolve_objectives("helpful,harmless")
    scorer = ObjectiveScorer(objectives, shipped_norm_stats(DEFAULT_POLICY).subset(["helpful", "harmless"]))
    scorer.raw(["warm up"], ["the objectives' models load here, outside the timings"])
    base = GenerateConfig(max_new_tokens=args.max_new_tokens, seed=0, normalize="none")
    methods = {
        "best-of-8": replace(base, method="best-of-n", n=8),
        "cd-k8-b16": replace(base, method="cd", k=8, block_size=16),
    }
    t0 = time.perf_counter()
    policy = load_policy(DEFAULT_POLICY)
    local_load = time.perf_counter() - t0
    local = TransformersBackend(policy, SamplingConfig())
    results: dict = {"local": {}, "server": {}}
    for name, cfg in methods.items():
        results["local"][name] = run(local, policy, cfg, scorer, prompts)
        print("local", name, results["local"][name], flush=True)

    from moalign.decoding.completions import connect

    t0 = time.perf_counter()
    with LlamaServer(n_threads=1, n_ctx=4096) as srv:
        server_start = time.perf_counter() - t0
        scfg = replace(base, backend="server", base_url=srv.base_url, max_concurrency=args.max_concurrency)
        spolicy, sengine = connect(scfg, SamplingConfig())
        for name, cfg in methods.items():
            cfg = replace(cfg, backend="server", base_url=srv.base_url, max_concurrency=args.max_concurrency)
            results["server"][name] = run(sengine, spolicy, cfg, scorer, prompts, stats=sengine.stats)
            print("server", name, results["server"][name], flush=True)
        caps = spolicy.describe()["capabilities"]
        sengine.client.close()

    def ratio(name):
        return round(results["server"][name]["wall_s"] / results["local"][name]["wall_s"], 2)

    summary = (
        f"server_backend: {args.prompts} prompts x {args.max_new_tokens} tokens, 1 thread each; "
        + "; ".join(
            f"{name}: in-process {results['local'][name]['wall_s']} s "
            f"({results['local'][name]['sampled_tokens_per_s']} tok/s), llama.cpp server "
            f"{results['server'][name]['wall_s']} s ({results['server'][name]['sampled_tokens_per_s']} tok/s, "
            f"x{ratio(name)} wall)"
            for name in methods
        )
    )
    payload = {
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "objectives": ["helpful", "harmless"],
        "local_policy_load_s": round(local_load, 2),
        "server_start_s": round(server_start, 2),
        "server": {
            "software": "llama-cpp-python 0.3.36 (llama_cpp.server)",
            "capabilities": caps,
            "n_threads": 1,
            "max_concurrency": args.max_concurrency,
        },  # fmt: skip
        "results": results,
    }
    write_result("server_backend", payload, summary)


if __name__ == "__main__":
    main()
