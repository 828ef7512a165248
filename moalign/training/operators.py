"""Per-criterion estimators of IAMA's inference-time operators, pure tensor functions over a group of rewards
(the last dimension): best-of-N (:func:`bon_first_variation`, :func:`bon_value`) and reward tilting
(:func:`tilt_first_variation`, :func:`tilt_value`, :func:`tilt_ess`). The formulas, estimators and conventions
are in :mod:`moalign.training.nonlinear`, which registers these as its operators."""

from __future__ import annotations

import math

import torch

from moalign.errors import MoalignError

__all__ = ["ESTIMATORS", "bon_first_variation", "bon_value", "tilt_ess", "tilt_first_variation", "tilt_value"]


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
