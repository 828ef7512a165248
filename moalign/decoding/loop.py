"""The one blockwise loop: any :class:`~moalign.decoding.backend.Backend` + a selector -> results.

The loop decodes P *groups* at a time, each with K rows. A group answers one original prompt (what the
objectives score against); each row decodes from its own prompt (by default the group's prompt; a search
method such as Darwin gives row j a mutated instruction). Every B tokens a *selector* sees all rows and
returns, per row, the row it continues from (``parents [P, K]``, within the group):

- plain sampling: the identity (every row keeps its own state);
- best-of-N, controlled decoding, RMOD: every row continues from the group's chosen row (the winner is
  broadcast);
- Darwin: the top-k rows keep their state, every other unfinished row copies a random top-k row.

A row whose own prompt differs from its parent's keeps its own prompt: it is re-prefilled as its own prompt +
the copied response tokens (``recache="reprefill"``, only those rows are), or takes the parent's state whole
(``recache="copy"``: cheaper, but the row then continues conditioned on the parent's prompt).

Rows that reach an end-of-turn token stop. The final block may be shorter than B. Every result carries what
the policy read for its group (``policy_tokens``) and what the scorers read
(``scorer_tokens``, ``scored_pairs``), so methods can be compared at matched compute.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from moalign.compute import scoring_scope
from moalign.data.prompts import Prompt
from moalign.decoding.backend import (
    RECACHE,
    Backend,
    BlockStep,
    DecodeResult,
    ScoringCost,
    Selection,
    Selector,
    first_candidate,
)
from moalign.errors import MoalignError


def check_decode_args(prompts, k, block_size, max_new_tokens, recache, row_prompts, prompt_indices):
    """``(prompts as a list, prompt indices)`` or a one-line :class:`MoalignError` naming the bad argument."""
    if k < 1:
        raise MoalignError(f"K (candidates per block) must be >= 1, got {k}")
    if block_size < 1:
        raise MoalignError(f"block size must be >= 1, got {block_size}")
    if max_new_tokens < 1:
        raise MoalignError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if recache not in RECACHE:
        raise MoalignError(f"recache must be one of {RECACHE}, got {recache!r}")
    prompts = list(prompts)
    P = len(prompts)
    if row_prompts is not None and (len(row_prompts) != P or any(len(r) != k for r in row_prompts)):
        raise MoalignError(f"row_prompts must be {P} groups of K={k} prompts")
    indices = list(prompt_indices) if prompt_indices is not None else list(range(P))
    if len(indices) != P or len(set(indices)) != P:
        raise MoalignError(f"prompt_indices must be {P} distinct indices, got {indices}")
    return prompts, indices


def _checked(sel: Selection, P: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection's (chosen [P], parents [P, k]) on the CPU, or a one-line error."""
    chosen = torch.as_tensor(sel.chosen, dtype=torch.long).reshape(-1).cpu()
    if chosen.shape[0] != P or bool(((chosen < 0) | (chosen >= k)).any()):
        raise MoalignError(f"selector returned invalid choices {chosen.tolist()} for K={k}")
    if sel.parents is None:
        return chosen, chosen[:, None].expand(P, k)
    parents = torch.as_tensor(sel.parents, dtype=torch.long).cpu()
    if parents.shape != (P, k) or bool(((parents < 0) | (parents >= k)).any()):
        raise MoalignError(f"selector returned invalid parents of shape {tuple(parents.shape)}")
    return chosen, parents


@torch.inference_mode()
def decode(
    backend: Backend,
    prompts: Sequence[Prompt],
    *,
    k: int,
    block_size: int,
    max_new_tokens: int,
    selector: Selector = first_candidate,
    seed: int = 0,
    keep_all: bool = False,
    prompt_indices: Sequence[int] | None = None,
    on_block: Callable[[int], None] | None = None,
    row_prompts: Sequence[Sequence[Prompt]] | None = None,
    recache: str = "reprefill",
    hidden: bool = False,
) -> list[DecodeResult]:
    """Decode one batch of P groups of K rows on ``backend``. ``row_prompts[p][k]`` (default: ``prompts[p]``)
    is the prompt row k of group p decodes from; ``hidden``: selectors get the rows' last hidden states
    (the backend must declare ``capabilities.hidden_states``). ``on_block(n_new_tokens)`` is called after
    every block."""
    prompts, indices = check_decode_args(prompts, k, block_size, max_new_tokens, recache, row_prompts,
                                         prompt_indices)  # fmt: skip
    if not prompts:
        return []
    if hidden and not backend.capabilities.hidden_states:
        raise MoalignError(f"{type(backend).__name__} does not return hidden states")
    P, R = len(prompts), len(prompts) * k
    if row_prompts is None:
        rendered = [text for p in prompts for text in [backend.render(p)] * k]
    else:
        rendered = [backend.render(rp) for row in row_prompts for rp in row]
    group_of = torch.arange(P).repeat_interleave(k)
    policy = torch.zeros(P, dtype=torch.long)
    clock = {"policy": 0.0, "scorer": 0.0}

    def spend(per_row: Sequence[int]) -> None:
        policy.index_add_(0, group_of, torch.as_tensor(per_row, dtype=torch.long).reshape(-1).cpu())

    def timed(what: str, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            clock[what] += time.perf_counter() - t0

    with scoring_scope():  # the scorers' caches live as long as this search (or the search that called it)
        rows, read = timed("policy", backend.prefill, rendered, group_of.tolist(), int(seed), hidden)
        spend(read)
        rng = torch.Generator().manual_seed(int(seed) ^ 0x5EED5)
        cost = ScoringCost()
        traces: list[list[dict]] = [[] for _ in range(P)]
        n_new, block_index = 0, 0
        while True:
            steps = min(block_size, max_new_tokens - n_new)
            advanced, read = timed("policy", backend.extend, rows, steps, n_new + steps >= max_new_tokens)
            spend(read)
            n_new += advanced
            view = timed("policy", backend.read, rows)
            final = n_new >= max_new_tokens or bool(view.done.all())
            step = BlockStep(
                prompts=prompts,
                prompt_indices=indices,
                texts=[view.texts[p * k : (p + 1) * k] for p in range(P)],
                token_ids=view.token_ids.view(P, k, -1),
                done=view.done.view(P, k),
                block_index=block_index,
                final=final,
                last_hidden=view.hidden.view(P, k, -1) if view.hidden is not None else None,
                row_prompts=[list(r) for r in row_prompts] if row_prompts is not None else None,
                rng=rng,
                cost=cost,
            )
            sel = timed("scorer", selector, step)
            chosen, parents = _checked(sel, P, k)
            for p, info in enumerate(sel.info or []):
                if info is not None:
                    traces[p].append({"block": block_index, "tokens": n_new, **info})
            if on_block is not None:
                on_block(steps)
            block_index += 1
            done = view.done.cpu()
            if sel.finish is not None:
                finish = torch.as_tensor(sel.finish, dtype=torch.bool).reshape(-1).cpu()
                backend.finish(rows, finish)
                done = done | finish
                final = final or bool(done.all())
            if final:
                break
            src = (torch.arange(P)[:, None] * k + parents).reshape(-1).tolist()
            if src != list(range(R)):
                again = []
                if recache == "reprefill" and row_prompts is not None:
                    again = [
                        r for r, s in enumerate(src) if s != r and rendered[s] != rendered[r] and not done[s]
                    ]
                spend(timed("policy", backend.reindex, rows, src, again))
    cost_model = getattr(backend, "model_cost", None)

    def result(p: int, j: int, **kw) -> DecodeResult:
        out = backend.output(rows, p * k + j)
        rp = row_prompts[p][j] if row_prompts is not None else None
        return DecodeResult(
            prompt=prompts[p], response=out.response, token_ids=out.token_ids, finished=out.finished,
            token_logprobs=out.token_logprobs, row_prompt=rp if rp is not None and rp != prompts[p] else None,
            **kw,
        )  # fmt: skip

    results = []
    for p in range(P):
        i = indices[p]
        results.append(result(
            p, int(chosen[p]), trace=traces[p], policy_tokens=int(policy[p]),
            scorer_tokens=cost.tokens.get(i, 0), scored_pairs=cost.pairs.get(i, 0),
            policy_flops=cost_model.flops(int(policy[p])) if cost_model is not None else None,
            scorer_flops=cost.flops.get(i, 0.0), scorer_reads=dict(cost.models.get(i, {})),
            policy_seconds=clock["policy"] / P, scorer_seconds=clock["scorer"] / P,
            rows=[result(p, j) for j in range(k)] if keep_all else None,
            candidates=view.texts[p * k : (p + 1) * k] if keep_all else None,
        ))  # fmt: skip
    return results


class BlockwiseDecoding:
    """``backend.decode(...)``: the loop as a method of every backend (the backends inherit it)."""

    def decode(self, prompts: Sequence[Prompt], **kw) -> list[DecodeResult]:
        """:func:`moalign.decoding.loop.decode` on this backend."""
        return decode(self, prompts, **kw)
