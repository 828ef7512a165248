"""``pcgrad``: gradient surgery (Yu et al. 2020) with a seeded random projection order."""

from __future__ import annotations

import torch

from moalign.errors import MoalignError
from moalign.training.combiners.base import COMBINERS, Combiner


class PCGradCombiner(Combiner):
    """PCGrad (Yu et al. 2020, "Gradient surgery for multi-task learning").

    For each i: ``h_i = g_i``; for j != i in a random order: if ``<h_i, g_j> < 0``,
    ``h_i <- h_i - <h_i, g_j> / ||g_j||^2 g_j`` (projection onto the normal plane of the ORIGINAL ``g_j``).
    Then ``d = sum_i h_i`` (``reduction="sum"``, as in the paper) or the mean.

    Since every projection subtracts a multiple of an original gradient, ``h_i = sum_j C_ij g_j`` with
    ``C = I`` updated through ``<h_i, g_j> = (C G)_ij``; the whole algorithm runs on the Gram matrix and
    ``alpha = 1^T C`` (or ``/ K``) are exact effective coefficients. Orders come from a ``torch.Generator``
    seeded with ``seed`` (one permutation of the other objectives per i per step; logged as
    ``stats["pcgrad_orders"]``, with ``stats["n_projections"]``).
    """

    name = "pcgrad"

    def __init__(self, seed: int = 0, reduction: str = "sum"):
        if reduction not in ("sum", "mean"):
            raise MoalignError(f"pcgrad: reduction must be 'sum' or 'mean', got {reduction!r}")
        if not isinstance(seed, int):
            raise MoalignError(f"pcgrad: seed must be an integer, got {seed!r}")
        self.seed = seed
        self.reduction = reduction
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)

    def _weights(self, losses, gram):
        k = gram.shape[0]
        coef = torch.eye(k, dtype=torch.float64)
        orders: list[list[int]] = []
        n_proj = 0
        for i in range(k):
            others = [j for j in range(k) if j != i]
            perm = torch.randperm(len(others), generator=self.generator).tolist() if others else []
            order = [others[p] for p in perm]
            orders.append(order)
            for j in order:
                ip = float(coef[i] @ gram[:, j])
                gjj = float(gram[j, j])
                if ip < 0.0 and gjj > 0.0:
                    coef[i, j] -= ip / gjj
                    n_proj += 1
        alpha = coef.sum(0)
        if self.reduction == "mean":
            alpha = alpha / k
        return alpha, {"pcgrad_orders": orders, "n_projections": n_proj}

    def reset(self):
        self.generator.manual_seed(self.seed)

    def state_dict(self):
        return {"rng_state": self.generator.get_state()}

    def load_state_dict(self, state):
        if state.get("rng_state") is not None:
            self.generator.set_state(state["rng_state"])

    def describe(self):
        return {**super().describe(), "seed": self.seed, "reduction": self.reduction}


COMBINERS.register("pcgrad", PCGradCombiner, default=True)
