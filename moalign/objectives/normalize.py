"""Per-objective z-score statistics: shipped defaults, files, or estimated from policy samples.

The statistics type itself (:class:`NormStats`) lives in ``moalign.evaluation.metrics``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from moalign.errors import MoalignError
from moalign.evaluation.metrics import NormStats, fit_norm_stats

__all__ = ["NormStats", "fit_norm_stats", "load_norm_stats", "shipped_norm_stats", "save_norm_stats"]


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
