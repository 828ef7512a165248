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
        (["generate", "--method", "cd", "--objectives", "test_len", "--prompts", "{p}", "--k", "0", "--out", "{o}"], "--k must be >= 1"),
        (["generate", "--method", "rmod", "--objectives", "test_len", "--prompts", "{p}", "--block-size", "0", "--out", "{o}"], "--block-size must be >= 1"),
        (["generate", "--objectives", "test_len", "--prompts", "{p}", "--k", "2", "--out", "{o}"], "--method sample has no --k (it belongs to cd, rmod)"),
        (["generate", "--method", "cd", "--objectives", "test_len", "--prompts", "{p}", "--lam", "0.1", "--out", "{o}"], "--method cd has no --lam (it belongs to rmod)"),
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
    from moalign.decoding.backend import first_candidate
    from moalign.decoding.registry import METHODS, MethodSpec, methods_table, register_method
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
        METHODS.unregister("greedyish")


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
        args = build_parser().parse_args(["train", "dpo", "--combiner", "test-halves", "--output-dir", "x"])
        assert args.combiner == "test-halves"
        assert "test-halves" in available_combiners()
    finally:
        from moalign.training.combiners import COMBINERS

        COMBINERS.unregister("test-halves")


def test_skip_invalid_prompts_flag(tmp_path, tiny_policy_dir, capsys, run_cli):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"prompt": "Say hi"}, {"prompt": "  "}, {"prompt": "Why?"}]))
    common = ["generate", "--policy", tiny_policy_dir, "--objectives", "test_len", "--prompts", f,
              "--max-new-tokens", 3, "--n", 1, "--normalize", "none"]  # fmt: skip
    code, _, err = run_cli(*common, "--out", tmp_path / "a.jsonl")
    assert code == 2 and "record 1" in err and "p.jsonl" in err
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 records: 1 empty prompt"):  # the count, said once
        code, _, err = run_cli(*common, "--skip-invalid", "--out", tmp_path / "b.jsonl")
    assert code == 0, err
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 2


TOY_TRAINERS = """
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from trl import GRPOConfig

from moalign.training.lora import LoraArguments


@dataclass
class ToyConfig(TrainingArguments, LoraArguments):
    prompts: str = field(default="p.jsonl", metadata={"help": "prompt file"})
    output_dir: str = field(kw_only=True, metadata={"help": "required: no default"})
    tags: list[str] = field(default_factory=list, metadata={"help": "repeatable", "action": "append"})


@dataclass
class ToyGRPOConfig(GRPOConfig, LoraArguments):
    use_lora: bool = field(default=True, metadata={"help": "LoRA on by default here"})
    # TRL's GRPOConfig still defaults the deprecated alias to True (a FutureWarning); IAMAConfig does the same
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "deprecated alias"})

    def __post_init__(self):
        if not self.use_cpu and not torch.cuda.is_available():
            self.use_cpu = True
        if self.bf16 is None and self.use_cpu:
            self.bf16 = False
        super().__post_init__()


def train_toy(cfg):
    keys = ("output_dir", "prompts", "learning_rate", "seed", "lora_r", "use_lora", "tags", "max_steps",
            "num_generations", "beta", "use_cpu", "bf16")
    return {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)} | {"class": type(cfg).__name__}
"""


def test_train_commands_from_training_arguments_configs(tmp_path, monkeypatch, run_cli):
    """A TrainingArguments/TRL-config trainer is one TRAIN_COMMANDS line: every field is a flag (from
    HfArgumentParser), --config FILE works with flags overriding it, missing required fields are one line."""
    import moalign.cli as cli

    (tmp_path / "toy_trainers.py").write_text(TOY_TRAINERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "TRAIN_COMMANDS", [*cli.TRAIN_COMMANDS,
        ("toy", "toy_trainers", "ToyConfig", "train_toy", "toy trainer"),
        ("toygrpo", "toy_trainers", "ToyGRPOConfig", "train_toy", "toy GRPO trainer")])  # fmt: skip

    def run(*argv):
        code, out, err = run_cli("train", *argv)
        return code, (json.loads(out) if code == 0 else None), err

    code, res, err = run("toy", "--output-dir", tmp_path / "o", "--learning_rate", "0.25", "--lora-r", "4",
                         "--use-lora", "--tags", "a", "--tags", "b", "c")  # fmt: skip
    assert code == 0, err
    assert res["learning_rate"] == 0.25 and res["lora_r"] == 4 and res["use_lora"] is True
    assert res["tags"] == [["a"], ["b", "c"]] and res["seed"] == 42  # TrainingArguments' own default
    code, _, err = run("toy", "--lora-r", "4")
    assert code == 2 and "required" in err and "--output_dir" in err and err.count("\n") == 1
    code, _, err = run("toy", "--output-dir", "o", "--learning_rate", "fast")
    assert code == 2 and "invalid float value" in err and err.count("\n") == 1

    # --config: file values become defaults (a required field too); flags given explicitly win
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps({"output_dir": str(tmp_path / "f"), "learning_rate": 0.5, "seed": 7, "tags": [["x"]],
                             "prompts": "q.jsonl"}))  # fmt: skip
    code, res, err = run("toy", "--config", f, "--seed", "8")
    assert code == 0, err
    assert (res["output_dir"], res["learning_rate"], res["seed"], res["tags"], res["prompts"]) == (
        str(tmp_path / "f"), 0.5, 8, [["x"]], "q.jsonl")  # fmt: skip
    code, res, _ = run("toy", "--config", f, "--tags", "y", "--output-dir", tmp_path / "g")
    assert res["tags"] == [["y"]] and res["output_dir"] == str(tmp_path / "g") and res["learning_rate"] == 0.5
    # a run's saved TrainingArguments.to_dict() (tokens redacted as "<HUB_TOKEN>") reproduces it
    from toy_trainers import ToyConfig

    saved = ToyConfig(output_dir=str(tmp_path / "s"), learning_rate=0.125, lora_r=3, tags=["t"]).to_dict()
    assert saved["hub_token"] == "<HUB_TOKEN>"
    (tmp_path / "meta.json").write_text(json.dumps({"config": saved}, default=str))
    code, res, err = run("toy", "--config", tmp_path / "meta.json")
    assert code == 0, err
    assert (res["learning_rate"], res["lora_r"], res["tags"], res["output_dir"]) == (0.125, 3, ["t"], str(tmp_path / "s"))
    f.write_text(json.dumps({"output_dir": "o", "no_such_field": 1}))
    code, _, err = run("toy", "--config", f)
    assert code == 2 and "unknown ToyConfig field(s): no_such_field" in err

    # a TRL config (GRPOConfig) + LoraArguments: the same mechanism, no change needed
    code, res, err = run("toygrpo", "--output-dir", tmp_path / "r", "--num-generations", "4", "--beta", "0.02",
                         "--lora-r", "8", "--max-steps", "3")  # fmt: skip
    assert code == 0, err
    assert res["class"] == "ToyGRPOConfig" and res["num_generations"] == 4 and res["beta"] == 0.02
    assert res["lora_r"] == 8 and res["use_lora"] is True and res["max_steps"] == 3
    if not __import__("torch").cuda.is_available():
        assert res["use_cpu"] is True and res["bf16"] is False
    code, res, err = run("toygrpo", "--output-dir", tmp_path / "r", "--no-use-lora")
    assert code == 0 and res["use_lora"] is False, err


def test_train_help_lists_commands_without_importing_trainers(capsys):
    """`moalign train --help` and the other commands do not import the training stack."""
    import subprocess
    import sys

    code = ("import sys, moalign.cli as c; p = c.build_parser(); p.parse_args(['objectives']); "
            "print('moalign.training.dpo' in sys.modules, 'trl' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_a_setting_the_method_does_not_have_is_one_line(run_cli, prompts_file, tmp_path):
    """``--lam`` is RMOD's: with ``--method cd`` (a flag), ``cd:lam=0.1`` (compare) or a config file it is refused
    in one line naming the method and the setting, before any model loads; RMOD takes it."""
    import json

    code, _, err = run_cli("generate", "--prompts", prompts_file, "--method", "cd", "--lam", "0.1", "--out",
                           tmp_path / "cd.jsonl")  # fmt: skip
    assert code != 0 and err.strip().count("\n") == 0
    assert "--method cd has no --lam (it belongs to rmod)" in err
    code, _, err = run_cli("compare", "--prompts", prompts_file, "--methods", "sample,cd:lam=0.1", "--out-dir",
                           tmp_path / "c")  # fmt: skip
    assert code != 0 and err.strip().count("\n") == 0 and "cd has no setting 'lam'" in err
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"method": "cd", "mutations": 3, "prompts": str(prompts_file)}))
    code, _, err = run_cli("generate", "--config", cfg, "--out", tmp_path / "cd2.jsonl")
    assert code != 0 and "--method cd has no --mutations (it belongs to darwin" in err
    assert not (tmp_path / "cd.jsonl").exists() and not (tmp_path / "cd2.jsonl").exists()
    from moalign.config import GenerateConfig

    GenerateConfig(method="rmod", lam=0.1).validate()  # its own setting
    GenerateConfig(method="cd", lam=GenerateConfig().lam).validate()  # a saved run's defaults are not settings
