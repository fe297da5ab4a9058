"""``mait bench``: throughput of whole models, or of the attention op alone (``--attention``).

Models are measured the way Swin and timm do it: eval mode, ``torch.inference_mode()``, one
fixed random batch, warm-up passes, then the median of repeated timings, in images/s.  All
models run in the same process and *interleaved* (round r times every model once), so
that load from other processes hits them alike and the ratios to ``--baseline`` are fair.
``--train`` times a training step (forward, cross-entropy, backward) instead.  On CUDA the
default is bf16 autocast (``--no-amp`` for float32, ``--dtype float16``) and times come
from CUDA events, as in timm's benchmark; ``--compile`` wraps every model in ``torch.compile``.

``--attention`` sweeps the op over grid sizes: dense masked attention (the reference),
the linear backend, ``auto`` (all heads hard-masked) and unmasked
``scaled_dot_product_attention`` — on CUDA also the fused FlexAttention kernel and the
block-sparse identity — with time and peak extra memory per call (CPU: from the
profiler's allocation trace; CUDA: ``max_memory_allocated``).

Results go to ``--out`` + ``.json`` / ``.csv`` / ``.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Iterator

import timm
import torch
import torch.nn.functional as F
from tqdm import tqdm

import mait
from mait.errors import UserError
from mait.train.distributed import setup


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", metavar="SPEC",
                        help="timm model names, optionally with kwargs: mait_t24_224:scheme=sch1,mask_size=5")
    parser.add_argument("--baseline", default=None, help="model spec the ratios refer to (default: the first)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (default: 64 models, 4 attention)")
    parser.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    parser.add_argument("--train", action="store_true", help="time a training step (forward + backward)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="autocast to --dtype (default: on for CUDA, off on the CPU)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16",
                        help="autocast dtype with --amp (default: bfloat16)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model before timing")
    parser.add_argument("--attention", action="store_true", help="benchmark the attention op alone")
    parser.add_argument("--grids", nargs="+", type=int, default=[7, 14, 28, 56, 112], help="square grid sizes")
    parser.add_argument("--mask-size", type=int, default=3)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--prefix", type=int, default=1, help="prefix tokens (class token)")
    parser.add_argument("--max-dense-gib", type=float, default=6.0,
                        help="skip dense masked attention when its score tensors would exceed this (GiB)")
    parser.add_argument("--no-memory", action="store_true", help="do not measure peak memory (attention)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="path prefix of the .json/.csv/.png results (default: none)")


# ---------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes: CUDA events on a GPU, the wall clock elsewhere."""
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def autocast_context(args: argparse.Namespace, device: torch.device) -> ContextManager[Any]:
    """``torch.autocast`` to ``--dtype`` when ``--amp`` is on (default: on CUDA only)."""
    if not amp_enabled(args, device):
        return nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, args.dtype))


def amp_enabled(args: argparse.Namespace, device: torch.device) -> bool:
    return device.type == "cuda" if args.amp is None else bool(args.amp)


def precision(args: argparse.Namespace, device: torch.device) -> str:
    return f"{args.dtype} autocast" if amp_enabled(args, device) else "float32"


def peak_extra_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated before it ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as handle:
            events = json.load(handle)["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not memory:
        return 0
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in memory) - start


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Silence file descriptor 2 for a moment: the profiler's native library logs start/stop lines
    (and a CUDA device-count error on GPU-less machines) straight to it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> ``(name, kwargs)``; values become int/float when they look like one."""
    name, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"model spec {spec!r}: expected key=value after ':', got {item!r}")
        for cast in (int, float):
            try:
                kwargs[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            kwargs[key] = value
    if not timm.is_model(name):
        raise UserError(f"unknown model {name!r} in spec {spec!r}")
    return name, kwargs


def environment(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "timm": timm.__version__, "mait": mait.__version__, "device": str(device),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _write(prefix: str, payload: dict, rows: list[dict], plot: Callable[[str], None]) -> None:
    folder = os.path.dirname(prefix)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(prefix + ".json", "w") as handle:
        json.dump(payload, handle, indent=2)
    with open(prefix + ".csv", "w", newline="") as handle:
        fields = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    plot(prefix + ".png")
    print(f"wrote {prefix}.json, {prefix}.csv, {prefix}.png")


# ---------------------------------------------------------------------------- whole models
def bench_models(args: argparse.Namespace, device: torch.device) -> dict:
    if not args.models:
        raise UserError("give --models (or --attention for the op alone)")
    batch = args.batch_size or 64
    autocast = autocast_context(args, device)
    specs = list(dict.fromkeys(args.models))
    baseline = args.baseline or specs[0]
    if baseline not in specs:
        raise UserError(f"--baseline {baseline!r} is not one of --models {specs}")
    runs = []
    generator = torch.Generator().manual_seed(0)
    for spec in specs:
        name, kwargs = parse_spec(spec)
        if args.img_size:
            kwargs.setdefault("img_size", args.img_size)
        try:
            model = timm.create_model(name, pretrained=False, **kwargs).to(device)
        except (TypeError, ValueError) as error:
            raise UserError(f"cannot build {spec!r}: {error}") from error
        built_for = getattr(getattr(model, "patch_embed", None), "img_size", None)
        size = tuple(built_for or model.pretrained_cfg["input_size"][1:])
        channels = getattr(getattr(model, "patch_embed", None), "proj", None)
        channels = channels.in_channels if isinstance(channels, torch.nn.Conv2d) else model.pretrained_cfg[
            "input_size"][0]
        images = torch.randn(batch, channels, *size, generator=generator).to(device)
        params_m = sum(p.numel() for p in model.parameters()) / 1e6
        forward = torch.compile(model) if args.compile else model
        if args.train:
            model.train()
            labels = torch.randint(0, model.num_classes, (batch,), generator=generator).to(device)

            def step(model=model, forward=forward, images=images, labels=labels) -> None:
                model.zero_grad(set_to_none=True)
                with autocast:
                    loss = F.cross_entropy(forward(images), labels)
                loss.backward()
        else:
            model.eval()

            def step(forward=forward, images=images) -> None:
                with torch.inference_mode(), autocast:
                    forward(images)
        runs.append({"spec": spec, "step": step, "times": [], "params_m": params_m})
    with tqdm(total=(args.warmup + args.repeats) * len(runs), desc="bench", unit="pass", leave=False, disable=None) as progress:
        for run in runs:
            for _ in range(args.warmup):
                _attempt(run, lambda run=run: run["step"]())
                progress.update()
        for _ in range(args.repeats):               # interleaved rounds: every model once per round
            for run in runs:
                _attempt(run, lambda run=run: run["times"].append(_timed(run["step"], device)))
                progress.update()
    rows = []
    for run in runs:
        row = {"model": run["spec"], "params_m": round(run["params_m"], 2), "batch": batch}
        if "error" in run:
            row.update(median_s=None, images_per_s=None, error=run["error"])
        else:
            median = statistics.median(run["times"])
            row.update(median_s=round(median, 4), images_per_s=round(batch / median, 2))
        rows.append(row)
    base = next(row for row in rows if row["model"] == baseline)
    for row in rows:
        ok = row["images_per_s"] is not None and base["images_per_s"] is not None
        row["ratio"] = round(row["images_per_s"] / base["images_per_s"], 3) if ok else None
    mode = "training step (forward + backward)" if args.train else "inference"
    print(f"{mode}, batch {batch}, {precision(args, device)}{', compiled' if args.compile else ''}, median of "
          f"{args.repeats} interleaved rounds after {args.warmup} warm-up, {_where(device)}")
    print(f"{'model':<48}{'params (M)':>11}{'images/s':>11}{'ratio':>8}")
    for row in rows:
        if row["images_per_s"] is None:
            print(f"{row['model']:<48}{row['params_m']:>11.2f}  failed: {row['error']}")
        else:
            ratio = f"{row['ratio']:>7.2f}x" if row["ratio"] is not None else f"{'-':>8}"
            print(f"{row['model']:<48}{row['params_m']:>11.2f}{row['images_per_s']:>11.2f}{ratio}")
    print(f"(ratio = images/s over {baseline})")
    return {"kind": "models", "mode": "train" if args.train else "inference", "baseline": baseline,
            "precision": precision(args, device), "compiled": args.compile, "warmup": args.warmup, "repeats": args.repeats, "environment": environment(device), "rows": rows}


def _attempt(run: dict, fn: Callable[[], Any]) -> None:
    """Run one pass of a model unless it failed before; a failure is kept and reported in its row
    (one model that cannot run on this device must not hide the others' figures)."""
    if "error" in run:
        return
    try:
        fn()
    except (RuntimeError, ValueError, NotImplementedError, AssertionError) as error:
        run["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"


def _where(device: torch.device) -> str:
    """Device and versions for the table's header line."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    return f"{device} ({name}), torch {torch.__version__}, timm {timm.__version__}"


def _plot_models(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    ax.barh([r["model"] for r in rows], [r["images_per_s"] or 0 for r in rows], color="tab:blue")
    for i, row in enumerate(rows):
        ax.text(row["images_per_s"] or 0, i, f" {row['ratio']:.2f}x" if row["ratio"] is not None else " failed",
                va="center")
    ax.invert_yaxis()
    ax.set_xlabel(f"images/s ({result['mode']}, batch {rows[0]['batch']}; ratio to {result['baseline']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- attention op
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


def _attention_fn(method: str, q, k, v, grid: int, args: argparse.Namespace) -> Callable[[], torch.Tensor]:
    if method == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v)
    return lambda: mait.masked_attention(q, k, v, grid_size=grid, mask_size=args.mask_size,
                                         num_prefix_tokens=args.prefix, alpha=0.0, backend=METHOD_BACKENDS[method])


def bench_attention(args: argparse.Namespace, device: torch.device) -> dict:
    batch = args.batch_size or 4
    dtype = getattr(torch, args.dtype) if amp_enabled(args, device) else torch.float32
    methods_here = attention_methods(device, args.train)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for grid in args.grids:
        tokens = args.prefix + grid * grid
        shape = (batch, args.heads, tokens, args.head_dim)
        q, k, v = (torch.randn(shape, generator=generator).to(device, dtype).requires_grad_(args.train)
                   for _ in range(3))
        dense_gib = 3 * batch * args.heads * tokens * tokens * max(q.element_size(), 4) / 2 ** 30
        row: dict[str, Any] = {"grid": grid, "tokens": tokens}
        fns = {}
        for method in methods_here:
            if method in DENSE_METHODS and dense_gib > args.max_dense_gib:
                continue
            fn = _attention_fn(method, q, k, v, grid, args)
            if args.train:
                fns[method] = lambda fn=fn: fn().sum().backward()
            else:
                def infer(fn=fn) -> None:
                    with torch.inference_mode():
                        fn()
                fns[method] = infer
        for fn in fns.values():
            for _ in range(args.warmup):
                fn()
        times: dict[str, list[float]] = {method: [] for method in fns}
        methods, order = list(fns), random.Random(grid)
        for _ in range(args.repeats):
            # A fresh order each round, and one untimed call right before each timed one: a timed
            # call never pays for the allocator and cache state the previous method left behind
            # (after the dense map, the next method otherwise re-faults its memory).
            for method in order.sample(methods, len(methods)):
                fns[method]()
                times[method].append(_timed(fns[method], device))
        for method in methods_here:
            row[f"{method}_ms"] = round(1e3 * statistics.median(times[method]), 3) if method in fns else None
            if not args.no_memory:
                row[f"{method}_mib"] = (round(peak_extra_memory(fns[method], device) / 2 ** 20, 2)
                                        if method in fns else None)
        best = min(row[f"{m}_ms"] for m in ("dense", "matmul", "linear") if row.get(f"{m}_ms") is not None)
        row["dense_over_linear"] = round(row["dense_ms"] / row["linear_ms"], 2) if row["dense_ms"] else None
        row["sdpa_over_linear"] = round(row["sdpa_ms"] / row["linear_ms"], 2)
        row["auto_over_best"] = round(row["auto_ms"] / best, 2)
        row["sdpa_over_auto"] = round(row["sdpa_ms"] / row["auto_ms"], 2)
        if not args.no_memory and row["dense_mib"]:
            row["dense_mem_over_linear"] = round(row["dense_mib"] / max(row["linear_mib"], 1e-6), 1)
        rows.append(row)
        print(_attention_line(row), flush=True)
    return {"kind": "attention", "mode": "train" if args.train else "inference", "batch": batch,
            "dtype": str(dtype).replace("torch.", ""), "methods": list(methods_here),
            "heads": args.heads, "head_dim": args.head_dim, "mask_size": args.mask_size, "prefix": args.prefix,
            "warmup": args.warmup, "repeats": args.repeats, "environment": environment(device), "rows": rows}


def _attention_line(row: dict) -> str:
    def ms(key: str) -> str:
        return f"{row[key]:>10.2f}" if row.get(key) is not None else f"{'skipped':>10}"
    ratio = f"{row['dense_over_linear']:>10.1f}x" if row["dense_over_linear"] else f"{'-':>11}"
    memory = f"  mem dense/linear {row['dense_mem_over_linear']:.0f}x" if row.get("dense_mem_over_linear") else ""
    extra = "".join(ms(f"{m}_ms") for m in EXTRA_METHODS if f"{m}_ms" in row)
    return (f"{row['grid']:>4}x{row['grid']:<4}{row['tokens']:>7}{ms('dense_ms')}{ms('linear_ms')}{ms('auto_ms')}"
            f"{ms('sdpa_ms')}{extra}{ratio}{row['sdpa_over_linear']:>10.1f}x{row['auto_over_best']:>10.2f}x"
            f"{row['sdpa_over_auto']:>10.2f}x{memory}")


def _attention_header(args: argparse.Namespace, device: torch.device) -> str:
    dtype = args.dtype if amp_enabled(args, device) else "float32"
    extra = "".join(f"{m:>10}" for m in attention_methods(device, args.train) if m in EXTRA_METHODS)
    return (f"attention op, batch {args.batch_size or 4}, {args.heads} heads, d {args.head_dim}, R {args.mask_size}, "
            f"prefix {args.prefix}, {dtype}, {'forward + backward' if args.train else 'inference'}, median of "
            f"{args.repeats}, {_where(device)} (times in ms)\n"
            f"{'grid':<9}{'tokens':>7}{'dense':>10}{'linear':>10}{'auto':>10}{'sdpa':>10}{extra}"
            f"{'dense/lin':>11}{'sdpa/lin':>11}{'auto/best':>11}{'sdpa/auto':>11}")


def _plot_attention(result: dict, path: str) -> None:
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


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.warmup < 0:
        raise UserError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be a positive number of images, got {args.batch_size}")
    device = setup(args.device).device         # the --device rule of every command
    if args.attention:
        if min(args.grids) < 1:
            raise UserError(f"--grids must be positive, got {args.grids}")
        print(_attention_header(args, device))
        result = bench_attention(args, device)
        plot = _plot_attention
    else:
        result = bench_models(args, device)
        plot = _plot_models
    if args.out:
        _write(args.out, result, result["rows"], lambda path: plot(result, path))
    return 0
