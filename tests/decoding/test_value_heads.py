"""CD-FUDGE value heads: closed-form fit vs a generic least-squares solver, learning a text-determined
objective on a tiny policy, save/load, the decode-time value function, and the train/decode consistency checks."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from moalign.data.prompts import to_prompt
from moalign.decoding.backend import BlockStep
from moalign.decoding.value_heads import (
    HeadValueFunction,
    ValueHeads,
    check_compatible,
    load_value_function,
    load_value_heads,
    prompt_token_ids,
    save_value_heads,
)
from moalign.decoding.values import ObjectiveScorer
from moalign.errors import MoalignError
from moalign.objectives.base import CallableObjective
from moalign.objectives.normalize import NormStats
from moalign.policies import Policy, eos_token_ids, load_policy
from moalign.training.values import TrainValuesConfig, fit_ridge, train_values, value_error_report

pytestmark = pytest.mark.usefixtures("one_thread")


def e_frac(prompts, responses):
    """Fraction of the characters of the response that are 'e' (determined by the text alone)."""
    return [sum(c == "e" for c in r) / max(1, len(r)) for r in responses]


def e_objectives():
    return [
        CallableObjective("e_frac", e_frac),
        CallableObjective("len_chars", lambda p, r: [len(x) / 50 for x in r]),
    ]


@pytest.fixture(scope="module")
def e_policy(tmp_path_factory, policy_tokenizer_dir) -> Policy:
    """A tiny random Llama whose token embeddings carry a direction for 'token contains e'.

    With tied embeddings this makes the fraction of e-tokens self-reinforcing, so the final fraction of
    'e' in a sampled response is predictable from its prefix (and readable from the hidden states).
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(policy_tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    has_e = torch.tensor([("e" in t) for t in vocab], dtype=torch.float32)
    with torch.no_grad():
        d = torch.randn(64)
        d /= d.norm()
        E = model.model.embed_tokens.weight
        E += 3.0 * (has_e - has_e.mean())[:, None] * d[None] * E.norm(dim=1).mean()
    path = tmp_path_factory.mktemp("e_policy")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return load_policy(str(path))


PROMPTS = [to_prompt(f"Write about thing number {i}.") for i in range(16)]


def _cfg(out, **kw) -> TrainValuesConfig:
    base = dict(output_dir=str(out), n_prompts=16, n_samples=4, max_new_tokens=16, heldout=0.25, seed=0)
    return TrainValuesConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(e_policy, tmp_path_factory):
    out = tmp_path_factory.mktemp("heads")
    res = train_values(_cfg(out), policy=e_policy, objectives=e_objectives(), prompts=PROMPTS)
    return out, res


# ----------------------------------------------------------------------------------------- the fit itself
def test_fit_ridge_matches_generic_least_squares():
    """Weighted ridge with an unpenalised intercept == lstsq on the augmented system (scipy, float64)."""
    from scipy.linalg import lstsq

    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(60, 7)), rng.normal(size=(60, 3))
    w = rng.uniform(0.1, 1.0, size=60)
    w /= w.sum()
    alphas = np.array([0.0, 1e-3, 0.5])
    for (B, c), a in zip(fit_ridge(X, Y, w, alphas), alphas):
        sw = np.sqrt(w)[:, None]
        A = np.vstack([np.hstack([sw * X, sw]), np.hstack([np.sqrt(a) * np.eye(7), np.zeros((7, 1))])])
        rhs = np.vstack([sw * Y, np.zeros((7, 3))])
        sol = lstsq(A, rhs)[0]
        np.testing.assert_allclose(B, sol[:7], atol=1e-9)
        np.testing.assert_allclose(c, sol[7], atol=1e-9)


def test_value_error_report_matches_direct_computation():
    heads = ValueHeads(3, ["a"], "linear")
    with torch.no_grad():
        heads.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
    feats = [torch.tensor([[0.0, 0, 0], [1.0, 0, 0]]), torch.tensor([[2.0, 0, 0], [2.0, 0, 0], [2.0, 0, 0]])]
    targets = np.array([[1.0], [0.0]])
    rep = value_error_report(heads, feats, targets, [0, 1], baseline=np.array([0.5]))
    # per response: mean_t (v_t - r)^2 -> (1 + 0)/2 and (4+4+4)/3 ; 'all' averages responses
    assert rep["all"]["mse"]["a"] == pytest.approx((0.5 + 4.0) / 2)
    assert rep["all"]["baseline_mse"]["a"] == pytest.approx(0.25)
    assert rep["final"]["mse"]["a"] == pytest.approx((0.0 + 4.0) / 2)
    assert rep["buckets"][0]["n"] == 5 and rep["buckets"][0]["mse"]["a"] == pytest.approx((1 + 0 + 12) / 5)


# ------------------------------------------------------------------------------------------- training
def test_training_beats_mean_baseline_and_improves_with_prefix(trained):
    out, res = trained
    held = res["heldout"]
    all_mse, base = held["all"]["mse"]["e_frac"], held["all"]["baseline_mse"]["e_frac"]
    assert all_mse < 0.7 * base, held
    buckets = {b["prefix"]: b["mse"]["e_frac"] for b in held["buckets"]}
    assert buckets["9-16"] < buckets["1-4"]  # longer prefixes say more about the final reward
    assert res["data"]["heldout_prompts"] == 4 and res["data"]["responses"] == 64
    meta = json.loads((out / "value_heads.json").read_text())
    assert meta["norm"]["names"] == ["e_frac", "len_chars"] and meta["seed"] == 0
    assert meta["template"]["chat_template_sha256"] and "versions" in meta and "report" in meta


def test_mlp_head_beats_mean_baseline(e_policy, tmp_path):
    res = train_values(_cfg(tmp_path, head="mlp", max_steps=200, learning_rate=3e-3), policy=e_policy,
                       objectives=e_objectives(), prompts=PROMPTS)  # fmt: skip
    held = res["heldout"]["all"]
    assert held["mse"]["e_frac"] < 0.8 * held["baseline_mse"]["e_frac"], held
    assert res["fit"]["loss_kept"] < res["fit"]["loss_first"]


def test_training_is_seeded(e_policy, trained, tmp_path):
    out, res = trained
    again = train_values(_cfg(tmp_path), policy=e_policy, objectives=e_objectives(), prompts=PROMPTS)
    assert again["heldout"] == res["heldout"]
    a, _, _ = load_value_heads(out)
    b, _, _ = load_value_heads(tmp_path)
    assert torch.equal(a.weight, b.weight)


def test_bad_config_raises(e_policy, tmp_path):
    with pytest.raises(MoalignError, match="--output-dir"):
        train_values(TrainValuesConfig(output_dir=""), policy=e_policy, objectives=e_objectives(), prompts=PROMPTS)
    with pytest.raises(MoalignError, match="heldout"):
        _cfg(tmp_path, heldout=1.0).validate()
    with pytest.raises(MoalignError, match="head"):
        _cfg(tmp_path, head="transformer").validate()
    with pytest.raises(MoalignError, match="constant"):
        const = [CallableObjective("c", lambda p, r: [1.0] * len(r))]
        train_values(_cfg(tmp_path, max_new_tokens=4), policy=e_policy, objectives=const, prompts=PROMPTS[:4])


# ------------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_save_load_round_trip_identical(tmp_path, kind):
    torch.manual_seed(1)
    heads = ValueHeads(8, ["a", "b"], kind, width=5)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_()
        heads.feat_mean.normal_()
        heads.feat_std.uniform_(0.5, 2.0)
    meta = {"format": "moalign-value-heads/1", "head": heads.spec()}
    probe = torch.randn(8)
    save_value_heads(heads, meta, tmp_path, probe_hidden=probe)
    loaded, meta2, probe2 = load_value_heads(tmp_path / "value_heads.json")
    x = torch.randn(4, 3, 8)
    assert torch.equal(loaded(x), heads(x)) and torch.equal(probe2, probe) and meta2 == meta


def test_load_errors(tmp_path):
    with pytest.raises(MoalignError, match="no value heads"):
        load_value_heads(tmp_path)


# ------------------------------------------------------------------------------ decode-time value function
def _step(policy: Policy, prompts, K=3, T=6, seed=0) -> BlockStep:
    """A BlockStep with random response tokens; candidate (0, 1) ends after 2 tokens (EOS, then padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 5000, (len(prompts), K, T), generator=g)
    eos = eos_token_ids(policy.tokenizer, policy.model)[0]
    ids[0, 1, 1] = eos
    ids[0, 1, 2:] = policy.tokenizer.pad_token_id
    done = torch.zeros(len(prompts), K, dtype=torch.bool)
    done[0, 1] = True
    texts = [
        [policy.tokenizer.decode(r, skip_special_tokens=True) for r in ids[p]] for p in range(len(prompts))
    ]
    return BlockStep(prompts=list(prompts), prompt_indices=list(range(len(prompts))), texts=texts,
                     token_ids=ids, done=done, block_index=0, final=False)  # fmt: skip


@torch.no_grad()
def _reference_hidden(policy: Policy, step: BlockStep, system_prompt=None) -> torch.Tensor:
    """Each candidate alone (no padding, no batching): hidden state after its last valid token."""
    eos = set(eos_token_ids(policy.tokenizer, policy.model))
    P, K, T = step.token_ids.shape
    out = torch.zeros(P, K, policy.model.config.hidden_size)
    for p in range(P):
        pid = prompt_token_ids(policy.tokenizer, step.prompts[p], system_prompt)
        for k in range(K):
            row = step.token_ids[p, k].tolist()
            n = next((i + 1 for i, t in enumerate(row) if t in eos), T)
            ids = torch.tensor([pid + row[:n]])
            out[p, k] = policy.model(ids, output_hidden_states=True).hidden_states[-1][0, -1]
    return out


def test_value_fn_matches_direct_head_evaluation(e_policy, trained):
    out, _ = trained
    prompts = [to_prompt("Short one."), to_prompt("A somewhat longer prompt about many things.")]
    step = _step(e_policy, prompts)
    heads, meta, _ = load_value_heads(out)
    ref_h = _reference_hidden(e_policy, step)
    z = heads(ref_h)  # head z-scores [P, K, G]

    # no scorer: the heads' own z-scores
    vf = load_value_function(out, e_policy)
    v = vf(step)
    assert v.shape == (2, 3, 2)
    torch.testing.assert_close(v, z, atol=1e-4, rtol=1e-4)

    # scorer with other statistics and reversed objective order: z -> raw -> scorer's z-score
    train_norm = NormStats.from_dict(meta["norm"])
    sc_norm = NormStats(mean=[0.3, 0.1], std=[2.0, 0.05], names=["len_chars", "e_frac"])
    scorer = ObjectiveScorer(list(reversed(e_objectives())), sc_norm)
    v2 = load_value_function(out, e_policy, scorer)(step)
    # raw units, columns (e_frac, len_chars)
    raw = z.double() * torch.tensor(train_norm.std) + torch.tensor(train_norm.mean)
    expect = (raw.flip(-1) - torch.tensor(sc_norm.mean)) / torch.tensor(sc_norm.std)
    torch.testing.assert_close(v2, expect.float(), atol=1e-3, rtol=1e-4)

    # raw scorer: raw units
    v3 = load_value_function(out, e_policy, ObjectiveScorer(e_objectives()))(step)
    torch.testing.assert_close(v3, raw.float(), atol=1e-4, rtol=1e-4)

    # what the heads cost: their own forward pass reads each prompt + candidate (through its end-of-turn
    # token: 2 tokens for candidate (0, 1), all 6 for the others), counted as scorer tokens, K pairs a prompt
    from moalign.decoding.backend import ScoringCost

    step.cost = ScoringCost()
    vf(step)
    n_prompt = [len(prompt_token_ids(e_policy.tokenizer, p, None)) for p in prompts]
    assert step.cost.pairs == {0: 3, 1: 3}
    assert step.cost.tokens == {0: 3 * n_prompt[0] + 6 + 2 + 6, 1: 3 * n_prompt[1] + 18}

    # the engine-hook path: hidden states supplied on the step are used as they are (no forward pass, no
    # tokens read by the scorer)
    step.last_hidden = ref_h
    step.cost = ScoringCost()
    torch.testing.assert_close(vf(step), z, atol=1e-6, rtol=1e-6)
    assert step.cost.pairs == {0: 3, 1: 3} and step.cost.tokens == {0: 0, 1: 0}


def test_value_heads_drive_rmod_generation(e_policy, trained):
    from moalign.config import GenerateConfig
    from moalign.generate import generate

    out, _ = trained
    cfg = GenerateConfig(method="rmod", values=str(out), k=3, block_size=4, max_new_tokens=8, lam=0.5,
                         normalize="none", objectives="e_frac,len_chars", batch_size=2)  # fmt: skip
    recs = generate(cfg, policy=e_policy, objectives=e_objectives(), prompts=PROMPTS[:2], progress=False)
    assert len(recs) == 2
    assert all(len(r["trace"]) == 2 and len(r["trace"][0]["weights"]) == 2 for r in recs)


def test_missing_objective_raises(e_policy, trained):
    out, _ = trained
    scorer = ObjectiveScorer([*e_objectives(), CallableObjective("other", e_frac)])
    with pytest.raises(MoalignError, match="other"):
        load_value_function(out, e_policy, scorer)


# ------------------------------------------------------------------------------------ consistency checks
def test_template_mismatch_raises(e_policy, trained):
    out, _ = trained
    _, meta, probe = load_value_heads(out)
    check_compatible(meta, probe, e_policy, system_prompt=None)  # the matching policy passes
    tok = copy.deepcopy(e_policy.tokenizer)
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    other = Policy(model=e_policy.model, tokenizer=tok, name=e_policy.name, source=e_policy.source)
    with pytest.raises(MoalignError, match="chat template"):
        load_value_function(out, other)


def test_system_prompt_mismatch_raises(e_policy, trained):
    out, _ = trained
    with pytest.raises(MoalignError, match="system prompt"):
        load_value_function(out, e_policy, system_prompt="You are a pirate.")


def test_policy_mismatch_raises(e_policy, tiny_policy, trained):
    out, _ = trained
    with pytest.raises(MoalignError, match="hidden size"):
        load_value_function(out, tiny_policy)
    model = copy.deepcopy(e_policy.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    changed = Policy(model=model, tokenizer=e_policy.tokenizer, name="changed", source="memory")
    with pytest.raises(MoalignError, match="policy mismatch"):
        load_value_function(out, changed)
    assert isinstance(load_value_function(out, changed, check=False), HeadValueFunction)


# ------------------------------------------------------------------------------------------ real policy
@pytest.mark.real
def test_real_policy_value_heads(real_policy, tmp_path):
    """The bundled policy with two no-training objectives: fit, save, load, value a real engine step."""
    from moalign.decoding.in_process import TransformersBackend

    prompts = [to_prompt(q) for q in ["Name a fruit.", "How do I boil an egg?", "Say something nice.",
               "What is the capital of France?", "Describe rain.", "Give me a tip for sleeping well."]]  # fmt: skip
    cfg = TrainValuesConfig(output_dir=str(tmp_path), objectives="concise,positive", n_prompts=6, n_samples=3,
                            max_new_tokens=12, heldout=0.34, seed=0)  # fmt: skip
    res = train_values(cfg, policy=real_policy, prompts=prompts)
    train = json.loads((tmp_path / "value_heads.json").read_text())["report"]["train"]["all"]
    for g in ("concise", "positive"):
        assert train["mse"][g] < train["baseline_mse"][g]
    assert set(res["heldout"]["all"]["mse"]) == {"concise", "positive"}

    vf = load_value_function(tmp_path, real_policy, system_prompt=None)
    eng = TransformersBackend(real_policy)
    seen = {}

    def selector(step):
        seen["v"] = vf(step)
        seen["ref"] = vf.from_hidden(_reference_hidden(real_policy, step))
        from moalign.decoding.backend import Selection

        return Selection(torch.zeros(len(step.prompts), dtype=torch.long))

    eng.decode(prompts[:2], k=2, block_size=4, max_new_tokens=4, selector=selector, seed=0)
    assert seen["v"].shape == (2, 2, 2) and torch.isfinite(seen["v"]).all()
    torch.testing.assert_close(seen["v"], seen["ref"], atol=2e-3, rtol=1e-3)


def test_decoding_does_not_import_training():
    """Inference-time value heads (cd/rmod --values) load without the training code."""
    import ast
    from pathlib import Path

    import moalign.decoding

    for f in Path(moalign.decoding.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "moalign.training" or n.startswith("moalign.training.") for n in names), f
