"""Float64 numpy views of score arrays (numpy, torch or nested sequences), checked for shape and NaN."""

from __future__ import annotations

from typing import Any

import numpy as np

from moalign.errors import MoalignError


def to_numpy(x: Any, what: str) -> np.ndarray:
    """float64 numpy copy of a numpy array / torch tensor / sequence."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.array(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise MoalignError(f"{what}: cannot convert to a float array ({e})") from None
    return arr


def as_matrix(x: Any, what: str, allow_empty: bool = False) -> np.ndarray:
    """A finite float64 matrix ``[n, G]`` (G >= 1)."""
    arr = to_numpy(x, what)
    if arr.ndim != 2:
        raise MoalignError(f"{what}: expected a 2-d score matrix [n, G], got shape {tuple(arr.shape)}")
    if arr.shape[1] == 0:
        raise MoalignError(f"{what}: score matrix has no objectives (shape {tuple(arr.shape)})")
    if arr.shape[0] == 0 and not allow_empty:
        raise MoalignError(f"{what}: score matrix has no rows")
    if not np.isfinite(arr).all():
        r, c = np.argwhere(~np.isfinite(arr))[0]
        raise MoalignError(f"{what}: non-finite score (NaN/inf) at row {r}, objective {c}")
    return arr


def as_vector(x: Any, what: str, length: int | None = None) -> np.ndarray:
    arr = to_numpy(x, what)
    if arr.ndim != 1:
        raise MoalignError(f"{what}: expected a 1-d vector, got shape {tuple(arr.shape)}")
    if length is not None and arr.shape[0] != length:
        raise MoalignError(f"{what}: expected length {length}, got {arr.shape[0]}")
    if not np.isfinite(arr).all():
        raise MoalignError(f"{what}: contains NaN/inf")
    return arr


def wins(a, b):
    """Per element 1 where ``a > b``, 1/2 on a tie, 0 otherwise (numpy arrays or torch tensors, float): the
    pairwise accuracy and win rate every report counts, ties as half."""
    return (a > b) * 1.0 + (a == b) * 0.5
