"""Controlled decoding (blockwise best-of-K): every B tokens keep the candidate block with the best
scalarised value (fixed weights: CD-Uniform / single objective; or the worst case over objectives)."""

from __future__ import annotations

from dataclasses import dataclass

from moalign.decoding.backend import BlockStep, Selection
from moalign.decoding.registry import MethodContext, MethodSpec, register_method
from moalign.decoding.scalarize import Scalarization
from moalign.decoding.selection import EngineDecoder, ValueFn, rounded, values_for_active
from moalign.decoding.settings import (
    MethodSettings,
    block_size_field,
    check_scalarization,
    check_values,
    k_field,
    scalarization_field,
    values_field,
)


@dataclass
class CD(MethodSettings):
    """Controlled decoding: every ``block_size`` tokens keep the best of ``k`` candidate blocks by
    ``scalarization`` of their values (``values``)."""

    k: int = k_field()
    block_size: int = block_size_field()
    scalarization: str = scalarization_field()
    values: str = values_field()

    def check(self) -> None:
        self.at_least(1, "k", "block_size")
        check_scalarization(self)
        check_values(self)


def cd_selector(value_fn: ValueFn, scalarize: Scalarization):
    def select(step: BlockStep) -> Selection:
        v, active = values_for_active(step, value_fn)
        chosen = scalarize(v).argmax(dim=1)
        info = [{"values": rounded(v[p, chosen[p]])} if active[p] else None for p in range(len(step.prompts))]
        return Selection(chosen, info)

    return select


def build_cd(ctx: MethodContext, args: CD) -> EngineDecoder:
    selector = cd_selector(ctx.value_fn(), ctx.scalarization())
    return EngineDecoder(ctx.backend, args.k, args.block_size, ctx.cfg.max_new_tokens, selector, hidden=ctx.hidden)


register_method(
    MethodSpec(
        "cd",
        "controlled decoding: every `--block-size` tokens keep the best of `--k` candidate blocks by "
        "`--scalarization` of the values (`--values`)",
        CD,
        build_cd,
    )
)
