"""The README's quickstart and commands and the API tour (docs/api.md) run as written on the real bundled policy
and data (paths made absolute)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
API = ROOT / "docs" / "api.md"


@pytest.mark.real
def test_api_tour_runs(tmp_path, shared_data, monkeypatch, one_thread, capsys):
    text = API.read_text()
    section = text[text.index("## API tour") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace("../shared/data", str(shared_data))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/api.md API tour", "exec"), {})
    out = capsys.readouterr().out
    assert out.strip()  # the tour prints its results
    for run in ("rmod", "cd", "darwin"):
        assert (tmp_path / "runs" / f"{run}.jsonl").exists()
    assert "RMOD(k=4, block_size=16, lam=0.5" in out  # the method loaded back from the run's meta


@pytest.mark.real
def test_readme_quickstart_runs(tmp_path, monkeypatch, one_thread, capsys):
    text = README.read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index("## Quickstart") :], re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md quickstart", "exec"), {})
    out = capsys.readouterr().out
    assert out.count(" GFLOP") == 2 and "brevity" in out


def _readme_commands(section: str) -> list[list[str]]:
    """The shell commands (continuation lines joined, comments cut) of the first bash block of a README section."""
    import shlex

    text = README.read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(section) :], re.S).group(1)
    cmds, cur = [], ""
    for line in block.splitlines():
        line = line.split("  #")[0].rstrip()
        cur += " " + line.rstrip("\\")
        if not line.endswith("\\"):
            cmds.append(shlex.split(cur)[1:])  # without "moalign"
            cur = ""
    return [c for c in cmds if c]


@pytest.mark.real
def test_readme_command_line_quickstart_runs(tmp_path, shared_data, monkeypatch, one_thread, run_cli):
    import json

    monkeypatch.chdir(tmp_path)
    cmds = _readme_commands("From the command line, the same run")
    assert [c[0] for c in cmds] == ["generate", "generate", "evaluate"]
    for argv in cmds:
        argv = [a.replace("../shared/data", str(shared_data)) for a in argv]
        if argv[0] == "evaluate":
            argv += ["--json"]
        code, out, err = run_cli(*argv)
        assert code == 0, err
    result = json.loads(out)
    assert set(result["methods"]) == {"sample", "rmod"} and result["judges"] == ["relevant", "non_toxic"]


def _readme_command(prefix: str) -> list[str]:
    """The README's first shell command starting with ``prefix`` (continuation lines joined, comment cut)."""
    import shlex

    lines = README.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(prefix))
    cmd = ""
    while True:
        line = lines[i].split("  #")[0].rstrip()
        cmd += " " + line.rstrip("\\")
        if not line.endswith("\\"):
            break
        i += 1
    return shlex.split(cmd)[1:]  # without "moalign"


@pytest.mark.real
def test_readme_train_grpo_command_runs(tmp_path, shared_data, monkeypatch, one_thread, run_cli):
    import json

    argv = [a.replace("../shared/data", str(shared_data)) for a in _readme_command("moalign train grpo --criterion")]
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(*argv)
    assert code == 0, err
    rec = json.loads((tmp_path / "runs" / "iama" / "iama_run.json").read_text())
    assert rec["result"]["steps"] == 2 and rec["result"]["kind"] == "lora"
    assert (tmp_path / "runs" / "iama" / "adapter_config.json").exists()
