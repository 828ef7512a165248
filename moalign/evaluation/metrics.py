"""Evaluation metrics for multi-objective alignment: plain functions over score matrices.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moalign.arrays import as_matrix as _as_matrix
from moalign.arrays import to_numpy as _to_numpy
from moalign.errors import MoalignError
from moalign.objectives.normalize import NormStats, fit_norm_stats, normalize_scores

__all__ = [
    "EvaluationResult",
    "Interval",
    "MethodSummary",
    "NormStats",
    "bootstrap_ci",
    "evaluate_methods",
    "fit_norm_stats",
    "normalize_scores",
    "per_objective_mean",
    "worst_case",
    "worst_case_win_indicator",
    "worst_case_win_rate",
]


# ----------------------------------------------------------------------------------------------------------
# point metrics


def per_objective_mean(scores: Any) -> np.ndarray:
    """Mean of each objective over responses: ``[n, G] -> [G]``."""
    return _as_matrix(scores, "scores").mean(axis=0)


def worst_case(scores: Any) -> np.ndarray:
    """Worst objective of each response: ``w_i = min_g scores[i, g]``, ``[n, G] -> [n]``."""
    return _as_matrix(scores, "scores", allow_empty=True).min(axis=1)


def worst_case_win_indicator(a: Any, b: Any, tol: float = 0.0) -> np.ndarray:
    """Per-pair outcome of ``a`` vs ``b`` on the worst case: 1 win, 0.5 tie, 0 loss (``[n]``).

    With ``d_i = min_g a_ig - min_g b_ig``: a tie is ``|d_i| <= tol`` (``tol=0``: exact equality), a win
    ``d_i > tol``.
    """
    a = _as_matrix(a, "a", allow_empty=True)
    b = _as_matrix(b, "b", allow_empty=True)
    if a.shape != b.shape:
        raise MoalignError(f"paired score matrices differ in shape: a {a.shape} vs b {b.shape}")
    if not (tol >= 0 and math.isfinite(tol)):
        raise MoalignError(f"tie tolerance must be finite and >= 0, got {tol}")
    d = a.min(axis=1) - b.min(axis=1)
    tie = np.abs(d) <= tol
    win = d > tol
    return win.astype(np.float64) + 0.5 * tie.astype(np.float64)


def worst_case_win_rate(a: Any, b: Any, tol: float = 0.0) -> float:
    """``P[min_g a_g > min_g b_g] + 0.5 P[tie]`` over paired rows of ``a`` and ``b`` (both ``[n, G]``).

    Ties are ``|min a - min b| <= tol``. ``win_rate(a, b) + win_rate(b, a) == 1`` for any inputs.
    """
    ind = worst_case_win_indicator(a, b, tol)
    if ind.size == 0:
        raise MoalignError("worst-case win rate of zero pairs is undefined")
    return float(ind.mean())


# ----------------------------------------------------------------------------------------------------------
# bootstrap


def bootstrap_ci(
    stat_fn: Callable[..., Any],
    *arrays: Any,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[Any, Any, Any]:
    """Paired percentile bootstrap: ``(estimate, low, high)`` of ``stat_fn(*arrays)``.

    Each replicate draws ``n`` row indices with replacement (one draw shared by all ``arrays``, which keeps
    pairs together) and evaluates ``stat_fn`` on the resampled arrays; the interval is the ``alpha/2`` and
    ``1 - alpha/2`` quantiles of the replicates. ``stat_fn`` may return a scalar (floats come back) or an
    array (arrays come back, quantiles taken elementwise). Reproducible for a given ``seed``.
    """
    if not arrays:
        raise MoalignError("bootstrap_ci needs at least one array")
    n_boot = int(n_boot)
    if n_boot < 1:
        raise MoalignError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise MoalignError(f"alpha must be in (0, 1), got {alpha}")
    arrs = [_to_numpy(a, f"bootstrap array {i}") for i, a in enumerate(arrays)]
    for i, a in enumerate(arrs):
        if a.ndim == 0:
            raise MoalignError(f"bootstrap array {i} is a scalar; rows are resampled along axis 0")
    n = arrs[0].shape[0]
    if any(a.shape[0] != n for a in arrs):
        raise MoalignError(f"bootstrap arrays differ in length: {[a.shape[0] for a in arrs]}")
    if n == 0:
        raise MoalignError("bootstrap_ci needs at least one row")

    estimate = np.asarray(stat_fn(*arrs), dtype=np.float64)
    rng = np.random.default_rng(seed)
    reps = np.empty((n_boot, *estimate.shape), dtype=np.float64)
    for k in range(n_boot):
        idx = rng.integers(0, n, size=n)
        reps[k] = np.asarray(stat_fn(*(a[idx] for a in arrs)), dtype=np.float64)
    low, high = np.quantile(reps, [alpha / 2, 1 - alpha / 2], axis=0)
    if estimate.ndim == 0:
        return float(estimate), float(low), float(high)
    return estimate, low, high


# ----------------------------------------------------------------------------------------------------------
# comparison of methods


@dataclass(frozen=True)
class Interval:
    """A point estimate with a confidence interval ``[low, high]``."""

    estimate: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def to_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Interval:
        return cls(float(d["estimate"]), float(d["low"]), float(d["high"]))


@dataclass
class MethodSummary:
    """Metrics of one method. ``objective_means`` are on raw scores; ``worst_case`` and ``win_rate`` on the
    result's ``score_space``. ``win_rate`` is ``None`` for the reference method or without a reference."""

    method: str
    n: int
    objective_means: dict[str, Interval]
    worst_case: Interval
    win_rate: Interval | None = None
    n_paired: int | None = None
    n_responses: int | None = None  # records (responses); ``n`` counts prompts. None: one per prompt

    @property
    def samples_per_prompt(self) -> float:
        return 1.0 if self.n_responses is None else self.n_responses / self.n

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "n": self.n,
            "n_responses": self.n if self.n_responses is None else self.n_responses,
            "objective_means": {k: v.to_dict() for k, v in self.objective_means.items()},
            "worst_case": self.worst_case.to_dict(),
            "win_rate": None if self.win_rate is None else self.win_rate.to_dict(),
            "n_paired": self.n_paired,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MethodSummary:
        return cls(
            method=str(d["method"]),
            n=int(d["n"]),
            objective_means={k: Interval.from_dict(v) for k, v in d["objective_means"].items()},
            worst_case=Interval.from_dict(d["worst_case"]),
            win_rate=None if d.get("win_rate") is None else Interval.from_dict(d["win_rate"]),
            n_paired=None if d.get("n_paired") is None else int(d["n_paired"]),
            n_responses=None if d.get("n_responses") is None else int(d["n_responses"]),
        )


@dataclass
class EvaluationResult:
    """Metrics of several methods on the same prompts (see :func:`evaluate_methods`)."""

    objectives: list[str]
    methods: dict[str, MethodSummary]
    reference: str | None
    score_space: str
    n_boot: int
    alpha: float
    seed: int
    tie_tol: float = 0.0
    norm: NormStats | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-able dict (plain floats, lists and strings)."""
        return {
            "objectives": list(self.objectives),
            "reference": self.reference,
            "score_space": self.score_space,
            "n_boot": self.n_boot,
            "alpha": self.alpha,
            "seed": self.seed,
            "tie_tol": self.tie_tol,
            "norm": None if self.norm is None else self.norm.to_dict(),
            "methods": {k: v.to_dict() for k, v in self.methods.items()},
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvaluationResult:
        try:
            return cls(
                objectives=list(d["objectives"]),
                methods={k: MethodSummary.from_dict(v) for k, v in d["methods"].items()},
                reference=d.get("reference"),
                score_space=str(d["score_space"]),
                n_boot=int(d["n_boot"]),
                alpha=float(d["alpha"]),
                seed=int(d["seed"]),
                tie_tol=float(d.get("tie_tol", 0.0)),
                norm=None if d.get("norm") is None else NormStats.from_dict(d["norm"]),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError) as e:
            raise MoalignError(f"not an evaluation result: missing or malformed field {e}") from None

    def table(self) -> str:
        """A plain-text aligned table: one row per method; ``±`` is the half-width of the CI."""
        conf = round(100 * (1 - self.alpha))
        multi = any(m.samples_per_prompt != 1 for m in self.methods.values())
        head = ["method", "n", *(["responses"] if multi else []), *[f"{g} (raw)" for g in self.objectives]]
        head.append("worst case")
        if self.reference is not None:
            head.append(f"win vs {self.reference} (%)")
        rows = []
        for name, m in self.methods.items():
            row = [name, str(m.n), *([str(m.n_responses or m.n)] if multi else [])]
            row += [_pm(m.objective_means[g]) for g in self.objectives]
            row.append(_pm(m.worst_case))
            if self.reference is not None:
                if m.win_rate is None:
                    row.append("(reference)" if name == self.reference else "-")
                else:
                    wr = m.win_rate
                    row.append(f"{100 * wr.estimate:.1f} ± {100 * wr.half_width:.1f}")
            rows.append(row)
        widths = [max(len(r[j]) for r in [head, *rows]) for j in range(len(head))]

        def fmt(r: list[str]) -> str:
            return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))

        lines = [fmt(head), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]
        per = "mean over prompts of min over objectives"
        if multi:
            per = "mean over prompts of (mean over a prompt's samples of) min over objectives; n = prompts"
        notes = [
            f"worst case = {per}, on {self.score_space} scores",
            f"± = half-width of the {conf}% paired bootstrap CI ({self.n_boot} resamples)",
        ]
        if self.reference is not None:
            notes.append(
                f"win rate = P[worst case > {self.reference}'s] + 0.5 P[tie], same score space, paired by prompt_id"
            )
        return "\n".join([*lines, *notes])

    def __str__(self) -> str:
        return self.table()


def _pm(iv: Interval) -> str:
    return f"{iv.estimate:.3f} ± {iv.half_width:.3f}"


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
    method: str, records: Sequence[Mapping[str, Any]], objectives: Sequence[str]
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
        sc = rec.get("scores")
        if not isinstance(sc, Mapping):
            raise MoalignError(f"{where}: record has no 'scores' dict")
        row = []
        for g in objectives:
            if g not in sc:
                raise MoalignError(f"{where}: no score for objective {g!r} (scores present: {sorted(sc)})")
            try:
                v = float(sc[g])
            except (TypeError, ValueError):
                raise MoalignError(f"{where}: score for {g!r} is not a number ({sc[g]!r})") from None
            if not math.isfinite(v):
                raise MoalignError(f"{where}: score for {g!r} is {v} (not finite)")
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


def evaluate_methods(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    objectives: Sequence[str],
    reference: str | None = None,
    norm: NormStats | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    tie_tol: float = 0.0,
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

    summaries: dict[str, MethodSummary] = {}
    for method, (ids, raw, wc_p, n_responses) in data.items():
        est, lo, hi = bootstrap_ci(per_objective_mean, raw, n_boot=n_boot, alpha=alpha, seed=seed)
        means = {g: Interval(float(est[j]), float(lo[j]), float(hi[j])) for j, g in enumerate(objectives)}
        wc = Interval(*bootstrap_ci(np.mean, wc_p, n_boot=n_boot, alpha=alpha, seed=seed))
        win = None
        n_paired = None
        if reference is not None and method != str(reference):
            ref_ids, _, ref_wc, _ = data[str(reference)]
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
            ind = worst_case_win_indicator(wc_p[ia, None], ref_wc[ib, None], tie_tol)
            win = Interval(*bootstrap_ci(np.mean, ind, n_boot=n_boot, alpha=alpha, seed=seed))
            n_paired = len(pairs)
        summaries[method] = MethodSummary(
            method=method,
            n=raw.shape[0],
            objective_means=means,
            worst_case=wc,
            win_rate=win,
            n_paired=n_paired,
            n_responses=n_responses,
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
    )
