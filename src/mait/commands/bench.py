"""``mait bench``: throughput of whole models, or of the attention op alone (``--attention``).

A thin command over :mod:`mait.benchmarking`.  Models run in interleaved rounds in one process
(median images/s, ratios to ``--baseline``); ``--train`` times a training step instead.  On
CUDA the default is bf16 autocast (``--no-amp`` for float32, ``--dtype float16``) and times come
from CUDA events, as in timm's benchmark; ``--compile`` wraps every model in ``torch.compile``.
``--attention`` sweeps the op over grid sizes: every backend, unmasked SDPA, time and peak
extra memory per call.

Results go to ``--out`` + ``.json`` / ``.csv`` / ``.png``.
"""

from __future__ import annotations

import argparse

import torch

from mait.benchmarking import (BenchSettings, attention_header, bench_attention, bench_models, models_table,
                               plot_attention, plot_models, write_results)
from mait.errors import UserError
from mait.train.distributed import setup


def settings_from(args: argparse.Namespace) -> BenchSettings:
    """The measurement settings the command line asks for."""
    return BenchSettings(batch_size=args.batch_size, img_size=args.img_size, train=args.train, amp=args.amp,
                         dtype=args.dtype, compile=args.compile, warmup=args.warmup, repeats=args.repeats,
                         grids=tuple(args.grids), mask_size=args.mask_size, heads=args.heads,
                         head_dim=args.head_dim, prefix=args.prefix, max_dense_gib=args.max_dense_gib,
                         memory=not args.no_memory)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.warmup < 0:
        raise UserError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be a positive number of images, got {args.batch_size}")
    device = setup(args.device).device         # the --device rule of every command
    settings = settings_from(args)
    if args.attention:
        if min(args.grids) < 1:
            raise UserError(f"--grids must be positive, got {args.grids}")
        print(attention_header(settings, device))
        result = bench_attention(settings, device, report=lambda line: print(line, flush=True))
        plot = plot_attention
    else:
        if not args.models:
            raise UserError("give --models (or --attention for the op alone)")
        result = bench_models(args.models, settings, device, baseline=args.baseline)
        print(models_table(result, device))
        plot = plot_models
    if args.out:
        written = write_results(args.out, result, plot)
        print(f"wrote {', '.join(written)}")
    return 0
