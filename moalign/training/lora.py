"""LoRA settings shared by every trainer (``moalign train dpo|distill|grpo ...``).

:class:`LoraArguments` is a dataclass mixin: a trainer config lists it among its bases and every field
becomes the same CLI flag everywhere (``--use-lora``, ``--lora-r``, ``--lora-alpha``, ``--lora-dropout``,
``--lora-target-modules``). A trainer changes a default by redeclaring the field in its config (e.g. the
distill config keeps LoRA on by default). :func:`lora_config` turns the fields into a ``peft.LoraConfig``
and :func:`apply_lora` wraps a model with it.

This module imports neither torch nor peft at import time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moalign.errors import MoalignError
from moalign.policies import quiet_upstream_renames

LORA_FIELDS = ("use_lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


@dataclass
class LoraArguments:
    """LoRA flags of a trainer config (a mixin; every field becomes a CLI flag)."""

    use_lora: bool = field(
        default=False, metadata={"help": "train LoRA adapters (peft) instead of all weights"}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: 2 x lora_r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout, in [0, 1)"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "modules to adapt: all-linear, or module names (e.g. q_proj v_proj)"},
    )


def check_lora_args(args) -> None:
    """Raise :class:`MoalignError` naming the first invalid LoRA value (only when LoRA is on)."""
    if not getattr(args, "use_lora", False):
        return
    r = args.lora_r
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise MoalignError(f"--lora-r must be an integer >= 1, got {r!r}")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise MoalignError(f"--lora-alpha must be > 0, got {args.lora_alpha!r}")
    if not 0 <= float(args.lora_dropout) < 1:
        raise MoalignError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout!r}")
    targets = args.lora_target_modules
    if isinstance(targets, str):
        targets = [targets]
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise MoalignError(f"--lora-target-modules must name at least one module, got {targets!r}")


def lora_target_modules(args) -> str | list[str]:
    """peft ``target_modules``: the string ``"all-linear"`` or a list of module names."""
    targets = args.lora_target_modules
    if isinstance(targets, str):
        targets = [targets]
    return "all-linear" if targets == ["all-linear"] else targets


def lora_config(args, **overrides: Any):
    """``peft.LoraConfig`` from a config with :class:`LoraArguments` fields; ``None`` when LoRA is off.

    ``overrides`` replace LoraConfig arguments (e.g. ``target_modules``/``layers_to_transform`` for DPO's
    ``lora_last_layers``). Raises :class:`MoalignError` if peft is missing or a value is invalid.
    """
    if not getattr(args, "use_lora", False):
        return None
    check_lora_args(args)
    try:
        from peft import LoraConfig
    except ImportError:
        raise MoalignError("LoRA needs peft: pip install 'moalign[train]' (or turn LoRA off)") from None
    kw: dict[str, Any] = dict(
        r=int(args.lora_r),
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * int(args.lora_r),
        lora_dropout=float(args.lora_dropout),
        target_modules=lora_target_modules(args),
        task_type="CAUSAL_LM",
    )
    kw.update(overrides)
    return LoraConfig(**kw)


def apply_lora(model, args, **overrides: Any):
    """``model`` wrapped with a LoRA adapter (``peft.get_peft_model``), or ``model`` unchanged if LoRA is off."""
    cfg = lora_config(args, **overrides)
    if cfg is None:
        return model
    from peft import get_peft_model

    with quiet_upstream_renames():
        return get_peft_model(model, cfg)


def lora_targets(model, targets: list[str], last_layers: int | None):
    """peft ``target_modules``: "all-linear" as is, or (peft refuses the string together with
    ``layers_to_transform``) the names of every linear layer except the output head."""
    if targets != ["all-linear"]:
        return targets
    if last_layers is None:
        return "all-linear"
    import torch

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names.discard("lm_head")
    return sorted(names)


def last_layers(model, n: int | None) -> list[int] | None:
    """Indices of the last ``n`` transformer layers (``None``: all layers)."""
    if n is None:
        return None
    total = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not total:
        raise MoalignError("lora_last_layers needs a model config with num_hidden_layers")
    if not 1 <= n <= total:
        raise MoalignError(f"lora_last_layers must be in [1, {total}], got {n}")
    return list(range(total - n, total))
