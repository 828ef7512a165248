"""The serving backend against the in-process engine, and each search against the sampling it is made of: plain
sampling of 8 per prompt, best-of-8, CD and RMOD (K = 8, B = 16) on the same prompts and tokens.

In-process: the bundled SmolLM2-135M-Instruct de-quantised to float32, batched through transformers on one
torch thread. Servers, on the same model's GGUF (Q4_1), one thread, started here (``scripts/llama_server.py``):

- ``llama-cpp-python``: its OpenAI-compatible server decodes one request at a time and takes text prompts
  only with one choice per request, so the client falls back to text and one request per row;
- ``llama.cpp`` (when ``scripts/install_llama_cpp.sh`` has built it, or ``--native PATH``): llama.cpp's own
  ``llama-server`` with ``--parallel`` slots decoded together, token-id prompts, ``n`` choices and the generated
  ids back, so rows in one state share a request and the server batches the rows of a block. Objectives ``helpful`` and ``harmless`` (shipped reward
models, shipped z-score statistics) score the candidates in both, so wall time includes the same scoring.

Reported per (method, backend): wall time of decoding the batch, the tokens sampled by the policy (every
candidate's tokens, counted block by block from the selector's view), sampled tokens per second, the
records' ``policy_tokens`` (same accounting in both backends) and, for the server, the requests sent and the
prompt tokens it was sent (what its prefix cache may save). Policy load and server start-up are timed apart.
``over_sampling``: each method's wall time over plain sampling's on the same backend (medians of ``--repeats``
runs in rotating order, one process): what a search costs over the sampling it is made of.

    python benchmarks/server_backend.py [--prompts 4] [--max-new-tokens 48] [--repeats 3] [--servers llama.cpp]
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _common import load_script  # noqa: E402
from harness import parser, start, write_result  # noqa: E402

from moalign.config import GenerateConfig, for_method  # noqa: E402
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
        MethodContext(cfg=cfg, policy=policy, backend=counting, scorer=scorer), cfg.method_args()
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
        "policy_tokens": sum(r.policy_tokens for r in recs),
        "finished": sum(r.finished for r in recs),
    }
    if stats is not None:
        after = stats.to_dict()
        res["server"] = {k: round(after[k] - before[k], 2) for k in ("requests", "prompt_tokens", "completion_tokens",
                                                                      "retries")}  # fmt: skip
    return res


def _installed_native() -> str | None:
    """The llama-server that scripts/install_llama_cpp.sh built under ~/.cache/moalign/llama.cpp, if any."""
    root = Path(os.environ.get("MOALIGN_LLAMA_CPP", "")) / "bin" if os.environ.get("MOALIGN_LLAMA_CPP") else None
    found = [root / "llama-server"] if root else sorted((Path.home() / ".cache/moalign/llama.cpp").glob("*/bin/llama-server"))
    return str(found[0]) if found and found[0].exists() else None


def main() -> None:
    ap = parser(__doc__.splitlines()[0], prompts=4, seed=None, threads=1)  # the engine's process: 1 thread
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-concurrency", type=int, default=8)
    ap.add_argument("--native", default=None, help="llama.cpp's llama-server binary (default: the installed one)")
    ap.add_argument("--parallel", type=int, default=32, help="llama.cpp's slots (--parallel): every row of the batch at once")
    ap.add_argument("--name", default="server_backend", help="results file name (benchmarks/results/NAME.json)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each method per backend (medians; rotating order)")
    ap.add_argument("--servers", default="llama-cpp-python,llama.cpp", help="which servers (comma-separated; none: '')")
    args = start(ap.parse_args())
    native = args.native or _installed_native()
    prompts = load_prompts(demo_prompts_path(), limit=args.prompts)
    objectives = resolve_objectives("helpful,harmless")
    scorer = ObjectiveScorer(objectives, shipped_norm_stats(DEFAULT_POLICY).subset(["helpful", "harmless"]))
    scorer.raw(["warm up"], ["the objectives' models load here, outside the timings"])
    base = GenerateConfig(max_new_tokens=args.max_new_tokens, seed=0, normalize="none")
    methods = {
        "sample-8": for_method(base, "sample", n=8),
        "best-of-8": for_method(base, "best-of-n", n=8),
        "cd-k8-b16": for_method(base, "cd", k=8, block_size=16),
        "rmod-k8-b16": for_method(base, "rmod", k=8, block_size=16),
    }

    def runs(engine, spolicy, cfgs, stats=None) -> dict:
        """Every method ``--repeats`` times in rotating order; per method the median run by wall time."""
        out: dict[str, list] = {name: [] for name in cfgs}
        names = list(cfgs)
        for rep_i in range(args.repeats):
            for name in names[rep_i % len(names):] + names[: rep_i % len(names)]:
                out[name].append(run(engine, spolicy, cfgs[name], scorer, prompts, stats=stats))
        med = {}
        for name, rs in out.items():
            walls = sorted(r["wall_s"] for r in rs)
            med[name] = {**next(r for r in rs if r["wall_s"] == walls[len(walls) // 2]), "walls_s": [r["wall_s"] for r in rs]}
        return med
    t0 = time.perf_counter()
    policy = load_policy(DEFAULT_POLICY)
    local_load = time.perf_counter() - t0
    local = TransformersBackend(policy, SamplingConfig())
    results: dict = {"local": runs(local, policy, methods)}
    print("local", results["local"], flush=True)

    from moalign.decoding.completions import connect

    llama_server = load_script("llama_server")
    wanted = [x for x in args.servers.split(",") if x]
    servers = {"llama-cpp-python": llama_server.LlamaServer(n_threads=1, n_ctx=4096)} if "llama-cpp-python" in wanted else {}
    if native and "llama.cpp" in wanted:
        servers["llama.cpp"] = llama_server.NativeLlamaServer(native, parallel=args.parallel, n_threads=1, n_ctx=512 * args.parallel)
    results = {"local": results["local"], **{k: {} for k in servers}}
    caps, starts = {}, {}
    for kind, srv in servers.items():
        t0 = time.perf_counter()
        with srv:
            starts[kind] = round(time.perf_counter() - t0, 2)
            scfg = replace(base, backend="server", base_url=srv.base_url, max_concurrency=args.max_concurrency)
            spolicy, sengine = connect(scfg, SamplingConfig())
            cfgs = {name: replace(cfg, backend="server", base_url=srv.base_url, max_concurrency=args.max_concurrency)
                    for name, cfg in methods.items()}  # fmt: skip
            results[kind] = runs(sengine, spolicy, cfgs, stats=sengine.stats)
            print(kind, results[kind], flush=True)
            caps[kind] = spolicy.describe()["capabilities"]
            sengine.close()

    def ratio(kind, name):
        return round(results[kind][name]["wall_s"] / results["local"][name]["wall_s"], 2)

    def over_sampling(kind):
        return {name: round(results[kind][name]["wall_s"] / results[kind]["sample-8"]["wall_s"], 2) for name in methods}

    summary = (f"{args.name}: {args.prompts} prompts x {args.max_new_tokens} tokens, 1 thread each; over sampling 8: "
               + "; ".join(f"{kind} " + ", ".join(f"{n} {r}" for n, r in over_sampling(kind).items() if n != "sample-8")
                           for kind in results))  # fmt: skip
    payload = {
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "objectives": ["helpful", "harmless"],
        "local_policy_load_s": round(local_load, 2),
        "server_start_s": starts,
        "servers": {
            "llama-cpp-python": "llama-cpp-python 0.3.36 (llama_cpp.server), one request at a time",
            "llama.cpp": f"llama.cpp llama-server (vendored by llama-cpp-python 0.3.36), --parallel {args.parallel}",
        },
        "capabilities": caps,
        "n_threads": 1,
        "max_concurrency": args.max_concurrency,
        "repeats": args.repeats,
        "ratios": {kind: {name: ratio(kind, name) for name in methods} for kind in servers},
        "over_sampling": {kind: over_sampling(kind) for kind in results},
        "results": results,
    }
    write_result(args.name, payload, summary)


if __name__ == "__main__":
    main()
