"""IAMA / non-linear GRPO on TRL's GRPOTrainer: the trainer feeds TRL the transform of the gathered rewards.

Objectives here are deterministic functions of the text, so every expected value is computed independently
from the completions the trainer saw. The transform's own numerics are checked in tests/training/test_nonlinear.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from moalign.errors import MoalignError
from moalign.objectives.base import CallableObjective

pytestmark = pytest.mark.usefixtures("one_thread")


def _short(prompts, responses):
    return [-len(r) / 10 for r in responses]


def _vowels(prompts, responses):
    return [sum(c in "aeiou" for c in r) / 5 for r in responses]


OBJS = [CallableObjective("short", _short), CallableObjective("vowels", _vowels)]


def _cfg(tmp_path, prompts_file, **kw):
    from moalign.training.grpo import IAMAConfig

    base = dict(
        output_dir=str(tmp_path / "out"), prompts=str(prompts_file), criterion=["short:bon:2", "vowels:bon:2"],
        num_generations=4, per_device_train_batch_size=8, max_completion_length=6, max_steps=1,
        logging_steps=1, report_to="none", save_strategy="no", learning_rate=1e-3, seed=0, disable_tqdm=True,
    )  # fmt: skip
    base.update(kw)
    return IAMAConfig(**base)


def _trainer(tiny_policy_dir, tmp_path, prompts_file, **kw):
    from moalign.training.grpo import build_iama_trainer

    return build_iama_trainer(_cfg(tmp_path, prompts_file, policy=str(tiny_policy_dir), **kw), objectives=OBJS)


def _batch(m=4):
    """Two prompts with ``m`` made-up completions each, laid out as TRL lays out a generation batch."""
    prompts = [[{"role": "user", "content": "Say hi"}]] * m + [[{"role": "user", "content": "Name a color"}]] * m
    texts = ["hi", "hello there", "hey you all", "a", "red", "blue", "ochre yellow", "aquamarine"][: 2 * m]
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    inputs = [{"prompt": p} for p in prompts]
    return inputs, prompts, completions, [[1]] * len(prompts), texts


def test_rewards_handed_to_trl_are_the_transform_of_the_whole_groups(tiny_policy_dir, tmp_path, prompts_file):
    from moalign.training.nonlinear import nonlinear_rewards

    tr = _trainer(tiny_policy_dir, tmp_path, prompts_file, aggregate="min")
    inputs, prompts, completions, ids, texts = _batch()
    out = tr._calculate_rewards(inputs, prompts, completions, ids)
    raw = torch.tensor([_short(None, texts), _vowels(None, texts)], dtype=torch.float64).T  # [B*M, C]
    ref = nonlinear_rewards(raw.view(2, 4, 2), ["short:bon:2", "vowels:bon:2"], "min")
    assert out.shape == (8, 2)
    # TRL sums the columns with reward_weights (ones): the sum is IAMA's reward per completion
    assert torch.equal(tr.reward_weights.cpu(), torch.ones(2))
    torch.testing.assert_close(out.sum(1).double(), ref.rewards.reshape(-1), atol=1e-6, rtol=0)
    # min puts all weight on the criterion with the lower best-of-2 value, and only there
    low = int(torch.argmin(ref.values))
    assert float(out[:, 1 - low].abs().max()) == 0.0 and float(out[:, low].abs().max()) > 0
    # permuting completions inside a group permutes their rewards (groups are contiguous, of size M)
    perm = [3, 2, 1, 0, 4, 5, 6, 7]
    out2 = tr._calculate_rewards([inputs[i] for i in perm], [prompts[i] for i in perm],
                                 [completions[i] for i in perm], ids)  # fmt: skip
    torch.testing.assert_close(out2, out[perm])


def test_bon1_sum_equals_plain_grpo_after_group_centring(tiny_policy_dir, tmp_path, prompts_file):
    crit = ["short:bon:1", "vowels:bon:1"]
    on = _trainer(tiny_policy_dir, tmp_path, prompts_file, criterion=crit, weights=[0.3, 0.7])
    off = _trainer(tiny_policy_dir, tmp_path / "b", prompts_file, criterion=crit, weights=[0.3, 0.7],
                   nonlinear="off")  # fmt: skip
    assert torch.allclose(off.reward_weights.cpu(), torch.tensor([0.3, 0.7]))
    batch = _batch()[:4]
    r_on = on._calculate_rewards(*batch).sum(1)  # weights applied inside the transform
    r_off = (off._calculate_rewards(*batch) * off.reward_weights).sum(1)  # what TRL does with them
    centred = [r.view(2, 4) - r.view(2, 4).mean(1, keepdim=True) for r in (r_on, r_off)]
    torch.testing.assert_close(centred[0], centred[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(r_on, r_off)  # the unbiased best-of-1 estimate is the reward itself


def test_config_refuses_what_would_break_the_transform(tmp_path, prompts_file):
    with pytest.raises(MoalignError, match="--nonlinear on"):
        _cfg(tmp_path, prompts_file, nonlinear="off", aggregate="min")
    with pytest.raises(MoalignError, match="with --nonlinear on the criteria's weights go inside the transform"):
        _cfg(tmp_path, prompts_file, reward_weights=[1.0, 2.0])
    with pytest.raises(MoalignError, match="sum_then_normalize with --nonlinear on"):
        _cfg(tmp_path, prompts_file, multi_objective_aggregation="normalize_then_sum")
    with pytest.raises(MoalignError, match="give the criteria's weights once"):
        _cfg(tmp_path, prompts_file, nonlinear="off", weights=[1.0, 2.0], reward_weights=[1.0, 2.0])
    # plain GRPO takes TRL's own multi-reward settings
    plain = _cfg(tmp_path, prompts_file, nonlinear="off", reward_weights=[1.0, 2.0],
                 multi_objective_aggregation="normalize_then_sum")  # fmt: skip
    assert plain.reward_weights == [1.0, 2.0] and plain.multi_objective_aggregation == "normalize_then_sum"
    with pytest.raises(MoalignError, match="output-dir"):
        _cfg(tmp_path, prompts_file, output_dir=None)
    with pytest.raises(MoalignError, match="bon"):
        _cfg(tmp_path, prompts_file, criterion=["short:best:4"])
    with pytest.raises(MoalignError, match="weights"):
        _cfg(tmp_path, prompts_file, weights=[1.0, 2.0, 3.0])
    with pytest.raises(MoalignError, match="lora-r"):
        _cfg(tmp_path, prompts_file, use_lora=True, lora_r=0)
    # repeated flags and one flag with several values give the same criteria
    a = _cfg(tmp_path, prompts_file, criterion=[["short:bon:2"], ["vowels:tilt:0.5"]])
    assert a.criterion == ["short:bon:2", "vowels:tilt:0.5"]
    # what CPU needs is set without the user asking; the scaling is the documented choice
    if not torch.cuda.is_available():
        assert a.bf16 is False and a.dataloader_pin_memory is False
    assert a.scale_rewards == "batch"


def test_train_logs_raw_transformed_and_weights_and_saves_a_loadable_policy(
    tiny_policy_dir, tmp_path, prompts_file
):
    from moalign.policies import load_policy
    from moalign.training.grpo import train_grpo

    cfg = _cfg(tmp_path, prompts_file, policy=str(tiny_policy_dir), max_steps=2, aggregate="smooth-min", gamma=2.0)
    before = load_policy(str(tiny_policy_dir)).model.state_dict()
    res = train_grpo(cfg, objectives=OBJS)
    assert res["steps"] == 2 and res["nonlinear"] == "on"
    rec = json.loads((tmp_path / "out" / "iama_run.json").read_text())
    assert rec["seed"] == 0 and rec["versions"]["trl"] and rec["config"]["aggregate"] == "smooth-min"
    steps = [h for h in rec["log_history"] if "iama/aggregate" in h]
    assert len(steps) == 2
    for h in steps:
        w = [h["iama/short/weight"], h["iama/vowels/weight"]]
        assert abs(sum(w) - 1) < 1e-6 and min(w) > 0  # smooth-min: softmin weights
        # TRL's logged reward is the mean of what the trainer returned: sum_i w_i * transformed_i
        mix = sum(h[f"iama/{n}/weight"] * h[f"iama/{n}/transformed"] for n in ("short", "vowels"))
        assert abs(h["reward"] - mix) < 1e-4
        assert "iama/short/reward" in h and "iama/short/value" in h
        # TRL's per-reward names carry the raw reward, as in a plain TRL run; the transformed one its own names
        for n in ("short", "vowels"):
            assert abs(h[f"rewards/{n}/mean"] - h[f"iama/{n}/reward"]) < 1e-5
            assert h[f"rewards/{n}/std"] >= 0 and f"iama/{n}/transformed_std" in h
        assert any(abs(h[f"rewards/{n}/mean"] - h[f"iama/{n}/transformed"]) > 1e-3 for n in ("short", "vowels"))
    after = load_policy(str(tmp_path / "out")).model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_plain_grpo_runs_trl_s_gdpo_aggregation_with_its_reward_weights(tiny_policy_dir, tmp_path, prompts_file):
    """``--nonlinear off`` with TRL's ``--reward-weights`` and ``--multi-objective-aggregation
    normalize_then_sum`` (GDPO): TRL's settings as given, the raw rewards logged under TRL's names."""
    from moalign.training.grpo import train_grpo

    cfg = _cfg(tmp_path, prompts_file, policy=str(tiny_policy_dir), nonlinear="off", reward_weights=[0.25, 0.75],
               multi_objective_aggregation="normalize_then_sum")  # fmt: skip
    tr = _trainer(tiny_policy_dir, tmp_path / "t", prompts_file, nonlinear="off", reward_weights=[0.25, 0.75],
                  multi_objective_aggregation="normalize_then_sum")  # fmt: skip
    assert torch.allclose(tr.reward_weights.cpu(), torch.tensor([0.25, 0.75]))
    assert tr.multi_objective_aggregation == "normalize_then_sum"
    res = train_grpo(cfg, objectives=OBJS)
    assert res["steps"] == 1 and res["nonlinear"] == "off"
    rec = json.loads((tmp_path / "out" / "iama_run.json").read_text())
    h = next(h for h in rec["log_history"] if "rewards/short/mean" in h)
    assert abs(h["rewards/short/mean"] - h["iama/short/reward"]) < 1e-5 and "iama/aggregate" not in h
    assert rec["config"]["multi_objective_aggregation"] == "normalize_then_sum"


def test_lora_run_saves_an_adapter_that_loads_by_path(tiny_policy_dir, tmp_path, prompts_file):
    from moalign.policies import load_policy
    from moalign.training.grpo import train_grpo

    cfg = _cfg(tmp_path, prompts_file, policy=str(tiny_policy_dir), use_lora=True, lora_r=4)
    res = train_grpo(cfg, objectives=OBJS)
    assert res["kind"] == "lora"
    ac = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert ac["base_model_name_or_path"] == str(tiny_policy_dir) and ac["r"] == 4
    assert load_policy(str(tmp_path / "out")).model is not None


def test_resumed_run_ends_where_the_uninterrupted_one_does(tiny_policy_dir, tmp_path, prompts_file):
    import shutil

    from moalign.policies import load_policy
    from moalign.training.grpo import train_grpo

    kw = dict(policy=str(tiny_policy_dir), max_steps=4, save_strategy="steps", save_steps=2)
    train_grpo(_cfg(tmp_path / "a", prompts_file, **kw), objectives=OBJS)
    # an interrupted run: only its step-2 checkpoint exists; resuming with `last` finishes it
    (tmp_path / "b" / "out").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "out" / "checkpoint-2", tmp_path / "b" / "out" / "checkpoint-2")
    res = train_grpo(_cfg(tmp_path / "b", prompts_file, resume_from_checkpoint="last", **kw), objectives=OBJS)
    assert res["steps"] == 4
    a = load_policy(str(tmp_path / "a" / "out")).model.state_dict()
    b = load_policy(str(tmp_path / "b" / "out")).model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.real
def test_real_policy_and_shipped_reward_models_one_lora_step(shared_data, tmp_path):
    from moalign.data.prompts import load_prompts
    from moalign.training.grpo import train_grpo

    # the two shortest of the first 60 real HH prompts: the step's forward and backward cost scales with length
    real = load_prompts(str(shared_data / "hh-helpful-base-test.jsonl.gz"), limit=60, skip_invalid=True)
    short = sorted(real, key=lambda p: len(p.text))[:2]
    prompts = tmp_path / "short.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p.text}) + "\n" for p in short))
    cfg = _cfg(tmp_path, prompts, criterion=["helpful:bon:2", "harmless:bon:2"], use_lora=True, lora_r=4,
               max_completion_length=8)  # fmt: skip
    res = train_grpo(cfg)
    assert res["steps"] == 1 and res["kind"] == "lora"
    assert res["normalisation"] is not None  # z-scored with the statistics shipped for the bundled policy
    rec = json.loads((tmp_path / "out" / "iama_run.json").read_text())
    h = next(h for h in rec["log_history"] if "iama/aggregate" in h)
    assert {"iama/helpful/reward", "iama/harmless/transformed", "iama/helpful/weight"} <= set(h)


def test_cli_train_grpo_and_config_file_reproduce_the_run(tiny_policy_dir, tmp_path, prompts_file, run_cli):
    from moalign.objectives.base import register_objective

    register_objective("short", lambda: OBJS[0])
    register_objective("vowels", lambda: OBJS[1])
    argv = ["train", "grpo", "--policy", tiny_policy_dir, "--prompts", prompts_file, "--criterion", "short:bon:2",
            "--criterion", "vowels:tilt:0.5", "--aggregate", "smooth-min", "--gamma", "3", "--max-steps", "1",
            "--num-generations", "4", "--per-device-train-batch-size", "8", "--max-completion-length", "6",
            "--report-to", "none", "--save-strategy", "no", "--seed", "3"]  # fmt: skip
    code, out, err = run_cli(*argv, "--output-dir", tmp_path / "a")
    assert code == 0, err
    a = json.loads((tmp_path / "a" / "iama_run.json").read_text())
    assert a["config"]["criterion"] == ["short:bon:2", "vowels:tilt:0.5"] and a["config"]["gamma"] == 3
    code, out, err = run_cli("train", "grpo", "--config", tmp_path / "a" / "iama_run.json", "--output-dir", tmp_path / "b")
    assert code == 0, err
    b = json.loads((tmp_path / "b" / "iama_run.json").read_text())
    assert {k: v for k, v in b["config"].items() if k != "output_dir"} == {
        k: v for k, v in a["config"].items() if k != "output_dir"
    }
    step = [[h[k] for k in sorted(h) if k.startswith("iama/")] for h in (a["log_history"][0], b["log_history"][0])]
    assert step[0] == step[1]
    code, out, err = run_cli("train", "grpo", "--policy", tiny_policy_dir, "--prompts", prompts_file,
                             "--output-dir", tmp_path / "c", "--nonlinear", "off", "--aggregate", "min")  # fmt: skip
    assert code == 2 and "--nonlinear on" in err and not (tmp_path / "c" / "iama_run.json").exists()


def test_advantages_keep_the_transform_s_relative_sizes_across_groups(tiny_policy_dir, tmp_path, prompts_file):
    """TRL centres per group and (scale_rewards="batch") divides by ONE batch-wide std: a group whose
    transformed rewards are small keeps small advantages (per-group scaling would blow them up)."""
    tr = _trainer(tiny_policy_dir, tmp_path, prompts_file, max_completion_length=8)
    tr.model.train()
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in ("Say hi", "Name a color")]
    from moalign.policies import quiet_upstream_renames

    with quiet_upstream_renames():  # TRL's generation reads a renamed transformers attribute
        out = tr._generate_and_score_completions([r for r in rows for _ in range(4)])
    r = tr.last_nonlinear.rewards.double()  # [2 groups, 4]
    centred = r - r.mean(1, keepdim=True)
    expect = centred / (r.flatten().std() + 1e-4)
    torch.testing.assert_close(out["advantages"].double().view(2, 4), expect, atol=1e-5, rtol=1e-4)


def test_best_of_n_larger_than_the_group_is_refused(tmp_path, prompts_file):
    with pytest.raises(MoalignError, match=r"best-of-8 .* --num-generations 4 is smaller than N"):
        _cfg(tmp_path, prompts_file, criterion=["short:bon:8", "vowels:bon:2"])
    with pytest.raises(MoalignError, match=r"with N = --num-generations .* no learning signal"):
        _cfg(tmp_path, prompts_file, criterion=["short:bon:4", "vowels:bon:2"])
    _cfg(tmp_path, prompts_file, criterion=["short:bon:4", "vowels:bon:2"], estimator="plugin")  # allowed


def test_low_effective_sample_size_of_tilting_is_logged_and_warned_once(tiny_policy_dir, tmp_path, prompts_file):
    tr = _trainer(tiny_policy_dir, tmp_path, prompts_file, criterion=["short:bon:2", "vowels:tilt:0.01"])
    inputs, prompts, completions, ids, texts = _batch()
    with pytest.warns(UserWarning, match=r"vowels:tilt:0.01: a group's tilting weights have an effective sample"):
        tr._calculate_rewards(inputs, prompts, completions, ids)
    ess = tr._metrics["train"]["iama/vowels/ess_min"]
    assert len(ess) == 1 and 1.0 <= ess[0] < 2.0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second low step is logged, not warned again
        tr._calculate_rewards(inputs, prompts, completions, ids)
    assert len(tr._metrics["train"]["iama/vowels/ess_min"]) == 2


def test_a_cpu_run_with_gpu_sized_defaults_says_so_before_it_starts(tmp_path, prompts_file):
    import warnings

    from moalign.training.grpo import IAMAConfig, cpu_sized_warning

    with pytest.warns(UserWarning, match=r"generates up to 4096 tokens a step .* --max-completion-length 512"):
        cpu_sized_warning(IAMAConfig(output_dir=str(tmp_path / "a"), prompts=str(prompts_file)))  # 8 x 512
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cpu_sized_warning(_cfg(tmp_path, prompts_file))  # 8 x 6 tokens: no warning
