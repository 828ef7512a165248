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
    assert (tmp_path / "runs" / "rmod.jsonl").exists() and (tmp_path / "runs" / "darwin.jsonl").exists()
