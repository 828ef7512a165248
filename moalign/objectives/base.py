"""The objective interface and the registry that resolves objective names.

An objective scores a batch of (prompt, response) pairs and returns a float32 tensor of shape [n].
``prompt`` is the plain-text rendering of the conversation (see ``moalign.data.prompts.Prompt.text``);
``response`` is the assistant's reply so far (possibly partial, when used as a value on a prefix).
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch

from moalign.compute import at_offset
from moalign.errors import MoalignError
from moalign.registry import Registry

ScoreFn = Callable[[Sequence[str], Sequence[str]], "torch.Tensor | Sequence[float]"]


class Objective(ABC):
    """A named reward signal. Subclasses implement :meth:`_score`; :meth:`score` validates.

    An objective that runs a model reports what the model actually read with
    :func:`moalign.compute.record_read` (per pair of the batch ``_score`` was given; a cache hit reads
    nothing), so that searches count their scorers' compute (:func:`moalign.compute.count_reads`)."""

    name: str = "objective"
    #: higher is better; scores are on the objective's own (raw) scale
    batch_size: int = 32

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise MoalignError(
                f"objective {self.name!r}: got {len(prompts)} prompts but {len(responses)} responses"
            )
        if not prompts:
            return torch.zeros(0, dtype=torch.float32)
        out: list[torch.Tensor] = []
        for i in range(0, len(prompts), self.batch_size):
            with at_offset(i):  # the models this batch runs report what they read for pairs i, i + 1, ...
                s = self._score(prompts[i : i + self.batch_size], responses[i : i + self.batch_size])
            out.append(torch.as_tensor(s, dtype=torch.float32).reshape(-1).cpu())
        scores = torch.cat(out)
        if scores.shape[0] != len(prompts):
            raise MoalignError(
                f"objective {self.name!r} returned {scores.shape[0]} scores for {len(prompts)} pairs"
            )
        if not torch.isfinite(scores).all():
            bad = int((~torch.isfinite(scores)).nonzero()[0])
            raise MoalignError(
                f"objective {self.name!r} returned a non-finite score (NaN/inf) for pair {bad}"
            )
        return scores

    @abstractmethod
    def _score(self, prompts: list[str], responses: list[str]) -> torch.Tensor | Sequence[float]:
        """Score one batch (already validated)."""

    def describe(self) -> dict:
        """A JSON-able description recorded with every run."""
        return {"name": self.name, "type": type(self).__name__}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class CallableObjective(Objective):
    """Wrap any ``fn(prompts, responses) -> scores`` as an objective."""

    def __init__(self, name: str, fn: ScoreFn, batch_size: int = 32):
        self.name = name
        self.fn = fn
        self.batch_size = batch_size

    def _score(self, prompts, responses):
        return self.fn(prompts, responses)

    def describe(self) -> dict:
        return {"name": self.name, "type": "callable", "fn": getattr(self.fn, "__qualname__", repr(self.fn))}


_MEMO = threading.local()


@contextmanager
def shared_outputs():
    """While active, objectives that share one model (e.g. two outputs of one reward model) run it once per
    batch of pairs: the first computes the model's outputs, the others read them (see
    :func:`shared_output_memo`). :class:`~moalign.decoding.values.ObjectiveScorer` scores inside it."""
    outer = getattr(_MEMO, "memo", None)
    if outer is None:
        _MEMO.memo = {}
    try:
        yield
    finally:
        if outer is None:
            _MEMO.memo = None


def shared_output_memo() -> dict | None:
    """The active memo of :func:`shared_outputs` (None outside it): objectives key it by their model and
    the batch's input."""
    return getattr(_MEMO, "memo", None)


def _reward_model(spec: str) -> Callable[[], Objective]:
    def load() -> Objective:
        from moalign.objectives.reward_model import RewardModelObjective

        return RewardModelObjective.from_spec(spec)

    return load


#: objective factories by name (built-ins in ``moalign.objectives.builtin``, loaded on the first lookup) and the
#: ``rm:PATH_OR_HUB_ID[@INDEX]`` family of reward models
OBJECTIVES: Registry[Callable[[], Objective]] = Registry(
    "objective",
    builtins=("moalign.objectives.builtin",),
    hint=" (or rm:PATH_OR_HUB_ID[@OUTPUT_INDEX] for a reward model, rm+http://HOST:PORT/v1#MODEL[@INDEX] for a "
    "served one)",
)
OBJECTIVES.register_prefix("rm:", _reward_model)


def _served_reward_model(scheme: str) -> Callable[[str], Callable[[], Objective]]:
    def resolve(rest: str) -> Callable[[], Objective]:
        def load() -> Objective:
            from moalign.objectives.served import ServedRewardModel

            return ServedRewardModel(f"{scheme}:{rest}")

        return load

    return resolve


# rm+http://HOST:PORT/v1#MODEL[@INDEX]: a reward model served by vLLM's pooling runner (moalign.objectives.served)
for _scheme in ("http", "https"):
    OBJECTIVES.register_prefix(f"rm+{_scheme}:", _served_reward_model(_scheme))
_CACHE: dict[str, Objective] = {}


def register_objective(name: str, factory: Callable[..., Objective] | None = None, *, default: bool = False):
    """Register a factory (no-argument callable returning an Objective) under ``name``.

    Usable as a decorator: ``@register_objective("mine")``. ``default=True`` (built-ins): keep a factory a
    user registered earlier under that name.
    """

    def deco(f):
        OBJECTIVES.register(name, f, default=default)
        _CACHE.pop(name, None)
        return f

    return deco(factory) if factory is not None else deco


def available_objectives() -> list[str]:
    return sorted(OBJECTIVES.names())


def get_objective(spec: str | Objective | ScoreFn) -> Objective:
    """Resolve an objective from a registered name, a ``rm:PATH_OR_ID[@INDEX]`` reward model,
    an :class:`Objective` or a callable ``fn(prompts, responses)``."""
    if isinstance(spec, Objective):
        return spec
    if callable(spec):
        return CallableObjective(getattr(spec, "__name__", "callable"), spec)
    if not isinstance(spec, str) or not spec.strip():
        raise MoalignError(f"objective must be a name, an Objective or a callable, got {spec!r}")
    spec = spec.strip()
    if spec not in _CACHE:
        _CACHE[spec] = OBJECTIVES.get(spec)()
    return _CACHE[spec]


def resolve_objectives(specs: str | Sequence[str | Objective | ScoreFn]) -> list[Objective]:
    """Resolve a comma-separated string or a list of specs; names must be unique."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    objs = [get_objective(s) for s in specs]
    if not objs:
        raise MoalignError("at least one objective is required")
    names = [o.name for o in objs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise MoalignError(f"objective names must be unique, repeated: {', '.join(sorted(dup))}")
    return objs


def objective_device(spec: str, policy_device=None) -> torch.device:
    """``--objective-device``: ``"policy"`` (the policy's device, ``policy_device``) or a torch device."""
    dev = policy_device if spec == "policy" else spec
    try:
        return torch.device(dev if dev is not None else "cpu")
    except (RuntimeError, TypeError):
        raise MoalignError(
            f"--objective-device: unknown device {spec!r} (use policy, cpu, cuda, cuda:1, ...)"
        ) from None


def move_objectives(objectives: Sequence[Objective], spec: str, policy_device=None) -> list[str]:
    """Put every objective that has a device (a ``.to`` method: the neural ones) on ``--objective-device``
    ``spec``; returns the names of those moved (the others run where they are, e.g. on CPU)."""
    dev = objective_device(spec, policy_device)
    moved = []
    for o in objectives:
        to = getattr(o, "to", None)
        if callable(to):
            to(str(dev))
            moved.append(o.name)
    return moved


def check_finite(values: torch.Tensor, what: str) -> None:
    if not torch.isfinite(values).all():
        raise MoalignError(f"{what} contains NaN or inf")


def safe_float(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)
