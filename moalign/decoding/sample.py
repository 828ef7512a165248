"""Plain sampling: N independent responses per prompt (one block of max_new_tokens, every row kept)."""

from __future__ import annotations

from moalign.decoding.backend import first_candidate
from moalign.decoding.registry import MethodContext, MethodSpec, register_method
from moalign.decoding.selection import EngineDecoder


def build_sample(ctx: MethodContext, args) -> EngineDecoder:
    n, T = ctx.cfg.n, ctx.cfg.max_new_tokens
    return EngineDecoder(ctx.engine, n, T, T, first_candidate, keep_all=True)


register_method(MethodSpec("sample", "`--n` plain samples per prompt", None, build_sample))
