"""Which distributed settings give the combiner whole per-objective gradients (DDP does; DeepSpeed and FSDP,
as wired today, do not) and the one-line refusal for the others."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
    """Refuse settings under which the combiner would not see whole per-objective gradients (one line).

    DeepSpeed (any ZeRO stage): the engine reduces gradients and steps inside its own backward, which the
    per-objective step (gradients written into ``.grad`` by hand) bypasses; ZeRO-2/3 also partition gradients.
    ZeRO-1 only partitions optimizer state, but it runs through the same engine step, so it is refused too.
    FSDP: parameters and gradients are sharded. The fused path (``--no-per-objective-grads``: linear/groupdro)
    is unaffected.
    """
    if not per_objective_grads:
        return
    hint = (
        "use DDP (accelerate launch without DeepSpeed/FSDP), or --no-per-objective-grads with linear/groupdro"
    )
    stage = deepspeed_zero_stage(getattr(args, "deepspeed", None))
    if stage is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        stage = -1
    if stage is not None:
        what = f"DeepSpeed ZeRO stage {stage}" if stage >= 0 else "DeepSpeed (accelerate config)"
        why = (
            "partitions gradients across processes"
            if stage >= 2
            else "runs its own backward/step, which per-objective gradients bypass"
        )
        raise MoalignError(
            f"--deepspeed: {what} {why}; the combiner needs each objective's whole gradient: {hint}"
        )
    fsdp = getattr(args, "fsdp", None)
    if fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise MoalignError(
            f"--fsdp: FSDP shards parameters and gradients; the combiner needs each objective's whole gradient: {hint}"
        )
