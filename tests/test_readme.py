"""The README's API tour runs as written on the real bundled policy and data (paths made absolute)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.real
def test_api_tour_runs(tmp_path, shared_data, monkeypatch, one_thread, capsys):
    text = README.read_text()
    section = text[text.index("## API tour") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace("../shared/data", str(shared_data))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md API tour", "exec"), {})
    out = capsys.readouterr().out
    assert out.strip()  # the tour prints its results
    for run in ("rmod", "cd", "darwin"):
        assert (tmp_path / "runs" / f"{run}.jsonl").exists()
    assert "RMOD(k=4, block_size=16, lam=0.5" in out  # the method loaded back from the run's meta


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
