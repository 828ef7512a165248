"""Plain sampling: N independent responses per prompt (one block of max_new_tokens, every candidate kept)."""

from __future__ import annotations

from moalign.decoding.engine import first_candidate
from moalign.decoding.selection import MethodPlan


def sample_plan(n: int, max_new_tokens: int) -> MethodPlan:
    return MethodPlan(k=n, block_size=max_new_tokens, selector=first_candidate, keep_all=True)
