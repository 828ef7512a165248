"""The blockwise engine: exactness against transformers' generate, KV-cache reuse, EOS, seeds."""

from __future__ import annotations

import pytest
import torch

from moalign.data.prompts import to_prompt
from moalign.decoding.backend import BlockStep, SamplingConfig, Selection
from moalign.decoding.in_process import TransformersBackend
from moalign.errors import MoalignError

PROMPTS = [
    "What is the capital of France?",
    "Write two sentences about the sea, please, in a calm voice.",
    "Hi",
]


def _generate_greedy(engine: TransformersBackend, prompts, max_new_tokens: int) -> list[list[int]]:
    tok = engine.tok
    enc = tok(
        [engine.render(p) for p in prompts], return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    out = engine.model.generate(
        **enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=engine.eos_ids.tolist(),
        pad_token_id=engine.pad_id,
    )  # fmt: skip
    eos = set(engine.eos_ids.tolist())
    res = []
    for row in out[:, enc.input_ids.shape[1] :].tolist():
        ids = []
        for t in row:
            if t in eos:
                break
            ids.append(t)
        res.append(ids)
    return res


@pytest.mark.parametrize("block_size", [1, 5, 64])
def test_greedy_k1_matches_generate_tiny(tiny_policy, block_size):
    prompts = [to_prompt(p) for p in PROMPTS]
    eng = TransformersBackend(tiny_policy, SamplingConfig(temperature=0))
    res = eng.decode(prompts, k=1, block_size=block_size, max_new_tokens=23)
    ref = _generate_greedy(eng, prompts, 23)
    assert [r.token_ids for r in res] == ref
    assert all(len(r.token_ids) <= 23 for r in res)


@pytest.mark.real
def test_greedy_k1_matches_generate_real(real_policy):
    prompts = [to_prompt(p) for p in PROMPTS]
    eng = TransformersBackend(real_policy, SamplingConfig(temperature=0))
    res = eng.decode(prompts, k=1, block_size=7, max_new_tokens=30)
    ref = _generate_greedy(eng, prompts, 30)
    assert [r.token_ids for r in res] == ref
    assert "Paris" in res[0].response  # the real model answers; the first prompt ends early with EOS
    assert res[0].finished and len(res[0].token_ids) < 30


def _full_logprobs(policy, engine, prompt, ids):
    text = engine.render(prompt)
    p_ids = engine.tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    full = torch.cat([p_ids, torch.tensor([ids])], dim=1)
    with torch.no_grad():
        logits = policy.model(full).logits[0, p_ids.shape[1] - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)


def test_kv_cache_reuse_matches_full_forward(tiny_policy):
    """After rows are swapped between blocks, each token's log-prob must equal a fresh full forward pass."""
    prompts = [to_prompt(p) for p in PROMPTS[:2]]
    eng = TransformersBackend(tiny_policy, SamplingConfig(temperature=1.0))
    picks = []

    def selector(step: BlockStep) -> Selection:
        c = torch.tensor([(step.block_index + p) % 3 for p in range(len(step.prompts))])
        picks.append(c.tolist())
        return Selection(c)

    res = eng.decode(prompts, k=3, block_size=4, max_new_tokens=17, selector=selector, seed=3)
    assert len(picks) == 5  # 4 + 4 + 4 + 4 + 1 tokens: a short final block
    for p, r in zip(prompts, res):
        ref = _full_logprobs(tiny_policy, eng, p, r.token_ids)
        assert torch.allclose(torch.tensor(r.token_logprobs), ref, atol=1e-4)


def test_selected_candidate_is_kept(tiny_policy):
    """The final response's tokens of each block are those of the candidate the selector picked."""
    prompts = [to_prompt(PROMPTS[1])]
    eng = TransformersBackend(tiny_policy, SamplingConfig(temperature=1.0))
    seen: list[torch.Tensor] = []

    def selector(step: BlockStep) -> Selection:
        seen.append(step.token_ids[0].clone())
        return Selection(torch.tensor([2]))

    res = eng.decode(prompts, k=4, block_size=6, max_new_tokens=12, selector=selector, seed=0)
    # block 0 candidates share no prefix; block 1 candidates all start with block 0's chosen tokens
    assert all(torch.equal(seen[1][j, :6], seen[0][2, :6]) for j in range(4))
    assert res[0].token_ids == seen[1][2, : len(res[0].token_ids)].tolist()


def test_seed_reproducible_and_sensitive(tiny_policy):
    prompts = [to_prompt(p) for p in PROMPTS]
    eng = TransformersBackend(tiny_policy, SamplingConfig(temperature=1.0, top_k=50, top_p=0.9))
    a = eng.decode(prompts, k=2, block_size=8, max_new_tokens=16, seed=11, keep_all=True)
    b = eng.decode(prompts, k=2, block_size=8, max_new_tokens=16, seed=11, keep_all=True)
    c = eng.decode(prompts, k=2, block_size=8, max_new_tokens=16, seed=12, keep_all=True)
    assert [r.candidates for r in a] == [r.candidates for r in b]
    assert [r.candidates for r in a] != [r.candidates for r in c]


def test_eos_rows_stop_and_pad(tiny_policy):
    """A row that samples an end-of-turn token stops there: nothing after it reaches the response."""
    eng = TransformersBackend(tiny_policy, SamplingConfig(temperature=1.0))
    eos = int(eng.eos_ids[0])

    # bias the tiny model towards EOS (a logit bump on its output layer) so that rows end at different steps
    def bump(module, inputs, output):
        output[..., eos] += 11.0
        return output

    handle = tiny_policy.model.get_output_embeddings().register_forward_hook(bump)
    try:
        res = eng.decode([to_prompt(p) for p in PROMPTS], k=4, block_size=3, max_new_tokens=20, seed=1,
                         keep_all=True)  # fmt: skip
    finally:
        handle.remove()
    assert any(r.finished and len(r.token_ids) < 20 for r in res), "no row ended early: the test is void"
    for r in res:
        assert eos not in r.token_ids
        if not r.finished:
            assert len(r.token_ids) == 20  # only the budget cuts an unfinished row
        assert len(r.token_logprobs) == len(r.token_ids)


def test_bad_arguments(tiny_policy):
    eng = TransformersBackend(tiny_policy)
    p = [to_prompt("hello")]
    with pytest.raises(MoalignError, match="K"):
        eng.decode(p, k=0, block_size=4, max_new_tokens=4)
    with pytest.raises(MoalignError, match="block size"):
        eng.decode(p, k=1, block_size=0, max_new_tokens=4)
    with pytest.raises(MoalignError, match="temperature"):
        TransformersBackend(tiny_policy, SamplingConfig(temperature=-1))
    with pytest.raises(MoalignError, match="selector"):
        eng.decode(p, k=2, block_size=4, max_new_tokens=4, selector=lambda s: Selection(torch.tensor([5])))


def test_last_hidden_matches_full_forward(tiny_policy):
    """hidden=True: each candidate's hidden state equals a fresh forward pass over prompt + its tokens."""
    eng = TransformersBackend(tiny_policy, SamplingConfig(temperature=1.0))
    prompts = [to_prompt(p) for p in PROMPTS[:2]]
    eos = set(eng.eos_ids.tolist())
    checked = []

    def selector(step: BlockStep) -> Selection:
        for p in range(len(step.prompts)):
            for j in range(step.token_ids.shape[1]):
                ids = []
                for t in step.token_ids[p, j].tolist():
                    ids.append(t)
                    if t in eos:
                        break
                text = eng.render(step.prompts[p])
                p_ids = eng.tok(text, return_tensors="pt", add_special_tokens=False).input_ids
                full = torch.cat([p_ids, torch.tensor([ids])], dim=1)
                with torch.no_grad():
                    h = tiny_policy.model(full, output_hidden_states=True).hidden_states[-1][0, -1]
                checked.append(torch.allclose(step.last_hidden[p, j], h, atol=1e-4))
        return Selection(torch.tensor([1, 0]))

    eng.decode(prompts, k=3, block_size=5, max_new_tokens=12, selector=selector, seed=2, hidden=True)
    assert len(checked) == 3 * 2 * 3 and all(checked)


def _row_logprobs(policy, engine, prompt, ids):
    return _full_logprobs(policy, engine, prompt, ids)


@pytest.mark.parametrize("share_prefix", [0, 8])
def test_row_prompts_and_reprefill_match_full_forward(tiny_policy, share_prefix):
    """Rows with their own prompts; after parents move rows between prompts, a re-prefilled row's next
    tokens are scored under ITS OWN prompt + the copied tokens (checked against a fresh full forward pass),
    and only rows whose prompt differs from their parent's are re-prefilled."""
    group = [to_prompt(PROMPTS[0]), to_prompt(PROMPTS[1])]
    rows = [[to_prompt(PROMPTS[0]), to_prompt(PROMPTS[2]), to_prompt("Name a colour.")],
            [to_prompt(PROMPTS[1]), to_prompt(PROMPTS[1]), to_prompt("Say something kind.")]]  # fmt: skip
    eng = TransformersBackend(tiny_policy, SamplingConfig(temperature=1.0), share_prefix=share_prefix)
    seen = []

    def selector(step: BlockStep) -> Selection:
        seen.append(step.token_ids.clone())
        assert step.row_prompts == rows
        # group 0: row 1 copies row 2 (different prompt: re-prefill); group 1: row 1 copies row 0 (same prompt)
        parents = torch.tensor([[0, 2, 2], [0, 0, 2]])
        return Selection(torch.tensor([1, 1]), parents=parents)

    res = eng.decode(group, k=3, block_size=4, max_new_tokens=12, selector=selector, seed=5, keep_all=True,
                     row_prompts=rows)  # fmt: skip
    assert len(seen) == 3
    # after block 0, row 1 of group 0 continues from row 2's tokens
    assert torch.equal(seen[1][0, 1, :4], seen[0][0, 2, :4])
    assert torch.equal(seen[1][1, 1, :4], seen[0][1, 0, :4])
    for p in range(2):
        for j in range(3):
            r = res[p].rows[j]
            if r.finished:
                continue
            ref = _row_logprobs(tiny_policy, eng, rows[p][j], r.token_ids)
            # tokens copied from another row were drawn under that row's prompt; every token drawn by
            # this row itself (the last block) must be scored under its own prompt
            assert torch.allclose(torch.tensor(r.token_logprobs[8:]), ref[8:], atol=1e-4), (p, j)
    # the copied row keeps its own prompt in the result
    assert res[0].rows[1].row_prompt == rows[0][1]


def test_recache_copy_continues_under_parent_prompt(tiny_policy):
    """recache='copy': a moved row takes its parent's cache whole, so it continues under the parent's prompt."""
    group = [to_prompt(PROMPTS[0])]
    rows = [[to_prompt(PROMPTS[0]), to_prompt(PROMPTS[2])]]
    eng = TransformersBackend(tiny_policy, SamplingConfig(temperature=1.0))

    def selector(step: BlockStep) -> Selection:
        return Selection(torch.tensor([0]), parents=torch.tensor([[0, 0]]))

    res = eng.decode(group, k=2, block_size=3, max_new_tokens=6, selector=selector, seed=1, keep_all=True,
                     row_prompts=rows, recache="copy")  # fmt: skip
    r = res[0].rows[1]
    if not r.finished:
        under_parent = _row_logprobs(tiny_policy, eng, rows[0][0], r.token_ids)
        assert torch.allclose(torch.tensor(r.token_logprobs), under_parent, atol=1e-4)


def test_policy_tokens_count_prefill_and_running_rows(tiny_policy):
    """policy_tokens: each distinct prompt of a group prefilled once, then one token per running row."""
    eng = TransformersBackend(tiny_policy, SamplingConfig(temperature=0))
    p = to_prompt(PROMPTS[1])
    n_prompt = len(eng.tok(eng.render(p), add_special_tokens=False).input_ids)
    res = eng.decode([p], k=3, block_size=5, max_new_tokens=5)
    # greedy rows are identical; the last sampled token is never fed
    assert not res[0].finished
    assert res[0].policy_tokens == n_prompt + 3 * 4
    rows = [[p, p, to_prompt(PROMPTS[0])]]
    n0 = len(eng.tok(eng.render(rows[0][2]), add_special_tokens=False).input_ids)
    res = eng.decode([p], k=3, block_size=5, max_new_tokens=5, row_prompts=rows, keep_all=True)
    # a row that ended at token t was fed t tokens (its end-of-turn included), never the 5th
    fed = [min(len(r.token_ids) + 1, 4) if r.finished else 4 for r in res[0].rows]
    assert res[0].rows[2].finished  # the other prompt ends early here: the count must stop with it
    assert res[0].policy_tokens == n_prompt + n0 + sum(fed)


def test_shared_prefix_prefill_matches_the_plain_one(tiny_policy):
    """share_prefix: the prompts' common token prefix is prefilled once and each suffix on top of it; the rows'
    tokens and log-probs are those of the plain prefill (greedy), and the prefix is read once in all."""
    system = "You rewrite requests. Keep every number, name and format of the request. " * 3
    prompts = [to_prompt(p) for p in PROMPTS]
    plain = TransformersBackend(tiny_policy, SamplingConfig(temperature=0), system_prompt=system)
    shared = TransformersBackend(tiny_policy, SamplingConfig(temperature=0), system_prompt=system, share_prefix=16)
    a = plain.decode(prompts, k=2, block_size=3, max_new_tokens=9, keep_all=True)
    b = shared.decode(prompts, k=2, block_size=3, max_new_tokens=9, keep_all=True)
    ids = [plain.tok(plain.render(p), add_special_tokens=False).input_ids for p in prompts]
    common = next(i for i in range(min(map(len, ids))) if len({tuple(x[: i + 1]) for x in ids}) > 1)
    assert common >= 16
    for ra, rb in zip(a, b):
        assert [r.token_ids for r in ra.rows] == [r.token_ids for r in rb.rows]
        for x, y in zip(ra.rows, rb.rows):
            assert torch.allclose(torch.tensor(x.token_logprobs), torch.tensor(y.token_logprobs), atol=1e-4)
    assert sum(r.policy_tokens for r in a) - sum(r.policy_tokens for r in b) == (len(prompts) - 1) * common
    # a shorter shared prefix than asked for: the plain prefill
    assert TransformersBackend(tiny_policy, share_prefix=10**6)._prefill_shared(
        [plain.render(p) for p in prompts], None, False) is None  # fmt: skip


def test_bad_parents_and_row_prompts(tiny_policy):
    eng = TransformersBackend(tiny_policy)
    p = [to_prompt("hello")]
    with pytest.raises(MoalignError, match="parents"):
        eng.decode(p, k=2, block_size=2, max_new_tokens=4,
                   selector=lambda s: Selection(torch.tensor([0]), parents=torch.tensor([[0, 2]])))  # fmt: skip
    with pytest.raises(MoalignError, match="row_prompts"):
        eng.decode(p, k=2, block_size=2, max_new_tokens=4, row_prompts=[[p[0]]])
    with pytest.raises(MoalignError, match="recache"):
        eng.decode(p, k=2, block_size=2, max_new_tokens=4, recache="bogus")


def test_tiny_policy_is_not_degenerate(tiny_policy):
    """The tiny model's greedy outputs differ between prompts, vary within a response, and end with
    end-of-turn on some prompts but not all (so greedy/EOS tests exercise both paths)."""
    prompts = [to_prompt(p) for p in PROMPTS + ["Say hi", "Name a fruit", "Count to three", "Why?"]]
    eng = TransformersBackend(tiny_policy, SamplingConfig(temperature=0))
    res = eng.decode(prompts, k=1, block_size=23, max_new_tokens=23)
    assert len({tuple(r.token_ids) for r in res}) == len(res)
    assert all(len(set(r.token_ids)) > 1 for r in res if len(r.token_ids) > 1)
    assert any(r.finished for r in res) and not all(r.finished for r in res)


def test_sample_categorical_draws_the_given_distribution():
    """The inverse-CDF sampler against the exact probabilities (a chi-square test per row, one with zeros
    from top-k/top-p masking that must never be drawn)."""
    from scipy import stats

    from moalign.decoding.in_process import sample_categorical

    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0], [0.0, 0.0, 0.7, 0.0, 0.3], [0.2] * 5])
    n = 20000
    draws = torch.stack([sample_categorical(probs, g) for _ in range(n)], dim=1)  # [3, n]
    for row in range(3):
        counts = torch.bincount(draws[row], minlength=5).double()
        p = probs[row].double()
        assert counts[p == 0].sum() == 0  # a masked token is never drawn
        keep = p > 0
        chi2 = stats.chisquare(counts[keep].numpy(), (n * p[keep]).numpy())
        assert chi2.pvalue > 1e-3, (row, counts.tolist())
    # the same seed draws the same indices; a sharp distribution is drawn exactly
    a = sample_categorical(probs, torch.Generator().manual_seed(5))
    b = sample_categorical(probs, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    one_hot = torch.zeros(4, 7)
    one_hot[torch.arange(4), torch.tensor([6, 0, 3, 1])] = 1.0
    assert sample_categorical(one_hot, g).tolist() == [6, 0, 3, 1]
