"""The Python API: method objects of exactly their own settings, ``moalign.decode``, ``moalign.evaluate``,
and a run's config loading back into its method object."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

import moalign
from moalign.errors import ForeignSettingError, MoalignError, SettingError

METHOD_CLASSES = {"sample": "Sample", "best-of-n": "BestOfN", "cd": "CD", "rmod": "RMOD", "darwin": "Darwin",
                  "sample-replace": "SampleReplace", "mutate-bon": "MutateBoN"}  # fmt: skip


def _vowels(prompts, responses):
    return [sum(c in "aeiou" for c in r) / 10 for r in responses]


def _short(prompts, responses):
    return [-len(r) / 50 for r in responses]


def test_every_registered_method_is_an_exported_class_of_its_own_settings():
    from moalign.decoding.registry import METHODS, own_settings, spec_of

    assert {n for n, _ in METHODS.items()} >= set(METHOD_CLASSES)
    for name, cls_name in METHOD_CLASSES.items():
        cls = getattr(moalign, cls_name)
        assert spec_of(cls()).name == name
        assert [f.name for f in dataclasses.fields(cls)] == own_settings(name)
    assert "n" in own_settings("sample") and "k" not in own_settings("sample")
    assert "k" in own_settings("rmod") and "n" not in own_settings("rmod")
    assert "scalarization" not in own_settings("rmod")  # RMOD's weights are its own
    assert not any(s.startswith("mutation_") or s == "mutator" for s in own_settings("sample-replace"))
    assert "replace_every" not in own_settings("mutate-bon")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: moalign.RMOD(lam=0), "RMOD: lam must be > 0, got 0"),
        (lambda: moalign.RMOD(k=0), "RMOD: k must be >= 1, got 0"),
        (lambda: moalign.CD(block_size=2.5), "CD: block_size must be an integer, got 2.5"),
        (lambda: moalign.CD(lam=0.1), "CD has no setting 'lam' (it belongs to rmod)"),
        (lambda: moalign.Sample(k=4), "Sample has no setting 'k' (it belongs to cd, rmod)"),
        (lambda: moalign.RMOD(scalarization="worst-case"), "RMOD has no setting 'scalarization'"),
        (lambda: moalign.BestOfN(scalarization="helpful=-1"), "BestOfN: scalarization weight for 'helpful' must be >= 0"),
        (lambda: moalign.SampleReplace(mutation_mode="list"), "SampleReplace has no setting 'mutation_mode' (it belongs to darwin, mutate-bon)"),
        (lambda: moalign.RMOD(foo=1), "RMOD: foo is not one of its settings (k, block_size, lam"),
        (lambda: moalign.Darwin(mutations=3, replace_top_k=4), "Darwin: replace_top_k must be between 1 and mutations (3)"),
    ],
)  # fmt: skip
def test_bad_settings_are_one_line_naming_the_parameter(make, message):
    with pytest.raises(SettingError) as e:
        make()
    assert message in str(e.value) and "\n" not in str(e.value) and "--" not in str(e.value)


def test_the_cli_names_flags_where_python_names_parameters():
    e = SettingError("RMOD", "block_size", "must be >= 1, got 0")
    assert str(e) == "RMOD: block_size must be >= 1, got 0" and e.as_flag() == "--block-size must be >= 1, got 0"
    f = ForeignSettingError("cd", "lam", ["rmod"])
    assert "--method cd has no --lam (it belongs to rmod)" in f.as_flag()


def test_decode_returns_one_result_per_prompt_with_scores_trace_and_compute(tiny_policy):
    prompts = ["Tell me about apples", [{"role": "user", "content": "Name a colour"}]]
    out = moalign.decode(prompts, moalign.RMOD(k=3, block_size=4, lam=2.0), policy=tiny_policy,
                         objectives=[_vowels, _short], max_new_tokens=8, normalize="none", seed=3)  # fmt: skip
    assert len(out) == 2 and [o.prompt for o in out] == ["Tell me about apples", "Name a colour"]
    for o in out:
        assert set(o.scores) == {"_vowels", "_short"}
        assert o.scores["_short"] == pytest.approx(-len(o.response) / 50, abs=1e-6)  # scored as given
        assert o.trace and all("weights" in b for b in o.trace)  # RMOD's per-block weights
        assert o.policy_tokens > 0 and o.policy_flops > 0 and o.flops == o.policy_flops + o.scorer_flops
        assert o.samples == ()
    again = moalign.decode(prompts, moalign.RMOD(k=3, block_size=4, lam=2.0), policy=tiny_policy,
                           objectives=[_vowels, _short], max_new_tokens=8, normalize="none", seed=3)  # fmt: skip
    assert [o.response for o in again] == [o.response for o in out]  # seeded


def test_decode_takes_a_name_a_mapping_of_callables_and_returns_every_sample(tiny_policy):
    out = moalign.decode("Say hi", moalign.Sample(n=3), policy=tiny_policy, objectives={"v": _vowels},
                         max_new_tokens=6, normalize="none")  # fmt: skip
    assert len(out) == 1 and len(out[0].samples) == 3 and out[0].samples[0].response == out[0].response
    assert set(out[0].scores) == {"v"}
    best = moalign.decode("Say hi", "best-of-n", policy=tiny_policy, objectives={"v": _vowels},
                          max_new_tokens=6, normalize="none")  # fmt: skip
    assert best[0].trace[0]["chosen"] == max(range(4), key=lambda j: best[0].trace[0]["candidate_scores"][j])
    with pytest.raises(MoalignError, match="is not a registered method's settings"):
        moalign.decode("Say hi", object(), policy=tiny_policy, objectives={"v": _vowels})
    with pytest.raises(MoalignError, match="policy must be a Policy, a name or path, or a Server"):
        moalign.decode("Say hi", "sample", policy=3, objectives={"v": _vowels})
    bad = moalign.CD()
    bad.k = 0  # changed after it was made: checked again
    with pytest.raises(SettingError, match="CD: k must be >= 1"):
        moalign.decode("Say hi", bad, policy=tiny_policy, objectives={"v": _vowels})


def test_out_writes_a_run_that_resumes_reloads_evaluates_and_gives_back_its_method(tiny_policy, tmp_path):
    path = str(tmp_path / "cd.jsonl")
    method = moalign.CD(k=2, block_size=4, scalarization="v=3,s=1")
    objectives = {"v": _vowels, "s": _short}
    kw = dict(policy=tiny_policy, objectives=objectives, max_new_tokens=8, normalize="none", out=path)
    first = moalign.decode(["a", "b"], method, **kw)
    both = moalign.decode(["a", "b", "c"], method, **kw)  # resumes: a and b are read back, c is decoded
    assert [o.response for o in both[:2]] == [o.response for o in first]
    assert [o.response for o in moalign.load_results(path)] == [o.response for o in both]
    assert moalign.load_method(str(tmp_path / "cd.meta.json")) == method
    smp = str(tmp_path / "sample.jsonl")
    moalign.decode(["a", "b", "c"], moalign.Sample(n=1), **{**kw, "out": smp})
    result = moalign.evaluate([smp, path], reference=smp, n_boot=50)
    assert list(result.methods) == ["sample", "cd"] and result.reference == "sample" and result.objectives == ["v", "s"]
    assert "cd" in result.table()


def test_generate_help_shows_the_method_s_settings_and_not_others():
    run = lambda *a: subprocess.run([sys.executable, "-m", "moalign.cli", *a], capture_output=True, text=True)  # noqa: E731
    rmod = run("generate", "--method", "rmod", "--help").stdout
    assert "rmod's own settings" in rmod and "--lam" in rmod and "--block-size" in rmod and "--max-new-tokens" in rmod
    assert "--mutation" not in rmod and "--replace-every" not in rmod and "--n " not in rmod
    darwin = run("generate", "--method", "darwin", "--help").stdout
    assert "--mutation-mode" in darwin and "--lam" not in darwin


def test_generate_help_reads_the_method_of_a_config_file(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"method": "rmod", "lam": 2.0}))
    out = subprocess.run([sys.executable, "-m", "moalign.cli", "generate", "--config", str(cfg), "--help"],
                         capture_output=True, text=True).stdout  # fmt: skip
    assert "rmod's own settings" in out and "--lam" in out
