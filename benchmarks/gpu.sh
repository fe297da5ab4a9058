#!/usr/bin/env bash
# The whole GPU check (about 5 minutes on one H200): every CUDA path against the float64
# reference, the op over 14x14..112x112 grids, the model and training-step tables, the
# targets table, the compiled window backend against FlexAttention and the Triton kernels (one layer,
# 14x14..84x84), inference time against image size (224-1344 px) and images/s against the token keep
# rate (benchmarks/token_pruning.py); results in benchmarks/results/gpu_*, compiled_window_cuda.* and
# resolution_cuda.*. Needs a CUDA GPU and torch >= 2.5.
# Usage: benchmarks/gpu.sh [--smoke]   (--smoke: a tiny CPU dry run of the same script)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"   # runs from a checkout without installing
if [ "${1:-}" = "--smoke" ]; then
    python benchmarks/gpu_check.py "$@"
    python benchmarks/compiled_window.py --grids 4 --threads 1 --repeats 1 --output-stem "${TMPDIR:-/tmp}/mait_compiled_smoke"
    exec python benchmarks/resolution.py --sizes 32 64 --repeats 1 --no-memory --output-stem "${TMPDIR:-/tmp}/mait_resolution_smoke"
fi
mkdir -p benchmarks/results
python benchmarks/gpu_check.py "$@" 2>&1 | tee benchmarks/results/gpu.txt
python benchmarks/compiled_window.py --device cuda --batch-size 8 --threads 1 --repeats 20 2>&1 | tee -a benchmarks/results/gpu.txt
python benchmarks/resolution.py --device cuda --repeats 5 2>&1 | tee -a benchmarks/results/gpu.txt
python benchmarks/token_pruning.py --device cuda --no-cost 2>&1 | tee -a benchmarks/results/gpu.txt
