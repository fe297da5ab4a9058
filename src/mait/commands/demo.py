"""``mait demo``: build a model, run one random batch, print its masking scheme and α per layer."""

from __future__ import annotations

import argparse
import time

import torch

from ..errors import UserError
from ._model import create_model


def run(args: argparse.Namespace) -> int:
    options = {key: value for key, value in (("scheme", args.scheme), ("mask_size", args.mask_size))
               if value is not None}
    model = create_model(args.model, **options).eval()
    if not hasattr(model, "scheme"):
        raise UserError(f"{args.model} is not a MaiT model (it has no masking scheme); see timm.list_models('*mait*')")
    shape = model.pretrained_cfg["input_size"]          # (channels, height, width)
    images = torch.randn(args.batch_size, *shape, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.inference_mode():
        logits = model(images)
    elapsed = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    size = model.mask_size
    print(f"{args.model}: {params / 1e6:.2f} M parameters, scheme {model.scheme}, mask {size}x{size}")
    print(f"forward of {tuple(images.shape)} -> {tuple(logits.shape)} in {elapsed:.2f} s")
    print("per-layer masking (hard = α 0, soft = learnable α, - = unmasked):")
    print(model.scheme.describe())
    return 0
