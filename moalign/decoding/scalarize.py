"""Scalarisations: how a vector of (normalised) objective values becomes one number per candidate."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moalign.errors import MoalignError


@dataclass(frozen=True)
class Scalarization:
    """``weights``: fixed weights w (sum 1) -> w . v; ``worst-case``: min_g v_g."""

    kind: str  # "weights" | "worst-case"
    weights: tuple[float, ...] = ()

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """values [..., G] -> [...]."""
        if self.kind == "worst-case":
            return values.min(dim=-1).values
        w = torch.tensor(self.weights, dtype=values.dtype, device=values.device)
        return values @ w

    def describe(self) -> str:
        if self.kind == "worst-case":
            return "worst-case (min over objectives)"
        return "weights " + ",".join(f"{w:.3g}" for w in self.weights)


def parse_scalarization(spec: str, names: list[str]) -> Scalarization:
    """``uniform`` | ``worst-case`` | ``NAME`` | ``NAME=W,NAME=W`` (weights renormalised to sum 1)."""
    spec = (spec or "uniform").strip()
    G = len(names)
    if spec == "uniform":
        return Scalarization("weights", tuple([1.0 / G] * G))
    if spec in ("worst-case", "worst_case", "min"):
        return Scalarization("worst-case")
    if "=" not in spec:
        if spec not in names:
            raise MoalignError(f"scalarization {spec!r} is not one of the objectives {names}")
        return Scalarization("weights", tuple(1.0 if n == spec else 0.0 for n in names))
    weights = dict.fromkeys(names, 0.0)
    for part in spec.split(","):
        name, _, val = part.partition("=")
        name = name.strip()
        if name not in weights:
            raise MoalignError(f"weight given for {name!r}, which is not one of the objectives {names}")
        try:
            weights[name] = float(val)
        except ValueError:
            raise MoalignError(f"weight for {name!r} is not a number: {val!r}") from None
        if weights[name] < 0:
            raise MoalignError(f"weight for {name!r} must be >= 0")
    total = sum(weights.values())
    if total <= 0:
        raise MoalignError("weights must not all be zero")
    return Scalarization("weights", tuple(weights[n] / total for n in names))
