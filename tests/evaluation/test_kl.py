"""The sampled KL estimate against the exact KL, enumerated over every response of two tiny random models."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from moalign.errors import MoalignError
from moalign.evaluation.kl import completion_logps, sample_completions, sampled_kl, sequence_log_ratios

pytestmark = pytest.mark.usefixtures("one_thread")
V, T, EOS, PAD = 6, 3, 5, 0


def tiny(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, eos_token_id=EOS, pad_token_id=PAD)  # fmt: skip
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper than the init so that the two distributions differ visibly
        m.lm_head.weight.mul_(4.0)
    return m


def log_prob(model, prompt: list[int], response: tuple[int, ...]) -> float:
    """log p(response | prompt), one unpadded forward per token, in float64 (independent of the batching)."""
    total = 0.0
    for k, t in enumerate(response):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + list(response[:k])])).logits[0, -1].double()
        total += float(torch.log_softmax(logits, -1)[t])
    return total


def exact_kl(p_model, q_model, prompt: list[int]) -> float:
    """sum over every response (cut at the first EOS, at most T tokens) of p * (log p - log q)."""
    responses = sorted({tuple(s[: next((k + 1 for k, t in enumerate(s) if t == EOS), T)])
                        for s in itertools.product(range(V), repeat=T)})  # fmt: skip
    lp = np.array([log_prob(p_model, prompt, r) for r in responses])
    lq = np.array([log_prob(q_model, prompt, r) for r in responses])
    assert abs(np.exp(lp).sum() - 1) < 1e-9  # the responses enumerate the whole distribution
    return float((np.exp(lp) * (lp - lq)).sum())


def test_sampled_kl_covers_the_exact_kl():
    p_model, q_model = tiny(1), tiny(2)
    prompt = [1, 2, 3]
    exact = exact_kl(p_model, q_model, prompt)
    assert exact > 0.05  # the two models differ enough for the test to mean something
    samples = sample_completions(p_model, [prompt], n=3000, max_new_tokens=T, eos_ids=[EOS], pad_id=PAD, seed=0)[0]
    assert all(len(s) <= T and (EOS not in s[:-1]) for s in samples)
    lr = sequence_log_ratios(p_model, q_model, [prompt] * len(samples), samples, PAD, batch_size=256)
    half = 3.29 * lr.std(ddof=1) / math.sqrt(len(lr))  # a 99.9% normal interval for the mean
    assert abs(lr.mean() - exact) <= half, (lr.mean(), exact, half)
    assert half < 0.2 * exact  # and the interval is narrow enough to have been able to miss


def test_batched_sampling_covers_each_prompts_exact_kl():
    """Prompts of different lengths decoded together (left-padded): each prompt's estimate covers its own KL."""
    p_model, q_model = tiny(1), tiny(2)
    prompts = [[1, 2, 3], [4], [2, 2, 1, 4, 3]]
    samples, logps = sample_completions(p_model, prompts, n=1500, max_new_tokens=T, eos_ids=[EOS], pad_id=PAD,
                                        seed=1, batch_prompts=3, return_logps=True)  # fmt: skip
    assert [len(s) for s in samples] == [1500] * 3
    for prompt, rows, lp in zip(prompts, samples, logps):
        # the sampler's own log-probabilities are the sequences' exact ones (left padding changed nothing)
        for r, v in list(zip(rows, lp))[:5]:
            assert abs(v - log_prob(p_model, prompt, tuple(r))) < 1e-4
        lr = np.array(lp) - completion_logps(q_model, [prompt] * len(rows), rows, PAD, batch_size=256)
        half = 3.29 * lr.std(ddof=1) / math.sqrt(len(lr))
        assert abs(lr.mean() - exact_kl(p_model, q_model, prompt)) <= half


def test_log_ratios_ignore_padding_and_batching():
    p_model, q_model = tiny(3), tiny(4)
    prompts = [[1, 2], [3, 1, 4, 2]]
    comps = [[4], [2, 3, EOS]]
    together = sequence_log_ratios(p_model, q_model, prompts, comps, PAD, batch_size=2)
    alone = np.concatenate([sequence_log_ratios(p_model, q_model, [p], [c], PAD) for p, c in zip(prompts, comps)])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert np.all(sequence_log_ratios(p_model, p_model, prompts, comps, PAD) == 0)
    with pytest.raises(MoalignError, match="2 prompts but 1 completions"):
        sequence_log_ratios(p_model, q_model, prompts, comps[:1], PAD)


@pytest.mark.real
def test_sampled_kl_on_the_real_policy(real_policy):
    from moalign.data.prompts import load_prompts

    prompts = load_prompts(["Name a color.", "Say hello to a friend."])
    same = sampled_kl(real_policy, real_policy, prompts, n=2, max_new_tokens=8, seed=0)
    # the sampler's log-probs (cached, left-padded decoding) and the reference's forward agree to float noise
    assert abs(same["mean"]) < 1e-4 and len(same["per_prompt"]) == 2 and 1 <= same["tokens"] <= 8
    with pytest.raises(MoalignError, match="at least one prompt"):
        sampled_kl(real_policy, real_policy, [], n=2)
