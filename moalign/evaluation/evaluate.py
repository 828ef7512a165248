"""The ``evaluate`` job: read run files, (re)score, normalise, and compare them."""

from __future__ import annotations

import json
from pathlib import Path

from moalign.config import EvaluateConfig
from moalign.errors import MoalignError
from moalign.evaluation.metrics import EvaluationResult, evaluate_methods
from moalign.objectives.normalize import NormStats
from moalign.records import meta_path, read_records


def run_label(path: str, taken: set[str]) -> str:
    label = Path(path).name.removesuffix(".jsonl")
    base, i = label, 2
    while label in taken:
        label, i = f"{base}-{i}", i + 1
    return label


def load_runs(paths: list[str]) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    runs: dict[str, list[dict]] = {}
    metas: dict[str, dict] = {}
    for p in paths:
        recs = read_records(p)
        if not recs:
            raise MoalignError(f"{p} holds no records")
        label = run_label(p, set(runs))
        runs[label] = recs
        mp = meta_path(p)
        metas[label] = json.loads(mp.read_text()) if mp.exists() else {}
    return runs, metas


def evaluate_files(cfg: EvaluateConfig) -> EvaluationResult:
    if not cfg.inputs:
        raise MoalignError("no --inputs given")
    runs, metas = load_runs(cfg.inputs)
    labels = list(runs)
    reference = None
    if cfg.reference:
        ref = run_label(cfg.reference, set())
        if ref not in runs:
            raise MoalignError(f"--reference {cfg.reference} is not one of --inputs")
        reference = ref
    if cfg.objectives:
        names = [n.strip() for n in cfg.objectives.split(",") if n.strip()]
    else:
        names = list(runs[labels[0]][0].get("scores", {}))
        if not names:
            raise MoalignError("the inputs carry no scores: pass --objectives to score them")
    if cfg.rescore or any(
        n not in r.get("scores", {}) for recs in runs.values() for r in recs for n in names
    ):
        _rescore(runs, names)
    norm = _norm(cfg.normalize, metas, names)
    return evaluate_methods(runs, names, reference=reference, norm=norm, n_boot=cfg.n_boot, seed=cfg.seed)


def _rescore(runs: dict[str, list[dict]], names: list[str]) -> None:
    from moalign.objectives.base import resolve_objectives

    objs = resolve_objectives(names)
    for recs in runs.values():
        for o in objs:
            vals = o.score([r["prompt"] for r in recs], [r["response"] for r in recs])
            for r, v in zip(recs, vals):
                r.setdefault("scores", {})[o.name] = float(v)


def _norm(spec: str, metas: dict[str, dict], names: list[str]) -> NormStats | None:
    if spec == "none":
        return None
    if spec != "auto":
        from moalign.objectives.normalize import load_norm_stats

        return load_norm_stats(spec).subset(names)
    for m in metas.values():  # the first run whose saved statistics cover the objectives
        if m.get("norm") and all(n in m["norm"]["names"] for n in names):
            return NormStats.from_dict(m["norm"]).subset(names)
    return None
