"""Incremental scoring of decoder reward models (moalign.objectives.incremental): the scores equal a full
re-encode to 1e-5 in float32 for every method, and a candidate reads only what is new since its parent."""

from __future__ import annotations

import random

import pytest
import torch

from moalign.compute import scoring_scope
from moalign.config import GenerateConfig
from moalign.data.prompts import Prompt
from moalign.decoding.backend import SamplingConfig
from moalign.decoding.in_process import TransformersBackend
from moalign.decoding.registry import MethodContext, get_method
from moalign.decoding.values import ObjectiveScorer
from moalign.objectives.incremental import IncrementalScorer, supports_incremental
from moalign.objectives.reward_model import RewardModelObjective

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
PROMPTS = [  # different lengths in one batch
    Prompt(({"role": "user", "content": "Say hi"},), id="a"),
    Prompt(({"role": "user", "content": "Name three colours that go well together in a small kitchen, please"},),
           id="b"),
    Prompt(({"role": "user", "content": "Why?"},), id="c"),
]


@pytest.fixture(scope="module")
def decoder_rm(tmp_path_factory, policy_tokenizer_dir):
    """A 2-layer random Llama sequence classifier with two outputs, the bundled policy's tokenizer (its chat
    template) and pad token, saved to a folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(policy_tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id, num_labels=2,
                      initializer_range=0.3)  # fmt: skip
    d = tmp_path_factory.mktemp("decoder_rm")
    LlamaForSequenceClassification(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d


class Logged(RewardModelObjective):
    """A reward model objective that logs every pair it scores and its score."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.log: list[tuple[str, str, float]] = []

    def _score(self, prompts, responses):
        s = super()._score(prompts, responses)
        self.log += list(zip(prompts, responses, s.tolist()))
        return s


def _objectives(folder, incremental: bool):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    return [Logged(model, tok, index=i, name=f"rm{i}", incremental=incremental) for i in (0, 1)]


def test_store_matches_a_full_forward_and_reads_only_what_is_new():
    """Random token rows grown block by block and reindexed (every row continues from row 0), a template-like
    tail that ends with the pad token, an unchanged row, and a row that is a prefix of an entry."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, num_labels=2)  # fmt: skip
    model = LlamaForSequenceClassification(cfg).eval()
    assert supports_incremental(model)

    def full(ids):
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0]

    store = IncrementalScorer(model, pad_token_id=0)
    rng = random.Random(0)
    prompts = {g: [rng.randrange(1, 100) for _ in range(rng.randrange(3, 12))] for g in "ab"}
    rows = {g: [list(prompts[g]) for _ in range(3)] for g in "ab"}
    tail = [7, 0]  # like a chat template's end of turn, ending with the pad id
    for block in range(4):
        groups, seqs, new = [], [], []
        for g in "ab":
            for k in range(3):
                add = [rng.randrange(1, 100) for _ in range(rng.randrange(0 if k else 1, 5))]
                rows[g][k] = rows[g][k] + add
                groups.append(g)
                seqs.append(rows[g][k] + tail)
                new.append(len(add))
        out, read = store.logits(groups, seqs)
        ref = torch.stack([full(s) for s in seqs])
        assert (out - ref).abs().max() <= TOL
        if block == 0:  # the prompt once per group, then each row its own tokens and the tail
            for gi, g in enumerate("ab"):
                first = sum(read[3 * gi : 3 * gi + 3])
                assert first <= len(prompts[g]) + sum(new[3 * gi : 3 * gi + 3]) + 3 * (len(tail) + 1)
        else:  # each row: its new tokens, the tail, and the one token before the tail the head reads past
            for r, n in zip(read, new):
                assert r <= n + len(tail) + 1
        for g in "ab":
            rows[g] = [list(rows[g][0]) for _ in range(3)]
    # the same sequences again read nothing; a sequence that is a prefix of an entry re-feeds its last token
    again, read = store.logits(groups, seqs)
    assert read == [0] * len(seqs) and torch.equal(again, out)
    shorter = seqs[0][:-3]
    got, read = store.logits(["a"], [shorter])
    assert (got[0] - full(shorter)).abs().max() <= TOL and read == [1]


@pytest.mark.parametrize(
    "method,kw",
    [
        ("best-of-n", {"n": 4}),
        ("cd", {"k": 3, "block_size": 4}),
        ("rmod", {"k": 3, "block_size": 4}),
        ("darwin", {"mutations": 2, "replace_every": 4, "replace_top_k": 1, "cycles": 2, "recache": "reprefill",
                    "mutation_max_new_tokens": 8}),
        ("darwin", {"mutations": 2, "replace_every": 4, "replace_top_k": 1, "cycles": 2, "recache": "copy",
                    "mutation_max_new_tokens": 8}),
    ],
)
def test_every_method_scores_as_a_full_reencode(tiny_policy, decoder_rm, method, kw):
    """The same run with incremental scoring and with a full re-encode of every pair: the same scores (to 1e-5)
    at every step, hence the same responses; every incrementally scored pair also equals scoring it afresh."""
    runs = {}
    for incremental in (True, False):
        objs = _objectives(decoder_rm, incremental)
        cfg = GenerateConfig(method=method, normalize="none", max_new_tokens=12, temperature=1.0,
                             scalarization="worst-case" if method != "rmod" else "uniform", **kw)  # fmt: skip
        backend = TransformersBackend(tiny_policy, SamplingConfig())
        ctx = MethodContext(cfg=cfg, policy=tiny_policy, backend=backend, scorer=ObjectiveScorer(objs))
        res = get_method(method).build(ctx, cfg.method_args())(PROMPTS, seed=3, prompt_indices=[0, 1, 2])
        runs[incremental] = (res, objs)
    (inc, inc_objs), (ref, ref_objs) = runs[True], runs[False]
    assert [r.response for rs in inc for r in rs] == [r.response for rs in ref for r in rs]
    assert any(not r.finished for rs in inc for r in rs)
    for a, b in zip(inc_objs, ref_objs):
        assert [(p, r) for p, r, _ in a.log] == [(p, r) for p, r, _ in b.log] and len(a.log) > 0
        diff = max(abs(x - y) for (_, _, x), (_, _, y) in zip(a.log, b.log))
        assert diff <= TOL
    fresh = _objectives(decoder_rm, False)[0]  # outside any search: a full forward per pair
    pairs = inc_objs[0].log
    scores = fresh.score([p for p, _, _ in pairs], [r for _, r, _ in pairs])
    assert max(abs(float(s) - x) for s, (_, _, x) in zip(scores, pairs)) <= TOL
    # and the incremental run read fewer tokens wherever a block was scored more than once
    if method != "best-of-n":
        assert sum(r.scorer_tokens for rs in inc for r in rs) < sum(r.scorer_tokens for rs in ref for r in rs)


def _cd_scorer_tokens(policy, folder, incremental: bool, T: int) -> int:
    objs = _objectives(folder, incremental)
    cfg = GenerateConfig(method="cd", normalize="none", k=8, block_size=4, max_new_tokens=T)
    ctx = MethodContext(cfg=cfg, policy=policy, backend=TransformersBackend(policy), scorer=ObjectiveScorer(objs))
    with scoring_scope(reuse=False):
        res = get_method("cd").build(ctx, cfg.method_args())(PROMPTS[1:2], seed=0, prompt_indices=[0])
    return res[0][0].scorer_tokens


def test_cd_scorer_tokens_grow_linearly_in_new_tokens(tiny_policy, decoder_rm, no_eos):
    """CD with K=8, B=4: incremental scoring reads the prompt once and then about K x (B + the template's
    end of turn) per block, so doubling the tokens doubles the increase; a full re-encode grows faster."""
    inc = {T: _cd_scorer_tokens(tiny_policy, decoder_rm, True, T) for T in (8, 16, 32)}
    full = {T: _cd_scorer_tokens(tiny_policy, decoder_rm, False, T) for T in (8, 16, 32)}
    ratio_inc = (inc[32] - inc[16]) / (inc[16] - inc[8])
    ratio_full = (full[32] - full[16]) / (full[16] - full[8])
    assert 1.7 <= ratio_inc <= 2.3, inc
    assert ratio_full > 2.3, full
    # per block and row: the block's tokens plus the few the template puts after the response
    per_row_block = (inc[32] - inc[16]) / (8 * 4)
    assert 4 <= per_row_block <= 4 + 6, inc


def test_policy_backbone_running_sums_equal_its_batched_forward(tiny_policy_dir):
    """The Bradley-Terry ``policy`` backbone recipe (mean-pooled last hidden states over all tokens and over
    the response) within a search, from running sums: equal to its batched forward block after block (an empty
    response, a response that stops growing, rows continuing from one parent), reading only what is new."""
    from moalign.compute import count_reads
    from moalign.objectives.bradley_terry import PolicyBackbone

    bb = PolicyBackbone(str(tiny_policy_dir), max_response_tokens=12)
    prompts = ["Say hi to me", "Name three colours that go well together, please"]
    blocks = [["", "Hi", "Hello"], ["Hi there", "Hello there", "Hello there, my friend"],
              ["Hi there, how are you today my old friend, it is so good", "Hello there", "Hello there, my friend"]]  # fmt: skip
    pairs = [([p for p in prompts for _ in rows], [r for _ in prompts for r in rows]) for rows in blocks]
    with scoring_scope(reuse=False):
        got = []
        for P, R in pairs:
            with count_reads(len(P)) as reads:
                got.append((bb.features(P, R), reads.tokens()))
    for b, ((P, R), (inc, read)) in enumerate(zip(pairs, got)):
        full = bb.features(P, R)  # no search: the batched forward over every token
        assert (inc - full).abs().max() <= TOL
        lengths = [len(bb._ids(p, r)[0]) for p, r in zip(P, R)]
        assert sum(read) < sum(lengths) if b == 0 else sum(read) < sum(lengths) / 2
