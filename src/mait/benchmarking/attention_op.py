"""The masked-attention op alone over grid sizes: every backend and unmasked SDPA, time and peak extra memory.

Dense masked attention (the reference), the linear backend, ``auto`` (all heads hard-masked)
and unmasked ``scaled_dot_product_attention`` — on CUDA also the fused FlexAttention kernel
and the block-sparse identity — with time and peak extra memory per call (CPU: from the
profiler's allocation trace; CUDA: ``max_memory_allocated``).
"""

from __future__ import annotations

import random
import statistics
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import mait

from .measure import BenchSettings, environment, peak_extra_memory, timed, where

ATTENTION_METHODS = ("dense", "linear", "auto", "sdpa")
DENSE_METHODS = ("dense", "matmul")                    # hold the (B, heads, T, T) logits
GPU_METHODS = ("flex", "blocksparse", "triton")        # the GPU backends, timed on CUDA only
EXTRA_METHODS = ("matmul",) + GPU_METHODS              # columns after the four above
METHOD_BACKENDS = {"dense": "reference", "matmul": "matmul", "linear": "local", "auto": "auto", "flex": "flex",
                   "blocksparse": "blocksparse", "triton": "triton"}


def attention_methods(device: torch.device, train: bool) -> tuple[str, ...]:
    methods = ATTENTION_METHODS + ("matmul",)
    if device.type != "cuda":
        return methods
    return methods + tuple(m for m in GPU_METHODS if not (train and m == "triton"))   # triton: no backward


def _attention_fn(method: str, q, k, v, grid: int, settings: BenchSettings) -> Callable[[], torch.Tensor]:
    if method == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    return lambda: mait.masked_attention(q, k, v, grid_size=grid, mask_size=settings.mask_size,
                                         num_prefix_tokens=settings.prefix, alpha=0.0,
                                         backend=METHOD_BACKENDS[method])


def bench_attention(settings: BenchSettings, device: torch.device,
                    report: Optional[Callable[[str], None]] = None) -> dict:
    """Milliseconds (and peak extra MiB) per call of every method on each of ``settings.grids``;
    ``report`` receives each grid's table line (:func:`attention_header`'s columns) as soon as it is measured."""
    batch = settings.batch_size or 4
    dtype = getattr(torch, settings.dtype) if settings.amp_enabled(device) else torch.float32
    methods_here = attention_methods(device, settings.train)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for grid in settings.grids:
        tokens = settings.prefix + grid * grid
        shape = (batch, settings.heads, tokens, settings.head_dim)
        q, k, v = (torch.randn(shape, generator=generator).to(device, dtype).requires_grad_(settings.train)
                   for _ in range(3))
        dense_gib = 3 * batch * settings.heads * tokens * tokens * max(q.element_size(), 4) / 2 ** 30
        row: dict[str, Any] = {"grid": grid, "tokens": tokens}
        fns = {}
        for method in methods_here:
            if method in DENSE_METHODS and dense_gib > settings.max_dense_gib:
                continue
            fn = _attention_fn(method, q, k, v, grid, settings)
            if settings.train:
                fns[method] = lambda fn=fn: fn().sum().backward()
            else:
                def infer(fn=fn) -> None:
                    with torch.inference_mode():
                        fn()
                fns[method] = infer
        for fn in fns.values():
            for _ in range(settings.warmup):
                fn()
        times: dict[str, list[float]] = {method: [] for method in fns}
        methods, order = list(fns), random.Random(grid)
        for _ in range(settings.repeats):
            # A fresh order each round, and one untimed call right before each timed one: a timed
            # call never pays for the allocator and cache state the previous method left behind
            # (after the dense map, the next method otherwise re-faults its memory).
            for method in order.sample(methods, len(methods)):
                fns[method]()
                times[method].append(timed(fns[method], device))
        for method in methods_here:
            row[f"{method}_ms"] = round(1e3 * statistics.median(times[method]), 3) if method in fns else None
            if settings.memory:
                row[f"{method}_mib"] = (round(peak_extra_memory(fns[method], device) / 2 ** 20, 2)
                                        if method in fns else None)
        best = min(row[f"{m}_ms"] for m in ("dense", "matmul", "linear") if row.get(f"{m}_ms") is not None)
        row["dense_over_linear"] = round(row["dense_ms"] / row["linear_ms"], 2) if row["dense_ms"] else None
        row["sdpa_over_linear"] = round(row["sdpa_ms"] / row["linear_ms"], 2)
        row["auto_over_best"] = round(row["auto_ms"] / best, 2)
        row["sdpa_over_auto"] = round(row["sdpa_ms"] / row["auto_ms"], 2)
        if settings.memory and row["dense_mib"]:
            row["dense_mem_over_linear"] = round(row["dense_mib"] / max(row["linear_mib"], 1e-6), 1)
        rows.append(row)
        if report is not None:
            report(attention_line(row))
    return {"kind": "attention", "mode": "train" if settings.train else "inference", "batch": batch,
            "dtype": str(dtype).replace("torch.", ""), "methods": list(methods_here),
            "heads": settings.heads, "head_dim": settings.head_dim, "mask_size": settings.mask_size,
            "prefix": settings.prefix, "warmup": settings.warmup, "repeats": settings.repeats,
            "environment": environment(device), "rows": rows}


def attention_line(row: dict) -> str:
    """One grid's row of the printed table (the columns of :func:`attention_header`)."""
    def ms(key: str) -> str:
        return f"{row[key]:>10.2f}" if row.get(key) is not None else f"{'skipped':>10}"
    ratio = f"{row['dense_over_linear']:>10.1f}x" if row["dense_over_linear"] else f"{'-':>11}"
    memory = f"  mem dense/linear {row['dense_mem_over_linear']:.0f}x" if row.get("dense_mem_over_linear") else ""
    extra = "".join(ms(f"{m}_ms") for m in EXTRA_METHODS if f"{m}_ms" in row)
    return (f"{row['grid']:>4}x{row['grid']:<4}{row['tokens']:>7}{ms('dense_ms')}{ms('linear_ms')}{ms('auto_ms')}"
            f"{ms('sdpa_ms')}{extra}{ratio}{row['sdpa_over_linear']:>10.1f}x{row['auto_over_best']:>10.2f}x"
            f"{row['sdpa_over_auto']:>10.2f}x{memory}")


def attention_header(settings: BenchSettings, device: torch.device) -> str:
    """The printed table's title line and column names."""
    dtype = settings.dtype if settings.amp_enabled(device) else "float32"
    extra = "".join(f"{m:>10}" for m in attention_methods(device, settings.train) if m in EXTRA_METHODS)
    return (f"attention op, batch {settings.batch_size or 4}, {settings.heads} heads, d {settings.head_dim}, "
            f"R {settings.mask_size}, prefix {settings.prefix}, {dtype}, "
            f"{'forward + backward' if settings.train else 'inference'}, median of "
            f"{settings.repeats}, {where(device)} (times in ms)\n"
            f"{'grid':<9}{'tokens':>7}{'dense':>10}{'linear':>10}{'auto':>10}{'sdpa':>10}{extra}"
            f"{'dense/lin':>11}{'sdpa/lin':>11}{'auto/best':>11}{'sdpa/auto':>11}")


def plot_attention(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    has_memory = "linear_mib" in rows[0]
    fig, axes = plt.subplots(1, 2 if has_memory else 1, figsize=(11 if has_memory else 6, 4), squeeze=False)
    labels = {"dense": "dense masked (reference)", "matmul": "dense masked (matmul)", "linear": "linear (local)",
              "auto": "auto", "sdpa": "unmasked SDPA", "flex": "fused FlexAttention", "blocksparse": "block-sparse identity",
              "triton": "Triton kernel"}
    for method in result.get("methods", ATTENTION_METHODS):
        points = [(r["tokens"], r[f"{method}_ms"]) for r in rows if r[f"{method}_ms"]]
        if points:
            axes[0][0].plot(*zip(*[(t, 1e3 / ms) for t, ms in points]), marker="o", label=labels[method])
        if has_memory:
            points = [(r["tokens"], r[f"{method}_mib"]) for r in rows if r.get(f"{method}_mib")]
            if points:
                axes[0][1].plot(*zip(*points), marker="o", label=labels[method])
    axes[0][0].set(xscale="log", yscale="log", xlabel="tokens", ylabel="calls/s", title="throughput")
    axes[0][0].legend()
    if has_memory:
        axes[0][1].set(xscale="log", yscale="log", xlabel="tokens", ylabel="peak extra MiB", title="memory")
    fig.suptitle(f"masked attention, batch {result['batch']}, {result['heads']} heads, d {result['head_dim']}, "
                 f"R {result['mask_size']} ({result['mode']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
