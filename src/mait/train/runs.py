"""A trained run as input, opened once: its checkpoint (card and weights, one read of the file), its
settings (``config.yaml`` beside the checkpoint, else the checkpoint's card), and its held-out images.

The way from a file to a model goes one direction: :func:`open_run` reads the checkpoint and
settles the settings, :meth:`SavedRun.model` builds the model and loads the weights it holds.
Used by ``mait eval``/``predict``/``export`` and the analysis commands.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from ..errors import UserError
from .card import CheckpointMismatch, ModelCard, check_against_card, make_card
from .checkpoint import load_tensors, read_checkpoint
from .config import TrainConfig, load_config
from .data import Augmented, DataInfo, build_transforms, open_data
from .models import build_model


@dataclass(frozen=True)
class SavedRun:
    """A checkpoint read once: its path, card (None for files written before cards) and tensors, and the
    settings of the run that wrote it with the command's overrides.  Without a checkpoint (a fresh model
    named by ``--model``) path, card and weights are None."""

    path: Optional[Path]
    config: TrainConfig
    card: Optional[ModelCard]
    weights: Optional[dict[str, torch.Tensor]]

    def data_info(self) -> DataInfo:
        """Classes, channels and image size the model is built for: the card's, else the data's (opened)."""
        if self.card is not None:
            return self.card.data_info()
        return open_data(self.config.data, self.config.holdout_per_class, need_train=False)[2]

    def model_card(self) -> ModelCard:
        """The checkpoint's card; for a file written without one, the card rebuilt from the settings and data."""
        if self.card is not None:
            return self.card
        _, val, info = open_data(self.config.data, self.config.holdout_per_class, need_train=False)
        return make_card(self.config, info, build_model(self.config, info), val,
                         build_transforms(self.config, info)[1])

    def model(self, info: Optional[DataInfo] = None) -> nn.Module:
        """The model for ``info``'s data (default: :meth:`data_info`) with the checkpoint's weights, in eval mode.

        Warns where the model differs from the card and stops with a sentence when the data's classes or
        channels differ from those the checkpoint was trained on.
        """
        info = self.data_info() if info is None else info
        if self.card is not None:
            for what, want, have in (("classes", self.card.num_classes, info.num_classes),
                                     ("image channels", self.card.in_chans, info.in_chans)):
                if want != have:
                    raise UserError(f"{self.path} was trained on {want} {what} ({self.card.data}) but the data "
                                    f"{info.name} has {have}")
        model = build_model(self.config, info)
        if self.weights is not None:
            check_against_card(model, self.config.model, self.card, self.path)
            load_tensors(model, self.weights, self.path)
        return model.eval()


def open_run(checkpoint: Optional[Path], config_file: Optional[Path] = None, **overrides: Any) -> SavedRun:
    """The run that wrote ``checkpoint``, read once, with the non-None ``overrides`` applied to its settings.

    The settings come from ``config_file``, else the ``config.yaml`` beside the checkpoint, else the
    checkpoint's card (its data with the validation split the run held out, so a kept checkpoint is
    evaluated on the images it was selected on, never its training images).  A file with neither
    (written before checkpoints carried a card) falls back to the model name in its metadata and the
    model's defaults, with a warning.  Without a checkpoint (fresh weights) ``model`` must be among the
    overrides.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    if checkpoint is None:
        if config_file is None and "model" not in given:
            raise UserError("no --checkpoint: name the model with --model")
        return SavedRun(None, load_config(config_file, given), None, None)
    checkpoint = Path(checkpoint)
    metadata, weights = read_checkpoint(checkpoint)
    card = ModelCard.from_metadata(metadata)
    saved = checkpoint.parent / "config.yaml"
    if config_file is None and saved.is_file():
        config_file = saved
    if config_file is not None:
        config = load_config(config_file, given)
    elif card is not None:
        recorded = card.config_values()
        if "data" in given:         # other data: its own validation split unless --holdout-per-class says
            recorded.pop("holdout_per_class")
        config = load_config(None, {**recorded, **given})
    else:
        if "model" not in given:
            if "model" not in metadata:
                raise UserError(f"no config.yaml beside {checkpoint} and no model name in it: name the model "
                                f"with --model")
            given["model"] = metadata["model"]
            warnings.warn(f"{checkpoint} has no config.yaml beside it and records only its model "
                          f"({metadata['model']}); its scheme, mask size and image size are taken as the model's "
                          f"defaults unless given (--scheme, --mask-size, --img-size)", CheckpointMismatch,
                          stacklevel=2)
        config = load_config(None, given)
    return SavedRun(checkpoint, config, card, weights)


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
