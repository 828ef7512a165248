"""RMOD: robust multi-objective decoding (spec: shared/specs/rmod.md).

Every block: K candidate blocks, values v [K, G] per prompt, worst-case weights
``w* = argmin_{w in simplex} logsumexp_k(lambda v_k . w)`` (see ``moalign.decoding.weights``), then keep
``argmax_k w* . v_k`` (the paper's practical rule) or sample ``k ~ softmax(lambda v . w*)`` (the exact best
response). Each record's trace carries the per-block weights, the chosen values and the solver's gap.
"""

from __future__ import annotations

import torch

from moalign.decoding.engine import BlockStep, Selection
from moalign.decoding.selection import MethodPlan, ValueFn, rounded, values_for_active
from moalign.decoding.weights import select_candidates, solve_worst_case_weights


def rmod_selector(value_fn: ValueFn, lam: float, rule: str = "argmax", solver: str = "exact", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def select(step: BlockStep) -> Selection:
        v, active = values_for_active(step, value_fn)
        chosen = torch.zeros(len(step.prompts), dtype=torch.long)
        info: list[dict | None] = [None] * len(step.prompts)
        idx = active.nonzero().flatten()
        if len(idx) == 0:
            return Selection(chosen, info)
        va = v[idx].double()
        sol = solve_worst_case_weights(va, lam, method=solver)
        c = select_candidates(va, sol.weights.double(), lam, rule=rule, generator=gen)
        chosen[idx] = c.cpu()
        for j, p in enumerate(idx.tolist()):
            info[p] = {
                "weights": rounded(sol.weights[j]),
                "values": rounded(va[j, c[j]]),
                "gap": float(sol.gap[j]),
            }
        return Selection(chosen, info)

    return select


def rmod_plan(
    k: int, block_size: int, value_fn: ValueFn, *, lam: float, rule: str = "argmax", solver: str = "exact",
    seed: int = 0,
) -> MethodPlan:  # fmt: skip
    return MethodPlan(k=k, block_size=block_size, selector=rmod_selector(value_fn, lam, rule, solver, seed))
