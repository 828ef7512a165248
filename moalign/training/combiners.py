"""Gradient combiners for multi-objective training (pure tensor functions, no model code).

Per training step the trainer has, for every objective ``k = 0..K-1``, a loss value ``l_k`` and a gradient
``g_k``. A *gradient* is given either as a list of parameter-shaped tensors (one entry per trainable
parameter, ``None`` meaning "this objective does not touch that parameter", i.e. zeros) or as one tensor
(e.g. a flattened vector), which is treated as a list with one entry. All objectives must list the same
parameters in the same order with the same shapes.

Every combiner here produces a direction of the form ``d = sum_k alpha_k g_k`` (PCGrad included: each
projection subtracts a multiple of an *original* gradient, so its result is also a linear combination of
the ``g_k``, see :class:`PCGradCombiner`). The coefficients ``alpha`` depend on the gradients only through
the ``K x K`` Gram matrix ``G_ij = <g_i, g_j>``, so a trainer can accumulate ``G`` itself (parameter by
parameter, or all-reduced across data-parallel workers), call :meth:`Combiner.weights` /
:meth:`Combiner.weights_and_stats`, and form ``d`` with :func:`apply_weights` without ever holding more
than the K gradient copies.

Combiners (registered names, see :func:`get_combiner`):

``linear``           fixed weights ``w / sum(w)`` (default uniform: the mean of the gradients).
``mgda``             ``alpha = argmin_{alpha in simplex} ||sum_k alpha_k g_k||^2`` (Desideri; Sener & Koltun).
``mgda-normalized``  the same min-norm problem on unit gradients ``u_k = g_k / ||g_k||`` and the step
                     ``d = sum_k w_k u_k`` (so the reported raw coefficients are ``alpha_k = w_k / ||g_k||``);
                     ``apply_to="raw"`` instead applies ``w`` to the raw gradients.
``mgda-decoupled``   ``alpha`` = min-norm weights of the loss-normalised gradients ``g_k / l_k`` (Gram
                     ``G_ij / (l_i l_j)``), applied to the RAW gradients: ``d = sum_k alpha_k g_k``.
                     Requires ``l_k > 0``.
``groupdro``         online mirror ascent on the simplex: ``q <- q * exp(eta * l)``, normalised; stateful.
``pcgrad``           Yu et al. 2020 gradient surgery with a seeded random projection order.

Conventions: ``alpha`` is always a float64 CPU tensor of shape ``[K]`` holding the coefficients applied to
the raw gradients (``sum(alpha) == 1`` for every combiner except ``mgda-normalized`` with the default
``apply_to`` and ``pcgrad`` with ``reduction="sum"``). Bad input raises :class:`moalign.errors.MoalignError`.
"""

from __future__ import annotations

import inspect
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moalign.errors import MoalignError

#: one objective's gradient: parameter-shaped tensors (``None`` = zero), or a single (flat) tensor
ObjectiveGrad = Sequence["torch.Tensor | None"] | torch.Tensor
LossesLike = torch.Tensor | Sequence[float] | np.ndarray

__all__ = [
    "CombineResult",
    "Combiner",
    "GroupDROCombiner",
    "LinearCombiner",
    "MGDACombiner",
    "MGDADecoupledCombiner",
    "MGDANormalizedCombiner",
    "PCGradCombiner",
    "apply_weights",
    "available_combiners",
    "combine_stats",
    "get_combiner",
    "gram_matrix",
    "min_norm_weights",
    "register_combiner",
]

# float64 elements per objective materialised at once by gram_matrix (bounds its temporary memory)
_GRAM_CHUNK = 1 << 22


# --------------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------------


def _as_grad_lists(grads: Sequence[ObjectiveGrad]) -> list[list[torch.Tensor | None]]:
    """Normalise ``grads`` to ``K`` lists of ``P`` tensors (or ``None``) and check the structure."""
    if isinstance(grads, torch.Tensor):
        raise MoalignError(
            "grads must be a sequence with one entry per objective (a list of parameter tensors or one "
            "flat tensor each), not a single tensor"
        )
    try:
        grads = list(grads)
    except TypeError as e:
        raise MoalignError(f"grads must be a sequence with one entry per objective, got {type(grads)}") from e
    if len(grads) < 1:
        raise MoalignError("need at least one objective (K >= 1), got an empty list of gradients")
    out: list[list[torch.Tensor | None]] = []
    for k, g in enumerate(grads):
        if isinstance(g, torch.Tensor):
            out.append([g])
            continue
        if g is None or isinstance(g, str | bytes):
            raise MoalignError(f"gradient of objective {k} must be a tensor or a list of tensors, got {g!r}")
        try:
            lst = list(g)
        except TypeError as e:
            raise MoalignError(
                f"gradient of objective {k} must be a tensor or a list of tensors, got {type(g)}"
            ) from e
        for p, t in enumerate(lst):
            if t is not None and not isinstance(t, torch.Tensor):
                raise MoalignError(
                    f"gradient of objective {k}, parameter {p}: expected a tensor, got {type(t)}"
                )
        out.append(lst)
    n_params = len(out[0])
    if n_params < 1:
        raise MoalignError("gradient of objective 0 has no parameters")
    for k, lst in enumerate(out):
        if len(lst) != n_params:
            raise MoalignError(
                f"gradient of objective {k} has {len(lst)} parameter tensors but objective 0 has {n_params}"
            )
    for p in range(n_params):
        shape = None
        first = -1
        for k in range(len(out)):
            t = out[k][p]
            if t is None:
                continue
            if shape is None:
                shape, first = t.shape, k
            elif t.shape != shape:
                raise MoalignError(
                    f"parameter {p}: gradient of objective {k} has shape {tuple(t.shape)} but objective "
                    f"{first} has shape {tuple(shape)}"
                )
        if shape is not None:
            for k in range(len(out)):
                t = out[k][p]
                if t is not None and (t.is_complex() or not t.is_floating_point()):
                    raise MoalignError(
                        f"parameter {p}: gradient of objective {k} is not a real floating tensor"
                    )
    return out


def _check_losses(
    losses: LossesLike | None, k: int | None = None, what: str = "loss", plural: str = "losses"
) -> torch.Tensor:
    """Losses (or weights: ``what``/``plural``) as a float64 CPU vector; finite; length ``k`` when given."""
    if losses is None:
        raise MoalignError(f"this combiner needs the per-objective {plural}, got None")
    try:
        if isinstance(losses, torch.Tensor):
            t = losses.detach().to(device="cpu", dtype=torch.float64)
        else:
            t = torch.as_tensor(np.asarray(losses, dtype=np.float64))
    except (TypeError, ValueError) as e:
        raise MoalignError(f"{plural} must be a vector of numbers, got {losses!r}") from e
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1:
        raise MoalignError(
            f"{plural} must be a 1-D vector with one value per objective, got shape {tuple(t.shape)}"
        )
    if t.numel() < 1:
        raise MoalignError(f"need at least one objective (K >= 1), got no {plural}")
    if k is not None and t.numel() != k:
        raise MoalignError(f"got {t.numel()} {plural} for {k} objectives")
    bad = ~torch.isfinite(t)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise MoalignError(f"{what} of objective {i} is not finite ({float(t[i])})")
    return t


def _check_gram(gram: Any, k: int | None = None) -> torch.Tensor:
    """A symmetric positive-semidefinite ``K x K`` Gram matrix as float64 CPU (symmetrised)."""
    try:
        if isinstance(gram, torch.Tensor):
            g = gram.detach().to(device="cpu", dtype=torch.float64)
        else:
            g = torch.as_tensor(np.asarray(gram, dtype=np.float64))
    except (TypeError, ValueError) as e:
        raise MoalignError(f"Gram matrix must be a K x K matrix of numbers, got {type(gram)}") from e
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise MoalignError(f"Gram matrix must be square K x K, got shape {tuple(g.shape)}")
    if g.shape[0] < 1:
        raise MoalignError("need at least one objective (K >= 1), got an empty Gram matrix")
    if k is not None and g.shape[0] != k:
        raise MoalignError(f"Gram matrix is {g.shape[0]} x {g.shape[0]} but there are {k} objectives")
    if not torch.isfinite(g).all():
        raise MoalignError("Gram matrix has non-finite entries (NaN/inf): a gradient is not finite")
    scale = float(g.abs().max())
    if scale == 0.0:
        return g
    if float((g - g.T).abs().max()) > 1e-6 * scale:
        raise MoalignError("Gram matrix is not symmetric")
    g = 0.5 * (g + g.T)
    if float(torch.diagonal(g).min()) < -1e-8 * scale:
        raise MoalignError("Gram matrix has a negative diagonal entry (squared norm): not a Gram matrix")
    if g.shape[0] > 1 and float(torch.linalg.eigvalsh(g).min()) < -1e-6 * scale:
        raise MoalignError("Gram matrix is not positive semidefinite")
    return g


# --------------------------------------------------------------------------------------------------------
# Gram matrix and weighted sum
# --------------------------------------------------------------------------------------------------------


def gram_matrix(grads: Sequence[ObjectiveGrad], *, chunk_size: int = _GRAM_CHUNK) -> torch.Tensor:
    """``G_ij = <g_i, g_j> = sum_p <g_ip, g_jp>``, a float64 ``[K, K]`` CPU tensor.

    Works parameter by parameter (and in slices of ``chunk_size`` elements within a parameter), so at most
    ``K * chunk_size`` float64 values are materialised at once; gradients are never concatenated. ``None``
    entries count as zeros. Non-finite gradients raise :class:`MoalignError` naming the objective and the
    parameter (detected on the diagonal ``||g_k||^2``, so no extra pass is needed for finite inputs).
    """
    gs = _as_grad_lists(grads)
    if chunk_size < 1:
        raise MoalignError(f"chunk_size must be >= 1, got {chunk_size}")
    k_obj, n_params = len(gs), len(gs[0])
    device = next((t.device for lst in gs for t in lst if t is not None), torch.device("cpu"))
    gram = torch.zeros(k_obj, k_obj, dtype=torch.float64, device=device)
    for p in range(n_params):
        present = [k for k in range(k_obj) if gs[k][p] is not None]
        if not present:
            continue
        flats = [gs[k][p].detach().reshape(-1) for k in present]
        n = flats[0].numel()
        idx = torch.tensor(present, device=device)
        rows, cols = idx[:, None], idx[None, :]
        for start in range(0, n, chunk_size):
            m = torch.stack(
                [f[start : start + chunk_size].to(device=device, dtype=torch.float64) for f in flats]
            )
            gram[rows, cols] += m @ m.T
    gram = gram.cpu()
    diag = torch.diagonal(gram)
    if not torch.isfinite(gram).all():
        for k in range(k_obj):
            for p, t in enumerate(gs[k]):
                if t is not None and not torch.isfinite(t.detach()).all():
                    raise MoalignError(
                        f"gradient of objective {k}, parameter {p} has non-finite entries (NaN/inf)"
                    )
        k = int((~torch.isfinite(diag)).nonzero()[0]) if not torch.isfinite(diag).all() else 0
        raise MoalignError(f"gradient of objective {k} is too large: its squared norm overflows float64")
    return 0.5 * (gram + gram.T)


def apply_weights(alpha: LossesLike, grads: Sequence[ObjectiveGrad]) -> list[torch.Tensor | None]:
    """``d_p = sum_k alpha_k g_kp`` for every parameter ``p`` (accumulated in float64, returned in the
    dtype/device of the first non-``None`` gradient of that parameter; ``None`` where all are ``None``).

    A single-tensor gradient gives a one-element list.
    """
    gs = _as_grad_lists(grads)
    a = _check_losses(alpha, len(gs), what="weight", plural="weights")
    out: list[torch.Tensor | None] = []
    for p in range(len(gs[0])):
        ref = next((gs[k][p] for k in range(len(gs)) if gs[k][p] is not None), None)
        if ref is None:
            out.append(None)
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for k in range(len(gs)):
            t = gs[k][p]
            if t is None or float(a[k]) == 0.0:
                continue
            acc.add_(t.detach().to(device=ref.device, dtype=torch.float64), alpha=float(a[k]))
        out.append(acc.to(ref.dtype))
    return out


# --------------------------------------------------------------------------------------------------------
# min-norm solver
# --------------------------------------------------------------------------------------------------------


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
    gap = math.inf
    for _ in range(max_iter):
        grad = g @ x  # half the gradient of f(x) = x^T G x
        f = float(x @ grad)
        s = int(np.argmin(grad))
        gap = 2.0 * (f - grad[s])
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


# --------------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------------


def combine_stats(
    gram: Any | None, alpha: LossesLike, losses: LossesLike | None = None, *, name: str | None = None
) -> dict[str, Any]:
    """JSON-able per-step statistics of ``d = sum_k alpha_k g_k``, computed from the Gram matrix only.

    Keys: ``alpha``, ``losses`` (if given), and with a Gram matrix: ``grad_norms`` ``||g_k||``, ``cosines``
    (``K x K``, 0 where a gradient is zero), ``inner`` ``<d, g_k> = (G alpha)_k``, ``min_inner``,
    ``direction_norm`` ``||d|| = sqrt(alpha^T G alpha)``, and ``common_descent``: True iff
    ``<d, g_k> > 0`` for every k, i.e. a small step along ``-d`` decreases every loss to first order.
    """
    a = _check_losses(alpha, what="weight", plural="weights").numpy()
    stats: dict[str, Any] = {}
    if name is not None:
        stats["combiner"] = name
    stats["alpha"] = [float(v) for v in a]
    if losses is not None:
        stats["losses"] = [float(v) for v in _check_losses(losses, len(a))]
    if gram is None:
        return stats
    g = _check_gram(gram, len(a)).numpy()
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    denom = np.outer(norms, norms)
    cos = np.divide(g, denom, out=np.zeros_like(g), where=denom > 0)
    inner = g @ a
    stats["grad_norms"] = [float(v) for v in norms]
    stats["cosines"] = [[float(v) for v in row] for row in np.clip(cos, -1.0, 1.0)]
    stats["inner"] = [float(v) for v in inner]
    stats["min_inner"] = float(inner.min())
    stats["direction_norm"] = float(math.sqrt(max(0.0, float(a @ g @ a))))
    stats["common_descent"] = bool((inner > 0).all())
    return stats


# --------------------------------------------------------------------------------------------------------
# combiners
# --------------------------------------------------------------------------------------------------------


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
        lo = _check_losses(losses, gram.shape[0])
        alpha, stats = self.weights_and_stats(lo, gram)
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


class LinearCombiner(Combiner):
    """Fixed scalarisation ``d = sum_k w_k g_k`` with ``w`` normalised to sum 1 (default uniform: the mean)."""

    name = "linear"
    needs_gram = False

    def __init__(self, weights: Sequence[float] | None = None):
        self.raw_weights = None
        if weights is not None:
            w = _check_losses(weights, what="linear combiner weight", plural="linear combiner weights")
            if (w < 0).any():
                raise MoalignError(f"linear combiner weights must be >= 0, got {w.tolist()}")
            if float(w.sum()) <= 0:
                raise MoalignError("linear combiner weights must not all be zero")
            self.raw_weights = w / w.sum()

    def _weights(self, losses, gram):
        k = losses.numel() if losses is not None else gram.shape[0]
        if self.raw_weights is None:
            return torch.full((k,), 1.0 / k, dtype=torch.float64), {}
        if self.raw_weights.numel() != k:
            raise MoalignError(
                f"linear combiner has {self.raw_weights.numel()} weights but there are {k} objectives"
            )
        return self.raw_weights.clone(), {}

    def describe(self):
        w = None if self.raw_weights is None else self.raw_weights.tolist()
        return {**super().describe(), "weights": w}


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


class MGDACombiner(_MinNormMixin, Combiner):
    """MGDA: ``alpha = argmin_{simplex} ||sum_k alpha_k g_k||^2``; ``d`` is the min-norm element of the convex
    hull of the gradients, so ``<d, g_k> >= ||d||^2`` for every k (a common descent direction unless d = 0,
    which certifies Pareto stationarity)."""

    name = "mgda"

    def _weights(self, losses, gram):
        return self._min_norm(gram), {}

    def describe(self):
        return {**super().describe(), "tol": self.tol, "method": self.method}


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


class MGDADecoupledCombiner(_MinNormMixin, Combiner):
    """MGDA-Decoupled: ``alpha = argmin_{simplex} ||sum_k alpha_k g_k / l_k||^2`` (Gram ``G_ij / (l_i l_j)``,
    the gradients of ``log L_k``), applied to the RAW gradients: ``d = sum_k alpha_k g_k``.

    Objectives with large loss (lagging) get more weight; the step keeps the raw gradient scale. ``d`` is not
    guaranteed to be a common descent direction (see ``stats["common_descent"]``). Losses must be > 0.
    """

    name = "mgda-decoupled"
    needs_losses = True

    def _weights(self, losses, gram):
        if (losses <= 0).any():
            i = int((losses <= 0).nonzero()[0])
            raise MoalignError(
                f"mgda-decoupled needs positive losses (it divides gradients by them); objective {i} has "
                f"loss {float(losses[i])}"
            )
        inv = 1.0 / losses
        return self._min_norm(gram * torch.outer(inv, inv)), {}

    def describe(self):
        return {**super().describe(), "tol": self.tol, "method": self.method}


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


class PCGradCombiner(Combiner):
    """PCGrad (Yu et al. 2020, "Gradient surgery for multi-task learning").

    For each i: ``h_i = g_i``; for j != i in a random order: if ``<h_i, g_j> < 0``,
    ``h_i <- h_i - <h_i, g_j> / ||g_j||^2 g_j`` (projection onto the normal plane of the ORIGINAL ``g_j``).
    Then ``d = sum_i h_i`` (``reduction="sum"``, as in the paper) or the mean.

    Since every projection subtracts a multiple of an original gradient, ``h_i = sum_j C_ij g_j`` with
    ``C = I`` updated through ``<h_i, g_j> = (C G)_ij``; the whole algorithm runs on the Gram matrix and
    ``alpha = 1^T C`` (or ``/ K``) are exact effective coefficients. Orders come from a ``torch.Generator``
    seeded with ``seed`` (one permutation of the other objectives per i per step; logged as
    ``stats["pcgrad_orders"]``, with ``stats["n_projections"]``).
    """

    name = "pcgrad"

    def __init__(self, seed: int = 0, reduction: str = "sum"):
        if reduction not in ("sum", "mean"):
            raise MoalignError(f"pcgrad: reduction must be 'sum' or 'mean', got {reduction!r}")
        if not isinstance(seed, int):
            raise MoalignError(f"pcgrad: seed must be an integer, got {seed!r}")
        self.seed = seed
        self.reduction = reduction
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)

    def _weights(self, losses, gram):
        k = gram.shape[0]
        coef = torch.eye(k, dtype=torch.float64)
        orders: list[list[int]] = []
        n_proj = 0
        for i in range(k):
            others = [j for j in range(k) if j != i]
            perm = torch.randperm(len(others), generator=self.generator).tolist() if others else []
            order = [others[p] for p in perm]
            orders.append(order)
            for j in order:
                ip = float(coef[i] @ gram[:, j])
                gjj = float(gram[j, j])
                if ip < 0.0 and gjj > 0.0:
                    coef[i, j] -= ip / gjj
                    n_proj += 1
        alpha = coef.sum(0)
        if self.reduction == "mean":
            alpha = alpha / k
        return alpha, {"pcgrad_orders": orders, "n_projections": n_proj}

    def reset(self):
        self.generator.manual_seed(self.seed)

    def state_dict(self):
        return {"rng_state": self.generator.get_state()}

    def load_state_dict(self, state):
        if state.get("rng_state") is not None:
            self.generator.set_state(state["rng_state"])

    def describe(self):
        return {**super().describe(), "seed": self.seed, "reduction": self.reduction}


# --------------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., Combiner]] = {
    "linear": LinearCombiner,
    "mgda": MGDACombiner,
    "mgda-normalized": MGDANormalizedCombiner,
    "mgda-decoupled": MGDADecoupledCombiner,
    "groupdro": GroupDROCombiner,
    "pcgrad": PCGradCombiner,
}
_ALIASES = {
    "uniform": "linear",
    "mgda-normalised": "mgda-normalized",
    "group-dro": "groupdro",
}


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    return _ALIASES.get(key, key)


def register_combiner(name: str, factory: Callable[..., Combiner]) -> None:
    """Register ``factory(**kwargs) -> Combiner`` under ``name`` (case-insensitive, ``_`` == ``-``)."""
    if not isinstance(name, str) or not name.strip():
        raise MoalignError(f"combiner name must be a non-empty string, got {name!r}")
    _REGISTRY[_canonical(name)] = factory


def available_combiners() -> list[str]:
    """Registered combiner names (sorted)."""
    return sorted(_REGISTRY)


def get_combiner(name: str, **kwargs: Any) -> Combiner:
    """A new combiner by name (case-insensitive; ``_`` == ``-``; aliases: uniform, mgda-normalised,
    group-dro). Unknown names or arguments raise :class:`MoalignError`."""
    if not isinstance(name, str):
        raise MoalignError(f"combiner name must be a string, got {name!r}")
    key = _canonical(name)
    if key not in _REGISTRY:
        raise MoalignError(f"unknown combiner {name!r}; known: {', '.join(available_combiners())}")
    factory = _REGISTRY[key]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise MoalignError(f"combiner {key!r}: bad arguments {sorted(kwargs)}: {e}") from None
    except ValueError:  # no signature available: let the factory complain
        pass
    return factory(**kwargs)
