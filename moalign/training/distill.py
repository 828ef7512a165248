"""Distilled RMOD (``moalign train distill``; spec: rmod.md): supervised fine-tuning of the policy on its own
RMOD outputs, so that plain sampling afterwards approximates RMOD with no decoding overhead.

Each record of the input runs gives one example: the conversation rendered with the policy's chat template
(the text the engine decoded from, same system prompt) as the *prompt*, and the RMOD response followed by the
end-of-turn token as the *completion*. Training minimises the completion-only negative log-likelihood

    L(theta) = - sum_i sum_{t in completion_i} log pi_theta(y_{i,t} | x_i, y_{i,<t})  /  #completion tokens

with TRL's ``SFTTrainer`` (LoRA adapters through PEFT, or all weights). The output folder loads with
``moalign.policies.load_policy(output_dir)``: a LoRA adapter's ``base_model_name_or_path`` is the policy name
it was trained from (e.g. ``smollm2-135m-instruct``) and is merged on load; a full model is a normal
transformers folder. ``distill_config.json`` records the config, seed, versions, data and loss history.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moalign.configbase import config_field as _f
from moalign.configbase import versions
from moalign.errors import MoalignError
from moalign.policies import render_chat

META_FILE = "distill_config.json"


@dataclass
class DistillConfig:
    """``moalign train distill``: fine-tune the policy on its own RMOD outputs."""

    inputs: list[str] = _f(list, "run JSONL files (moalign generate --method rmod) to learn from", nargs="+")
    output_dir: str = _f("", "folder for the result (loads with --policy FOLDER)")
    policy: str = _f("smollm2-135m-instruct", "policy to fine-tune (the one that produced the records)")
    lora: bool = _f(True, "train LoRA adapters (--no-lora: all weights)")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int | None = _f(None, "LoRA alpha (default: 2 x rank)")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    lr: float | None = _f(None, "learning rate (default: 2e-4 with LoRA, 2e-5 for all weights)")
    epochs: float = _f(1.0, "passes over the records")
    max_steps: int = _f(-1, "optimizer steps (overrides --epochs when > 0)")
    batch_size: int = _f(4, "records per optimizer step")
    max_length: int = _f(512, "maximum prompt + response tokens (longer examples are truncated)")
    system_prompt: str | None = _f(
        None, "system prompt for the training prompts (default: the one in the records' run config)"
    )
    methods: str | None = _f(None, "use only records of these comma-separated methods (default: all)")
    seed: int = _f(0, "random seed (data order, LoRA initialisation)")
    device: str | None = _f(None, "torch device (default: cuda if available, else cpu)")

    def validate(self) -> None:
        if not self.inputs:
            raise MoalignError("--inputs is required (run JSONL files of RMOD outputs)")
        if not self.output_dir:
            raise MoalignError("--output-dir is required")
        for name in ("lora_r", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise MoalignError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.epochs > 0 and self.max_steps <= 0:
            raise MoalignError(f"--epochs must be > 0 (or give --max-steps), got {self.epochs}")
        if self.lr is not None and not self.lr > 0:
            raise MoalignError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.lora_dropout < 1:
            raise MoalignError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")


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
    tok, model = policy.tokenizer, policy.model
    total, n = 0.0, 0
    for r in records:
        p = tok(render_chat(tok, r["messages"], system_prompt), add_special_tokens=False).input_ids
        c = tok(r["response"] + tok.eos_token, add_special_tokens=False).input_ids
        ids = torch.tensor([p + c], device=policy.device)
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        tgt = ids[0, 1:]
        lp = logp.gather(-1, tgt[:, None])[:, 0][len(p) - 1 :]
        total -= float(lp.sum())
        n += len(c)
    return total / max(n, 1)


def train_distill(cfg: DistillConfig) -> dict:
    """SFT the policy on (prompt, RMOD response) pairs with TRL; save a loadable adapter or model."""
    from trl import SFTConfig, SFTTrainer

    from moalign.policies import default_device, load_policy

    cfg.validate()
    t0 = time.perf_counter()
    records, summary = load_distill_records(cfg)
    system_prompt = resolve_system_prompt(cfg, summary["run_system_prompts"])
    device = cfg.device or default_device()
    torch.manual_seed(cfg.seed)
    policy = load_policy(cfg.policy, device=device)
    tok = policy.tokenizer
    dataset = build_dataset(records, tok, system_prompt)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    peft_config = None
    if cfg.lora:
        try:
            from peft import LoraConfig
        except ImportError:
            raise MoalignError(
                "LoRA distillation needs peft: pip install 'moalign[train]' (or --no-lora)"
            ) from None
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r,
                                 lora_dropout=cfg.lora_dropout, target_modules="all-linear",
                                 task_type="CAUSAL_LM")  # fmt: skip
    lr = cfg.lr if cfg.lr is not None else (2e-4 if cfg.lora else 2e-5)
    args = SFTConfig(
        output_dir=str(out / "trainer"),
        learning_rate=lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        completion_only_loss=True,
        packing=False,
        activation_checkpointing=False,
        bf16=False,
        use_cpu=str(device).startswith("cpu"),
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    side, tok.padding_side = tok.padding_side, "right"  # training pads on the right; restored below
    model = policy.model
    model.train()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                         peft_config=peft_config)  # fmt: skip
    try:
        result = trainer.train()
    finally:
        tok.padding_side = side
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    trained = trainer.model
    trained.eval()
    if cfg.lora:
        trained.save_pretrained(str(out))
        ac = out / "adapter_config.json"
        adapter_cfg = json.loads(ac.read_text())
        adapter_cfg["base_model_name_or_path"] = cfg.policy  # the name load_policy resolves, not a cache path
        ac.write_text(json.dumps(adapter_cfg, indent=2))
    else:
        trained.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    _remove_tree(out / "trainer")

    meta = {
        "kind": "lora" if cfg.lora else "full",
        "config": asdict(cfg),
        "policy": {"name": cfg.policy, "source": policy.source},
        "system_prompt": system_prompt,
        "learning_rate": lr,
        "data": summary,
        "steps": int(trainer.state.global_step),
        "train_loss": {
            "first": losses[0] if losses else None,
            "last": losses[-1] if losses else None,
            "mean": float(result.training_loss),
            "history": losses,
        },
        "seed": cfg.seed,
        "versions": versions(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return {
        "output_dir": str(out),
        **{k: meta[k] for k in ("kind", "steps", "train_loss", "data", "seconds")},
    }


def _remove_tree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)
