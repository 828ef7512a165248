"""``mgda``: the min-norm point of the convex hull of the gradients (Desideri; Sener & Koltun 2018)."""

from __future__ import annotations

from moalign.training.combiners.base import COMBINERS, Combiner
from moalign.training.combiners.min_norm import _MinNormMixin


class MGDACombiner(_MinNormMixin, Combiner):
    """MGDA: ``alpha = argmin_{simplex} ||sum_k alpha_k g_k||^2``; ``d`` is the min-norm element of the convex
    hull of the gradients, so ``<d, g_k> >= ||d||^2`` for every k (a common descent direction unless d = 0,
    which certifies Pareto stationarity)."""

    name = "mgda"

    def _weights(self, losses, gram):
        return self._min_norm(gram), {}

    def describe(self):
        return {**super().describe(), "tol": self.tol, "method": self.method}


COMBINERS.register("mgda", MGDACombiner, default=True)
