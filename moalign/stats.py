"""The ``stats`` job: z-score statistics of objectives on plain samples of a policy."""

from __future__ import annotations

from dataclasses import dataclass, field

from moalign.data.prompts import load_prompts
from moalign.decoding.backend import SamplingConfig
from moalign.decoding.in_process import TransformersBackend
from moalign.decoding.values import ObjectiveScorer
from moalign.generate import estimate_norm_stats
from moalign.objectives.base import resolve_objectives
from moalign.objectives.normalize import NormStats, save_norm_stats
from moalign.policies import default_device, load_policy


@dataclass
class StatsConfig:
    policy: str = field(default="smollm2-135m-instruct", metadata={"help": "policy to sample from"})
    objectives: str = field(default="helpful,harmless", metadata={"help": "comma-separated objectives"})
    prompts: str = field(default="", metadata={"help": "prompt file or hub dataset"})
    prompt_column: str | None = field(default=None, metadata={"help": "prompt column"})
    n_prompts: int = field(default=64, metadata={"help": "prompts to sample"})
    n_samples: int = field(default=4, metadata={"help": "samples per prompt"})
    max_new_tokens: int = field(default=64, metadata={"help": "maximum new tokens per sample"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    out: str = field(default="", metadata={"help": "write the statistics JSON here"})
    device: str | None = field(default=None, metadata={"help": "torch device"})


def compute_stats(cfg: StatsConfig) -> NormStats:
    from moalign.data.prompts import demo_prompts_path

    prompts = load_prompts(cfg.prompts or demo_prompts_path(), column=cfg.prompt_column, limit=cfg.n_prompts)
    policy = load_policy(cfg.policy, device=cfg.device or default_device())
    engine = TransformersBackend(policy, SamplingConfig())
    scorer = ObjectiveScorer(resolve_objectives(cfg.objectives))
    stats = None
    batches = []
    for i in range(0, len(prompts), 8):
        s = estimate_norm_stats(engine, prompts[i : i + 8], scorer, n_prompts=8, n_samples=cfg.n_samples,
                                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + i)  # fmt: skip
        batches.append(s)
    # pool the batch statistics (equal-sized groups except maybe the last): exact pooled mean / variance
    import numpy as np

    ns = np.array([b.n for b in batches], dtype=float)
    means = np.array([b.mean for b in batches])
    vars_ = np.array([b.std for b in batches]) ** 2
    mean = (ns[:, None] * means).sum(0) / ns.sum()
    var = (ns[:, None] * (vars_ + (means - mean) ** 2)).sum(0) / ns.sum()
    src = cfg.prompts or "moalign demo prompts"
    stats = NormStats(mean=list(mean), std=list(np.sqrt(var)), names=scorer.names,
                      source=f"{cfg.policy} samples on {src}", n=int(ns.sum()))  # fmt: skip
    if cfg.out:
        save_norm_stats(stats, cfg.out)
    return stats
