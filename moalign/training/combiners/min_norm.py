"""The min-norm problem of MGDA: ``argmin_{alpha in simplex} alpha^T G alpha`` (exact active set or
Frank-Wolfe), and the mixin the MGDA combiners share."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from moalign.errors import MoalignError
from moalign.training.combiners.weighting import _check_gram


def _min_norm_2(g: np.ndarray) -> np.ndarray:
    """Closed form for K = 2: ``gamma = <g2 - g1, g2> / ||g1 - g2||^2`` clipped to [0, 1]."""
    denom = g[0, 0] + g[1, 1] - 2.0 * g[0, 1]
    if denom <= 0.0:  # identical gradients: every convex combination is the same vector
        return np.array([0.5, 0.5])
    gamma = min(1.0, max(0.0, (g[1, 1] - g[0, 1]) / denom))
    return np.array([gamma, 1.0 - gamma])


def _solve_face(g: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Minimise ``x^T G_FF x`` subject to ``sum x = 1`` (no sign constraint) via the KKT system.

    ``[[G_FF, 1], [1^T, 0]] [x; -nu] = [0; 1]``; the system is consistent for PSD ``G`` (the convex quadratic
    is bounded below on the affine set), so a least-squares solve returns an exact minimiser even when
    ``G_FF`` is singular.
    """
    n = len(free)
    if n == 1:
        return np.ones(1)
    a = np.zeros((n + 1, n + 1))
    a[:n, :n] = g[np.ix_(free, free)]
    a[:n, n] = 1.0
    a[n, :n] = 1.0
    b = np.zeros(n + 1)
    b[n] = 1.0
    x = np.linalg.lstsq(a, b, rcond=1e-13)[0][:n]
    return x + (1.0 - x.sum()) / n


def _active_set(g: np.ndarray, tol: float, max_iter: int) -> np.ndarray:
    """Primal active-set method for ``min x^T G x`` over the simplex (exact up to round-off).

    Start at the vertex with the smallest norm. Repeatedly minimise over the affine hull of the current free
    face; move towards that minimiser until an entry hits zero (drop it from the face), or, once the point is
    optimal on its face, add the fixed index with the most negative KKT multiplier
    ``lambda_i = (G x)_i - x^T G x`` (stop when all are >= -tol).
    """
    k = g.shape[0]
    x = np.zeros(k)
    j = int(np.argmin(np.diag(g)))
    x[j] = 1.0
    free = np.zeros(k, dtype=bool)
    free[j] = True
    for _ in range(max_iter):
        idx = np.flatnonzero(free)
        target = np.zeros(k)
        target[idx] = _solve_face(g, idx)
        f_x = x @ g @ x
        f_t = target @ g @ target
        if f_t < f_x - 1e-15:
            p = target - x
            t, block = 1.0, -1
            for i in idx:
                if p[i] < 0.0:
                    ti = -x[i] / p[i]
                    if ti < t:
                        t, block = ti, i
            x = x + t * p
            x[~free] = 0.0
            if block >= 0:
                x[block] = 0.0
                free[block] = False
            x = np.clip(x, 0.0, None)
            x /= x.sum()
            continue
        grad = g @ x
        lam = grad - x @ grad
        lam[free] = np.inf
        i = int(np.argmin(lam))
        if lam[i] >= -tol:
            break
        free[i] = True
    return x


def _frank_wolfe(g: np.ndarray, x: np.ndarray, tol: float, max_iter: int) -> tuple[np.ndarray, float]:
    """Frank-Wolfe with away steps and exact line search (Sener & Koltun's solver, plus away steps so that
    it converges linearly on degenerate problems). Stops when the duality gap
    ``2 (x^T G x - min_i (G x)_i)`` -- an upper bound on ``f(x) - f*`` -- is <= ``tol``. Returns (x, gap)."""

    def duality_gap(x: np.ndarray) -> tuple[np.ndarray, float, int, float]:
        grad = g @ x  # half the gradient of f(x) = x^T G x
        f = float(x @ grad)
        s = int(np.argmin(grad))
        return grad, f, s, 2.0 * (f - float(grad[s]))

    gap = math.inf
    for _ in range(max_iter):
        grad, f, s, gap = duality_gap(x)
        if gap <= tol:
            break
        support = np.flatnonzero(x > 0.0)
        v = int(support[np.argmax(grad[support])])
        away_gap = 2.0 * (grad[v] - f)
        if gap >= away_gap or x[v] >= 1.0:
            d = -x.copy()
            d[s] += 1.0
            t_max, away = 1.0, False
        else:
            d = x.copy()
            d[v] -= 1.0
            t_max, away = x[v] / (1.0 - x[v]), True
        slope = float(d @ grad)  # f(x + t d) = f + 2 t slope + t^2 curv
        curv = float(d @ g @ d)
        t = t_max if curv <= 0.0 else min(t_max, max(0.0, -slope / curv))
        if t <= 0.0:
            break
        x = x + t * d
        if away and t == t_max:
            x[v] = 0.0
        x = np.clip(x, 0.0, None)
        x /= x.sum()
    else:  # the budget ran out: report the gap at the point returned
        gap = duality_gap(x)[3]
    return x, gap


def min_norm_weights(
    gram: Any, *, tol: float = 1e-10, max_iter: int | None = None, method: str = "active-set"
) -> torch.Tensor:
    """``alpha = argmin_{alpha >= 0, sum alpha = 1} alpha^T G alpha`` (the MGDA min-norm element).

    ``gram`` is a symmetric PSD ``K x K`` matrix (``G_ij = <g_i, g_j>``; rank-deficient is fine). The problem
    is solved on ``G / max_k G_kk`` so ``tol`` is relative to the largest squared gradient norm: on return
    ``alpha^T G alpha - min <= tol * max_k G_kk`` (certified by the Frank-Wolfe duality gap).

    - K = 1: ``[1]``. All-zero ``G``: uniform weights (every point is optimal).
    - K = 2: closed form ``gamma = <g2 - g1, g2> / ||g1 - g2||^2`` clipped to [0, 1].
    - K > 2, ``method="active-set"`` (default): exact primal active-set QP, then Frank-Wolfe polishing only
      if the duality gap is still above ``tol``. ``method="frank-wolfe"``: Frank-Wolfe (with away steps and
      exact line search) from the best pair solution, as in Sener & Koltun 2018.

    Ties (several optimal alphas, e.g. duplicated gradients) are broken by the solver; the minimum value is
    unique. Returns a float64 CPU tensor of shape ``[K]``.
    """
    if not (isinstance(tol, int | float) and tol > 0 and math.isfinite(tol)):
        raise MoalignError(f"tol must be a positive number, got {tol!r}")
    if method not in ("active-set", "frank-wolfe"):
        raise MoalignError(f"unknown min-norm method {method!r}; known: active-set, frank-wolfe")
    if max_iter is not None and (not isinstance(max_iter, int) or max_iter < 1):
        raise MoalignError(f"max_iter must be a positive integer, got {max_iter!r}")
    g_t = _check_gram(gram)
    k = g_t.shape[0]
    if k == 1:
        return torch.ones(1, dtype=torch.float64)
    g = g_t.numpy().copy()
    scale = float(np.diag(g).max())
    if scale <= 0.0:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    g /= scale
    if k == 2:
        return torch.from_numpy(_min_norm_2(g))
    fw_iter = max_iter if max_iter is not None else 20_000
    if method == "active-set":
        x = _active_set(g, tol, max_iter if max_iter is not None else 50 * k + 50)
    else:
        # best pair (closed form on each 2-face) as the starting point
        best, x = math.inf, np.zeros(k)
        for i in range(k):
            for j in range(i + 1, k):
                w = _min_norm_2(g[np.ix_([i, j], [i, j])])
                val = w @ g[np.ix_([i, j], [i, j])] @ w
                if val < best:
                    best, x = val, np.zeros(k)
                    x[[i, j]] = w
    x, gap = _frank_wolfe(g, x, tol, fw_iter)
    if gap > tol:
        warnings.warn(
            f"min_norm_weights: duality gap {gap:.3g} above tol {tol:.3g} after {fw_iter} iterations",
            RuntimeWarning,
            stacklevel=2,
        )
    return torch.from_numpy(x)


class _MinNormMixin:
    def __init__(self, tol: float = 1e-10, method: str = "active-set"):
        if not (isinstance(tol, int | float) and tol > 0 and math.isfinite(tol)):
            raise MoalignError(f"tol must be a positive number, got {tol!r}")
        if method not in ("active-set", "frank-wolfe"):
            raise MoalignError(f"unknown min-norm method {method!r}; known: active-set, frank-wolfe")
        self.tol = float(tol)
        self.method = method

    def _min_norm(self, gram: torch.Tensor) -> torch.Tensor:
        return min_norm_weights(gram, tol=self.tol, method=self.method)
