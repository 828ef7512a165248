"""Darwin vs best-of-N at matched compute on MT-Bench + Vicuna first turns (real data, bundled policy).

Two settings: the ``helpful`` objective alone, and the worst case of ``helpful`` and ``harmless`` (z-scored).
Methods: Darwin (MC = 1, 2, 3 from one run's best-so-far), its ablations ``sample-replace`` and
``mutate-bon`` (same beams), best-of-5/10/15 (picked from 15 plain samples per prompt, shared by both
settings: the same distribution as running best-of-N), plain sampling, and RMOD at a comparable budget in
the worst-case setting. Every response is scored by the optimised objectives (PROXY: the shipped
``helpful``/``harmless`` reward models) and by signals no method saw (JUDGES: Bradley-Terry reward models
trained here on UltraFeedback (helpfulness) and PKU-SafeRLHF (harmlessness), which share no data with the
proxies, plus the ``relevant`` embedding similarity), beside response length, forward tokens and wall time.

    python benchmarks/darwin_mtbench.py --per-source 20 --threads 2     # 40 prompts; rerun larger to extend

Runs are resumable JSONL files in ``benchmarks/results/darwin_mtbench/``; the summary goes to
``benchmarks/results/darwin_mtbench.json`` / ``.md`` / ``.png``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from _tasks import JUDGE_DIR, load_prompt_set
from harness import RESULTS, SHARED_DATA, ci, fmt, parser, save_plot, start, write_result

OUT = RESULTS / "darwin_mtbench"  # --out-dir changes it
SETTINGS = {"helpful": "helpful", "worst": "worst-case"}
CYCLES = 3
BEAMS = 5


def ensure_judges() -> dict[str, str]:
    """The two judges, trained on first use by the shared helper (CC-BY-NC PKU data: never shipped)."""
    from moalign.evaluation import ensure_judges as _ensure

    return {name: str(path) for name, path in _ensure(JUDGE_DIR, SHARED_DATA).items()}


def run_generation(args) -> None:
    from moalign.config import GenerateConfig, for_method
    from moalign.generate import generate
    from moalign.objectives.base import resolve_objectives
    from moalign.policies import load_policy

    start(args)
    prompts = load_prompt_set(args.per_source)
    policy = load_policy()
    objectives = resolve_objectives("helpful,harmless")
    base = GenerateConfig(objectives="helpful,harmless", max_new_tokens=args.max_new_tokens, seed=0,
                          batch_size=args.batch_size, mutations=BEAMS, cycles=CYCLES,
                          replace_every=args.replace_every, replace_top_k=3,
                          mutation_max_new_tokens=args.mutation_tokens)  # fmt: skip
    runs = [
        (
            "sample15",
            for_method(base, "sample", n=15, batch_size=max(1, args.batch_size // 2)),
        )
    ]
    for s in args.settings:
        sc = SETTINGS[s]
        runs.append((f"darwin-{s}", for_method(base, "darwin", scalarization=sc)))
        if s == "worst":
            runs.append(("rmod-worst", for_method(base, "rmod", k=BEAMS, block_size=16, lam=5.0)))
        runs.append((f"sample-replace-{s}", for_method(base, "sample-replace", scalarization=sc)))
        runs.append((f"mutate-bon-{s}", for_method(base, "mutate-bon", scalarization=sc)))
    only = set(args.only or [r for r, _ in runs])
    for label, cfg in runs:
        if label not in only:
            continue
        cfg = dataclasses.replace(cfg, out=str(OUT / f"{label}.jsonl"))
        print(f"== {label}", flush=True)
        generate(cfg, policy=policy, objectives=objectives, prompts=prompts)


# ------------------------------------------------------------------------------------------------ analysis
def _variants(setting: str, runs: dict[str, list[dict]]) -> dict[str, dict[str, dict]]:
    """variant -> prompt_id -> {response, policy_tokens, seconds}."""
    from moalign.decoding.scalarize import parse_scalarization
    from moalign.objectives.normalize import shipped_norm_stats

    norm = shipped_norm_stats("smollm2-135m-instruct").subset(["helpful", "harmless"])
    scal = parse_scalarization(SETTINGS[setting], ["helpful", "harmless"])
    out: dict[str, dict[str, dict]] = {}
    samples: dict[str, list[dict]] = {}
    for r in runs.get("sample15", []):
        samples.setdefault(r["prompt_id"], []).append(r)
    import torch

    for pid, rs in samples.items():
        rs = sorted(rs, key=lambda r: r["sample_index"])
        if len(rs) < 15:
            continue
        raw = np.array([[r["scores"]["helpful"], r["scores"]["harmless"]] for r in rs])
        z = (raw - np.array(norm.mean)) / np.array(norm.std)
        s = scal(torch.tensor(z)).numpy()
        out.setdefault("sample", {})[pid] = {"response": rs[0]["response"], "policy_tokens": rs[0]["policy_tokens"],
                                             "seconds": rs[0]["seconds"]}  # fmt: skip
        for n in (5, 10, 15):
            j = int(np.argmax(s[:n]))
            out.setdefault(f"best-of-{n}", {})[pid] = {
                "response": rs[j]["response"],
                "policy_tokens": sum(r["policy_tokens"] for r in rs[:n]),
                "seconds": sum(r["seconds"] for r in rs[:n]),
            }
    for method in ("darwin", "sample-replace", "mutate-bon"):
        for r in runs.get(f"{method}-{setting}", []):
            tr = r["trace"]
            fwd = 0
            for c, e in enumerate(tr):
                fwd += e["policy_tokens"] + ((e.get("mutation") or {}).get("policy_tokens", 0))
                if c == 0:
                    continue
                resp = e["best_so_far"]["response"]  # the seed sample's while no cycle has beaten it
                out.setdefault(f"{method} MC{c}", {})[r["prompt_id"]] = {
                    "response": resp, "policy_tokens": fwd,
                    "seconds": r["seconds"] * fwd / max(1, r["policy_tokens"]),
                }  # fmt: skip
    if setting == "worst":
        for r in runs.get("rmod-worst", []):
            out.setdefault("rmod (K=5, B=16, λ=5)", {})[r["prompt_id"]] = {
                "response": r["response"],
                "policy_tokens": r["policy_tokens"],
                "seconds": r["seconds"],
            }
    return out


def analyse(args) -> None:
    from moalign.evaluation import fit_norm_stats
    from moalign.objectives.base import resolve_objectives
    from moalign.objectives.normalize import shipped_norm_stats
    from moalign.records import read_records

    judges = ensure_judges(data_dir=SHARED_DATA)
    runs = {p.stem: read_records(p) for p in sorted(OUT.glob("*.jsonl"))}
    proxies = resolve_objectives("helpful,harmless")
    judge_objs = resolve_objectives(
        [f"rm:{judges['judge_helpful']}", f"rm:{judges['judge_harmless']}", "relevant"]
    )
    jnames = [o.name for o in judge_objs]
    cache_path = OUT / "scores_cache.json"
    cache: dict[str, list[float]] = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    prompts = {p.id: p for p in load_prompt_set(args.per_source)}

    def scores(items: list[tuple[str, str]]) -> np.ndarray:
        todo = [(p, r) for p, r in dict.fromkeys(items) if json.dumps([p, r]) not in cache]
        if todo:
            ps, rs = [prompts[p].text for p, _ in todo], [r for _, r in todo]
            cols = [o.score(ps, rs) for o in proxies + judge_objs]
            for i, key in enumerate(todo):
                cache[json.dumps(list(key))] = [float(c[i]) for c in cols]
            cache_path.write_text(json.dumps(cache))
        return np.array([cache[json.dumps([p, r])] for p, r in items])

    norm = shipped_norm_stats("smollm2-135m-instruct").subset(["helpful", "harmless"])
    # judge z-scores: statistics of the judges on the policy's own plain samples (all 15 per prompt)
    samp = [(r["prompt_id"], r["response"]) for r in runs.get("sample15", []) if r["prompt_id"] in prompts]
    jstats = fit_norm_stats(scores(samp)[:, 2:4], jnames[:2], source="judges on 15 policy samples per prompt")
    report: dict = {"settings": {}}
    md = []
    for setting in args.settings:
        variants = _variants(setting, runs)
        common = sorted(set.intersection(*(set(v) for v in variants.values())) & set(prompts))
        rows = {}
        for name, per in variants.items():
            items = [(pid, per[pid]["response"]) for pid in common]
            S = scores(items)
            pz = (S[:, :2] - np.array(norm.mean)) / np.array(norm.std)
            jz = (S[:, 2:4] - np.array(jstats.mean)) / np.array(jstats.std)
            proxy = pz[:, 0] if setting == "helpful" else pz.min(axis=1)
            judge = jz[:, 0] if setting == "helpful" else jz.min(axis=1)
            words = np.array([len(per[pid]["response"].split()) for pid in common], dtype=float)
            fwd = np.array([per[pid]["policy_tokens"] for pid in common], dtype=float)
            sec = np.array([per[pid]["seconds"] for pid in common], dtype=float)
            cols = {"proxy_helpful_raw": S[:, 0], "proxy_harmless_raw": S[:, 1], "proxy_scalarised_z": proxy,
                    "judge_helpful_raw": S[:, 2], "judge_harmless_raw": S[:, 3], "judge_scalarised_z": judge,
                    "judge_relevant": S[:, 4], "words": words, "policy_tokens": fwd, "seconds": sec}  # fmt: skip
            rows[name] = {k: ci(np.mean, v) for k, v in cols.items()}
            rows[name]["_proxy"], rows[name]["_judge"] = proxy, judge
        paired = {}
        for c in range(1, CYCLES + 1):
            for m in ("darwin", "sample-replace", "mutate-bon"):
                a, b = f"{m} MC{c}", f"best-of-{5 * c}"
                if a in rows and b in rows:
                    paired[f"{a} − {b}"] = {
                        k: ci(lambda x, y: float(np.mean(x - y)), rows[a][k], rows[b][k])
                        for k in ("_proxy", "_judge")
                    }  # fmt: skip
        report["settings"][setting] = {
            "n_prompts": len(common),
            "rows": {n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in rows.items()},
            "paired_vs_matched_best_of_n": {
                k: {"proxy": v["_proxy"], "judge": v["_judge"]} for k, v in paired.items()
            },
        }
        md += _table(setting, len(common), rows, paired)
    report["judge_norm"] = jstats.to_dict()
    report["config"] = vars(args)
    summary = _summary(report)
    (RESULTS / "darwin_mtbench.md").write_text("\n".join(md) + "\n")
    _plot(report, RESULTS / "darwin_mtbench.png")
    write_result("darwin_mtbench", report, summary)


def _table(setting: str, n: int, rows: dict, paired: dict) -> list[str]:
    what = "helpful z" if setting == "helpful" else "worst case of helpful, harmless z"
    out = [f"### Setting `{setting}`: decoding maximises {what} ({n} prompts; 95% bootstrap CIs)", "",
           "| method | PROXY scalarised (z) | proxy helpful | proxy harmless | JUDGE scalarised (z) | judge helpful "
           "| judge harmless | judge relevant | words | forward tokens | s / prompt |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        out.append(
            f"| {name} | {fmt(r['proxy_scalarised_z'])} | {r['proxy_helpful_raw'][0]:.3f} | {r['proxy_harmless_raw'][0]:.3f} "
            f"| {fmt(r['judge_scalarised_z'])} | {r['judge_helpful_raw'][0]:.3f} | {r['judge_harmless_raw'][0]:.3f} "
            f"| {r['judge_relevant'][0]:.3f} | {r['words'][0]:.1f} | {r['policy_tokens'][0]:.0f} | {r['seconds'][0]:.1f} |"
        )  # fmt: skip
    out += ["", "Paired by prompt, against best-of-N at the matched number of beams (5 per cycle):", "",
            "| comparison | PROXY diff | JUDGE diff |", "|---|---|---|"]  # fmt: skip
    for k, v in paired.items():
        out.append(f"| {k} | {fmt(v['_proxy'])} | {fmt(v['_judge'])} |")
    return out + [""]


def _summary(report: dict) -> str:
    parts = []
    for s, r in report["settings"].items():
        p = r["paired_vs_matched_best_of_n"].get("darwin MC1 − best-of-5")
        if p:
            parts.append(f"{s}: darwin MC1 − BoN-5 proxy {p['proxy'][0]:+.3f} judge {p['judge'][0]:+.3f}")
    return (
        f"darwin_mtbench ({', '.join(str(r['n_prompts']) for r in report['settings'].values())} prompts): "
        + "; ".join(parts)
    )


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(report["settings"])
    fig, axes = plt.subplots(2, len(settings), figsize=(6 * len(settings), 8), squeeze=False)
    for j, s in enumerate(settings):
        rows = report["settings"][s]["rows"]
        for i, (key, label) in enumerate(
            (("proxy_scalarised_z", "PROXY (optimised)"), ("judge_scalarised_z", "JUDGE (held out)"))
        ):
            ax = axes[i, j]
            fams: dict[str, list] = {}
            for name, r in rows.items():
                fam = (
                    name.split(" MC")[0]
                    if " MC" in name
                    else ("best-of-N" if name.startswith("best-of") else name)
                )
                fams.setdefault(fam, []).append((r["policy_tokens"][0], r[key]))
            for fam, pts in fams.items():
                pts.sort()
                x = [p[0] for p in pts]
                y = [p[1][0] for p in pts]
                err = [[p[1][0] - p[1][1] for p in pts], [p[1][2] - p[1][0] for p in pts]]
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=fam)
            ax.set_xscale("log")
            ax.set_xlabel("forward tokens per prompt (log)")
            ax.set_ylabel(f"{label}, z")
            ax.set_title(f"setting {s}: {label}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    save_plot(fig, path, dpi=110)


def main() -> None:
    global OUT
    ap = parser(__doc__.splitlines()[0], out_dir=OUT, out_alias="--out", batch_size=4, seed=None, threads=2)
    ap.add_argument(
        "--per-source", type=int, default=80, help="first N prompts of MT-Bench and of Vicuna each"
    )
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--replace-every", type=int, default=16)
    ap.add_argument("--mutation-tokens", type=int, default=128)
    ap.add_argument("--settings", nargs="+", default=["helpful", "worst"], choices=list(SETTINGS))
    ap.add_argument("--only", nargs="*", help="run only these labels (e.g. sample15 darwin-worst)")
    args = ap.parse_args()
    OUT = Path(args.out_dir)
    if not args.analyse_only:
        run_generation(args)
    analyse(args)


if __name__ == "__main__":
    main()
