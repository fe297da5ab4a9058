"""Size of the graphs ``mait export`` writes: operators, file size, dense score tensors, export time, accuracy.

For each model (random weights, 10 classes, as a checkpoint of it would be) and each
``--attention`` mode this exports what ``mait export`` exports (the same functions), counts the
operators (torch.export: call_function nodes; ONNX: graph nodes), the file's MiB and, in the
torch.export graph, the intermediates whose last two dimensions are a layer's token count (dense
T x T attention scores), and runs the file on 3 random images against the eager model (ONNX:
in onnxruntime).  These are the figures of docs/training.md.

    python benchmarks/export_graphs.py                     # everything (about 10 min on 2 cores)
    python benchmarks/export_graphs.py --formats onnx --models mait_nano4_8

Results: a printed table and ``benchmarks/results/export_graphs.{txt,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import timm
import torch

import mait
from mait.commands.export import export_onnx, export_pt2, graph_ops, run_exported, set_backend

ROOT = Path(__file__).resolve().parents[1]
MODELS = {                   # name -> (timm.create_model kwargs, --attention modes worth comparing)
    "mait_nano4_8": ({}, ("auto", "reference")),                     # the digits default (Sch.1, 8x8 grid)
    "mait_xt24_224": ({"scheme": "sch1"}, ("auto", "reference")),
    "hmait_tiny_224": ({}, ("auto", "reference")),
    "mait_cait_xxs24_224": ({}, ("auto",)),                           # talking heads: always dense
}


def score_tensors(path: Path, token_counts: set[int]) -> dict[int, int]:
    """Intermediates of a torch.export graph whose last two dims are T x T, by T (dense attention scores)."""
    counts: Counter = Counter()
    for node in torch.export.load(str(path)).graph.nodes:
        value = node.meta.get("val")
        if node.op == "call_function" and isinstance(value, torch.Tensor) and value.dim() >= 2:
            rows, cols = value.shape[-2:]
            if rows == cols and rows in token_counts:
                counts[int(rows)] += 1
    return dict(sorted(counts.items(), reverse=True))


def measure(name: str, kwargs: dict[str, Any], attention: str, fmt: str, folder: Path) -> dict[str, Any]:
    model = timm.create_model(name, num_classes=10, **kwargs).eval().requires_grad_(False)
    set_backend(model, attention)
    shape = model.pretrained_cfg["input_size"]
    generator = torch.Generator().manual_seed(0)
    example, check = torch.randn(2, *shape, generator=generator), torch.randn(3, *shape, generator=generator)
    path = folder / f"{name}-{attention}.{fmt}"
    with torch.no_grad():
        expected = model(check)
        start = time.perf_counter()
        (export_pt2 if fmt == "pt2" else export_onnx)(model, example, path)
        seconds = time.perf_counter() - start
        got = run_exported(path, fmt, check)
    row = {"model": name, "kwargs": kwargs, "attention": attention, "format": fmt, "ops": graph_ops(path, fmt),
           "mib": round(path.stat().st_size / 2 ** 20, 1), "export_s": round(seconds, 1),
           "max_logit_diff": None if got is None else float((got.float() - expected).abs().max())}
    if fmt == "pt2":
        tokens = {m.num_tokens for m in model.modules() if isinstance(m, mait.MaskedAttention)}
        row["score_tensors"] = score_tensors(path, tokens)
    return row


def line(row: dict[str, Any]) -> str:
    scores = row.get("score_tensors")
    dense = "" if scores is None else "  dense scores: " + (
        ", ".join(f"{n} of {t}x{t}" for t, n in scores.items()) or "none")
    difference = "not run" if row["max_logit_diff"] is None else f"{row['max_logit_diff']:.1e}"
    options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in row["kwargs"].items())
    return (f"{row['format']:<5}{(row['model'] + ' ' + options).strip():<34}{row['attention']:<10}{row['ops']:>7,} ops"
            f"{row['mib']:>8.1f} MiB{row['export_s']:>8.1f} s  max |logit diff| {difference}{dense}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--formats", nargs="+", default=["pt2", "onnx"], choices=["pt2", "onnx"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "export_graphs"),
                        help="path prefix of the .txt/.json results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = (f"exported graphs: random weights, 10 classes, example batch 2, check on 3 random images; torch "
              f"{torch.__version__}, timm {timm.__version__}, {args.threads} thread(s)")
    print(header, flush=True)
    rows, lines = [], [header]
    with tempfile.TemporaryDirectory() as folder:
        for fmt in args.formats:
            for name in args.models:
                kwargs, modes = MODELS[name]
                for attention in modes:
                    rows.append(measure(name, kwargs, attention, fmt, Path(folder)))
                    lines.append(line(rows[-1]))
                    print(lines[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"torch": torch.__version__, "timm": timm.__version__,
                                                    "threads": args.threads, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out.with_suffix('.txt')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
