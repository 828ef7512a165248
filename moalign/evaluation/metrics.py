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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moalign.arrays import as_matrix as _as_matrix
from moalign.arrays import to_numpy as _to_numpy
from moalign.arrays import wins
from moalign.errors import MoalignError
from moalign.objectives.normalize import NormStats, fit_norm_stats, normalize_scores

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


def mean_ci(values: Any, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> Interval:
    """The mean of ``values [n]`` (one per prompt) with its percentile bootstrap CI."""
    return Interval(*bootstrap_ci(np.mean, _to_numpy(values, "values"), n_boot=n_boot, alpha=alpha, seed=seed))


def paired_diff_ci(a: Any, b: Any, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> Interval:
    """``mean(a - b)`` over paired rows (the same prompts in the same order) with a paired bootstrap CI."""
    x, y = _to_numpy(a, "a"), _to_numpy(b, "b")
    if x.shape != y.shape:
        raise MoalignError(f"paired arrays differ in shape: {x.shape} vs {y.shape}")
    return Interval(*bootstrap_ci(np.mean, x - y, n_boot=n_boot, alpha=alpha, seed=seed))


def paired_win_ci(a: Any, b: Any, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> Interval:
    """Share of paired rows where ``a > b`` (ties count 1/2) with a paired bootstrap CI."""
    x, y = _to_numpy(a, "a"), _to_numpy(b, "b")
    if x.shape != y.shape:
        raise MoalignError(f"paired arrays differ in shape: {x.shape} vs {y.shape}")
    ind = wins(x, y).astype(np.float64)
    return Interval(*bootstrap_ci(np.mean, ind, n_boot=n_boot, alpha=alpha, seed=seed))


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
class JudgeSummary:
    """One method scored by the judges: raw judge means, the mean worst case over z-scored judges and its
    win rate vs the reference (``None`` for the reference itself), the gap ``proxy worst case - judge worst
    case`` (per prompt, paired), the mean response length in words, and the judges this run decoded with
    (``optimised``: not independent judges of it)."""

    objective_means: dict[str, Interval]
    worst_case: Interval
    length_words: Interval
    gap: Interval
    win_rate: Interval | None = None
    optimised: list[str] = field(default_factory=list)
    gain: Interval | None = None  # mean paired judge worst-case gain over the reference

    def to_dict(self) -> dict:
        return {
            "objective_means": {k: v.to_dict() for k, v in self.objective_means.items()},
            "worst_case": self.worst_case.to_dict(),
            "win_rate": None if self.win_rate is None else self.win_rate.to_dict(),
            "proxy_minus_judge_worst_case": self.gap.to_dict(),
            "length_words": self.length_words.to_dict(),
            "optimised": list(self.optimised),
            "gain": None if self.gain is None else self.gain.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JudgeSummary:
        return cls(
            objective_means={k: Interval.from_dict(v) for k, v in d["objective_means"].items()},
            worst_case=Interval.from_dict(d["worst_case"]),
            length_words=Interval.from_dict(d["length_words"]),
            gap=Interval.from_dict(d["proxy_minus_judge_worst_case"]),
            win_rate=None if d.get("win_rate") is None else Interval.from_dict(d["win_rate"]),
            optimised=[str(x) for x in d.get("optimised", [])],
            gain=None if d.get("gain") is None else Interval.from_dict(d["gain"]),
        )


@dataclass
class MethodSummary:
    """Metrics of one method. ``objective_means`` are on raw scores; ``worst_case``, ``win_rate`` and ``gain``
    (the mean paired worst-case gain over the reference) on the result's ``score_space``; ``win_rate`` and
    ``gain`` are ``None`` for the reference method or without a reference."""

    method: str
    n: int
    objective_means: dict[str, Interval]
    worst_case: Interval
    win_rate: Interval | None = None
    n_paired: int | None = None
    n_responses: int | None = None  # records (responses); ``n`` counts prompts. None: one per prompt
    judge: JudgeSummary | None = None  # the judges' view of this method (only when judges were given)
    #: mean tokens per response read by the policy / the scorers / both (None: records without the counts)
    compute: dict[str, float] | None = None
    gain: Interval | None = None

    @property
    def samples_per_prompt(self) -> float:
        return 1.0 if self.n_responses is None else self.n_responses / self.n

    def to_dict(self) -> dict:
        d = {
            "method": self.method,
            "n": self.n,
            "n_responses": self.n if self.n_responses is None else self.n_responses,
            "objective_means": {k: v.to_dict() for k, v in self.objective_means.items()},
            "worst_case": self.worst_case.to_dict(),
            "win_rate": None if self.win_rate is None else self.win_rate.to_dict(),
            "n_paired": self.n_paired,
            "gain": None if self.gain is None else self.gain.to_dict(),
            "compute": self.compute,
        }
        if self.judge is not None:
            d["judge"] = self.judge.to_dict()
        return d

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
            judge=None if d.get("judge") is None else JudgeSummary.from_dict(d["judge"]),
            compute=None if d.get("compute") is None else {k: float(v) for k, v in d["compute"].items()},
            gain=None if d.get("gain") is None else Interval.from_dict(d["gain"]),
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
    judges: list[str] = field(default_factory=list)  # empty: no judges (proxy figures only)
    judge_norm: NormStats | None = None  # z-score statistics of the judges (fitted on: .source)

    @property
    def judge_score_space(self) -> str | None:
        return None if self.judge_norm is None else self.judge_norm.describe()

    def to_dict(self) -> dict:
        """A JSON-able dict (plain floats, lists and strings)."""
        d = {
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
        if self.judges:
            d["judges"] = list(self.judges)
            d["judge_score_space"] = self.judge_score_space
            d["judge_norm"] = None if self.judge_norm is None else self.judge_norm.to_dict()
        return d

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
                judges=list(d.get("judges", [])),
                judge_norm=None if d.get("judge_norm") is None else NormStats.from_dict(d["judge_norm"]),
            )
        except (KeyError, TypeError) as e:
            raise MoalignError(f"not an evaluation result: missing or malformed field {e}") from None

    def table(self) -> str:
        """A plain-text aligned table: one row per method; ``±`` is the half-width of the CI.

        With judges, the PROXY columns (objectives) and the JUDGES columns (judge means, response length,
        judge worst case and win rate) stand side by side under a group row, followed by the gap
        ``proxy - judge`` of the worst case; a judge that a method decoded with is marked ``*``.
        """
        conf = round(100 * (1 - self.alpha))
        multi = any(m.samples_per_prompt != 1 for m in self.methods.values())
        judged = bool(self.judges)
        head = ["method", "n", *(["responses"] if multi else []), *[f"{g} (raw)" for g in self.objectives]]
        proxy_cols = (len(head) - len(self.objectives), None)
        head.append("worst case")
        if self.reference is not None:
            head += [f"gain vs {self.reference}", f"win vs {self.reference} (%)"]
        proxy_cols = (proxy_cols[0], len(head))
        costed = any(m.compute is not None for m in self.methods.values())
        if costed:
            head += ["policy tok", "scorer tok", "GFLOP"]
        any_mark = judged and any(m.judge is not None and m.judge.optimised for m in self.methods.values())
        if judged:
            judge_cols = (len(head), None)
            head += [f"{j} (raw)" for j in self.judges]
            head += ["length (words)", "worst case"]
            if self.reference is not None:
                head += [f"gain vs {self.reference}", f"win vs {self.reference} (%)"]
            judge_cols = (judge_cols[0], len(head))
            head.append("proxy - judge")
        rows = []
        for name, m in self.methods.items():
            row = [name, str(m.n), *([str(m.n_responses or m.n)] if multi else [])]
            row += [_pm(m.objective_means[g]) for g in self.objectives]
            row.append(_pm(m.worst_case))
            if self.reference is not None:
                row += [self._gain_cell(name, m.gain), self._win_cell(name, m.win_rate)]
            if costed:
                c = m.compute
                row += [f"{c['policy_tokens']:.0f}", f"{c['scorer_tokens']:.0f}", gflop(c.get("total_flops"))] \
                    if c else ["-", "-", "-"]  # fmt: skip
            if judged:
                js = m.judge
                if js is None:
                    raise MoalignError(f"method {name!r} has no judge scores but the result has judges")

                def mark(flag: bool) -> str:
                    return "*" if flag else (" " if any_mark else "")

                row += [_pm(js.objective_means[j]) + mark(j in js.optimised) for j in self.judges]
                row.append(_pm(js.length_words, 1) + mark(False))
                row.append(_pm(js.worst_case) + mark(bool(js.optimised)))
                if self.reference is not None:
                    row.append(self._gain_cell(name, js.gain) + mark(bool(js.optimised)))
                    row.append(self._win_cell(name, js.win_rate) + mark(bool(js.optimised)))
                row.append(_pm(js.gap, signed=True) + mark(bool(js.optimised)))
            rows.append(row)
        widths = [max(len(r[j]) for r in [head, *rows]) for j in range(len(head))]

        groups: list[tuple[str, tuple[int, int]]] = []
        if judged:
            groups = [("PROXY (decoding objectives)", proxy_cols), ("JUDGES (other signals)", judge_cols)]
            for label, (a, b) in groups:  # widen the group's last column until its label fits
                span = sum(widths[a:b]) + 2 * (b - a - 1)
                widths[b - 1] += max(0, len(label) - span)

        def fmt(r: list[str]) -> str:
            return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))

        lines = [fmt(head), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]
        if groups:
            cells, j = [], 0
            for label, (a, b) in groups:
                cells += [" " * widths[k] for k in range(j, a)]
                span = sum(widths[a:b]) + 2 * (b - a - 1)
                cells.append(label.center(span, "-") if len(label) + 2 <= span else label.ljust(span))
                j = b
            cells += [" " * widths[k] for k in range(j, len(widths))]
            lines.insert(0, "  ".join(cells).rstrip())
        per = "mean over prompts of min over objectives"
        if multi:
            per = "mean over prompts of (mean over a prompt's samples of) min over objectives; n = prompts"
        notes = [
            f"{'PROXY ' if judged else ''}worst case = {per}, on {self.score_space} scores",
            f"± = half-width of the {conf}% paired bootstrap CI ({self.n_boot} resamples)",
        ]
        if self.reference is not None:
            notes.append(
                f"gain = mean over prompts of (worst case - {self.reference}'s) [{conf}% paired bootstrap CI]; win "
                f"rate = P[worst case > {self.reference}'s] + 0.5 P[tie]; same score space, paired by prompt_id"
            )
        if costed:
            notes.append(
                "policy tok / scorer tok = mean tokens per response read by the policy (prompts, generated and "
                "re-read tokens) and by the scorers' models (what they actually read: a cache hit reads nothing); "
                "GFLOP = policy + scorers, 2 x non-embedding parameters x tokens read, per model; matched compute "
                "= equal total FLOPs"
            )
        if judged:
            notes += [
                f"JUDGES worst case{' and win rate' if self.reference is not None else ''}: the same over the "
                f"judges, on {self.judge_score_space} scores",
                "length = mean response length in words (whitespace-separated; a prompt's samples averaged)",
                "proxy - judge = mean over prompts of (proxy worst case - judge worst case), each in its own "
                "score space",
            ]
            if any_mark:
                notes.append(
                    "* optimised by this run: not an independent judge (the judge worst case, win rate and gap "
                    "include it)"
                )
        return "\n".join([*lines, *notes])

    def _gain_cell(self, name: str, gain: Interval | None) -> str:
        if gain is None:
            return "(reference)" if name == self.reference else "-"
        return f"{gain.estimate:+.3f} [{gain.low:+.2f}, {gain.high:+.2f}]"

    def _win_cell(self, name: str, wr: Interval | None) -> str:
        if wr is None:
            return "(reference)" if name == self.reference else "-"
        return f"{100 * wr.estimate:.1f} ± {100 * wr.half_width:.1f}"

    def __str__(self) -> str:
        return self.table()


def _pm(iv: Interval, digits: int = 3, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{iv.estimate:{sign}.{digits}f} ± {iv.half_width:.{digits}f}"


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
    ``forward_tokens``), by the scorers (``scorer_tokens``) and both (``total_tokens``), and the same in FLOPs
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


def gflop(x: float | None) -> str:
    """FLOPs as GFLOP in a table cell (``-`` when unknown)."""
    return "-" if x is None else f"{x / 1e9:.2f}"


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

    summaries: dict[str, MethodSummary] = {}
    for method, (ids, raw, wc_p, n_responses) in data.items():
        est, lo, hi = bootstrap_ci(per_objective_mean, raw, n_boot=n_boot, alpha=alpha, seed=seed)
        means = {g: Interval(float(est[j]), float(lo[j]), float(hi[j])) for j, g in enumerate(objectives)}
        wc = Interval(*bootstrap_ci(np.mean, wc_p, n_boot=n_boot, alpha=alpha, seed=seed))
        win = gain = None
        n_paired = None
        is_ref = reference is None or method == str(reference)
        if not is_ref:
            ref_ids, _, ref_wc, _ = data[str(reference)]
            win, n_paired, gain = _paired_win(
                method, str(reference), ids, wc_p, ref_ids, ref_wc, tie_tol, n_boot, alpha, seed
            )
        judge = None
        if judges:
            jraw_p, jwc_p, len_p = jdata[method]
            est, lo, hi = bootstrap_ci(per_objective_mean, jraw_p, n_boot=n_boot, alpha=alpha, seed=seed)
            jmeans = {g: Interval(float(est[j]), float(lo[j]), float(hi[j])) for j, g in enumerate(judges)}
            jwin = jgain = None
            if not is_ref:
                ref_ids = data[str(reference)][0]
                jwin, _, jgain = _paired_win(
                    method, str(reference), ids, jwc_p, ref_ids, jdata[str(reference)][1], tie_tol, n_boot,
                    alpha, seed,
                )  # fmt: skip
            decoded = {str(x) for x in (optimised or {}).get(method, ())}
            judge = JudgeSummary(
                objective_means=jmeans,
                worst_case=Interval(*bootstrap_ci(np.mean, jwc_p, n_boot=n_boot, alpha=alpha, seed=seed)),
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
