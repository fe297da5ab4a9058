"""On-device augmentation: timm's random-resized crop and flip for a whole batch, drawn from a counter-based hash.

:class:`DeviceImages` holds a whole image set as one uint8 tensor on the training device and
serves batches cropped, flipped and normalised there, with the crop distribution of timm's
``RandomResizedCropAndInterpolation``; the random numbers are a pure function of (seed, epoch,
image) (:func:`uniforms`), so exact resume and DDP sharding hold (see docs/training.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .sources import normalise

CROP_RATIO = (3 / 4, 4 / 3)          # timm's RandomResizedCrop aspect-ratio range (create_transform's default)


@dataclass(frozen=True)
class CropSpec:
    """timm's training crop as parameters: RandomResizedCropAndInterpolation to ``size`` + horizontal flip."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: float
    mode: str                         # F.grid_sample's interpolation: bicubic, bilinear or nearest


_MASK32 = 0xFFFFFFFF
CROP_DRAWS = 23                       # 10 attempts x (area, aspect), then top, left, flip


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """The "lowbias32" integer hash of 32-bit values held in int64 tensors (exact on every device)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniforms(seed: int, epoch: int, index: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` float64 numbers uniform in [0, 1) per image: a pure function of (seed, epoch, image index),
    so they do not depend on the batch, the process or the device that draws them."""
    key = _hash32(torch.full_like(index, seed & _MASK32))
    key = _hash32(_hash32(key ^ (epoch & _MASK32)) ^ index)
    counters = _hash32(torch.arange(count, device=index.device, dtype=torch.int64) + 0x9E3779B9)
    return _hash32(key[:, None] ^ counters[None, :]).double() / 2 ** 32


def crop_boxes(draws: torch.Tensor, height: int, width: int, scale: Sequence[float],
               ratio: Sequence[float]) -> torch.Tensor:
    """``(top, left, h, w)`` per row of ``draws`` (``(B, >= 22)`` uniforms), as timm's
    ``RandomResizedCropAndInterpolation.get_params`` picks them: up to 10 attempts of a log-uniform
    aspect and uniform area, the first that fits, else the central crop of the clamped aspect."""
    area = height * width
    target = (scale[0] + (scale[1] - scale[0]) * draws[:, 0:10]) * area
    low, high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(low + (high - low) * draws[:, 10:20])
    w, h = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
    fits = (w <= width) & (h <= height)
    first = fits.to(torch.int32).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w.gather(1, first).squeeze(1), float(fallback_w))
    h = torch.where(found, h.gather(1, first).squeeze(1), float(fallback_h))
    top = torch.where(found, torch.floor(draws[:, 20] * (height - h + 1)), float((height - fallback_h) // 2))
    left = torch.where(found, torch.floor(draws[:, 21] * (width - w + 1)), float((width - fallback_w) // 2))
    return torch.stack([top, left, h, w], dim=1)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int,
                  mode: str = "bicubic") -> torch.Tensor:
    """Crop ``boxes`` (``top, left, h, w``) out of uint8 ``(B, C, H, W)`` images, resize each to ``size``
    and mirror those with ``flips``: one ``F.grid_sample`` (pixel values 0-255, rounded as uint8 images are)."""
    batch, channels, height, width = images.shape
    top, left, h, w = boxes.unbind(dim=1)
    theta = torch.zeros(batch, 2, 3, dtype=torch.float64, device=images.device)
    theta[:, 0, 0] = torch.where(flips, -w / width, w / width)
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta.float(), [batch, channels, size, size], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode=mode, padding_mode="border", align_corners=False)
    return out.clamp_(0, 255).round_()


class DeviceImages(Dataset):
    """A whole image set as one uint8 ``(N, C, H, W)`` tensor on its device, served in batches
    (``__getitems__``, which the DataLoader calls with a batch of indices) that are cropped,
    flipped and normalised on that device.  Crops are drawn per (seed, epoch, index) by
    :func:`uniforms`, so exact resume and DDP sharding hold as with :class:`Augmented`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, levels: float, mean: Sequence[float],
                 std: Sequence[float], crop: Optional[CropSpec] = None, seed: int = 0) -> None:
        self.images, self.labels, self.levels, self.crop, self.seed, self.epoch = images, labels, levels, crop, seed, 0
        self.mean = torch.tensor(mean, dtype=torch.float32, device=images.device)     # made once, not per batch
        self.std = torch.tensor(std, dtype=torch.float32, device=images.device)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels = self.__getitems__([index])
        return images[0], int(labels[0])

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.int64, device=self.images.device)
        images = self.images.index_select(0, index)
        if self.crop is not None:
            draws = uniforms(self.seed, self.epoch, index, CROP_DRAWS)
            boxes = crop_boxes(draws, images.shape[2], images.shape[3], self.crop.scale, self.crop.ratio)
            images = resized_crops(images, boxes, draws[:, 22] < self.crop.hflip, self.crop.size, self.crop.mode)
        return normalise(images, self.levels, self.mean, self.std), self.labels.index_select(0, index)
