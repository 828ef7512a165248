"""The command line: flags from configs, one-line errors, generate -> evaluate, --config reproduction."""

from __future__ import annotations

import json

import pytest

from moalign.cli import main
from moalign.objectives.base import CallableObjective, register_objective

register_objective("test_len", lambda: CallableObjective("test_len", lambda p, r: [len(x) / 20 for x in r]))
register_objective("test_vowels", lambda: CallableObjective("test_vowels", lambda p, r: [
    sum(c in "aeiou" for c in x) / 10 for x in r]))  # fmt: skip


@pytest.fixture
def prompts_file(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text(
        "\n".join(json.dumps({"prompt": p}) for p in ["Say hi", "Name a color", "Why is the sky blue?"])
    )
    return f


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_evaluate_and_config_reproduction(tmp_path, tiny_policy_dir, prompts_file, capsys):
    common = ["--policy", tiny_policy_dir, "--objectives", "test_len,test_vowels", "--prompts", prompts_file,
              "--max-new-tokens", 8, "--normalize", "none", "--seed", 3]  # fmt: skip
    a, b = tmp_path / "sample.jsonl", tmp_path / "cd.jsonl"
    assert _run(capsys, "generate", "--method", "sample", "--n", 1, "--out", a, *common)[0] == 0
    assert (
        _run(capsys, "generate", "--method", "cd", "--k", 2, "--block-size", 4, "--out", b, *common)[0] == 0
    )
    code, out, err = _run(capsys, "evaluate", "--inputs", a, b, "--reference", a, "--json", "--n-boot", 50)
    assert code == 0, err
    res = json.loads(out)
    assert set(res["methods"]) == {"sample", "cd"} and res["methods"]["cd"]["n"] == 3
    # a run's meta file reproduces it
    c = tmp_path / "again.jsonl"
    assert _run(capsys, "generate", "--config", str(b).replace(".jsonl", ".meta.json"), "--out", c)[0] == 0
    ra = [json.loads(x)["response"] for x in b.read_text().splitlines()]
    rc = [json.loads(x)["response"] for x in c.read_text().splitlines()]
    assert ra == rc


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "--method", "cd", "--objectives", "nope", "--prompts", "{p}", "--out", "{o}"], "unknown objective 'nope'"),
        (["generate", "--objectives", "test_len", "--prompts", "/no/such.jsonl", "--out", "{o}"], "file not found"),
        (["generate", "--objectives", "test_len", "--prompts", "{p}", "--prompt-column", "text", "--out", "{o}"], "column 'text' not found"),
        (["generate", "--objectives", "test_len", "--prompts", "{p}", "--k", "0", "--out", "{o}"], "--k must be >= 1"),
        (["generate", "--objectives", "test_len", "--prompts", "{p}", "--block-size", "0", "--out", "{o}"], "--block-size must be >= 1"),
        (["evaluate", "--inputs", "/no/run.jsonl"], "file not found"),
    ],
)  # fmt: skip
def test_one_line_errors(tmp_path, prompts_file, capsys, argv, message):
    argv = [a.format(p=prompts_file, o=tmp_path / "o.jsonl") for a in argv]
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert message in err
    assert err.strip().count("\n") == 0 and err.startswith("moalign: error:")


def test_unknown_method_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--method", "beam"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_objectives_lists_builtins(capsys):
    code, out, _ = _run(capsys, "objectives")
    assert code == 0
    assert {"test_len", "helpful", "harmless", "non_toxic", "positive", "relevant", "concise"} <= set(
        out.split()
    )
