"""Which data sets are held in memory (``in_memory``): one uint8 tensor on the device, augmented there.

Small sets (``in_memory: auto`` by size, ``true`` insists) become :class:`DeviceImages` when every
augmentation the config asks for can be done on the device; otherwise they stay on timm's loader.
Image folders are decoded once (:func:`.cache.decoded_folder`).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from timm.data.transforms import MaybeToTensor
from torch.utils.data import Dataset, Subset
from torchvision import transforms as tv_transforms

from ...errors import UserError
from ..config import TrainConfig
from .device_augment import CROP_RATIO, CropSpec, DeviceImages
from .sources import ArrayImages, DataInfo, ImageFiles, TensorImages
from .transforms import build_transforms, data_config, mean_std

IN_MEMORY_AUTO_BYTES = 2 * 2 ** 30   # `in_memory: auto` holds sets up to this many bytes of uint8 pixels
IN_MEMORY_CHOICES = ("auto", "true", "false")
GRID_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}   # timm name -> grid_sample


class _NotInMemory(Exception):
    """Why a data set stays on timm's loader."""


def image_array(dataset: Dataset) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(uint8 images (N, C, H, W), labels)`` of a set that is or decodes into one array; None otherwise."""
    if isinstance(dataset, Subset):
        base = image_array(dataset.dataset)
        if base is None:
            return None
        index = torch.as_tensor(dataset.indices, dtype=torch.int64)
        return base[0][index], base[1][index]
    if isinstance(dataset, ArrayImages):
        return torch.from_numpy(dataset.images).permute(0, 3, 1, 2).contiguous(), torch.tensor(dataset.labels)
    if isinstance(dataset, TensorImages):
        return dataset.raw, dataset.tensors[1]
    if isinstance(dataset, ImageFiles):
        return dataset.array()
    return None


def _bytes_per_image(dataset: Dataset) -> int:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(dataset, ArrayImages):
        return dataset.images[0].nbytes
    if isinstance(dataset, TensorImages):
        return dataset.raw[0].numel()
    if isinstance(dataset, ImageFiles):
        return dataset.bytes_per_image()
    raise _NotInMemory(f"a {type(dataset).__name__} is not an image array")


def _eval_pixels(images: torch.Tensor, transform: Callable) -> torch.Tensor:
    """timm's evaluation resize and centre crop (its PIL steps before ToTensor/Normalize), applied once."""
    steps = transform.transforms
    cut = next(i for i, step in enumerate(steps) if isinstance(step, (MaybeToTensor, tv_transforms.ToTensor)))
    if cut != len(steps) - 2 or not isinstance(steps[-1], tv_transforms.Normalize):
        raise _NotInMemory(f"the evaluation transform {transform} is not PIL steps + ToTensor + Normalize")
    pil_steps = tv_transforms.Compose(steps[:cut])
    done = [np.asarray(pil_steps(Image.fromarray(image.permute(1, 2, 0).numpy()))) for image in images]
    return torch.from_numpy(np.stack(done)).permute(0, 3, 1, 2).contiguous()


def device_sets(config: TrainConfig, info: DataInfo, train: Dataset, val: Dataset,
                device: torch.device) -> Optional[tuple[DeviceImages, DeviceImages]]:
    """``(train, val)`` as :class:`DeviceImages` on ``device`` when ``config.in_memory`` is ``true``, or
    ``auto`` and the set fits :data:`IN_MEMORY_AUTO_BYTES` with an augmentation done on the device
    (crop, flip, normalisation; mixup/cutmix apply to the batches afterwards); None = timm's loader."""
    choice = str(config.in_memory).lower()
    if choice not in IN_MEMORY_CHOICES:
        raise UserError(f"in_memory must be one of {', '.join(IN_MEMORY_CHOICES)}, got {config.in_memory!r}")
    if choice == "false":
        return None
    try:
        return _device_sets(config, info, train, val, device, check_size=choice == "auto")
    except _NotInMemory as reason:
        if choice == "true":
            raise UserError(f"in_memory: true cannot hold data {config.data!r}: {reason}") from None
        return None


def _device_sets(config: TrainConfig, info: DataInfo, train: Dataset, val: Dataset, device: torch.device,
                 check_size: bool) -> tuple[DeviceImages, DeviceImages]:
    if info.img_size is None:
        for key in ("aa", "color_jitter", "reprob"):
            if getattr(config, key):
                raise _NotInMemory(f"{key} {getattr(config, key)!r} is done by timm's loader only")
        if config.interpolation not in GRID_MODES:
            raise _NotInMemory(f"interpolation {config.interpolation!r} is not one of {', '.join(GRID_MODES)}")
    if check_size:
        total = (len(train) + len(val)) * _bytes_per_image(train)
        if total > IN_MEMORY_AUTO_BYTES:
            raise _NotInMemory(f"its {total / 2 ** 30:.1f} GiB of pixels exceed {IN_MEMORY_AUTO_BYTES / 2 ** 30:.0f} GiB")
    train_array, val_array = image_array(train), image_array(val)
    if train_array is None or val_array is None:
        raise _NotInMemory("its images are not all of one size")
    if info.img_size is not None:                  # tensor data (digits): normalised, not augmented
        base = train.dataset if isinstance(train, Subset) else train
        levels, mean, std, crop = base.levels, base.mean, base.std, None
        val_images = val_array[0]
    else:
        cfg = data_config(config)
        size = cfg["input_size"][-1]
        height, width = train_array[0].shape[-2:]
        if max(height, width) > size:
            raise _NotInMemory(f"its {height}x{width} images are larger than the model input {size} (crops would "
                               f"be downsampled, which timm's loader does with antialiasing)")
        levels, (mean, std) = 255.0, mean_std(cfg)
        crop = CropSpec(size, tuple(config.scale), CROP_RATIO, config.hflip, GRID_MODES[config.interpolation])
        val_images = _eval_pixels(val_array[0], build_transforms(config, info)[1])
    train_set = DeviceImages(train_array[0].to(device), train_array[1].to(device), levels, mean, std, crop,
                             seed=config.seed)
    val_set = DeviceImages(val_images.to(device), val_array[1].to(device), levels, mean, std)
    return train_set, val_set
