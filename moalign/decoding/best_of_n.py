"""Best-of-N: N full responses per prompt, keep the one with the best scalarised reward."""

from __future__ import annotations

from moalign.decoding.engine import BlockStep, Selection
from moalign.decoding.scalarize import Scalarization
from moalign.decoding.selection import MethodPlan, ValueFn, rounded, values_for_active


def best_of_n_selector(value_fn: ValueFn, scalarize: Scalarization):
    def select(step: BlockStep) -> Selection:
        v, active = values_for_active(step, value_fn)
        s = scalarize(v)  # [P, K]
        chosen = s.argmax(dim=1)
        info = [
            {"candidate_scores": rounded(s[p]), "chosen": int(chosen[p]), "values": rounded(v[p, chosen[p]])}
            if active[p]
            else None
            for p in range(len(step.prompts))
        ]
        return Selection(chosen, info)

    return select


def best_of_n_plan(n: int, max_new_tokens: int, value_fn: ValueFn, scalarize: Scalarization) -> MethodPlan:
    return MethodPlan(k=n, block_size=max_new_tokens, selector=best_of_n_selector(value_fn, scalarize))
