"""IAMA (inference-aware meta-alignment) with non-linear GRPO, on TRL's ``GRPOTrainer``.

One policy is trained so that a cheap inference-time operator per criterion -- best-of-N or reward tilting
with that criterion's own reward -- serves every criterion well (spec ``shared/specs/iama.md``). The only
change to GRPO is the reward each completion gets: the first variation of the aggregated objective
``g(R_1[pi], ..., R_C[pi])`` (``moalign.training.nonlinear.nonlinear_rewards``), computed from the whole
group of every prompt. Everything else -- generation (vLLM included), the reference model and KL, the loss
types, LoRA through peft, checkpoints, resume, ``report_to`` -- is TRL's.

Where the transform happens: TRL calls the reward functions per process on the local slice of the
generation batch and gathers the results across processes at the end of ``_calculate_rewards``; one prompt's
``num_generations`` completions may be split across processes. :class:`IAMATrainer` therefore overrides
``_calculate_rewards``, transforms the *gathered* ``[B * M, C]`` rewards (every group is whole there, and
every process computes the same transform), and returns one column per criterion holding
``(dg/dR_i) * r~_i``. TRL then sums the columns with ``reward_weights`` (forced to ones: the criteria's
weights are the aggregator's, ``--weights``), subtracts the group mean and scales (``scale_rewards``).

Checked on TRL 1.16 (the ``_calculate_rewards(inputs, prompts, completions, completion_ids_list)``
signature and its final ``gather``); ``pyproject.toml`` pins the tested range.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import RepeatSampler

from moalign.configbase import config_field as _f
from moalign.configbase import json_default
from moalign.errors import MoalignError
from moalign.objectives.base import Objective, get_objective, move_objectives
from moalign.objectives.normalize import NormStats, resolve_normalization, shipped_norm_stats
from moalign.policies import DEFAULT_POLICY
from moalign.registry import Choices
from moalign.training.base import (
    cpu_fallback,
    leave_process_group,
    name_adapter_base,
    resolve_resume,
    write_run_record,
)
from moalign.training.lora import LoraArguments, check_lora_args, lora_config, quiet_upstream_renames
from moalign.training.nonlinear import (
    AGGREGATORS,
    ESTIMATORS,
    AggregatorSpec,
    CriterionSpec,
    nonlinear_rewards,
    parse_criteria,
)


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    """The standard deviation of the non-NaN entries (TRL's ``nanstd``, unbiased)."""
    from trl.trainer.utils import nanstd

    return nanstd(x)


__all__ = ["IAMAConfig", "IAMATrainer", "ObjectiveReward", "build_iama_trainer", "train_grpo"]

DEFAULT_CRITERIA = ("helpful:bon:4", "harmless:bon:4")


@dataclass
class IAMAConfig(GRPOConfig, LoraArguments):
    """``trl.GRPOConfig`` plus what IAMA needs; every field is a ``moalign train grpo`` flag.

    ``scale_rewards`` defaults to ``"batch"`` here (TRL's default is ``"group"``): the transformed reward is
    a functional gradient whose size differs from group to group on purpose (a prompt whose completions
    barely differ under best-of-N contributes a small step). Dividing by each group's std (``"group"``)
    would inflate exactly those groups and change the direction of the mirror-descent step; one batch-wide
    std keeps the direction and only fixes the step's overall size, so the same learning rate is comparable
    between ``--nonlinear on`` and ``off``. ``"none"`` keeps the raw scale (Dr. GRPO's choice) and is
    allowed too. Without an accelerator ``use_cpu`` is set and ``bf16`` turned off (TRL's default of True fails on CPU).
    """

    policy: str = _f(DEFAULT_POLICY, "policy: bundled name, local folder, .gguf file or hub id")
    prompts: str | None = _f(None, "training prompts: a JSONL/JSON/CSV/TXT file (gzip too) or a hub dataset id")
    prompt_column: str | None = _f(None, "column holding the prompt (default: the first of prompt, messages, chosen, ...)")
    limit: int | None = _f(None, "use at most this many prompts")
    skip_invalid: bool = _f(False, "skip records that give no prompt (counted) instead of stopping at the first")
    criterion: list[str] | None = _f(
        None,
        "a criterion NAME:METHOD:PARAM, repeatable: NAME an objective (rm:PATH included), METHOD bon (PARAM = N) "
        "or tilt (PARAM = tau); default helpful:bon:4 harmless:bon:4",
        action="append",
    )
    aggregate: str = _f("sum", "how the criteria's values combine", choices=Choices(AGGREGATORS))
    weights: list[float] | None = _f(None, "weights of the criteria, in --criterion order (default equal)")
    gamma: float | None = _f(None, "smooth-min temperature (aggregate smooth-min)")
    nonlinear: str = _f(
        "on",
        "on: IAMA's transformed reward; off: plain GRPO on the weighted sum of the criteria's rewards",
        choices=["on", "off"],
    )
    normalize: str = _f(
        "auto",
        "z-score each criterion's reward before the transform: auto (statistics shipped for the policy when "
        "they cover the criteria, else none), none, or a stats JSON / run .meta.json",
    )
    objective_device: str | None = _f(
        None, "device of the neural objectives: policy (the policy's) or a torch device (default: their own)"
    )
    gradient_checkpointing: bool | None = _f(
        None, "deprecated alias of --activation-checkpointing (TRL's GRPOConfig turns it on; off here)"
    )
    scale_rewards: str = _f(
        "batch", "reward scaling after group centring: batch (default here, see IAMAConfig), group or none",
        choices=["batch", "group", "none"],
    )
    estimator: str = _f(
        "unbiased",
        "best-of-N estimator from each group of --num-generations completions: unbiased (subsets without "
        "replacement; needs N <= num_generations) or plugin (the group's empirical distribution, biased)",
        choices=list(ESTIMATORS),
    )
    min_ess: float = _f(
        2.0,
        "tilted criteria: warn when a group's effective sample size of the tilting weights falls below this "
        "(below 2 the estimate is the top completion against the rest)",
    )

    def __post_init__(self):
        cpu_fallback(self)  # use_cpu, bf16 off (TRL's default of True fails on CPU), no pinned memory
        if self.output_dir is None:
            raise MoalignError("--output-dir is required (where the trained policy and its log go)")
        crit = self.criterion
        if crit is None:
            crit = list(DEFAULT_CRITERIA)
        flat: list[str] = []
        for c in [crit] if isinstance(crit, str) else crit:
            flat.extend([c] if isinstance(c, str) else list(c))  # `--criterion a b` and repeated flags
        self.criterion = flat
        # the values as given, before TRL/transformers derive others from them (e.g. steps_per_generation):
        # what a run records, so that `--config iama_run.json` rebuilds the same config
        self._given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        super().__post_init__()
        self.validate()

    # the parts of the config this module reads, checked once
    def given_dict(self) -> dict:
        """The config as constructed (JSON-able), before derived fields were filled in."""
        return json.loads(json.dumps(self._given, default=json_default))

    def criteria(self) -> list[CriterionSpec]:
        return parse_criteria(self.criterion)

    def aggregator(self) -> AggregatorSpec:
        w = tuple(float(x) for x in self.weights) if self.weights else None
        try:
            return AggregatorSpec(self.aggregate, weights=w, gamma=self.gamma)
        except (TypeError, ValueError) as e:
            raise MoalignError(str(e)) from None

    def validate(self) -> None:
        specs = self.criteria()
        agg = self.aggregator()
        if agg.kind != "min":
            agg.weight_vector(len(specs))
        elif self.weights:
            raise MoalignError("--weights has no effect with --aggregate min; drop it or use smooth-min")
        if self.nonlinear == "off" and agg.kind != "sum":
            raise MoalignError(
                f"--nonlinear off is plain GRPO on the weighted sum of rewards; --aggregate {agg.kind} needs "
                "--nonlinear on"
            )
        if self.nonlinear == "on" and self.reward_weights is not None:
            raise MoalignError("--reward-weights is TRL's weighting of the summed rewards; with --nonlinear on the "
                               "criteria's weights go inside the transform: use --weights")  # fmt: skip
        if self.nonlinear == "on" and self.multi_objective_aggregation != "sum_then_normalize":
            raise MoalignError(
                "--multi-objective-aggregation must be sum_then_normalize with --nonlinear on: normalising each "
                "criterion's transformed reward separately would undo the aggregator's weights"
            )
        if self.reward_weights is not None and self.weights is not None:
            raise MoalignError("give the criteria's weights once: --weights or TRL's --reward-weights")
        if self.limit is not None and self.limit < 1:
            raise MoalignError(f"--limit must be >= 1, got {self.limit}")
        for c in specs:
            if c.method == "bon" and c.param > self.num_generations:
                raise MoalignError(
                    f"--criterion {c}: best-of-{c.param:g} is estimated from each prompt's group of completions, "
                    f"and --num-generations {self.num_generations} is smaller than N: raise --num-generations to "
                    f"at least {c.param:g} or lower N"
                )
            if c.method == "bon" and c.param > 1 and c.param == self.num_generations and self.estimator == "unbiased":
                raise MoalignError(
                    f"--criterion {c}: with N = --num-generations the unbiased estimate is the group's maximum for "
                    "every completion, which gives no learning signal: raise --num-generations above N (or use "
                    "--estimator plugin)"
                )
        check_lora_args(self)


#: generated tokens per step above which a CPU run is warned about its cost (TRL's defaults: 8 x 512)
CPU_TOKENS_PER_STEP = 1024


def cpu_sized_warning(cfg) -> None:
    """One line before a CPU run with GPU-sized generation settings starts: what a step costs, what is smaller.

    Measured on 2 CPU cores with the bundled 135M policy: 8 completions x 256 tokens took ~3 min and 13 GB a
    step; 8 x 16 about 20 s."""
    per_step = int(cfg.per_device_train_batch_size) * int(cfg.max_completion_length or 0)
    if per_step < CPU_TOKENS_PER_STEP:
        return
    warnings.warn(
        f"train grpo on the CPU generates up to {per_step} tokens a step (--per-device-train-batch-size "
        f"{cfg.per_device_train_batch_size} x --max-completion-length {cfg.max_completion_length}): several "
        "minutes and GBs per step with a 135M policy on 2 cores; --num-generations 4 --per-device-train-batch-size "
        "4 --max-completion-length 32 take seconds",
        stacklevel=3,
    )


class ObjectiveReward:
    """A moalign objective as a TRL reward function: ``f(prompts, completions, **kw) -> list[float]``.

    Conversational prompts (message lists) are rendered to the plain text objectives score
    (:attr:`moalign.data.prompts.Prompt.text`); completions are the assistant's text. With ``stats`` the
    score is z-scored (``(s - mean) / std``) so that criteria on different scales add up meaningfully.
    """

    def __init__(self, objective: Objective, stats: tuple[float, float] | None = None):
        self.objective = objective
        self.stats = stats
        self.__name__ = objective.name  # TRL names the reward column after it

    @staticmethod
    def _prompt_text(p) -> str:
        from moalign.data.prompts import to_prompt

        return to_prompt(list(p) if isinstance(p, list | tuple) else p).text

    @staticmethod
    def _completion_text(c) -> str:
        if isinstance(c, str):
            return c
        if isinstance(c, list | tuple) and c and isinstance(c[-1], dict):
            return str(c[-1].get("content", ""))
        raise MoalignError(f"cannot read a completion of type {type(c).__name__}")

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        texts = [self._prompt_text(p) for p in prompts]
        responses = [self._completion_text(c) for c in completions]
        scores = self.objective.score(texts, responses).to(torch.float64)
        if self.stats is not None:
            mean, std = self.stats
            scores = (scores - mean) / std
        return scores.tolist()


def _norm_stats(cfg: IAMAConfig, names: list[str]) -> NormStats | None:
    def auto() -> NormStats | None:  # the policy's shipped statistics when they cover every criterion
        stats = shipped_norm_stats(cfg.policy)
        return stats if stats is not None and all(n in stats.names for n in names) else None

    return resolve_normalization(cfg.normalize, names, auto)


def reward_functions(
    cfg: IAMAConfig, objectives: Sequence[Objective] | None = None, policy_device=None
) -> tuple[list[ObjectiveReward], NormStats | None]:
    """One TRL reward function per criterion (in ``--criterion`` order), z-scored when statistics exist."""
    specs = cfg.criteria()
    if objectives is None:
        objs = [get_objective(s.name) for s in specs]
    else:
        by_name = {o.name: o for o in objectives}
        missing = [s.name for s in specs if s.name not in by_name]
        if missing:
            raise MoalignError(f"no objective given for criteria {missing}")
        objs = [by_name[s.name] for s in specs]
    if cfg.objective_device:
        move_objectives(objs, cfg.objective_device, policy_device)
    stats = _norm_stats(cfg, [s.name for s in specs])
    fns = []
    for s, o in zip(specs, objs):
        st = None
        if stats is not None:
            i = stats.names.index(s.name)
            st = (float(stats.mean[i]), float(stats.std[i]))
        fns.append(ObjectiveReward(o, st))
    return fns, stats


_HOOK_PARAMS = ["self", "inputs", "prompts", "completions", "completion_ids_list"]


def _check_trl_hook() -> None:
    """The transform relies on TRL's ``_calculate_rewards`` (checked on TRL 1.16): refuse another shape."""
    import inspect

    import trl

    hook = getattr(GRPOTrainer, "_calculate_rewards", None)
    params = list(inspect.signature(hook).parameters) if hook is not None else None
    if params != _HOOK_PARAMS:
        raise MoalignError(
            f"IAMATrainer needs TRL's GRPOTrainer._calculate_rewards{tuple(_HOOK_PARAMS[1:])} (TRL 1.16); "
            f"TRL {trl.__version__} has {params}: pip install 'trl>=1.16,<1.17'"
        )


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's ``RepeatSampler`` whose shuffle is a function of ``(seed, epoch)``.

    TRL's sampler draws each epoch's permutation from one generator seeded once, so a run resumed after an
    epoch boundary (the Trainer skips finished epochs without iterating them) replays epoch 0's order and
    ends somewhere else than the uninterrupted run. The Trainer calls ``set_epoch`` at every epoch, resumed
    or not; reseeding there makes the order the same either way.
    """

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(int(self.seed) + int(epoch))


class IAMATrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose rewards are IAMA's transformed rewards (``args.nonlinear == "on"``).

    With ``nonlinear == "off"`` it is GRPO on ``sum_i w_i r_i`` (the same reward functions, TRL's
    ``reward_weights`` set to ``--weights``, or TRL's own ``--reward-weights`` and
    ``--multi-objective-aggregation`` passed through unchanged, e.g. ``normalize_then_sum``: GDPO), so the two
    differ only in the transform. Per step the log holds, for each criterion, the raw reward under TRL's names
    (``rewards/NAME/mean`` and ``/std``, as in a plain TRL run, and ``iama/NAME/reward``), the transformed
    reward's mean and std (``iama/NAME/transformed``, ``iama/NAME/transformed_std``), the estimated value after
    the operator (``iama/NAME/value``, e.g. the best-of-N expectation) and the aggregator's weight
    (``iama/NAME/weight``), plus ``iama/aggregate``; TRL's ``reward`` is the mean of the summed columns the
    trainer returned (the transformed reward with ``--nonlinear on``). Tilted criteria
    also log the groups' effective sample size (``iama/NAME/ess_mean``, ``iama/NAME/ess_min``); the first
    step where a group's falls below ``--min-ess`` warns once.
    """

    def __init__(self, *args, **kwargs):
        _check_trl_hook()
        super().__init__(*args, **kwargs)
        cfg: IAMAConfig = self.args
        self.criteria = cfg.criteria()
        self.aggregator_spec = cfg.aggregator()
        if len(self.criteria) != len(self.reward_funcs):
            raise MoalignError(
                f"{len(self.criteria)} criteria but {len(self.reward_funcs)} reward functions were given"
            )
        c = len(self.criteria)
        if cfg.nonlinear == "on":
            w = torch.ones(c)  # the aggregator's weights are applied inside the transform
        elif cfg.reward_weights is not None:
            w = self.reward_weights  # TRL's --reward-weights, as TRL set them
        else:
            w = torch.as_tensor(self.aggregator_spec.weight_vector(c), dtype=torch.float32)
        self.reward_weights = w.to(self.reward_weights.device)
        self.last_raw = None  # the latest batch's gathered rewards [B * M, C] (for inspection and tests)
        self.last_nonlinear = None  # and their NonlinearRewards

    def _get_train_sampler(self, dataset=None):
        sampler = super()._get_train_sampler(dataset)
        if type(sampler) is RepeatSampler:
            sampler = EpochSeededRepeatSampler(
                data_source=sampler.data_source, mini_repeat_count=sampler.mini_repeat_count,
                batch_size=sampler.batch_size, repeat_count=sampler.repeat_count, shuffle=sampler.shuffle,
                seed=sampler.seed,
            )  # fmt: skip
        return sampler

    def _generate_and_score_completions(self, *args, **kwargs):
        out = super()._generate_and_score_completions(*args, **kwargs)
        if self.args.nonlinear == "on" and self.last_raw is not None:
            # TRL logged the columns it was handed (the transformed rewards) under its per-reward names; those
            # names carry the raw reward, as in a plain TRL run, and the transformed one has its own
            metrics = self._metrics["train" if self.model.training else "eval"]
            for i, name in enumerate(self.reward_func_names):
                for stat, value in (("mean", torch.nanmean(self.last_raw[:, i])),
                                    ("std", _nanstd(self.last_raw[:, i]))):  # fmt: skip
                    if metrics[f"rewards/{name}/{stat}"]:
                        metrics[f"rewards/{name}/{stat}"][-1] = float(value)
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        raw = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)  # gathered
        self.last_raw = raw.detach()
        mode = "train" if self.model.training else "eval"
        m = self.num_generations if mode == "train" else (self.num_generations_eval or self.num_generations)
        c = raw.shape[1]
        if raw.shape[0] % m:
            raise MoalignError(f"{raw.shape[0]} rewards do not split into whole groups of {m} completions")
        if torch.isnan(raw).any():
            bad = int(torch.isnan(raw).any(dim=1).nonzero()[0])
            raise MoalignError(f"criterion reward is NaN for completion {bad} of the batch")
        metrics = self._metrics[mode]
        for i, spec in enumerate(self.criteria):
            metrics[f"iama/{spec.name}/reward"].append(float(raw[:, i].mean()))
        if self.args.nonlinear != "on":
            return raw
        nl = nonlinear_rewards(raw.view(-1, m, c).double(), self.criteria, self.aggregator_spec,
                               estimator=self.args.estimator)  # fmt: skip
        self.last_nonlinear = nl
        for spec in self.criteria:
            if spec.method != "tilt":
                continue
            lo = nl.stats[f"{spec.name}/ess_min"]
            metrics[f"iama/{spec.name}/ess_mean"].append(nl.stats[f"{spec.name}/ess_mean"])
            metrics[f"iama/{spec.name}/ess_min"].append(lo)
            if lo < self.args.min_ess and not getattr(self, "_warned_ess", False):
                self._warned_ess = True
                warnings.warn(
                    f"criterion {spec}: a group's tilting weights have an effective sample size of {lo:.2f} "
                    f"(< --min-ess {self.args.min_ess:g}): at this tau the transformed reward is the top "
                    "completion against the rest; raise tau or --num-generations (logged as iama/NAME/ess_min)",
                    stacklevel=2,
                )
        out = (nl.per_criterion * nl.weights.to(nl.per_criterion)).reshape(-1, c).to(raw.dtype)
        for i, spec in enumerate(self.criteria):
            metrics[f"iama/{spec.name}/transformed"].append(float(nl.per_criterion[..., i].mean()))
            metrics[f"iama/{spec.name}/transformed_std"].append(float(nl.per_criterion[..., i].std()))
            metrics[f"iama/{spec.name}/value"].append(float(nl.values[i]))
            metrics[f"iama/{spec.name}/weight"].append(float(nl.weights[i]))
        metrics["iama/aggregate"].append(float(nl.aggregate))
        return out


def prompt_dataset(cfg: IAMAConfig):
    """A ``datasets.Dataset`` with a conversational ``prompt`` column (and ``prompt_id``)."""
    from datasets import Dataset

    from moalign.data.prompts import load_prompts

    if not cfg.prompts:
        raise MoalignError("--prompts is required (a prompts file, e.g. ../shared/data/hh-helpful-base-test.jsonl.gz)")
    report: dict = {}
    prompts = load_prompts(
        cfg.prompts, column=cfg.prompt_column, limit=cfg.limit, skip_invalid=cfg.skip_invalid, report=report
    )
    rows = [{"prompt": [dict(m) for m in p.messages], "prompt_id": str(p.id)} for p in prompts]
    return Dataset.from_list(rows), report


def build_iama_trainer(
    cfg: IAMAConfig,
    objectives: Sequence[Objective] | None = None,
    policy=None,
    train_dataset=None,
) -> IAMATrainer:
    """The trainer for ``cfg`` (policy loaded from ``cfg.policy`` unless given; objectives resolved from the
    criteria's names unless given as :class:`Objective` objects named like the criteria)."""
    from moalign.policies import default_device, load_policy

    if cfg.use_cpu:
        cpu_sized_warning(cfg)
    if train_dataset is None:
        train_dataset, _ = prompt_dataset(cfg)
    if policy is None:
        device = "cpu" if cfg.use_cpu else default_device()
        policy = load_policy(cfg.policy, device=device)
    funcs, stats = reward_functions(cfg, objectives, policy_device=policy.device)
    model = policy.model
    model.train()
    with quiet_upstream_renames():  # TRL wraps the model with peft here
        trainer = IAMATrainer(
            model=model,
            reward_funcs=funcs,
            args=cfg,
            train_dataset=train_dataset,
            processing_class=policy.tokenizer,
            peft_config=lora_config(cfg),
        )
    trainer.norm_stats = stats
    return trainer


def train_grpo(cfg: IAMAConfig, objectives: Sequence[Objective] | None = None) -> dict:
    """Train with non-linear GRPO (or plain GRPO with ``nonlinear="off"``); save the policy and a run record.

    Writes to ``cfg.output_dir``: the trained model (or LoRA adapter, loadable by name with
    ``--policy OUTPUT_DIR``), TRL's checkpoints, and ``iama_run.json`` (config, seed, policy, criteria,
    normalisation, versions, the per-step log). ``resume_from_checkpoint`` (a path, or ``last``) resumes.
    """
    t0 = time.perf_counter()
    dataset, report = prompt_dataset(cfg)
    trainer = build_iama_trainer(cfg, objectives, train_dataset=dataset)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_upstream_renames():
        trainer.train(resume_from_checkpoint=resolve_resume(cfg.resume_from_checkpoint, out))
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        name_adapter_base(out, cfg.policy)
    stats = trainer.norm_stats
    history = trainer.state.log_history
    result = {
        "output_dir": str(out),
        "kind": "lora" if cfg.use_lora else "full",
        "nonlinear": cfg.nonlinear,
        "criteria": [asdict(c) for c in cfg.criteria()],
        "aggregate": asdict(cfg.aggregator()),
        "steps": trainer.state.global_step,
        "prompts": len(dataset),
        "prompts_skipped": report.get("skipped", 0),
        "normalisation": stats.to_dict() if stats is not None else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if trainer.is_world_process_zero():
        write_run_record(
            out / "iama_run.json", cfg.given_dict(), result=result, policy=cfg.policy, log_history=history
        )
    leave_process_group(trainer)
    return result
