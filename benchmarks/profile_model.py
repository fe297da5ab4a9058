"""Where the time goes: torch.profiler's top operators for one forward (or training step) of a model.

    python benchmarks/profile_model.py hmait_tiny_224 --batch-size 16 --threads 1
    python benchmarks/profile_model.py swin_tiny_patch4_window7_224 --batch-size 16 --train

Used to explain the whole-model ratios in benchmarks/README.md (see "Where the time goes").
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import mait  # noqa: F401  (registers the models)
from mait.benchmarking import parse_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model spec, e.g. mait_t24_224:scheme=sch1")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    name, kwargs = parse_spec(args.model)
    model = timm.create_model(name, **kwargs)
    images = torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(args.batch_size, dtype=torch.long)

    def step() -> None:
        if args.train:
            model.train()
            F.cross_entropy(model(images), labels).backward()
        else:
            model.eval()
            with torch.inference_mode():
                model(images)

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
