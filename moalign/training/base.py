"""What every trainer shares: the policy argument, the CPU fallback, one resume spelling, one run record, and
the adapter's base-model name.

The trainers themselves are transformers/TRL trainers (multi-objective DPO on ``transformers.Trainer``,
distillation on ``trl.SFTTrainer``, IAMA on ``trl.GRPOTrainer``); their configs subclass the matching
``TrainingArguments`` and :class:`PolicyArguments` + :class:`~moalign.training.lora.LoraArguments`, so every
``moalign train`` command takes transformers' names for the same things (``--output-dir``,
``--learning-rate``, ``--max-steps``, ``--resume-from-checkpoint``, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moalign.configbase import json_default, versions
from moalign.errors import MoalignError

RESUME_LAST = "last"


@dataclass
class PolicyArguments:
    """The policy a trainer starts from (every trainer's config has it)."""

    policy: str = field(
        default="smollm2-135m-instruct", metadata={"help": "policy: bundled name, local folder, .gguf file or hub id"}
    )


def accelerator_available() -> bool:
    """Whether torch sees an accelerator (CUDA, XPU, MPS, ...); without one the configs run on the CPU."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return torch.cuda.is_available()


def cpu_fallback(args, *, bf16_default_off: bool = True) -> None:
    """What a config needs on a machine without an accelerator, so that a user does not have to set it:
    ``use_cpu`` (which also makes transformers run several CPU processes as DDP with gloo), bf16 off unless
    asked for, no pinned memory."""
    if accelerator_available():
        return
    args.use_cpu = True
    if bf16_default_off and getattr(args, "bf16", None) is None:
        args.bf16 = False
    if hasattr(args, "dataloader_pin_memory"):
        args.dataloader_pin_memory = False


def resolve_resume(value: str | bool | None, output_dir: str | Path) -> str | None:
    """``--resume-from-checkpoint``: a checkpoint folder, or ``last`` (the latest checkpoint in the output
    folder); nothing resumes a fresh run. Other spellings of "last" (``latest``, ``auto``, ``true``) are refused
    with one line, so every trainer accepts the same words."""
    from transformers.trainer_utils import get_last_checkpoint

    if value in (None, "", False):
        return None
    text = str(value).strip()
    if text.lower() in ("latest", "auto", "true"):
        raise MoalignError(f"--resume-from-checkpoint {text}: write --resume-from-checkpoint last (or a checkpoint folder)")
    if text == RESUME_LAST:
        found = get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None
        if found is None:
            raise MoalignError(f"--resume-from-checkpoint last: no checkpoint in {output_dir}")
        return found
    if not Path(text).is_dir():
        raise MoalignError(f"--resume-from-checkpoint: checkpoint folder not found: {text}")
    return text


def name_adapter_base(output_dir: str | Path, policy: str) -> None:
    """A saved LoRA adapter names its base model the way ``load_policy`` resolves it (the policy name the run
    was given), not a cache path; no-op when the folder holds no adapter."""
    ac = Path(output_dir) / "adapter_config.json"
    if ac.exists():
        cfg = json.loads(ac.read_text())
        cfg["base_model_name_or_path"] = policy
        ac.write_text(json.dumps(cfg, indent=2))


def leave_process_group(trainer) -> None:
    """End a run of several processes cleanly: every process waits for the others (the main one has written
    its files), the distributed wrapper (DDP/FSDP, whose reducer holds the process group and the buffers of its
    last collectives) and the accelerator's references are dropped and collected, then the process group is
    destroyed, all while the interpreter is fully alive. A process that exits with the group or its pending
    work alive can abort in gloo's threads at interpreter shutdown ("terminate called without an active
    exception", pytorch/pytorch#179291) and fail the launch although training finished. One process: nothing."""
    import gc

    acc = trainer.accelerator
    if acc.num_processes <= 1:
        return
    acc.wait_for_everyone()
    trainer.model_wrapped = trainer.model
    acc.free_memory()  # releases the prepared (wrapped) models, optimizers, schedulers and dataloaders
    gc.collect()
    acc.end_training()  # stops trackers and destroys the process group


def write_run_record(path: str | Path, config: Any, **extra: Any) -> dict:
    """The one run record of every trainer: ``config`` (a dict, or an object with ``to_dict``), the seed, the
    library versions and ``extra``, as JSON (tensors as lists, enums as values). Returns the record."""
    cfg = config if isinstance(config, dict) else config.to_dict()
    record = {"config": cfg, "seed": cfg.get("seed"), "versions": versions(), **extra}
    Path(path).write_text(json.dumps(record, indent=2, default=json_default))
    return record
