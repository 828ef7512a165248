"""Evaluation: metrics over scored records (means, worst case, worst-case win rate, bootstrap CIs) and plots."""

from moalign.evaluation.metrics import (
    EvaluationResult,
    Interval,
    MethodSummary,
    NormStats,
    bootstrap_ci,
    evaluate_methods,
    fit_norm_stats,
    mean_ci,
    normalize_scores,
    paired_diff_ci,
    paired_win_ci,
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
    "mean_ci",
    "normalize_scores",
    "paired_diff_ci",
    "paired_win_ci",
    "per_objective_mean",
    "worst_case",
    "worst_case_win_indicator",
    "worst_case_win_rate",
]
