"""Options and set-up shared by the commands that analyse a model (``mait als`` and friends)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch.nn as nn
from torch.utils.data import DataLoader

from ..errors import UserError
from ..train import TrainConfig, open_data
from ..train.card import read_card
from ..train.runs import held_out_images, load_model, run_config


def add_model_arguments(parser: argparse.ArgumentParser, data: bool = True) -> None:
    """The ``--model/--checkpoint/--scheme/--mask-size`` (and ``--data``) options the analysis commands share."""
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="weights (.safetensors) written by `mait train`; it records its model "
                             "(a config.yaml beside it takes precedence)")
    parser.add_argument("--model", default=None, help="timm model name (default: the checkpoint's)")
    parser.add_argument("--scheme", default=None, help="masking scheme (default: the checkpoint's / the model's)")
    parser.add_argument("--mask-size", type=int, default=None, help="the model's mask size R (default: the checkpoint's)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="image size the model is built for (default: the checkpoint's)")
    parser.add_argument("--model-kwargs", default=None, metavar="YAML",
                        help="extra timm.create_model kwargs as a YAML mapping, e.g. '{depth: 6}' (default: the run's)")
    parser.add_argument("--output", type=Path, default=None,
                        help="folder for tables and figures (default: <run folder>/analysis, else ./analysis)")
    if data:
        parser.add_argument("--data", default=None,
                            help="images: 'digits', an ImageFolder tree or CIFAR (default: the run's); "
                                 "the validation split is used")
        parser.add_argument("--holdout-per-class", type=int, default=None,
                            help="validation = last N images per class of train/ (default: the run's)")
        parser.add_argument("--max-images", type=int, default=256, help="held-out images to average over (0 = all)")
        parser.add_argument("--batch-size", type=int, default=64)


def prepare(args: argparse.Namespace, data: bool = True) -> tuple[nn.Module, TrainConfig, Optional[DataLoader], Path]:
    """Model (checkpoint loaded, eval mode), config, held-out loader (if ``data``) and output folder."""
    overrides = dict(model=args.model, scheme=args.scheme, mask_size=args.mask_size, model_kwargs=args.model_kwargs,
                     img_size=args.img_size)
    if data:
        overrides.update(data=args.data, holdout_per_class=args.holdout_per_class)
        if args.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    config = run_config(args.checkpoint, **overrides)
    loader = None
    if data:
        loader, info = held_out_images(config, args.max_images, args.batch_size)
    else:                               # the card knows classes and channels without opening the data
        card = read_card(args.checkpoint) if args.checkpoint is not None else None
        info = card.data_info() if card is not None else open_data(config.data, config.holdout_per_class,
                                                                   need_train=False)[2]
    model = load_model(config, info, args.checkpoint)
    output = args.output or (args.checkpoint.parent / "analysis" if args.checkpoint is not None else Path("analysis"))
    output.mkdir(parents=True, exist_ok=True)
    return model, config, loader, output
