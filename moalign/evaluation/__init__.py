"""Evaluation: metrics over scored records (means, worst case, worst-case win rate, bootstrap CIs) and plots."""

from moalign.evaluation.metrics import (
    EvaluationResult,
    Interval,
    MethodSummary,
    NormStats,
    bootstrap_ci,
    evaluate_methods,
    fit_norm_stats,
    normalize_scores,
    per_objective_mean,
    worst_case,
    worst_case_win_indicator,
    worst_case_win_rate,
)

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
