"""generate(): every method end to end on a tiny policy with text-based objectives; resume; records."""

from __future__ import annotations

import json

import pytest
import torch

from moalign.config import GenerateConfig, for_method
from moalign.data.prompts import to_prompt
from moalign.errors import MoalignError
from moalign.generate import generate
from moalign.objectives.base import CallableObjective
from moalign.records import meta_path, read_records

PROMPTS = [
    to_prompt(p, id=f"p{i}") for i, p in enumerate(["Say hi", "Name a fruit", "Count to three", "Why?"])
]


def _objs():
    # two text statistics that pull in different directions
    return [
        CallableObjective("vowels", lambda p, r: [sum(c in "aeiou" for c in x) / 10 for x in r]),
        CallableObjective("short", lambda p, r: [-len(x) / 50 for x in r]),
    ]


def _cfg(tmp_path, method, **kw):
    base = dict(method=method, out=str(tmp_path / f"{method}.jsonl"), max_new_tokens=12, n=3, k=3,
                block_size=4, normalize="none", batch_size=2, seed=5)  # fmt: skip
    base.pop("method")
    return for_method(GenerateConfig(**base), method, **kw)  # the shared n/k/block_size: the method's own


@pytest.mark.parametrize("method", ["sample", "best-of-n", "cd", "rmod"])
def test_methods_write_records(tmp_path, tiny_policy, method):
    cfg = _cfg(tmp_path, method)
    recs = generate(cfg, policy=tiny_policy, objectives=_objs(), prompts=PROMPTS, progress=False)
    n_expected = len(PROMPTS) * (3 if method == "sample" else 1)
    assert len(recs) == n_expected
    on_disk = read_records(cfg.out)
    assert [r["record_id"] for r in on_disk] == [r["record_id"] for r in recs]
    for r in on_disk:
        assert set(r["scores"]) == {"vowels", "short"}
        assert r["method"] == method and r["seed"] == 5 and r["config"]["method"] == method
        assert "torch" in r["versions"]
        # the stored scores are the objectives applied to the stored response
        assert r["scores"]["short"] == pytest.approx(-len(r["response"]) / 50, abs=1e-6)
    meta = json.loads(meta_path(cfg.out).read_text())
    assert meta["config"]["method"] == method and meta["score_space"] == "raw"
    if method == "rmod":
        blocks = [b for r in on_disk for b in r["trace"]]
        assert blocks and all(abs(sum(b["weights"]) - 1) < 1e-4 for b in blocks)


def test_best_of_n_picks_the_best_candidate(tmp_path, tiny_policy):
    cfg = _cfg(tmp_path, "best-of-n", scalarization="short", n=4)
    recs = generate(cfg, policy=tiny_policy, objectives=_objs(), prompts=PROMPTS, progress=False)
    for r in recs:
        (block,) = r["trace"]
        assert block["chosen"] == max(range(4), key=lambda j: block["candidate_scores"][j])
        assert r["scores"]["short"] == pytest.approx(max(block["candidate_scores"]), abs=1e-4)


def test_cd_beats_sampling_on_its_objective(tmp_path, tiny_policy):
    """CD with one objective must not do worse than plain sampling on that objective (same budget)."""
    prompts = [to_prompt(f"Tell me about topic {i}", id=str(i)) for i in range(6)]
    kw = dict(max_new_tokens=16, batch_size=6)
    cd = generate(_cfg(tmp_path, "cd", scalarization="vowels", k=4, block_size=4, **kw), policy=tiny_policy,
                  objectives=_objs(), prompts=prompts, progress=False)  # fmt: skip
    smp = generate(_cfg(tmp_path, "sample", n=1, **kw), policy=tiny_policy, objectives=_objs(),
                   prompts=prompts, progress=False)  # fmt: skip
    mean = lambda rs: sum(r["scores"]["vowels"] for r in rs) / len(rs)  # noqa: E731
    assert mean(cd) > mean(smp)


def test_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_policy):
    full = _cfg(tmp_path, "cd", out=str(tmp_path / "full.jsonl"))
    generate(full, policy=tiny_policy, objectives=_objs(), prompts=PROMPTS, progress=False)
    part = _cfg(tmp_path, "cd", out=str(tmp_path / "part.jsonl"), limit=2)
    generate(part, policy=tiny_policy, objectives=_objs(), prompts=PROMPTS, progress=False)
    # simulate a crash mid-write: a truncated last line
    with open(part.out, "a") as f:
        f.write('{"record_id": "p2", "respo')
    part.limit = None
    new = generate(part, policy=tiny_policy, objectives=_objs(), prompts=PROMPTS, progress=False)
    assert [r["record_id"] for r in new] == ["p2", "p3"]
    a = {r["record_id"]: r["response"] for r in read_records(full.out)}
    b = {r["record_id"]: r["response"] for r in read_records(part.out)}
    assert a == b


def test_resume_refuses_a_different_config(tmp_path, tiny_policy):
    cfg = _cfg(tmp_path, "cd")
    generate(cfg, policy=tiny_policy, objectives=_objs(), prompts=PROMPTS[:1], progress=False)
    cfg.k = 2
    with pytest.raises(MoalignError, match="different config"):
        generate(cfg, policy=tiny_policy, objectives=_objs(), prompts=PROMPTS, progress=False)


def test_resume_ignores_settings_the_method_does_not_have(tmp_path, tiny_policy):
    """A run whose meta holds another method's setting at another value (a run written while that setting was
    shared, or from a base config) resumes; its own settings are still compared."""
    import json

    from moalign.records import meta_path

    cfg = _cfg(tmp_path, "best-of-n")
    first = generate(cfg, policy=tiny_policy, objectives=_objs(), prompts=PROMPTS[:1], progress=False)
    mp = meta_path(cfg.out)
    meta = json.loads(mp.read_text())
    meta["config"]["k"], meta["config"]["lam"] = 8, 5.0  # CD's and RMOD's, never best-of-N's
    mp.write_text(json.dumps(meta))
    generate(cfg, policy=tiny_policy, objectives=_objs(), prompts=PROMPTS, progress=False)
    recs = read_records(cfg.out)
    assert len(recs) == len(PROMPTS) and recs[0] == first[0]  # resumed: the first record kept, not redone
    cfg.n += 1
    with pytest.raises(MoalignError, match=r"different config \(n\)"):
        generate(cfg, policy=tiny_policy, objectives=_objs(), prompts=PROMPTS, progress=False)


def test_nan_objective_is_rejected(tmp_path, tiny_policy):
    bad = CallableObjective("bad", lambda p, r: [float("nan")] * len(r))
    with pytest.raises(MoalignError, match="non-finite"):
        generate(_cfg(tmp_path, "best-of-n"), policy=tiny_policy, objectives=[bad], prompts=PROMPTS,
                 progress=False)  # fmt: skip


def test_estimated_normalisation_is_recorded(tmp_path, tiny_policy):
    cfg = _cfg(tmp_path, "cd", normalize="auto", scalarization="worst-case")
    generate(cfg, policy=tiny_policy, objectives=_objs(), prompts=PROMPTS, progress=False)
    meta = json.loads(meta_path(cfg.out).read_text())
    assert meta["norm"]["names"] == ["vowels", "short"]
    assert meta["score_space"].startswith("z-score")
    assert all(s > 0 for s in meta["norm"]["std"])


@pytest.mark.parametrize(
    "field,value", [("k", 0), ("block_size", 0), ("max_new_tokens", 0), ("method", "beam")]
)
def test_bad_config(tmp_path, tiny_policy, field, value):
    cfg = _cfg(tmp_path, "cd")
    setattr(cfg, field, value)
    with pytest.raises(MoalignError):
        generate(cfg, policy=tiny_policy, objectives=_objs(), prompts=PROMPTS, progress=False)


def test_torch_is_seeded_independently_of_global_state(tmp_path, tiny_policy):
    torch.manual_seed(123)
    a = generate(_cfg(tmp_path, "sample", out=str(tmp_path / "a.jsonl")), policy=tiny_policy, objectives=_objs(),
                 prompts=PROMPTS, progress=False)  # fmt: skip
    torch.manual_seed(999)
    b = generate(_cfg(tmp_path, "sample", out=str(tmp_path / "b.jsonl")), policy=tiny_policy, objectives=_objs(),
                 prompts=PROMPTS, progress=False)  # fmt: skip
    assert [r["response"] for r in a] == [r["response"] for r in b]


@pytest.mark.parametrize(
    "method, kw",
    [
        ("sample", {}),
        ("best-of-n", {}),
        ("cd", {}),
        ("rmod", {"rmod_select": "argmax"}),
        ("rmod", {"rmod_select": "sample", "lam": 2.0}),
        ("sample-replace", {"mutations": 3, "replace_every": 4, "replace_top_k": 2, "cycles": 2}),
        ("darwin", {"mutations": 3, "replace_every": 4, "replace_top_k": 2, "cycles": 2,
                    "mutation_max_new_tokens": 16}),
        ("mutate-bon", {"mutations": 2, "cycles": 2, "replace_top_k": 1, "mutation_max_new_tokens": 16}),
    ],
)
def test_every_method_resumes_mid_batch_to_identical_records(tmp_path, tiny_policy, one_thread, method, kw):
    """An interrupted run (cut inside a batch) resumed gives the same whole records as an uninterrupted one;
    the random selection rules draw from the run seed, so a different seed changes them."""
    keys = ("record_id", "prompt_id", "sample_index", "response", "scores", "trace", "n_tokens", "policy_tokens")
    full = _cfg(tmp_path, method, out=str(tmp_path / "full.jsonl"), **kw)
    a = generate(full, policy=tiny_policy, objectives=_objs(), prompts=PROMPTS, progress=False)
    part = _cfg(tmp_path, method, out=str(tmp_path / "part.jsonl"), **kw)
    generate(part, policy=tiny_policy, objectives=_objs(), prompts=PROMPTS, progress=False)
    lines = open(part.out).read().splitlines(keepends=True)
    cut = len(lines) // 2 + 1  # inside the second batch of prompts
    with open(part.out, "w") as f:
        f.writelines(lines[:cut])
    generate(part, policy=tiny_policy, objectives=_objs(), prompts=PROMPTS, progress=False)
    b = read_records(part.out)
    assert len(b) == len(a)
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]
    if kw.get("rmod_select") == "sample":
        c = generate(_cfg(tmp_path, method, out=str(tmp_path / "c.jsonl"), **{**kw, "seed": 6}),
                     policy=tiny_policy, objectives=_objs(), prompts=PROMPTS, progress=False)  # fmt: skip
        assert [r["trace"] for r in a] != [r["trace"] for r in c]
