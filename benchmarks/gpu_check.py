"""The whole GPU check of mait in one run (``benchmarks/gpu.sh``; about 5 minutes on an H200).

1. correctness: every CUDA path against the float64 dense reference — forward, gradients for
   q, k, v and α — in float32 and under bf16 / fp16 autocast;
2. the op alone over 14x14 .. 112x112 grids (bf16): every backend, unmasked SDPA, memory;
3. whole models, inference, bf16 autocast, batch 64 at 224 px (interleaved rounds);
4. training steps (forward + backward), bf16 autocast, batch 64;
5. the targets table (ratios from this one run).

Results: ``benchmarks/results/gpu_*.json`` / ``.csv`` / ``.png`` and ``gpu_summary.txt``.
``--smoke`` runs everything tiny on the CPU (minutes) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional

import torch

import mait
from mait import benchmarking
from mait.benchmarking import BenchSettings

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SMOKE = False                       # set by --smoke

# (label, numerator spec, denominator spec, target ratio)
MODEL_TARGETS = [
    ("MaiT-XS / Swin-T", "mait_xs24_224", "swin_tiny_patch4_window7_224", 1.3),
    ("MaiT-S / Swin-S", "mait_s24_224", "swin_small_patch4_window7_224", 1.7),
    ("H-MaiT-T / Swin-T", "hmait_tiny_224", "swin_tiny_patch4_window7_224", 1.2),
    ("Sch.1 MaiT-T / unmasked", "mait_t24_224:scheme=sch1", "mait_t24_224:scheme=none", 0.9),
    ("MaiT-T (Sch.3) / unmasked", "mait_t24_224", "mait_t24_224:scheme=none", 0.8),
]
TRAIN_TARGETS = [
    ("train MaiT-S / Swin-S", "mait_s24_224", "swin_small_patch4_window7_224", 1.2),
    ("train H-MaiT-T / Swin-T", "hmait_tiny_224", "swin_tiny_patch4_window7_224", 1.0),
    ("train MaiT-XS / unmasked", "mait_xs24_224", "mait_xs24_224:scheme=none", 0.8),
]
SMOKE_MODELS = {"mait_xs24_224": "mait_t24_224:depth=2,img_size=32",
                "mait_s24_224": "mait_s12_224:depth=2,img_size=32",
                "hmait_tiny_224": "hmait_tiny_224:img_size=64",
                "swin_tiny_patch4_window7_224": "deit_tiny_patch16_224:depth=2,img_size=32",
                "swin_small_patch4_window7_224": "deit_tiny_patch16_224:depth=2,img_size=32",
                "mait_t24_224:scheme=sch1": "mait_t24_224:depth=2,img_size=32,scheme=sch1",
                "mait_t24_224:scheme=none": "mait_t24_224:depth=2,img_size=32,scheme=none",
                "mait_t24_224": "mait_t24_224:depth=2,img_size=32",
                "mait_xs24_224:scheme=none": "mait_t24_224:depth=2,img_size=32,scheme=none"}


def log(*parts: Any) -> None:
    print(*parts, flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp(min=1e-30))


# ------------------------------------------------------------------------------ 1. correctness
CASES = [((14, 14), 3, 1, [0.0, 0.0, 0.0]), ((14, 14), 3, 1, [0.0, 0.35, 1.0]), ((9, 15), 5, 2, [0.0, 1.0, 0.6]),
         ((28, 28), 3, 0, [0.0, 0.0, 1.0]), ((7, 7), 7, 1, [0.2, 0.0, 1.0]), ((56, 56), 3, 1, [0.0, 0.0, 0.0])]
BACKENDS_FOR = {"all_hard": ("flex", "blocksparse", "triton", "compiled", "local", "matmul", "auto"),
                "mixed": ("flex", "matmul", "auto")}
PRECISIONS = {"float32": (None, 2e-5, 2e-5), "bfloat16": (torch.bfloat16, 2e-2, 4e-2),
              "float16": (torch.float16, 4e-3, 8e-3)}
HALF_CASES = (1, 5)          # the cases also checked in bf16 and fp16 (every case compiles its own kernels)


def check_correctness(device: torch.device, smoke: bool) -> list[dict]:
    rows = []
    cases = [((5, 4), 3, 1, [0.0, 0.0, 0.0]), ((5, 4), 3, 1, [0.0, 0.35, 1.0])] if smoke else CASES
    runs_here = dict(BACKENDS_FOR)
    if smoke:     # the Triton kernel needs CUDA or TRITON_INTERPRET=1; inductor's CPU compile takes minutes here
        runs_here["all_hard"] = tuple(b for b in BACKENDS_FOR["all_hard"] if b not in ("triton", "compiled"))
    for index, (grid, size, prefix, alpha) in enumerate(cases):
        tokens = prefix + grid[0] * grid[1]
        generator = torch.Generator().manual_seed(tokens)
        base = [torch.randn(2, 3, tokens, 32, generator=generator) for _ in range(3)]
        weight = torch.randn(2, 3, tokens, 32, generator=generator)
        kwargs = dict(grid_size=grid, mask_size=size, num_prefix_tokens=prefix)
        truth_in = [t.double().requires_grad_() for t in base]
        truth_alpha = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
        truth = mait.masked_attention(*truth_in, alpha=truth_alpha, backend="reference", **kwargs)
        truth_grads = torch.autograd.grad((truth * weight.double()).sum(), truth_in + [truth_alpha])
        kind = "all_hard" if not any(alpha) else "mixed"
        for backend in runs_here[kind]:
            for name, (amp_dtype, fwd_tol, grad_tol) in PRECISIONS.items():
                if name != "float32" and (smoke or index not in HALF_CASES):
                    continue
                # FlexAttention has no CPU backward; the Triton kernel none at all
                train = backend != "triton" and not (smoke and backend in ("flex", "blocksparse"))
                row: dict[str, Any] = {"grid": f"{grid[0]}x{grid[1]}", "R": size, "prefix": prefix,
                                       "alpha": alpha, "backend": backend, "precision": name}
                inputs = [t.to(device).requires_grad_(train) for t in base]
                # α as the module passes it: learnable (hence soft) for the mixed layers
                a = torch.tensor(alpha, device=device, requires_grad=train and kind == "mixed")
                call_alpha: Any = 0.0 if kind == "all_hard" else a
                try:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        out = mait.masked_attention(*inputs, alpha=call_alpha, backend=backend, **kwargs)
                    row["forward"] = rel(out, truth)
                    if train:
                        wanted = inputs + ([a] if a.requires_grad else [])
                        grads = torch.autograd.grad((out.float() * weight.to(device)).sum(), wanted)
                        row["grad"] = max(rel(g, t) for g, t in zip(grads[:3], truth_grads[:3]))
                        if a.requires_grad:
                            row["dalpha"] = rel(grads[3], truth_grads[3])
                    row["ok"] = row["forward"] < fwd_tol and row.get("grad", 0) < grad_tol and \
                        row.get("dalpha", 0) < grad_tol
                except Exception as error:            # reported in the table, never hidden
                    row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
                    row["ok"] = False
                rows.append(row)
                log("  " + "  ".join(f"{k}={v if not isinstance(v, float) else f'{v:.2e}'}" for k, v in row.items()))
    return rows


# ------------------------------------------------------------------------------ 2-4. timing
def run_attention(device: torch.device, smoke: bool) -> list[dict]:
    rows = []
    grids = [[4, 6]] if smoke else [[14, 28], [56], [112]]
    batches = [1] if smoke else [64, 16, 4]
    for grid, batch in zip(grids, batches):
        settings = BenchSettings(grids=tuple(grid), batch_size=batch, repeats=1 if smoke else 20,
                                 warmup=0 if smoke else 3, max_dense_gib=24)
        log(benchmarking.attention_header(settings, device))
        result = benchmarking.bench_attention(settings, device, report=log)
        for row in result["rows"]:
            row["batch"] = batch
        rows += result["rows"]
    return rows


def run_models(device: torch.device, smoke: bool, train: bool) -> dict[str, dict]:
    targets = TRAIN_TARGETS if train else MODEL_TARGETS
    specs = list(dict.fromkeys(spec for _, a, b, _ in targets for spec in (a, b)))
    if not smoke:
        specs += [] if train else ["deit_small_patch16_224", "cait_xxs24_224", "hmait_small_224"]
    run_specs = [SMOKE_MODELS.get(s, s) for s in specs] if smoke else specs
    settings = BenchSettings(batch_size=2 if smoke else 64, repeats=1 if smoke else (5 if train else 10),
                             warmup=0 if smoke else 2, train=train)
    result = benchmarking.bench_models(run_specs, settings, device)
    log(benchmarking.models_table(result, device))
    by_spec = {row["model"]: row for row in result["rows"]}
    return {spec: by_spec[SMOKE_MODELS.get(spec, spec) if smoke else spec] for spec in specs}


def targets_table(models: dict, train: dict, attention: list[dict], smoke: bool) -> list[dict]:
    table = []
    for (label, a, b, target), source in [(t, models) for t in MODEL_TARGETS] + [(t, train) for t in TRAIN_TARGETS]:
        num, den = source[a]["images_per_s"], source[b]["images_per_s"]
        if num is None or den is None:
            table.append({"target": label, "measured": None, "wanted": target, "met": False,
                          "detail": source[a].get("error") or source[b].get("error")})
            continue
        table.append({"target": label, "measured": round(num / den, 2), "wanted": target, "met": num / den >= target,
                      "detail": f"{num:.0f} vs {den:.0f} img/s"})
    for grid, wanted in ([] if smoke else [(56, 1.0), (112, 2.0)]):
        row = next(r for r in attention if r["grid"] == grid)
        ratio = row["sdpa_ms"] / row["auto_ms"]
        table.append({"target": f"op {grid}x{grid} hard, SDPA / auto (batch {row['batch']})", "measured":
                      round(ratio, 2), "wanted": wanted, "met": ratio >= wanted,
                      "detail": f"auto {row['auto_ms']:.3f} ms, SDPA {row['sdpa_ms']:.3f} ms"})
    return table


def target_line(row: dict) -> str:
    measured = f"{row['measured']:.2f}x" if row["measured"] is not None else "failed"
    return f"{row['target']:<48}{measured:>10}{row['wanted']:>7.2f}x  {'met' if row['met'] else 'MISS':<5} {row['detail']}"


def write(name: str, payload: Any) -> None:
    if SMOKE:                       # a dry run leaves no results behind that could pass for GPU figures
        return
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"gpu_{name}.json"), "w") as handle:
        json.dump(payload, handle, indent=2, default=str)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU dry run of the whole script")
    parser.add_argument("--skip", nargs="*", default=[], choices=("correctness", "attention", "models", "train"))
    args = parser.parse_args(argv)
    global SMOKE
    SMOKE = args.smoke
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible; run with --smoke for a CPU dry run", file=sys.stderr)
        return 2
    start = time.time()
    log(f"mait GPU check: {benchmarking.where(device)}, triton "
        f"{getattr(sys.modules.get('triton'), '__version__', 'n/a')}")
    results: dict[str, Any] = {"environment": benchmarking.environment(device)}
    if "correctness" not in args.skip:
        log("\n== 1. every CUDA path vs the float64 reference (relative errors) ==")
        results["correctness"] = check_correctness(device, args.smoke)
        write("correctness", results["correctness"])
        log(f"[{time.time() - start:.0f} s]")
    if "attention" not in args.skip:
        log("\n== 2. the op alone, bf16, hard heads ==")
        results["attention"] = run_attention(device, args.smoke)
        write("attention", results["attention"])
        log(f"[{time.time() - start:.0f} s]")
    if "models" not in args.skip:
        log("\n== 3. models, inference ==")
        results["models"] = run_models(device, args.smoke, train=False)
        write("models", results["models"])
        log(f"[{time.time() - start:.0f} s]")
    if "train" not in args.skip:
        log("\n== 4. models, training step ==")
        results["train"] = run_models(device, args.smoke, train=True)
        write("train", results["train"])
        log(f"[{time.time() - start:.0f} s]")
    failed = [r for r in results.get("correctness", []) if not r["ok"]]
    lines = [f"correctness: {len(results.get('correctness', [])) - len(failed)} of "
             f"{len(results.get('correctness', []))} checks within tolerance"]
    lines += [f"  FAILED {r}" for r in failed]
    if {"models", "train", "attention"} <= set(results):
        table = targets_table(results["models"], results["train"], results["attention"], args.smoke)
        write("targets", table)
        lines.append(f"{'target':<48}{'measured':>10}{'wanted':>8}  {'':<5} detail")
        lines += [target_line(r) for r in table]
    lines.append(f"total {time.time() - start:.0f} s")
    if args.smoke:
        lines.append("(smoke run: tiny stand-in models on the CPU; its figures say nothing about speed)")
    summary = "\n".join(lines)
    log("\n== 5. summary ==\n" + summary)
    if not args.smoke:
        with open(os.path.join(RESULTS, "gpu_summary.txt"), "w") as handle:
            handle.write(summary + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
