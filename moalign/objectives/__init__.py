"""Objectives: named reward signals that score (prompt, response) pairs."""

from moalign.objectives.base import (
    CallableObjective,
    Objective,
    available_objectives,
    get_objective,
    register_objective,
    resolve_objectives,
)

__all__ = [
    "CallableObjective",
    "Objective",
    "available_objectives",
    "get_objective",
    "register_objective",
    "resolve_objectives",
]
