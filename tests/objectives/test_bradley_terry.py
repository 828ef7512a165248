"""Bradley-Terry reward models: loss and fit against a float64 reference, training, save/load, backbones."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from moalign.errors import MoalignError
from moalign.objectives.bradley_terry import BradleyTerryObjective, PolicyBackbone
from moalign.training.reward import TrainRewardConfig, bt_loss, fit_head, pairwise_accuracy, train_reward


def test_bt_loss_matches_closed_form_float64():
    g = torch.Generator().manual_seed(0)
    rc, rr = torch.randn(50, generator=g) * 10, torch.randn(50, generator=g) * 10
    ref = np.mean([-np.log(1.0 / (1.0 + np.exp(-(a - b)))) if a - b > -30 else -(a - b)
                   for a, b in zip(rc.double().numpy(), rr.double().numpy())])  # fmt: skip
    assert bt_loss(rc.double(), rr.double()).item() == pytest.approx(ref, rel=1e-10)
    # extreme margins stay finite
    assert torch.isfinite(bt_loss(torch.tensor([-1e4]), torch.tensor([1e4])))


def test_pairwise_accuracy_ties_count_half():
    assert pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 4.0, -1.0])) == 0.625


def _synthetic(n=400, d=6, seed=0):
    """Pairs whose preference follows a Bradley-Terry model with a known linear reward."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g)
    a, b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    p = torch.sigmoid(a @ w - b @ w)
    first = torch.rand(n, generator=g) < p
    xc = torch.where(first[:, None], a, b)
    xr = torch.where(first[:, None], b, a)
    return xc, xr


def test_linear_head_reaches_the_bt_maximum_likelihood_scipy_reference():
    from scipy.optimize import minimize

    xc, xr = _synthetic()
    head = fit_head(xc, xr, hidden=0, epochs=300, lr=0.05, weight_decay=0.0, batch_size=400, seed=0)
    # independent reference: the same convex negative log-likelihood in float64 by BFGS
    both = torch.cat([xc, xr]).double()
    std = both.std(0).numpy()
    z = ((xc - xr).double().numpy()) / std  # the mean cancels in r(c) - r(r)

    def nll(w):
        m = z @ w
        return np.mean(np.logaddexp(0.0, -m)), -(z * (1 - 1 / (1 + np.exp(-m)))[:, None]).mean(0)

    ref = minimize(nll, np.zeros(z.shape[1]), jac=True, method="BFGS", options={"gtol": 1e-10})
    w = head.net.weight.detach().double().numpy().ravel()
    assert nll(w)[0] == pytest.approx(ref.fun, abs=1e-5)
    np.testing.assert_allclose(w, ref.x, atol=2e-2)


def test_fit_head_is_seeded_and_mlp_learns():
    xc, xr = _synthetic(n=300)
    h1 = fit_head(xc, xr, hidden=8, epochs=20, lr=1e-2, seed=3)
    h2 = fit_head(xc, xr, hidden=8, epochs=20, lr=1e-2, seed=3)
    h3 = fit_head(xc, xr, hidden=8, epochs=20, lr=1e-2, seed=4)
    for a, b in zip(h1.state_dict().values(), h2.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(h1.net[0].weight, h3.net[0].weight)
    with torch.no_grad():
        assert pairwise_accuracy(h1(xc), h1(xr)) > 0.75
    with pytest.raises(MoalignError, match="shapes"):
        fit_head(xc, xr[:, :3])


def test_config_fields_are_simple_flags_with_help():
    allowed = {"str", "int", "float", "bool", "str | None", "int | None"}
    for f in dataclasses.fields(TrainRewardConfig):
        assert str(f.type) in allowed, (f.name, f.type)
        assert f.metadata.get("help"), f.name
    for bad, msg in (({"data": ""}, "--data"), ({"objective": ""}, "--objective"),
                     ({"heldout_frac": 1.0}, "--heldout-frac"), ({"num_train_epochs": 0}, "--num-train-epochs")):  # fmt: skip
        cfg = TrainRewardConfig(data="x.jsonl", objective="o", output_dir="d")
        cfg = dataclasses.replace(cfg, **bad)
        with pytest.raises(MoalignError, match=msg):
            cfg.validate()


POLITE = [
    ("How do I fix a flat tyre?", "Remove the wheel, find the puncture, patch it and re-inflate the tyre.", "Figure it out yourself, idiot."),
    ("Can you recommend a book?", "You might enjoy 'The Hobbit' by J.R.R. Tolkien, a warm adventure story.", "Books are boring, stop asking."),
    ("What's a good breakfast?", "Oatmeal with fruit and nuts is filling and healthy.", "Who cares what you eat."),
    ("How can I sleep better?", "Keep a regular schedule, avoid screens before bed and keep the room cool.", "Just stop whining."),
    ("How do I learn Python?", "Start with the official tutorial, then build small projects that interest you.", "You're too dumb to code."),
    ("Tips for a job interview?", "Research the company, prepare examples of your work and ask thoughtful questions.", "Don't bother, you'll fail."),
]  # fmt: skip


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("bt_data")
    path = d / "pairs.jsonl"
    with open(path, "w") as f:
        for i in range(4):
            for p, c, r in POLITE:
                f.write(json.dumps({"prompt": f"{p} (variant {i})", "chosen": c, "rejected": r}) + "\n")
    return path


def test_train_reward_reproducible_saves_and_round_trips(pair_file, tmp_path):
    cfg = TrainRewardConfig(data=str(pair_file), objective="polite", output_dir=str(tmp_path / "a"),
                            heldout_frac=0.25, seed=0, num_train_epochs=20)  # fmt: skip
    m1 = train_reward(cfg)
    m2 = train_reward(dataclasses.replace(cfg, output_dir=str(tmp_path / "b")))
    assert m1["n_train"] + m1["n_heldout"] == m1["n_pairs"] == 24
    assert m1["train_accuracy"] > 0.9  # beats chance on its training data
    assert {k: v for k, v in m1.items() if "seconds" not in k and k != "output_dir"} == {
        k: v for k, v in m2.items() if "seconds" not in k and k != "output_dir"
    }
    a, b = (
        (tmp_path / "a" / "head.safetensors").read_bytes(),
        (tmp_path / "b" / "head.safetensors").read_bytes(),
    )
    assert a == b
    conf = json.loads((tmp_path / "a" / "reward_config.json").read_text())
    assert conf["objective"] == "polite" and conf["backbone"] == "minilm" and conf["seed"] == 0
    assert conf["metrics"]["heldout_accuracy"] == m1["heldout_accuracy"]
    assert "moalign train reward" in (tmp_path / "a" / "README.md").read_text()
    assert (tmp_path / "a" / "head.safetensors").stat().st_size < 5_000_000

    obj = BradleyTerryObjective.load(tmp_path / "a")
    assert obj.name == "polite"
    prompts = [p for p, _, _ in POLITE]
    s_c = obj.score(prompts, [c for _, c, _ in POLITE])
    s_r = obj.score(prompts, [r for _, _, r in POLITE])
    assert (s_c > s_r).float().mean() > 0.8  # generalises to unseen prompt variants
    # round trip: a second load scores identically; rm:PATH resolves to the same model
    from moalign.objectives import get_objective

    again = BradleyTerryObjective.load(tmp_path / "a").score(prompts, [c for _, c, _ in POLITE])
    assert torch.equal(s_c, again)
    via_rm = get_objective(f"rm:{tmp_path / 'a'}")
    assert isinstance(via_rm, BradleyTerryObjective)
    assert torch.equal(via_rm.score(prompts, [c for _, c, _ in POLITE]), s_c)
    assert torch.isfinite(obj.score(["hi"], [""])).all()


def test_load_errors(tmp_path):
    with pytest.raises(MoalignError, match="not a Bradley-Terry"):
        BradleyTerryObjective.load(tmp_path)
    (tmp_path / "reward_config.json").write_text(json.dumps({"format": "other"}))
    (tmp_path / "head.safetensors").write_bytes(b"")
    with pytest.raises(MoalignError, match="unknown reward model format"):
        BradleyTerryObjective.load(tmp_path)


def test_cli_train_reward(pair_file, tmp_path, capsys):
    cli = pytest.importorskip("moalign.cli")
    out = tmp_path / "rm"
    rc = cli.main(["train", "reward", "--data", str(pair_file), "--objective", "polite",
                   "--output-dir", str(out), "--num-train-epochs", "5", "--limit", "12"])  # fmt: skip
    assert rc == 0
    conf = json.loads((out / "reward_config.json").read_text())
    assert conf["metrics"]["n_pairs"] == 12 and conf["train_config"]["num_train_epochs"] == 5
    # the old spellings: one line naming the new flag
    for old, new in (("--epochs", "--num-train-epochs"), ("--lr", "--learning-rate"),
                     ("--batch-size", "--per-device-train-batch-size")):  # fmt: skip
        assert cli.main(["train", "reward", "--data", str(pair_file), "--objective", "p", "--output-dir",
                         str(out), old, "5"]) == 2  # fmt: skip
        assert f"{old} was renamed: use {new}" in capsys.readouterr().err
    cfg = tmp_path / "old.json"
    cfg.write_text(json.dumps({"data": str(pair_file), "objective": "p", "output_dir": str(out), "lr": 0.1}))
    assert cli.main(["train", "reward", "--config", str(cfg)]) == 2


def test_old_train_values_flags_name_the_new_ones(capsys):
    from moalign.cli import main

    for old, new in (("--out", "--output-dir"), ("--lr", "--learning-rate"), ("--steps", "--max-steps")):
        assert main(["train", "values", old, "x"]) == 2
        assert f"{old} was renamed: use {new}" in capsys.readouterr().err


def test_policy_backbone_pools_response_tokens(tmp_path):
    """A tiny random Llama as a policy backbone: shapes, masks and batching invariance."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from moalign.objectives.embeddings import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    bb = PolicyBackbone(str(tmp_path), batch_size=2, max_prompt_tokens=16, max_response_tokens=8)
    assert bb.dim == 32
    prompts = ["Hello there, how are you?", "Human: Hi\n\nAssistant: Yo\n\nHuman: Tell me more", "Q"]
    responses = ["Fine thanks", "", " ".join(["long"] * 100)]
    f = bb.features(prompts, responses)
    assert f.shape == (3, 32) and torch.isfinite(f).all()
    # each row equals the row computed alone (padding does not leak into the pooled states)
    for i in range(3):
        alone = bb.features([prompts[i]], [responses[i]])
        assert torch.allclose(alone[0], f[i], atol=1e-5)
    # the response mean is the mean of the last hidden states over exactly the response tokens
    ids, n_p = bb._ids(prompts[0], responses[0])
    with torch.no_grad():
        h = bb.base(input_ids=torch.tensor([ids])).last_hidden_state[0]
    assert torch.allclose(f[0, 16:], h[n_p:].mean(0), atol=1e-5)
    assert torch.allclose(f[0, :16], h.mean(0), atol=1e-5)
    assert len(bb._ids(prompts[2], responses[2])[0]) <= 16 + 8
    assert bb.describe()["policy"] == str(tmp_path)
