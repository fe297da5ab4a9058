"""A trained run as input: its settings (``config.yaml`` beside the checkpoint, else the
checkpoint's own card), its model with the weights loaded, and its held-out images.

Used by ``mait eval``/``predict``/``export``, the analysis commands and the mask search.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from ..errors import UserError
from .card import CheckpointMismatch, ModelCard, check_against_card, make_card, read_card
from .checkpoint import load_weights, read_metadata
from .config import TrainConfig, load_config
from .data import Augmented, DataInfo, build_transforms, open_data
from .engine import build_model


def run_config(checkpoint: Optional[Path], config_file: Optional[Path] = None, **overrides: Any) -> TrainConfig:
    """The settings of the run that wrote ``checkpoint``, with the non-None ``overrides`` applied.

    Taken from ``config_file``, else the ``config.yaml`` beside the checkpoint, else the
    checkpoint's card.  A file with neither (written before checkpoints carried a card)
    falls back to the model name in its metadata and the model's defaults, with a warning.
    Without a checkpoint (fresh weights) ``model`` must be among the overrides.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    if checkpoint is None:
        if config_file is None and "model" not in given:
            raise UserError("no --checkpoint: name the model with --model")
        return load_config(config_file, given)
    checkpoint = Path(checkpoint)
    metadata = read_metadata(checkpoint)
    card = ModelCard.from_metadata(metadata)
    saved = checkpoint.parent / "config.yaml"
    if config_file is None and saved.is_file():
        config_file = saved
    if config_file is not None:
        return load_config(config_file, given)
    if card is not None:
        return load_config(None, {**card.config_values(), **given})
    if "model" not in given:
        if "model" not in metadata:
            raise UserError(f"no config.yaml beside {checkpoint} and no model name in it: name the model with --model")
        given["model"] = metadata["model"]
        warnings.warn(f"{checkpoint} has no config.yaml beside it and records only its model ({metadata['model']}); "
                      f"its scheme, mask size and image size are taken as the model's defaults unless given "
                      f"(--scheme, --mask-size, --img-size)", CheckpointMismatch, stacklevel=2)
    return load_config(None, given)


def load_model(config: TrainConfig, info: DataInfo, checkpoint: Optional[Path]) -> nn.Module:
    """Build ``config.model`` for the data and load ``checkpoint`` (fresh weights without one); eval mode.

    Warns where the model differs from the checkpoint's card and stops with a sentence when
    the data's classes or channels differ from those the checkpoint was trained on.
    """
    card = read_card(checkpoint) if checkpoint is not None else None
    if card is not None:
        for what, want, have in (("classes", card.num_classes, info.num_classes),
                                 ("image channels", card.in_chans, info.in_chans)):
            if want != have:
                raise UserError(f"{checkpoint} was trained on {want} {what} ({card.data}) but the data "
                                f"{info.name} has {have}")
    model = build_model(config, info)
    if checkpoint is not None:
        check_against_card(model, config.model, card, checkpoint)
        load_weights(model, checkpoint)
    return model.eval()


def held_out_images(config: TrainConfig, max_images: int = 0, batch_size: int = 64,
                    seed: int = 0) -> tuple[DataLoader, DataInfo]:
    """A loader over the validation split of ``config.data`` (eval transforms), at most ``max_images``
    images drawn at random (reproducibly from ``seed``; 0 = all)."""
    if max_images < 0:
        raise UserError(f"--max-images must be >= 0 (0 = all), got {max_images}")
    _, val, info = open_data(config.data, config.holdout_per_class, need_train=False)
    if max_images and max_images < len(val):
        chosen = torch.randperm(len(val), generator=torch.Generator().manual_seed(seed))[:max_images]
        val = Subset(val, chosen.sort().values.tolist())
    _, transform = build_transforms(config, info)
    return DataLoader(Augmented(val, transform), batch_size=batch_size, shuffle=False), info


def checkpoint_card(checkpoint: Path, config: TrainConfig) -> ModelCard:
    """The checkpoint's card; for a file written without one, the card rebuilt from ``config`` and its data."""
    card = read_card(checkpoint)
    if card is not None:
        return card
    _, val, info = open_data(config.data, config.holdout_per_class, need_train=False)
    return make_card(config, info, build_model(config, info), val, build_transforms(config, info)[1])
