"""Behaviour that a wrong implementation changes: each test here fails for a specific plausible mistake in
the code that joins the numerical cores (named in the test's docstring), on data where the mistake gives a
different answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moalign.data.prompts import to_prompt
from moalign.decoding.backend import BlockStep, SamplingConfig, Selection
from moalign.decoding.in_process import TransformersBackend
from moalign.errors import MoalignError

PROMPTS = ["What is the capital of France?", "Write two sentences about the sea, please.", "Hi"]


def _step(values: torch.Tensor) -> BlockStep:
    P, K, _ = values.shape
    return BlockStep(
        prompts=[to_prompt(f"p{i}") for i in range(P)], prompt_indices=list(range(P)),
        texts=[[f"c{k}" for k in range(K)] for _ in range(P)], token_ids=torch.zeros(P, K, 1, dtype=torch.long),
        done=torch.zeros(P, K, dtype=torch.bool), block_index=0, final=False,
        rng=torch.Generator().manual_seed(0),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------- RMOD
def test_rmod_picks_argmax_of_its_own_solved_weights():
    """Fails if RMOD picks with uniform weights, or picks the argmin: the chosen candidate maximises w*.v for
    the w* it logged, and on these values uniform weights and w* pick different candidates."""
    from moalign.decoding.rmod import rmod_selector
    from moalign.decoding.worst_case import solve_worst_case_weights

    # candidate 0 is great on objective 0 only; candidate 1 is balanced; candidate 2 is great on objective 1
    # but terrible on 0. Uniform weights pick candidate 2 (sum 2.2); the worst-case weights lean to objective 0
    v = torch.tensor([[[2.0, -1.5], [0.4, 0.4], [-1.0, 3.2]]], dtype=torch.float64)
    sel = rmod_selector(lambda step: v, lam=2.0)(_step(v))
    w = torch.tensor(sel.info[0]["weights"], dtype=torch.float64)
    ref = solve_worst_case_weights(v, 2.0).weights[0]
    assert torch.allclose(w, ref.double(), atol=1e-4)
    scores = v[0] @ w
    assert int(sel.chosen[0]) == int(scores.argmax())
    assert int(sel.chosen[0]) != int((v[0] @ torch.tensor([0.5, 0.5], dtype=torch.float64)).argmax())
    assert int(sel.chosen[0]) != int(scores.argmin())
    assert sel.info[0]["values"] == pytest.approx(v[0, sel.chosen[0]].tolist(), abs=1e-4)


# ---------------------------------------------------------------------------------------------- engine
def _eos_bias(policy, eos: int, bump: float):
    def hook(module, inputs, output):
        output[..., eos] += bump
        return output

    return policy.model.get_output_embeddings().register_forward_hook(hook)


def _ended_rows(step: BlockStep, eos: set[int]):
    """``(p, k, row tokens, index of its end-of-turn)`` for every row of the step that has ended."""
    P, K, _ = step.token_ids.shape
    for p in range(P):
        for k in range(K):
            row = step.token_ids[p, k].tolist()
            hit = next((i for i, t in enumerate(row) if t in eos), None)
            if hit is not None:
                yield p, k, row, hit


def test_ended_rows_pad_in_every_block(tiny_policy):
    """Fails if rows that ended keep generating: after a row's end-of-turn every position is padding."""
    eng = TransformersBackend(tiny_policy, SamplingConfig(temperature=1.0))
    eos = set(eng.eos_ids.tolist())
    ended = []

    def selector(step: BlockStep) -> Selection:
        P, K, T = step.token_ids.shape
        for p, k, row, hit in _ended_rows(step, eos):
            assert bool(step.done[p, k])
            assert all(t == eng.pad_id for t in row[hit + 1 :]), row
            ended.append(T - hit - 1)
        return Selection(torch.zeros(P, dtype=torch.long), parents=torch.arange(K).expand(P, K))

    handle = _eos_bias(tiny_policy, int(eng.eos_ids[0]), 9.0)
    try:
        eng.decode(
            [to_prompt(p) for p in PROMPTS], k=4, block_size=4, max_new_tokens=16, selector=selector, seed=2
        )
    finally:
        handle.remove()
    assert any(n >= 2 for n in ended), (
        "no row ended two or more tokens before a block's end: the test is void"
    )


def _mean_logprob(policy, **sampling) -> float:
    eng = TransformersBackend(policy, SamplingConfig(**sampling))
    res = eng.decode(
        [to_prompt(p) for p in PROMPTS], k=16, block_size=12, max_new_tokens=12, seed=0, keep_all=True
    )
    lps = [lp for r in res for row in r.rows for lp in row.token_logprobs]
    return float(np.mean(lps))


def test_temperature_top_k_top_p_change_what_is_sampled(tiny_policy, one_thread):
    """Fails if temperature, top-k or top-p are ignored: low temperature samples tokens the model finds more
    likely (higher untempered log-prob) than high temperature; top-k=1 and a tiny top-p sample greedily."""
    cold, hot = _mean_logprob(tiny_policy, temperature=0.5), _mean_logprob(tiny_policy, temperature=2.0)
    assert cold > hot + 0.5, (cold, hot)
    eng = TransformersBackend(tiny_policy, SamplingConfig(temperature=0))
    greedy = [
        r.token_ids for r in eng.decode([to_prompt(p) for p in PROMPTS], k=1, block_size=8, max_new_tokens=8)
    ]
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        e = TransformersBackend(tiny_policy, SamplingConfig(temperature=1.5, **kw))
        res = e.decode(
            [to_prompt(p) for p in PROMPTS], k=3, block_size=8, max_new_tokens=8, seed=4, keep_all=True
        )
        assert all(row.token_ids == g for r, g in zip(res, greedy) for row in r.rows), kw
    free = TransformersBackend(tiny_policy, SamplingConfig(temperature=1.5))
    res = free.decode(
        [to_prompt(p) for p in PROMPTS], k=3, block_size=8, max_new_tokens=8, seed=4, keep_all=True
    )
    assert any(row.token_ids != g for r, g in zip(res, greedy) for row in r.rows)


def test_hidden_state_of_an_ended_row_stays_at_its_end_of_turn(tiny_policy):
    """Fails if an ended row's hidden state keeps moving: value heads must read the state at the row's
    end-of-turn token (checked against a fresh forward pass), on rows that ended before the block's end."""
    eng = TransformersBackend(tiny_policy, SamplingConfig(temperature=1.0))
    eos = set(eng.eos_ids.tolist())
    checked = []

    def selector(step: BlockStep) -> Selection:
        P, K, T = step.token_ids.shape
        for p, k, row, hit in _ended_rows(step, eos):
            if hit == T - 1:
                continue
            p_ids = eng.tok(
                eng.render(step.prompts[p]), return_tensors="pt", add_special_tokens=False
            ).input_ids
            full = torch.cat([p_ids, torch.tensor([row[: hit + 1]])], dim=1)
            with torch.no_grad():
                h = tiny_policy.model(full, output_hidden_states=True).hidden_states[-1][0, -1]
            checked.append(torch.allclose(step.last_hidden[p, k], h, atol=1e-4))
        return Selection(torch.zeros(P, dtype=torch.long), parents=torch.arange(K).expand(P, K))

    handle = _eos_bias(tiny_policy, int(eng.eos_ids[0]), 9.0)
    try:
        eng.decode(
            [to_prompt(p) for p in PROMPTS], k=3, block_size=6, max_new_tokens=12, selector=selector, seed=1,
            hidden=True,
        )
    finally:
        handle.remove()
    assert len(checked) >= 3, "too few rows ended early: the test is void"
    assert all(checked)


# --------------------------------------------------------------------------------------------- generate
def test_every_batch_draws_from_its_own_seed(tmp_path, tiny_policy):
    """Fails if every batch gets the same seed: one prompt repeated in four batches of one gets four
    different samples (and the same four on a rerun)."""
    from moalign.config import GenerateConfig
    from moalign.generate import generate
    from moalign.objectives.base import CallableObjective

    prompts = [to_prompt("Tell me a story", id=f"s{i}") for i in range(4)]
    obj = [CallableObjective("len", lambda p, r: [len(x) / 10 for x in r])]
    cfg = GenerateConfig(method="sample", n=1, max_new_tokens=10, batch_size=1, normalize="none", seed=0)
    a = [
        r["response"]
        for r in generate(cfg, policy=tiny_policy, objectives=obj, prompts=prompts, progress=False)
    ]
    b = [
        r["response"]
        for r in generate(cfg, policy=tiny_policy, objectives=obj, prompts=prompts, progress=False)
    ]
    assert a == b
    assert len(set(a)) == 4


# ---------------------------------------------------------------------------------------------- values
def test_decode_time_values_are_z_scores():
    """Fails if decode-time z-scores drop the division by the standard deviation (or the centring)."""
    from moalign.decoding.values import ObjectiveScorer, RewardOnPrefix
    from moalign.objectives.base import CallableObjective
    from moalign.objectives.normalize import NormStats

    objs = [CallableObjective("a", lambda p, r: [float(len(x)) for x in r]),
            CallableObjective("b", lambda p, r: [float(x.count("x")) for x in r])]  # fmt: skip
    norm = NormStats(mean=[3.0, 1.0], std=[2.0, 0.5], names=["a", "b"])
    step = BlockStep(
        prompts=[to_prompt("q")], prompt_indices=[0], texts=[["xx", "abcdefg"]],
        token_ids=torch.zeros(1, 2, 1, dtype=torch.long), done=torch.zeros(1, 2, dtype=torch.bool),
        block_index=0, final=False,
    )  # fmt: skip
    v = RewardOnPrefix(ObjectiveScorer(objs, norm))(step)
    expected = torch.tensor([[[(2 - 3) / 2, (2 - 1) / 0.5], [(7 - 3) / 2, (0 - 1) / 0.5]]])
    assert torch.allclose(v.double(), expected.double())


# -------------------------------------------------------------------------------------------- evaluate
def _write_run(path, scores: list[list[float]], norm: dict | None):
    from moalign.records import RecordWriter

    meta = {"config": {"method": path.stem}, "norm": norm}
    with RecordWriter(path, meta) as w:
        for i, (a, b) in enumerate(scores):
            w.write({"record_id": str(i), "prompt_id": str(i), "prompt": "q", "response": "r",
                     "scores": {"a": a, "b": b}})  # fmt: skip


def test_evaluate_auto_uses_the_statistics_saved_with_the_runs(tmp_path):
    """Fails if ``--normalize auto`` ignores the saved statistics: the worst case is the mean over prompts of
    the min of the SAVED z-scores, which here differs from the raw-score worst case in sign."""
    from moalign.config import EvaluateConfig
    from moalign.evaluation.evaluate import evaluate_files

    norm = {"mean": [10.0, 0.0], "std": [5.0, 1.0], "names": ["a", "b"], "source": "saved", "n": 50}
    scores = [[12.0, 0.5], [20.0, -0.2], [9.0, 1.0]]
    _write_run(tmp_path / "run.jsonl", scores, norm)
    res = evaluate_files(EvaluateConfig(inputs=[str(tmp_path / "run.jsonl")], normalize="auto", n_boot=50))
    z = (np.array(scores) - np.array(norm["mean"])) / np.array(norm["std"])
    assert res.methods["run"].worst_case.estimate == pytest.approx(z.min(axis=1).mean())
    assert "saved" in res.score_space
    raw = evaluate_files(EvaluateConfig(inputs=[str(tmp_path / "run.jsonl")], normalize="none", n_boot=50))
    assert raw.methods["run"].worst_case.estimate == pytest.approx(np.array(scores).min(axis=1).mean())
    assert np.sign(raw.methods["run"].worst_case.estimate) != np.sign(res.methods["run"].worst_case.estimate)


def test_bootstrap_interval_is_the_percentile_interval():
    """Fails for a 'basic' (reflected) bootstrap interval: for a right-skewed sample the percentile interval
    of the mean reaches further above the estimate than below it, and matches the replicate quantiles."""
    from moalign.evaluation.metrics import bootstrap_ci

    x = np.random.default_rng(3).lognormal(sigma=1.5, size=40)
    est, lo, hi = bootstrap_ci(np.mean, x, n_boot=4000, seed=1)
    assert hi - est > 1.3 * (est - lo)
    rng = np.random.default_rng(1)
    reps = np.array([x[rng.integers(0, 40, size=40)].mean() for _ in range(4000)])
    assert (lo, hi) == pytest.approx(tuple(np.quantile(reps, [0.025, 0.975])), rel=1e-12)


# ------------------------------------------------------------------------------------------------- DPO
def test_implicit_reward_margins_are_positive_when_the_policy_prefers_chosen(tiny_policy):
    """Fails if the margins' sign is flipped: against a reference that the policy beats on ``chosen`` and
    trails on ``rejected``, every margin is positive and equals beta * the log-ratio difference."""
    from moalign.data.pairs import PreferencePair
    from moalign.training.dpo import implicit_reward_margins, policy_logps

    pairs = [PreferencePair(to_prompt("Say hi"), "Hello there, friend.", "No."),
             PreferencePair(to_prompt("Name a fruit"), "Apple.", "I will not answer that question.")]  # fmt: skip
    lp = policy_logps(tiny_policy.model, tiny_policy.tokenizer, pairs)  # [n, 2] under the policy
    ref = lp.clone()
    ref[:, 0] -= 1.0  # the policy raised chosen by 1 nat over the reference ...
    ref[:, 1] += 2.0  # ... and lowered rejected by 2
    m = implicit_reward_margins(tiny_policy.model, tiny_policy.tokenizer, pairs, beta=0.1, ref_logps=ref)
    m = torch.as_tensor(m, dtype=torch.float64)
    assert torch.allclose(m, torch.full((2,), 0.1 * 3.0, dtype=torch.float64), atol=1e-4)
    with pytest.raises(MoalignError):
        implicit_reward_margins(
            tiny_policy.model, tiny_policy.tokenizer, pairs, beta=0.1
        )  # no reference at all


def test_policy_dtype_flag(tiny_policy_dir, tmp_path):
    """--dtype: auto keeps the checkpoint's dtype, a named dtype converts, an unknown one is a clear error."""
    from moalign.policies import load_policy

    assert next(load_policy(str(tiny_policy_dir), dtype="auto").model.parameters()).dtype == torch.float32
    assert (
        next(load_policy(str(tiny_policy_dir), dtype="bfloat16").model.parameters()).dtype == torch.bfloat16
    )
    with pytest.raises(MoalignError, match="unknown dtype"):
        load_policy(str(tiny_policy_dir), dtype="float8")


def test_rmod_sample_rule_draws_from_the_step_generator():
    """Fails if RMOD's sample rule ignores the run's generator (a fixed or per-plan generator): the draws
    follow the step's generator, which the engine seeds from the run seed and the batch."""
    from moalign.decoding.rmod import rmod_selector

    v = torch.randn(64, 6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3
    select = rmod_selector(lambda step: v, lam=1.0, rule="sample")

    def draw(seed: int) -> list[int]:
        step = _step(v)
        step.rng = torch.Generator().manual_seed(seed)
        return select(step).chosen.tolist()

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
