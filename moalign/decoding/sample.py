"""Plain sampling: N independent responses per prompt (one block of max_new_tokens, every row kept)."""

from __future__ import annotations

from dataclasses import dataclass

from moalign.decoding.backend import first_candidate
from moalign.decoding.registry import MethodContext, MethodSpec, register_method
from moalign.decoding.selection import EngineDecoder
from moalign.decoding.settings import MethodSettings, n_field


@dataclass
class Sample(MethodSettings):
    """Plain sampling: ``n`` independent responses per prompt."""

    n: int = n_field()

    def check(self) -> None:
        self.at_least(1, "n")


def build_sample(ctx: MethodContext, args: Sample) -> EngineDecoder:
    T = ctx.cfg.max_new_tokens
    return EngineDecoder(ctx.backend, args.n, T, T, first_candidate, keep_all=True)


register_method(MethodSpec("sample", "`--n` plain samples per prompt", Sample, build_sample))
