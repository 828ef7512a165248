"""Controlled decoding (blockwise best-of-K): every B tokens keep the candidate block with the best
scalarised value (fixed weights: CD-Uniform / single objective; or the worst case over objectives)."""

from __future__ import annotations

from moalign.decoding.engine import BlockStep, Selection
from moalign.decoding.scalarize import Scalarization
from moalign.decoding.selection import MethodPlan, ValueFn, rounded, values_for_active


def cd_selector(value_fn: ValueFn, scalarize: Scalarization):
    def select(step: BlockStep) -> Selection:
        v, active = values_for_active(step, value_fn)
        chosen = scalarize(v).argmax(dim=1)
        info = [{"values": rounded(v[p, chosen[p]])} if active[p] else None for p in range(len(step.prompts))]
        return Selection(chosen, info)

    return select


def cd_plan(k: int, block_size: int, value_fn: ValueFn, scalarize: Scalarization) -> MethodPlan:
    return MethodPlan(k=k, block_size=block_size, selector=cd_selector(value_fn, scalarize))
