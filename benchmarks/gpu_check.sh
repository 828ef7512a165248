#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): every method, the decode benchmark, 2 steps of multi-objective DPO and
# of IAMA GRPO on one device, one table. On a GPU machine: bash benchmarks/gpu_check.sh --assets benchmarks/gpu_assets
# (write the assets first, where the bundled policy is installed: python benchmarks/gpu_check.py --prepare benchmarks/gpu_assets)
set -euo pipefail
cd "$(dirname "$0")/.."
# the package from this checkout (the GPU machine has torch but no install of moalign)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
