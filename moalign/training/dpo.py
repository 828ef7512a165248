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

Layout: the config is :mod:`moalign.training.dpo_config`, the data :mod:`moalign.training.mo_data`, the log-prob
math :mod:`moalign.training.logps`, the DeepSpeed/FSDP checks :mod:`moalign.training.sharding`; this module holds
the trainer and the job; the loss and the combined gradient are :mod:`moalign.training.dpo_loss`.

Renamed (old names still import, with a DeprecationWarning): ``MODPOConfig`` -> :class:`MultiObjectiveDPOConfig`,
``MODPOTrainer`` -> :class:`MultiObjectiveDPOTrainer`, ``MODPORun`` -> :class:`MultiObjectiveDPORun`.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from moalign.arrays import wins
from moalign.configbase import json_default
from moalign.errors import MoalignError
from moalign.training.base import (
    RESUME_LAST,
    leave_process_group,
    name_adapter_base,
    resolve_resume,
    write_run_record,
)
from moalign.training.dpo_config import META_FILE, MultiObjectiveDPOConfig
from moalign.training.dpo_loss import _flatten_stats, dpo_loss, write_combined_gradient
from moalign.training.logps import (
    implicit_reward_margins,
    pad_id,
    policy_logps,
    precompute_reference,
    reference_logps,
    sequence_logps,
)
from moalign.training.lora import apply_lora, last_layers, lora_targets
from moalign.training.mo_data import load_objective_data
from moalign.training.sharding import (
    check_fsdp_per_objective,
    check_unsharded_gradients,
    take_local_grads,
)

__all__ = [  # the trainer, its config and run, and the log-prob helpers older code imported from here
    "META_FILE", "MultiObjectiveDPOConfig", "MultiObjectiveDPORun", "MultiObjectiveDPOTrainer", "build_trainer",
    "dpo_loss", "implicit_reward_margins", "policy_logps", "precompute_reference", "sequence_logps", "train_dpo",
    "write_combined_gradient",
]  # fmt: skip



# ------------------------------------------------------------------------------------------- trainer
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
        objective_names: list[str] | None = None,
        combiner=None,
        beta: float | None = None,
        ref_model=None,
        per_objective_grads: bool | None = None,
        combiner_log: str | os.PathLike | None = None,
        **kwargs,
    ):
        """As TRL's ``DPOTrainer``: ``MultiObjectiveDPOTrainer(model=..., args=MultiObjectiveDPOConfig(...),
        train_dataset={"helpful": pairs, "harmless": pairs}, processing_class=tokenizer)``, where each objective's
        pairs are a ``datasets.Dataset`` (or a list) of preference records (``prompt``/``chosen``/``rejected``,
        chat messages or HH dialogues) or :class:`~moalign.data.pairs.PreferencePair`; they are tokenised with
        the chat template, and the objective names, the combiner (``args.combiner``), ``beta`` and the log come
        from ``args``. Without LoRA (``args.use_lora``) and without ``ref_model``, the reference is a frozen copy
        of ``model``. Built from prepared data (:func:`build_trainer`), every keyword may be given instead."""
        args_ = kwargs.get("args")
        data = kwargs.get("train_dataset")
        if isinstance(data, Mapping):  # objective -> preference pairs: TRL-style construction from ``args``
            kwargs, ref_model = _prepared_from_pairs(kwargs, ref_model)
            objective_names = objective_names or list(data)
        if args_ is None or objective_names is None:
            raise MoalignError("MultiObjectiveDPOTrainer needs args (a MultiObjectiveDPOConfig) and either "
                               "train_dataset={objective: pairs} or objective_names with a prepared dataset")  # fmt: skip
        combiner = combiner if combiner is not None else args_.make_combiner(len(objective_names))
        beta = float(beta if beta is not None else getattr(args_, "beta", 0.1))
        if per_objective_grads is None:
            per_objective_grads = bool(getattr(args_, "per_objective_grads", True))
        if combiner_log is None and isinstance(data, Mapping):
            combiner_log = Path(args_.output_dir) / "combiner_log.jsonl"
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
        kind = self.accelerator.distributed_type.value
        if per_objective_grads and kind == "DEEPSPEED":
            raise MoalignError(
                "DEEPSPEED: per-objective gradients need the combined gradient written before the optimizer step, "
                "which DeepSpeed's engine does inside its own backward: use FSDP (version 2) or DDP, or "
                "--no-per-objective-grads with linear/groupdro"
            )
        # FSDP: each objective's gradient is reduce-scattered into the local shards, the Gram matrix of the
        # shards is all-reduced (exact), and each process writes the combined gradient into its own shards
        self._sharded = per_objective_grads and kind == "FSDP"
        if self._sharded:
            check_fsdp_per_objective(self.model, self.args.gradient_accumulation_steps)
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
        ref = reference_logps(self.accelerator.unwrap_model(model), batch, self.ref_model)
        loss, r_c, r_r = dpo_loss(pol, ref.to(pol.dtype), self.beta)
        acc = wins(r_c, r_r).mean()
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

        # per-objective gradients: bypass DDP's reducer, all-reduce the K gradients by hand at sync time; under
        # FSDP go through the sharded model, whose backward leaves each objective's reduced gradient in the shards
        base = model if self._sharded else self.accelerator.unwrap_model(model)
        params = self._params(base)
        if self._acc is None:
            self._acc = [[None] * len(params) for _ in range(k_obj)]
            self._acc_loss = torch.zeros(k_obj, dtype=torch.float64)
        micro: list[float] = []
        for k, n in enumerate(names):
            with self.compute_loss_context_manager():
                loss_k, m = self.objective_loss(base, inputs["objectives"][n])
            if self._sharded:
                grads = take_local_grads(loss_k / ga, params)
            else:
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
            if not self._sharded:  # FSDP's reduce-scatter has averaged the gradients already
                for k in range(len(acc)):
                    acc[k] = self._all_reduce_grads(acc[k], params)
            losses = self._mean_over_processes(losses)
        stats = write_combined_gradient(acc, losses, params, self.combiner, sharded=self._sharded)
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


def _prepared_from_pairs(kwargs: dict, ref_model):
    """``train_dataset={objective: pairs}`` -> the trainer's tokenised dataset and collator (LoRA applied and
    a frozen reference made as :func:`build_trainer` does)."""
    from moalign.data.pairs import PreferencePair, pairs_from_records
    from moalign.training.mo_data import MultiObjectiveCollator, MultiObjectiveDataset, tokenize_pair

    cfg, model, tok = kwargs["args"], kwargs.get("model"), kwargs.get("processing_class")
    if model is None or tok is None:
        raise MoalignError("MultiObjectiveDPOTrainer(train_dataset={objective: pairs}) needs model and "
                           "processing_class (the tokenizer)")  # fmt: skip
    toks = {}
    for name, pairs in kwargs["train_dataset"].items():
        items = list(pairs)
        if not all(isinstance(p, PreferencePair) for p in items):
            items = pairs_from_records([dict(p) for p in items], source=f"objective {name!r}")
        if not items:
            raise MoalignError(f"objective {name!r}: no preference pairs")
        toks[name] = [tokenize_pair(tok, p, cfg.max_length, cfg.max_prompt_length) for p in items]
    if getattr(cfg, "use_lora", False) and not hasattr(model, "peft_config"):
        model = apply_lora(model, cfg)
    elif ref_model is None and not getattr(cfg, "use_lora", False):
        import copy

        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    if ref_model is not None:
        ref_model.eval().requires_grad_(False)
    model.train()
    if getattr(cfg, "precompute_ref_log_probs", False):
        precompute_reference(model, ref_model, toks, pad_id(tok), cfg.per_device_train_batch_size * 2)
    dataset = MultiObjectiveDataset(toks, seed=cfg.seed)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    return {**kwargs, "model": model, "train_dataset": dataset,
            "data_collator": MultiObjectiveCollator(dataset, pad_id(tok))}, ref_model  # fmt: skip


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
                target_modules=lora_targets(model, list(cfg.lora_target_modules), cfg.lora_last_layers),
                layers_to_transform=last_layers(model, cfg.lora_last_layers),
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
        precompute_reference(model, ref_model, toks, pad_id(tokenizer), cfg.per_device_train_batch_size * 2)
    dataset = MultiObjectiveDataset(toks, seed=cfg.seed)
    collator = MultiObjectiveCollator(dataset, pad_id(tokenizer))
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
        "distributed": trainer.accelerator.distributed_type.value,
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
            correct = wins(m.double(), 0.0).tolist()
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
    leave_process_group(trainer)
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
