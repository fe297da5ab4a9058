"""Load a trained model and its held-out images for the analysis commands (``mait als`` and friends).

A checkpoint written by ``mait train`` sits in a run folder beside ``config.yaml``, which
names the model, scheme, mask size and data; those are used unless overridden.  Without a
checkpoint the model is built with fresh weights (e.g. to measure a plain timm model).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from ..cli import UserError
from ..train import TrainConfig, build_model, load_config, load_weights, open_data
from ..train.data import Augmented, DataInfo, build_transforms


def run_config(checkpoint: Optional[Path], **overrides: Any) -> TrainConfig:
    """The run's ``config.yaml`` beside ``checkpoint`` (if any) with the non-None ``overrides`` applied."""
    given = {key: value for key, value in overrides.items() if value is not None}
    saved = checkpoint.parent / "config.yaml" if checkpoint is not None else None
    if checkpoint is not None and not checkpoint.is_file():
        raise UserError(f"checkpoint {checkpoint} does not exist")
    if saved is not None and saved.is_file():
        return load_config(saved, given)
    if "model" not in given:
        where = f"no config.yaml beside {checkpoint}" if checkpoint is not None else "no --checkpoint"
        raise UserError(f"{where}: name the model with --model")
    return load_config(None, given)


def load_model(config: TrainConfig, info: DataInfo, checkpoint: Optional[Path]) -> nn.Module:
    """Build ``config.model`` for the data and load ``checkpoint`` (fresh weights without one); eval mode."""
    model = build_model(config, info)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model.eval()


def held_out_images(config: TrainConfig, max_images: int = 0, batch_size: int = 64,
                    seed: int = 0) -> tuple[DataLoader, DataInfo]:
    """A loader over the validation split of ``config.data`` (eval transforms), at most ``max_images``
    images drawn at random (reproducibly from ``seed``; 0 = all)."""
    _, val, info = open_data(config.data, config.holdout_per_class, need_train=False)
    if max_images < 0:
        raise UserError(f"--max-images must be >= 0 (0 = all), got {max_images}")
    if max_images and max_images < len(val):
        chosen = torch.randperm(len(val), generator=torch.Generator().manual_seed(seed))[:max_images]
        val = Subset(val, chosen.sort().values.tolist())
    _, transform = build_transforms(config, info)
    return DataLoader(Augmented(val, transform), batch_size=batch_size, shuffle=False), info


def add_model_arguments(parser: argparse.ArgumentParser, data: bool = True) -> None:
    """The ``--model/--checkpoint/--scheme/--mask-size`` (and ``--data``) options the analysis commands share."""
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="weights (.safetensors) written by `mait train`; its config.yaml gives the model")
    parser.add_argument("--model", default=None, help="timm model name (default: the run's; needed without config.yaml)")
    parser.add_argument("--scheme", default=None, help="masking scheme (default: the run's / the model's)")
    parser.add_argument("--mask-size", type=int, default=None, help="the model's mask size R (default: the run's)")
    parser.add_argument("--img-size", type=int, default=None, help="image size the model is built for (default: the run's)")
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
    config = run_config(args.checkpoint, **overrides)
    loader = None
    if data:
        loader, info = held_out_images(config, args.max_images, args.batch_size)
    else:
        info = open_data(config.data, config.holdout_per_class, need_train=False)[2]
    model = load_model(config, info, args.checkpoint)
    output = args.output or (args.checkpoint.parent / "analysis" if args.checkpoint is not None else Path("analysis"))
    output.mkdir(parents=True, exist_ok=True)
    return model, config, loader, output
