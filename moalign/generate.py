"""The ``generate`` job: prompts -> policy + method -> responses scored by every objective -> JSONL.

Records are written per batch as they are produced; re-running with the same ``--out`` resumes (prompts whose
records exist are skipped, and since every batch is seeded from the run seed and its position, the resumed
run produces the same records an uninterrupted one would).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict

from tqdm.auto import tqdm

from moalign.compute import FORMULA, KNOWN
from moalign.config import GenerateConfig, versions
from moalign.data.prompts import Prompt, load_prompts
from moalign.decoding.backend import Backend, SamplingConfig
from moalign.decoding.registry import MethodContext, foreign_settings, get_method, open_backend
from moalign.decoding.values import ObjectiveScorer
from moalign.errors import SettingError
from moalign.objectives.base import Objective, move_objectives, resolve_objectives
from moalign.objectives.normalize import (
    NormStats,
    covers,
    fit_norm_stats,
    resolve_normalization,
    shipped_norm_stats,
)
from moalign.policies import Policy, default_device, load_policy  # noqa: F401  (re-exported)
from moalign.records import RecordWriter, read_records


def batch_seed(seed: int, first_index: int) -> int:
    return zlib.crc32(f"{seed}:{first_index}".encode()) & 0x7FFFFFFF


def estimate_norm_stats(
    backend: Backend,
    prompts: list[Prompt],
    scorer: ObjectiveScorer,
    *,
    n_prompts: int = 8,
    n_samples: int = 4,
    max_new_tokens: int = 64,
    seed: int = 0,
) -> NormStats:
    """Fit z-score statistics on plain samples of the policy for the first ``n_prompts`` prompts."""
    sub = prompts[:n_prompts]
    res = backend.decode(sub, k=n_samples, block_size=max_new_tokens, max_new_tokens=max_new_tokens,
                        seed=batch_seed(seed, -1), keep_all=True)  # fmt: skip
    ps = [r.prompt.text for r in res for _ in r.candidates]
    rs = [c for r in res for c in r.candidates]
    raw = scorer.raw(ps, rs)
    return fit_norm_stats(
        raw.double().numpy(), scorer.names, source=f"{len(rs)} policy samples on these prompts"
    )


def resolve_norm(cfg: GenerateConfig, names: list[str], backend, prompts, scorer_raw) -> NormStats | None:
    def auto() -> NormStats:  # the policy's shipped statistics where they cover the objectives, else estimated
        shipped = shipped_norm_stats(cfg.policy)
        if covers(shipped, names):
            return shipped.subset(names)
        return estimate_norm_stats(backend, prompts, scorer_raw, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)

    return resolve_normalization(cfg.normalize, names, auto)


def generate(
    cfg: GenerateConfig,
    policy: Policy | None = None,
    objectives: list[Objective] | None = None,
    prompts: list[Prompt] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run one decoding method over the prompts; return the records (also appended to ``cfg.out``)."""
    cfg.validate()
    from moalign.objectives.served import served_encoder

    with served_encoder(cfg.encoder_url, cfg.encoder_api_key_env):  # --encoder-url: MiniLM embedded by a server
        return _generate(cfg, policy, objectives, prompts, progress)


def _generate(cfg: GenerateConfig, policy, objectives, prompts, progress: bool) -> list[dict]:
    spec = get_method(cfg.method)
    args = cfg.method_args()
    prompt_report: dict = {}
    if prompts is None:
        if not cfg.prompts:
            raise SettingError("generate", "prompts", "is required: a prompts file (JSONL/JSON/CSV/TXT, gzip too) or a hub dataset id")
        prompts = load_prompts(
            cfg.prompts, column=cfg.prompt_column, limit=cfg.limit, skip_invalid=cfg.skip_invalid,
            report=prompt_report,
        )  # fmt: skip
    elif cfg.limit:
        prompts = prompts[: cfg.limit]
    objectives = objectives if objectives is not None else resolve_objectives(cfg.objectives)
    names = [o.name for o in objectives]
    if cfg.encoder_url:
        from moalign.objectives.served import embeds_with_minilm

        drift = cfg.method == "darwin" and getattr(cfg, "mutation_min_similarity", 0) > 0  # Darwin's drift check
        if not drift and not any(embeds_with_minilm(o) for o in objectives):
            raise SettingError("generate", "encoder_url", f"is set but none of the objectives ({', '.join(names)}) "
                               "embeds with MiniLM (helpful, harmless, relevant do): drop it")  # fmt: skip
    sampling = SamplingConfig(cfg.temperature, cfg.top_p, cfg.top_k)
    policy, backend = open_backend(cfg, sampling, policy)  # a server backend does not use a passed local policy
    if cfg.objective_device:
        move_objectives(objectives, cfg.objective_device, policy.device)
    raw_scorer = ObjectiveScorer(objectives)
    norm = resolve_norm(cfg, names, backend, prompts, raw_scorer)
    scorer = ObjectiveScorer(objectives, norm)
    decoder = spec.build(MethodContext(cfg=cfg, policy=policy, backend=backend, scorer=scorer), args)

    meta = {
        "config": asdict(cfg),
        "method_args": asdict(args) if args is not None else None,
        "seed": cfg.seed,
        "policy": policy.describe(),
        "objectives": [o.describe() for o in objectives],
        "norm": norm.to_dict() if norm else None,
        "score_space": scorer.space(),
        "prompts_read": prompt_report or None,  # records read, skipped (--skip-invalid) and why
        "versions": versions(),
    }
    # another method's setting cannot change this method's records (a run written before it moved to its
    # method, or by a shared base config, may hold any value of it): not compared on resume
    writer = RecordWriter(cfg.out, meta, ignore=foreign_settings(cfg.method)) if cfg.out else None
    records: list[dict] = []
    n_per = decoder.n_outputs
    bar = tqdm(total=len(prompts), desc=cfg.method, unit="prompt", disable=not progress)
    try:
        for start in range(0, len(prompts), cfg.batch_size):
            batch = prompts[start : start + cfg.batch_size]
            ids = [_rid(p, start + i, j, n_per) for i, p in enumerate(batch) for j in range(n_per)]
            if writer is not None and all(r in writer.done for r in ids):
                bar.update(len(batch))
                continue
            t0 = time.perf_counter()
            outputs = decoder(
                batch, seed=batch_seed(cfg.seed, start), prompt_indices=list(range(start, start + len(batch)))
            )
            seconds = (time.perf_counter() - t0) / len(batch)
            outs = [(start + i, j, r) for i, rs in enumerate(outputs) for j, r in enumerate(rs)]
            scores = raw_scorer.raw([o[2].prompt.text for o in outs], [o[2].response for o in outs])
            for (idx, j, r), s in zip(outs, scores):
                rec = {
                    "record_id": _rid(r.prompt, idx, j, n_per),
                    "prompt_id": _pid(r.prompt, idx),
                    "sample_index": j,
                    "prompt": r.prompt.text,
                    "messages": list(r.prompt.messages),
                    "response": r.response,
                    "method": cfg.method,
                    "scores": {n: float(v) for n, v in zip(names, s)},
                    "n_tokens": len(r.token_ids),
                    "finished": r.finished,
                    # compute spent on this response: the policy's tokens and the scorers' (objectives and
                    # value functions on whole or partial responses, as the method scored them)
                    "policy_tokens": r.policy_tokens,
                    "scorer_tokens": r.scorer_tokens,
                    "scored_pairs": r.scored_pairs,
                    # FLOPs: 2 x non-embedding parameters x tokens read, per model (moalign.compute)
                    "policy_flops": r.policy_flops,
                    "scorer_flops": r.scorer_flops,
                    "scorer_reads": r.scorer_reads,  # the scorers' tokens by model
                    "seconds": round(seconds / n_per, 3),
                    "policy_seconds": round(r.policy_seconds, 3),
                    "scorer_seconds": round(r.scorer_seconds, 3),
                    "trace": r.trace,
                    "seed": cfg.seed,
                    "policy": policy.name,
                    "config": meta["config"],
                    "versions": meta["versions"],
                }
                if writer is not None:
                    writer.write(rec)
                records.append(rec)
            bar.update(len(batch))
    finally:
        bar.close()
        report = getattr(decoder, "report", None)  # what a method counted over the run (Darwin's mutations)
        if writer is not None:
            writer.close()
            cost = getattr(backend, "model_cost", None)
            before = ((writer.meta_before or {}).get("compute") or {}).get("scorers", {})  # a resumed run's models
            known = {name: c.get("params") for name, c in before.items()}
            compute = compute_totals(read_records(cfg.out), cost.params if cost else None, known)
            writer.update_meta({"compute": compute, **({"method_report": report} if report else {})})
        backend.close()
    return records


def compute_totals(records: list[dict], policy_params: int | None, known: dict | None = None) -> dict:
    """The ``compute`` entry of a run's meta, from its records: the policy and each scorer model with its
    non-embedding parameter count, tokens read and FLOPs; seconds in the policy and in scoring. ``known``:
    parameter counts of models not loaded in this process (an earlier meta's)."""
    params = {**(known or {}), **KNOWN}
    tokens: dict[str, int] = {}
    for r in records:
        for name, t in (r.get("scorer_reads") or {}).items():
            tokens[name] = tokens.get(name, 0) + int(t)
    flops = [r.get("policy_flops") for r in records]
    policy = {"params": policy_params, "tokens": sum(int(r.get("policy_tokens", 0)) for r in records),
              "flops": None if policy_params is None or None in flops else float(sum(flops))}  # fmt: skip
    if policy_params is None:
        policy["note"] = "a served policy: its parameter count is unknown here, so its cost is the tokens sent"
    scorers = {n: {"params": params.get(n), "tokens": t,
                   "flops": 2.0 * params[n] * t if params.get(n) is not None else None} for n, t in tokens.items()}  # fmt: skip
    seconds = {k: round(sum(float(r.get(f"{k}_seconds", 0.0)) for r in records), 3) for k in ("policy", "scorer")}
    return {"formula": FORMULA, "policy": policy, "scorers": scorers, "seconds": seconds}


def _pid(p: Prompt, index: int) -> str:
    return p.id if p.id is not None else str(index)


def _rid(p: Prompt, index: int, j: int, n_per: int) -> str:
    base = _pid(p, index)
    return base if n_per == 1 else f"{base}/{j}"
