"""Set-up shared by the commands that build or analyse a model (``mait demo``, ``mait als`` and friends)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Optional

import timm
import torch.nn as nn
from torch.utils.data import DataLoader

from ..errors import UserError
from ..train import TrainConfig
from ..models import mask_model
from ..train.models import check_model_name, split_masking
from ..train.runs import held_out_images, open_run
from ._output import check_output_folder


def create_model(name: str, **options: Any) -> nn.Module:
    """``timm.create_model(name, **options)`` with the options a user gave: an unknown name, an option the
    model does not take, or an image smaller than one of its patches is a one-line error."""
    check_model_name(name)
    options, masking = split_masking(name, options)
    try:
        model = timm.create_model(name, pretrained=False, **options)
    except TypeError as error:
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if unexpected is None or unexpected.group(1) not in options:
            raise
        raise UserError(f"model {name} takes no --{unexpected.group(1).replace('_', '-')}") from None
    embed = getattr(model, "patch_embed", None)
    if min(getattr(embed, "grid_size", None) or (1,)) < 1:
        patch = "x".join(map(str, embed.patch_size))
        raise UserError(f"--img-size {options.get('img_size')} is smaller than one {patch} patch of {name}; "
                        f"use at least {max(embed.patch_size)}")
    if masking:                 # a timm model: the masks go onto it as built (mait.mask_model)
        try:
            model = mask_model(model, **masking)
        except ValueError as error:
            raise UserError(str(error)) from None
    return model


def prepare(args: argparse.Namespace, data: bool = True) -> tuple[nn.Module, TrainConfig, Optional[DataLoader], Path]:
    """Model (checkpoint loaded, eval mode), config, held-out loader (if ``data``) and output folder."""
    output = check_output_folder(args.output or (args.checkpoint.parent / "analysis" if args.checkpoint is not None
                                                 else Path("analysis")))
    overrides = dict(model=args.model, scheme=args.scheme, mask_size=args.mask_size, model_kwargs=args.model_kwargs,
                     img_size=args.img_size)
    if data:
        overrides.update(data=args.data, holdout_per_class=args.holdout_per_class)
    saved = open_run(args.checkpoint, **overrides)
    config, loader, info = saved.config, None, None
    if data:
        loader, info = held_out_images(config, args.max_images, args.batch_size)
    model = saved.model(info)            # without data, the card knows classes and channels
    output.mkdir(parents=True, exist_ok=True)
    return model, config, loader, output
