"""The command line: flags from configs, one-line errors, generate -> evaluate, --config reproduction."""

from __future__ import annotations

import json

import pytest

from moalign.cli import main
from moalign.objectives.base import CallableObjective, register_objective

register_objective("test_len", lambda: CallableObjective("test_len", lambda p, r: [len(x) / 20 for x in r]))
register_objective("test_vowels", lambda: CallableObjective("test_vowels", lambda p, r: [
    sum(c in "aeiou" for c in x) / 10 for x in r]))  # fmt: skip


def test_generate_evaluate_and_config_reproduction(tmp_path, tiny_policy_dir, prompts_file, capsys, run_cli):
    common = ["--policy", tiny_policy_dir, "--objectives", "test_len,test_vowels", "--prompts", prompts_file,
              "--max-new-tokens", 8, "--normalize", "none", "--seed", 3]  # fmt: skip
    a, b = tmp_path / "sample.jsonl", tmp_path / "cd.jsonl"
    assert run_cli("generate", "--method", "sample", "--n", 1, "--out", a, *common)[0] == 0
    assert (
        run_cli("generate", "--method", "cd", "--k", 2, "--block-size", 4, "--out", b, *common)[0] == 0
    )
    code, out, err = run_cli("evaluate", "--inputs", a, b, "--reference", a, "--json", "--n-boot", 50)
    assert code == 0, err
    res = json.loads(out)
    assert set(res["methods"]) == {"sample", "cd"} and res["methods"]["cd"]["n"] == 3
    # a run's meta file reproduces it
    c = tmp_path / "again.jsonl"
    assert run_cli("generate", "--config", str(b).replace(".jsonl", ".meta.json"), "--out", c)[0] == 0
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
def test_one_line_errors(tmp_path, prompts_file, capsys, argv, message, run_cli):
    argv = [a.format(p=prompts_file, o=tmp_path / "o.jsonl") for a in argv]
    code, out, err = run_cli(*argv)
    assert code == 2
    assert message in err
    assert err.strip().count("\n") == 0 and err.startswith("moalign: error:")


def test_unknown_method_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--method", "beam"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_objectives_lists_builtins(capsys, run_cli):
    code, out, _ = run_cli("objectives")
    assert code == 0
    assert {"test_len", "helpful", "harmless", "non_toxic", "positive", "relevant", "concise"} <= set(
        out.split()
    )


def test_a_registered_method_is_one_module_and_one_line(tmp_path, tiny_policy_dir, prompts_file, capsys, run_cli):
    """A method registered from outside the package gets its own flags, a --method choice and records."""
    from dataclasses import dataclass

    import moalign.config as config
    from moalign.configbase import config_field
    from moalign.decoding.engine import first_candidate
    from moalign.decoding.registry import _REGISTRY, MethodSpec, methods_table, register_method
    from moalign.decoding.selection import EngineDecoder

    @dataclass
    class GreedyishArgs:
        rows: int = config_field(2, "greedyish: rows per prompt")

    def build(ctx, args):
        return EngineDecoder(ctx.engine, args.rows, ctx.cfg.max_new_tokens, ctx.cfg.max_new_tokens,
                             first_candidate, keep_all=True)  # fmt: skip

    register_method(MethodSpec("greedyish", "test method", GreedyishArgs, build))
    try:
        # GenerateConfig is composed at import: a plugin's settings arrive through the flags' namespace
        assert "`greedyish`" in methods_table() and "`--rows`" in methods_table()
        cfg = config.GenerateConfig(method="greedyish")
        assert cfg.method_args() == GreedyishArgs(rows=2)
        out = tmp_path / "g.jsonl"
        code, _, err = run_cli("generate", "--method", "greedyish", "--policy", tiny_policy_dir,
                            "--objectives", "test_len", "--prompts", prompts_file, "--max-new-tokens", 4,
                            "--normalize", "none", "--out", out)  # fmt: skip
        assert code == 0, err
        recs = [json.loads(x) for x in out.read_text().splitlines()]
        assert len(recs) == 3 * 2 and {r["sample_index"] for r in recs} == {0, 1}
        assert len({r["prompt_id"] for r in recs}) == 3
    finally:
        _REGISTRY.pop("greedyish", None)


def test_methods_command_matches_readme(capsys, run_cli):
    """The README's method table is the registry's (regenerate it with `moalign methods`)."""
    from pathlib import Path

    code, out, _ = run_cli("methods")
    assert code == 0
    for name in ("sample", "best-of-n", "cd", "rmod", "darwin", "sample-replace", "mutate-bon"):
        assert f"| `{name}` |" in out
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert out.strip() in readme


def test_darwin_flags_and_combiner_choices_come_from_registries(capsys):
    from moalign.cli import build_parser
    from moalign.training.combiners import available_combiners, get_combiner, register_combiner

    parser = build_parser()
    args = parser.parse_args(["generate", "--method", "darwin", "--mutations", "4", "--cycles", "2"])
    assert args.method == "darwin" and args.mutations == 4 and args.cycles == 2
    register_combiner("test-halves", lambda **kw: get_combiner("linear", **kw))
    try:
        args = build_parser().parse_args(["train", "dpo", "--combiner", "test-halves"])
        assert args.combiner == "test-halves"
        assert "test-halves" in available_combiners()
    finally:
        from moalign.training import combiners

        combiners._REGISTRY.pop("test-halves", None)


def test_skip_invalid_prompts_flag(tmp_path, tiny_policy_dir, capsys, run_cli):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"prompt": "Say hi"}, {"prompt": "  "}, {"prompt": "Why?"}]))
    common = ["generate", "--policy", tiny_policy_dir, "--objectives", "test_len", "--prompts", f,
              "--max-new-tokens", 3, "--n", 1, "--normalize", "none"]  # fmt: skip
    code, _, err = run_cli(*common, "--out", tmp_path / "a.jsonl")
    assert code == 2 and "record 1" in err and "p.jsonl" in err
    code, _, err = run_cli(*common, "--skip-invalid", "--out", tmp_path / "b.jsonl")
    assert code == 0, err
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 2
