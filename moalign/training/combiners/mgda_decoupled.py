"""``mgda-decoupled``: min-norm weights of the loss-normalised gradients, applied to the raw gradients
(spec: shared/specs/mgda-decoupled.md)."""

from __future__ import annotations

import torch

from moalign.errors import MoalignError
from moalign.training.combiners.base import COMBINERS, Combiner
from moalign.training.combiners.min_norm import _MinNormMixin


class MGDADecoupledCombiner(_MinNormMixin, Combiner):
    """MGDA-Decoupled: ``alpha = argmin_{simplex} ||sum_k alpha_k g_k / l_k||^2`` (Gram ``G_ij / (l_i l_j)``,
    the gradients of ``log L_k``), applied to the RAW gradients: ``d = sum_k alpha_k g_k``.

    Objectives with large loss (lagging) get more weight; the step keeps the raw gradient scale. ``d`` is not
    guaranteed to be a common descent direction (see ``stats["common_descent"]``). Losses must be > 0.
    """

    name = "mgda-decoupled"
    needs_losses = True

    def _weights(self, losses, gram):
        if (losses <= 0).any():
            i = int((losses <= 0).nonzero()[0])
            raise MoalignError(
                f"mgda-decoupled needs positive losses (it divides gradients by them); objective {i} has "
                f"loss {float(losses[i])}"
            )
        inv = 1.0 / losses
        return self._min_norm(gram * torch.outer(inv, inv)), {}

    def describe(self):
        return {**super().describe(), "tol": self.tol, "method": self.method}


COMBINERS.register("mgda-decoupled", MGDADecoupledCombiner, default=True)
