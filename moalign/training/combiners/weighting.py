"""The shared weighting of every combiner: the Gram matrix of per-objective gradients, the combined direction
``d = sum_k alpha_k g_k``, the per-step statistics computed from the Gram matrix, and input checks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from moalign.errors import MoalignError

#: one objective's gradient: parameter-shaped tensors (``None`` = zero), or a single (flat) tensor
ObjectiveGrad = Sequence["torch.Tensor | None"] | torch.Tensor
LossesLike = torch.Tensor | Sequence[float] | np.ndarray

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
