"""``mait demo``: build a model, run one random batch, print its masking scheme and α per layer."""

from __future__ import annotations

import argparse
import time

import timm
import torch

import mait  # noqa: F401  (registers the models)
from mait.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mait_t24_224", help="timm model name (default: mait_t24_224)")
    parser.add_argument("--scheme", default=None, help="masking scheme name or text (default: the model's)")
    parser.add_argument("--mask-size", type=int, default=3, help="odd mask size R (default: 3)")
    parser.add_argument("--batch-size", type=int, default=2)


def run(args: argparse.Namespace) -> int:
    from mait.train.engine import check_model_name

    check_model_name(args.model)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    kwargs = {"mask_size": args.mask_size}
    if args.scheme is not None:
        kwargs["scheme"] = args.scheme
    try:
        model = timm.create_model(args.model, **kwargs).eval()
    except TypeError:
        raise UserError(f"{args.model} is not a MaiT model (it takes no scheme or mask size); "
                        f"see timm.list_models('*mait*')") from None
    shape = model.pretrained_cfg["input_size"]          # (channels, height, width)
    images = torch.randn(args.batch_size, *shape, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.inference_mode():
        logits = model(images)
    elapsed = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {params / 1e6:.2f} M parameters, scheme {model.scheme}, mask {args.mask_size}x{args.mask_size}")
    print(f"forward of {tuple(images.shape)} -> {tuple(logits.shape)} in {elapsed:.2f} s")
    print("per-layer masking (hard = α 0, soft = learnable α, - = unmasked):")
    print(model.scheme.describe())
    return 0
