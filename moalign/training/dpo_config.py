"""``MultiObjectiveDPOConfig``: every ``transformers.TrainingArguments`` field, the multi-objective DPO settings
and the shared LoRA flags (one CLI flag per field)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.trainer_utils import SaveStrategy

from moalign.errors import MoalignError
from moalign.registry import Choices
from moalign.training.base import cpu_fallback
from moalign.training.combiners import COMBINERS
from moalign.training.lora import LoraArguments, check_lora_args
from moalign.training.mo_data import flatten_specs
from moalign.training.sharding import check_unsharded_gradients

META_FILE = "dpo_config.json"


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
