"""Per-objective z-score statistics (:class:`NormStats`): fitted on policy samples, shipped defaults, files.

Decoding (z-scored values), objectives and evaluation all use these; they live with the objectives.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from moalign.arrays import as_matrix, as_vector
from moalign.errors import MoalignError

__all__ = [
    "NormStats",
    "fit_norm_stats",
    "normalize_scores",
    "load_norm_stats",
    "shipped_norm_stats",
    "save_norm_stats",
]


def normalize_scores(scores: Any, mean: Any, std: Any) -> np.ndarray:
    """Z-scores ``(scores - mean) / std`` per objective (column); ``scores`` is ``[n, G]``, ``mean``/``std`` ``[G]``."""
    s = as_matrix(scores, "scores", allow_empty=True)
    g = s.shape[1]
    mu = as_vector(mean, "mean", g)
    sd = as_vector(std, "std", g)
    if (sd <= 0).any():
        bad = int(np.argwhere(sd <= 0)[0][0])
        raise MoalignError(f"std of objective {bad} is {sd[bad]}: z-scores need a positive std")
    return (s - mu) / sd


@dataclass
class NormStats:
    """Per-objective z-score statistics fitted on a reference set of responses.

    ``mean[g]`` and ``std[g]`` belong to objective ``names[g]``; ``source`` says what they were fitted on
    (e.g. ``"reference policy on hh-helpful-base, 500 prompts"``) and ``n`` how many responses.
    """

    mean: list[float]
    std: list[float]
    names: list[str]
    source: str = "unspecified"
    n: int = 0

    def __post_init__(self) -> None:
        self.names = [str(x) for x in self.names]
        g = len(self.names)
        if g == 0:
            raise MoalignError("NormStats: no objective names")
        if len(set(self.names)) != g:
            raise MoalignError(f"NormStats: duplicate objective names {self.names}")
        self.mean = [float(x) for x in as_vector(self.mean, "NormStats.mean", g)]
        self.std = [float(x) for x in as_vector(self.std, "NormStats.std", g)]
        for name, sd in zip(self.names, self.std):
            if sd <= 0:
                raise MoalignError(f"NormStats: std of objective {name!r} is {sd}; z-scores need std > 0")
        self.n = int(self.n)

    def describe(self) -> str:
        """The score-space label used in reports, e.g. ``z-score (reference run, n=500)``."""
        return f"z-score ({self.source}, n={self.n})"

    def subset(self, names: Sequence[str]) -> NormStats:
        """The statistics of ``names`` in that order (error naming any objective without statistics)."""
        missing = [x for x in names if x not in self.names]
        if missing:
            raise MoalignError(
                f"normalisation statistics have no entry for objective(s) {missing} (they cover {self.names})"
            )
        idx = [self.names.index(x) for x in names]
        return NormStats(
            mean=[self.mean[i] for i in idx],
            std=[self.std[i] for i in idx],
            names=list(names),
            source=self.source,
            n=self.n,
        )

    def apply(self, scores: Any) -> np.ndarray:
        """Z-score a ``[n, G]`` matrix whose columns are in the order of ``names``."""
        return normalize_scores(scores, self.mean, self.std)

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "names": list(self.names),
                "source": self.source, "n": self.n}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NormStats:
        missing = [k for k in ("mean", "std", "names") if k not in d]
        if missing:
            raise MoalignError(f"normalisation statistics lack field(s) {missing}")
        return cls(
            mean=list(d["mean"]),
            std=list(d["std"]),
            names=list(d["names"]),
            source=str(d.get("source", "unspecified")),
            n=int(d.get("n", 0)),
        )


def fit_norm_stats(scores: Any, names: Sequence[str], source: str = "unspecified") -> NormStats:
    """Fit per-objective mean and (population, ddof=0) std on ``scores`` ``[n, G]``.

    A constant objective (std 0) cannot be z-scored and raises :class:`MoalignError`.
    """
    s = as_matrix(scores, "scores")
    names = [str(x) for x in names]
    if len(names) != s.shape[1]:
        raise MoalignError(f"got {len(names)} objective names for a score matrix with {s.shape[1]} columns")
    mean = s.mean(axis=0)
    std = s.std(axis=0)
    for name, sd in zip(names, std):
        if not sd > 0:
            raise MoalignError(
                f"objective {name!r} is constant on {source!r} (std 0): it cannot be z-score normalised"
            )
    return NormStats(mean=mean.tolist(), std=std.tolist(), names=names, source=source, n=s.shape[0])


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def shipped_norm_stats(policy: str) -> NormStats | None:
    """Statistics shipped in the package for a bundled policy (built-in objectives only), if any."""
    f = resources.files("moalign") / "resources" / "norm_stats" / f"{_safe(policy)}.json"
    if not f.is_file():
        return None
    return NormStats.from_dict(json.loads(f.read_text()))


def load_norm_stats(path: str | Path) -> NormStats:
    p = Path(path)
    if not p.exists():
        raise MoalignError(f"normalisation statistics file not found: {path}")
    data = json.loads(p.read_text())
    if "norm" in data and isinstance(data["norm"], dict):  # a run's .meta.json
        data = data["norm"]
    return NormStats.from_dict(data)


def save_norm_stats(stats: NormStats, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(stats.to_dict(), indent=2))


def covers(stats: NormStats | None, names: list[str]) -> bool:
    return stats is not None and all(n in stats.names for n in names)


def resolve_normalization(spec: str, names: Sequence[str], auto) -> NormStats | None:
    """What every ``normalize`` setting means: ``none`` -> no scaling; a PATH -> that stats JSON, which must
    cover ``names``; ``auto`` -> ``auto()``, the caller's default (the policy's shipped statistics, a run's saved
    ones, or statistics estimated from samples), or None."""
    if spec == "none":
        return None
    if spec != "auto":
        return load_norm_stats(spec).subset(list(names))
    return auto()
