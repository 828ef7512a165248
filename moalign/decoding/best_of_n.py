"""Best-of-N: N full responses per prompt, keep the one with the best scalarised reward."""

from __future__ import annotations

from dataclasses import dataclass

from moalign.decoding.backend import BlockStep, Selection
from moalign.decoding.registry import MethodContext, MethodSpec, register_method
from moalign.decoding.scalarize import Scalarization
from moalign.decoding.selection import EngineDecoder, ValueFn, rounded, values_for_active
from moalign.decoding.settings import MethodSettings, check_scalarization, n_field, scalarization_field


@dataclass
class BestOfN(MethodSettings):
    """Best-of-N: ``n`` full responses per prompt, keep the best by ``scalarization`` of the objectives."""

    n: int = n_field("candidates per prompt (N)")
    scalarization: str = scalarization_field()

    def check(self) -> None:
        self.at_least(1, "n")
        check_scalarization(self)


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


def build_best_of_n(ctx: MethodContext, args: BestOfN) -> EngineDecoder:
    T = ctx.cfg.max_new_tokens
    return EngineDecoder(ctx.backend, args.n, T, T, best_of_n_selector(ctx.reward_fn(), ctx.scalarization()))


register_method(
    MethodSpec(
        "best-of-n",
        "`--n` full responses, keep the best by `--scalarization` (objectives on the whole response)",
        BestOfN,
        build_best_of_n,
    )
)
