"""Helpers shared by the benchmark scripts: results folder, environment record, one-line summaries."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
sys.path.insert(0, str(ROOT / "scripts"))  # development tools (the local llama.cpp server launcher)
RESULTS = ROOT / "benchmarks" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"


def environment() -> dict:
    import torch

    from moalign.config import versions

    return {
        "versions": versions(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_result(name: str, payload: dict, summary: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**payload, "summary": summary, "environment": environment()}, indent=2))
    print(summary)
    return path
