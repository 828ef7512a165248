"""Non-linear rewards for inference-aware meta-alignment (IAMA, non-linear GRPO); pure tensor functions.

IAMA (Takakura et al., arXiv 2602.01603; spec ``shared/specs/iama.md``) trains one base policy ``pi`` so
that each criterion ``i`` is served at deployment by a cheap inference-time operator ``T_i`` applied to
``pi``, and maximises ``g(R_1[pi], ..., R_C[pi])`` with ``R_i[pi] = E_x E_{y ~ T_i[pi]} r_i(x, y)``.
Non-linear GRPO is standard GRPO with each completion's reward replaced by the first variation (functional
derivative) of that objective, ``r~(x, y) = sum_i (dg/dR_i) * dR_i/dpi(x, y)``, estimated from the
completions of one group. This module computes that transformed reward; the trainer then treats it as the
reward (group centring, std scaling, clipped ratio, KL), see :func:`nonlinear_rewards`.

Operators (``method`` of a :class:`CriterionSpec`):

``bon``   best-of-N with the criterion's own reward (parameter ``N``, an integer >= 1):
          ``R = E[max of N draws] = r_max - int C(s)^N ds``, first variation
          ``dR/dpi(y) = int_{r_min}^{r(y)} N C(s)^(N-1) ds`` (up to an additive constant).
``tilt``  reward tilting ``T[pi] ∝ pi * exp(r / tau)`` (parameter ``tau > 0``): ``R = A / Z`` with
          ``Z = E_pi e^{r/tau}``, ``A = E_pi r e^{r/tau}``, first variation ``e^{r(y)/tau} (r(y) - A/Z) / Z``.

Aggregators (``kind`` of an :class:`AggregatorSpec`), applied to the per-criterion objective values ``R_i``
(the expected reward *after* the inference-time operator, averaged over the batch's prompts):

``sum``         ``g = sum_i w_i R_i``; ``dg/dR_i = w_i`` (default ``w_i = 1/C``).
``min``         ``g = min_i R_i``; all weight on the lowest ``R_i``, split equally between ties.
``smooth-min``  ``g = -(1/gamma) log sum_i w_i exp(-gamma R_i)``;
                ``dg/dR_i = w_i e^{-gamma R_i} / sum_j w_j e^{-gamma R_j}`` (softmin weights, sum to 1).

Conventions: a *group* is the last dimension of a rewards tensor ``[..., M]`` (the ``M`` sampled completions
of one prompt). Estimators (``estimator``):

- ``"unbiased"`` (the default, best-of-N only, ``N <= M``): U-statistics over the group's subsets drawn without
  replacement, unbiased for the policy's first variation and objective value (:func:`bon_first_variation`,
  :func:`bon_value`);
- ``"plugin"``: the exact formula evaluated on the group's empirical distribution (mass ``1/M`` each), i.e.
  draws with replacement: biased at GRPO's group sizes (best-of-4 from M = 8: 0.78 of the true scale).

With ``probs`` the given probabilities are the distribution and every function is exact on that finite
response space (used by the tests and by tabular toys). Tilting has no unbiased ratio estimator; its groups'
effective sample size (:func:`tilt_ess`) says when the estimate rests on one sample. Computation is in float64; results come back in the input's floating dtype (float64 for integer
input) on the input's device. Bad input raises :class:`moalign.errors.MoalignError` with a one-line message.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from moalign.errors import MoalignError
from moalign.registry import Registry
from moalign.training.operators import (
    ESTIMATORS,
    _check_bon_n,
    _check_tau,
    _out_dtype,
    bon_first_variation,
    bon_value,
    tilt_ess,
    tilt_first_variation,
    tilt_value,
)

__all__ = [
    "AGGREGATORS",
    "OPERATORS",
    "Aggregator",
    "Operator",
    "AggregatorSpec",
    "CriterionSpec",
    "NonlinearRewards",
    "aggregator_value",
    "aggregator_weights",
    "bon_first_variation",
    "bon_value",
    "ESTIMATORS",
    "tilt_ess",
    "first_variation",
    "nonlinear_rewards",
    "objective_value",
    "parse_aggregator",
    "parse_criteria",
    "parse_criterion",
    "tilt_first_variation",
    "tilt_value",
]

Method = Literal["bon", "tilt"]
AggregatorKind = Literal["sum", "min", "smooth-min"]

@dataclass(frozen=True)
class Operator:
    """An inference-time operator a criterion can be served by: how its parameter is checked and read, its
    first variation and its objective value from a group of rewards (see :func:`bon_first_variation`)."""

    check: Callable[[object, str], float]  # (param, where) -> the validated param, or a one-line error
    parse: Callable[[str, str], float]  # (text, where) -> param
    first_variation: Callable[..., torch.Tensor]  # (rewards, param, probs, estimator)
    value: Callable[..., torch.Tensor]  # (rewards, param, probs, estimator)


@dataclass(frozen=True)
class Aggregator:
    """How criteria's objective values combine: ``weights_fn(values, spec)`` = ``dg/dR_i`` and
    ``value_fn(values, spec)`` = ``g``; whether it takes weights and whether it needs a temperature gamma."""

    weights_fn: Callable[..., torch.Tensor]
    value_fn: Callable[..., torch.Tensor]
    takes_weights: bool = True
    needs_gamma: bool = False


#: inference-time operators by name (``bon``, ``tilt``; registered below)
OPERATORS: Registry[Operator] = Registry("inference-time operator")
#: aggregators across criteria by name (``sum``, ``min``, ``smooth-min``; registered below)
AGGREGATORS: Registry[Aggregator] = Registry("aggregator")

# relative tolerance under which two objective values count as tied for the ``min`` aggregator
_MIN_TIE_RTOL = 1e-9


# --------------------------------------------------------------------------------------------------------
# specs and parsers
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CriterionSpec:
    """One criterion: its reward column's ``name``, the inference-time ``method`` serving it, and ``param``.

    ``param`` is ``N`` (an integer >= 1) for ``method="bon"`` and the temperature ``tau > 0`` for
    ``method="tilt"``. ``CriterionSpec("helpful", "bon", 4)`` is what ``parse_criterion("helpful:bon:4")``
    returns.
    """

    name: str
    method: Method
    param: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or ":" in self.name or "," in self.name:
            raise MoalignError(
                f"criterion name must be a non-empty string without ':' or ',', got {self.name!r}"
            )
        if self.method not in OPERATORS:
            raise MoalignError(
                f"criterion {self.name!r}: unknown method {self.method!r} (expected one of "
                f"{', '.join(OPERATORS.names())})"
            )
        where = f"criterion {self.name!r}"
        object.__setattr__(self, "param", OPERATORS.get(self.method).check(self.param, where))

    def __str__(self) -> str:
        return f"{self.name}:{self.method}:{self.param:g}"


@dataclass(frozen=True)
class AggregatorSpec:
    """How the criteria's objective values are combined: ``kind`` in :data:`AGGREGATORS`.

    ``weights`` (one non-negative number per criterion, not all zero) are the ``w_i`` of ``sum`` and
    ``smooth-min``; ``None`` means uniform ``1/C``. ``sum`` uses them as given (not renormalised); ``smooth-min``
    only through their ratios. ``min`` takes no weights. ``gamma > 0`` is the smooth-min temperature
    (required for ``smooth-min``, not allowed otherwise); ``gamma -> inf`` recovers ``min`` (uniform weights).
    """

    kind: AggregatorKind = "sum"
    weights: tuple[float, ...] | None = None
    gamma: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in AGGREGATORS:
            raise MoalignError(
                f"unknown aggregator {self.kind!r} (expected one of {', '.join(AGGREGATORS.names())})"
            )
        agg = AGGREGATORS.get(self.kind)
        if self.weights is not None:
            if not agg.takes_weights:
                raise MoalignError(f"aggregator {self.kind!r} takes no weights")
            try:
                w = tuple(float(x) for x in self.weights)
            except (TypeError, ValueError) as e:
                raise MoalignError(f"aggregator weights must be numbers, got {self.weights!r}") from e
            if not w or any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
                raise MoalignError(
                    f"aggregator weights must be finite, >= 0 and not all zero, got {list(self.weights)}"
                )
            object.__setattr__(self, "weights", w)
        if agg.needs_gamma:
            if self.gamma is None:
                raise MoalignError(f"aggregator {self.kind!r} needs a temperature gamma > 0")
            if isinstance(self.gamma, bool) or not isinstance(self.gamma, int | float):
                raise MoalignError(f"aggregator {self.kind!r}: gamma must be a number > 0, got {self.gamma!r}")
            if not math.isfinite(self.gamma) or self.gamma <= 0:
                raise MoalignError(f"aggregator {self.kind!r}: gamma must be finite and > 0, got {self.gamma!r}")
            object.__setattr__(self, "gamma", float(self.gamma))
        elif self.gamma is not None:
            raise MoalignError(f"aggregator {self.kind!r} takes no gamma (only 'smooth-min' does)")

    def weight_vector(self, n_criteria: int) -> torch.Tensor:
        """The ``w_i`` as a float64 tensor of length ``n_criteria`` (uniform ``1/C`` when unset)."""
        if self.weights is None:
            return torch.full((n_criteria,), 1.0 / n_criteria, dtype=torch.float64)
        if len(self.weights) != n_criteria:
            raise MoalignError(
                f"aggregator {self.kind!r} has {len(self.weights)} weights but there are {n_criteria} criteria"
            )
        return torch.tensor(self.weights, dtype=torch.float64)


def parse_criterion(text: str) -> CriterionSpec:
    """Parse ``NAME:METHOD:PARAM``, e.g. ``helpful:bon:4`` (best-of-4) or ``harmless:tilt:0.5`` (tau 0.5)."""
    if not isinstance(text, str):
        raise MoalignError(f"criterion must be a string NAME:METHOD:PARAM, got {text!r}")
    parts = [p.strip() for p in text.strip().split(":")]
    if len(parts) != 3 or not all(parts):
        raise MoalignError(
            f"criterion {text!r}: expected NAME:METHOD:PARAM (e.g. helpful:bon:4 or harmless:tilt:0.5)"
        )
    name, method, raw = parts
    if method not in OPERATORS:
        raise MoalignError(
            f"criterion {text!r}: unknown method {method!r} (expected one of {', '.join(OPERATORS.names())})"
        )
    return CriterionSpec(name, method, OPERATORS.get(method).parse(raw, f"criterion {text!r}"))


def _parse_bon(raw: str, where: str) -> int:
    try:
        n = int(raw)
    except ValueError:
        raise MoalignError(f"{where}: best-of-N needs an integer N >= 1, got {raw!r}") from None
    if n < 1:
        raise MoalignError(f"{where}: best-of-N needs an integer N >= 1, got {raw!r}")
    return n


def _parse_tau(raw: str, where: str) -> float:
    try:
        tau = float(raw)
    except ValueError:
        raise MoalignError(f"{where}: tilting needs a temperature tau > 0, got {raw!r}") from None
    if not math.isfinite(tau) or tau <= 0:
        raise MoalignError(f"{where}: tilting needs a finite temperature tau > 0, got {raw!r}")
    return tau


def parse_criteria(texts: str | Sequence[str | CriterionSpec]) -> list[CriterionSpec]:
    """Parse a comma-separated string (``helpful:bon:4,harmless:tilt:0.5``) or a list of criteria.

    Names must be unique.
    """
    items = [t for t in texts.split(",")] if isinstance(texts, str) else list(texts)
    if not items:
        raise MoalignError("need at least one criterion, got none")
    out = [c if isinstance(c, CriterionSpec) else parse_criterion(c) for c in items]
    seen: set[str] = set()
    for c in out:
        if c.name in seen:
            raise MoalignError(f"criterion name {c.name!r} appears more than once")
        seen.add(c.name)
    return out


def parse_aggregator(text: str) -> AggregatorSpec:
    """Parse ``sum``, ``sum:W1,W2,...``, ``min``, ``smooth-min:GAMMA`` or ``smooth-min:GAMMA:W1,W2,...``."""
    if not isinstance(text, str):
        raise MoalignError(f"aggregator must be a string, got {text!r}")
    parts = [p.strip() for p in text.strip().split(":")]
    kind = parts[0]
    if kind not in AGGREGATORS:
        raise MoalignError(
            f"aggregator {text!r}: unknown kind {kind!r} (expected one of {', '.join(AGGREGATORS.names())})"
        )

    def weights(raw: str) -> tuple[float, ...]:
        try:
            return tuple(float(x) for x in raw.split(","))
        except ValueError:
            raise MoalignError(
                f"aggregator {text!r}: weights must be comma-separated numbers, got {raw!r}"
            ) from None

    if kind == "min":
        if len(parts) != 1:
            raise MoalignError(f"aggregator {text!r}: 'min' takes no parameters")
        return AggregatorSpec("min")
    if kind == "sum":
        if len(parts) > 2:
            raise MoalignError(f"aggregator {text!r}: expected sum or sum:W1,W2,...")
        return AggregatorSpec("sum", weights(parts[1]) if len(parts) == 2 else None)
    if len(parts) not in (2, 3):
        raise MoalignError(
            f"aggregator {text!r}: expected smooth-min:GAMMA or smooth-min:GAMMA:W1,W2,... (gamma > 0)"
        )
    try:
        gamma = float(parts[1])
    except ValueError:
        raise MoalignError(f"aggregator {text!r}: gamma must be a number > 0, got {parts[1]!r}") from None
    return AggregatorSpec("smooth-min", weights(parts[2]) if len(parts) == 3 else None, gamma)



OPERATORS.register("bon", Operator(
    check=_check_bon_n, parse=_parse_bon,
    first_variation=lambda r, n, probs, est: bon_first_variation(r, int(n), probs, est),
    value=lambda r, n, probs, est: bon_value(r, int(n), probs, est),
))  # fmt: skip
OPERATORS.register("tilt", Operator(
    check=_check_tau, parse=_parse_tau,
    first_variation=lambda r, tau, probs, est: tilt_first_variation(r, tau, probs),
    value=lambda r, tau, probs, est: tilt_value(r, tau, probs),
))  # fmt: skip


def first_variation(
    rewards: torch.Tensor, spec: CriterionSpec, probs: torch.Tensor | None = None, estimator: str = "unbiased"
) -> torch.Tensor:
    """The first variation of ``spec``'s operator (:data:`OPERATORS`, e.g. :func:`bon_first_variation`)."""
    return OPERATORS.get(spec.method).first_variation(rewards, spec.param, probs, estimator)


def objective_value(
    rewards: torch.Tensor, spec: CriterionSpec, probs: torch.Tensor | None = None, estimator: str = "unbiased"
) -> torch.Tensor:
    """The objective value of ``spec``'s operator (:data:`OPERATORS`, e.g. :func:`bon_value`)."""
    return OPERATORS.get(spec.method).value(rewards, spec.param, probs, estimator)


# --------------------------------------------------------------------------------------------------------
# aggregators
# --------------------------------------------------------------------------------------------------------


def _check_values(values: object) -> torch.Tensor:
    if not isinstance(values, torch.Tensor):
        raise MoalignError(f"objective values must be a torch tensor, got {type(values).__name__}")
    if values.dim() < 1 or values.shape[-1] < 1:
        raise MoalignError(
            f"objective values must have shape [..., C] with C >= 1, got {tuple(values.shape)}"
        )
    v = values.detach().to(torch.float64)
    if not bool(torch.isfinite(v).all()):
        raise MoalignError("objective values contain NaN or infinite entries")
    return v


def aggregator_weights(values: torch.Tensor, spec: AggregatorSpec) -> torch.Tensor:
    """``dg/dR_i`` at the objective values ``values [..., C]`` (one ``R_i`` per criterion); float64, same shape.

    ``sum``: ``w`` (constant). ``min``: ``1/k`` on each of the ``k`` criteria tied at the lowest value
    (relative tolerance 1e-9), 0 elsewhere. ``smooth-min``: ``w_i e^{-gamma R_i} / sum_j w_j e^{-gamma R_j}``
    (the exact gradient of ``-(1/gamma) log sum_i w_i e^{-gamma R_i}``; sums to 1).
    """
    return AGGREGATORS.get(spec.kind).weights_fn(_check_values(values), spec)


def _sum_weights(v: torch.Tensor, spec: AggregatorSpec) -> torch.Tensor:
    return spec.weight_vector(v.shape[-1]).to(v.device).expand_as(v).clone()


def _min_weights(v: torch.Tensor, spec: AggregatorSpec) -> torch.Tensor:
    lo = v.min(-1, keepdim=True).values
    tied = ((v - lo) <= _MIN_TIE_RTOL * torch.clamp(lo.abs(), min=1.0)).to(torch.float64)
    return tied / tied.sum(-1, keepdim=True)


def _smooth_min_weights(v: torch.Tensor, spec: AggregatorSpec) -> torch.Tensor:
    w = spec.weight_vector(v.shape[-1]).to(v.device)
    return torch.softmax(-spec.gamma * v + torch.log(w), dim=-1)


def aggregator_value(values: torch.Tensor, spec: AggregatorSpec) -> torch.Tensor:
    """``g(R_1, ..., R_C)`` for ``values [..., C]``; float64, shape ``values.shape[:-1]``."""
    return AGGREGATORS.get(spec.kind).value_fn(_check_values(values), spec)


def _smooth_min_value(v: torch.Tensor, spec: AggregatorSpec) -> torch.Tensor:
    w = spec.weight_vector(v.shape[-1]).to(v.device)
    return -torch.logsumexp(-spec.gamma * v + torch.log(w), dim=-1) / spec.gamma


AGGREGATORS.register(
    "sum", Aggregator(_sum_weights, lambda v, spec: (v * spec.weight_vector(v.shape[-1]).to(v.device)).sum(-1))
)
AGGREGATORS.register("min", Aggregator(_min_weights, lambda v, spec: v.min(-1).values, takes_weights=False))
AGGREGATORS.register("smooth-min", Aggregator(_smooth_min_weights, _smooth_min_value, needs_gamma=True))


# --------------------------------------------------------------------------------------------------------
# the combined transform
# --------------------------------------------------------------------------------------------------------


@dataclass
class NonlinearRewards:
    """Result of :func:`nonlinear_rewards`.

    ``rewards [B, M]``: the transformed reward ``sum_i weights_i * per_criterion[..., i]`` (input dtype).
    ``per_criterion [B, M, C]``: each criterion's first variation ``r~_i`` (before weighting).
    ``values [C]``: each criterion's objective value ``R_i`` (batch mean over prompts; float64).
    ``weights [C]``: the aggregator's ``dg/dR_i`` at ``values`` (float64).
    ``aggregate``: ``g(values)``.
    ``stats``: what a trainer logs, flat floats: ``{name}/reward_mean`` (raw reward), ``{name}/transformed_mean``
    (``r~_i``), ``{name}/value`` (``R_i``), ``{name}/weight``, and ``transformed_mean`` / ``aggregate``.
    """

    rewards: torch.Tensor
    per_criterion: torch.Tensor
    values: torch.Tensor
    weights: torch.Tensor
    aggregate: float
    stats: dict[str, float] = field(default_factory=dict)


def nonlinear_rewards(
    rewards: torch.Tensor,
    criteria: Sequence[CriterionSpec | str] | str,
    aggregator: AggregatorSpec | str | None = None,
    probs: torch.Tensor | None = None,
    estimator: str = "unbiased",
) -> NonlinearRewards:
    """IAMA's transformed reward for every completion: ``r~ = sum_i (dg/dR_i) r~_i``.

    ``rewards [B, M, C]``: ``B`` prompts, a group of ``M`` completions each, one reward column per criterion
    (in the order of ``criteria``). ``criteria``: :class:`CriterionSpec` objects or strings for
    :func:`parse_criteria`. ``aggregator``: an :class:`AggregatorSpec` or a string for
    :func:`parse_aggregator` (default ``sum`` with weights ``1/C``). ``probs [B, M]`` (optional): the
    completions' probabilities within each group, for exact computations on a finite response space; the
    default is the group's rewards as samples, with ``estimator`` (``unbiased``: best-of-N needs ``N <= M``;
    ``plugin``: the empirical distribution). For tilted criteria the stats carry the groups' effective sample
    size (``{name}/ess_mean``, ``{name}/ess_min``, :func:`tilt_ess`).

    ``R_i`` is averaged over the batch's prompts before the aggregator (the spec's ``R_i = E_x E_y``), so the
    weights ``dg/dR_i`` are one vector per batch. The whole group of every prompt must be present: apply this
    after gathering completions across processes. The result is meant to be fed to GRPO as the reward (group
    centring; with ``bon:1`` for every criterion and ``sum`` it equals plain GRPO on ``sum_i w_i r_i`` after
    centring).
    """
    specs = parse_criteria(criteria)
    if aggregator is None:
        agg = AggregatorSpec("sum")
    elif isinstance(aggregator, str):
        agg = parse_aggregator(aggregator)
    elif isinstance(aggregator, AggregatorSpec):
        agg = aggregator
    else:
        raise MoalignError(
            f"aggregator must be an AggregatorSpec or a string, got {type(aggregator).__name__}"
        )
    if not isinstance(rewards, torch.Tensor):
        raise MoalignError(f"rewards must be a torch tensor [B, M, C], got {type(rewards).__name__}")
    if rewards.dim() != 3 or rewards.shape[0] < 1 or rewards.shape[1] < 1:
        raise MoalignError(f"rewards must have shape [B, M, C] with B, M >= 1, got {tuple(rewards.shape)}")
    c = len(specs)
    if rewards.shape[2] != c:
        raise MoalignError(f"rewards have {rewards.shape[2]} criterion columns but {c} criteria were given")
    if probs is not None and (not isinstance(probs, torch.Tensor) or probs.shape != rewards.shape[:2]):
        shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise MoalignError(f"probs must be a tensor of shape {tuple(rewards.shape[:2])} [B, M], got {shape}")
    if agg.kind != "min":
        agg.weight_vector(c)  # checks the number of weights before any work

    cols, vals = [], []
    for i, spec in enumerate(specs):
        col = rewards[..., i]
        try:
            cols.append(first_variation(col, spec, probs, estimator).to(torch.float64))
            vals.append(objective_value(col, spec, probs, estimator).to(torch.float64).mean())
        except MoalignError as e:
            raise MoalignError(f"criterion {spec.name!r}: {e}") from None
    per = torch.stack(cols, dim=-1)  # [B, M, C]
    values = torch.stack(vals)  # [C]
    weights = aggregator_weights(values, agg)
    combined = (per * weights.to(per.device)).sum(-1)
    out_dtype = _out_dtype(rewards)
    raw = rewards.detach().to(torch.float64)
    g = float(aggregator_value(values, agg))
    stats: dict[str, float] = {}
    for i, spec in enumerate(specs):
        stats[f"{spec.name}/reward_mean"] = float(raw[..., i].mean())
        stats[f"{spec.name}/transformed_mean"] = float(per[..., i].mean())
        stats[f"{spec.name}/value"] = float(values[i])
        stats[f"{spec.name}/weight"] = float(weights[i])
        if spec.method == "tilt" and probs is None:
            ess = tilt_ess(rewards[..., i], spec.param)
            stats[f"{spec.name}/ess_mean"] = float(ess.mean())
            stats[f"{spec.name}/ess_min"] = float(ess.min())
    stats["transformed_mean"] = float(combined.mean())
    stats["aggregate"] = g
    return NonlinearRewards(
        rewards=combined.to(out_dtype),
        per_criterion=per.to(out_dtype),
        values=values,
        weights=weights,
        aggregate=g,
        stats=stats,
    )
