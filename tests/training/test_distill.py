"""Distilled RMOD: SFT on run records lowers the completion NLL (measured independently of TRL), and the result
loads with ``load_policy`` (LoRA adapter merged onto its named base, or a full model) and generates."""

from __future__ import annotations

import json

import pytest

from moalign.decoding.backend import SamplingConfig
from moalign.decoding.in_process import TransformersBackend
from moalign.errors import MoalignError
from moalign.policies import load_policy, render_chat
from moalign.training.distill import (
    DistillConfig,
    build_dataset,
    completion_nll,
    load_distill_records,
    resolve_system_prompt,
    train_distill,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _write_run(path, n=6, method="rmod", system_prompt=None, response="The answer is always forty two."):
    recs = [
        {"record_id": str(i), "prompt": f"Question {i}?", "messages": [{"role": "user", "content": f"Question {i}?"}],
         "response": response, "method": method, "scores": {"x": 0.0}, "config": {"system_prompt": system_prompt}}
        for i in range(n)
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path


@pytest.mark.parametrize("lora", [True, False])
def test_distill_lowers_loss_and_loads(tiny_policy_dir, tmp_path, lora):
    run = _write_run(tmp_path / "run.jsonl")
    out = tmp_path / "distilled"
    cfg = DistillConfig(inputs=[str(run)], output_dir=str(out), policy=str(tiny_policy_dir), use_lora=lora,
                        max_steps=8, learning_rate=1e-2 if lora else 1e-3, per_device_train_batch_size=3,
                        seed=0)  # fmt: skip
    res = train_distill(cfg)
    assert res["kind"] == ("lora" if lora else "full") and res["steps"] == 8
    assert res["train_loss"]["last"] < res["train_loss"]["first"]

    records, _ = load_distill_records(cfg)
    before = completion_nll(load_policy(str(tiny_policy_dir)), records)
    tuned = load_policy(str(out))
    after = completion_nll(tuned, records)
    assert after < before - 0.3, (before, after)
    # TRL's first logged loss is the same completion-only NLL as ours, on its first batch
    assert res["train_loss"]["first"] == pytest.approx(before, rel=0.02)

    if lora:
        adapter = json.loads((out / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str(tiny_policy_dir)
        assert not (out / "model.safetensors").exists()
    meta = json.loads((out / "distill_config.json").read_text())
    assert meta["seed"] == 0 and "torch" in meta["versions"] and meta["data"]["methods"] == {"rmod": 6}
    assert not (out / "trainer").exists()

    eng = TransformersBackend(tuned, SamplingConfig(temperature=0))
    from moalign.data.prompts import to_prompt

    r = eng.decode([to_prompt("Question 1?")], k=1, block_size=4, max_new_tokens=4)[0]
    assert len(r.token_ids) >= 1


def test_records_and_system_prompt(tmp_path, policy_tokenizer_dir):
    from transformers import AutoTokenizer

    a = _write_run(tmp_path / "a.jsonl", n=2, system_prompt="Be brief.")
    b = _write_run(tmp_path / "b.jsonl", n=3, method="cd")
    cfg = DistillConfig(inputs=[str(a)], output_dir=str(tmp_path / "o"))
    records, summary = load_distill_records(cfg)
    assert (
        summary["records"] == 2 and resolve_system_prompt(cfg, summary["run_system_prompts"]) == "Be brief."
    )
    tok = AutoTokenizer.from_pretrained(policy_tokenizer_dir)
    ds = build_dataset(records, tok, "Be brief.")
    assert (
        ds[0]["prompt"] == render_chat(tok, records[0]["messages"], "Be brief.")
        and "Be brief." in ds[0]["prompt"]
    )
    assert ds[0]["completion"] == "The answer is always forty two."

    both = DistillConfig(inputs=[str(a), str(b)], output_dir=str(tmp_path / "o"))
    _, s2 = load_distill_records(both)
    assert s2["methods"] == {"rmod": 2, "cd": 3}
    with pytest.raises(MoalignError, match="system prompts"):
        resolve_system_prompt(both, s2["run_system_prompts"])
    both.system_prompt = "Override."
    assert resolve_system_prompt(both, s2["run_system_prompts"]) == "Override."
    only = DistillConfig(inputs=[str(a), str(b)], output_dir=str(tmp_path / "o"), methods="cd")
    assert load_distill_records(only)[1]["records"] == 3


def test_bad_inputs(tmp_path):
    run = _write_run(tmp_path / "run.jsonl", n=2)
    with pytest.raises(MoalignError, match="output-dir"):
        train_distill(DistillConfig(inputs=[str(run)], output_dir=""))
    with pytest.raises(MoalignError, match="inputs"):
        train_distill(DistillConfig(inputs=[], output_dir=str(tmp_path / "o")))
    with pytest.raises(MoalignError, match="not found"):
        train_distill(DistillConfig(inputs=[str(tmp_path / "missing.jsonl")], output_dir=str(tmp_path / "o")))
    with pytest.raises(MoalignError, match="no records"):
        load_distill_records(DistillConfig(inputs=[str(run)], output_dir="o", methods="best-of-n"))
    with pytest.raises(MoalignError, match="lora-r"):
        DistillConfig(inputs=[str(run)], output_dir="o", lora_r=0).validate()
    with pytest.raises(MoalignError, match="lora-dropout"):
        DistillConfig(inputs=[str(run)], output_dir="o", lora_dropout=1.5)


def test_config_is_an_sft_config_with_the_shared_lora_flags(tmp_path, run_cli):
    """Same LoRA flags as every trainer; CPU without setting anything; old flag names in config files."""
    from trl import SFTConfig

    from moalign.cli import build_parser, config_from_args
    from moalign.training.lora import LoraArguments

    cfg = DistillConfig(inputs=["x.jsonl"], output_dir=str(tmp_path / "o"))
    assert isinstance(cfg, SFTConfig) and isinstance(cfg, LoraArguments)
    assert cfg.use_lora and cfg.lora_r == 16 and cfg.learning_rate == 2e-4 and cfg.completion_only_loss
    assert cfg.max_length == 512 and not cfg.activation_checkpointing
    assert DistillConfig(inputs=["x"], output_dir="o", use_lora=False).learning_rate == 2e-5
    import torch

    if not torch.cuda.is_available():
        assert cfg.use_cpu and cfg.bf16 is False
    args = build_parser().parse_args(["train", "distill", "--inputs", "a.jsonl", "b.jsonl", "--output-dir",
                                      str(tmp_path), "--lora-r", "4", "--lora-alpha", "32", "--lora-target-modules",
                                      "q_proj", "v_proj", "--max-steps", "3"])  # fmt: skip
    cfg = config_from_args(DistillConfig, args)
    assert cfg.inputs == ["a.jsonl", "b.jsonl"] and cfg.max_steps == 3
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules) == (4, 32, ["q_proj", "v_proj"])
    # an old distill_config.json (lora/lr/epochs/batch_size/device) still loads; flags override it
    old = tmp_path / "distill_config.json"
    old.write_text(json.dumps({"config": {"inputs": ["r.jsonl"], "output_dir": str(tmp_path / "d"), "lora": False,
                                          "lr": 1e-3, "epochs": 2.0, "batch_size": 2, "device": "cpu"}}))  # fmt: skip
    cfg = config_from_args(DistillConfig, build_parser().parse_args(["train", "distill", "--config", str(old),
                                                                     "--per-device-train-batch-size", "5"]))  # fmt: skip
    assert not cfg.use_lora and cfg.learning_rate == 1e-3 and cfg.num_train_epochs == 2.0 and cfg.use_cpu
    assert cfg.per_device_train_batch_size == 5 and cfg.inputs == ["r.jsonl"]
    code, _, err = run_cli("train", "distill", "--inputs", "a.jsonl")
    assert code == 2 and err.startswith("moalign: error:") and "--output" in err and err.count("\n") == 1


@pytest.mark.real
def test_real_policy_lora_distill(tmp_path):
    """LoRA on the bundled policy: the adapter names the bundled policy and load_policy merges it."""
    run = _write_run(tmp_path / "run.jsonl", n=4, response="Sure! Here is a short, friendly answer.")
    out = tmp_path / "distilled"
    cfg = DistillConfig(inputs=[str(run)], output_dir=str(out), use_lora=True, lora_r=4, max_steps=4,
                        learning_rate=2e-3, per_device_train_batch_size=2, max_length=128, seed=0)  # fmt: skip
    res = train_distill(cfg)
    assert (
        json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
        == "smollm2-135m-instruct"
    )
    records, _ = load_distill_records(cfg)
    tuned = load_policy(str(out))
    after = completion_nll(tuned, records)
    before = completion_nll(load_policy("smollm2-135m-instruct"), records)
    assert after < before, (before, after, res["train_loss"])
    from moalign.data.prompts import to_prompt

    r = TransformersBackend(tuned, SamplingConfig(temperature=0)).decode(
        [to_prompt("Question 7?")], k=1, block_size=8, max_new_tokens=8
    )[0]
    assert r.response.strip()
