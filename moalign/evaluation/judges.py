"""Judges: reward models that share no training data with the shipped ``helpful``/``harmless`` proxies.

* ``judge_helpful``: Bradley-Terry on UltraFeedback binarized (overall score; MIT),
* ``judge_harmless``: Bradley-Terry on PKU-SafeRLHF "safer" pairs (CC-BY-NC-4.0: research use only, so it is
  trained on first use from the user's copy of the data and never shipped as a default).

Both are trained with the project's own ``moalign train reward`` (:func:`moalign.training.reward.
train_reward`, default settings: MiniLM features, MLP head, 20% of prompts held out) into a folder (default
``$MOALIGN_CACHE/judges``); a folder that already holds a trained judge is reused. Use them as judges with
``--judges rm:PATH`` (:func:`judge_specs`).

:func:`rank_agreement` measures how far a judge agrees with a proxy on the same responses (Spearman and
Kendall rank correlations, pooled and within prompt).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from moalign.errors import MoalignError

JUDGE_SOURCES: dict[str, dict[str, str]] = {
    "judge_helpful": {
        "file": "ultrafeedback-binarized-1000.jsonl.gz",
        "what": "helpfulness: UltraFeedback binarized (overall score)",
        "licence": "MIT (UltraFeedback)",
    },
    "judge_harmless": {
        "file": "pku-saferlhf-safer-5k.json.gz",
        "what": "harmlessness: PKU-SafeRLHF pairs where exactly one response is safe",
        "licence": "CC-BY-NC-4.0 (PKU-SafeRLHF): research use only, never ship it as a default",
    },
}


def default_judge_dir() -> Path:
    """``$MOALIGN_CACHE/judges`` (default ``~/.cache/moalign/judges``)."""
    from moalign.policies import cache_dir

    return cache_dir() / "judges"


def default_data_dir() -> Path | None:
    """``$MOALIGN_DATA`` (the folder holding the judges' training files), or None."""
    value = os.environ.get("MOALIGN_DATA")
    return Path(value) if value else None


def is_trained(path: str | Path) -> bool:
    from moalign.objectives.bradley_terry import CONFIG_FILE, HEAD_FILE

    p = Path(path)
    return (p / CONFIG_FILE).exists() and (p / HEAD_FILE).exists()


def ensure_judges(
    out_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    names: Sequence[str] = tuple(JUDGE_SOURCES),
    train: bool = True,
    trainer: Callable | None = None,
) -> dict[str, Path]:
    """``{judge name: folder}``, training each missing judge first with ``train_reward`` (``trainer``
    replaces it in tests). ``train=False`` raises a one-line error for a missing judge instead."""
    from moalign.training.reward import TrainRewardConfig, annotate_reward_model, train_reward

    out = Path(out_dir) if out_dir is not None else default_judge_dir()
    data = Path(data_dir) if data_dir is not None else default_data_dir()  # None: named when a judge needs it
    trainer = trainer or train_reward
    paths: dict[str, Path] = {}
    for name in names:
        if name not in JUDGE_SOURCES:
            raise MoalignError(f"unknown judge {name!r}; known: {', '.join(JUDGE_SOURCES)}")
        d = out / name
        if not is_trained(d):
            if not train:
                raise MoalignError(f"judge {name!r} is not trained in {d} (train it with ensure_judges)")
            if data is None:
                raise MoalignError(f"judge {name!r} is not trained in {d} and trains on "
                                   f"{JUDGE_SOURCES[name]['file']}: pass data_dir=FOLDER or set MOALIGN_DATA to the "
                                   "folder holding it")  # fmt: skip
            src = data / JUDGE_SOURCES[name]["file"]
            if not src.exists():
                raise MoalignError(f"judge {name!r} needs {src} (set MOALIGN_DATA to the shared data folder)")
            trainer(TrainRewardConfig(data=str(src), objective=name, output_dir=str(d)))
            if is_trained(d):
                annotate_reward_model(d, licence=JUDGE_SOURCES[name]["licence"],
                                      notes={"role": "judge (held-out evaluation only)"})  # fmt: skip
        paths[name] = d
    return paths


def judge_specs(paths: Mapping[str, str | Path]) -> list[str]:
    """``rm:PATH`` objective specs of trained judges, in the order given."""
    return [f"rm:{p}" for p in paths.values()]


def heldout_accuracy(path: str | Path) -> float | None:
    """The held-out pairwise accuracy ``train reward`` recorded for a trained judge (or proxy)."""
    import json

    from moalign.objectives.bradley_terry import CONFIG_FILE

    conf = json.loads((Path(path) / CONFIG_FILE).read_text())
    return conf.get("metrics", {}).get("heldout_accuracy")


def rank_agreement(proxy: Sequence[float], judge: Sequence[float], groups: Sequence | None = None) -> dict:
    """Rank agreement of two scorings of the same responses: Spearman's rho and Kendall's tau-b pooled over
    all responses, and (with ``groups``, e.g. prompt ids) the mean over groups of the within-group Spearman
    rho (the agreement that matters for choosing among one prompt's candidates; groups with fewer than 3
    responses or a constant scoring are skipped)."""
    try:
        from scipy import stats
    except ImportError:
        raise MoalignError("rank agreement needs scipy: pip install scipy (or the dev extra, moalign[dev])") from None

    x, y = np.asarray(proxy, dtype=float), np.asarray(judge, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise MoalignError(f"rank_agreement needs two equal-length 1-D arrays, got {x.shape} and {y.shape}")
    if len(x) < 3:
        raise MoalignError("rank_agreement needs at least 3 responses")
    rho = stats.spearmanr(x, y)
    tau = stats.kendalltau(x, y)
    out = {"n": int(len(x)), "spearman": float(rho.statistic), "spearman_p": float(rho.pvalue),
           "kendall": float(tau.statistic), "kendall_p": float(tau.pvalue)}  # fmt: skip
    if groups is not None:
        g = np.asarray(list(groups))
        if len(g) != len(x):
            raise MoalignError("groups must have one entry per response")
        rhos = []
        for key in dict.fromkeys(g.tolist()):
            m = g == key
            if m.sum() >= 3 and np.ptp(x[m]) > 0 and np.ptp(y[m]) > 0:
                rhos.append(float(stats.spearmanr(x[m], y[m]).statistic))
        out["within_group_spearman_mean"] = float(np.mean(rhos)) if rhos else float("nan")
        out["n_groups"] = len(rhos)
    return out
