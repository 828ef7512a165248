"""Value functions: estimates of each objective's final reward for a candidate (partial) response.

``RewardOnPrefix`` scores the partial text with the objectives themselves (no training). Trained value heads
on the policy's hidden states live in ``moalign.decoding.value_heads``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moalign.compute import Reads, count_reads, scoring_scope
from moalign.decoding.backend import BlockStep
from moalign.objectives.base import Objective, shared_outputs
from moalign.objectives.normalize import NormStats


class ObjectiveScorer:
    """Score (prompt, response) pairs with G objectives -> [n, G], optionally z-scored."""

    def __init__(self, objectives: Sequence[Objective], norm: NormStats | None = None):
        self.objectives = list(objectives)
        self.names = [o.name for o in self.objectives]
        self.norm = norm.subset(self.names) if norm is not None else None

    def raw(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """``[n, G]`` raw scores; objectives sharing one model run it once per batch."""
        with shared_outputs():
            cols = [o.score(prompts, responses) for o in self.objectives]
        return torch.stack(cols, dim=-1) if cols else torch.zeros(len(prompts), 0)

    def raw_counted(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[torch.Tensor, Reads]:
        """:meth:`raw` and what the objectives' models actually read for each pair (each model once per
        pair however many objectives read its outputs; a cache hit reads nothing; objectives with no model,
        lexical or arithmetic, read none)."""
        with count_reads(len(prompts)) as reads:
            raw = self.raw(prompts, responses)
        return raw, reads

    def reads(self, prompts: Sequence[str], responses: Sequence[str]) -> Reads:
        """What scoring these pairs reads from nothing (a fresh cache scope): e.g. best-of-N's final scoring
        of N responses to one prompt reads the prompt once and each response once."""
        with scoring_scope(reuse=False):
            return self.raw_counted(prompts, responses)[1]

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        if self.norm is None:
            return raw
        mean = torch.as_tensor(self.norm.mean, dtype=raw.dtype)
        std = torch.as_tensor(self.norm.std, dtype=raw.dtype)
        return (raw - mean) / std

    def space(self) -> str:
        return "raw" if self.norm is None else self.norm.describe()


class RewardOnPrefix:
    """Value = each objective scored on [prompt, prefix + block] (the CD 'reward on partial text' value)."""

    name = "reward"

    def __init__(self, scorer: ObjectiveScorer):
        self.scorer = scorer

    def __call__(self, step: BlockStep) -> torch.Tensor:
        """[P, K, G] normalised values for every candidate of the step (what the objectives' models read is
        added to ``step.cost``)."""
        P, K = len(step.prompts), len(step.texts[0])
        prompts = [p.text for p in step.prompts for _ in range(K)]
        responses = [t for row in step.texts for t in row]
        raw, reads = self.scorer.raw_counted(prompts, responses)
        step.add_cost([K] * P, reads.grouped(K))
        return self.scorer.normalize(raw).view(P, K, -1)
