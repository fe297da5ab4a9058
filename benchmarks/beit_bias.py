"""BEiT's relative position bias on the linear-time backend: read from its table on the window offsets against
the same layer expanding the table to the dense ``(heads, T, T)`` matrix first.

    python benchmarks/beit_bias.py                         # CPU, one thread, batch 1, 448 and 896 px
    python benchmarks/beit_bias.py --sizes 448 --repeats 2 # a quick look

A BEiT of ViT-S shape (384 wide, 6 heads, patch 16) is masked with ``scheme="all"`` (every head hard: the
``local`` backend) and timed two ways in interleaved rounds (every round times both, in a fresh random order,
after one untimed call): ``table``, the layers handing the op their bias table (:class:`mait.bias.RelativeBias`,
what masked BEiT does), and ``expanded``, the same layers expanding the table to ``(1, heads, T, T)`` first
and the backend gathering the window from it (what masked BEiT did before).  Measured per size: one layer's
inference forward, one layer's training step (forward and backward, the table's gradient included) and the
whole model's inference forward; time is the median, memory the peak allocated above the inputs (torch's
profiler).  Results go to ``benchmarks/results/beit_bias.{txt,json}``; docs/backbones.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import timm
import torch

import mait
import mait.models.beit
from mait.benchmarking import environment, peak_extra_memory, timed
from timm_families import _time      # this folder's: how the family table writes a time

RESULTS = Path(__file__).resolve().parent / "results"
WAYS = ("table", "expanded")


@contextmanager
def expanded_bias(way: str) -> Iterator[None]:
    """Inside, ``expanded``: masked BEiT layers expand their table to the dense matrix before the op."""
    if way == "table":
        yield
        return
    table_bias = mait.models.beit.RelativeBias
    mait.models.beit.RelativeBias = lambda terms, shared=False: table_bias(terms, shared).dense()
    try:
        yield
    finally:
        mait.models.beit.RelativeBias = table_bias


def workloads(size: int, batch: int) -> dict[str, Callable[[], None]]:
    """The three measured calls at ``size`` px, on one masked model."""
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", img_size=size, embed_dim=384, num_heads=6).eval()
    mait.mask_model(model, scheme="all")
    image = torch.randn(batch, 3, size, size)
    tokens = torch.randn(batch, 1 + (size // 16) ** 2, 384, requires_grad=True)
    layer = model.blocks[0].attn

    def layer_inference() -> None:
        with torch.inference_mode():
            layer(tokens)

    def layer_train() -> None:
        layer(tokens).sum().backward()
        model.zero_grad(set_to_none=True)
        tokens.grad = None

    def model_inference() -> None:
        with torch.inference_mode():
            model(image)

    return {"layer inference": layer_inference, "layer train step": layer_train, "model inference": model_inference}


def measure(size: int, args: argparse.Namespace) -> list[dict]:
    rows = []
    for what, call in workloads(size, args.batch_size).items():
        times: dict[str, list[float]] = {way: [] for way in WAYS}
        for _ in range(args.repeats):
            for way in random.sample(WAYS, len(WAYS)):
                with expanded_bias(way):
                    call()                                       # untimed: plans and masks of this size
                    times[way].append(timed(call, torch.device("cpu")))
        memory = {}
        for way in WAYS:
            with expanded_bias(way):
                memory[way] = peak_extra_memory(call, torch.device("cpu"))
        for way in WAYS:
            rows.append(dict(size=size, tokens=1 + (size // 16) ** 2, what=what, way=way,
                             seconds=statistics.median(times[way]), runs=times[way], peak_bytes=memory[way]))
        table, expanded = rows[-2], rows[-1]
        print(f"{size} px {what}: table {_time(table['seconds'])} {table['peak_bytes'] / 2 ** 20:.0f} MiB, expanded "
              f"{_time(expanded['seconds'])} {expanded['peak_bytes'] / 2 ** 20:.0f} MiB", flush=True)
    return rows


def table_lines(rows: list[dict]) -> list[str]:
    lines = ["| px (tokens) | measured | time: table / expanded (speed-up) | peak memory: table / expanded |",
             "|---|---|---|---|"]
    for index in range(0, len(rows), 2):
        table, expanded = rows[index], rows[index + 1]
        lines.append(f"| {table['size']} ({table['tokens']}) | {table['what']} | {_time(table['seconds'])} / "
                     f"{_time(expanded['seconds'])} (**{expanded['seconds'] / table['seconds']:.2f}x**) | "
                     f"{table['peak_bytes'] / 2 ** 20:.0f} MiB / {expanded['peak_bytes'] / 2 ** 20:.0f} MiB |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 896])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--note", default="", help="a line stored with the results (e.g. the machine's load)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = environment(torch.device("cpu"))
    rows = [row for size in args.sizes for row in measure(size, args)]
    title = (f"{env['cpu']}, {args.threads} thread(s), batch {args.batch_size}, float32, BEiT of ViT-S shape, "
             f"scheme all (local backend), median of {args.repeats} interleaved rounds; torch {env['torch']}, "
             f"timm {env['timm']}" + (f"; {args.note}" if args.note else ""))
    lines = [title, "table: the op reads the bias table on the window; expanded: the (1, heads, T, T) matrix first",
             "", *table_lines(rows)]
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "beit_bias.txt").write_text("\n".join(lines) + "\n")
    (RESULTS / "beit_bias.json").write_text(json.dumps(dict(environment=env, note=args.note, rows=rows), indent=1))


if __name__ == "__main__":
    main()
