#!/usr/bin/env bash
# Build llama.cpp's own server (llama-server: parallel slots with continuous batching, token-id prompts, n
# choices) from the llama.cpp that llama-cpp-python 0.3.36 vendors, for benchmarks/server_backend.py --native.
# scripts/setup.sh (test) runs it: the native-server tests need it. The build takes ~12 CPU-minutes;
# the binary and its libraries are cached under ~/.cache/moalign/llama.cpp/<cpu> (MOALIGN_WHEEL_CACHE's parent).
# Prints the path of the llama-server binary.
set -euo pipefail
PY="${PYTHON:-python3}"
VER=0.3.36
cpu_key="$(uname -m)-$( (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -a) | md5sum | cut -c1-10)"
DEST="${MOALIGN_LLAMA_CPP:-$HOME/.cache/moalign/llama.cpp/$cpu_key}"
if [ -x "$DEST/bin/llama-server" ]; then echo "$DEST/bin/llama-server"; exit 0; fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$tmp" >&2
tar xzf "$tmp"/llama_cpp_python-"$VER".tar.gz -C "$tmp"
src="$tmp/llama_cpp_python-$VER/vendor/llama.cpp"
echo "install_llama_cpp: building llama-server (about 8-12 CPU-minutes)" >&2
# GGML_NATIVE=OFF: a -march=native build died with "Illegal instruction" on a VM whose CPU reports AVX-512
# (loading the bundled Q4_1 policy); the portable build runs there and everywhere else
cmake -S "$src" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=OFF \
    -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON >&2
nice -n 10 cmake --build "$tmp/build" --target llama-server -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" >&2
mkdir -p "$DEST"
cp -r "$tmp/build/bin" "$DEST/"
echo "$DEST/bin/llama-server"
