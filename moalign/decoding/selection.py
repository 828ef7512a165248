"""Shared plumbing for selectors: which prompts still need a choice, and the per-method plan."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moalign.decoding.engine import BlockStep, Selector

ValueFn = Callable[[BlockStep], torch.Tensor]  # -> [P, K, G]


@dataclass
class MethodPlan:
    """How the engine runs one method: candidates per block, block length, the selector, keep all."""

    k: int
    block_size: int
    selector: Selector
    keep_all: bool = False


def active_prompts(step: BlockStep) -> torch.Tensor:
    """Prompts whose candidates differ (not every candidate already ended): [P] bool.

    A prompt whose chosen candidate ended earlier holds K identical copies; it needs no scoring.
    """
    return ~step.done.all(dim=1) | (step.block_index == 0) | step.final


def values_for_active(step: BlockStep, value_fn: ValueFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Values [P, K, G] for the active prompts (other rows are zero) and the active mask [P]."""
    active = active_prompts(step)
    idx = active.nonzero().flatten().tolist()
    sub = BlockStep(
        prompts=[step.prompts[i] for i in idx],
        prompt_indices=[step.prompt_indices[i] for i in idx],
        texts=[step.texts[i] for i in idx],
        token_ids=step.token_ids[idx],
        done=step.done[idx],
        block_index=step.block_index,
        final=step.final,
        last_hidden=step.last_hidden[idx] if step.last_hidden is not None else None,
    )
    v = value_fn(sub) if idx else torch.zeros(0, step.done.shape[1], 0)
    full = torch.zeros(len(step.prompts), step.done.shape[1], v.shape[-1], dtype=v.dtype)
    full[idx] = v
    return full, active


def rounded(x: torch.Tensor, nd: int = 4) -> list:
    return [round(float(v), nd) for v in x.flatten()]
