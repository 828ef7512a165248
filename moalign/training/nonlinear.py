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


def _check_bon_n(n: object, where: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int | float):
        raise MoalignError(f"{where}: best-of-N needs an integer N >= 1, got {n!r}")
    if not math.isfinite(n) or n != int(n) or n < 1:
        raise MoalignError(f"{where}: best-of-N needs an integer N >= 1, got {n!r}")
    return int(n)


def _check_tau(tau: object, where: str) -> float:
    if isinstance(tau, bool) or not isinstance(tau, int | float):
        raise MoalignError(f"{where}: tilting needs a temperature tau > 0, got {tau!r}")
    if not math.isfinite(tau) or tau <= 0:
        raise MoalignError(f"{where}: tilting needs a finite temperature tau > 0, got {tau!r}")
    return float(tau)


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


# --------------------------------------------------------------------------------------------------------
# per-criterion estimators (group = last dimension)
# --------------------------------------------------------------------------------------------------------


def _out_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float64


def _check_group(
    rewards: object, probs: object, what: str = "rewards"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate ``rewards [..., M]`` (and ``probs`` of the same shape); return float64 copies.

    ``probs`` comes back normalised along the last dimension.
    """
    if not isinstance(rewards, torch.Tensor):
        raise MoalignError(f"{what} must be a torch tensor, got {type(rewards).__name__}")
    if rewards.dim() < 1 or rewards.shape[-1] < 1:
        raise MoalignError(f"{what} must have shape [..., M] with M >= 1, got {tuple(rewards.shape)}")
    if rewards.is_complex() or rewards.dtype == torch.bool:
        raise MoalignError(f"{what} must be real numbers, got dtype {rewards.dtype}")
    r = rewards.detach().to(torch.float64)
    if not bool(torch.isfinite(r).all()):
        bad = "NaN" if bool(torch.isnan(r).any()) else "infinite"
        raise MoalignError(f"{what} contain {bad} values")
    if probs is None:
        return r, None
    if not isinstance(probs, torch.Tensor):
        raise MoalignError(f"probs must be a torch tensor, got {type(probs).__name__}")
    if probs.shape != rewards.shape:
        raise MoalignError(
            f"probs has shape {tuple(probs.shape)} but {what} have shape {tuple(rewards.shape)}"
        )
    p = probs.detach().to(device=r.device, dtype=torch.float64)
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise MoalignError("probs must be finite and >= 0")
    tot = p.sum(-1, keepdim=True)
    if bool((tot <= 0).any()):
        raise MoalignError("probs must not be all zero within a group")
    return r, p / tot


def _sorted_levels(r: torch.Tensor, p: torch.Tensor | None):
    """Sorted rewards, sort index and the CDF level ``P_j = P(r <= r_(j))`` at each sorted position.

    Ties: the gap between tied values is zero, so the level in force on the next gap is the CDF at the tied
    value (all tied members counted); tied members get identical results whatever their order.
    """
    vals, idx = torch.sort(r, dim=-1, stable=True)
    m = r.shape[-1]
    if p is None:
        levels = torch.arange(1, m + 1, dtype=torch.float64, device=r.device) / m
        levels = levels.expand_as(vals)
    else:
        levels = torch.cumsum(torch.gather(p, -1, idx), dim=-1)
    return vals, idx, levels


ESTIMATORS: tuple[str, ...] = ("unbiased", "plugin")


def _check_estimator(estimator: str, n: int, m: int, where: str) -> str:
    if estimator not in ESTIMATORS:
        raise MoalignError(f"{where}: estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if estimator == "unbiased" and n > m:
        raise MoalignError(
            f"{where}: best-of-{n} needs at least {n} completions per group to estimate without bias, the group "
            f"has {m} (raise the group size, lower N, or use the biased plug-in estimator)"
        )
    return estimator


def _log_comb(a: torch.Tensor, b: float) -> torch.Tensor:
    """``log C(a, b)`` elementwise for ``a >= b >= 0`` (float64)."""
    return torch.lgamma(a + 1) - math.lgamma(b + 1) - torch.lgamma(a - b + 1)


def _bon_unbiased_first_variation(r: torch.Tensor, n: int) -> torch.Tensor:
    """``N`` x (mean over the (N-1)-subsets S of the other M-1 rewards of ``max(r_y, max S)``) per sample y,
    from the sorted group in O(M log M): with ``s_(j)`` the others sorted and ``w_j = C(j-1, N-2) / C(M-1, N-1)``
    the chance that ``s_(j)`` is a subset's maximum, the mean is ``r_(q) sum_{j<q} w_j + sum_{j>=q} w_j r_(j+1)``
    for the sample at sorted position q (the others below it are the ``r_(j)``, j < q; above, ``r_(j+1)``)."""
    m = r.shape[-1]
    vals, idx = torch.sort(r, dim=-1, stable=True)
    if n == 1 or m == 1:
        e_sorted = vals
    else:
        j = torch.arange(1, m, dtype=torch.float64, device=r.device)  # positions of the others, 1..M-1
        ok = j - 1 >= n - 2
        logw = _log_comb((j - 1).clamp(min=n - 2), n - 2) - float(
            _log_comb(torch.tensor(m - 1.0, dtype=torch.float64), n - 1)
        )
        w = torch.where(ok, torch.exp(logw), torch.zeros_like(j))  # [M-1]
        below = torch.cat([torch.zeros(1, dtype=torch.float64, device=r.device), torch.cumsum(w, 0)])  # [M]
        terms = w * vals[..., 1:]  # w_j r_(j+1), j = 1..M-1
        above = torch.flip(torch.cumsum(torch.flip(terms, [-1]), -1), [-1])  # sum_{j>=q}, q = 1..M-1
        above = torch.cat([above, torch.zeros_like(vals[..., :1])], dim=-1)  # q = M: nothing above
        e_sorted = vals * below + above
        # tied rewards: every member takes the value computed at the last position of its run (equal in exact
        # arithmetic at every position of the run; this makes them equal in floating point too)
        pos = torch.arange(m, device=r.device).expand_as(vals)
        is_end = torch.cat([vals[..., :-1] != vals[..., 1:], torch.ones_like(vals[..., :1], dtype=torch.bool)], -1)
        ends = torch.where(is_end, pos, torch.full_like(pos, m - 1))
        run_end = torch.flip(torch.cummin(torch.flip(ends, [-1]), dim=-1).values, [-1])
        e_sorted = torch.gather(e_sorted, -1, run_end)
    out = torch.empty_like(e_sorted).scatter_(-1, idx, n * e_sorted)
    return out


def bon_first_variation(
    rewards: torch.Tensor, n: int, probs: torch.Tensor | None = None, estimator: str = "unbiased"
) -> torch.Tensor:
    """First variation of the best-of-``n`` objective, estimated from each group; same shape as ``rewards``.

    ``estimator="unbiased"`` (default; needs ``n <= M``): for each completion y, ``N`` times the mean over the
    ``(N-1)``-subsets of the group's other ``M-1`` completions of ``max(r(y), the subset's max)``: an unbiased
    estimate of ``N E[max(r(y), max of N-1 draws from pi)]``, which is the first variation ``dR/dpi(y)`` up to
    the constant ``-N R`` (GRPO's group centring removes constants). Non-decreasing in the own reward; tied
    rewards get identical values. Computed from the sorted group in ``O(M log M)``.

    ``estimator="plugin"`` (or any ``probs``), the exact formula on the group's empirical distribution:

    With the group sorted ``r_(1) <= ... <= r_(M)`` returns (spec, "Estimate from one GRPO group")
    ``r~_(k) = sum_{j<k} (r_(j+1) - r_(j)) * n * P_j^(n-1)``, ``P_j = j/M`` (``probs``: the cumulative
    probability of the ``j`` smallest), i.e. ``int_{r_(1)}^{r(y)} n C^(n-1)(s) ds`` under the group's
    empirical CDF ``C``. That is the first variation ``dR/dpi(y) = -int_{r(y)}^{r_max} n C^(n-1) ds`` shifted by
    a constant so that the group's minimum gets 0; the constant does not matter (perturbations of ``pi`` have
    zero total mass, and GRPO's group centring removes it). With ``probs`` the 0 is at the smallest listed
    reward, whatever its probability.

    Properties: ``n = 1`` gives ``r - min(r)`` (plain GRPO after centring); tied rewards share a CDF level
    and get identical values; the result is non-decreasing in each completion's own reward; it is the exact
    gradient of :func:`bon_value` w.r.t. the group's probabilities (with ``probs``: the exact first
    variation of that discrete distribution).

    Error: as an estimate of the first variation under the policy's true reward distribution, the bias is
    ``O(1/M)``: for a completion ``y`` of the group, ``C_hat(s) = B/M`` below ``r(y)`` with
    ``B ~ Binomial(M - 1, C(s))``, so ``M * bias(y) -> int_{r_min}^{r(y)} n (n-1) C^(n-2) ((n-2)(1-C)/2 - C) ds``
    (the tests check this constant); the random fluctuation of one group is ``O(M^(-1/2))`` and averages out
    over groups and steps.
    """
    n = _check_bon_n(n, "bon_first_variation")
    r, p = _check_group(rewards, probs)
    if p is None and _check_estimator(estimator, n, r.shape[-1], "bon_first_variation") == "unbiased":
        return _bon_unbiased_first_variation(r, n).to(_out_dtype(rewards))
    vals, idx, levels = _sorted_levels(r, p)
    gaps = vals[..., 1:] - vals[..., :-1]
    terms = gaps * n * levels[..., :-1] ** (n - 1)
    out_sorted = torch.cat([torch.zeros_like(vals[..., :1]), torch.cumsum(terms, dim=-1)], dim=-1)
    out = torch.empty_like(out_sorted).scatter_(-1, idx, out_sorted)
    return out.to(_out_dtype(rewards))


def bon_value(
    rewards: torch.Tensor, n: int, probs: torch.Tensor | None = None, estimator: str = "unbiased"
) -> torch.Tensor:
    """Best-of-``n`` objective ``E[max of n draws]`` per group; shape ``rewards.shape[:-1]``.

    ``estimator="unbiased"`` (default; ``n <= M``): ``sum_{k>=n} r_(k) C(k-1, n-1) / C(M, n)``, the mean over the
    group's n-subsets of their maximum (unbiased for the policy's value). ``"plugin"`` (or any ``probs``):
    ``r_(M) - sum_{j<M} (r_(j+1) - r_(j)) P_j^n`` (= ``r_max - int C^n``), draws with replacement from the group
    (or from ``probs``), bias ``O(1/M)`` (e.g. best-of-8 from M = 8 uniform rewards: 0.836 against 0.889).
    """
    n = _check_bon_n(n, "bon_value")
    r, p = _check_group(rewards, probs)
    if p is None and _check_estimator(estimator, n, r.shape[-1], "bon_value") == "unbiased":
        m = r.shape[-1]
        vals = torch.sort(r, dim=-1).values
        k = torch.arange(1, m + 1, dtype=torch.float64, device=r.device)
        ok = k >= n
        logc = _log_comb(k.clamp(min=n) - 1, n - 1) - float(_log_comb(torch.tensor(float(m), dtype=torch.float64), n))
        coef = torch.where(ok, torch.exp(logc), torch.zeros_like(k))
        return (vals * coef).sum(-1).to(_out_dtype(rewards))
    vals, _, levels = _sorted_levels(r, p)
    gaps = vals[..., 1:] - vals[..., :-1]
    out = vals[..., -1] - (gaps * levels[..., :-1] ** n).sum(-1)
    return out.to(_out_dtype(rewards))


def _tilt_parts(r: torch.Tensor, p: torch.Tensor | None, tau: float):
    """``log Z`` and ``A / Z`` of the tilted distribution, computed stably (shift-invariant)."""
    m = r.shape[-1]
    logp = torch.full_like(r, -math.log(m)) if p is None else torch.log(p)
    s = r / tau + logp
    log_z = torch.logsumexp(s, dim=-1, keepdim=True)
    mean_tilted = (torch.exp(s - log_z) * r).sum(-1, keepdim=True)
    return log_z, mean_tilted


def tilt_first_variation(
    rewards: torch.Tensor, tau: float, probs: torch.Tensor | None = None
) -> torch.Tensor:
    """First variation of the tilted objective, estimated from each group; same shape as ``rewards``.

    Returns ``r~_j = e^{r_j/tau} (r_j - A^/Z^) / Z^`` with ``Z^ = mean e^{r/tau}``, ``A^ = mean r e^{r/tau}``
    (``probs``: expectations under ``probs``), computed as ``exp(r_j/tau - log Z^) * (r_j - A^/Z^)`` so large
    ``r/tau`` does not overflow. It has zero mean over the group (under ``probs``), so it is already centred.

    Not monotone in the own reward: like the exact first variation it decreases in ``r_j`` for
    ``r_j < A/Z - tau``. Error: plug-in ratio estimator, bias ``O(1/M)`` (the constant grows with
    ``e^{(r_max - r_min)/tau}``), fluctuation ``O(M^(-1/2))``.
    """
    tau = _check_tau(tau, "tilt_first_variation")
    r, p = _check_group(rewards, probs)
    log_z, mean_tilted = _tilt_parts(r, p, tau)
    out = torch.exp(r / tau - log_z) * (r - mean_tilted)
    return out.to(_out_dtype(rewards))


def tilt_ess(rewards: torch.Tensor, tau: float) -> torch.Tensor:
    """Effective sample size of each group's tilting weights ``w_j = e^{r_j / tau}``: ``(sum w)^2 / sum w^2``,
    between 1 (one completion carries all the weight) and M (equal weights); shape ``rewards.shape[:-1]``.

    Below 2 the tilted estimate is "the top completion against the rest": ``A^/Z^`` is about the top reward,
    so every other completion's transformed reward is negative whatever its own reward (M = 8, tau = 0.1 on
    uniform rewards: half of the transform's mass on one completion)."""
    tau = _check_tau(tau, "tilt_ess")
    r, _ = _check_group(rewards, None)
    s = r / tau
    return torch.exp(2 * torch.logsumexp(s, -1) - torch.logsumexp(2 * s, -1))


def tilt_value(rewards: torch.Tensor, tau: float, probs: torch.Tensor | None = None) -> torch.Tensor:
    """Tilted objective ``A / Z`` (mean reward under ``pi e^{r/tau}``) per group; shape ``rewards.shape[:-1]``.

    Plug-in ratio estimate, bias ``O(1/M)``.
    """
    tau = _check_tau(tau, "tilt_value")
    r, p = _check_group(rewards, probs)
    _, mean_tilted = _tilt_parts(r, p, tau)
    return mean_tilted.squeeze(-1).to(_out_dtype(rewards))


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
