"""``linear``: a fixed scalarisation of the gradients (default: their mean)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moalign.errors import MoalignError
from moalign.training.combiners.base import COMBINERS, Combiner
from moalign.training.combiners.weighting import _check_losses


class LinearCombiner(Combiner):
    """Fixed scalarisation ``d = sum_k w_k g_k`` with ``w`` normalised to sum 1 (default uniform: the mean)."""

    name = "linear"
    needs_gram = False

    def __init__(self, weights: Sequence[float] | None = None):
        self.raw_weights = None
        if weights is not None:
            w = _check_losses(weights, what="linear combiner weight", plural="linear combiner weights")
            if (w < 0).any():
                raise MoalignError(f"linear combiner weights must be >= 0, got {w.tolist()}")
            if float(w.sum()) <= 0:
                raise MoalignError("linear combiner weights must not all be zero")
            self.raw_weights = w / w.sum()

    def _weights(self, losses, gram):
        k = losses.numel() if losses is not None else gram.shape[0]
        if self.raw_weights is None:
            return torch.full((k,), 1.0 / k, dtype=torch.float64), {}
        if self.raw_weights.numel() != k:
            raise MoalignError(
                f"linear combiner has {self.raw_weights.numel()} weights but there are {k} objectives"
            )
        return self.raw_weights.clone(), {}

    def describe(self):
        w = None if self.raw_weights is None else self.raw_weights.tolist()
        return {**super().describe(), "weights": w}


COMBINERS.register("linear", LinearCombiner, aliases=("uniform",), default=True)
