"""Objectives: named reward signals that score (prompt, response) pairs.

The names below load on first use (PEP 562), so importing a submodule that needs no model (e.g.
``moalign.objectives.normalize``, which evaluation uses) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    "OBJECTIVES",
    "CallableObjective",
    "Objective",
    "available_objectives",
    "get_objective",
    "register_objective",
    "resolve_objectives",
]

if TYPE_CHECKING:
    from moalign.objectives.base import (
        OBJECTIVES,
        CallableObjective,
        Objective,
        available_objectives,
        get_objective,
        register_objective,
        resolve_objectives,
    )


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("moalign.objectives.base"), name)
    raise AttributeError(f"module 'moalign.objectives' has no attribute {name!r}")
