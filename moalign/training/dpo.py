"""Multi-objective DPO with a gradient combiner (MGDA-Decoupled, MGDA, linear, GroupDRO, PCGrad, ...).

For K objectives, each with its own preference pairs, the DPO (sigmoid) loss of objective k on its
mini-batch is

    L_k = -mean log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

Every optimizer step computes ``l_k`` and ``g_k = dL_k/dtheta`` with K separate backward passes (each over its
own sub-batch, so no extra forward work), accumulated over gradient-accumulation micro-batches in K buffers
(the only gradient copies held), and then writes ``d = sum_k alpha_k g_k`` into ``.grad``; ``alpha`` comes from
the combiner (:mod:`moalign.training.combiners`) via the K x K Gram matrix. Everything else -- optimizer,
scheduler, clipping, checkpoints/resume, logging integrations -- is transformers' :class:`Trainer`.

Several processes (DDP, ``accelerate launch``): each process computes its K gradients on its share of the
global batch; at the optimizer step each objective's (flattened) gradient and the K losses are all-reduced
(mean over processes, equal per-process batches) BEFORE the Gram matrix and the combiner, so every process
sees the K gradients and losses of the full global batch, computes the same ``alpha`` and writes the same
``d``. DDP's own gradient averaging is never used on this path (the backward passes bypass the DDP wrapper).
The result equals one process with the same global batch up to float32 summation order.

``per_objective_grads=False`` lets combiners that need no Gram matrix (``linear``, ``groupdro``) use one
backward pass of ``sum_k alpha_k L_k`` instead (no gradient norms/cosines are logged then, and ``alpha`` is
computed per micro-batch, from the K losses averaged over processes); that path goes through
``accelerator.backward`` and also works under DeepSpeed/FSDP. The per-objective path needs every process to
hold whole gradients written by hand into ``.grad``: DeepSpeed (whose engine reduces gradients and steps inside
its own backward; ZeRO-2/3 also partition the gradients) and FSDP (sharded gradients) are refused with one line.

Reference model: with LoRA the base model with the adapter disabled (no second copy); otherwise a
``ref_model`` (or a frozen copy of the starting policy); or reference log-probs precomputed once before
training (``precompute_ref_log_probs``).

Renamed (old names still import, with a DeprecationWarning): ``MODPOConfig`` -> :class:`MultiObjectiveDPOConfig`,
``MODPOTrainer`` -> :class:`MultiObjectiveDPOTrainer`, ``MODPORun`` -> :class:`MultiObjectiveDPORun`.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import SaveStrategy

from moalign.configbase import json_default
from moalign.errors import MoalignError
from moalign.registry import Choices
from moalign.training.base import (
    RESUME_LAST,
    cpu_fallback,
    name_adapter_base,
    resolve_resume,
    write_run_record,
)
from moalign.training.combiners import COMBINERS, apply_weights, gram_matrix
from moalign.training.lora import LoraArguments, apply_lora, check_lora_args
from moalign.training.mo_data import flatten_specs

META_FILE = "dpo_config.json"


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


@dataclass
class MultiObjectiveDPOConfig(TrainingArguments, LoraArguments):
    """Configuration of ``moalign train dpo``: every ``transformers.TrainingArguments`` field plus the
    multi-objective DPO settings and the shared LoRA flags (:class:`~moalign.training.lora.LoraArguments`).

    It subclasses ``transformers.TrainingArguments`` rather than ``trl.DPOConfig``: the trainer is a plain
    transformers ``Trainer`` whose training step computes the K DPO losses and gradients itself, so DPOConfig's
    options for TRL's own ``DPOTrainer`` (loss types, label smoothing, padding-free, reference-model sync,
    tokenisation settings, ...) would be accepted and silently ignored. Settings that exist in DPOConfig keep
    its names (``beta``, ``max_length``, ``max_prompt_length``, ``precompute_ref_log_probs``).

    Defaults that differ from TrainingArguments: ``max_steps=100``, ``num_train_epochs=1``,
    ``per_device_train_batch_size=2`` (pairs PER OBJECTIVE), ``logging_steps=1``, ``save_strategy="no"``,
    ``save_total_limit=2``, ``seed=0``, ``remove_unused_columns=False``, ``disable_tqdm=True``, LoRA on with
    ``lora_r=8``. Without an accelerator ``use_cpu`` is set (bf16 stays off unless asked for).
    """

    output_dir: str = field(
        kw_only=True, metadata={"help": "output folder (adapter or model, checkpoints, combiner_log.jsonl)"}
    )
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
        metadata={
            "help": "how per-objective gradients are combined",
            "choices": Choices(COMBINERS),
        },
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
    lora_last_layers: int | None = field(
        default=None,
        metadata={
            "help": "put LoRA only on the last N transformer layers (backward stops there: faster on CPU)"
        },
    )
    # ---- LoraArguments / TrainingArguments fields with other defaults
    use_lora: bool = field(
        default=True,
        metadata={"help": "train a LoRA adapter (peft) instead of all weights (--no-use-lora: all)"},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    per_device_train_batch_size: int = field(
        default=2,
        metadata={
            "help": "preference pairs PER OBJECTIVE per process and micro-batch (global batch: this x processes "
            "x gradient_accumulation_steps)"
        },
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs when --max-steps is -1"})
    max_steps: int = field(default=100, metadata={"help": "optimizer steps (-1: use --num-train-epochs)"})
    logging_steps: float = field(default=1, metadata={"help": "log every N steps"})
    save_strategy: SaveStrategy | str = field(
        default="no",
        metadata={"help": "checkpoints: no (only the final model), steps (every --save-steps), epoch, best"},
    )
    save_total_limit: int | None = field(default=2, metadata={"help": "keep at most N checkpoints"})
    seed: int = field(default=0, metadata={"help": "random seed (init, data order, pcgrad order)"})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "must stay False (the multi-objective batches are not model inputs)"}
    )
    disable_tqdm: bool | None = field(default=True, metadata={"help": "disable tqdm progress bars"})

    def __post_init__(self):
        if not self.output_dir:
            raise MoalignError("--output-dir is required")
        self.objective = flatten_specs(self.objective)
        if self.combiner_weights is not None:
            self.combiner_weights = [float(w) for w in self.combiner_weights]
        check_lora_args(self)
        check_unsharded_gradients(self, self.per_objective_grads)
        cpu_fallback(self, bf16_default_off=False)
        ckpt = self.activation_checkpointing or self.gradient_checkpointing
        if (
            ckpt
            and self.activation_checkpointing_kwargs is None
            and self.gradient_checkpointing_kwargs is None
        ):
            self.activation_checkpointing_kwargs = {"use_reentrant": False}  # LoRA: frozen inputs need it
        super().__post_init__()

    @classmethod
    def upgrade_config(cls, values: dict) -> dict:
        """A config dict written by older versions (``MODPOConfig``) with today's field names.

        ``lr`` -> ``learning_rate``; ``device: "cpu"`` -> ``use_cpu: true`` (other devices: dropped, the
        accelerator decides); ``save_steps: 0`` -> ``save_strategy: "no"`` and ``save_steps: N`` ->
        ``save_strategy: "steps"`` (when the file has no ``save_strategy``).
        """
        v = dict(values)
        if "lr" in v:
            lr = v.pop("lr")
            v.setdefault("learning_rate", lr)
        if "device" in v:
            if str(v.pop("device") or "").startswith("cpu"):
                v["use_cpu"] = True
        if "save_steps" in v and "save_strategy" not in v:
            if v["save_steps"]:
                v["save_strategy"] = "steps"
            else:
                v.pop("save_steps")
                v["save_strategy"] = "no"
        return v

    def objective_specs(self):
        """Parsed ``--objective`` values (:class:`~moalign.training.mo_data.ObjectiveSpec`)."""
        from moalign.training.mo_data import parse_objective_spec

        return [parse_objective_spec(s) for s in flatten_specs(self.objective)]

    def validate(self) -> None:
        """Raise :class:`MoalignError` naming the first bad setting."""
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
        COMBINERS.canonical(self.combiner)  # one line naming the registered combiners
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
            (
                not self.remove_unused_columns,
                "remove_unused_columns must be False for multi-objective batches",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise MoalignError(msg)
        check_lora_args(self)
        check_unsharded_gradients(self, self.per_objective_grads)

    def make_combiner(self, n_objectives: int):
        """The configured :class:`~moalign.training.combiners.Combiner`, from the combiner registry: each
        combiner takes the settings its factory names (``weights`` <- ``--combiner-weights``, ``eta`` <-
        ``--groupdro-eta``, ``seed``, ``reduction`` <- ``--pcgrad-reduction``)."""
        from moalign.training.combiners import combiner_from_settings

        if self.combiner_weights is not None and len(self.combiner_weights) != n_objectives:
            raise MoalignError(
                f"--combiner-weights has {len(self.combiner_weights)} values for {n_objectives} objectives"
            )
        settings = {
            "weights": list(self.combiner_weights) if self.combiner_weights is not None else None,
            "eta": self.groupdro_eta,
            "seed": int(self.seed),
            "reduction": self.pcgrad_reduction,
        }
        return combiner_from_settings(self.combiner, settings)


# --------------------------------------------------------------------------------------------- data
def load_objective_data(cfg: MultiObjectiveDPOConfig) -> dict[str, tuple[list, list]]:
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


class _CombinerStateCallback(TrainerCallback):
    """Saves the combiner's state (groupdro weights, pcgrad RNG) into every checkpoint folder."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir() and self.trainer.is_world_process_zero():
            torch.save(self.trainer.combiner.state_dict(), ckpt / "combiner_state.pt")
        return control


class MultiObjectiveDPOTrainer(Trainer):
    """transformers ``Trainer`` whose training step combines K per-objective DPO gradients.

    ``args``: a :class:`MultiObjectiveDPOConfig` (or any ``TrainingArguments`` with
    ``remove_unused_columns=False``). ``train_dataset``/``data_collator``:
    :class:`~moalign.training.mo_data.MultiObjectiveDataset` and
    :class:`~moalign.training.mo_data.MultiObjectiveCollator` (one sub-batch per objective). The combined
    direction is written into ``.grad``; the Trainer does the rest. Per-step statistics go to :meth:`log`
    (every integration, ``trainer_state.json``) and to ``combiner_log.jsonl``. Under DDP the K gradients,
    losses and reward statistics are averaged over processes before the combiner (see the module docstring).
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
        check_unsharded_gradients(self.args, per_objective_grads)
        if per_objective_grads and self.accelerator.distributed_type.value in ("DEEPSPEED", "FSDP"):
            raise MoalignError(
                f"{self.accelerator.distributed_type.value}: per-objective gradients need whole gradients: use DDP "
                "(accelerate launch without DeepSpeed/FSDP), or --no-per-objective-grads with linear/groupdro"
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

    # ------------------------------------------------------------------ several processes
    @property
    def _world(self) -> int:
        return int(self.accelerator.num_processes)

    def _mean_over_processes(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of a small tensor over processes (identity with one process); returned on the CPU, float64."""
        if self._world <= 1:
            return values.double().cpu()
        t = values.detach().to(self.args.device, torch.float64).clone()
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return (t / self._world).cpu()

    def _all_reduce_grads(self, acc: list[torch.Tensor | None], params) -> list[torch.Tensor]:
        """One objective's gradient averaged over processes: flattened into one buffer, one all-reduce.

        Every process holds the gradient of the mean loss over its own (equal-sized) share of the global batch,
        so the mean over processes is the gradient of the global batch's mean loss.
        """
        sizes = [p.numel() for p in params]
        flat = torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(acc, params)]
        )
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat.div_(self._world)
        return [t.view_as(p) for t, p in zip(torch.split(flat, sizes), params)]

    def _mean_metrics(self) -> dict[str, list[float]]:
        if not self._acc_metrics:
            return {}
        keys = sorted(self._acc_metrics)
        vals = self._mean_over_processes(
            torch.tensor([self._acc_metrics[k] for k in keys], dtype=torch.float64)
        )
        return {k: [float(v) for v in vals[i]] for i, k in enumerate(keys)}

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
            # one backward pass of sum_k alpha_k L_k; alpha from the K losses averaged over processes, so every
            # process uses the same alpha and DDP's gradient averaging gives the global batch's combination
            losses = []
            with self.compute_loss_context_manager():
                for k, n in enumerate(names):
                    loss_k, m = self.objective_loss(model, inputs["objectives"][n])
                    losses.append(loss_k)
                    self._record_metrics(k, m)
            lvec = torch.stack([lk.detach() for lk in losses])
            alpha, stats = self.combiner.weights_and_stats(self._mean_over_processes(lvec))
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
        """Combine the K accumulated gradients and write ``d = sum_k alpha_k g_k`` into ``.grad``.

        With several processes the K gradients and losses are first averaged over processes, so the Gram
        matrix, ``alpha`` and ``d`` are those of the global batch, identical on every process.
        """
        acc, losses = self._acc, self._acc_loss
        if self._world > 1:
            for k in range(len(acc)):
                acc[k] = self._all_reduce_grads(acc[k], params)
            losses = self._mean_over_processes(losses)
        gram = gram_matrix(acc)
        alpha, stats = self.combiner.weights_and_stats(losses, gram)
        for i, p in enumerate(params):
            d = apply_weights(alpha, [[acc[k][i]] for k in range(len(acc))])[0]
            for k in range(len(acc)):
                acc[k][i] = None  # free as we go (one process): never more than K gradient copies
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
        for key, vals in self._mean_metrics().items():
            stats[key] = vals
        self._acc_metrics = {}
        self.last_stats = stats
        flat = _flatten_stats(self.objective_names, stats)
        self._pending.append(flat)
        if self.combiner_log is not None and self.is_world_process_zero():
            row = {"step": self.state.global_step + 1, "objectives": self.objective_names, **stats}
            with open(self.combiner_log, "a") as f:
                f.write(json.dumps(row, default=json_default) + "\n")

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
        if resume_from_checkpoint is True:  # transformers' own spelling of "the latest checkpoint"
            resume_from_checkpoint = RESUME_LAST
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if resume_from_checkpoint:
            ckpt = Path(resume_from_checkpoint)
            if not ckpt.is_dir():
                raise MoalignError(f"checkpoint folder not found: {ckpt}")
            state_file = ckpt / "combiner_state.pt"
            if state_file.exists():
                self.combiner.load_state_dict(torch.load(state_file, weights_only=False))
            step = json.loads((ckpt / "trainer_state.json").read_text()).get("global_step", 0)
            if self.combiner_log is not None and self.combiner_log.exists() and self.is_world_process_zero():
                rows = [r for r in self.combiner_log.read_text().splitlines() if r.strip()]
                keep = [r for r in rows if json.loads(r).get("step", 0) <= step]
                self.combiner_log.write_text("".join(r + "\n" for r in keep))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


# --------------------------------------------------------------------------------------- entry point
@dataclass
class MultiObjectiveDPORun:
    """Everything :func:`build_trainer` sets up (the trainer, the model, the data)."""

    trainer: Any
    model: Any
    tokenizer: Any
    ref_model: Any
    data: dict[str, tuple[list, list]]
    config: MultiObjectiveDPOConfig


def build_trainer(
    cfg: MultiObjectiveDPOConfig, *, model=None, tokenizer=None, ref_model=None, data=None, tokenized=None
) -> MultiObjectiveDPORun:
    """Load data and policy, wrap LoRA, tokenise, and construct the :class:`MultiObjectiveDPOTrainer`.

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
        extra = {}
        if cfg.lora_last_layers is not None:
            extra = dict(
                target_modules=_lora_targets(model, list(cfg.lora_target_modules), cfg.lora_last_layers),
                layers_to_transform=_last_layers(model, cfg.lora_last_layers),
            )
        model = apply_lora(model, cfg, **extra)
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
    trainer = MultiObjectiveDPOTrainer(
        model=model,
        args=cfg,
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
    return MultiObjectiveDPORun(trainer, model, tokenizer, ref_model, data, cfg)


def _lora_targets(model, targets: list[str], last_layers: int | None):
    """peft ``target_modules``: "all-linear" as is, or (peft refuses the string together with
    ``layers_to_transform``) the names of every linear layer except the output head."""
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


def train_dpo(cfg: MultiObjectiveDPOConfig) -> dict:
    """Train (or resume), save adapter/model + tokenizer + config, return a JSON-able summary.

    Under ``accelerate launch`` every process runs this; only the main process writes the files.
    """

    run = build_trainer(cfg)
    trainer, names = run.trainer, list(run.data)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir))
    train_s = time.time() - t0
    trainer.save_model(cfg.output_dir)
    out = Path(cfg.output_dir)
    if trainer.is_world_process_zero():
        name_adapter_base(out, cfg.policy)  # after saving: peft checks the base's files when it saves
    summary: dict[str, Any] = {
        "output_dir": str(out),
        "objectives": names,
        "combiner": trainer.combiner.describe(),
        "global_step": trainer.state.global_step,
        "train_loss": float(result.training_loss),
        "train_seconds": train_s,
        "n_train_pairs": {n: len(tr) for n, (tr, _) in run.data.items()},
        "n_heldout_pairs": {n: len(ho) for n, (_, ho) in run.data.items()},
        "processes": trainer.accelerator.num_processes,
        "last_step": trainer.last_stats,
    }
    if cfg.eval_heldout_pairs > 0:
        summary["heldout"] = {}
        model = trainer.accelerator.unwrap_model(trainer.model)
        for n, (_, held) in run.data.items():
            subset = held[: cfg.eval_heldout_pairs]
            if not subset:
                continue
            m = implicit_reward_margins(
                model,
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
    if trainer.is_world_process_zero():
        write_run_record(
            out / META_FILE, cfg, config_class=type(cfg).__name__, combiner=trainer.combiner.describe(),
            objectives=names, n_train_pairs=summary["n_train_pairs"], processes=trainer.accelerator.num_processes,
            torch_threads=torch.get_num_threads(),
        )  # fmt: skip
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=json_default))
    return summary


# --------------------------------------------------------------------------------- deprecated names
def _legacy_config(**values) -> MultiObjectiveDPOConfig:
    """``MODPOConfig(...)`` of older versions: old field names are mapped (see ``upgrade_config``)."""
    return MultiObjectiveDPOConfig(**MultiObjectiveDPOConfig.upgrade_config(values))


_DEPRECATED = {
    "MODPOConfig": ("MultiObjectiveDPOConfig", lambda: _legacy_config),
    "MODPOTrainer": ("MultiObjectiveDPOTrainer", lambda: MultiObjectiveDPOTrainer),
    "MODPORun": ("MultiObjectiveDPORun", lambda: MultiObjectiveDPORun),
    "get_trainer_class": ("MultiObjectiveDPOTrainer", lambda: lambda: MultiObjectiveDPOTrainer),
}


def __getattr__(name: str):
    if name in _DEPRECATED:
        new, get = _DEPRECATED[name]
        warnings.warn(
            f"moalign.training.dpo.{name} is deprecated; use {new}", DeprecationWarning, stacklevel=2
        )
        return get()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
