"""The compiled window backend against the linear (eager) one and dense SDPA: one masked layer, many grids.

    python benchmarks/compiled_window.py                          # CPU: 14x14..84x84, 1 and 2 threads
    python benchmarks/compiled_window.py --grids 14 --repeats 2   # a quick look
    python benchmarks/compiled_window.py --device cuda            # adds flex, blocksparse, triton (gpu.sh)
    python benchmarks/compiled_window.py --layer --grids 56 --dtype bfloat16 --threads 1   # the window's share of a layer

One MaiT-S layer (6 heads, d 64, R 3, one class token, batch 1), every head hard, through
``mait.masked_attention(..., backend=...)``, in inference and training (forward + backward for q, k, v).
For each grid the compiled backend's first call is timed apart (its compile time) and dynamo's count of
compiled graphs is read before and after it (recompiles per new grid; a second call and a change of
thread count must compile nothing); then every method is timed in interleaved rounds (a fresh random
order each round; each timed call follows an untimed call of the same method, so every method reads
its inputs from a warm cache, as a layer's attention does after its qkv projection, rather than
after whatever the method before it evicted: dense SDPA at 56x56 leaves the cache cold) and the median
reported, with the linear backend's time over each method's.  The
break-even column is how many calls the compiled backend needs before its compile time is paid back.
Results go to ``benchmarks/results/compiled_window[_<device>].{txt,json}``; benchmarks/README.md and
docs/performance.md quote them.

``--layer`` times instead what a compiled model pays for the window: one whole MaiT-S attention layer (qkv
projection, window, output projection; ``torch.compile`` of the layer, the window traced into its graph)
against the same layer with the attention op taken out (``out = v``: the layer's no-attention floor), under
autocast for bf16/fp16 (so the projections run as the model's do, on AMX where the CPU has it), inference
and training, in interleaved rounds.  On a CPU it reports the calling thread's CPU time besides the wall
time: at one thread that is the layer's own work, which other jobs on a loaded machine barely change.
Results go to ``benchmarks/results/compiled_layer_<dtype>.{txt,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

import mait
from mait.backends import BACKENDS
from mait.benchmarking import environment

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = "local"


def methods(device: torch.device, train: bool) -> list[str]:
    """What runs a layer of hard heads on ``device``: SDPA is the dense floor of the unmasked layer."""
    names = ["local", "compiled", "sdpa"]
    if device.type == "cuda":
        names += ["flex", "blocksparse"] + ([] if train else ["triton"])
    return [name for name in names if name == "sdpa" or name in BACKENDS]


def graphs_compiled() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_call(method: str, grid: int, train: bool, args: argparse.Namespace, device: torch.device):
    """A no-argument function running one layer call (and its backward when ``train``)."""
    generator = torch.Generator().manual_seed(grid)
    tokens = 1 + grid * grid
    dtype = getattr(torch, args.dtype)
    q, k, v = (torch.randn(args.batch_size, args.heads, tokens, args.head_dim, generator=generator)
               .to(device, dtype).requires_grad_(train) for _ in range(3))
    grad = torch.randn(q.shape, generator=generator).to(device, dtype)
    alpha = 1.0 if method == "sdpa" else 0.0

    def call() -> None:
        with torch.set_grad_enabled(train):
            out = mait.masked_attention(q, k, v, grid_size=grid, mask_size=args.mask_size, num_prefix_tokens=1,
                                        alpha=alpha, backend=method)
            if train:
                torch.autograd.grad(out, (q, k, v), grad)
        _sync(device)
    return call


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(grid: int, train: bool, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Compile time and recompiles of the compiled backend's first call, then medians per thread count."""
    names = methods(device, train)
    calls = {name: make_call(name, grid, train, args, device) for name in names}
    torch.set_num_threads(args.threads[0])
    before = graphs_compiled()
    compile_s = timed(calls["compiled"])
    first_graphs = graphs_compiled() - before
    calls["compiled"]()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name in names:                              # warm-up, untimed
            calls[name]()
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.repeats):
            order = list(names)
            random.shuffle(order)
            for name in order:            # each timed call right after an untimed one: its inputs warm in cache
                calls[name]()
                times[name].append(timed(calls[name]))
        medians = {name: statistics.median(values) for name, values in times.items()}
        saved = medians[BASELINE] - medians["compiled"]
        rows.append(dict(grid=grid, train=train, threads=threads, ms={n: 1e3 * s for n, s in medians.items()},
                         runs_ms={n: [1e3 * s for s in values] for n, values in times.items()},
                         speedup_vs_local={n: medians[BASELINE] / s for n, s in medians.items()},
                         compile_s=compile_s, graphs_first_call=first_graphs,
                         break_even_calls=round(compile_s / saved) if saved > 0 else None))
    rows[-1]["graphs_later_calls"] = graphs_compiled() - before - first_graphs   # must stay 0
    for row in rows:
        row["graphs_later_calls"] = rows[-1]["graphs_later_calls"]
    return rows


def table(rows: list[dict]) -> list[str]:
    names = list(rows[0]["ms"])
    lines = ["| grid | pass | threads | " + " | ".join(names) + " | compile (s), graphs | calls to repay |",
             "|---|---|---|" + "---|" * len(names) + "---|---|"]
    for row in rows:
        cells = [f"{row['ms'][n]:.2f} ms" + ("" if n == BASELINE else f", **{row['speedup_vs_local'][n]:.2f}x**")
                 for n in names]
        lines.append(f"| {row['grid']}x{row['grid']} | {'fwd+bwd' if row['train'] else 'forward'} | "
                     f"{row['threads']} | " + " | ".join(cells) + f" | {row['compile_s']:.1f}, "
                     f"{row['graphs_first_call']} (+{row['graphs_later_calls']} later) | "
                     f"{row['break_even_calls'] if row['break_even_calls'] is not None else 'never'} |")
    return lines


def targets(rows: list[dict]) -> list[str]:
    lines = []
    for train, goal in ((False, 3.0), (True, 2.5)):
        row = next((r for r in rows if r["grid"] == 56 and r["train"] == train and r["threads"] == 1), None)
        if row:
            got = row["speedup_vs_local"]["compiled"]
            lines.append(f"compiled / local at 56x56, {'forward+backward' if train else 'forward'}, one thread: "
                         f"{got:.2f}x (target >= {goal}x): {'met' if got >= goal else 'NOT met'}")
    return lines


class WindowlessAttention(mait.MaskedAttention):
    """The masked layer without its attention op (``out = v``): qkv and output projections only, the floor."""

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias=None) -> torch.Tensor:
        return v


def measure_layer(grid: int, train: bool, args: argparse.Namespace, device: torch.device) -> dict:
    """Medians (wall and thread CPU time) of the compiled layer with and without its window; first calls apart."""
    dtype = getattr(torch, args.dtype)
    dim = args.heads * args.head_dim
    generator = torch.Generator().manual_seed(grid)
    x = torch.randn(args.batch_size, 1 + grid * grid, dim, generator=generator).to(device).requires_grad_(train)
    calls, first, second = {}, {}, {}
    for name, kind in (("layer", mait.MaskedAttention), ("floor", WindowlessAttention)):
        torch.manual_seed(0)
        layer = torch.compile(kind(dim, args.heads, grid_size=grid, mask_size=args.mask_size).to(device),
                              dynamic=False)

        def call(layer=layer) -> None:
            with torch.set_grad_enabled(train), torch.autocast(device.type, dtype=dtype,
                                                               enabled=dtype != torch.float32):
                out = layer(x)
                if train:
                    out.float().sum().backward()
            _sync(device)
        calls[name] = call
        first[name] = timed(call)
        second[name] = timed(call)       # dynamo recompiles once: the layer's plan cache, filled by the first call
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name in random.sample(list(calls), len(calls)):
            cpu_start = time.thread_time()
            wall[name].append(timed(calls[name]))
            cpu[name].append(time.thread_time() - cpu_start)
    ms = {f"{name} {clock}": 1e3 * statistics.median(values[name])
          for clock, values in (("wall", wall), ("cpu", cpu)) for name in calls}
    return dict(grid=grid, train=train, ms=ms, first_call_s=first, second_call_s=second,
                per_round=statistics.median(a / b for a, b in zip(wall["layer"], wall["floor"])),
                runs_ms={clock: {n: [1e3 * t for t in v] for n, v in values.items()}
                         for clock, values in (("wall", wall), ("cpu", cpu))})


def layer_table(rows: list[dict]) -> list[str]:
    lines = ["| grid | pass | layer (wall) | floor (wall) | layer / floor (median of rounds) | layer (CPU) | floor (CPU) "
             "| layer / floor (CPU) | window's CPU time | first + second call, layer / floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        m = row["ms"]
        lines.append(f"| {row['grid']}x{row['grid']} | {'fwd+bwd' if row['train'] else 'forward'} | "
                     f"{m['layer wall']:.2f} ms | {m['floor wall']:.2f} ms | {row['per_round']:.2f}x | "
                     f"{m['layer cpu']:.2f} ms | {m['floor cpu']:.2f} ms | **{m['layer cpu'] / m['floor cpu']:.2f}x** | "
                     f"{m['layer cpu'] - m['floor cpu']:.2f} ms | "
                     + " / ".join(f"{row['first_call_s'][n]:.0f} + {row['second_call_s'][n]:.1f} s" for n in ("layer", "floor"))
                     + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grids", type=int, nargs="+", default=[14, 28, 56, 84])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts to time")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds (median reported)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--mask-size", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layer", action="store_true",
                        help="time a whole compiled attention layer against its no-attention floor instead")
    parser.add_argument("--output-stem", help="results file name (default compiled_window[_<device>])")
    parser.add_argument("--warm-cache", action="store_true",
                        help="use inductor's usual on-disk cache (default: a fresh one, so the first compile also "
                             "pays inductor's one-time work, as on a new machine, and later grids their own graphs)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mait_inductor_")
    env = environment(device)
    title = (f"{env.get('gpu', env['cpu'])}, batch {args.batch_size}, {args.heads} heads of {args.head_dim}, "
             f"R {args.mask_size}, 1 prefix token, every head hard, {args.dtype}, torch {torch.__version__}, "
             f"mait {mait.__version__}")
    print(title, flush=True)
    if args.layer:
        torch.set_num_threads(args.threads[0])
        rows = [measure_layer(grid, train, args, device) for grid in args.grids for train in (False, True)]
        text = "\n".join([title + f", {args.threads[0]} thread(s), one attention layer compiled whole",
                          f"load average at the end: {os.getloadavg()[0]:.1f}", ""] + layer_table(rows)) + "\n"
        print(text)
        stem = args.output_stem or f"compiled_layer_{args.dtype}"
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{stem}.txt").write_text(text)
        (RESULTS / f"{stem}.json").write_text(json.dumps({"args": vars(args), "environment": env, "rows": rows},
                                                         indent=1))
        print(f"wrote {RESULTS / stem}.txt, .json")
        return
    rows = []
    for grid in args.grids:
        for train in (False, True):
            new = measure(grid, train, args, device)
            rows += new
            print("\n".join(table(new)[2:]), flush=True)
    lines = [title, f"load average at the end: {os.getloadavg()[0]:.1f}", ""] + table(rows) + [""] + targets(rows)
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = args.output_stem or ("compiled_window" + ("" if device.type == "cpu" else f"_{device.type}"))
    (RESULTS / f"{stem}.txt").write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"args": vars(args), "environment": env, "rows": rows},
                                                     indent=1))
    print(f"wrote {RESULTS / stem}.txt, .json")


if __name__ == "__main__":
    main()
