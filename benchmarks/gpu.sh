#!/usr/bin/env bash
# The whole GPU check (about 5 minutes on one H200): every CUDA path against the float64
# reference, the op over 14x14..112x112 grids, the model and training-step tables, and the
# targets table; results in benchmarks/results/gpu_*. Needs a CUDA GPU and torch >= 2.5.
# Usage: benchmarks/gpu.sh [--smoke]   (--smoke: a tiny CPU dry run of the same script)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"   # runs from a checkout without installing
if [ "${1:-}" = "--smoke" ]; then exec python benchmarks/gpu_check.py "$@"; fi
mkdir -p benchmarks/results
python benchmarks/gpu_check.py "$@" 2>&1 | tee benchmarks/results/gpu.txt
