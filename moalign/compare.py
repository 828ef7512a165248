"""The ``compare`` and ``demo`` jobs: several methods on the same prompts, evaluated and plotted."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, replace
from pathlib import Path

from moalign.config import (
    CompareConfig,
    EvaluateConfig,
    GenerateConfig,
    for_method,
    refuse_unused_method_flags,
    versions,
)
from moalign.data.prompts import demo_prompts_path, load_prompts
from moalign.decoding.registry import foreign_settings, get_method, loads_policy
from moalign.errors import MoalignError
from moalign.evaluation.evaluate import evaluate_files
from moalign.evaluation.metrics import EvaluationResult
from moalign.generate import generate
from moalign.objectives.base import resolve_objectives
from moalign.policies import default_device, load_policy


def parse_method(spec: str) -> tuple[str, str, dict]:
    """``rmod:lam=0.1:k=8`` -> (label ``rmod-lam0.1-k8``, method ``rmod``, overrides)."""
    name, _, rest = spec.strip().partition(":")
    get_method(name)  # an unknown method fails here, naming the registered ones
    overrides: dict = {}
    label = name
    if rest:
        fields = {f.name for f in dataclasses.fields(GenerateConfig)}
        foreign = foreign_settings(name)
        for part in rest.split(":"):
            key, _, val = part.partition("=")
            key = key.strip().replace("-", "_")
            if key not in fields:
                raise MoalignError(f"method {spec!r}: unknown setting {key!r}")
            if key in foreign:
                raise MoalignError(f"method {spec!r}: {name} has no setting {key!r} (it belongs to "
                                   f"{', '.join(foreign[key])})")  # fmt: skip
            default = getattr(GenerateConfig(), key)
            try:
                if isinstance(default, bool):
                    if val.lower() not in ("true", "false", "1", "0"):
                        raise ValueError(val)
                    overrides[key] = val.lower() in ("true", "1")
                else:
                    overrides[key] = type(default)(val) if default is not None else val
            except ValueError:
                raise MoalignError(f"method {spec!r}: bad value {val!r} for {key}") from None
            label += f"-{key}{val}"
    return label, name, overrides


def compare(cfg: CompareConfig, progress: bool = True) -> EvaluationResult:
    """Run every method of ``cfg.methods`` into ``out_dir/LABEL.jsonl``, then evaluate against the first.

    Methods decode with ``cfg.objectives`` (the proxy); with ``cfg.judges`` their responses are then scored
    by the judges too (cached in ``out_dir/LABEL.judges.jsonl``, so a rerun scores nothing again) and every
    table, ``summary.json`` and the plot show proxy and judge figures side by side."""
    specs = [parse_method(m) for m in cfg.methods.split(",") if m.strip()]
    if not specs:
        raise MoalignError("--methods names no method")
    refuse_unused_method_flags(cfg, [m for _, m, _ in specs])
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(
        cfg.prompts or demo_prompts_path(),
        column=cfg.prompt_column,
        limit=cfg.limit,
        skip_invalid=cfg.skip_invalid,
    )
    objectives = resolve_objectives(cfg.objectives)
    if cfg.judges:
        from moalign.evaluation.evaluate import parse_judges

        parse_judges(cfg.judges)  # an unknown judge fails here, before any decoding
    policy = None  # with --backend server each run connects to the server instead
    if loads_policy(cfg.backend):
        policy = load_policy(cfg.policy, device=cfg.device or default_device(), dtype=cfg.dtype)
    base = GenerateConfig(**{k: v for k, v in asdict(cfg).items() if k in GenerateConfig.__dataclass_fields__})
    paths = []
    for label, method, overrides in specs:
        # a global method setting (--lam) applies to the methods that have it (checked above)
        gcfg = for_method(base, method, out=str(out_dir / f"{label}.jsonl"), **overrides)
        generate(gcfg, policy=policy, objectives=objectives, prompts=prompts, progress=progress)
        paths.append(gcfg.out)
    ecfg = EvaluateConfig(inputs=paths, objectives=",".join(o.name for o in objectives),
                          reference=paths[0], n_boot=cfg.n_boot, seed=cfg.seed, judges=cfg.judges)  # fmt: skip
    result = evaluate_files(ecfg)  # with judges: scores the responses (cached in LABEL.judges.jsonl)
    result.extra = {**result.extra, "config": asdict(cfg), "versions": versions(), "runs": paths}
    (out_dir / "summary.json").write_text(json.dumps(result.to_dict(), indent=2))
    from moalign.evaluation.report import plot_comparison

    plot_comparison(result, out_dir / "comparison.png")
    return result


DEMO_NOTE = (
    "Every method picks by the worst case of the z-scored objectives, what the table ranks by: best-of-n and "
    "cd with --scalarization worst-case, rmod by its worst-case weights; sample is the reference."
)


def demo_config(**overrides) -> CompareConfig:
    """About 90 seconds on 2 CPU cores, loading included: 24 bundled prompts in one batch, plain sampling and
    three methods that all optimise the worst case of helpful and harmless, judged also by relevant and
    non_toxic. (48 prompts x 48 tokens took ~4 min; at 24 x 32 RMOD's proxy gain over sampling still has an
    interval clear of zero.)"""
    cfg = CompareConfig(
        prompts=demo_prompts_path(),
        limit=24,
        methods="sample:n=1,best-of-n,cd,rmod",
        scalarization="worst-case",
        judges="relevant,non_toxic",
        n=4,
        k=4,
        block_size=16,
        max_new_tokens=32,
        batch_size=24,
        out_dir="runs/demo",
        n_boot=1000,
    )
    return replace(cfg, **overrides)
