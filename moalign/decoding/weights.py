"""The older import path of the RMOD worst-case weight solver: :mod:`moalign.decoding.worst_case`."""

from moalign.decoding.worst_case import (  # noqa: F401
    WeightSolution,
    rmod_objective,
    select_candidates,
    solve_worst_case_weights,
    tilted_means,
)
