"""Distilled RMOD (``moalign train distill``; spec: rmod.md): supervised fine-tuning of the policy on its own
RMOD outputs, so that plain sampling afterwards approximates RMOD with no decoding overhead.

Each record of the input runs gives one example: the conversation rendered with the policy's chat template
(the text the engine decoded from, same system prompt) as the *prompt*, and the RMOD response followed by the
end-of-turn token as the *completion*. Training minimises the completion-only negative log-likelihood

    L(theta) = - sum_i sum_{t in completion_i} log pi_theta(y_{i,t} | x_i, y_{i,<t})  /  #completion tokens

with TRL's ``SFTTrainer`` (LoRA adapters through PEFT via the shared ``--use-lora``/``--lora-*`` flags of
:mod:`moalign.training.lora`, or all weights); :class:`DistillConfig` is an ``SFTConfig``. The output folder loads with
``moalign.policies.load_policy(output_dir)``: a LoRA adapter's ``base_model_name_or_path`` is the policy name
it was trained from (e.g. ``smollm2-135m-instruct``) and is merged on load; a full model is a normal
transformers folder. ``distill_config.json`` records the config, seed, versions, data and loss history.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import SFTConfig

from moalign.errors import MoalignError
from moalign.policies import render_chat
from moalign.training.base import (
    accelerator_available,
    leave_process_group,
    name_adapter_base,
    write_run_record,
)
from moalign.training.lora import LoraArguments, check_lora_args, lora_config, quiet_upstream_renames

META_FILE = "distill_config.json"


@dataclass
class DistillConfig(SFTConfig, LoraArguments):
    """``moalign train distill``: fine-tune the policy on its own RMOD outputs.

    Subclasses TRL's ``SFTConfig`` (the trainer inside is TRL's ``SFTTrainer``, which gets this config as its
    ``args``) plus the shared LoRA flags, so every SFTConfig/TrainingArguments field is a flag. Defaults that
    differ from SFTConfig: LoRA on (``lora_r=16``, alpha ``2 x r``), ``learning_rate`` 2e-4 with LoRA and 2e-5
    for all weights, ``num_train_epochs=1``, ``per_device_train_batch_size=4``, ``max_length=512``,
    ``completion_only_loss=True``, ``logging_steps=1``, ``save_strategy="no"``, ``seed=0``, no activation
    checkpointing, and bf16 only on a GPU that supports it (``use_cpu`` is set without an accelerator).

    Renamed flags (old -> new): ``--lora/--no-lora`` -> ``--use-lora/--no-use-lora``, ``--lr`` ->
    ``--learning-rate``, ``--epochs`` -> ``--num-train-epochs``, ``--batch-size`` ->
    ``--per-device-train-batch-size``, ``--device cpu`` -> ``--use-cpu``; old config files are upgraded.
    """

    output_dir: str = field(
        kw_only=True, metadata={"help": "folder for the result (loads with --policy FOLDER)"}
    )
    inputs: list[str] = field(
        default_factory=list,
        metadata={"help": "run JSONL files (moalign generate --method rmod) to learn from"},
    )
    policy: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "policy to fine-tune (the one that produced the records)"},
    )
    system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "system prompt for the training prompts (default: the one in the records' run config)"
        },
    )
    methods: str | None = field(
        default=None, metadata={"help": "use only records of these comma-separated methods (default: all)"}
    )
    # ---- LoraArguments / SFTConfig fields with other defaults
    use_lora: bool = field(
        default=True, metadata={"help": "train LoRA adapters (peft); --no-use-lora trains all weights"}
    )
    learning_rate: float | None = field(
        default=None, metadata={"help": "learning rate (default: 2e-4 with LoRA, 2e-5 for all weights)"}
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "passes over the records"})
    per_device_train_batch_size: int = field(
        default=4, metadata={"help": "records per process and micro-batch"}
    )
    max_length: int | None = field(
        default=512, metadata={"help": "maximum prompt + response tokens (longer examples are truncated)"}
    )
    completion_only_loss: bool | None = field(
        default=True, metadata={"help": "loss on the response tokens only (the prompt is context)"}
    )
    logging_steps: float = field(default=1, metadata={"help": "log every N steps"})
    save_strategy: str = field(
        default="no",
        metadata={"help": "checkpoints of the inner trainer (removed after training): no, steps, epoch"},
    )
    seed: int = field(default=0, metadata={"help": "random seed (data order, LoRA initialisation)"})
    disable_tqdm: bool | None = field(default=True, metadata={"help": "disable tqdm progress bars"})
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "deprecated alias of --activation-checkpointing", "nargs": "?", "const": True},
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bfloat16 mixed precision (default: on a GPU that supports it)"}
    )

    def __post_init__(self):
        if not self.output_dir:
            raise MoalignError("--output-dir is required")
        check_lora_args(self)
        if self.learning_rate is None:
            self.learning_rate = 2e-4 if self.use_lora else 2e-5
        if not self.use_cpu and not accelerator_available():
            self.use_cpu = True
        if self.bf16 is None:
            self.bf16 = bool(
                not self.use_cpu
                and not self.fp16
                and torch.cuda.is_available()
                and torch.cuda.is_bf16_supported()
            )
        super().__post_init__()

    @classmethod
    def upgrade_config(cls, values: dict) -> dict:
        """A config dict of older versions with today's field names (see the class docstring)."""
        v = dict(values)
        for old, new in (("lora", "use_lora"), ("lr", "learning_rate"), ("epochs", "num_train_epochs"),
                         ("batch_size", "per_device_train_batch_size")):  # fmt: skip
            if old in v:
                val = v.pop(old)
                v.setdefault(new, val)
        if "device" in v and str(v.pop("device") or "").startswith("cpu"):
            v["use_cpu"] = True
        return v

    def validate(self) -> None:
        if not self.inputs:
            raise MoalignError("--inputs is required (run JSONL files of RMOD outputs)")
        for name in ("per_device_train_batch_size", "max_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise MoalignError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.num_train_epochs > 0 and self.max_steps <= 0:
            raise MoalignError(
                f"--num-train-epochs must be > 0 (or give --max-steps), got {self.num_train_epochs}"
            )
        if not self.learning_rate > 0:
            raise MoalignError(f"--learning-rate must be > 0, got {self.learning_rate}")
        check_lora_args(self)


def load_distill_records(cfg: DistillConfig) -> tuple[list[dict], dict]:
    """Records usable for distillation (messages + response) and a summary (files, methods, system prompt)."""
    from moalign.data.prompts import to_prompt
    from moalign.records import read_records

    keep = {m.strip() for m in cfg.methods.split(",") if m.strip()} if cfg.methods else None
    out, methods, sys_prompts = [], Counter(), set()
    for path in cfg.inputs:
        recs = read_records(path)
        for i, r in enumerate(recs):
            if keep is not None and r.get("method") not in keep:
                continue
            if not isinstance(r.get("response"), str):
                raise MoalignError(f"{path}: record {i} has no 'response' string")
            if r.get("messages"):
                messages = [dict(m) for m in r["messages"]]
            elif r.get("prompt"):
                messages = list(to_prompt(r["prompt"]).messages)
            else:
                raise MoalignError(f"{path}: record {i} has neither 'messages' nor 'prompt'")
            out.append({"messages": messages, "response": r["response"]})
            methods[r.get("method", "?")] += 1
            sys_prompts.add((r.get("config") or {}).get("system_prompt"))
    if not out:
        what = f" of method(s) {sorted(keep)}" if keep else ""
        raise MoalignError(f"no records{what} in {', '.join(cfg.inputs)}")
    return out, {
        "records": len(out),
        "methods": dict(methods),
        "run_system_prompts": sorted(sys_prompts, key=str),
    }


def resolve_system_prompt(cfg: DistillConfig, run_system_prompts: list) -> str | None:
    """``--system-prompt`` if given, else the (single) system prompt the input runs were generated with."""
    if cfg.system_prompt is not None:
        return cfg.system_prompt
    if len(run_system_prompts) > 1:
        raise MoalignError(
            f"the input runs used different system prompts {run_system_prompts}; pass --system-prompt"
        )
    return run_system_prompts[0] if run_system_prompts else None


def build_dataset(records: list[dict], tokenizer, system_prompt: str | None):
    """``datasets.Dataset`` of ``{"prompt": rendered chat, "completion": response}`` (TRL appends EOS)."""
    from datasets import Dataset

    rows = [{"prompt": render_chat(tokenizer, r["messages"], system_prompt), "completion": r["response"]}
            for r in records]  # fmt: skip
    return Dataset.from_list(rows)


@torch.no_grad()
def completion_nll(policy, records: list[dict], system_prompt: str | None = None) -> float:
    """Mean negative log-likelihood per completion token (response + end-of-turn) under ``policy``.

    Computed independently of TRL, one example at a time; used to check what distillation achieved.
    """
    from moalign.training.logps import sequence_logps

    tok, model = policy.tokenizer, policy.model
    total, n = 0.0, 0
    for r in records:
        p = tok(render_chat(tok, r["messages"], system_prompt), add_special_tokens=False).input_ids
        c = tok(r["response"] + tok.eos_token, add_special_tokens=False).input_ids
        ids = torch.tensor([p + c], device=policy.device)
        completion = torch.tensor([[0] * len(p) + [1] * len(c)], device=policy.device)
        total -= float(sequence_logps(model, ids, torch.ones_like(ids), completion)[0])
        n += len(c)
    return total / max(n, 1)


def train_distill(cfg: DistillConfig) -> dict:
    """SFT the policy on (prompt, RMOD response) pairs with TRL; save a loadable adapter or model."""
    from trl import SFTTrainer

    from moalign.policies import load_policy

    cfg.validate()
    t0 = time.perf_counter()
    records, summary = load_distill_records(cfg)
    system_prompt = resolve_system_prompt(cfg, summary["run_system_prompts"])
    torch.manual_seed(cfg.seed)
    policy = load_policy(cfg.policy, device=str(cfg.device))
    tok = policy.tokenizer
    dataset = build_dataset(records, tok, system_prompt)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    peft_config = lora_config(cfg)
    args = copy.copy(cfg)  # the inner trainer writes to a scratch folder, removed below
    args.output_dir = str(out / "trainer")
    side, tok.padding_side = tok.padding_side, "right"  # training pads on the right; restored below
    model = policy.model
    model.train()
    with quiet_upstream_renames():  # TRL wraps the model with peft here
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                             peft_config=peft_config)  # fmt: skip
    try:
        result = trainer.train()
    finally:
        tok.padding_side = side
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    trained = trainer.accelerator.unwrap_model(trainer.model)
    trained.eval()
    main = trainer.is_world_process_zero()
    if main:
        trained.save_pretrained(str(out))
        name_adapter_base(out, cfg.policy)
        tok.save_pretrained(str(out))
        _remove_tree(out / "trainer")

    meta = {
        "kind": "lora" if cfg.use_lora else "full",
        "config_class": type(cfg).__name__,
        "policy": {"name": cfg.policy, "source": policy.source},
        "system_prompt": system_prompt,
        "learning_rate": cfg.learning_rate,
        "data": summary,
        "steps": int(trainer.state.global_step),
        "train_loss": {
            "first": losses[0] if losses else None,
            "last": losses[-1] if losses else None,
            "mean": float(result.training_loss),
            "history": losses,
        },
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if main:
        write_run_record(out / META_FILE, cfg, **meta)
    leave_process_group(trainer)
    return {
        "output_dir": str(out),
        **{k: meta[k] for k in ("kind", "steps", "train_loss", "data", "seconds")},
    }


def _remove_tree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)
