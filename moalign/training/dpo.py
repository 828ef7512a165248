"""Multi-objective DPO with a gradient combiner (MGDA-Decoupled, MGDA, linear, GroupDRO, PCGrad, ...).

For K objectives, each with its own preference pairs, the DPO (sigmoid) loss of objective k on its
mini-batch is

    L_k = -mean log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

Every optimizer step computes ``l_k`` and ``g_k = dL_k/dtheta`` with K separate backward passes (each over its
own sub-batch, so no extra forward work), accumulated over gradient-accumulation micro-batches in K buffers
(the only gradient copies held), and then writes ``d = sum_k alpha_k g_k`` into ``.grad``; ``alpha`` comes from
the combiner (:mod:`moalign.training.combiners`) via the K x K Gram matrix. Everything else -- optimizer,
scheduler, clipping, checkpoints/resume, logging integrations -- is transformers' :class:`Trainer`.

``per_objective_grads=False`` lets combiners that need no Gram matrix (``linear``, ``groupdro``) use one
backward pass of ``sum_k alpha_k L_k`` instead (no gradient norms/cosines are logged then, and ``alpha`` is
computed per micro-batch); that path also works under DeepSpeed/FSDP, the per-objective path supports one
device or DDP (``accelerate launch``), where the K gradients are all-reduced before the Gram matrix.

Reference model: with LoRA the base model with the adapter disabled (no second copy); otherwise a
``ref_model`` (or a frozen copy of the starting policy); or reference log-probs precomputed once before
training (``precompute_ref_log_probs``).

This module stays cheap to import (the CLI builds flags from :class:`MODPOConfig`); torch/transformers/peft are
imported inside functions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moalign.errors import MoalignError


def combiner_names() -> list[str]:
    """``--combiner`` choices: every registered combiner (``register_combiner`` makes a new one a choice)."""
    from moalign.training.combiners import available_combiners

    return available_combiners()


@dataclass
class MODPOConfig:
    """Configuration of ``moalign train dpo`` (field names follow TRL's ``DPOConfig`` where one exists)."""

    objective: list[str] = field(
        default_factory=list,
        metadata={
            "help": "NAME=PATH_OR_HUB_ID preference data of one objective (repeat the flag, one per objective); "
            "files with prompt/chosen/rejected columns or Anthropic-HH dialogues",
            "action": "append",
        },
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "one preference dataset for all objectives, split by --objective-column"},
    )
    objective_column: str = field(
        default="objective", metadata={"help": "column naming each pair's objective (with --dataset)"}
    )
    prompt_column: str | None = field(default=None, metadata={"help": "prompt column (default: auto-detect)"})
    chosen_column: str = field(default="chosen", metadata={"help": "chosen-response column"})
    rejected_column: str = field(default="rejected", metadata={"help": "rejected-response column"})
    combiner: str = field(
        default="mgda-decoupled",
        metadata={"help": "how per-objective gradients are combined", "choices": combiner_names},
    )
    combiner_weights: list[float] | None = field(
        default=None, metadata={"help": "fixed weights of the linear combiner (one per objective)"}
    )
    groupdro_eta: float = field(default=0.01, metadata={"help": "step size of the groupdro weights"})
    pcgrad_reduction: str = field(
        default="sum",
        metadata={"help": "pcgrad: sum or mean of the projected gradients", "choices": ["sum", "mean"]},
    )
    per_objective_grads: bool = field(
        default=True,
        metadata={
            "help": "compute each objective's gradient separately (needed by mgda*/pcgrad; gives gradient norms "
            "and cosines); --no-per-objective-grads lets linear/groupdro use one backward pass"
        },
    )
    policy: str = field(
        default="smollm2-135m-instruct", metadata={"help": "policy: bundled name, path or hub id"}
    )
    ref_model: str | None = field(
        default=None,
        metadata={"help": "reference model (default: the policy with the LoRA adapter disabled)"},
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "compute reference log-probs of all training pairs once before training"},
    )
    beta: float = field(default=0.1, metadata={"help": "DPO inverse temperature beta"})
    max_length: int = field(default=256, metadata={"help": "max tokens of prompt + response"})
    max_prompt_length: int = field(default=128, metadata={"help": "max prompt tokens (the end is kept)"})
    max_pairs: int | None = field(
        default=None, metadata={"help": "use at most this many training pairs per objective"}
    )
    heldout_frac: float = field(
        default=0.2, metadata={"help": "share of prompts held out (moalign's stable split; never trained on)"}
    )
    split_seed: int = field(default=0, metadata={"help": "seed of the held-out split"})
    eval_heldout_pairs: int = field(
        default=0,
        metadata={"help": "after training, implicit-reward accuracy on this many held-out pairs/objective"},
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "output folder (adapter, checkpoints, logs)"}
    )
    max_steps: int = field(default=100, metadata={"help": "optimizer steps (-1: use --num-train-epochs)"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs when --max-steps is -1"})
    per_device_train_batch_size: int = field(
        default=2, metadata={"help": "pairs PER OBJECTIVE per device and micro-batch"}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate"})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers scheduler name"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    optim: str = field(
        default="adamw_torch", metadata={"help": "transformers optimizer name (adamw_torch, sgd, ...)"}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "clip the combined gradient to this norm (0: off)"}
    )
    use_lora: bool = field(
        default=True, metadata={"help": "train a LoRA adapter (peft) instead of all weights"}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "LoRA target modules (all-linear or names)"}
    )
    lora_last_layers: int | None = field(
        default=None,
        metadata={
            "help": "put LoRA only on the last N transformer layers (backward stops there: faster on CPU)"
        },
    )
    seed: int = field(default=0, metadata={"help": "random seed (init, data order, pcgrad order)"})
    logging_steps: int = field(default=1, metadata={"help": "log every N steps"})
    save_steps: int = field(
        default=0, metadata={"help": "checkpoint every N steps (0: only the final model)"}
    )
    save_total_limit: int | None = field(default=2, metadata={"help": "keep at most N checkpoints"})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "checkpoint folder, or 'latest' for the newest one in --output-dir"}
    )
    report_to: list[str] = field(
        default_factory=lambda: ["none"], metadata={"help": "logging integrations (tensorboard, wandb, ...)"}
    )
    device: str | None = field(
        default=None, metadata={"help": "cpu to force the CPU (default: accelerator's choice)"}
    )
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "gradient checkpointing"})

    def objective_specs(self):
        """Parsed ``--objective`` values (:class:`~moalign.training.mo_data.ObjectiveSpec`)."""
        from moalign.training.mo_data import flatten_specs, parse_objective_spec

        return [parse_objective_spec(s) for s in flatten_specs(self.objective)]

    def validate(self) -> None:
        """Raise :class:`MoalignError` naming the first bad setting."""
        from moalign.training.combiners import available_combiners

        specs = self.objective_specs()
        if not specs and not self.dataset:
            raise MoalignError(
                "give --objective NAME=PATH (one per objective) or --dataset with --objective-column"
            )
        if specs and self.dataset:
            raise MoalignError("give either --objective NAME=PATH flags or --dataset, not both")
        names = [s.name for s in specs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise MoalignError(f"objective names must be unique, repeated: {', '.join(dup)}")
        key = self.combiner.strip().lower().replace("_", "-")
        if key not in available_combiners() and key not in ("uniform", "mgda-normalised", "group-dro"):
            raise MoalignError(
                f"unknown combiner {self.combiner!r}; known: {', '.join(available_combiners())}"
            )
        if not self.output_dir:
            raise MoalignError("--output-dir is required")
        checks = [
            (self.beta > 0, f"beta must be > 0, got {self.beta}"),
            (self.max_length >= 2, f"max_length must be >= 2, got {self.max_length}"),
            (0 <= self.max_prompt_length < self.max_length, "max_prompt_length must be in [0, max_length)"),
            (self.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (
                self.max_steps == -1 or self.max_steps >= 1,
                f"max_steps must be >= 1 or -1, got {self.max_steps}",
            ),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (0 <= self.heldout_frac < 1, f"heldout_frac must be in [0, 1), got {self.heldout_frac}"),
            (self.max_pairs is None or self.max_pairs >= 1, "max_pairs must be >= 1"),
            (self.eval_heldout_pairs >= 0, "eval_heldout_pairs must be >= 0"),
            (self.lora_r >= 1, "lora_r must be >= 1"),
            (self.save_steps >= 0, "save_steps must be >= 0"),
            (self.logging_steps >= 1, "logging_steps must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise MoalignError(msg)

    def make_combiner(self, n_objectives: int):
        """The configured :class:`~moalign.training.combiners.Combiner`."""
        from moalign.training.combiners import get_combiner

        key = self.combiner.strip().lower().replace("_", "-")
        kw: dict[str, Any] = {}
        if key in ("linear", "uniform") and self.combiner_weights is not None:
            if len(self.combiner_weights) != n_objectives:
                raise MoalignError(
                    f"--combiner-weights has {len(self.combiner_weights)} values for {n_objectives} objectives"
                )
            kw["weights"] = list(self.combiner_weights)
        elif key in ("groupdro", "group-dro"):
            kw["eta"] = self.groupdro_eta
        elif key == "pcgrad":
            kw.update(seed=int(self.seed), reduction=self.pcgrad_reduction)
        return get_combiner(self.combiner, **kw)


# --------------------------------------------------------------------------------------------- data
def load_objective_data(cfg: MODPOConfig) -> dict[str, tuple[list, list]]:
    """``{objective: (train pairs, held-out pairs)}`` with moalign's stable prompt-hash split."""
    from moalign.data.pairs import load_pairs, split_pairs

    kw = dict(
        prompt_column=cfg.prompt_column, chosen_column=cfg.chosen_column, rejected_column=cfg.rejected_column
    )
    groups: dict[str, list] = {}
    if cfg.dataset:
        pairs = load_pairs(cfg.dataset, **kw)
        for p in pairs:
            if cfg.objective_column not in p.meta:
                present = ", ".join(sorted(k for k in p.meta if k not in ("source", "index", "format")))
                raise MoalignError(
                    f"--dataset {cfg.dataset}: column {cfg.objective_column!r} not found (other columns: {present})"
                )
            groups.setdefault(str(p.meta[cfg.objective_column]), []).append(p)
    else:
        for spec in cfg.objective_specs():
            groups[spec.name] = load_pairs(spec.source, **kw)
    out = {}
    for name, pairs in groups.items():
        train, held = split_pairs(pairs, heldout_frac=cfg.heldout_frac, seed=cfg.split_seed)
        if not train:
            raise MoalignError(
                f"objective {name!r}: no training pairs left after holding out {cfg.heldout_frac}"
            )
        if cfg.max_pairs is not None:
            train = train[: cfg.max_pairs]
        out[name] = (train, held)
    return out


# ----------------------------------------------------------------------------------------- log-probs
def sequence_logps(model, input_ids, attention_mask, completion_mask):
    """``sum_t log pi(x_t | x_<t)`` over completion tokens, one value per row (float32)."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(logits.dtype)
    logits = logits.float()
    tok = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (tok * mask.float()).sum(-1)


def dpo_loss(policy_logps, ref_logps, beta: float):
    """Sigmoid DPO loss of a ``[2B]`` batch (chosen rows first): (loss, chosen rewards, rejected rewards)."""
    import torch.nn.functional as F

    b = policy_logps.shape[0] // 2
    ratio = policy_logps - ref_logps
    r_c, r_r = beta * ratio[:b], beta * ratio[b:]
    return -F.logsigmoid(r_c - r_r).mean(), r_c.detach(), r_r.detach()


def _reference_logps(model, batch, ref_model=None):
    """Reference log-probs of a sub-batch: precomputed, a separate model, or the LoRA base (adapter off)."""
    import torch

    if "ref_logps" in batch:
        return batch["ref_logps"]
    with torch.no_grad():
        if ref_model is not None:
            return sequence_logps(
                ref_model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
            )
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                return sequence_logps(
                    model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
                )
    raise MoalignError(
        "no reference: give ref_model, a LoRA (peft) policy, or precomputed reference log-probs"
    )


def implicit_reward_margins(
    model,
    tokenizer,
    pairs,
    beta: float,
    *,
    ref_model=None,
    max_length: int = 256,
    max_prompt_length: int = 128,
    batch_size: int = 4,
    ref_logps=None,
):
    """DPO implicit reward margins ``beta * [(log pi - log ref)(y_w) - (log pi - log ref)(y_l)]`` per pair.

    Accuracy = share of margins > 0 (ties count one half). ``ref_model=None`` needs a peft model (the
    reference is the adapter-disabled base). ``ref_logps``: precomputed ``[n, 2]`` reference log-probs
    (chosen, rejected), e.g. :func:`policy_logps` of the starting policy, shared by several evaluations.
    """
    import torch

    from moalign.training.mo_data import MultiObjectiveCollator, MultiObjectiveDataset, tokenize_pair

    toks = [tokenize_pair(tokenizer, p, max_length, max_prompt_length) for p in pairs]
    coll = MultiObjectiveCollator(MultiObjectiveDataset({"x": toks}), _pad_id(tokenizer))
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(toks), batch_size):
            batch = {k: v.to(dev) for k, v in coll.batch_for(toks[i : i + batch_size]).items()}
            if ref_logps is not None:
                r = torch.as_tensor(ref_logps, dtype=torch.float32)[i : i + batch_size]
                batch["ref_logps"] = torch.cat([r[:, 0], r[:, 1]]).to(dev)
            pol = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            ref = _reference_logps(model, batch, ref_model)
            n = pol.shape[0] // 2
            ratio = (pol - ref).double()
            out.append(beta * (ratio[:n] - ratio[n:]))
    model.train(was_training)
    return torch.cat(out).cpu()


def policy_logps(
    model, tokenizer, pairs, *, max_length: int = 256, max_prompt_length: int = 128, batch_size: int = 4
):
    """``[n, 2]`` log-probs (chosen, rejected) of ``pairs`` under ``model`` (no grad)."""
    import torch

    from moalign.training.mo_data import MultiObjectiveCollator, MultiObjectiveDataset, tokenize_pair

    toks = [tokenize_pair(tokenizer, p, max_length, max_prompt_length) for p in pairs]
    coll = MultiObjectiveCollator(MultiObjectiveDataset({"x": toks}), _pad_id(tokenizer))
    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(toks), batch_size):
            b = {k: v.to(dev) for k, v in coll.batch_for(toks[i : i + batch_size]).items()}
            lp = sequence_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"]).cpu()
            n = lp.shape[0] // 2
            out.append(torch.stack([lp[:n], lp[n:]], dim=1))
    return torch.cat(out)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# ------------------------------------------------------------------------------------------- trainer
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


def _make_trainer_class():
    """Define :class:`MODPOTrainer` lazily (transformers is imported only when training)."""
    import torch
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint

    from moalign.training.combiners import apply_weights, gram_matrix

    class _CombinerStateCallback(TrainerCallback):
        """Saves the combiner's state (groupdro weights, pcgrad RNG) into every checkpoint folder."""

        def __init__(self, trainer):
            self.trainer = trainer

        def on_save(self, args, state, control, **kwargs):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir() and self.trainer.is_world_process_zero():
                torch.save(self.trainer.combiner.state_dict(), ckpt / "combiner_state.pt")
            return control

    class MODPOTrainer(Trainer):
        """transformers ``Trainer`` whose training step combines K per-objective DPO gradients.

        ``train_dataset``/``data_collator``: :class:`~moalign.training.mo_data.MultiObjectiveDataset` and
        :class:`~moalign.training.mo_data.MultiObjectiveCollator` (one sub-batch per objective). The combined
        direction is written into ``.grad``; the Trainer does the rest. Per-step statistics go to
        :meth:`log` (every integration, ``trainer_state.json``) and to ``combiner_log.jsonl``.
        """

        def __init__(
            self,
            *args,
            objective_names: list[str],
            combiner,
            beta: float = 0.1,
            ref_model=None,
            per_objective_grads: bool = True,
            combiner_log: str | os.PathLike | None = None,
            **kwargs,
        ):
            super().__init__(*args, **kwargs)
            self.objective_names = list(objective_names)
            self.combiner = combiner
            self.beta = float(beta)
            self.ref_model = ref_model
            if not per_objective_grads and combiner.needs_gram:
                raise MoalignError(
                    f"combiner {combiner.name!r} needs each objective's gradient (per_objective_grads=True)"
                )
            self.per_objective_grads = per_objective_grads
            if per_objective_grads and self.accelerator.distributed_type.value in ("DEEPSPEED", "FSDP"):
                raise MoalignError(
                    "per-objective gradients need unsharded gradients: use DDP (accelerate launch without "
                    "DeepSpeed/FSDP), or --no-per-objective-grads with the linear/groupdro combiners"
                )
            self.combiner_log = Path(combiner_log) if combiner_log else None
            self._acc: list[list[torch.Tensor | None]] | None = None
            self._acc_loss = None
            self._acc_metrics: dict[str, list[float]] = {}
            self._pending: list[dict[str, float]] = []
            self.last_stats: dict | None = None
            self.add_callback(_CombinerStateCallback(self))

        # ------------------------------------------------------------------ helpers
        @staticmethod
        def _params(model) -> list[torch.nn.Parameter]:
            return [p for p in model.parameters() if p.requires_grad]

        def objective_loss(self, model, batch):
            """DPO loss of one objective's sub-batch, with reward accuracy/margin (detached)."""
            pol = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
            ref = _reference_logps(self.accelerator.unwrap_model(model), batch, self.ref_model)
            loss, r_c, r_r = dpo_loss(pol, ref.to(pol.dtype), self.beta)
            acc = ((r_c > r_r).float() + 0.5 * (r_c == r_r).float()).mean()
            return loss, {"accuracy": float(acc), "margin": float((r_c - r_r).mean())}

        def _record_metrics(self, k: int, m: dict[str, float]) -> None:
            for key, v in m.items():
                self._acc_metrics.setdefault(key, [0.0] * len(self.objective_names))
                self._acc_metrics[key][k] += v / self.current_gradient_accumulation_steps

        def floating_point_ops(self, inputs) -> int:
            n_tok = sum(int(b["attention_mask"].sum()) for b in inputs["objectives"].values())
            n_par = getattr(self.model, "num_parameters", lambda **_: 0)(exclude_embeddings=True)
            return 6 * n_tok * n_par

        # ------------------------------------------------------------------ the step
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """Mean of the per-objective DPO losses (used by evaluation; training uses :meth:`training_step`)."""
            losses = [self.objective_loss(model, inputs["objectives"][n])[0] for n in self.objective_names]
            loss = torch.stack(losses).mean()
            return (loss, {"losses": torch.stack(losses).detach()}) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            ga = self.current_gradient_accumulation_steps
            names = self.objective_names
            k_obj = len(names)
            if not self.per_objective_grads:
                losses = []
                with self.compute_loss_context_manager():
                    for k, n in enumerate(names):
                        loss_k, m = self.objective_loss(model, inputs["objectives"][n])
                        losses.append(loss_k)
                        self._record_metrics(k, m)
                lvec = torch.stack([lk.detach() for lk in losses])
                alpha, stats = self.combiner.weights_and_stats(lvec.double().cpu())
                total = sum(float(alpha[k]) * losses[k] for k in range(k_obj))
                self.accelerator.backward(total / ga)
                self._finish_step(stats)
                return lvec.mean() / ga

            # per-objective gradients: bypass DDP's reducer, all-reduce the K gradients by hand at sync time
            base = self.accelerator.unwrap_model(model)
            params = self._params(base)
            if self._acc is None:
                self._acc = [[None] * len(params) for _ in range(k_obj)]
                self._acc_loss = torch.zeros(k_obj, dtype=torch.float64)
            micro: list[float] = []
            for k, n in enumerate(names):
                with self.compute_loss_context_manager():
                    loss_k, m = self.objective_loss(base, inputs["objectives"][n])
                grads = torch.autograd.grad(loss_k / ga, params, allow_unused=True)
                acc = self._acc[k]
                for i, g in enumerate(grads):
                    if g is None:
                        continue
                    if acc[i] is None:
                        acc[i] = g.detach()
                    else:
                        acc[i].add_(g.detach())
                del grads
                self._acc_loss[k] += float(loss_k.detach()) / ga
                micro.append(float(loss_k.detach()))
                self._record_metrics(k, m)
            if self.accelerator.sync_gradients:
                self._apply_combination(params)
            # reported loss: the mean of the objectives' losses (this micro-batch's share of the step)
            return torch.tensor(sum(micro) / k_obj / ga, device=self.args.device)

        def _apply_combination(self, params) -> None:
            """Combine the K accumulated gradients and write ``d = sum_k alpha_k g_k`` into ``.grad``."""
            acc, losses = self._acc, self._acc_loss
            if self.accelerator.num_processes > 1:
                for k in range(len(acc)):
                    acc[k] = [None if g is None else self.accelerator.reduce(g, "mean") for g in acc[k]]
                losses = self.accelerator.reduce(losses.to(self.args.device), "mean").cpu()
            gram = gram_matrix(acc)
            alpha, stats = self.combiner.weights_and_stats(losses, gram)
            for i, p in enumerate(params):
                d = apply_weights(alpha, [[acc[k][i]] for k in range(len(acc))])[0]
                for k in range(len(acc)):
                    acc[k][i] = None  # free as we go: never more than K gradient copies
                if d is None:
                    continue
                d = d.to(p.dtype)
                if p.grad is None:
                    p.grad = d
                else:
                    p.grad.add_(d)
            self._acc = None
            self._acc_loss = None
            self._finish_step(stats)

        def _finish_step(self, stats: dict) -> None:
            """Record one optimizer step's statistics (log buffer + ``combiner_log.jsonl``)."""
            if not self.accelerator.sync_gradients:
                return
            stats = dict(stats)
            for key, vals in self._acc_metrics.items():
                stats[key] = [float(v) for v in vals]
            self._acc_metrics = {}
            self.last_stats = stats
            flat = _flatten_stats(self.objective_names, stats)
            self._pending.append(flat)
            if self.combiner_log is not None and self.is_world_process_zero():
                row = {"step": self.state.global_step + 1, "objectives": self.objective_names, **stats}
                with open(self.combiner_log, "a") as f:
                    f.write(json.dumps(row, default=_json_default) + "\n")

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            """Adds the mean of the per-step combiner statistics since the last log to training logs."""
            if self._pending and "loss" in logs:
                keys = sorted({k for row in self._pending for k in row})
                for key in keys:
                    vals = [row[key] for row in self._pending if key in row]
                    logs[key] = sum(vals) / len(vals)
                self._pending = []
            super().log(logs, start_time)

        # ------------------------------------------------------------------ resume
        def train(self, resume_from_checkpoint=None, **kwargs):
            """``Trainer.train`` plus the combiner's state and ``combiner_log.jsonl`` trimmed to the checkpoint."""
            if resume_from_checkpoint is True or resume_from_checkpoint == "latest":
                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
                if resume_from_checkpoint is None:
                    raise MoalignError(f"no checkpoint found in {self.args.output_dir} to resume from")
            if resume_from_checkpoint:
                ckpt = Path(resume_from_checkpoint)
                if not ckpt.is_dir():
                    raise MoalignError(f"checkpoint folder not found: {ckpt}")
                state_file = ckpt / "combiner_state.pt"
                if state_file.exists():
                    self.combiner.load_state_dict(torch.load(state_file, weights_only=False))
                step = json.loads((ckpt / "trainer_state.json").read_text()).get("global_step", 0)
                if self.combiner_log is not None and self.combiner_log.exists():
                    rows = [r for r in self.combiner_log.read_text().splitlines() if r.strip()]
                    keep = [r for r in rows if json.loads(r).get("step", 0) <= step]
                    self.combiner_log.write_text("".join(r + "\n" for r in keep))
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    return MODPOTrainer


def _json_default(o):
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


_TRAINER_CLS = None


def get_trainer_class():
    """The :class:`MODPOTrainer` class (a ``transformers.Trainer`` subclass), created on first use."""
    global _TRAINER_CLS
    if _TRAINER_CLS is None:
        _TRAINER_CLS = _make_trainer_class()
    return _TRAINER_CLS


def __getattr__(name: str):  # lazy `from moalign.training.dpo import MODPOTrainer`
    if name == "MODPOTrainer":
        return get_trainer_class()
    raise AttributeError(name)


# --------------------------------------------------------------------------------------- entry point
@dataclass
class MODPORun:
    """Everything :func:`build_trainer` sets up (the trainer, the model, the data)."""

    trainer: Any
    model: Any
    tokenizer: Any
    ref_model: Any
    data: dict[str, tuple[list, list]]
    config: MODPOConfig


def training_arguments(cfg: MODPOConfig):
    """transformers ``TrainingArguments`` from the config."""
    import torch
    from transformers import TrainingArguments

    extra: dict[str, Any] = {}
    if cfg.gradient_checkpointing:
        extra.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    return TrainingArguments(
        output_dir=cfg.output_dir,
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        optim=cfg.optim,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else 500,
        save_total_limit=cfg.save_total_limit,
        report_to=list(cfg.report_to) if cfg.report_to else ["none"],
        seed=cfg.seed,
        data_seed=cfg.seed,
        remove_unused_columns=False,
        use_cpu=(cfg.device == "cpu"),
        bf16=cfg.bf16,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available() and cfg.device != "cpu",
        disable_tqdm=True,
        **extra,
    )


def build_trainer(
    cfg: MODPOConfig, *, model=None, tokenizer=None, ref_model=None, data=None, tokenized=None
) -> MODPORun:
    """Load data and policy, wrap LoRA, tokenise, and construct the :class:`MODPOTrainer`.

    ``model``/``tokenizer``/``ref_model``/``data`` may be given directly (tests, notebooks); otherwise they
    are loaded from ``cfg.policy`` / ``cfg.ref_model`` / the configured datasets. ``tokenized`` (``{name:
    [TokenizedPair]}`` for the training pairs of ``data``, e.g. with reference log-probs already filled in by
    :func:`precompute_reference` and shared by several runs) skips tokenisation.
    """
    from transformers import set_seed

    from moalign.training.mo_data import MultiObjectiveCollator, MultiObjectiveDataset, tokenize_pair

    cfg.validate()
    set_seed(cfg.seed)
    if data is None:
        data = load_objective_data(cfg)
    names = list(data)
    combiner = cfg.make_combiner(len(names))
    if model is None or tokenizer is None:
        from moalign.policies import load_policy

        pol = load_policy(cfg.policy)
        model, tokenizer = pol.model, pol.tokenizer
    if ref_model is None and cfg.ref_model:
        from moalign.policies import load_policy

        ref_model = load_policy(cfg.ref_model).model
    if ref_model is not None:
        ref_model.eval().requires_grad_(False)
    if cfg.use_lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise MoalignError("LoRA needs peft: pip install 'moalign[train]'") from None
        targets = list(cfg.lora_target_modules)
        lcfg = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=_lora_targets(model, targets, cfg.lora_last_layers),
            task_type="CAUSAL_LM",
            layers_to_transform=_last_layers(model, cfg.lora_last_layers),
        )
        model = get_peft_model(model, lcfg)
        model.peft_config["default"].base_model_name_or_path = cfg.policy
    elif ref_model is None and not cfg.precompute_ref_log_probs:
        import copy

        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()

    toks = tokenized or {
        n: [tokenize_pair(tokenizer, p, cfg.max_length, cfg.max_prompt_length) for p in train]
        for n, (train, _) in data.items()
    }
    if cfg.precompute_ref_log_probs and any(p.ref is None for ps in toks.values() for p in ps):
        precompute_reference(model, ref_model, toks, _pad_id(tokenizer), cfg.per_device_train_batch_size * 2)
    dataset = MultiObjectiveDataset(toks, seed=cfg.seed)
    collator = MultiObjectiveCollator(dataset, _pad_id(tokenizer))
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    trainer = get_trainer_class()(
        model=model,
        args=training_arguments(cfg),
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        objective_names=names,
        combiner=combiner,
        beta=cfg.beta,
        ref_model=ref_model,
        per_objective_grads=cfg.per_objective_grads,
        combiner_log=Path(cfg.output_dir) / "combiner_log.jsonl",
    )
    if ref_model is not None:
        ref_model.to(trainer.args.device)
    return MODPORun(trainer, model, tokenizer, ref_model, data, cfg)


def _lora_targets(model, targets: list[str], last_layers: int | None):
    """peft ``target_modules``: "all-linear" as is, or (peft refuses the string together with
    ``layers_to_transform``) the names of every linear layer except the output head."""
    import torch

    if targets != ["all-linear"]:
        return targets
    if last_layers is None:
        return "all-linear"
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names.discard("lm_head")
    return sorted(names)


def _last_layers(model, n: int | None) -> list[int] | None:
    """Indices of the last ``n`` transformer layers (``None``: all layers)."""
    if n is None:
        return None
    total = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not total:
        raise MoalignError("lora_last_layers needs a model config with num_hidden_layers")
    if not 1 <= n <= total:
        raise MoalignError(f"lora_last_layers must be in [1, {total}], got {n}")
    return list(range(total - n, total))


def precompute_reference(model, ref_model, toks, pad_id: int, batch_size: int = 4) -> None:
    """Fill ``TokenizedPair.ref`` with reference log-probs (chosen, rejected) for every training pair."""
    import torch

    from moalign.training.mo_data import MultiObjectiveCollator, MultiObjectiveDataset

    coll = MultiObjectiveCollator(MultiObjectiveDataset(toks), pad_id)
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    for pairs in toks.values():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            batch = {k: v.to(dev) for k, v in coll.batch_for(chunk).items() if k != "ref_logps"}
            with torch.no_grad():
                if ref_model is not None:
                    ref = sequence_logps(
                        ref_model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
                    )
                elif hasattr(model, "disable_adapter"):
                    with model.disable_adapter():
                        ref = sequence_logps(
                            model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
                        )
                else:  # full fine-tuning, before any step: the policy is the reference
                    ref = sequence_logps(
                        model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
                    )
            n = len(chunk)
            for j, p in enumerate(chunk):
                p.ref = (float(ref[j]), float(ref[n + j]))
    model.train(was)


def train_dpo(cfg: MODPOConfig) -> dict:
    """Train (or resume), save adapter/model + tokenizer + config, return a JSON-able summary."""
    import torch

    from moalign.configbase import versions

    run = build_trainer(cfg)
    trainer, names = run.trainer, list(run.data)
    t0 = time.time()
    resume = cfg.resume_from_checkpoint
    if resume and resume.lower() in ("latest", "true"):
        resume = "latest"
    result = trainer.train(resume_from_checkpoint=resume or None)
    train_s = time.time() - t0
    trainer.save_model(cfg.output_dir)
    out = Path(cfg.output_dir)
    summary: dict[str, Any] = {
        "output_dir": str(out),
        "objectives": names,
        "combiner": trainer.combiner.describe(),
        "global_step": trainer.state.global_step,
        "train_loss": float(result.training_loss),
        "train_seconds": train_s,
        "n_train_pairs": {n: len(tr) for n, (tr, _) in run.data.items()},
        "n_heldout_pairs": {n: len(ho) for n, (_, ho) in run.data.items()},
        "last_step": trainer.last_stats,
    }
    if cfg.eval_heldout_pairs > 0:
        summary["heldout"] = {}
        for n, (_, held) in run.data.items():
            subset = held[: cfg.eval_heldout_pairs]
            if not subset:
                continue
            m = implicit_reward_margins(
                run.model,
                run.tokenizer,
                subset,
                cfg.beta,
                ref_model=run.ref_model,
                max_length=cfg.max_length,
                max_prompt_length=cfg.max_prompt_length,
            )
            correct = ((m > 0).double() + 0.5 * (m == 0).double()).tolist()
            summary["heldout"][n] = {
                "n": len(subset),
                "accuracy": float(sum(correct) / len(correct)),
                "mean_margin": float(m.mean()),
                "correct": correct,
            }
    meta = {
        "config": dataclasses.asdict(cfg),
        "versions": versions(),
        "seed": cfg.seed,
        "combiner": trainer.combiner.describe(),
        "objectives": names,
        "n_train_pairs": summary["n_train_pairs"],
        "torch_threads": torch.get_num_threads(),
    }
    (out / "modpo_config.json").write_text(json.dumps(meta, indent=2, default=str))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
