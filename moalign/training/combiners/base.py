"""The :class:`Combiner` interface, its result, and the combiner registry."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moalign.errors import MoalignError
from moalign.registry import Registry, dashed_lower
from moalign.training.combiners.weighting import (
    LossesLike,
    ObjectiveGrad,
    _check_gram,
    _check_losses,
    apply_weights,
    combine_stats,
    gram_matrix,
)


@dataclass
class CombineResult:
    """Output of :meth:`Combiner.combine`.

    ``alpha``: float64 ``[K]`` coefficients on the raw gradients; ``direction``: the combined gradient
    ``d = sum_k alpha_k g_k``, one entry per parameter (``None`` where no objective has a gradient);
    ``stats``: JSON-able per-step statistics (see :func:`combine_stats`, plus combiner-specific keys).
    """

    alpha: torch.Tensor
    direction: list[torch.Tensor | None]
    stats: dict[str, Any] = field(default_factory=dict)


class Combiner(ABC):
    """Turns per-objective losses and gradients into one update direction ``d = sum_k alpha_k g_k``.

    Subclasses implement :meth:`_weights` (losses, Gram matrix) -> (alpha, extra stats). Use:

    - :meth:`combine` (losses, grads) when all K gradients are at hand;
    - :meth:`weights` / :meth:`weights_and_stats` (losses, gram) when the trainer accumulates the Gram
      matrix itself, then :func:`apply_weights` (or its own in-place accumulation) for ``d``.

    Stateful combiners (``groupdro``, ``pcgrad``'s random generator) advance their state once per call of
    any of these three methods, so call exactly one of them per step.
    """

    name: str = "combiner"
    #: whether :meth:`weights` needs the Gram matrix (``linear`` and ``groupdro`` do not)
    needs_gram: bool = True
    #: whether :meth:`weights` needs the losses
    needs_losses: bool = False

    @abstractmethod
    def _weights(self, losses: torch.Tensor | None, gram: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """Validated float64 inputs -> (alpha [K] float64, extra JSON-able stats)."""

    def _prepare(
        self, losses: LossesLike | None, gram: Any | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if gram is None and self.needs_gram:
            raise MoalignError(f"combiner {self.name!r} needs the Gram matrix of the gradients")
        g = _check_gram(gram) if gram is not None else None
        k = g.shape[0] if g is not None else None
        if losses is None:
            if self.needs_losses:
                raise MoalignError(f"combiner {self.name!r} needs the per-objective losses")
            if g is None:
                raise MoalignError(f"combiner {self.name!r}: give the losses or the Gram matrix")
            return None, g
        return _check_losses(losses, k), g

    def weights(self, losses: LossesLike | None, gram: Any | None = None) -> torch.Tensor:
        """Coefficients ``alpha`` [K] (float64) on the raw gradients, from losses and the Gram matrix."""
        return self.weights_and_stats(losses, gram)[0]

    def weights_and_stats(
        self, losses: LossesLike | None, gram: Any | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """:meth:`weights` plus the per-step statistics of :func:`combine_stats` and combiner extras."""
        lo, g = self._prepare(losses, gram)
        alpha, extra = self._weights(lo, g)
        stats = combine_stats(g, alpha, lo, name=self.name)
        stats.update(extra)
        return alpha, stats

    def combine(self, losses: LossesLike, grads: Sequence[ObjectiveGrad]) -> CombineResult:
        """Compute the Gram matrix, the weights and the direction ``d = sum_k alpha_k g_k``."""
        gram = gram_matrix(grads)
        alpha, stats = self.weights_and_stats(losses, gram)
        return CombineResult(alpha=alpha, direction=apply_weights(alpha, grads), stats=stats)

    def reset(self) -> None:  # noqa: B027 - optional hook, stateless by default
        """Forget any state accumulated across steps."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (empty for stateless combiners)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore :meth:`state_dict`."""

    def describe(self) -> dict[str, Any]:
        """A JSON-able description recorded with every run."""
        return {"name": self.name, "type": type(self).__name__}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


#: combiners by name (case-insensitive, ``_`` == ``-``); the built-in modules register on the first lookup
COMBINERS: Registry[Callable[..., Combiner]] = Registry(
    "combiner",
    normalize=dashed_lower,
    builtins=[f"moalign.training.combiners.{m}" for m in
              ("linear", "mgda", "mgda_normalized", "mgda_decoupled", "groupdro", "pcgrad")],
)  # fmt: skip


def register_combiner(name: str, factory: Callable[..., Combiner], aliases: Sequence[str] = ()) -> None:
    """Register ``factory(**kwargs) -> Combiner`` under ``name`` (case-insensitive, ``_`` == ``-``)."""
    if not isinstance(name, str) or not name.strip():
        raise MoalignError(f"combiner name must be a non-empty string, got {name!r}")
    COMBINERS.register(name, factory, aliases=aliases)


def available_combiners() -> list[str]:
    """Registered combiner names (sorted)."""
    return sorted(COMBINERS.names())


def get_combiner(name: str, **kwargs: Any) -> Combiner:
    """A new combiner by name (case-insensitive; ``_`` == ``-``; aliases such as uniform, mgda-normalised,
    group-dro). Unknown names or arguments raise :class:`MoalignError`."""
    if not isinstance(name, str):
        raise MoalignError(f"combiner name must be a string, got {name!r}")
    key = COMBINERS.canonical(name)
    factory = COMBINERS.get(key)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise MoalignError(f"combiner {key!r}: bad arguments {sorted(kwargs)}: {e}") from None
    except ValueError:  # no signature available: let the factory complain
        pass
    return factory(**kwargs)


def combiner_from_settings(name: str, settings: Mapping[str, Any]) -> Combiner:
    """A combiner built from a trainer's settings: ``settings`` maps argument names to values (``None`` =
    unset), and each combiner takes those its factory accepts (``weights``, ``eta``, ``seed``, ``reduction``,
    or a registered combiner's own), so a newly registered combiner works in ``train dpo`` with no edit."""
    key = COMBINERS.canonical(name)
    factory = COMBINERS.get(key)
    try:
        params = inspect.signature(factory).parameters
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kw = {k: v for k, v in settings.items() if v is not None and (accepts_any or k in params)}
    except ValueError:
        kw = {}
    return get_combiner(key, **kw)
