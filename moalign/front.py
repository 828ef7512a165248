"""The ``front`` job: Pareto fronts of decoding methods in objective space, proxy and judges side by side.

Each method that takes preference weights (best-of-N and CD, through a weighted ``--scalarization``) runs once
per weight of a grid on the simplex; the methods without weights (sample, RMOD, Darwin) run once and are
points. Every run is an ordinary ``generate`` run in ``OUT_DIR/LABEL.jsonl`` (resumed like ``compare``'s), on the
same prompts and seed. Per method: the mean objective vector per weight with a bootstrap interval over prompts,
its non-dominated points, and its hypervolume against a stated reference point with an interval; paired
differences of hypervolumes between methods (:mod:`moalign.evaluation.fronts`). Raw scores, so the proxy and the
judge spaces each have their own reference point.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from moalign.config import GenerateConfig, for_method, refuse_unused_method_flags, versions
from moalign.data.prompts import demo_prompts_path, load_prompts
from moalign.decoding.registry import get_method, loads_policy
from moalign.errors import MoalignError, SettingError
from moalign.evaluation.fronts import simplex_grid, summarise_fronts
from moalign.generate import generate
from moalign.objectives.base import resolve_objectives
from moalign.policies import default_device, load_policy
from moalign.records import read_records

WEIGHTED = ("best-of-n", "cd")  # the methods whose --scalarization takes weights


def _methods(spec: str | None) -> list[str]:
    names = [m.strip() for m in (spec or "").split(",") if m.strip()]
    for m in names:
        get_method(m)
    return names


def runs_of(cfg, names: list[str]) -> list[tuple[str, str, tuple[float, ...] | None, GenerateConfig]]:
    """``(label, method, weights or None, generate config)`` of every run of the front."""
    weighted, points = _methods(cfg.weighted), _methods(cfg.points)
    bad = [m for m in weighted if m not in WEIGHTED]
    if bad:
        raise MoalignError(f"--weighted: {', '.join(bad)} take(s) no preference weights (those that do: "
                           f"{', '.join(WEIGHTED)}); list it under --points")  # fmt: skip
    trained = trained_policies(getattr(cfg, "trained", ""))
    if not weighted and not points and not trained:
        raise MoalignError("a front needs a method: --weighted, --points or --trained")
    clash = [lab for lab, _ in trained if lab in weighted or lab in points]
    if clash:
        raise SettingError("front", "trained", f"labels must differ from the methods' names, got {', '.join(clash)}")
    both = sorted(set(weighted) & set(points))
    if both:
        raise MoalignError(f"{', '.join(both)} listed under both --weighted and --points")
    refuse_unused_method_flags(cfg, weighted + points + (["sample"] if trained else []))
    base = GenerateConfig(**{k: v for k, v in asdict(cfg).items() if k in GenerateConfig.__dataclass_fields__})
    out = []
    for m in weighted:
        for w in simplex_grid(len(names), cfg.steps):
            scal = ",".join(f"{n}={x:g}" for n, x in zip(names, w))
            label = f"{m}-w" + "-".join(f"{x:.2f}" for x in w)
            out.append((label, m, w, for_method(base, m, scalarization=scal, out=str(Path(cfg.out_dir) / f"{label}.jsonl"))))
    for m in points:
        out.append((m, m, None, for_method(base, m, out=str(Path(cfg.out_dir) / f"{m}.jsonl"))))
    for label, policy in trained:  # plain samples of each trained policy
        out.append((label, label, None, for_method(base, "sample", policy=policy,
                                                   out=str(Path(cfg.out_dir) / f"{label}.jsonl"))))  # fmt: skip
    return out


def trained_policies(spec: str) -> list[tuple[str, str]]:
    """``LABEL=POLICY,...`` -> [(label, policy)] (``--trained``)."""
    out = []
    for part in [p.strip() for p in (spec or "").split(",") if p.strip()]:
        label, eq, policy = part.partition("=")
        if not eq or not label.strip() or not policy.strip():
            raise SettingError("front", "trained", f"entries must be LABEL=POLICY, got {part!r}")
        out.append((label.strip(), policy.strip()))
    labels = [lab for lab, _ in out]
    if len(set(labels)) != len(labels):
        raise SettingError("front", "trained", f"labels must be unique, got {', '.join(labels)}")
    return out


def _reference(points: list[np.ndarray], given: str | None, names: list[str]) -> np.ndarray:
    if given:
        try:
            ref = np.array([float(x) for x in given.split(",")])
        except ValueError:
            raise MoalignError(f"--ref must be numbers separated by commas, got {given!r}") from None
        if len(ref) != len(names):
            raise MoalignError(f"--ref has {len(ref)} values for {len(names)} objectives ({', '.join(names)})")
        return ref
    allp = np.concatenate(points)
    lo, hi = allp.min(axis=0), allp.max(axis=0)
    return lo - 0.1 * np.maximum(hi - lo, 1e-9)


def front(cfg, progress: bool = True) -> dict:
    """Run (or resume) every run of the front, then summarise it in proxy space and, with judges, in judge
    space; writes ``front.json`` and ``front.md`` (and ``front.png`` for two objectives) in ``cfg.out_dir``."""
    objectives = resolve_objectives(cfg.objectives)
    names = [o.name for o in objectives]
    runs = runs_of(cfg, names)
    judges = None
    if cfg.judges:
        from moalign.evaluation.evaluate import parse_judges

        judges = parse_judges(cfg.judges)  # an unknown judge fails before any decoding
    prompts = load_prompts(cfg.prompts or demo_prompts_path(), column=cfg.prompt_column, limit=cfg.limit,
                           skip_invalid=cfg.skip_invalid)  # fmt: skip
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    policy = None if not loads_policy(cfg.backend) else load_policy(cfg.policy, device=cfg.device or default_device(),
                                                               dtype=cfg.dtype)  # fmt: skip
    records = {}
    for label, _, _, gcfg in runs:  # a trained policy's run loads its own policy
        own = policy if gcfg.policy == cfg.policy else None
        generate(gcfg, policy=own, objectives=objectives, prompts=prompts, progress=progress)
        records[label] = read_records(gcfg.out)
        if judges:
            from moalign.evaluation.evaluate import score_judges

            score_judges(gcfg.out, records[label], judges)
    ids = [r["prompt_id"] for r in records[runs[0][0]] if r.get("sample_index", 0) == 0]
    spaces = {"proxy": names} | ({"judge": [o.name for _, o in judges]} if judges else {})
    result: dict = {"objectives": names, "judges": spaces.get("judge"), "runs": {}, "spaces": {},
                    "config": asdict(cfg), "versions": versions()}  # fmt: skip
    for label, m, w, _ in runs:
        recs = records[label]
        flops = [r.get("policy_flops") for r in recs]
        result["runs"][label] = {"method": m, "weights": list(w) if w else None,
                                 "gflop": None if None in flops else float(np.mean(
                                     [a + r["scorer_flops"] for a, r in zip(flops, recs)]) / 1e9),
                                 "words": float(np.mean([len(r["response"].split()) for r in recs]))}  # fmt: skip
    for space, cols in spaces.items():
        key = "scores" if space == "proxy" else "judge_scores"
        per_method: dict[str, list[np.ndarray]] = {}
        for label, m, _, _ in runs:
            by = {}
            for r in records[label]:  # several samples of a prompt (sample with n > 1): their mean
                by.setdefault(r["prompt_id"], []).append([r[key][c] for c in cols])
            per_method.setdefault(m, []).append(np.array([np.mean(by[i], axis=0) for i in ids]))
        ref = _reference([a.mean(axis=0, keepdims=True) for v in per_method.values() for a in v],
                         cfg.ref if space == "proxy" else None, cols)  # fmt: skip
        fronts, diffs = summarise_fronts(per_method, ref, n_boot=cfg.n_boot, seed=cfg.seed)
        result["spaces"][space] = {
            "columns": cols, "ref": ref.tolist(),
            "methods": {m: {"points": f.points.tolist(), "low": f.low.tolist(), "high": f.high.tolist(),
                            "front": f.front.tolist(), "hypervolume": list(f.hypervolume)} for m, f in fronts.items()},
            "hypervolume_diffs": {f"{a} - {b}": list(d) for (a, b), d in diffs.items()},
        }  # fmt: skip
    (out_dir / "front.json").write_text(json.dumps(result, indent=2))
    (out_dir / "front.md").write_text(front_table(result) + "\n")
    if len(names) == 2:
        plot_front(result, out_dir / "front.png")
    return result


def front_table(result: dict) -> str:
    """Markdown: each method's hypervolume [95% CI] per space, its points, and the paired differences."""
    lines = []
    for space, s in result["spaces"].items():
        cols = s["columns"]
        lines += [f"**{space.upper()}** ({', '.join(cols)}; raw means; reference point "
                  f"{', '.join(f'{x:+.3f}' for x in s['ref'])})", "",
                  "| method | hypervolume [95% CI] | points (weights: means; * on its front) |", "|---|---|---|"]  # fmt: skip
        for m, f in s["methods"].items():
            hv = f["hypervolume"]
            labels = [lab for lab, r in result["runs"].items() if r["method"] == m]
            pts = "; ".join(
                f"{'/'.join(f'{x:g}' for x in (result['runs'][lab]['weights'] or [])) or '-'}: "
                f"{', '.join(f'{v:+.3f}' for v in p)}{'*' if on else ''}"
                for lab, p, on in zip(labels, f["points"], f["front"])
            )
            lines.append(f"| {m} | {hv[0]:.4f} [{hv[1]:.4f}, {hv[2]:.4f}] | {pts} |")
        diffs = s["hypervolume_diffs"]
        if diffs:
            lines += ["", "| paired hypervolume difference | estimate [95% CI] |", "|---|---|"]
            lines += [f"| {k} | {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] |" for k, d in diffs.items()
                      if k.split(" - ")[0] < k.split(" - ")[1]]  # fmt: skip
        lines.append("")
    gflop = {lab: r["gflop"] for lab, r in result["runs"].items()}
    lines.append("GFLOP per response: " + ", ".join(f"{k} {v:.1f}" if v is not None else f"{k} -" for k, v in gflop.items()))
    return "\n".join(lines)


def plot_front(result: dict, path: Path) -> Path:
    """Objective-space panels (proxy, judge): each method's points joined along its weights, its front marked,
    the reference point, and GFLOP per point in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spaces = {k: s for k, s in result["spaces"].items() if len(s["columns"]) == 2}
    if not spaces:
        return path
    fig, axes = plt.subplots(1, len(spaces), figsize=(6 * len(spaces), 5), squeeze=False)
    for ax, (space, s) in zip(axes[0], spaces.items()):
        for m, f in s["methods"].items():
            p = np.array(f["points"])
            labs = [lab for lab, r in result["runs"].items() if r["method"] == m]
            g = [result["runs"][lab]["gflop"] for lab in labs]
            cost = f"{np.mean(g):.0f} GFLOP" if None not in g else "FLOPs unknown"
            line = ax.plot(p[:, 0], p[:, 1], "o-" if len(p) > 1 else "s", label=f"{m} ({cost}/response)")[0]
            on = np.array(f["front"])
            ax.scatter(p[on, 0], p[on, 1], s=90, facecolors="none", edgecolors=line.get_color())
        ax.scatter(*s["ref"], marker="x", color="black", label="reference point")
        ax.set_xlabel(s["columns"][0])
        ax.set_ylabel(s["columns"][1])
        ax.set_title(f"{space}: mean per weight (circled: on the method's front)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
