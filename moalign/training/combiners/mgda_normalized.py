"""``mgda-normalized``: MGDA on unit gradients."""

from __future__ import annotations

import torch

from moalign.errors import MoalignError
from moalign.training.combiners.base import COMBINERS, Combiner
from moalign.training.combiners.min_norm import _MinNormMixin


class MGDANormalizedCombiner(_MinNormMixin, Combiner):
    """MGDA on unit gradients ``u_k = g_k / ||g_k||``: ``w = argmin_{simplex} ||sum_k w_k u_k||^2``.

    ``apply_to="normalized"`` (default): ``d = sum_k w_k u_k``, i.e. raw coefficients ``alpha_k = w_k/||g_k||``;
    ``d`` is then invariant to rescaling any gradient. ``apply_to="raw"``: ``alpha = w`` on the raw gradients
    (the "l2" normaliser of Sener & Koltun's code). A zero gradient becomes a zero unit vector (its weight
    can absorb everything, giving ``d = 0``) and gets raw coefficient 0. The simplex weights ``w`` are
    logged as ``stats["simplex_weights"]``.
    """

    name = "mgda-normalized"

    def __init__(self, tol: float = 1e-10, method: str = "active-set", apply_to: str = "normalized"):
        super().__init__(tol=tol, method=method)
        if apply_to not in ("normalized", "raw"):
            raise MoalignError(f"mgda-normalized: apply_to must be 'normalized' or 'raw', got {apply_to!r}")
        self.apply_to = apply_to

    def _weights(self, losses, gram):
        norms = torch.sqrt(torch.diagonal(gram).clamp_min(0.0))
        nz = norms > 0
        inv = torch.where(nz, 1.0 / torch.where(nz, norms, torch.ones_like(norms)), torch.zeros_like(norms))
        w = self._min_norm(gram * torch.outer(inv, inv))
        alpha = w * inv if self.apply_to == "normalized" else w.clone()
        return alpha, {"simplex_weights": [float(v) for v in w]}

    def describe(self):
        return {**super().describe(), "tol": self.tol, "method": self.method, "apply_to": self.apply_to}


COMBINERS.register("mgda-normalized", MGDANormalizedCombiner, aliases=("mgda-normalised",), default=True)
