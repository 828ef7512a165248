"""Helpers shared by the benchmark scripts: results folder, environment record, one-line summaries."""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
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


def load_script(name: str):
    """A development tool of ``scripts/`` as a module (e.g. ``llama_server``, the local llama.cpp server
    launcher), loaded from its file: ``scripts/`` is not a package and is never put on ``sys.path``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
