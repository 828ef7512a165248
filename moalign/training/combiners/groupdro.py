"""``groupdro``: online mirror ascent on the simplex over the objectives' losses (stateful)."""

from __future__ import annotations

import math

import torch

from moalign.errors import MoalignError
from moalign.training.combiners.base import COMBINERS, Combiner
from moalign.training.combiners.weighting import _check_losses


class GroupDROCombiner(Combiner):
    """GroupDRO (Sagawa et al. 2020) weights: online exponentiated-gradient ascent on the simplex,
    ``q_k <- q_k exp(eta l_k) / sum_j q_j exp(eta l_j)`` starting from uniform; the updated ``q`` is the
    step's ``alpha``. After T steps ``q ∝ exp(eta sum_t l_k^t)``. Stateful (kept in log space); one update
    per call. ``stats["log_q"]`` logs the state."""

    name = "groupdro"
    needs_gram = False
    needs_losses = True

    def __init__(self, eta: float = 0.01):
        if not (isinstance(eta, int | float) and math.isfinite(eta) and eta >= 0):
            raise MoalignError(f"groupdro: eta must be a finite number >= 0, got {eta!r}")
        self.eta = float(eta)
        self.log_q: torch.Tensor | None = None

    def _weights(self, losses, gram):
        k = losses.numel()
        if self.log_q is None:
            self.log_q = torch.full((k,), -math.log(k), dtype=torch.float64)
        elif self.log_q.numel() != k:
            raise MoalignError(f"groupdro state has {self.log_q.numel()} objectives but got {k} losses")
        log_q = self.log_q + self.eta * losses
        self.log_q = log_q - torch.logsumexp(log_q, 0)
        return torch.exp(self.log_q), {"log_q": [float(v) for v in self.log_q]}

    def reset(self):
        self.log_q = None

    def state_dict(self):
        return {"log_q": None if self.log_q is None else self.log_q.tolist()}

    def load_state_dict(self, state):
        lq = state.get("log_q")
        if lq is None:
            self.log_q = None
            return
        t = _check_losses(lq, what="log_q entry", plural="log_q entries")
        self.log_q = t - torch.logsumexp(t, 0)

    def describe(self):
        return {**super().describe(), "eta": self.eta}


COMBINERS.register("groupdro", GroupDROCombiner, aliases=("group-dro",), default=True)
