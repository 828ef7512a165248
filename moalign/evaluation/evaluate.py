"""The ``evaluate`` job: read run files, (re)score, normalise, and compare them.

With ``--judges``, the responses are also scored by judge objectives (signals the runs did not decode with,
or did: such a judge is marked as optimised by the run) and reported beside the proxy objectives. Judge
scores are cached in a sidecar file beside each run, ``RUN.judges.jsonl`` (:func:`judges_path`), one JSON
line per (record, newly scored judges)::

    {"record_id": "3/1", "response_sha1": "...", "judge_scores": {"positive": 0.41}, "judge_specs": {"positive": "positive"}}

A cached score is reused when its record's prompt and response hash to the same ``response_sha1`` and the
judge was given by the same spec (a regenerated run or another reward model under the same name is scored
again); later lines win. The run file itself is never rewritten: it belongs to ``generate``, which appends
and resumes it, and judges can be added to finished runs at any time without touching their records.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from moalign.config import EvaluateConfig
from moalign.errors import MoalignError, SettingError
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


def evaluate(
    inputs: str | Sequence[str],
    *,
    objectives: str | Sequence[str] | None = None,
    reference: str | None = None,
    judges: str | Sequence[str] | None = None,
    normalize: str = "auto",
    rescore: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
) -> EvaluationResult:
    """Per-objective, worst-case and win-rate metrics (with bootstrap intervals) of runs written by
    ``moalign generate`` or ``moalign.decode(..., out=PATH)``; ``judges`` (names or ``rm:PATH``) score the
    responses too and are reported beside the proxy objectives. ``.table()`` prints it, ``.to_dict()`` saves it.
    """
    inputs = [inputs] if isinstance(inputs, str | os.PathLike) else [str(p) for p in inputs]
    join = lambda x: x if x is None or isinstance(x, str) else ",".join(x)  # noqa: E731
    cfg = EvaluateConfig(inputs=[str(p) for p in inputs], objectives=join(objectives), reference=reference,
                         judges=join(judges), normalize=normalize, rescore=rescore, n_boot=n_boot, seed=seed)  # fmt: skip
    return evaluate_files(cfg)


def evaluate_files(cfg: EvaluateConfig) -> EvaluationResult:
    if not cfg.inputs:
        raise SettingError("evaluate", "inputs", "names no run")
    judge_specs = parse_judges(cfg.judges) if cfg.judges else None  # an unknown judge fails before any work
    runs, metas = load_runs(cfg.inputs)
    labels = list(runs)
    reference = None
    if cfg.reference:
        ref = run_label(cfg.reference, set())
        if ref not in runs:
            raise SettingError("evaluate", "reference", f"{cfg.reference} is not one of the inputs")
        reference = ref
    if cfg.objectives:
        names = [n.strip() for n in cfg.objectives.split(",") if n.strip()]
    else:
        names = list(runs[labels[0]][0].get("scores", {}))
        if not names:
            raise SettingError("evaluate", "objectives", "are needed: the inputs carry no scores")
    decoded = {label: decoding_objectives(metas[label], runs[label]) for label in labels}
    if cfg.rescore or any(
        n not in r.get("scores", {}) for recs in runs.values() for r in recs for n in names
    ):
        _rescore(runs, names)
    norm = _norm(cfg.normalize, metas, names)
    judge_names = None
    optimised = None
    judge_files = {}
    if judge_specs is not None:
        judge_names = [o.name for _, o in judge_specs]
        for label, path in zip(labels, cfg.inputs):
            jp, n_new = score_judges(path, runs[label], judge_specs, force=cfg.rescore)
            judge_files[label] = {"path": str(jp), "newly_scored": n_new}
        optimised = {
            label: [o.name for spec, o in judge_specs if o.name in decoded[label] or spec in decoded[label]]
            for label in labels
        }
    result = evaluate_methods(
        runs, names, reference=reference, norm=norm, n_boot=cfg.n_boot, seed=cfg.seed,
        judges=judge_names, optimised=optimised, judge_norm=_shipped_judge_norm(judge_specs, metas),
    )  # fmt: skip
    if judge_specs is not None:
        result.extra = {
            **result.extra,
            "judge_specs": {o.name: spec for spec, o in judge_specs},
            "judge_files": judge_files,
            "decoding_objectives": {label: sorted(decoded[label]) for label in labels},
        }
    return result


def parse_judges(specs: str | Sequence[str]):
    """``[(spec, Objective)]`` of a comma-separated list of judge specs (names or ``rm:PATH[@INDEX]``)."""
    from moalign.objectives.base import resolve_objectives

    if isinstance(specs, str):
        specs = [s.strip() for s in specs.split(",") if s.strip()]
    specs = [str(s).strip() for s in specs]
    if not specs:
        raise SettingError("evaluate", "judges", "names no judge")
    objs = resolve_objectives(specs)  # one-line error for an unknown name; names must be unique
    return list(zip(specs, objs))


def decoding_objectives(meta: Mapping, records: Sequence[Mapping]) -> set[str]:
    """Names and specs of the objectives a run decoded with: from its ``.meta.json`` (objective names and the
    config's ``objectives`` specs), else from the config saved in its records, else (a hand-written run
    without either) the objectives its file was scored with."""
    meta = meta if isinstance(meta, Mapping) else {}
    out: set[str] = set()
    for o in meta.get("objectives") or []:
        out.add(str(o.get("name")) if isinstance(o, Mapping) else str(o))
    configs = [meta.get("config")] if meta else []
    if not out and records:
        configs.append(records[0].get("config"))
    for cfg in configs:
        if isinstance(cfg, Mapping) and isinstance(cfg.get("objectives"), str):
            specs = {x.strip() for x in cfg["objectives"].split(",") if x.strip()}
            out |= specs | {Path(x[3:]).name for x in specs if x.startswith("rm:")}
            break
    if not out and records:
        out = set(records[0].get("scores", {}))
    return out


# ------------------------------------------------------------------------------------------ judge scores
def judges_path(run_path: str | Path) -> Path:
    """The judge-score sidecar of a run: ``X.jsonl`` -> ``X.judges.jsonl``."""
    p = Path(run_path)
    return p.with_name(p.name.removesuffix(".jsonl") + ".judges.jsonl")


def record_key(rec: Mapping) -> str:
    """A record's key in the sidecar: its ``record_id``, else ``prompt_id/sample_index``."""
    if rec.get("record_id") is not None:
        return str(rec["record_id"])
    return f"{rec.get('prompt_id')}/{rec.get('sample_index') or 0}"


def response_hash(rec: Mapping) -> str:
    """Hash of what a judge scores (prompt and response): a cached score is only reused for the same text."""
    text = f"{rec.get('prompt', '')}\x00{rec.get('response', '')}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def read_judge_cache(path: str | Path) -> dict[str, dict[str, tuple[float, str, str]]]:
    """``{record key: {judge name: (score, spec, response_sha1)}}`` from a sidecar; later lines win.
    Unreadable lines (an interrupted write) are skipped: their scores are computed again."""
    p = Path(path)
    out: dict[str, dict[str, tuple[float, str, str]]] = {}
    if not p.exists():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            d = json.loads(line)
            key, h = str(d["record_id"]), str(d["response_sha1"])
            specs = d.get("judge_specs", {})
            for name, v in d["judge_scores"].items():
                out.setdefault(key, {})[str(name)] = (float(v), str(specs.get(name, name)), h)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            continue
    return out


def score_judges(run_path: str | Path, records: list[dict], judges, force: bool = False) -> tuple[Path, int]:
    """Put ``judge_scores`` into every record of a run, scoring only what its sidecar does not hold (all of
    it with ``force``) and appending the new scores there. ``judges`` is ``[(spec, Objective)]`` (see
    :func:`parse_judges`). Returns the sidecar path and the number of (record, judge) scores computed."""
    jp = judges_path(run_path)
    cache = {} if force else read_judge_cache(jp)
    keys = [record_key(r) for r in records]
    hashes = [response_hash(r) for r in records]
    for i, r in enumerate(records):
        if not isinstance(r.get("response"), str):
            raise MoalignError(f"{run_path}: record {keys[i]!r} has no 'response' for the judges to score")
        r["judge_scores"] = {}
    n_new = 0
    for spec, obj in judges:
        todo = []
        for i, r in enumerate(records):
            hit = cache.get(keys[i], {}).get(obj.name)
            if hit is not None and hit[1] == spec and hit[2] == hashes[i]:
                r["judge_scores"][obj.name] = hit[0]
            else:
                todo.append(i)
        if not todo:
            continue
        try:
            vals = obj.score(
                [records[i].get("prompt", "") for i in todo], [records[i]["response"] for i in todo]
            )
        except MoalignError as e:
            raise MoalignError(f"judge {obj.name!r} on {run_path}: {e}") from None
        lines = []
        for i, v in zip(todo, vals.tolist()):
            records[i]["judge_scores"][obj.name] = float(v)
            lines.append({"record_id": keys[i], "response_sha1": hashes[i],
                          "judge_scores": {obj.name: float(v)}, "judge_specs": {obj.name: spec}})  # fmt: skip
        _append_lines(jp, lines)
        n_new += len(todo)
    return jp, n_new


def _append_lines(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():  # drop a partial last line left by an interrupted write
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _rescore(runs: dict[str, list[dict]], names: list[str]) -> None:
    from moalign.objectives.base import resolve_objectives

    objs = resolve_objectives(names)
    for recs in runs.values():
        for o in objs:
            vals = o.score([r["prompt"] for r in recs], [r["response"] for r in recs])
            for r, v in zip(recs, vals):
                r.setdefault("scores", {})[o.name] = float(v)


def _shipped_judge_norm(judge_specs, metas: dict[str, dict]) -> NormStats | None:
    """The shipped z-score statistics of the runs' policy (policy samples on held-out prompts) when every judge is
    a built-in objective they cover; else None (the judges are then z-scored on the reference run)."""
    if not judge_specs:
        return None
    policies = {str((m.get("config") or {}).get("policy")) for m in metas.values()}
    if len(policies) != 1 or any(spec != o.name for spec, o in judge_specs):
        return None
    from moalign.objectives.normalize import covers, shipped_norm_stats

    stats = shipped_norm_stats(policies.pop())
    names = [o.name for _, o in judge_specs]
    return stats.subset(names) if covers(stats, names) else None


def _norm(spec: str, metas: dict[str, dict], names: list[str]) -> NormStats | None:
    from moalign.objectives.normalize import resolve_normalization

    def auto() -> NormStats | None:  # the first run whose saved statistics cover the objectives
        for m in metas.values():
            if m.get("norm") and all(n in m["norm"]["names"] for n in names):
                return NormStats.from_dict(m["norm"]).subset(names)
        return None

    return resolve_normalization(spec, names, auto)
    if spec != "auto":
        from moalign.objectives.normalize import load_norm_stats

        return load_norm_stats(spec).subset(names)
    for m in metas.values():  # the first run whose saved statistics cover the objectives
        if m.get("norm") and all(n in m["norm"]["names"] for n in names):
            return NormStats.from_dict(m["norm"]).subset(names)
    return None
