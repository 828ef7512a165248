"""Best-of-N: N full responses per prompt, keep the one with the best scalarised reward."""

from __future__ import annotations

from moalign.decoding.backend import BlockStep, Selection
from moalign.decoding.registry import MethodContext, MethodSpec, register_method
from moalign.decoding.scalarize import Scalarization
from moalign.decoding.selection import EngineDecoder, ValueFn, rounded, values_for_active


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


def build_best_of_n(ctx: MethodContext, args) -> EngineDecoder:
    n, T = ctx.cfg.n, ctx.cfg.max_new_tokens
    return EngineDecoder(ctx.engine, n, T, T, best_of_n_selector(ctx.reward_fn(), ctx.scalarization()))


register_method(
    MethodSpec(
        "best-of-n",
        "`--n` full responses, keep the best by `--scalarization` (objectives on the whole response)",
        None,
        build_best_of_n,
    )
)
