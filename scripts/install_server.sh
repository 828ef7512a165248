#!/usr/bin/env bash
# Install llama-cpp-python[server]==0.3.36, the local OpenAI-compatible server that the serving-backend tests
# (tests/test_server.py) run against. It builds from source (about 10 CPU-minutes), so the wheel is cached under
# ~/.cache/moalign/wheels/<cpu> (the build uses -march=native: one cache folder per CPU flag set) and installed
# from there next time (seconds). A no-op when the right version is already installed.
# Env: PYTHON (interpreter), MOALIGN_WHEEL_CACHE (cache root), CMAKE_BUILD_PARALLEL_LEVEL (default 2).
set -euo pipefail
PY="${PYTHON:-python3}"
VER=0.3.36
if "$PY" - <<PYEOF 2>/dev/null; then exit 0; fi
import importlib.metadata as md, sys
ok = md.version("llama-cpp-python") == "$VER"
for dep in ("uvicorn", "fastapi", "pydantic-settings", "sse-starlette", "starlette-context"):
    md.version(dep)
sys.exit(0 if ok else 1)
PYEOF
cpu_key="$(uname -m)-$( (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -a) | md5sum | cut -c1-10)"
CACHE="${MOALIGN_WHEEL_CACHE:-$HOME/.cache/moalign/wheels}/$cpu_key"
mkdir -p "$CACHE"
whl="$(ls "$CACHE"/llama_cpp_python-"$VER"-*.whl 2>/dev/null | head -n1 || true)"
if [ -z "$whl" ]; then
    echo "install_server: building llama-cpp-python==$VER from source (about 10 CPU-minutes; cached in $CACHE)" >&2
    tmp="$(mktemp -d "$CACHE/build.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT  # a failed build leaves nothing in the cache
    # no multimodal (mtmd) library: the server backend only needs text completions
    CMAKE_ARGS="-DLLAVA_BUILD=OFF ${CMAKE_ARGS:-}" \
        CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
        nice -n 10 "$PY" -m pip wheel -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VER" -w "$tmp"
    mv "$tmp"/llama_cpp_python-"$VER"-*.whl "$CACHE"/
    rm -rf "$tmp"
    whl="$(ls "$CACHE"/llama_cpp_python-"$VER"-*.whl | head -n1)"
fi
"$PY" -m pip install -q "${whl}[server]"
echo "install_server: llama-cpp-python $VER installed from $whl" >&2
