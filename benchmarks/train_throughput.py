"""Training images/s of the small presets, two ways of one run side by side: data path or precision.

``--compare loader`` (the default): in-memory data (``in_memory: true``) against timm's loader;
``--compare precision``: ``mait train --amp`` (bf16 autocast on CUDA and on CPUs with native
bf16) against ``--no-amp`` (float32).  For each preset (and ``--schemes``) and each way it
measures, in interleaved rounds (each round times every way once; the median is reported):

* ``loader`` (loader comparison only): one epoch of the training loader alone (decode, augment,
  batch; no model);
* ``epoch``: a real ``mait train`` epoch (forward, backward, optimizer), the ``train_images_per_s``
  that ``mait train`` logs (evaluation excluded).

    python benchmarks/train_throughput.py                        # digits + CIFAR-10 presets, CPU
    python benchmarks/train_throughput.py --device cuda --train-subset 0 --presets cifar10-study
    python benchmarks/train_throughput.py --compare precision --presets cifar10-study --schemes all none

Results: a printed table and ``benchmarks/results/train_throughput.{txt,json,csv}``
(``train_precision.*`` for ``--compare precision``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {                       # name -> preset name or config file (data paths relative to the repository root)
    "digits": "digits",
    "cifar10": "cifar10",
    "cifar10-study": str(ROOT / "experiments" / "cifar10" / "base.yaml"),
}
CIFAR10_JPEG = "../shared/data/cifar10-train-jpg.tar.gz"   # CIFAR-10's training JPEGs beside the checkout
# way -> (its config keys, the way the ratios refer to)
COMPARISONS = {
    "loader": ({"in-memory": {"in_memory": "true"}, "timm loader": {"in_memory": "false"}}, "timm loader"),
    "precision": ({"amp": {"amp": True}, "fp32": {"amp": False}}, "fp32"),
}


def loader_images_per_s(config) -> tuple[float, int]:
    """One epoch of the training loader alone (what the model would be fed): images/s and images."""
    from mait.train import build_loaders
    loaders = build_loaders(config)
    loaders.sampler.set_epoch(0)
    start, images = time.perf_counter(), 0
    for batch, _ in loaders.train:
        images += len(batch)
    return images / (time.perf_counter() - start), images


def epoch_images_per_s(config, folder: Path) -> float:
    """One training epoch of ``mait train`` (evaluation excluded), images/s."""
    from mait.train import train
    result = train(config.__class__.from_dict({"output": str(folder)}, base=config))
    return result.history[0]["train_images_per_s"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", default="loader", choices=list(COMPARISONS),
                        help="loader: in-memory vs timm's loader; precision: --amp vs float32 (default: loader)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--schemes", nargs="+", default=["default"],
                        help="masking schemes to run each preset with; 'default' = the preset's own (the default)")
    parser.add_argument("--train-subset", type=int, default=5120,
                        help="training images per epoch for the CIFAR presets (0 = all 40,000; digits: all)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--cifar10-data", default=CIFAR10_JPEG,
                        help="CIFAR-10 for the cifar10 preset (default: the JPEG tarball in ../shared/data)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None,
                        help="path prefix of the .txt/.json/.csv results (default: benchmarks/results/"
                             "train_throughput, or train_precision with --compare precision)")
    args = parser.parse_args(argv)
    out = args.out or ROOT / "benchmarks" / "results" / (
        "train_throughput" if args.compare == "loader" else "train_precision")
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)                                    # the presets' data paths are relative to the repository
    from mait.train import load_config
    from mait.train.precision import choose_precision

    ways, baseline = COMPARISONS[args.compare]
    time_loader = args.compare == "loader"
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            for scheme in args.schemes:
                keys = {"epochs": 1, "warmup_epochs": 0, "progress": False, "device": args.device, "val_subset": 256}
                if preset != "digits":
                    keys["train_subset"] = args.train_subset
                if preset == "cifar10":
                    keys["data"] = args.cifar10_data
                if scheme != "default":
                    keys["scheme"] = scheme
                configs = {way: load_config(PRESETS[preset], {**keys, **way_keys}) for way, way_keys in ways.items()}
                # untimed: extract/decode the data once, warm the caches
                images = {way: loader_images_per_s(config)[1] for way, config in configs.items()}
                timings: dict[tuple[str, str], list[float]] = {}
                for round_ in range(args.repeats):
                    for way, config in configs.items():
                        if time_loader:
                            timings.setdefault((way, "loader"), []).append(loader_images_per_s(config)[0])
                        folder = Path(tmp) / f"{preset}-{scheme}-{way.replace(' ', '-')}-{round_}"
                        timings.setdefault((way, "epoch"), []).append(epoch_images_per_s(config, folder))
                base = configs[baseline]
                for way, config in configs.items():
                    row = {"preset": preset, "model": base.model, "scheme": scheme,
                           "batch_size": base.batch_size, "workers": base.workers, "images_per_epoch": images[way],
                           "path": way}
                    if args.compare == "precision":
                        row["precision"] = choose_precision(config.amp, torch.device(args.device)).describe()
                    for what in ("loader", "epoch") if time_loader else ("epoch",):
                        row[f"{what}_images_per_s"] = statistics.median(timings[way, what])
                        row[f"{what}_ratio"] = row[f"{what}_images_per_s"] / statistics.median(timings[baseline, what])
                    rows.append(row)
                    print(f"[train_throughput] {preset} {row['scheme']} {way}: "
                          + ", ".join(f"{what} {row[f'{what}_images_per_s']:.0f} images/s"
                                      for what in ("loader", "epoch") if f"{what}_images_per_s" in row),
                          file=sys.stderr, flush=True)
    text = "\n".join(loader_table(rows, args) if time_loader else precision_table(rows, args))
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    environment = {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
                   "device": args.device, "threads": args.threads, "cpus": os.cpu_count(),
                   "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}
    out.with_suffix(".txt").write_text(" ".join(["python", *sys.argv]) + "\n" + text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"environment": environment, "rows": rows}, indent=2) + "\n")
    with out.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}.txt, .json, .csv")


# (title, row key, format spec): text left-aligned, numbers right-aligned; ratios get an "x"
LOADER_COLUMNS = [("preset", "preset", "<14"), ("model", "model", "<16"), ("batch", "batch_size", ">6"),
                  ("workers", "workers", ">8"), ("images", "images_per_epoch", ">8"), ("  ", None, ""),
                  ("path", "path", "<12"), ("loader img/s", "loader_images_per_s", ">13.0f"),
                  ("ratio", "loader_ratio", ">7.2f"), ("epoch img/s", "epoch_images_per_s", ">13.0f"),
                  ("ratio", "epoch_ratio", ">7.2f")]
PRECISION_COLUMNS = [("preset", "preset", "<14"), ("model", "model", "<16"), ("scheme", "scheme", "<9"),
                     ("batch", "batch_size", ">6"), ("images", "images_per_epoch", ">8"), ("  ", None, ""),
                     ("precision", "precision", "<36"), ("epoch img/s", "epoch_images_per_s", ">12.0f"),
                     ("ratio", "epoch_ratio", ">7.2f")]


def table(rows: list[dict[str, Any]], columns: list[tuple[str, Any, str]]) -> list[str]:
    """The column titles and one line per row."""
    def cell(title: str, key: Any, spec: str, row: dict[str, Any]) -> str:
        if key is None:
            return title
        return f"{row[key]:{spec}}x" if title == "ratio" else f"{row[key]:{spec}}"

    def width(title: str, spec: str) -> str:            # a title is as wide as its cells ("x" included)
        digits = spec.lstrip("<>").split(".")[0]
        return spec[0] + str(int(digits) + (title == "ratio")) if digits else ""

    head = "".join(f"{title:{width(title, spec)}}" for title, _, spec in columns)
    return [head] + ["".join(cell(*column, row) for column in columns) for row in rows]


def loader_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    return [f"training images/s, median of {args.repeats} interleaved rounds, {args.threads} torch thread(s) on "
            f"{args.device}; ratio = over timm's loader of the same preset"] + table(rows, LOADER_COLUMNS)


def precision_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    return [f"training images/s of `mait train` epochs, median of {args.repeats} interleaved rounds, {args.threads} "
            f"torch thread(s) on {args.device}; ratio = over --no-amp (fp32) of the same preset and scheme"
            ] + table(rows, PRECISION_COLUMNS)


if __name__ == "__main__":
    main()
