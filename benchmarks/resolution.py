"""Inference time and peak memory against image size: linear (masked) against quadratic (global) attention.

    python benchmarks/resolution.py                              # CPU, one thread, batch 1, 224-1344 px
    python benchmarks/resolution.py --sizes 224 448 --repeats 2  # a quick look
    python benchmarks/resolution.py --device cuda                # on a GPU (benchmarks/gpu.sh runs it)
    python benchmarks/resolution.py --sizes 896 --compiled --models "MaiT-S all hard" DeiT-S "floor (no attention op)"
    python benchmarks/resolution.py --sizes 896 --compiled --compiled-only --amp --models "MaiT-S all hard" "floor (no attention op)"

Each model is built for each image size (``img_size=``) and timed in interleaved rounds (every
round times every model once, in a fresh random order, after one untimed call), in inference
mode; the median is reported, with the time per 16x16 patch (the image area over 256 px², so
linear growth shows as a flat line and quadratic growth as a rising one) and the peak memory of
one call above what the model holds.  Ratios are against DeiT-S (when in --models) at the same size, measured in the
same rounds.  The last column, DeiT-S without its attention op (:class:`ValuesOnly`), is the floor
of any attention implementation: DeiT-S / floor bounds what masking can gain at each size.
With ``--compiled`` each of MaiT-S all hard, DeiT-S and the floor (those among ``--models``) is also
timed as ``torch.compile(model)`` (inductor; its first call, the compile, is reported apart): compiled
MaiT-S fuses its window (docs/performance.md), and its time over the compiled floor is what masked
attention still costs (also given in CPU time of the calling thread, which other jobs' load barely changes at
one thread); ``--compiled-only`` leaves the eager models out.  Results go to
``benchmarks/results/resolution[_compiled][_bf16][_<device>].{txt,json,png}``; the docs
(docs/backbones.md, docs/performance.md) quote them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import timm
import torch

import mait
from mait.benchmarking import environment, parse_spec, peak_extra_memory

RESULTS = Path(__file__).resolve().parent / "results"
FLOOR = "floor (no attention op)"
MODELS = {
    "MaiT-S all hard": "mait_s12_224:scheme=all",
    "MaiT-S Sch.2": "mait_s12_224:scheme=sch2",
    "DeiT-S": "deit_small_patch16_224",
    "Swin-T": "swin_tiny_patch4_window7_224",
    "H-MaiT-T": "hmait_tiny_224",
    FLOOR: "deit_small_patch16_224",
}
BASELINE = "DeiT-S"
COMPILED = " (compiled)"
COMPILABLE = ("MaiT-S all hard", "DeiT-S", FLOOR)       # --compiled adds "<label> (compiled)" for these


class ValuesOnly(torch.nn.Module):
    """DeiT-S's attention layer without the attention op: the qkv and output projections only (``out = v``).

    A model of these layers does every computation of DeiT-S and MaiT-S except attending, so its time is
    the floor no attention implementation, masked or not, can go below; DeiT-S / floor is the largest
    speed-up any attention could give at that size.
    """

    def __init__(self, attention: torch.nn.Module) -> None:
        super().__init__()
        self.qkv, self.proj, self.heads = attention.qkv, attention.proj, attention.num_heads

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        return self.proj(self.qkv(x).unflatten(-1, (3, -1))[..., 2, :])


def build(label: str, size: int, device: torch.device) -> torch.nn.Module:
    if label.endswith(COMPILED):
        return torch.compile(build(label[:-len(COMPILED)], size, device))
    name, kwargs = parse_spec(MODELS[label])
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=size, **kwargs)
    if label == FLOOR:
        for block in model.blocks:
            block.attn = ValuesOnly(block.attn)
    return model.eval().to(device)


def autocast(args: argparse.Namespace, device: torch.device):
    """bf16 autocast with ``--amp`` (the CPU's native bf16 where it has it), else float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure_size(size: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Median seconds per forward and peak extra memory of every model at ``size`` px, timed in shared rounds
    (the first two calls of each, the compiles of compiled models, timed apart)."""
    calls, first_call, second_call = {}, {}, {}
    image = torch.randn(args.batch_size, 3, size, size, device=device)
    for label in args.labels:
        def call(model=build(label, size, device), compiled=label.endswith(COMPILED)) -> None:
            with torch.no_grad() if compiled else torch.inference_mode(), autocast(args, device):
                model(image)
        calls[label] = call
        first_call[label] = _timed(call, device)
        second_call[label] = _timed(call, device)     # a compiled MaiT recompiles once (its layers' plan caches filled)
    times: dict[str, list[float]] = {label: [] for label in args.labels}
    cpu_times: dict[str, list[float]] = {label: [] for label in args.labels}
    for _ in range(args.repeats):
        order = list(args.labels)
        random.shuffle(order)
        for label in order:
            calls[label]()
            cpu_start = time.thread_time()
            times[label].append(_timed(calls[label], device))
            cpu_times[label].append(time.thread_time() - cpu_start)
    patches = size * size / 256
    rows = []
    for label in args.labels:
        seconds = statistics.median(times[label])
        memory = peak_extra_memory(calls[label], device) / 2**20 if args.memory else None
        rows.append(dict(model=label, spec=MODELS[label.removesuffix(COMPILED)], size=size, patches=patches,
                         seconds=seconds, us_per_patch=1e6 * seconds / patches, peak_mib=memory, runs=times[label],
                         cpu_runs=cpu_times[label], cpu_seconds=statistics.median(cpu_times[label]),
                         first_call_s=first_call[label], second_call_s=second_call[label]))
    baseline = next((row["seconds"] for row in rows if row["model"] == BASELINE), None)   # None: not timed
    for row in rows:
        row["speedup_vs_deit_s"] = baseline / row["seconds"] if baseline else None
    return rows


def table(rows: list[dict]) -> list[str]:
    labels = list(dict.fromkeys(row["model"] for row in rows))
    lines = ["| size (px) | 16-px patches | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for size in dict.fromkeys(row["size"] for row in rows):
        at = {row["model"]: row for row in rows if row["size"] == size}
        cells = []
        for label in labels:
            row = at[label]
            cell = f"{row['seconds'] * 1e3:.0f} ms, {row['us_per_patch']:.0f} µs/patch"
            if row["speedup_vs_deit_s"] is not None and label != BASELINE:
                cell += f", **{row['speedup_vs_deit_s']:.2f}x**"
            if row["peak_mib"] is not None:
                cell += f", {row['peak_mib']:.0f} MiB"
            if label.endswith(COMPILED):
                cell += f", first calls {row['first_call_s']:.0f} s + {row['second_call_s']:.1f} s"
            cells.append(cell)
        lines.append(f"| {size} | {int(size * size / 256)} | " + " | ".join(cells) + " |")
    return lines


def targets(rows: list[dict], amp: bool) -> list[str]:
    """The figures the library promises on a CPU, one thread (docs/backbones.md)."""
    def row(label: str, size: int):
        return next((r for r in rows if r["model"] == label and r["size"] == size), None)

    lines = []
    for size, goal in ((896, 3.0), (1344, 5.0)):
        r, floor = row("MaiT-S all hard", size), row(FLOOR, size)
        if r and r["speedup_vs_deit_s"] is not None:
            bound = f"; no attention op at all would give {floor['speedup_vs_deit_s']:.2f}x" if floor else ""
            lines.append(f"MaiT-S all hard / DeiT-S at {size} px: {r['speedup_vs_deit_s']:.2f}x "
                         f"(target >= {goal:.0f}x): {'met' if r['speedup_vs_deit_s'] >= goal else 'NOT met'}{bound}")
    small, large = row("MaiT-S all hard", 448), row("MaiT-S all hard", 1344)
    if small and large:
        growth = large["us_per_patch"] / small["us_per_patch"]
        lines.append(f"MaiT-S all hard, time per patch 784 -> 7056 patches: {growth:.2f}x "
                     f"(target <= 1.2x): {'met' if growth <= 1.2 else 'NOT met'}")
    for size in dict.fromkeys(r["size"] for r in rows):
        mait_c, floor_c = row("MaiT-S all hard" + COMPILED, size), row(FLOOR + COMPILED, size)
        if mait_c and floor_c:
            ratio, goal = mait_c["seconds"] / floor_c["seconds"], 1.3 if amp else 1.15
            # the same round's two times, paired: robust to the machine's drift between rounds
            paired = statistics.median(a / b for a, b in zip(mait_c["runs"], floor_c["runs"]))
            verdict = f" (target <= {goal}x): {'met' if ratio <= goal else 'NOT met'}" if size == 896 else ""
            cpu = mait_c["cpu_seconds"] / floor_c["cpu_seconds"]
            lines.append(f"compiled MaiT-S all hard / compiled floor at {size} px: {ratio:.2f}x{verdict}; "
                         f"median of per-round ratios {paired:.2f}x; in CPU time of the calling thread "
                         f"(one thread: robust to other jobs' load) {cpu:.2f}x")
    mait_896, swin_896 = row("MaiT-S all hard", 896), row("Swin-T", 896)
    if mait_896 and swin_896:
        ratio = swin_896["seconds"] / mait_896["seconds"]
        lines.append(f"Swin-T / MaiT-S all hard at 896 px: {ratio:.2f}x (target > 1x): "
                     f"{'met' if ratio > 1 else 'NOT met'}")
    return lines


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == label]
        left.plot([r["size"] for r in mine], [r["seconds"] for r in mine], marker="o", label=label)
        right.plot([r["patches"] for r in mine], [r["us_per_patch"] for r in mine], marker="o", label=label)
    left.set(xlabel="image size (px, square)", ylabel="seconds per image", yscale="log", title="inference time")
    right.set(xlabel="16x16 patches", ylabel="µs per patch", xscale="log", title="time per patch (flat = linear)")
    patches = sorted({r["patches"] for r in rows})
    right.set_xticks(patches, [f"{p:.0f}" for p in patches], fontsize=7)
    right.minorticks_off()
    for axis in (left, right):
        axis.grid(alpha=0.3)
    right.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448, 672, 896, 1120, 1344])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per size (median reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory call")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (default float32)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), metavar="LABEL",
                        help="models to time (default all: " + ", ".join(MODELS) + ")")
    parser.add_argument("--compiled", nargs="*", choices=COMPILABLE, metavar="LABEL",
                        help="also time torch.compile of these models (no label: " + ", ".join(COMPILABLE)
                        + ", those among --models)")
    parser.add_argument("--compiled-only", action="store_true", help="time only the compiled models (with --compiled)")
    parser.add_argument("--output-stem", help="results file name (default resolution, resolution_<device>)")
    args = parser.parse_args()
    compiled = [] if args.compiled is None else args.compiled or [label for label in COMPILABLE if label in args.models]
    args.labels = ([] if args.compiled_only else args.models) + [label + COMPILED for label in compiled]
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    env = environment(device)
    title = (f"{env.get('gpu', env['cpu'])}, {args.threads if device.type == 'cpu' else ''}"
             f"{' thread(s), ' if device.type == 'cpu' else ''}batch {args.batch_size}, "
             f"{'bf16 autocast' if args.amp else 'float32'} inference, "
             f"torch {torch.__version__}, timm {timm.__version__}, mait {mait.__version__}")
    print(title, flush=True)
    rows = []
    for size in args.sizes:
        rows += measure_size(size, args, device)
        print("\n".join(table([r for r in rows if r["size"] == size])[2:]), flush=True)
    lines = ([title, f"load average at the end: {os.getloadavg()[0]:.1f}", ""] + table(rows) + [""]
             + targets(rows, args.amp))
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = args.output_stem or ("resolution" + ("_compiled" if compiled else "")
                                + ("_bf16" if args.amp else "") + ("" if device.type == "cpu" else f"_{device.type}"))
    (RESULTS / f"{stem}.txt").write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"args": vars(args), "environment": env, "rows": rows},
                                                     indent=1))
    plot(rows, RESULTS / f"{stem}.png", title)
    print(f"wrote {RESULTS / stem}.txt, .json, .png")


if __name__ == "__main__":
    main()
