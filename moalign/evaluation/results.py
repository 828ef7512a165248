"""The result schema of an evaluation: per method one :class:`SignalSummary` for the proxy objectives
(:class:`MethodSummary`) and one for the judges (:class:`JudgeSummary`), and the whole comparison
(:class:`EvaluationResult`), each to and from a JSON dict."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moalign.errors import MoalignError
from moalign.evaluation.statistics import Interval
from moalign.objectives.normalize import NormStats


def _iv(d: Mapping[str, Any], key: str) -> Interval | None:
    return None if d.get(key) is None else Interval.from_dict(d[key])


@dataclass(kw_only=True)
class SignalSummary:
    """What a method's summary reports for one set of signals (the proxy objectives, or the judges): raw means
    per signal, the mean worst case and, against the reference (``None`` for the reference itself or without
    one), the win rate and the mean paired worst-case gain. :class:`MethodSummary` (the proxy, with counts and
    compute) and :class:`JudgeSummary` (the judges, with length and the proxy-judge gap) extend it."""

    objective_means: dict[str, Interval]
    worst_case: Interval
    win_rate: Interval | None = None
    gain: Interval | None = None

    def _signal_dict(self) -> dict:
        return {
            "objective_means": {k: v.to_dict() for k, v in self.objective_means.items()},
            "worst_case": self.worst_case.to_dict(),
            "win_rate": None if self.win_rate is None else self.win_rate.to_dict(),
            "gain": None if self.gain is None else self.gain.to_dict(),
        }

    @staticmethod
    def _signal_fields(d: Mapping[str, Any]) -> dict:
        return {
            "objective_means": {k: Interval.from_dict(v) for k, v in d["objective_means"].items()},
            "worst_case": Interval.from_dict(d["worst_case"]),
            "win_rate": _iv(d, "win_rate"),
            "gain": _iv(d, "gain"),
        }


@dataclass(kw_only=True)
class JudgeSummary(SignalSummary):
    """One method scored by the judges: the signal summary on judges z-scored by the judges' statistics, the
    gap ``proxy worst case - judge worst case`` (per prompt, paired), the mean response length in words, and
    the judges this run decoded with (``optimised``: not independent judges of it)."""

    length_words: Interval
    gap: Interval
    optimised: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self._signal_dict(), "proxy_minus_judge_worst_case": self.gap.to_dict(),
                "length_words": self.length_words.to_dict(), "optimised": list(self.optimised)}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JudgeSummary:
        return cls(**cls._signal_fields(d), length_words=Interval.from_dict(d["length_words"]),
                   gap=Interval.from_dict(d["proxy_minus_judge_worst_case"]),
                   optimised=[str(x) for x in d.get("optimised", [])])  # fmt: skip


@dataclass(kw_only=True)
class MethodSummary(SignalSummary):
    """Metrics of one method: the signal summary on the proxy objectives (``objective_means`` raw; the worst
    case, win rate and gain on the result's ``score_space``), its prompt and response counts, its compute, and
    the judges' view of it (``judge``, only when judges were given)."""

    method: str
    n: int
    n_paired: int | None = None
    n_responses: int | None = None  # records (responses); ``n`` counts prompts. None: one per prompt
    judge: JudgeSummary | None = None
    #: mean tokens per response read by the policy / the scorers / both (None: records without the counts)
    compute: dict[str, float] | None = None

    @property
    def samples_per_prompt(self) -> float:
        return 1.0 if self.n_responses is None else self.n_responses / self.n

    def to_dict(self) -> dict:
        d = {"method": self.method, "n": self.n, "n_responses": self.n if self.n_responses is None else self.n_responses,
             **self._signal_dict(), "n_paired": self.n_paired, "compute": self.compute}  # fmt: skip
        if self.judge is not None:
            d["judge"] = self.judge.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MethodSummary:
        return cls(
            **cls._signal_fields(d),
            method=str(d["method"]),
            n=int(d["n"]),
            n_paired=None if d.get("n_paired") is None else int(d["n_paired"]),
            n_responses=None if d.get("n_responses") is None else int(d["n_responses"]),
            judge=None if d.get("judge") is None else JudgeSummary.from_dict(d["judge"]),
            compute=None if d.get("compute") is None else {k: float(v) for k, v in d["compute"].items()},
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
        """A plain-text aligned table (:func:`moalign.evaluation.tables.render_table`)."""
        from moalign.evaluation.tables import render_table

        return render_table(self)

    def __str__(self) -> str:
        return self.table()
