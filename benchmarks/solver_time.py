"""Time the RMOD worst-case weight solver per decoding block.

One block of RMOD decoding solves one ``K x G`` problem per prompt; this times a batch of ``P`` prompts
(default ``P=8, K=16, G=10``, values ~ N(0, 1) in float32) for several ``lam``, median over repeats, for the
exact solver and the fixed-step reference scheme, with torch's default thread count and with one thread
(the tensors are tiny, so intra-op threads mostly add synchronisation cost, badly so on a loaded machine).

Writes ``benchmarks/results/solver_time.json`` and prints one summary line.

    python benchmarks/solver_time.py [--repeats 50] [--prompts 8] [--candidates 16] [--objectives 10]
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from harness import environment, parser

from moalign.decoding.worst_case import solve_worst_case_weights

LAMS = (0.1, 1.0, 5.0, 50.0)


def _time_solver(
    p: int, k: int, g: int, lam: float, method: str, repeats: int, seed: int
) -> dict[str, float | int | bool]:
    gen = torch.Generator().manual_seed(seed)
    blocks = [torch.randn(p, k, g, generator=gen) for _ in range(repeats + 3)]
    for v in blocks[:3]:  # warm-up
        solve_worst_case_weights(v, lam, method=method)
    times, iters, converged, gaps = [], [], True, []
    for v in blocks[3:]:
        start = time.perf_counter()
        sol = solve_worst_case_weights(v, lam, method=method)
        times.append(time.perf_counter() - start)
        iters.append(sol.iterations)
        converged = converged and bool(sol.converged.all())
        gaps.append(float(sol.gap.max()))
    times.sort()
    return {
        "median_ms": 1e3 * statistics.median(times),
        "p90_ms": 1e3 * times[min(len(times) - 1, int(0.9 * len(times)))],
        "median_iterations": statistics.median(iters),
        "max_iterations": max(iters),
        "all_converged": converged,
        "max_gap": max(gaps),
    }


def main() -> None:
    ap = parser(__doc__.splitlines()[0], prompts=8, seed=0, threads=None)  # threads: both 1 and torch's default
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--objectives", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "solver_time.json")
    args = ap.parse_args()
    p, k, g = args.prompts, args.candidates, args.objectives

    default_threads = torch.get_num_threads()
    results = []
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        for method in ("exact", "reference"):
            for lam in LAMS:
                row = _time_solver(p, k, g, lam, method, args.repeats, args.seed)
                results.append({"threads": threads, "method": method, "lam": lam, **row})
    torch.set_num_threads(default_threads)

    record = {
        "benchmark": "RMOD worst-case weight solver, time per decoding block",
        "config": {
            "prompts": p,
            "candidates": k,
            "objectives": g,
            "values": "standard normal, float32",
            "repeats": args.repeats,
            "seed": args.seed,
            "tol": 1e-9,
            "statistic": "median wall time of one batched solve",
        },
        "environment": {
            **environment(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "default_threads": default_threads,
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")

    def med(method: str, threads: int) -> str:
        rows = [r for r in results if r["method"] == method and r["threads"] == threads]
        return "/".join(f"{r['median_ms']:.1f}" for r in rows)

    exact_ok = all(r["all_converged"] for r in results if r["method"] == "exact")
    print(
        f"solver_time P={p} K={k} G={g} lam={'/'.join(str(x) for x in LAMS)}: exact median ms "
        f"{med('exact', 1)} (1 thread), {med('exact', default_threads)} ({default_threads} threads); "
        f"reference {med('reference', 1)} (1 thread); exact all converged={exact_ok} -> {args.out}"
    )


if __name__ == "__main__":
    main()
