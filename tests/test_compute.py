"""Compute counted for the policy and the scorers: every method's scorer count against a hand count, and a
multi-output reward model named twice run once per batch."""

from __future__ import annotations

import math

import pytest
import torch

from moalign.config import GenerateConfig
from moalign.data.prompts import Prompt
from moalign.decoding.backend import SamplingConfig
from moalign.decoding.in_process import TransformersBackend
from moalign.decoding.registry import MethodContext, get_method
from moalign.decoding.values import ObjectiveScorer
from moalign.generate import generate
from moalign.objectives.base import CallableObjective, Objective, get_objective

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [
    Prompt(({"role": "user", "content": "Say hi to me"},), id="a"),
    Prompt(({"role": "user", "content": "Name three colors please"},), id="b"),
]


class WordReader(Objective):
    """A stand-in for a reward model: it 'reads' the words of the prompt and the response, and logs every
    pair it is asked to score."""

    name = "words"

    def __init__(self):
        self.log: list[tuple[str, str]] = []

    def _score(self, prompts, responses):
        self.log += list(zip(prompts, responses))
        return [len(r.split()) / 10 for r in responses]

    def reads(self, prompts, responses):
        return ("word reader",), [len(p.split()) + len(r.split()) for p, r in zip(prompts, responses)]


@pytest.fixture
def no_eos(tiny_policy):
    """Rows never end early, so every block is scored (the hand counts below assume it)."""
    eos = TransformersBackend(tiny_policy).eos_ids.tolist()

    def hook(module, inputs, output):
        output[..., eos] = -math.inf
        return output

    handle = tiny_policy.model.get_output_embeddings().register_forward_hook(hook)
    yield
    handle.remove()


def _decode(policy, method: str, **kw):
    """Run a method's decoder directly (not generate, which scores the outputs again for the records) and
    return its results and the pairs the objective scored while it decoded."""
    reader = WordReader()
    objectives = [reader, CallableObjective("chars", lambda p, r: [len(x) / 50 for x in r])]
    cfg = GenerateConfig(method=method, normalize="none", **kw)
    backend = TransformersBackend(policy, SamplingConfig())
    ctx = MethodContext(cfg=cfg, policy=policy, engine=backend, scorer=ObjectiveScorer(objectives))
    decoder = get_method(method).build(ctx, cfg.method_args())
    res = decoder(PROMPTS, seed=1, prompt_indices=[0, 1])
    return res, reader.log


def _hand_tokens(pairs) -> int:
    return sum(len(p.split()) + len(r.split()) for p, r in pairs)


def _for_prompt(log, prompt: Prompt):
    return [(p, r) for p, r in log if p == prompt.text]


def test_sample_scores_nothing(tiny_policy, no_eos):
    res, log = _decode(tiny_policy, "sample", n=3, max_new_tokens=8)
    assert log == []
    assert all(r.scorer_tokens == 0 and r.scored_pairs == 0 and r.forward_tokens > 0 for rs in res for r in rs)


def test_best_of_n_scores_n_whole_responses(tiny_policy, no_eos):
    res, log = _decode(tiny_policy, "best-of-n", n=4, max_new_tokens=8)
    for prompt, (r,) in zip(PROMPTS, res):
        pairs = _for_prompt(log, prompt)
        assert len(pairs) == 4 and r.scored_pairs == 4  # N whole responses, scored once
        assert all(len(resp.split()) > 0 for _, resp in pairs)
        assert r.response in [resp for _, resp in pairs]
        assert r.scorer_tokens == _hand_tokens(pairs)


@pytest.mark.parametrize("method", ["cd", "rmod"])
def test_blockwise_methods_score_k_candidates_every_block(tiny_policy, no_eos, method):
    K, B, T = 3, 4, 12  # b = 3 blocks
    res, log = _decode(tiny_policy, method, k=K, block_size=B, max_new_tokens=T)
    for prompt, (r,) in zip(PROMPTS, res):
        pairs = _for_prompt(log, prompt)
        assert len(pairs) == K * 3 and r.scored_pairs == K * 3  # K partial responses per block
        assert r.scorer_tokens == _hand_tokens(pairs)
        # the policy: the prompt once, then every fed token of K rows (the last sampled token is not fed)
        n_prompt = len(TransformersBackend(tiny_policy).encode([TransformersBackend(tiny_policy).render(prompt)]).input_ids[0])
        assert r.forward_tokens == n_prompt + K * (T - 1)


def test_darwin_counts_every_replacement_and_the_seed_row(tiny_policy, no_eos):
    n, m, T = 2, 4, 8  # 2 replacement blocks per cycle
    res, log = _decode(tiny_policy, "darwin", mutations=n, replace_every=m, replace_top_k=1, cycles=2,
                       max_new_tokens=T, mutation_max_new_tokens=16)  # fmt: skip
    for prompt, (r,) in zip(PROMPTS, res):
        pairs = _for_prompt(log, prompt)
        # cycle 1: n beams + the seed sample, scored every block; cycle 2: n beams
        expected = (n + 1) * (T // m) + n * (T // m)
        assert len(pairs) == expected and r.scored_pairs == expected
        assert r.scorer_tokens == _hand_tokens(pairs)
        per_cycle = [c["scorer_tokens"] for c in r.trace if "scorer_tokens" in c]
        assert len(per_cycle) == 2 and sum(per_cycle) == r.scorer_tokens


def test_records_carry_policy_and_scorer_tokens(tiny_policy, tmp_path):
    recs = generate(GenerateConfig(method="best-of-n", n=3, max_new_tokens=8, normalize="none", out=str(tmp_path / "r.jsonl")),
                    policy=tiny_policy, objectives=[WordReader()], prompts=PROMPTS, progress=False)  # fmt: skip
    for r in recs:
        assert r["policy_tokens"] == r["forward_tokens"] > 0
        assert r["scored_pairs"] == 3 and r["scorer_tokens"] > 0


# ---------------------------------------------------------------------------- one model, several objectives
@pytest.fixture(scope="module")
def two_output_rm(tmp_path_factory):
    """A 2-layer BERT sequence classifier with two outputs (random weights) and the MiniLM tokenizer."""
    from conftest import make_tiny_reward_model

    d = tmp_path_factory.mktemp("two_output_rm")
    make_tiny_reward_model(d, 2)
    return d


def test_multi_output_reward_model_named_twice_loads_and_runs_once(two_output_rm):
    a, b = get_objective(f"rm:{two_output_rm}@0"), get_objective(f"rm:{two_output_rm}@1")
    assert a is not b and a.model is b.model  # loaded once
    calls = []
    handle = a.model.register_forward_hook(lambda mod, inp, out: calls.append(inp))
    prompts = [f"question {i}" for i in range(11)]
    responses = [f"answer number {i}" for i in range(11)]
    try:
        scores = ObjectiveScorer([a, b]).raw(prompts, responses)
        n_shared = len(calls)
        calls.clear()
        alone = torch.stack([a.score(prompts, responses), b.score(prompts, responses)], dim=1)
    finally:
        handle.remove()
    assert n_shared == math.ceil(11 / a.batch_size)  # once per batch for both objectives
    assert len(calls) == 2 * n_shared  # scored one objective at a time: once per batch each
    assert torch.allclose(scores, alone, atol=1e-6)
    # the scorer counts the model's input once per pair, not once per objective
    mask = a._encode(prompts, responses)["attention_mask"]
    assert ObjectiveScorer([a, b]).input_tokens(prompts, responses) == mask.sum(dim=1).tolist()
