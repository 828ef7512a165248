"""Compute counted for the policy and the scorers: every method's scorer count against a hand count, what a
caching scorer actually reads, FLOPs from models whose parameter count is known by hand, and a multi-output
reward model named twice run once per batch."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moalign.compute import ModelCost, count_reads, non_embedding_parameters, record_read, scoring_scope
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
    model = ModelCost("word reader", params=1000)

    def __init__(self):
        self.log: list[tuple[str, str]] = []

    def _score(self, prompts, responses):
        self.log += list(zip(prompts, responses))
        record_read(self.model, [len(p.split()) + len(r.split()) for p, r in zip(prompts, responses)])
        return [len(r.split()) / 10 for r in responses]


def _decode(policy, method: str, **kw):
    """Run a method's decoder directly (not generate, which scores the outputs again for the records) and
    return its results and the pairs the objective scored while it decoded."""
    reader = WordReader()
    objectives = [reader, CallableObjective("chars", lambda p, r: [len(x) / 50 for x in r])]
    cfg = GenerateConfig(method=method, normalize="none", **kw)
    backend = TransformersBackend(policy, SamplingConfig())
    ctx = MethodContext(cfg=cfg, policy=policy, backend=backend, scorer=ObjectiveScorer(objectives))
    decoder = get_method(method).build(ctx, cfg.method_args())
    res = decoder(PROMPTS, seed=1, prompt_indices=[0, 1])
    return res, reader.log


#: the conftest's tiny Llama (hidden 32, MLP 64, 2 layers, 4 heads, 2 key-value heads of 8, tied embeddings),
#: by hand: per layer q 32x32 + k 32x16 + v 32x16 + o 32x32 + MLP 3x32x64 + two norms 2x32 = 9280; + final norm
TINY_LLAMA_PARAMS = 2 * (1024 + 512 + 512 + 1024 + 6144 + 64) + 32


def _hand_tokens(pairs) -> int:
    return sum(len(p.split()) + len(r.split()) for p, r in pairs)


def _for_prompt(log, prompt: Prompt):
    return [(p, r) for p, r in log if p == prompt.text]


def test_sample_scores_nothing(tiny_policy, no_eos):
    res, log = _decode(tiny_policy, "sample", n=3, max_new_tokens=8)
    assert log == []
    assert all(r.scorer_tokens == 0 and r.scored_pairs == 0 and r.policy_tokens > 0 for rs in res for r in rs)


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
        assert r.scorer_flops == 2 * 1000 * r.scorer_tokens and r.scorer_reads == {"word reader": r.scorer_tokens}
        assert r.policy_flops == 2 * TINY_LLAMA_PARAMS * r.policy_tokens
        # the policy: the prompt once, then every fed token of K rows (the last sampled token is not fed)
        n_prompt = len(TransformersBackend(tiny_policy).encode([TransformersBackend(tiny_policy).render(prompt)]).input_ids[0])
        assert r.policy_tokens == n_prompt + K * (T - 1)


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
        # the policy's FLOPs cover the beams and the mutations (the mutator is the same model)
        mutation = sum(c["mutation"]["policy_tokens"] for c in r.trace if c.get("mutation"))
        decoding = sum(c["policy_tokens"] for c in r.trace if "cycle" in c and c.get("cycle", 0) > 0)
        assert mutation > 0 and r.policy_tokens == mutation + decoding
        assert r.policy_flops == 2 * TINY_LLAMA_PARAMS * r.policy_tokens


def test_records_carry_policy_and_scorer_tokens(tiny_policy, tmp_path):
    recs = generate(GenerateConfig(method="best-of-n", n=3, max_new_tokens=8, normalize="none", out=str(tmp_path / "r.jsonl")),
                    policy=tiny_policy, objectives=[WordReader()], prompts=PROMPTS, progress=False)  # fmt: skip
    for r in recs:
        assert r["policy_tokens"] > 0 and "forward_tokens" not in r  # the older name is only read
        assert r["scored_pairs"] == 3 and r["scorer_tokens"] > 0
        # FLOPs: 2 x non-embedding parameters x tokens, per model
        assert r["policy_flops"] == 2 * TINY_LLAMA_PARAMS * r["policy_tokens"]
        assert r["scorer_flops"] == 2 * 1000 * r["scorer_tokens"]
        assert r["scorer_reads"] == {"word reader": r["scorer_tokens"]}
        assert r["policy_seconds"] > 0 and r["scorer_seconds"] >= 0
    meta = json.loads((tmp_path / "r.meta.json").read_text())["compute"]
    assert meta["policy"]["params"] == TINY_LLAMA_PARAMS
    assert meta["policy"]["tokens"] == sum(r["policy_tokens"] for r in recs)
    assert meta["policy"]["flops"] == sum(r["policy_flops"] for r in recs)
    assert meta["scorers"]["word reader"]["tokens"] == sum(r["scorer_tokens"] for r in recs)
    assert "2 x non-embedding parameters" in meta["formula"] and meta["seconds"]["policy"] > 0


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
    # the scorer counts the model's input once per pair, not once per objective, and its FLOPs from its size
    mask = a._encode(prompts, responses)["attention_mask"]
    reads = ObjectiveScorer([a, b]).reads(prompts, responses)
    assert reads.tokens() == mask.sum(dim=1).tolist() and len(reads.by_model) == 1
    assert reads.flops() == [2 * TINY_BERT_RM_PARAMS * n for n in mask.sum(dim=1).tolist()]


#: the tiny BERT reward model (hidden 32, 2 layers, MLP 64, 2 outputs) by hand: embedding LayerNorm 64; per
#: layer q, k, v, o 4 x (32x32 + 32), two LayerNorms 2 x 64, MLP 32x64 + 64 and 64x32 + 32; pooler 32x32 + 32;
#: classifier 32x2 + 2 (the word, position and token-type tables are embeddings)
TINY_BERT_RM_PARAMS = 64 + 2 * (4 * 1056 + 2 * 64 + 2112 + 2080) + 1056 + 66


def test_non_embedding_parameters_by_hand(tiny_policy, two_output_rm):
    from transformers import AutoModelForSequenceClassification

    assert non_embedding_parameters(tiny_policy.model) == TINY_LLAMA_PARAMS
    rm = AutoModelForSequenceClassification.from_pretrained(two_output_rm)
    assert non_embedding_parameters(rm) == TINY_BERT_RM_PARAMS


# ------------------------------------------------------------------------------ what a caching scorer reads
def test_minilm_reads_a_prompt_once_per_group_and_an_identical_response_once():
    """The MiniLM objectives (three objectives, one encoder) within one scoring scope: the prompt is read the
    first time it is met, each distinct response once, a repeated pair not at all."""
    from moalign.objectives.embeddings import encoder_cost, token_counts

    scorer = ObjectiveScorer([get_objective("helpful"), get_objective("harmless"), get_objective("relevant")])
    prompt = "Human: How do I keep basil alive on a windowsill?"
    blocks = [["Water it", "Give it sun", "Water it"], ["Water it when dry", "Give it sun daily", "Water it"]]
    with scoring_scope(reuse=False):
        per_block = [scorer.raw_counted([prompt] * 3, block)[1] for block in blocks]
    n_prompt = token_counts([prompt])[0]
    texts = sorted({r for b in blocks for r in b})
    counts = dict(zip(texts, token_counts(texts)))
    assert per_block[0].tokens() == [n_prompt + counts["Water it"], counts["Give it sun"], 0]
    assert per_block[1].tokens() == [counts["Water it when dry"], counts["Give it sun daily"], 0]
    assert [len(r.by_model) for r in per_block] == [1, 1]  # three objectives, one model
    params = encoder_cost().params
    assert 10_000_000 < params < 12_000_000  # all-MiniLM-L6-v2: ~11M non-embedding parameters
    assert per_block[0].flops() == [2 * params * t for t in per_block[0].tokens()]
    # a new scope starts with an empty cache: the same pairs are read again
    with scoring_scope(reuse=False):
        again = scorer.raw_counted([prompt] * 3, blocks[0])[1]
    assert again.tokens() == per_block[0].tokens()


def test_counted_reads_land_on_their_pairs_across_batches():
    """``Objective.score`` runs in batches; every batch's reads land on its own pairs."""
    reader = WordReader()
    reader.batch_size = 2
    prompts, responses = ["a b", "c", "d e f", "g", "h"], ["x", "y z", "", "w", "v u t"]
    with count_reads(5) as reads:
        reader.score(prompts, responses)
    assert reads.tokens() == [3, 3, 3, 2, 4]
    assert reads.grouped(5).tokens() == [15]
    with pytest.raises(ValueError):
        reads.grouped(2)
