"""Per-objective gradients across processes: DDP (whole gradients, all-reduced by the trainer), FSDP version 2
(sharded gradients: the Gram matrix of the shards is all-reduced, each process combines its own shards) and
the one-line refusal for DeepSpeed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from moalign.errors import MoalignError


def deepspeed_zero_stage(ds) -> int | None:
    """ZeRO stage of a ``--deepspeed`` value (dict, JSON string or path); ``None`` when DeepSpeed is off."""
    if not ds:
        return None
    if isinstance(ds, str):
        text = ds if ds.lstrip().startswith("{") else None
        if text is None:
            try:
                text = Path(ds).read_text()
            except OSError:
                raise MoalignError(f"--deepspeed config file not found: {ds}") from None
        try:
            ds = json.loads(text)
        except json.JSONDecodeError as e:
            raise MoalignError(f"--deepspeed config is not valid JSON: {e.msg}") from None
    stage = (ds.get("zero_optimization") or {}).get("stage", 0) if isinstance(ds, dict) else 0
    try:
        return int(stage)
    except (TypeError, ValueError):
        return 0


def check_unsharded_gradients(args, per_objective_grads: bool = True) -> None:
    """Refuse DeepSpeed on the per-objective path (one line); FSDP is checked when the trainer starts.

    DeepSpeed (any ZeRO stage): the engine reduces the gradients inside its own ``backward`` into its own
    buffers (ZeRO-2 partitions them there) and its ``step`` reads those buffers, not ``.grad``: there is no
    point between one objective's backward and the step at which the K gradients can be read and their
    combination written back without forking the engine. ZeRO-1 runs through the same engine step, so it is
    refused too. FSDP (version 2) works: see :func:`check_fsdp_per_objective`. The fused path
    (``--no-per-objective-grads``: linear/groupdro) is unaffected.
    """
    if not per_objective_grads:
        return
    hint = "use FSDP (version 2) or DDP, or --no-per-objective-grads with linear/groupdro"
    stage = deepspeed_zero_stage(getattr(args, "deepspeed", None))
    if stage is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        stage = -1
    if stage is not None:
        what = f"DeepSpeed ZeRO stage {stage}" if stage >= 0 else "DeepSpeed (accelerate config)"
        raise MoalignError(
            f"--deepspeed: {what} reduces and steps on gradients inside its own engine, where per-objective "
            f"gradients cannot be combined: {hint}"
        )


# ---------------------------------------------------------------------------------------- FSDP (version 2)
def check_fsdp_per_objective(model, gradient_accumulation_steps: int) -> None:
    """One line when a sharded model cannot take the per-objective step: every trainable parameter must be
    an FSDP2 shard (a ``DTensor``: ``fully_shard``, accelerate's ``--fsdp_version 2``), and each micro-batch
    must reduce its gradients (no gradient accumulation: the objectives' unreduced gradients would mix)."""
    from torch.distributed.tensor import DTensor

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable or not all(isinstance(p, DTensor) for p in trainable):
        raise MoalignError(
            "FSDP version 1 keeps flat parameters whose gradients cannot be read per objective: launch with "
            "--fsdp_version 2 (accelerate) or fully_shard (torch)"
        )
    if gradient_accumulation_steps > 1:
        raise MoalignError(
            "FSDP with per-objective gradients needs --gradient-accumulation-steps 1 (each objective's gradient "
            "is reduce-scattered every backward); raise --per-device-train-batch-size or the process count instead"
        )


def take_local_grads(loss, params) -> list:
    """Backward of one objective's loss through the sharded model; its gradient, reduced over processes by
    FSDP's reduce-scatter (the mean), is read from each parameter's local shard and ``.grad`` is cleared."""
    loss.backward()
    out = []
    for p in params:
        g = p.grad
        out.append(None if g is None else (g.to_local() if hasattr(g, "to_local") else g).detach().clone())
        p.grad = None
    return out


def sharded_gram_matrix(local_grads) -> torch.Tensor:
    """The K x K Gram matrix of gradients sharded over processes: the sum over processes of the local shards'
    inner products (one all-reduce of K x K values; exact up to summation order). Every process gets the same
    matrix; a non-finite gradient on any process raises on every process (no process is left waiting)."""
    import torch.distributed as dist

    from moalign.training.combiners import gram_matrix

    device = next((t.device for lst in local_grads for t in lst if t is not None), torch.device("cpu"))
    try:
        local, bad = gram_matrix(local_grads).to(device), None
    except MoalignError as e:
        k = len(local_grads)
        local, bad = torch.full((k, k), float("nan"), dtype=torch.float64, device=device), e
    dist.all_reduce(local, op=dist.ReduceOp.SUM)
    if bad is not None:
        raise bad
    if not torch.isfinite(local).all():
        raise MoalignError("a per-objective gradient is not finite on another process (NaN or inf loss?)")
    return local.cpu()


def as_shard_grad(local, param):
    """A local tensor as the gradient of an FSDP2 parameter (a ``DTensor`` with the parameter's sharding)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape,
                              stride=param.stride(), run_check=False)  # fmt: skip
