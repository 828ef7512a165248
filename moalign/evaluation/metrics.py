"""Evaluating runs: scored records -> an :class:`~moalign.evaluation.results.EvaluationResult`
(:func:`evaluate_methods`). The statistics are :mod:`moalign.evaluation.statistics`, the result schema
:mod:`moalign.evaluation.results`, the text table :mod:`moalign.evaluation.tables` (their names are re-exported
here).

A score matrix ``scores`` has shape ``[n, G]``: ``n`` responses (one per prompt) scored by ``G`` objectives,
higher is better. Inputs may be numpy arrays, torch tensors or nested sequences; everything is computed in
float64 numpy and returned as numpy arrays / Python floats.

:func:`evaluate_methods` also takes runs with several responses per prompt (records sharing a ``prompt_id``,
told apart by ``sample_index``): it averages each prompt's samples first, so every method has one row per
prompt and methods pair by prompt whatever their number of samples.

Metrics (see ``specs/rmod.md``):

* per-objective mean      ``m_g = (1/n) sum_i r_ig``
* worst case              ``w_i = min_g r_ig``; reported as its mean ``E_x[min_g r_g(x, y)]``
* worst-case win rate     ``P[min_g a_g > min_g b_g] + 0.5 P[tie]`` for paired responses ``a``, ``b``
* paired percentile bootstrap confidence intervals for any of these statistics.

The minimum over objectives is scale-sensitive, so the worst case and the win rate are usually computed on
z-scored rewards ``z_g = (r_g - mu_g) / sigma_g`` with statistics ``(mu, sigma)`` fitted once on a reference
set (:class:`~moalign.objectives.normalize.NormStats`); every result records which score space was used.

Proxy and judges: the ``objectives`` are the PROXY (usually the signals a method decoded with, in each record's
``scores``); optional ``judges`` are other signals, in each record's ``judge_scores``, reported beside them with
their own means, worst case and win rate, the per-method gap ``proxy worst case - judge worst case`` and the mean
response length in words. Judges are z-scored with statistics fitted on the reference run's responses (all runs
pooled without a reference, or when a judge is constant on the reference); the statistics are kept in the
result. A judge that a run decoded with is listed in that method's ``JudgeSummary.optimised``.

Compute: each method's mean cost per response (:func:`compute_per_response`), from the records' counts of the
tokens the policy read (``policy_tokens``) and the tokens the scorers read (``scorer_tokens``: objectives and
value functions, on whole or partial responses, as the method scored them); their sum is the total a
comparison "at matched compute" holds equal.
"""


from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from moalign.errors import MoalignError
from moalign.evaluation.results import EvaluationResult, JudgeSummary, MethodSummary  # noqa: F401
from moalign.evaluation.statistics import (  # noqa: F401  (re-exported: the older import path)
    Interval,
    bootstrap_ci,
    mean_ci,
    paired_diff_ci,
    paired_win_ci,
    per_objective_mean,
    worst_case,
    worst_case_win_indicator,
    worst_case_win_rate,
)
from moalign.evaluation.tables import gflop  # noqa: F401
from moalign.objectives.normalize import NormStats, fit_norm_stats, normalize_scores  # noqa: F401

__all__ = [
    "EvaluationResult",
    "Interval",
    "JudgeSummary",
    "MethodSummary",
    "NormStats",
    "bootstrap_ci",
    "compute_per_response",
    "evaluate_methods",
    "fit_judge_norm",
    "fit_norm_stats",
    "mean_ci",
    "normalize_scores",
    "paired_diff_ci",
    "paired_win_ci",
    "per_objective_mean",
    "response_words",
    "worst_case",
    "worst_case_win_indicator",
    "worst_case_win_rate",
]


def _sample_index(method: str, pid: str, rec: Mapping[str, Any]) -> int:
    """A record's ``sample_index`` (0 when absent or null)."""
    si = rec.get("sample_index")
    if si is None:
        return 0
    if isinstance(si, bool) or not isinstance(si, (int, np.integer)) or si < 0:
        raise MoalignError(
            f"method {method!r}, prompt {pid!r}: sample_index must be an integer >= 0, got {si!r}"
        )
    return int(si)


def _score_matrix(
    method: str,
    records: Sequence[Mapping[str, Any]],
    objectives: Sequence[str],
    key: str = "scores",
    what: str = "objective",
) -> tuple[list[str], np.ndarray]:
    """``(prompt_ids, scores [n, G])`` of one method's records, validated: one row per record (response).

    Several records may share a ``prompt_id`` (several samples of one prompt); ``(prompt_id, sample_index)``
    must be unique, a record without ``sample_index`` being sample 0.
    """
    if isinstance(records, Mapping) or isinstance(records, str):
        raise MoalignError(
            f"method {method!r}: expected a list of records (dicts), got {type(records).__name__}"
        )
    ids: list[str] = []
    rows: list[list[float]] = []
    seen: set[tuple[str, int]] = set()
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise MoalignError(f"method {method!r}: record {i} is not a dict ({type(rec).__name__})")
        if rec.get("prompt_id") is None:
            raise MoalignError(f"method {method!r}: record {i} has no 'prompt_id'")
        pid = str(rec["prompt_id"])
        si = _sample_index(method, pid, rec)
        if (pid, si) in seen:
            hint = "" if "sample_index" in rec else " (a record without 'sample_index' is sample 0)"
            raise MoalignError(
                f"method {method!r}: prompt_id {pid!r} with sample_index {si} appears more than once{hint}"
            )
        seen.add((pid, si))
        where = f"method {method!r}, prompt {pid!r}" + (f" sample {si}" if si else "")
        sc = rec.get(key)
        if not isinstance(sc, Mapping):
            raise MoalignError(f"{where}: record has no {key!r} dict")
        row = []
        for g in objectives:
            if g not in sc:
                raise MoalignError(f"{where}: no score for {what} {g!r} (scores present: {sorted(sc)})")
            try:
                v = float(sc[g])
            except (TypeError, ValueError):
                raise MoalignError(f"{where}: score for {what} {g!r} is not a number ({sc[g]!r})") from None
            if not math.isfinite(v):
                raise MoalignError(f"{where}: score for {what} {g!r} is {v} (not finite)")
            row.append(v)
        ids.append(pid)
        rows.append(row)
    if not rows:
        raise MoalignError(f"method {method!r} has no records")
    return ids, np.asarray(rows, dtype=np.float64)


def _mean_by_prompt(prompt_ids: Sequence[str], values: np.ndarray) -> tuple[list[str], np.ndarray]:
    """``(unique prompt_ids in first-seen order, mean of the rows of each)``: ``values`` is ``[n, ...]``."""
    pos: dict[str, int] = {}
    group = np.array([pos.setdefault(pid, len(pos)) for pid in prompt_ids], dtype=np.intp)
    sums = np.zeros((len(pos), *values.shape[1:]), dtype=np.float64)
    np.add.at(sums, group, values)
    counts = np.bincount(group, minlength=len(pos)).astype(np.float64)
    return list(pos), sums / counts.reshape(-1, *([1] * (values.ndim - 1)))


def compute_per_response(records: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """Mean compute per response: tokens read by the policy (``policy_tokens``, or the older
    ``policy_tokens``), by the scorers (``scorer_tokens``) and both (``total_tokens``), and the same in FLOPs
    (``policy_flops``, ``scorer_flops``, ``total_flops``: 2 x non-embedding parameters x tokens read, per
    model). None when a record lacks the token counts (runs written before they were recorded); the FLOPs are
    left out when a record lacks them (older runs, or a served policy whose size is unknown)."""
    pol, sc, pf, sf = [], [], [], []
    for rec in records:
        p = rec.get("policy_tokens", rec.get("forward_tokens"))
        s = rec.get("scorer_tokens")
        if p is None or s is None:
            return None
        pol.append(float(p))
        sc.append(float(s))
        pf.append(rec.get("policy_flops"))
        sf.append(rec.get("scorer_flops"))
    if not pol:
        return None
    p, s = float(np.mean(pol)), float(np.mean(sc))
    out = {"policy_tokens": p, "scorer_tokens": s, "total_tokens": p + s}
    if None not in pf and None not in sf:
        a, b = float(np.mean(pf)), float(np.mean(sf))
        out.update(policy_flops=a, scorer_flops=b, total_flops=a + b)
    return out


def response_words(text: Any) -> int:
    """Length of a response in words: whitespace-separated tokens."""
    return len(str(text).split())


def _words(method: str, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec.get("response"), str):
            raise MoalignError(
                f"method {method!r}: record {i} (prompt {rec.get('prompt_id')!r}) has no 'response' text "
                "(the judges' length column needs it)"
            )
        out.append(response_words(rec["response"]))
    return np.asarray(out, dtype=np.float64)


def _paired_win(
    method: str,
    reference: str,
    ids: Sequence[str],
    wc: np.ndarray,
    ref_ids: Sequence[str],
    ref_wc: np.ndarray,
    tie_tol: float,
    n_boot: int,
    alpha: float,
    seed: int,
) -> tuple[Interval, int, Interval]:
    """Worst-case win rate of per-prompt worst cases ``wc`` vs the reference's, paired by prompt_id; the
    number of pairs; and the mean paired gain ``wc - ref_wc`` (both with paired bootstrap CIs)."""
    ref_pos = {pid: j for j, pid in enumerate(ref_ids)}
    pairs = [(i, ref_pos[pid]) for i, pid in enumerate(ids) if pid in ref_pos]
    if not pairs:
        raise MoalignError(
            f"method {method!r} and reference {reference!r} share no prompt_id: "
            "the win rate needs responses to the same prompts"
        )
    ia = np.array([p[0] for p in pairs])
    ib = np.array([p[1] for p in pairs])
    # a one-column matrix: min over objectives is the per-prompt worst case itself
    ind = worst_case_win_indicator(wc[ia, None], ref_wc[ib, None], tie_tol)
    win = Interval(*bootstrap_ci(np.mean, ind, n_boot=n_boot, alpha=alpha, seed=seed))
    gain = Interval(*bootstrap_ci(np.mean, wc[ia] - ref_wc[ib], n_boot=n_boot, alpha=alpha, seed=seed))
    return win, len(pairs), gain


def fit_judge_norm(
    judge_raw: Mapping[str, np.ndarray], judges: Sequence[str], reference: str | None
) -> NormStats:
    """Z-score statistics of the judges: fitted on the reference run's responses (every sample), or on all
    runs' responses pooled when there is no reference or a judge is constant on the reference; the
    statistics' ``source`` says which."""
    if reference is not None:
        try:
            return fit_norm_stats(
                judge_raw[reference], judges, source=f"judges fitted on reference run {reference!r}"
            )
        except MoalignError:
            const = [j for k, j in enumerate(judges) if not judge_raw[reference][:, k].std() > 0]
            names = ", ".join(map(repr, const))
            source = f"judges fitted on all runs pooled ({names} constant on {reference!r})"
    else:
        source = "judges fitted on all runs pooled"
    pooled = np.concatenate([judge_raw[m] for m in judge_raw], axis=0)
    return fit_norm_stats(pooled, judges, source=source)


def evaluate_methods(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    objectives: Sequence[str],
    reference: str | None = None,
    norm: NormStats | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    tie_tol: float = 0.0,
    judges: Sequence[str] | None = None,
    judge_norm: NormStats | None = None,
    optimised: Mapping[str, Sequence[str]] | None = None,
) -> EvaluationResult:
    """Compare methods on the same prompts.

    ``runs`` maps a method name to its records (``{"prompt_id", "scores": {objective: value}, ...}``,
    optionally ``"sample_index"``). For each method: the number of prompts, per-objective means (raw scores)
    and the mean worst case ``mean_i min_g z_ig`` (z-scored with ``norm`` when given, else raw), each with a
    percentile bootstrap CI; with a ``reference`` method, the worst-case win rate vs the reference on the
    prompts both answered (paired by ``prompt_id``, same score space as the worst case), with a paired
    bootstrap CI.

    A method may hold several responses per prompt (records sharing a ``prompt_id``, told apart by an integer
    ``sample_index``; a record without one is sample 0, and a repeated ``(prompt_id, sample_index)`` is an
    error). Each prompt then counts once: its objective scores are the mean over its samples, its worst case
    the mean over its samples of each sample's ``min_g z_g``, and the win rate compares these per-prompt
    worst cases. The bootstrap resamples prompts. ``MethodSummary.n`` counts prompts and ``n_responses``
    records.

    ``judges`` (names in each record's ``judge_scores``) adds a :class:`JudgeSummary` per method: the same
    metrics over the judges, with the worst case on judges z-scored by ``judge_norm`` (default:
    :func:`fit_judge_norm`, i.e. fitted on the reference run's responses, else all runs pooled), the gap
    ``mean_prompts(proxy worst case - judge worst case)`` and the mean response length in words (a prompt's
    samples averaged), all with bootstrap CIs. ``optimised[method]`` names the objectives that method decoded
    with; judges among them are listed in its ``JudgeSummary.optimised``.
    """
    objectives = [str(g) for g in objectives]
    if not objectives:
        raise MoalignError("no objectives to evaluate")
    if len(set(objectives)) != len(objectives):
        raise MoalignError(f"duplicate objectives: {objectives}")
    if not runs:
        raise MoalignError("no runs to evaluate")
    if reference is not None and reference not in runs:
        raise MoalignError(f"reference method {reference!r} is not among the runs {sorted(runs)}")
    judges = [str(j) for j in judges] if judges else []
    if len(set(judges)) != len(judges):
        raise MoalignError(f"duplicate judges: {judges}")
    if norm is not None:
        norm = norm.subset(objectives)
        score_space = norm.describe()
    else:
        score_space = "raw"

    # per method, one row per prompt: raw objective means [P, G] and the worst case [P] (in score space),
    # each the mean over the prompt's samples (the worst case taken per sample first)
    data: dict[str, tuple[list[str], np.ndarray, np.ndarray, int]] = {}
    for method, records in runs.items():
        ids, raw = _score_matrix(str(method), records, objectives)
        wc_sample = worst_case(norm.apply(raw) if norm is not None else raw)
        pids, raw_p = _mean_by_prompt(ids, raw)
        _, wc_p = _mean_by_prompt(ids, wc_sample)
        data[str(method)] = (pids, raw_p, wc_p, len(ids))

    # the judges: raw scores per response, their statistics, then per prompt as above (+ length in words)
    jdata: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    if judges:
        jraw = {}
        for method, records in runs.items():
            _, jraw[str(method)] = _score_matrix(
                str(method), records, judges, key="judge_scores", what="judge"
            )
        if judge_norm is None:
            judge_norm = fit_judge_norm(jraw, judges, None if reference is None else str(reference))
        else:
            judge_norm = judge_norm.subset(judges)
        for method, records in runs.items():
            ids, _ = _score_matrix(str(method), records, objectives)
            m = str(method)
            _, jraw_p = _mean_by_prompt(ids, jraw[m])
            _, jwc_p = _mean_by_prompt(ids, worst_case(judge_norm.apply(jraw[m])))
            _, len_p = _mean_by_prompt(ids, _words(m, records))
            jdata[m] = (jraw_p, jwc_p, len_p)

    def signal_summary(method: str, names: list[str], raw_p, wc_p, ids, ref_wc):
        """What the proxy and the judges both report: means per signal, the worst case and, against the
        reference's per-prompt worst case ``ref_wc`` (None for the reference itself), the win rate and gain."""
        est, lo, hi = bootstrap_ci(per_objective_mean, raw_p, n_boot=n_boot, alpha=alpha, seed=seed)
        means = {g: Interval(float(est[j]), float(lo[j]), float(hi[j])) for j, g in enumerate(names)}
        wc = Interval(*bootstrap_ci(np.mean, wc_p, n_boot=n_boot, alpha=alpha, seed=seed))
        win = n_paired = gain = None
        if ref_wc is not None:
            ref_ids = data[str(reference)][0]
            win, n_paired, gain = _paired_win(method, str(reference), ids, wc_p, ref_ids, ref_wc, tie_tol, n_boot,
                                              alpha, seed)  # fmt: skip
        return means, wc, win, n_paired, gain

    summaries: dict[str, MethodSummary] = {}
    for method, (ids, raw, wc_p, n_responses) in data.items():
        is_ref = reference is None or method == str(reference)
        means, wc, win, n_paired, gain = signal_summary(method, objectives, raw, wc_p, ids,
                                                        None if is_ref else data[str(reference)][2])  # fmt: skip
        judge = None
        if judges:
            jraw_p, jwc_p, len_p = jdata[method]
            jmeans, jwc, jwin, _, jgain = signal_summary(method, judges, jraw_p, jwc_p, ids,
                                                         None if is_ref else jdata[str(reference)][1])  # fmt: skip
            decoded = {str(x) for x in (optimised or {}).get(method, ())}
            judge = JudgeSummary(
                objective_means=jmeans,
                worst_case=jwc,
                length_words=Interval(*bootstrap_ci(np.mean, len_p, n_boot=n_boot, alpha=alpha, seed=seed)),
                gap=Interval(*bootstrap_ci(np.mean, wc_p - jwc_p, n_boot=n_boot, alpha=alpha, seed=seed)),
                win_rate=jwin,
                optimised=[j for j in judges if j in decoded],
                gain=jgain,
            )
        summaries[method] = MethodSummary(
            compute=compute_per_response(runs[method]),
            method=method,
            n=raw.shape[0],
            objective_means=means,
            worst_case=wc,
            win_rate=win,
            gain=gain,
            n_paired=n_paired,
            n_responses=n_responses,
            judge=judge,
        )

    return EvaluationResult(
        objectives=objectives,
        methods=summaries,
        reference=None if reference is None else str(reference),
        score_space=score_space,
        n_boot=int(n_boot),
        alpha=float(alpha),
        seed=int(seed),
        tie_tol=float(tie_tol),
        norm=norm,
        judges=judges,
        judge_norm=judge_norm if judges else None,
    )
