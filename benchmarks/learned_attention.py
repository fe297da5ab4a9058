"""Learned-mask attention (Sparsifiner): the dense path against the O(T·k·d) gather path, side by side.

    python benchmarks/learned_attention.py                      # CPU, one thread, inference
    python benchmarks/learned_attention.py --train              # forward + backward
    python benchmarks/learned_attention.py --device cuda        # on a GPU

For each grid (+ class token) and keep rate it times ``learned_attention(..., backend=...)``
for ``dense``, ``gather`` and ``auto`` in interleaved rounds (a fresh random order per
round, one untimed call before each timed one) and reports medians and the dense / gather
ratio; ``auto`` should match the faster of the two (``mait.backends.learned.gather_is_faster``).
Results go to ``benchmarks/results/learned_attention[_train][_<device>].{txt,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

from mait.learned import kept_keys, learned_attention

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("dense", "gather", "auto")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(grid: int, keep_rate: float, args: argparse.Namespace) -> dict[str, float]:
    tokens = grid * grid + 1
    kept = kept_keys(tokens, keep_rate)
    shape = (args.batch_size, args.heads, tokens, args.head_dim)
    q, k, v = (torch.randn(shape, device=args.device, requires_grad=args.train) for _ in range(3))
    index = torch.rand(args.batch_size, args.heads, tokens - 1, tokens, device=args.device).topk(kept, -1).indices

    def call(method: str) -> None:
        with torch.set_grad_enabled(args.train):
            out = learned_attention(q, k, v, index, mode=args.mode, backend=method)
            if args.train:
                out.sum().backward()
        _sync(args.device)

    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        order = list(METHODS)
        random.shuffle(order)
        for method in order:
            call(method)
            start = time.perf_counter()
            call(method)
            times[method].append(1000 * (time.perf_counter() - start))
    return {m: statistics.median(t) for m, t in times.items()} | {"tokens": tokens, "kept": kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grids", type=int, nargs="+", default=[7, 14, 28, 40])
    parser.add_argument("--keep-rates", type=float, nargs="+", default=[0.05, 0.1, 0.25])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mode", default="neg_inf", choices=["neg_inf", "zero"])
    parser.add_argument("--train", action="store_true", help="time forward + backward")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    header = f"{'grid':>6}{'tokens':>8}{'k':>6}{'dense ms':>10}{'gather ms':>11}{'auto ms':>9}{'dense/gather':>14}"
    lines = [f"learned_attention, {args.device}, {'train' if args.train else 'inference'}, mode {args.mode}, "
             f"batch {args.batch_size}, {args.heads} heads of {args.head_dim}, {args.threads} thread(s), "
             f"load average {os.getloadavg()[0]:.1f}", header]
    print("\n".join(lines), flush=True)
    for grid in args.grids:
        for keep_rate in args.keep_rates:
            result = measure(grid, keep_rate, args) | {"grid": grid, "keep_rate": keep_rate}
            rows.append(result)
            line = (f"{grid:>4}^2{result['tokens']:>8}{result['kept']:>6}{result['dense']:>10.2f}"
                    f"{result['gather']:>11.2f}{result['auto']:>9.2f}{result['dense'] / result['gather']:>13.2f}x")
            lines.append(line)
            print(line, flush=True)
    RESULTS.mkdir(exist_ok=True)
    stem = "learned_attention" + ("_train" if args.train else "") + ("" if args.device == "cpu" else f"_{args.device}")
    (RESULTS / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
