"""Multi-objective DPO's numerical core, plain functions over tensors: the sigmoid DPO loss of one objective's
batch, and the combined gradient ``d = sum_k alpha_k g_k`` written into ``.grad`` from the K objectives'
gradients through a combiner (:mod:`moalign.training.combiners`); the trainer is :mod:`moalign.training.dpo`."""

from __future__ import annotations

from moalign.training.combiners import apply_weights, gram_matrix
from moalign.training.sharding import as_shard_grad, sharded_gram_matrix

__all__ = ["dpo_loss", "write_combined_gradient"]


def dpo_loss(policy_logps, ref_logps, beta: float):
    """Sigmoid DPO loss of a ``[2B]`` batch (chosen rows first): (loss, chosen rewards, rejected rewards)."""
    import torch.nn.functional as F

    b = policy_logps.shape[0] // 2
    ratio = policy_logps - ref_logps
    r_c, r_r = beta * ratio[:b], beta * ratio[b:]
    return -F.logsigmoid(r_c - r_r).mean(), r_c.detach(), r_r.detach()


def _flatten_stats(names: list[str], stats: dict) -> dict[str, float]:
    """Per-step combiner statistics as flat scalar log entries (``alpha/NAME``, ``cos/A~B``, ...)."""
    out: dict[str, float] = {}
    for key, per in (("alpha", "alpha"), ("losses", "loss"), ("grad_norms", "grad_norm")):
        for n, v in zip(names, stats.get(key, [])):
            out[f"{per}/{n}"] = float(v)
    cos = stats.get("cosines")
    if cos is not None:
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                out[f"cos/{names[i]}~{names[j]}"] = float(cos[i][j])
    if "common_descent" in stats:
        out["common_descent"] = float(bool(stats["common_descent"]))
    if "direction_norm" in stats:
        out["direction_norm"] = float(stats["direction_norm"])
    for n, v in zip(names, stats.get("accuracy", [])):
        out[f"rewards_accuracy/{n}"] = float(v)
    for n, v in zip(names, stats.get("margin", [])):
        out[f"rewards_margin/{n}"] = float(v)
    return out


def write_combined_gradient(acc, losses, params, combiner, *, sharded: bool = False) -> dict:
    """Weights from the K objectives' gradients ``acc[k][i]`` (parameter ``i``) and losses, and
    ``d = sum_k alpha_k g_k`` added into each parameter's ``.grad``; returns the combiner's statistics.

    ``acc`` and ``losses`` are those of the global batch. ``sharded``: ``acc`` holds each process's local FSDP2
    shards, so the Gram matrix is the all-reduced sum of the shards' inner products and each process writes
    only its own shards. ``acc`` is emptied as it goes (never more than K gradient copies).
    """
    gram = sharded_gram_matrix(acc) if sharded else gram_matrix(acc)
    alpha, stats = combiner.weights_and_stats(losses, gram)
    for i, p in enumerate(params):
        d = apply_weights(alpha, [[acc[k][i]] for k in range(len(acc))])[0]
        for k in range(len(acc)):
            acc[k][i] = None
        if d is None:
            continue
        d = d.to(p.dtype)
        if sharded:
            d = as_shard_grad(d, p)
        if p.grad is None:
            p.grad = d
        else:
            p.grad.add_(d)
    return stats
