"""timm's per-image transforms: the model's data config, train/eval transforms seeded per image, and mixup.

Random augmentation is seeded per (seed, epoch, image) (:class:`Augmented`), so it is the same
whatever the number of loader workers and when a run resumes mid-epoch.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Optional, Sequence

import numpy as np
import timm
import torch
from timm.data import Mixup, create_transform, resolve_data_config
from torch.utils.data import Dataset

from ...errors import UserError
from ..config import TrainConfig
from .sources import DataInfo


def data_config(config: TrainConfig) -> dict[str, Any]:
    """timm's data config (input size, mean, std, crop) of the model, with the config's overrides."""
    pretrained = timm.models.get_pretrained_cfg(config.model)
    if pretrained is None:
        raise UserError(f"unknown model {config.model!r}; see timm.list_models('mait*')")
    resolved = resolve_data_config({}, pretrained_cfg=pretrained.to_dict())
    if config.img_size:
        resolved["input_size"] = (resolved["input_size"][0], config.img_size, config.img_size)
    if config.crop_pct:
        resolved["crop_pct"] = config.crop_pct
    return resolved


def mean_std(cfg: dict[str, Any]) -> tuple[Sequence[float], Sequence[float]]:
    """The normalisation of RGB images: the model's, or ImageNet's for a grey-image model default."""
    if len(cfg["mean"]) != 3:
        return timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD
    return cfg["mean"], cfg["std"]


def build_transforms(config: TrainConfig, info: DataInfo) -> tuple[Optional[Callable], Optional[Callable]]:
    """(train, eval) transforms from timm's ``create_transform``; none for tensor data (digits)."""
    if info.img_size is not None:
        return None, None
    cfg = data_config(config)
    mean, std = mean_std(cfg)
    train = create_transform(cfg["input_size"], is_training=True, scale=tuple(config.scale), hflip=config.hflip,
                             color_jitter=config.color_jitter or None, auto_augment=config.aa,
                             interpolation=config.interpolation, mean=mean, std=std, re_prob=config.reprob,
                             re_mode="pixel", re_count=1)
    val = create_transform(cfg["input_size"], is_training=False, interpolation=config.interpolation,
                           mean=mean, std=std, crop_pct=cfg["crop_pct"])
    return train, val


class Augmented(Dataset):
    """Applies ``transform`` to ``(image, target)`` pairs, seeding its RNGs per (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, transform: Optional[Callable], seed: Optional[int] = None) -> None:
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, target = self.dataset[index]
        if self.transform is None:
            return image, target
        if self.seed is None:
            return self.transform(image), target
        key = (self.seed * 1_000_003 + self.epoch * 10_000_019 + index) % (2 ** 31)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key)
            random.seed(key)
            np.random.seed(key)
            try:
                return self.transform(image), target
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)


def build_mixup(config: TrainConfig, num_classes: int) -> Optional[Mixup]:
    """timm's Mixup/CutMix of the config's batches, or None when both are off."""
    if not (config.mixup > 0 or config.cutmix > 0):
        return None
    return Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=config.mixup_prob,
                 switch_prob=config.mixup_switch_prob, label_smoothing=config.smoothing, num_classes=num_classes)
