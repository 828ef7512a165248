"""Value functions: estimates of each objective's final reward for a candidate (partial) response.

``RewardOnPrefix`` scores the partial text with the objectives themselves (no training). Trained value heads
on the policy's hidden states live in ``moalign.decoding.value_heads``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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

    def input_tokens(self, prompts: Sequence[str], responses: Sequence[str]) -> list[int]:
        """Tokens the objectives' models read to score each pair: each model once per pair, however many
        objectives read its outputs (see :meth:`moalign.objectives.base.Objective.reads`); objectives with
        no model (lexical, arithmetic) read none."""
        total = [0] * len(prompts)
        seen: set = set()
        for o in self.objectives:
            r = o.reads(prompts, responses)
            if r is None or r[0] in seen:
                continue
            seen.add(r[0])
            total = [a + int(b) for a, b in zip(total, r[1])]
        return total

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
        """[P, K, G] normalised values for every candidate of the step (what the objectives read is added
        to ``step.cost``)."""
        P, K = len(step.prompts), len(step.texts[0])
        prompts = [p.text for p in step.prompts for _ in range(K)]
        responses = [t for row in step.texts for t in row]
        raw = self.scorer.raw(prompts, responses)
        if step.cost is not None:
            tokens = torch.tensor(self.scorer.input_tokens(prompts, responses), dtype=torch.long)
            step.add_cost([K] * P, tokens.view(P, K).sum(dim=1))
        return self.scorer.normalize(raw).view(P, K, -1)
