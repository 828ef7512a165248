"""Worst-case objective weights for robust multi-objective decoding (RMOD).

Given ``K`` candidate blocks ``z_1..z_K ~ pi_ref`` for a prompt and a value matrix ``v`` (``K x G``: the value
of every candidate under every one of ``G`` objectives), RMOD plays the game

    max_pi min_{w in simplex(G)}  lam * sum_g w_g E_pi[V_g]  -  KL(pi || pi_ref).

The best response to fixed weights is the exponential tilt ``pi_w(z_k) ∝ exp(lam * w·v_k)``, and the
worst-case weights minimise the convex, smooth function

    L(w) = logsumexp_k(lam * v_k·w) - log K       over the simplex,

whose gradient is ``lam * m(w)`` with the *tilted means* ``m_g(w) = sum_k p_k v_kg``,
``p = softmax_k(lam * v·w)``, and whose Hessian is ``lam^2 * Cov_p(v)``.  At the optimum every objective with
positive weight has the same tilted mean and every zero-weight objective has a tilted mean at least that
large: the weight goes to the weakest objectives.

Every function here works on a batch of prompts: ``v`` has shape ``[P, K, G]`` (or ``[K, G]`` for one prompt,
in which case the leading batch dimension is dropped from the results as well).  An optional boolean
``mask`` (``[P, K]``) excludes candidates (``K`` then counts the valid candidates of each row; values at
masked-out positions are ignored and may be anything, even NaN).

Two solvers are offered by :func:`solve_worst_case_weights`:

* ``method="exact"`` (default): a primal active-set Newton method in float64 (Newton steps on the face
  spanned by the current support, with a ratio test that drops coordinates reaching zero, Frank-Wolfe
  steps that add the most promising missing objective, and an Armijo line search evaluated for a ladder of
  step sizes at once), vectorised over prompts, on values centred by their mean, with continuation in
  ``lam`` for very sharp problems.  It stops on a certified Frank-Wolfe gap
  ``lam * (m·w - min_g m_g) >= L(w) - min L``.
* ``method="reference"``: the fixed-step scheme of the public reference implementation of the paper,
  for reproducing its results only (see :func:`solve_worst_case_weights`).  It is not an optimiser that
  converges; its weights are in general far from the optimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from moalign.errors import MoalignError

__all__ = [
    "WeightSolution",
    "rmod_objective",
    "select_candidates",
    "solve_worst_case_weights",
    "tilted_means",
]

SolverMethod = Literal["exact", "reference"]
SelectionRule = Literal["argmax", "sample"]

_F64 = torch.float64
# Step sizes tried by the line search: alpha_max * 2^-j, j = 0..59 (down to ~1e-18 * alpha_max).
_LADDER = 60
_ARMIJO = 1e-4
# Sharpness lam * (value spread) above which the exact solver uses continuation in lam.
_SHARP = 1000.0


@dataclass(frozen=True)
class WeightSolution:
    """Result of :func:`solve_worst_case_weights`.

    Attributes:
        weights: ``[P, G]`` worst-case weights on the simplex (``[G]`` for an unbatched ``v``).
        objective: ``[P]`` value of ``L(weights)`` (computed in float64, then cast).
        gap: ``[P]`` certified Frank-Wolfe gap ``lam * (m·w - min_g m_g) >= L(w) - min_simplex L >= 0``.
        iterations: number of (batched) solver iterations that were run.
        converged: ``[P]`` bool, whether the row met the tolerance (always a statement about the gap, also
            for ``method="reference"``, which usually does not converge).
        method: ``"exact"`` or ``"reference"``.
    """

    weights: torch.Tensor
    objective: torch.Tensor
    gap: torch.Tensor
    iterations: int
    converged: torch.Tensor
    method: str


# --------------------------------------------------------------------------------------------- validation


def _real_tensor(x: object, what: str, shapes: str) -> torch.Tensor:
    """``x`` as a real-valued tensor, or a one-line error naming ``what`` and the ``shapes`` it may have."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise MoalignError(f"{what} must be a tensor of shape {shapes}: {exc}") from exc
    if x.dtype == torch.bool or x.is_complex():
        raise MoalignError(f"{what} must be a real-valued tensor, got dtype {x.dtype}")
    return x


def _as_values(v: object) -> tuple[torch.Tensor, bool]:
    """Return ``v`` as a ``[P, K, G]`` tensor and whether the input was batched."""
    v = _real_tensor(v, "values v", "[K, G] or [P, K, G]")
    if v.ndim == 2:
        v, batched = v.unsqueeze(0), False
    elif v.ndim == 3:
        batched = True
    else:
        raise MoalignError(
            f"values v must have shape [K, G] or [P, K, G] (K candidates, G objectives), got {tuple(v.shape)}"
        )
    if v.shape[1] < 1 or v.shape[2] < 1:
        raise MoalignError(
            f"values v needs at least one candidate and one objective, got shape {tuple(v.shape)}"
        )
    return v, batched


def _as_mask(mask: object, v: torch.Tensor, batched: bool) -> torch.Tensor:
    """Return the validity mask as a ``[P, K]`` bool tensor (all True when ``mask`` is None)."""
    p, k, _ = v.shape
    if mask is None:
        return torch.ones(p, k, dtype=torch.bool, device=v.device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise MoalignError("mask must be a bool tensor of shape [P, K] (True = candidate is used)")
    expected = (p, k) if batched else (k,)
    if tuple(mask.shape) != expected:
        raise MoalignError(f"mask must have shape {list(expected)} to match v, got {tuple(mask.shape)}")
    mask = mask.to(v.device).reshape(p, k)
    empty = (~mask.any(dim=-1)).nonzero().flatten().tolist()
    if empty:
        raise MoalignError(f"mask leaves no valid candidate in prompt row(s) {empty[:10]}")
    return mask


def _check_finite(v: torch.Tensor, valid: torch.Tensor) -> None:
    bad = ~torch.isfinite(v) & valid.unsqueeze(-1)
    if bool(bad.any()):
        p, k, g = (int(i) for i in bad.nonzero()[0])
        raise MoalignError(
            f"values v contain {int(bad.sum())} NaN/infinite entries at valid candidates "
            f"(first at prompt {p}, candidate {k}, objective {g})"
        )


def _prepare(v: object, mask: object) -> tuple[torch.Tensor, torch.Tensor, bool, torch.dtype]:
    """Validate; return float64 values with masked entries zeroed, the mask, batched flag, input dtype."""
    vt, batched = _as_values(v)
    valid = _as_mask(mask, vt, batched)
    _check_finite(vt, valid)
    v64 = torch.where(valid.unsqueeze(-1), vt.to(_F64), 0.0)
    return v64, valid, batched, vt.dtype


def _as_lam(lam: object, p: int, device: torch.device) -> torch.Tensor:
    """Return ``lam`` as a ``[P]`` float64 tensor; a scalar or a ``[P]`` tensor is accepted."""
    if isinstance(lam, bool) or lam is None:
        raise MoalignError(f"lam must be a positive finite number, got {lam!r}")
    if isinstance(lam, int | float):
        out = torch.full((p,), float(lam), dtype=_F64, device=device)
    elif isinstance(lam, torch.Tensor):
        if lam.dtype == torch.bool or lam.is_complex():
            raise MoalignError(f"lam must be a positive finite number, got a {lam.dtype} tensor")
        if lam.numel() == 1:
            out = torch.full((p,), float(lam.reshape(())), dtype=_F64, device=device)
        elif tuple(lam.shape) == (p,):
            out = lam.detach().to(device=device, dtype=_F64)
        else:
            raise MoalignError(f"lam must be a scalar or a [P]={p} tensor, got shape {tuple(lam.shape)}")
    else:
        raise MoalignError(f"lam must be a positive finite number, got {type(lam).__name__}")
    if not bool(torch.isfinite(out).all()) or not bool((out > 0).all()):
        raise MoalignError(f"lam must be finite and > 0, got {out.unique().tolist()[:5]}")
    return out


def _as_weights(w: object, p: int, g: int, batched: bool, device: torch.device) -> torch.Tensor:
    """Return weights as a ``[P, G]`` float64 tensor (a ``[G]`` vector is broadcast over prompts)."""
    w = _real_tensor(w, "weights w", "[G] or [P, G]")
    if w.ndim == 1 and w.shape[0] == g:
        w = w.unsqueeze(0).expand(p, g)
    elif not (w.ndim == 2 and tuple(w.shape) == (p, g) and batched):
        want = f"[{g}] or [{p}, {g}]" if batched else f"[{g}]"
        raise MoalignError(f"weights w must have shape {want} to match v, got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise MoalignError("weights w contain NaN or infinite entries")
    return w.to(device=device, dtype=_F64)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# ----------------------------------------------------------------------------------------- core formulas


def _log_tilt(v64: torch.Tensor, valid: torch.Tensor, w64: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Scores ``lam * v_k·w`` as ``[P, K]``, ``-inf`` at masked candidates."""
    s = lam.unsqueeze(-1) * torch.einsum("pkg,pg->pk", v64, w64)
    return s.masked_fill(~valid, -math.inf)


def _state(
    v64: torch.Tensor, valid: torch.Tensor, w64: torch.Tensor, lam: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(L(w) [P], log p [P,K], p [P,K], tilted means m [P,G])``, all float64."""
    s = _log_tilt(v64, valid, w64, lam)
    lse = torch.logsumexp(s, dim=-1)
    logp = s - lse.unsqueeze(-1)
    p = logp.exp()
    m = torch.einsum("pk,pkg->pg", p, v64)
    objective = lse - valid.sum(dim=-1).to(_F64).log()
    return objective, logp, p, m


def _fw_gap(m: torch.Tensor, w64: torch.Tensor) -> torch.Tensor:
    """Frank-Wolfe gap in value units, ``m·w - min_g m_g`` (>= 0); the gap on L is ``lam`` times it."""
    return ((m * w64).sum(dim=-1) - m.amin(dim=-1)).clamp_min(0.0)


def _converged(
    gap_v: torch.Tensor, objective: torch.Tensor, lam: torch.Tensor, scale: torch.Tensor, g: int, tol: float
) -> torch.Tensor:
    """Convergence test on the certified gap, for values centred by their mean (``scale = max|v|``).

    A row has converged when ``gap_v <= tol * scale`` (value units) and ``lam * gap_v <= tol * max(1, |L|)``
    (objective units), each up to the float64 floor ``16 G eps lam scale^2`` of the gradient (the Hessian of
    L is up to ``lam^2 scale^2``, so a rounding of w moves the gradient by about that much; the floor only
    matters for extreme sharpness ``lam * scale >~ 1e5``).
    """
    floor_v = 16.0 * g * torch.finfo(_F64).eps * lam * scale.square()
    return (gap_v <= tol * scale + floor_v) & (
        lam * gap_v <= tol * objective.abs().clamp_min(1.0) + lam * floor_v
    )


def rmod_objective(
    v: torch.Tensor, w: torch.Tensor, lam: float | torch.Tensor, mask: torch.Tensor | None = None
):
    """RMOD dual objective ``L(w) = logsumexp_k(lam * v_k·w) - log K`` (max-subtracted, float64 inside).

    Args:
        v: values ``[P, K, G]`` or ``[K, G]``.
        w: weights ``[P, G]`` or ``[G]`` (any finite vector; the solver restricts it to the simplex).
        lam: positive finite scalar, or a ``[P]`` tensor.
        mask: optional ``[P, K]`` bool, True for candidates that take part (``K`` = number of valid ones).

    Returns:
        ``[P]`` (or a 0-d tensor for unbatched ``v``) in the input's float dtype (float32 for half types).
    """
    v64, valid, batched, dtype = _prepare(v, mask)
    p, _, g = v64.shape
    w64 = _as_weights(w, p, g, batched, v64.device)
    lam_t = _as_lam(lam, p, v64.device)
    objective = _state(v64, valid, w64, lam_t)[0]
    out = objective.to(
        _out_dtype(torch.promote_types(dtype, w.dtype if isinstance(w, torch.Tensor) else dtype))
    )
    return out if batched else out[0]


def tilted_means(
    v: torch.Tensor, w: torch.Tensor, lam: float | torch.Tensor, mask: torch.Tensor | None = None
):
    """Tilted mean values ``m_g = sum_k p_k v_kg`` with ``p = softmax_k(lam * v_k·w)``; ``[P, G]``.

    ``lam * m`` is the gradient of :func:`rmod_objective`; at the worst-case weights all objectives with
    positive weight share the smallest tilted mean (the KKT condition), which is also the expected value of
    each of them under the tilted (best-response) candidate distribution.
    """
    v64, valid, batched, dtype = _prepare(v, mask)
    p, _, g = v64.shape
    w64 = _as_weights(w, p, g, batched, v64.device)
    lam_t = _as_lam(lam, p, v64.device)
    m = _state(v64, valid, w64, lam_t)[3].to(_out_dtype(dtype))
    return m if batched else m[0]


def select_candidates(
    v: torch.Tensor,
    w: torch.Tensor,
    lam: float | torch.Tensor | None = None,
    rule: SelectionRule = "argmax",
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one candidate per prompt.

    ``rule="argmax"``: ``argmax_k w·v_k`` (the paper's practical rule; ties go to the lowest index; ``lam``
    is not needed).  ``rule="sample"``: draw ``k ~ softmax_k(lam * w·v_k)``, the exact best response of the
    game, with ``generator`` for reproducibility (it must live on the device of ``v``).  Masked-out
    candidates are never chosen.  Returns a LongTensor ``[P]`` (0-d for unbatched ``v``).
    """
    if rule not in ("argmax", "sample"):
        raise MoalignError(f"rule must be 'argmax' or 'sample', got {rule!r}")
    v64, valid, batched, _ = _prepare(v, mask)
    p, _, g = v64.shape
    w64 = _as_weights(w, p, g, batched, v64.device)
    if rule == "argmax":
        scores = torch.einsum("pkg,pg->pk", v64, w64).masked_fill(~valid, -math.inf)
        idx = scores.argmax(dim=-1)
    else:
        if lam is None:
            raise MoalignError("rule='sample' needs lam (the tilt strength)")
        lam_t = _as_lam(lam, p, v64.device)
        probs = torch.softmax(_log_tilt(v64, valid, w64, lam_t), dim=-1)
        if p == 0:
            idx = torch.zeros(0, dtype=torch.long, device=v64.device)
        else:
            idx = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return idx if batched else idx[0]


# ------------------------------------------------------------------------------------------ exact solver


def _newton_direction(
    v64: torch.Tensor, p: torch.Tensor, m: torch.Tensor, lam: torch.Tensor, support: torch.Tensor
) -> torch.Tensor:
    """Newton direction of L on the face spanned by ``support`` (equality-constrained KKT system).

    Solves ``[H_SS + mu I, 1; 1^T, 0] [d; nu] = [-m_S / lam; 0]`` with ``H = Cov_p(v)`` (the Hessian of L
    divided by ``lam^2``) and a tiny relative ridge ``mu`` so that flat directions give long (ratio-test
    limited) steps instead of a singular system.  Coordinates outside the support get ``d = 0``.
    """
    n, g = m.shape
    centred = v64 - m.unsqueeze(1)
    hess = torch.einsum("pk,pkg,pkh->pgh", p, centred, centred)
    sm = support.to(_F64)
    hess = hess * sm.unsqueeze(-1) * sm.unsqueeze(-2)
    diag = torch.diagonal(hess, dim1=-2, dim2=-1)
    scale_sq = v64.abs().amax(dim=(1, 2)).square()
    mu = 1e-10 * diag.sum(dim=-1) / sm.sum(dim=-1).clamp_min(1.0) + 1e-14 * scale_sq + 1e-300
    kkt = torch.zeros(n, g + 1, g + 1, dtype=_F64, device=m.device)
    kkt[:, :g, :g] = hess + torch.diag_embed(sm * mu.unsqueeze(-1) + (1.0 - sm))
    kkt[:, :g, g] = sm
    kkt[:, g, :g] = sm
    rhs = torch.zeros(n, g + 1, dtype=_F64, device=m.device)
    rhs[:, :g] = -(m / lam.unsqueeze(-1)) * sm
    sol = torch.linalg.solve(kkt, rhs)
    return sol[:, :g] * sm


def _shifted_lse(logp: torch.Tensor, p: torch.Tensor, t: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``L(w + alpha d) - L(w) = log sum_k p_k exp(alpha t_k)`` for a ladder of ``alpha`` ([P, J]).

    ``t = lam * v·d``.  For small ``alpha`` the difference is computed as
    ``alpha t̄ + log1p(sum_k p_k expm1(alpha (t_k - t̄)))`` (``t̄ = p·t``), which keeps relative precision
    when the decrease is far below the rounding error of L itself; otherwise by a plain logsumexp.
    """
    tbar = (p * t).sum(dim=-1, keepdim=True)
    u = t - tbar
    au = alpha.unsqueeze(-1) * u.unsqueeze(-2)
    small = alpha * u.abs().amax(dim=-1, keepdim=True) <= 1.0
    precise = alpha * tbar + torch.log1p((p.unsqueeze(-2) * torch.expm1(au.clamp(max=1.0))).sum(dim=-1))
    direct = torch.logsumexp(logp.unsqueeze(-2) + alpha.unsqueeze(-1) * t.unsqueeze(-2), dim=-1)
    return torch.where(small, precise, direct)


def _solve_face_newton(
    v64: torch.Tensor, valid: torch.Tensor, lam: torch.Tensor, w: torch.Tensor, tol: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Primal active-set Newton method with Frank-Wolfe steps from ``w``; returns (w, L, gap_v, conv, iters)."""
    n, _, g = v64.shape
    device = v64.device
    scale = v64.abs().amax(dim=(1, 2))
    ladder = 0.5 ** torch.arange(_LADDER, dtype=_F64, device=device)
    active = torch.ones(n, dtype=torch.bool, device=device)
    force_fw = torch.zeros(n, dtype=torch.bool, device=device)
    eye = torch.eye(g, dtype=_F64, device=device)
    iterations = 0
    while True:
        objective, logp, p, m = _state(v64, valid, w, lam)
        gap_v = _fw_gap(m, w)
        conv = _converged(gap_v, objective, lam, scale, g, tol)
        active = active & ~conv
        if iterations >= max_iter or not bool(active.any()):
            return w, objective, gap_v, conv, iterations
        iterations += 1

        # Direction: Frank-Wolfe towards the objective with the lowest tilted mean when that objective is
        # outside the support and clearly better than the face (adds a coordinate), else Newton on the face.
        support = w > 0
        mw = (m * w).sum(dim=-1)
        face_gap = mw - m.masked_fill(~support, math.inf).amin(dim=-1)
        d_newton = _newton_direction(v64, p, m, lam, support)
        slope_newton = (m * d_newton).sum(dim=-1)
        newton_bad = ~torch.isfinite(d_newton).all(dim=-1) | ~(slope_newton < 0)
        use_fw = force_fw | newton_bad | (face_gap <= 0.5 * gap_v)
        d_fw = eye[m.argmin(dim=-1)] - w
        d = torch.where(use_fw.unsqueeze(-1), d_fw, torch.nan_to_num(d_newton))

        # Ratio test: the longest step keeping w >= 0 (capped at the Newton / full Frank-Wolfe step 1).
        neg = d < 0
        ratios = torch.where(neg, w / torch.where(neg, -d, torch.ones_like(d)), torch.full_like(w, math.inf))
        alpha_max = ratios.amin(dim=-1).clamp(max=1.0)
        hit = ratios.argmin(dim=-1)

        # Armijo line search on the ladder alpha_max * 2^-j, all step sizes evaluated at once.
        t = lam.unsqueeze(-1) * torch.einsum("pkg,pg->pk", v64, d)
        alphas = alpha_max.unsqueeze(-1) * ladder
        diff = _shifted_lse(logp, p, t, alphas)
        slope = lam * (m * d).sum(dim=-1)
        ok = torch.isfinite(diff) & (diff <= _ARMIJO * alphas * slope.unsqueeze(-1)) & (alphas > 0)
        found = ok.any(dim=-1)
        first = ok.to(torch.uint8).argmax(dim=-1)
        step = alphas.gather(-1, first.unsqueeze(-1)).squeeze(-1)

        move = active & found
        w_new = (w + step.unsqueeze(-1) * d).clamp_min(0.0)
        to_boundary = move & (first == 0) & (ratios.amin(dim=-1) <= 1.0)
        w_new[to_boundary, hit[to_boundary]] = 0.0
        w_new = w_new / w_new.sum(dim=-1, keepdim=True)
        w = torch.where(move.unsqueeze(-1), w_new, w)

        # No acceptable step: retry a failed Newton step as Frank-Wolfe; a failed Frank-Wolfe step means the
        # row sits at the optimum to working precision, so it stops there.
        stalled = active & ~found
        force_fw = stalled & ~use_fw
        active = active & ~(stalled & use_fw)


def _solve_exact(
    v64: torch.Tensor, valid: torch.Tensor, lam: torch.Tensor, tol: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Exact solver with continuation in ``lam`` for sharp problems; returns (w, L, gap_v, conv, iters).

    When ``lam * (spread of the values)`` exceeds ``_SHARP``, L is close to the piecewise-linear
    ``lam * max_k v_k·w`` far from the optimum and Newton steps from the uniform start make slow progress;
    the problem is then solved for ``lam`` reduced to sharpness ``_SHARP`` first and ``lam`` is raised tenfold
    per stage, warm-starting each stage from the previous weights.  ``max_iter`` applies per stage.
    """
    n, _, g = v64.shape
    w = torch.full((n, g), 1.0 / g, dtype=_F64, device=v64.device)
    spread = (v64.amax(dim=1) - v64.amin(dim=1)).amax(dim=-1) if n else v64.new_zeros(0)
    sharp = lam * spread
    stages = (
        int(math.ceil(math.log10(float(sharp.max()) / _SHARP))) if n and float(sharp.max()) > _SHARP else 0
    )
    total = 0
    for stage in range(stages, 0, -1):
        lam_s = torch.minimum(lam, lam * _SHARP * 10.0 ** (stages - stage) / sharp.clamp_min(1e-300))
        w, _, _, _, its = _solve_face_newton(v64, valid, lam_s, w, max(tol, 1e-6), max_iter)
        total += its
    w, objective, gap_v, conv, its = _solve_face_newton(v64, valid, lam, w, tol, max_iter)
    return w, objective, gap_v, conv, total + its


# -------------------------------------------------------------------------------------- reference solver


def _solve_reference(
    v64: torch.Tensor, valid: torch.Tensor, lam: torch.Tensor, steps: int, step_size: float, grad_clip: float
) -> torch.Tensor:
    """Fixed-step gradient descent of the public reference code; returns float32 weights ``[P, G]``."""
    n, _, g = v64.shape
    with torch.inference_mode(False), torch.enable_grad():
        lam32 = lam.detach().clone().to(torch.float32)[:, None, None]
        # The reference multiplies lam into the bf16 values first, then takes the bf16 matmul with w.
        lam_v = (lam32 * v64.detach().clone().to(torch.bfloat16).float()).to(torch.bfloat16)
        validb = valid.detach().clone().to(torch.bfloat16)
        all_valid = bool(valid.all())
        logits = torch.zeros(n, g, dtype=torch.float32, device=v64.device)
        for it in range(steps):
            leaf = logits.detach().requires_grad_(True)
            wb = torch.softmax(leaf, dim=-1).to(torch.bfloat16)
            tilt = torch.exp(torch.matmul(lam_v, wb.unsqueeze(-1)).squeeze(-1))  # bf16 [P, K]
            loss = tilt.mean(dim=-1) if all_valid else (tilt * validb).sum(dim=-1) / validb.sum(dim=-1)
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
            grad = torch.nan_to_num(grad.float(), nan=0.0).clamp(-grad_clip, grad_clip)
            rate = step_size / torch.sqrt(torch.tensor(float(it + 1), device=v64.device))  # float32, as there
            logits = leaf.detach() - rate * grad
    return torch.softmax(logits.detach(), dim=-1)


# ------------------------------------------------------------------------------------------- public API


def solve_worst_case_weights(
    v: torch.Tensor,
    lam: float | torch.Tensor,
    *,
    tol: float = 1e-9,
    max_iter: int | None = None,
    method: SolverMethod = "exact",
    mask: torch.Tensor | None = None,
    step_size: float = 1.0,
    grad_clip: float = 10.0,
) -> WeightSolution:
    """Worst-case weights ``w* = argmin_{w in simplex} logsumexp_k(lam * v_k·w) - log K``, per prompt.

    Args:
        v: values ``[P, K, G]`` (or ``[K, G]``), any float dtype; computation runs in float64.
        lam: tilt strength ``lambda > 0`` (scalar or ``[P]`` tensor).  ``lam -> 0`` puts all weight on the
            objective with the lowest mean; ``lam -> inf`` approaches ``argmin_w max_k w·v_k``.
        tol: convergence tolerance on the certified Frank-Wolfe gap: a row has converged when
            ``m·w - min_g m_g <= tol * max|v|`` (value units, ``v`` centred by its mean) and
            ``lam * (m·w - min_g m_g) <= tol * max(1, |L|)`` (objective units), up to a float64 rounding floor
            that only matters for extreme sharpness ``lam * max|v| >~ 1e5``.
        max_iter: iteration cap; default 200 for ``"exact"`` (per continuation stage; a batch of random
            ``16 x 10`` problems needs about 10-35) and 10 for ``"reference"``, where it is the fixed number of
            steps.
        method: ``"exact"`` (default) or ``"reference"``.  ``"reference"`` reproduces, for comparison with
            the paper only, what the public reference code did: weights ``softmax(theta)`` with ``theta = 0``
            (uniform) at the start, then a fixed ``max_iter`` (10) steps
            ``theta <- theta - step_size / sqrt(t + 1) * clip(grad_theta mean_k exp(lam * v_k·w), ±grad_clip)``
            with values, weights and the exponentials in bfloat16 (no max-subtraction).  One deviation:
            where the bf16 exponential overflows the reference produced NaN gradients; here those entries are
            treated as zero so the result stays finite.  It does not converge in general.
        mask: optional ``[P, K]`` bool; False excludes a candidate (at least one valid per row).
        step_size, grad_clip: the reference scheme's ``weight_step_size`` (1.0) and gradient clip (10);
            ignored by ``"exact"``.

    Returns:
        :class:`WeightSolution`, tensors in the input's dtype (float32 for half/bfloat16 input; a float32
        objective is the float64 one rounded, so it is accurate to float32 precision only).  For
        ``method="reference"`` objective, gap and converged are evaluated exactly for the reference weights.
    """
    if method not in ("exact", "reference"):
        raise MoalignError(f"method must be 'exact' or 'reference', got {method!r}")
    if not (isinstance(tol, int | float) and not isinstance(tol, bool) and math.isfinite(tol) and tol >= 0):
        raise MoalignError(f"tol must be a finite number >= 0, got {tol!r}")
    if max_iter is None:
        max_iter = 200 if method == "exact" else 10
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise MoalignError(f"max_iter must be an integer >= 0, got {max_iter!r}")
    v64, valid, batched, dtype = _prepare(v, mask)
    n, _, g = v64.shape
    lam_t = _as_lam(lam, n, v64.device)
    out = _out_dtype(dtype)
    # L(w) for v - c equals L(w) - lam * c on the simplex: solve on values centred by their mean (better
    # conditioned when the values carry a large common offset) and add the offset back.
    count = valid.sum(dim=-1).to(_F64)
    offset = v64.sum(dim=(1, 2)) / (count * g)
    centred = torch.where(valid.unsqueeze(-1), v64 - offset[:, None, None], 0.0)
    scale = centred.abs().amax(dim=(1, 2))

    if method == "exact":
        w, objective, gap_v, conv, iterations = _solve_exact(centred, valid, lam_t, float(tol), max_iter)
    else:
        for name, value in (("step_size", step_size), ("grad_clip", grad_clip)):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise MoalignError(f"{name} must be a positive finite number, got {value!r}")
        w = _solve_reference(v64, valid, lam_t, max_iter, float(step_size), float(grad_clip)).to(_F64)
        objective, _, _, m = _state(centred, valid, w, lam_t)
        gap_v = _fw_gap(m, w)
        conv = _converged(gap_v, objective, lam_t, scale, g, float(tol))
        iterations = max_iter
    objective = objective + lam_t * offset

    sol = WeightSolution(
        weights=w.to(out),
        objective=objective.to(out),
        gap=(lam_t * gap_v).to(out),
        iterations=iterations,
        converged=conv,
        method=method,
    )
    if batched:
        return sol
    return WeightSolution(
        weights=sol.weights[0],
        objective=sol.objective[0],
        gap=sol.gap[0],
        iterations=sol.iterations,
        converged=sol.converged[0],
        method=method,
    )
