"""Inference time of timm's ViT families masked by ``mait.mask_model`` against the same model unmasked.

    python benchmarks/timm_families.py                          # CPU, one thread, batch 1, 224 and 896 px
    python benchmarks/timm_families.py --sizes 224 --repeats 2  # a quick look
    python benchmarks/timm_families.py --sizes 896 --families "CaiT-XXS24 (talking heads)" --name timm_families_cait

Every family is built by timm for each image size (random weights: the time does not depend on them) and
timed three ways in interleaved rounds (every round times every variant once, in a fresh random order, after
one untimed call), in inference mode: timm's model, the model masked with ``scheme="all"`` (every head hard:
the linear-time backend) and with ``scheme="sch1"`` (one hard head per layer, the others plain).  The median
is reported with the speed-up over the unmasked model measured in the same rounds.  Results go to
``benchmarks/results/<name>[_<device>].{txt,json}`` (``--name``, default ``timm_families``); docs/backbones.md
quotes them.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import timm
import torch

import mait
from mait.benchmarking import environment, timed

RESULTS = Path(__file__).resolve().parent / "results"
# label -> (timm model, keywords): the families mask_model masks, at the small size users fine-tune.
FAMILIES = {
    "ViT-S/16": ("vit_small_patch16_224", {}),
    "EVA-02-S/14": ("eva02_small_patch14_224", {}),
    "RoPE-ViT-S/16 (Naver, axial)": ("vit_small_patch16_rope_224", {}),
    "DINOv3-S/16 (4 registers)": ("vit_small_patch16_dinov3", {}),
    "BEiT, S shape (rel. pos. bias)": ("beit_base_patch16_224", dict(embed_dim=384, num_heads=6)),
    "CaiT-XXS24 (talking heads)": ("cait_xxs24_224", {}),
}
SCHEMES = ("none", "all", "sch1")      # "none": timm's model itself, unmasked


def build(name: str, kwargs: dict, size: int, scheme: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=size, **kwargs).eval()
    if scheme != "none":
        mait.mask_model(model, scheme=scheme)
    return model.to(device)


def measure(label: str, size: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Median seconds per forward of one family at ``size`` px, unmasked and masked, timed in shared rounds."""
    name, kwargs = FAMILIES[label]
    image = torch.randn(args.batch_size, 3, size, size, device=device)
    calls = {}
    for scheme in SCHEMES:
        def call(model=build(name, kwargs, size, scheme, device)) -> None:
            with torch.inference_mode():
                model(image)
        calls[scheme] = call
    times: dict[str, list[float]] = {scheme: [] for scheme in SCHEMES}
    for _ in range(args.repeats):
        for scheme in random.sample(SCHEMES, len(SCHEMES)):
            calls[scheme]()                                   # untimed: plans and masks of this size
            times[scheme].append(timed(calls[scheme], device))
    baseline = statistics.median(times["none"])
    return [dict(family=label, model=name, kwargs=kwargs, size=size, scheme=scheme,
                 seconds=statistics.median(times[scheme]), speedup=baseline / statistics.median(times[scheme]),
                 runs=times[scheme]) for scheme in SCHEMES]


def table(rows: list[dict], sizes: list[int]) -> list[str]:
    header = "| family | " + " | ".join(f"{size} px: unmasked / all hard / Sch.1" for size in sizes) + " |"
    lines = [header, "|---|" + "---|" * len(sizes)]
    for label in dict.fromkeys(row["family"] for row in rows):
        cells = []
        for size in sizes:
            at = {row["scheme"]: row for row in rows if row["family"] == label and row["size"] == size}
            cells.append(f"{_time(at['none']['seconds'])} / {_time(at['all']['seconds'])}, "
                         f"**{at['all']['speedup']:.2f}x** / {_time(at['sch1']['seconds'])}, "
                         f"{at['sch1']['speedup']:.2f}x")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 896])
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--note", default="", help="a line stored with the results (e.g. the machine's load)")
    parser.add_argument("--name", default="timm_families", help="stem of the result files (a partial run's own)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    env = environment(device)
    rows = []
    for size in args.sizes:
        for label in args.families:
            rows += measure(label, size, args, device)
            print(f"{size} px {label}: " + ", ".join(f"{r['scheme']} {_time(r['seconds'])} ({r['speedup']:.2f}x)"
                                                     for r in rows[-len(SCHEMES):]), flush=True)
    title = (f"{env.get('gpu', env['cpu'])}, {args.threads if device.type == 'cpu' else ''}"
             f"{' thread(s), ' if device.type == 'cpu' else ''}batch {args.batch_size}, float32 inference, "
             f"median of {args.repeats} interleaved rounds; torch {env['torch']}, timm {env['timm']}"
             + (f"; {args.note}" if args.note else ""))
    lines = [title, "time per forward and speed-up over the unmasked model in the same rounds", "",
             *table(rows, args.sizes)]
    print("\n".join(lines))
    stem = args.name + ("" if device.type == "cpu" else f"_{device.type}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(dict(environment=env, note=args.note, rows=rows), indent=1))


if __name__ == "__main__":
    main()
