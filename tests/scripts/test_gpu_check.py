"""The GPU check script runs on the CPU (small sizes), so it cannot rot before a GPU machine is at hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.real
def test_gpu_check_runs_on_the_cpu(tmp_path):
    assets = tmp_path / "assets"
    prep = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--prepare", str(assets)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert prep.returncode == 0, prep.stderr[-2000:]
    assert (assets / "config.json").exists() and (assets / "tokenizer.json").exists()
    out = tmp_path / "out"
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--small", "--assets", str(assets),
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", **__import__("os").environ},
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    rows = json.loads((out / "gpu_check.json").read_text())["rows"]
    steps = {r["step"]: r for r in rows}
    methods = ["sample", "best-of-n", "cd", "rmod", "darwin", "sample-replace", "mutate-bon"]
    assert all(steps[f"generate {m}"]["status"] == "ok" for m in methods)
    assert all((out / "records" / f"{m}.jsonl").stat().st_size > 0 for m in methods)
    assert steps["decode benchmark"]["status"] == "ok" and "blockwise/generate" in steps["decode benchmark"]["detail"]
    assert steps["multi-objective DPO, 2 steps"]["status"] == "ok"
    assert steps["IAMA non-linear GRPO, 2 steps"]["status"] in ("ok", "skipped")
    assert "| step | status | seconds | detail |" in run.stdout  # the one table
