#!/usr/bin/env bash
# Reproduce every figure quoted in benchmarks/README.md (CPU; about 1.5 h on 2 shared cores).
# Usage: benchmarks/run_all.sh [THREADS]   (default 1: on a shared machine one thread per process is
# what gives stable medians; ratios are always measured side by side in one run).
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-1}
OUT=benchmarks/results
mkdir -p "$OUT"
run() { local name=$1; shift; echo "+ mait bench $*" | tee "$OUT/$name.txt"; python -m mait bench "$@" --threads "$T" --out "$OUT/$name" 2>&1 | grep -v -E '^(USDT|ERROR:)' | tee -a "$OUT/$name.txt"; }

# 1. the op alone: dense masked vs linear vs auto vs unmasked SDPA (56x56 + cls, R 3, 3 heads, d 32, batch 4)
run attention --attention --grids 7 14 28 56 112 --batch-size 4 --repeats 9
# 2. peak memory at 112x112 (dense needs ~1.8 GiB per head and image, so one of each)
run attention_112_memory --attention --grids 112 --batch-size 1 --heads 1 --max-dense-gib 8 --warmup 0 --repeats 1
# 3. the op in training (forward + backward)
run attention_train --attention --train --grids 7 14 28 56 --batch-size 4 --repeats 9 --no-memory
# 4. whole models, inference, batch 64 at 224 px, interleaved rounds
run models --models swin_tiny_patch4_window7_224 hmait_tiny_224 mait_xs24_224 deit_small_patch16_224 \
    swin_small_patch4_window7_224 mait_s24_224 hmait_small_224 cait_xxs24_224 \
    mait_t24_224:scheme=sch1 mait_t24_224:scheme=none --batch-size 64 --warmup 1 --repeats 5
# 5. training step (forward + backward), H-MaiT-T vs Swin-T
run models_train --models swin_tiny_patch4_window7_224 hmait_tiny_224 --train --batch-size 64 --warmup 1 --repeats 3
# 6. the dense matmul backend against the reference: the op, and a CIFAR-size model through either
run attention_matmul --attention --grids 4 7 8 14 28 56 --batch-size 4 --repeats 9 --no-memory
run attention_matmul_train --attention --train --grids 4 7 8 14 28 --batch-size 4 --repeats 9 --no-memory
CIFAR_MODELS="mait_mini6_32:scheme=all,num_classes=10,attention_backend=reference mait_mini6_32:scheme=all,num_classes=10
    mait_mini6_32:scheme=soft,num_classes=10,attention_backend=reference mait_mini6_32:scheme=soft,num_classes=10
    mait_mini6_32:scheme=none,num_classes=10"
run models_matmul --models $CIFAR_MODELS --batch-size 128 --repeats 9
run models_matmul_train --models $CIFAR_MODELS --train --batch-size 128 --repeats 7
# 7. training images/s of the small presets: in-memory data vs timm's loader (one run, interleaved rounds)
python benchmarks/train_throughput.py --train-subset 2560 --repeats 3 --threads "$T" 2>&1 | grep -v -E '^(USDT|ERROR:)' | tail -n 8
# 8. inference time against image size (224-1344 px, batch 1): linear masked attention against quadratic
python benchmarks/resolution.py --threads "$T" --repeats 3 2>&1 | grep -v -E '^(USDT|ERROR:)' | tail -n 14
python benchmarks/resolution.py --threads "$T" --repeats 3 --amp --sizes 224 448 896 1344 2>&1 | grep -v -E '^(USDT|ERROR:)' | tail -n 12
# 9. the linear backend against its version before row bands (one process, interleaved)
python benchmarks/local_versions.py --base b3f2253 --threads "$T" --repeats 7 --out "$OUT/local_versions_bands.json" | tee "$OUT/local_versions_bands.txt"
# 10. training images/s with bf16 autocast (mait train --amp) against float32, on this CPU
python benchmarks/train_throughput.py --compare precision --presets digits cifar10 cifar10-study \
    --schemes default all none --train-subset 2560 --repeats 3 --threads "$T" 2>&1 | grep -v -E '^(USDT|ERROR:)' | tail -n 21
# 11. token pruning: images/s against rho (Sparsifiner DeiT-S, MaiT-S) and the whole-model GMACs sweep
python benchmarks/token_pruning.py --threads "$T" 2>&1 | grep -v -E '^(USDT|ERROR:)' | tail -n 36
