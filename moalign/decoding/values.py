"""Value functions: estimates of each objective's final reward for a candidate (partial) response.

``RewardOnPrefix`` scores the partial text with the objectives themselves (no training). Trained value heads
on the policy's hidden states live in ``moalign.decoding.value_heads``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moalign.decoding.backend import BlockStep
from moalign.objectives.base import Objective
from moalign.objectives.normalize import NormStats


class ObjectiveScorer:
    """Score (prompt, response) pairs with G objectives -> [n, G], optionally z-scored."""

    def __init__(self, objectives: Sequence[Objective], norm: NormStats | None = None):
        self.objectives = list(objectives)
        self.names = [o.name for o in self.objectives]
        self.norm = norm.subset(self.names) if norm is not None else None

    def raw(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        cols = [o.score(prompts, responses) for o in self.objectives]
        return torch.stack(cols, dim=-1) if cols else torch.zeros(len(prompts), 0)

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
        """[P, K, G] normalised values for every candidate of the step."""
        P, K = len(step.prompts), len(step.texts[0])
        prompts = [p.text for p in step.prompts for _ in range(K)]
        responses = [t for row in step.texts for t in row]
        raw = self.scorer.raw(prompts, responses)
        return self.scorer.normalize(raw).view(P, K, -1)
