"""Training CD-FUDGE value heads (``moalign train values``; spec: rmod.md).

A value ``V_g(x, y^{<=t})`` estimates the final reward of objective ``g`` when the policy continues the prefix
``y^{<=t}``. CD-FUDGE trains it by regressing *every* prefix of sampled responses onto the reward of the full
response::

    min_theta  mean_i  mean_{t=1..L_i}  (V_g(h_{i,t}) - z_g(x_i, y_i))^2

where ``h_{i,t}`` is the policy's last-layer hidden state after response token ``t`` (the end-of-turn token
included, so a finished response has a value too) and ``z_g`` is the objective's reward z-scored with
statistics fitted on the training samples. Each response weighs the same (its positions share weight
``1 / L_i``). The minimiser of the squared error is the conditional mean ``E[z_g | x, y^{<=t}]`` under the
policy, which is exactly the controlled-decoding value.

One head per objective: ``linear`` (fitted in closed form as weighted ridge regression, the ridge strength
chosen per objective on a held-back part of the training prompts) or ``mlp`` (one hidden layer, Adam).
Features are standardised with statistics stored in the head.

The heads themselves, their features, the file format and the decode-time value function are in
:mod:`moalign.decoding.value_heads` (decoding never imports this module).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from moalign.configbase import config_field as _f
from moalign.configbase import versions
from moalign.data.prompts import Prompt
from moalign.decoding.backend import BlockStep, SamplingConfig, Selection
from moalign.decoding.in_process import TransformersBackend
from moalign.decoding.value_heads import (
    FORMAT,
    HEAD_KINDS,
    ValueHeads,
    _probe,
    prompt_token_ids,
    response_hidden_states,
    save_value_heads,
    template_sha,
    valid_length,
)
from moalign.errors import MoalignError
from moalign.objectives.base import Objective
from moalign.objectives.normalize import fit_norm_stats
from moalign.policies import Policy

__all__ = [
    "Samples",
    "TrainValuesConfig",
    "fit_ridge",
    "format_report",
    "sample_responses",
    "train_values",
    "value_error_report",
]


@dataclass
class TrainValuesConfig:
    """``moalign train values``: CD-FUDGE value heads (one per objective) on the policy's hidden states."""

    #: old flag -> the TrainingArguments name it now has (an old flag or config key is a one-line error)
    RENAMED = {"out": "output_dir", "lr": "learning_rate", "steps": "max_steps"}

    output_dir: str = _f("", "output folder for the heads (value_heads.safetensors + value_heads.json)")
    policy: str = _f("smollm2-135m-instruct", "policy whose samples and hidden states the heads use")
    objectives: str = _f("helpful,harmless", "comma-separated objectives (one head each)")
    prompts: str = _f("", "prompt file or hub dataset (default: the bundled demo prompts)")
    prompt_column: str | None = _f(None, "column holding the prompt")
    n_prompts: int = _f(64, "prompts to sample from (train + held-out)")
    n_samples: int = _f(4, "sampled responses per prompt")
    max_new_tokens: int = _f(64, "maximum new tokens per sampled response")
    temperature: float = _f(1.0, "sampling temperature")
    top_p: float = _f(1.0, "nucleus sampling threshold")
    top_k: int = _f(0, "top-k sampling (0 = off)")
    system_prompt: str | None = _f(None, "system prompt (decode with the same one)")
    heldout: float = _f(0.2, "fraction of prompts held out for the value-error report")
    head: str = _f(
        "linear", "head type: linear (closed-form ridge) or mlp (one hidden layer)", choices=HEAD_KINDS
    )
    mlp_width: int = _f(64, "mlp: hidden units per objective")
    ridge: float | None = _f(
        None,
        "linear: ridge strength (relative to the mean feature eigenvalue); default: chosen on held-back training prompts",
    )
    max_steps: int = _f(500, "mlp: full-batch Adam steps")
    learning_rate: float = _f(1e-3, "mlp: Adam learning rate")
    weight_decay: float = _f(1e-2, "mlp: weight decay")
    batch_size: int = _f(8, "prompts decoded together while sampling")
    forward_batch: int = _f(16, "sequences per forward pass when extracting hidden states")
    seed: int = _f(0, "random seed (sampling, split, initialisation)")
    device: str | None = _f(None, "torch device (default: cuda if available, else cpu)")

    def validate(self) -> None:
        if not self.output_dir:
            raise MoalignError("--output-dir is required (a folder for the value heads)")
        for name in (
            "n_prompts",
            "n_samples",
            "max_new_tokens",
            "mlp_width",
            "max_steps",
            "batch_size",
            "forward_batch",
        ):
            if getattr(self, name) < 1:
                raise MoalignError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.heldout < 1:
            raise MoalignError(f"--heldout must be in [0, 1), got {self.heldout}")
        if self.head not in HEAD_KINDS:
            raise MoalignError(f"unknown head {self.head!r}; choose from {', '.join(HEAD_KINDS)}")
        if self.ridge is not None and self.ridge < 0:
            raise MoalignError(f"--ridge must be >= 0, got {self.ridge}")
        if not self.learning_rate > 0:
            raise MoalignError(f"--learning-rate must be > 0, got {self.learning_rate}")


# ------------------------------------------------------------------------------------------- sampling
@dataclass
class Samples:
    """Sampled responses: prompt index, response token ids (end-of-turn included if finished), text."""

    prompt_index: list[int]
    token_ids: list[list[int]]
    texts: list[str]


def sample_responses(
    engine: TransformersBackend,
    prompts: Sequence[Prompt],
    *,
    n_samples: int,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 8,
    progress: bool = True,
) -> Samples:
    """Plain samples of the policy with the exact token ids it drew (captured from the engine's last step)."""
    from tqdm.auto import tqdm

    eos = engine.eos_ids.tolist()
    tok = engine.tok
    out = Samples([], [], [])
    bar = tqdm(total=len(prompts), desc="sampling for value heads", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        captured: dict = {}

        def capture(step: BlockStep, captured=captured) -> Selection:
            captured["ids"] = step.token_ids.cpu()
            return Selection(torch.zeros(len(step.prompts), dtype=torch.long))

        engine.decode(batch, k=n_samples, block_size=max_new_tokens, max_new_tokens=max_new_tokens,
                      selector=capture, seed=seed * 1_000_003 + start)  # fmt: skip
        ids = captured["ids"]
        for p in range(len(batch)):
            for k in range(n_samples):
                row = ids[p, k].tolist()
                row = row[: valid_length(row, eos)]
                if not row:
                    continue
                body = row[:-1] if row[-1] in eos else row
                out.prompt_index.append(start + p)
                out.token_ids.append(row)
                out.texts.append(tok.decode(body, skip_special_tokens=True).strip())
        bar.update(len(batch))
    bar.close()
    return out


# ------------------------------------------------------------------------------------------- fitting
def _weighted_design(feats: list[torch.Tensor], targets: np.ndarray, idx: Sequence[int]):
    """Stack positions of responses ``idx``: X [N, H], Y [N, G], weights w [N] (1/L_i, summing to 1)."""
    X = np.concatenate([feats[i].double().numpy() for i in idx])
    Y = np.concatenate([np.repeat(targets[i][None], len(feats[i]), 0) for i in idx])
    w = np.concatenate([np.full(len(feats[i]), 1.0 / len(feats[i])) for i in idx])
    return X, Y, w / w.sum()


def fit_ridge(
    X: np.ndarray, Y: np.ndarray, w: np.ndarray, alphas: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Weighted ridge ``min_b,c sum_n w_n (X_n b + c - Y_n)^2 + alpha |b|^2`` for each alpha (float64).

    Closed form on the weighted-centred data: ``b = (Xc' W Xc + alpha I)^-1 Xc' W Yc``, ``c = ybar - xbar b``;
    one eigendecomposition serves every alpha. Returns ``[(B [H, G], c [G]), ...]``.
    """
    xbar, ybar = w @ X, w @ Y
    Xc, Yc = X - xbar, Y - ybar
    A = Xc.T @ (w[:, None] * Xc)
    A = (A + A.T) / 2
    lam, Q = np.linalg.eigh(A)
    QtB = Q.T @ (Xc.T @ (w[:, None] * Yc))
    out = []
    for a in alphas:
        B = Q @ (QtB / np.maximum(lam + a, 1e-300)[:, None])
        out.append((B, ybar - xbar @ B))
    return out


def _fit_linear(heads: ValueHeads, feats, targets, train_idx, prompt_of, ridge, rng) -> list[float]:
    """Fit the linear heads; return the ridge strength (absolute) used per objective."""
    G = targets.shape[1]
    X, Y, w = _weighted_design(feats, targets, train_idx)
    scale = max(float(np.trace(np.cov(X.T, aweights=w))) / X.shape[1], 1e-12) if X.shape[0] > 1 else 1.0
    if ridge is not None:
        chosen = np.full(G, ridge * scale)
    else:
        grid = scale * np.logspace(-6, 2, 17)
        # hold back ~20% of the training prompts to pick alpha per objective
        tr_prompts = sorted({prompt_of[i] for i in train_idx})
        val_prompts = set(rng.permutation(tr_prompts)[: max(1, len(tr_prompts) // 5)].tolist())
        fit_i = [i for i in train_idx if prompt_of[i] not in val_prompts]
        val_i = [i for i in train_idx if prompt_of[i] in val_prompts]
        if not fit_i or not val_i:
            chosen = np.full(G, 1e-2 * scale)
        else:
            Xf, Yf, wf = _weighted_design(feats, targets, fit_i)
            Xv, Yv, wv = _weighted_design(feats, targets, val_i)
            errs = np.array([wv @ (Xv @ B + c - Yv) ** 2 for B, c in fit_ridge(Xf, Yf, wf, grid)])  # [A, G]
            chosen = grid[errs.argmin(0)]
    B = np.zeros((X.shape[1], G))
    c = np.zeros(G)
    for a in np.unique(chosen):
        (Ba, ca), cols = fit_ridge(X, Y, w, np.array([a]))[0], chosen == a
        B[:, cols], c[cols] = Ba[:, cols], ca[cols]
    with torch.no_grad():
        heads.weight.copy_(torch.from_numpy(B.T).float())
        heads.bias.copy_(torch.from_numpy(c).float())
    return chosen.tolist()


def _fit_mlp(heads: ValueHeads, feats, targets, train_idx, prompt_of, cfg: TrainValuesConfig, rng) -> dict:
    """Full-batch AdamW on the weighted CD-FUDGE loss; the state with the lowest loss on ~20% held-back
    training prompts (checked every 10 steps) is kept (early stopping)."""
    tr_prompts = sorted({prompt_of[i] for i in train_idx})
    val_prompts = set(rng.permutation(tr_prompts)[: len(tr_prompts) // 5].tolist())
    fit_i = [i for i in train_idx if prompt_of[i] not in val_prompts] or list(train_idx)
    val_i = [i for i in train_idx if prompt_of[i] in val_prompts]

    def design(idx):
        X, Y, w = _weighted_design(feats, targets, idx)
        return tuple(torch.from_numpy(a).float() for a in (X, Y, w))

    X, Y, w = design(fit_i)
    Xv, Yv, wv = design(val_i) if val_i else (X, Y, w)
    with torch.no_grad():
        heads.bias.copy_(Y.T @ w)

    def loss_on(X, Y, w):
        return (w[:, None] * (heads(X) - Y) ** 2).sum() / Y.shape[1]

    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    best, best_state, best_step, first = math.inf, None, 0, None
    for step in range(cfg.max_steps + 1):
        if step % 10 == 0 or step == cfg.max_steps:
            with torch.no_grad():
                v = loss_on(Xv, Yv, wv).item()
            if v < best:
                best, best_step = v, step
                best_state = {k: t.detach().clone() for k, t in heads.state_dict().items()}
        if step == cfg.max_steps:
            break
        opt.zero_grad()
        loss = loss_on(X, Y, w)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    heads.load_state_dict(best_state)
    with torch.no_grad():
        last = loss_on(X, Y, w).item()
    return {"loss_first": first, "loss_kept": last, "val_loss": best, "kept_step": best_step}


# ------------------------------------------------------------------------------------------- evaluation
def _bucket_edges(max_len: int) -> list[tuple[int, int]]:
    edges, lo = [], 1
    for hi in (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
        if lo > max_len:
            break
        edges.append((lo, hi))
        lo = hi + 1
    if lo <= max_len:
        edges.append((lo, max_len))
    return edges


@torch.no_grad()
def value_error_report(
    heads: ValueHeads,
    feats: list[torch.Tensor],
    targets: np.ndarray,
    idx: Sequence[int],
    baseline: np.ndarray,
) -> dict:
    """Held-out MSE (normalised reward units) of the heads vs the constant ``baseline`` per prefix length.

    Buckets of prefix length ``t`` (tokens, end-of-turn included): every position counts once in its bucket;
    ``all`` weighs each response equally (the training loss); ``final`` is the complete response.
    """
    if not idx:
        return {}
    names = heads.names
    preds = [heads(feats[i]).double().numpy() for i in idx]
    tgts = [targets[i] for i in idx]
    max_len = max(len(p) for p in preds)
    rows = []
    for lo, hi in _bucket_edges(max_len):
        err, base, n = np.zeros(len(names)), np.zeros(len(names)), 0
        for p, t in zip(preds, tgts):
            seg = p[lo - 1 : hi]
            if len(seg):
                err += ((seg - t) ** 2).sum(0)
                base += len(seg) * (baseline - t) ** 2
                n += len(seg)
        if n:
            rows.append({"prefix": f"{lo}-{hi}", "n": n, "mse": _named(err / n, names),
                         "baseline_mse": _named(base / n, names)})  # fmt: skip
    all_err = np.mean([((p - t) ** 2).mean(0) for p, t in zip(preds, tgts)], axis=0)
    base = np.mean([(baseline - t) ** 2 for t in tgts], axis=0)
    fin = np.mean([(p[-1] - t) ** 2 for p, t in zip(preds, tgts)], axis=0)
    return {
        "buckets": rows,
        "all": {"n": len(idx), "mse": _named(all_err, names), "baseline_mse": _named(base, names)},
        "final": {"n": len(idx), "mse": _named(fin, names), "baseline_mse": _named(base, names)},
    }


def _named(x: np.ndarray, names: Sequence[str]) -> dict:
    return {n: round(float(v), 5) for n, v in zip(names, x)}


def format_report(report: dict) -> str:
    """A plain-text table of a held-out value-error report."""
    if not report:
        return "(no held-out prompts)"
    names = list(report["all"]["mse"])
    head = f"{'prefix':>10} {'n':>6} " + " ".join(f"{n + ' mse/base':>24}" for n in names)
    lines = [head]
    for r in [*report["buckets"], {"prefix": "all", **report["all"]}, {"prefix": "final", **report["final"]}]:
        cells = " ".join(f"{r['mse'][n]:>11.4f} /{r['baseline_mse'][n]:>11.4f}" for n in names)
        lines.append(f"{r['prefix']:>10} {r['n']:>6} {cells}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- training
def train_values(
    cfg: TrainValuesConfig,
    policy: Policy | None = None,
    objectives: list[Objective] | None = None,
    prompts: list[Prompt] | None = None,
) -> dict:
    """Sample, score, extract hidden states, fit the heads, report held-out error and save to ``cfg.output_dir``."""
    from moalign.data.prompts import load_prompts
    from moalign.objectives.base import resolve_objectives
    from moalign.policies import default_device, load_policy

    cfg.validate()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if prompts is None:
        from moalign.data.prompts import demo_prompts_path

        prompts = load_prompts(
            cfg.prompts or demo_prompts_path(), column=cfg.prompt_column, limit=cfg.n_prompts
        )
    prompts = list(prompts)[: cfg.n_prompts]
    if len(prompts) < 2:
        raise MoalignError(f"value-head training needs at least 2 prompts, got {len(prompts)}")
    objectives = objectives if objectives is not None else resolve_objectives(cfg.objectives)
    names = [o.name for o in objectives]
    policy = policy or load_policy(cfg.policy, device=cfg.device or default_device())
    engine = TransformersBackend(policy, SamplingConfig(cfg.temperature, cfg.top_p, cfg.top_k), cfg.system_prompt)

    # split by prompt
    order = rng.permutation(len(prompts))
    n_held = int(round(cfg.heldout * len(prompts)))
    n_held = min(max(n_held, 1 if cfg.heldout > 0 else 0), len(prompts) - 1)
    held_prompts = set(order[:n_held].tolist())

    samples = sample_responses(engine, prompts, n_samples=cfg.n_samples, max_new_tokens=cfg.max_new_tokens,
                               seed=cfg.seed, batch_size=cfg.batch_size)  # fmt: skip
    if not samples.texts:
        raise MoalignError("the policy produced no response tokens to train on")
    t_sample = time.perf_counter() - t0
    ptext = [prompts[i].text for i in samples.prompt_index]
    raw = torch.stack([o.score(ptext, samples.texts) for o in objectives], dim=-1).double().numpy()
    train_idx = [i for i, p in enumerate(samples.prompt_index) if p not in held_prompts]
    held_idx = [i for i, p in enumerate(samples.prompt_index) if p in held_prompts]
    norm = fit_norm_stats(
        raw[train_idx], names, source=f"{len(train_idx)} {policy.name} samples (value-head training)"
    )
    targets = norm.apply(raw)

    p_ids = [prompt_token_ids(policy.tokenizer, p, cfg.system_prompt) for p in prompts]
    feats = response_hidden_states(policy, [p_ids[i] for i in samples.prompt_index], samples.token_ids,
                                   batch=cfg.forward_batch)  # fmt: skip
    t_feat = time.perf_counter() - t0 - t_sample

    H = feats[0].shape[-1]
    heads = ValueHeads(H, names, cfg.head, cfg.mlp_width)
    Xall = torch.cat([feats[i] for i in train_idx]).double()
    with torch.no_grad():
        heads.feat_mean.copy_(Xall.mean(0).float())
        heads.feat_std.copy_(Xall.std(0).clamp(min=1e-6).float())
    std_feats = [((f - heads.feat_mean) / heads.feat_std) for f in feats]
    if cfg.head == "linear":
        # fit on standardised features, then fold the standardisation back into the head's own buffers
        lin = ValueHeads(H, names, "linear")
        fit_info = {
            "ridge": _fit_linear(lin, std_feats, targets, train_idx, samples.prompt_index, cfg.ridge, rng)
        }
        with torch.no_grad():
            heads.weight.copy_(lin.weight)
            heads.bias.copy_(lin.bias)
    else:
        fit_info = _fit_mlp(heads, feats, targets, train_idx, samples.prompt_index, cfg, rng)
    heads.eval()

    baseline = targets[train_idx].mean(0)
    report = {
        "heldout": value_error_report(heads, feats, targets, held_idx, baseline),
        "train": value_error_report(heads, feats, targets, train_idx, baseline),
    }
    probe_text, probe_h = _probe(policy, cfg.system_prompt)
    meta = {
        "format": FORMAT,
        "head": heads.spec(),
        "objectives": [o.describe() for o in objectives],
        "norm": norm.to_dict(),
        "policy": {
            "name": policy.name,
            "source": policy.source,
            "hidden_size": H,
            "model_type": getattr(policy.model.config, "model_type", None),
        },
        "template": {
            "chat_template_sha256": template_sha(policy.tokenizer),
            "chat_template": getattr(policy.tokenizer, "chat_template", None),
            "system_prompt": cfg.system_prompt,
            "probe_rendering": probe_text,
        },
        "config": asdict(cfg),
        "seed": cfg.seed,
        "versions": versions(),
        "data": {
            "prompts": len(prompts),
            "heldout_prompts": n_held,
            "responses": len(samples.texts),
            "train_responses": len(train_idx),
            "heldout_responses": len(held_idx),
        },
        "fit": fit_info,
        "report": report,
    }
    save_value_heads(heads, meta, cfg.output_dir, probe_hidden=probe_h)
    return {
        "output_dir": str(cfg.output_dir),
        "objectives": names,
        "head": cfg.head,
        "data": meta["data"],
        "norm": meta["norm"],
        "fit": fit_info,
        "heldout": report["heldout"],
        "seconds": {
            "sample": round(t_sample, 2),
            "features": round(t_feat, 2),
            "total": round(time.perf_counter() - t0, 2),
        },
    }


