"""Evaluation: metrics over scored records (means, worst case, worst-case win rate, bootstrap CIs), judges and
plots.

The metrics import with numpy only; the judge helpers (:func:`ensure_judges`, :func:`judge_specs`,
:func:`parse_judges`, :func:`score_judges`, :func:`rank_agreement`) and :func:`sampled_kl` (a policy's KL to its
reference) load on first use.
"""

from moalign.evaluation.metrics import (
    EvaluationResult,
    Interval,
    JudgeSummary,
    MethodSummary,
    NormStats,
    bootstrap_ci,
    compute_per_response,
    evaluate_methods,
    fit_norm_stats,
    mean_ci,
    normalize_scores,
    paired_diff_ci,
    paired_win_ci,
    per_objective_mean,
    response_words,
    worst_case,
    worst_case_win_indicator,
    worst_case_win_rate,
)
from moalign.evaluation.results import SignalSummary

# name -> module of the helpers imported on first use (they pull in the objectives and records)
_LAZY = {
    "ensure_judges": "moalign.evaluation.judges",
    "judge_specs": "moalign.evaluation.judges",
    "parse_judges": "moalign.evaluation.evaluate",
    "rank_agreement": "moalign.evaluation.judges",
    "sampled_kl": "moalign.evaluation.kl",
    "score_judges": "moalign.evaluation.evaluate",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moalign.evaluation' has no attribute {name!r}")

__all__ = [
    "EvaluationResult",
    "Interval",
    "JudgeSummary",
    "MethodSummary",
    "NormStats",
    "SignalSummary",
    "bootstrap_ci",
    "compute_per_response",
    "ensure_judges",
    "evaluate_methods",
    "fit_norm_stats",
    "judge_specs",
    "mean_ci",
    "normalize_scores",
    "paired_diff_ci",
    "paired_win_ci",
    "parse_judges",
    "per_objective_mean",
    "rank_agreement",
    "response_words",
    "sampled_kl",
    "score_judges",
    "worst_case",
    "worst_case_win_indicator",
    "worst_case_win_rate",
]
