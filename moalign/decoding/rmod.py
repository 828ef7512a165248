"""RMOD: robust multi-objective decoding (spec: shared/specs/rmod.md).

Every block: K candidate blocks, values v [K, G] per prompt, worst-case weights
``w* = argmin_{w in simplex} logsumexp_k(lambda v_k . w)`` (see ``moalign.decoding.worst_case``), then keep
``argmax_k w* . v_k`` (the paper's practical rule) or sample ``k ~ softmax(lambda v . w*)`` (the exact best
response; drawn from the step's generator, which is seeded by the run seed and the batch). Each record's
trace carries the per-block weights, the chosen values and the solver's gap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moalign.configbase import config_field as _f
from moalign.decoding.backend import BlockStep, Selection
from moalign.decoding.registry import MethodContext, MethodSpec, register_method
from moalign.decoding.selection import EngineDecoder, ValueFn, rounded, values_for_active
from moalign.decoding.settings import MethodSettings, block_size_field, check_values, k_field, values_field
from moalign.decoding.worst_case import select_candidates, solve_worst_case_weights


@dataclass
class RMOD(MethodSettings):
    """Robust multi-objective decoding: every ``block_size`` tokens, ``k`` candidate blocks, worst-case weights
    from the tilted game of strength ``lam``, then ``rmod_select``."""

    k: int = k_field()
    block_size: int = block_size_field()
    lam: float = _f(0.5, "lambda, the tilt strength of the worst-case game")
    rmod_select: str = _f(
        "argmax", "argmax of w*.v, or sample from softmax(lambda v.w*)", choices=("argmax", "sample")
    )
    solver: str = _f(
        "exact",
        "exact worst-case solver, or the paper code's fixed-step 'reference'",
        choices=("exact", "reference"),
    )
    values: str = values_field()

    def check(self) -> None:
        self.at_least(1, "k", "block_size")
        if not isinstance(self.lam, int | float) or isinstance(self.lam, bool) or not self.lam > 0:
            self.fail("lam", f"must be > 0, got {self.lam!r}")
        self.one_of("rmod_select", ("argmax", "sample"))
        self.one_of("solver", ("exact", "reference"))
        check_values(self)


RMODArgs = RMOD  # the older name


def rmod_selector(value_fn: ValueFn, lam: float, rule: str = "argmax", solver: str = "exact"):
    def select(step: BlockStep) -> Selection:
        v, active = values_for_active(step, value_fn)
        chosen = torch.zeros(len(step.prompts), dtype=torch.long)
        info: list[dict | None] = [None] * len(step.prompts)
        idx = active.nonzero().flatten()
        if len(idx) == 0:
            return Selection(chosen, info)
        va = v[idx].double()
        sol = solve_worst_case_weights(va, lam, method=solver)
        gen = step.rng if step.rng is not None else torch.Generator().manual_seed(0)
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


def build_rmod(ctx: MethodContext, args: RMOD) -> EngineDecoder:
    selector = rmod_selector(ctx.value_fn(), args.lam, args.rmod_select, args.solver)
    return EngineDecoder(ctx.backend, args.k, args.block_size, ctx.cfg.max_new_tokens, selector, hidden=ctx.hidden)


register_method(
    MethodSpec(
        "rmod",
        "robust multi-objective decoding: every block, worst-case weights w* from an exact convex solver, "
        "then the candidate maximising w*·v (`--k`, `--block-size`, `--values`)",
        RMOD,
        build_rmod,
    )
)
