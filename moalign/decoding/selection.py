"""Shared plumbing for methods that are one engine pass (K rows, B-token blocks, a selector)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from moalign.decoding.backend import Backend, BlockStep, DecodeResult, Selector

ValueFn = Callable[[BlockStep], torch.Tensor]  # -> [P, K, G]


@dataclass
class EngineDecoder:
    """A method that is one engine pass: ``k`` rows per prompt, blocks of ``block_size`` tokens, a selector.

    ``keep_all``: every row is an output (plain sampling); otherwise the selector's final choice is.
    ``hidden``: the selector's value function reads the rows' hidden states.
    """

    engine: Backend
    k: int
    block_size: int
    max_new_tokens: int
    selector: Selector
    keep_all: bool = False
    hidden: bool = False

    @property
    def n_outputs(self) -> int:
        return self.k if self.keep_all else 1

    def __call__(
        self, prompts: Sequence, *, seed: int, prompt_indices: Sequence[int]
    ) -> list[list[DecodeResult]]:
        res = self.engine.decode(
            prompts, k=self.k, block_size=self.block_size, max_new_tokens=self.max_new_tokens,
            selector=self.selector, seed=seed, keep_all=self.keep_all, prompt_indices=prompt_indices,
            hidden=self.hidden,
        )  # fmt: skip
        if not self.keep_all:
            return [[r] for r in res]
        out = []
        for r in res:
            for row in r.rows:  # the group's compute, per response
                row.take_share(r, self.k)
            out.append(r.rows)
        return out


def active_prompts(step: BlockStep) -> torch.Tensor:
    """Groups whose rows differ (not every row already ended): [P] bool.

    A group whose chosen row ended earlier holds K identical copies; it needs no scoring.
    """
    return ~step.done.all(dim=1) | (step.block_index == 0) | step.final


def values_for_active(step: BlockStep, value_fn: ValueFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Values [P, K, G] for the active groups (other rows are zero) and the active mask [P]."""
    active = active_prompts(step)
    idx = active.nonzero().flatten().tolist()
    v = value_fn(step.subset(idx)) if idx else torch.zeros(0, step.done.shape[1], 0)
    full = torch.zeros(len(step.prompts), step.done.shape[1], v.shape[-1], dtype=v.dtype)
    full[idx] = v.cpu()
    return full, active


def rounded(x: torch.Tensor, nd: int = 4) -> list:
    return [round(float(v), nd) for v in x.flatten()]
