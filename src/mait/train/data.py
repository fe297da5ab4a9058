"""Data: the built-in digits, ImageFolder trees, CIFAR pickles and tarballs of them, with timm's transforms.

``data`` in the config is one of:

* ``digits``: scikit-learn's 1,797 handwritten digits (8x8, grey), a fixed stratified 80/20 split;
  no download, no augmentation.
* a folder with ``train/`` (and ``val/``) class folders (ImageFolder); with ``holdout_per_class: N``
  the validation set is instead the last N images (sorted file names) of each class of ``train/``
  (a CIFAR-10 JPEG tree of 5,000 images per class uses N = 1000, :data:`CIFAR10_JPG_HOLDOUT`);
* a folder of class folders (an evaluation set such as ``imagenet/val``);
* CIFAR-10/100 in their python-pickle format (``data_batch_*``/``test_batch`` or ``train``/``test``);
* a ``.tar.gz``/``.tgz``/``.tar`` of any of these, extracted once into ``~/.cache/mait/``
  (``$MAIT_CACHE`` overrides), atomically, under a key of its content (:func:`archive_key`).

Random augmentation is seeded per (seed, epoch, image), so it is the same whatever the
number of loader workers and when a run resumes mid-epoch.

Small sets are held in memory (``in_memory``, ``auto`` by size): the whole set becomes one
uint8 tensor on the training device and every batch is cropped, flipped and normalised there
(:class:`DeviceImages`), with the crop distribution of timm's ``RandomResizedCropAndInterpolation``
drawn from a counter-based hash of (seed, epoch, image).  Image folders are decoded once and
the decoded array is cached next to extracted archives (see docs/training.md).
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import random
import shutil
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import Mixup, create_transform, resolve_data_config
from timm.data.transforms import MaybeToTensor
from torchvision import transforms as tv_transforms
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from ..errors import UserError
from .config import TrainConfig
from .distributed import Dist

CIFAR10_JPG_HOLDOUT = 1000        # the fixed validation split of the CIFAR-10 JPEG set
DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3760,)   # of the 8x8 digits scaled to [0, 1]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IN_MEMORY_AUTO_BYTES = 2 * 2 ** 30   # `in_memory: auto` holds sets up to this many bytes of uint8 pixels
DECODED_CACHE_MIN = 1000             # folders of fewer images are decoded again rather than cached
CROP_RATIO = (3 / 4, 4 / 3)          # timm's RandomResizedCrop aspect-ratio range (create_transform's default)


class CorruptImageError(UserError):
    """An image file that cannot be decoded; the message names its path.

    A DataLoader worker re-raises it with the worker traceback as message; the constructor
    keeps only the line that names the file, so the user still sees one line.
    """

    def __init__(self, message: str) -> None:
        start = message.rfind("corrupt image ")
        super().__init__(message[start:].strip() if start >= 0 else message)


@dataclass(frozen=True)
class DataInfo:
    """What the model must match: classes, channels, and a fixed image size for tensor data."""

    name: str
    num_classes: int
    in_chans: int
    img_size: Optional[int]        # fixed by the data (digits: 8); None = images resized by transforms
    num_train: int
    num_val: int


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    sampler: "ResumableSampler"
    info: DataInfo
    mixup: Optional[Mixup]
    train_set: Union["Augmented", "DeviceImages"]

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_set) // self.sampler.num_replicas // self.train.batch_size


class ResumableSampler(DistributedSampler):
    """torch's ``DistributedSampler`` (also used with one process) that can start mid-epoch."""

    def __init__(self, dataset: Dataset, env: Dist, seed: int) -> None:
        super().__init__(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def start_at(self, epoch: int, sample: int) -> None:
        """The next iteration yields epoch ``epoch`` from this rank's ``sample``-th index on."""
        self.set_epoch(epoch)
        self.start = sample

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.start:]
        self.start = 0
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.start


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


class ArrayImages(Dataset):
    """Images held as a uint8 ``(N, H, W, C)`` array (CIFAR pickles), served as PIL images."""

    def __init__(self, images: np.ndarray, labels: Sequence[int]) -> None:
        self.images, self.labels = images, list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), self.labels[index]


class ImageFiles(Dataset):
    """An ImageFolder tree (``root/<class>/<image>``) whose undecodable files raise :class:`CorruptImageError`."""

    def __init__(self, root: Path) -> None:
        from torchvision.datasets import ImageFolder
        try:
            folder = ImageFolder(str(root), loader=_open_image, is_valid_file=_is_image)
        except (FileNotFoundError, RuntimeError) as error:
            raise UserError(f"data folder {root} has no images in class folders ({root}/<class>/<image>): "
                            f"{str(error).splitlines()[0]}") from None
        self.root, self.samples, self.classes, self.loader = root, folder.samples, folder.classes, folder.loader
        self._array: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, target = self.samples[index]
        return self.loader(path), target

    def bytes_per_image(self) -> int:
        """Decoded RGB bytes of the first image (read from its header)."""
        with Image.open(self.samples[0][0]) as image:
            return image.width * image.height * 3

    def array(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Every image decoded into one uint8 ``(N, 3, H, W)`` tensor with its labels, or None when the
        images differ in size.  Decoded once: the array of :data:`DECODED_CACHE_MIN` images or more is
        cached in :func:`cache_dir` under a key of the files' paths, sizes and modification times."""
        if self._array is not None:
            return self._array
        stats = ((path, os.stat(path)) for path, _ in self.samples)
        listing = "\n".join(f"{path}:{stat.st_size}:{stat.st_mtime_ns}" for path, stat in stats)
        digest = hashlib.sha1(f"{self.root.resolve()}\n{listing}".encode()).hexdigest()[:12]
        cached = cache_dir() / "decoded" / f"{self.root.name}-{len(self.samples)}-{digest}.npz"
        if cached.is_file():
            with np.load(cached) as stored:
                images, labels = stored["images"], stored["labels"]
        else:
            first = np.asarray(self.loader(self.samples[0][0]))
            images = np.empty((len(self.samples), *first.shape), dtype=np.uint8)
            for i, (path, _) in enumerate(self.samples):
                pixels = np.asarray(self.loader(path))
                if pixels.shape != first.shape:
                    return None
                images[i] = pixels
            labels = np.array([target for _, target in self.samples], dtype=np.int64)
            if len(self.samples) >= DECODED_CACHE_MIN:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_name(f".{cached.name}.tmp{os.getpid()}")
                with open(tmp, "wb") as handle:
                    np.savez(handle, images=images, labels=labels)
                os.replace(tmp, cached)
        self._array = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)
        return self._array


class TensorImages(TensorDataset):
    """Integer-valued images ``(N, C, H, W)`` (``raw``) with labels, served as ``(raw / levels - mean) / std``."""

    def __init__(self, raw: torch.Tensor, labels: torch.Tensor, levels: float, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        super().__init__(normalise(raw, levels, mean, std), labels)
        self.raw, self.levels, self.mean, self.std = raw, levels, tuple(mean), tuple(std)


def normalise(images: torch.Tensor, levels: float, mean: Union[Sequence[float], torch.Tensor],
              std: Union[Sequence[float], torch.Tensor]) -> torch.Tensor:
    """``(images / levels - mean) / std`` per channel of ``(N, C, H, W)`` images, in float32."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return (images.float() / levels - mean_t) / std_t


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


def _whole_batch(batch: Any) -> Any:
    """The DataLoader's collate for :class:`DeviceImages`: ``__getitems__`` already returns the batch."""
    return batch


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _open_image(path: str) -> Image.Image:
    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise CorruptImageError(f"corrupt image {path}: {error}") from None


def cache_dir() -> Path:
    return Path(os.environ.get("MAIT_CACHE", Path.home() / ".cache" / "mait"))


#: Archives up to this size are keyed by their content, so a copy of the same archive (another
#: checkout, a re-mounted data folder) reuses the extraction; larger ones by path, size and mtime.
CONTENT_KEY_MAX_BYTES = 2 << 30


def archive_key(archive: Path) -> str:
    """A short key of ``archive``: its content hash when it is at most :data:`CONTENT_KEY_MAX_BYTES`
    (hashing 1 GiB takes about a second), otherwise its resolved path, size and modification time."""
    stat = archive.stat()
    return _archive_key(str(archive.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=16)
def _archive_key(path: str, size: int, mtime_ns: int) -> str:
    """:func:`archive_key` of one file version, hashed once per process (opening the data and
    reading its class names both ask)."""
    if size > CONTENT_KEY_MAX_BYTES:
        return hashlib.sha1(f"{path}:{size}:{mtime_ns}".encode()).hexdigest()[:12]
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def extract_archive(archive: Path) -> Path:
    """Extract ``archive`` once into the cache (keyed by :func:`archive_key`) and return the folder."""
    target = cache_dir() / f"{archive.name.split('.')[0]}-{archive_key(archive)}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, OSError, EOFError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot extract {archive}: {error}") from None
    try:
        os.replace(tmp, target)
    except OSError:                      # another process extracted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="latin1")


def _cifar_pickles(root: Path) -> Optional[tuple[ArrayImages, ArrayImages, int]]:
    """CIFAR-10 (``data_batch_*``, ``test_batch``) or CIFAR-100 (``train``, ``test``) pickles in ``root``."""
    for folder in (root, root / "cifar-10-batches-py", root / "cifar-100-python"):
        if (folder / "data_batch_1").is_file():
            train_files, test_file, key, classes = sorted(folder.glob("data_batch_*")), folder / "test_batch", "labels", 10
        elif (folder / "train").is_file() and (folder / "test").is_file():
            train_files, test_file, key, classes = [folder / "train"], folder / "test", "fine_labels", 100
        else:
            continue

        def read(files: list[Path]) -> ArrayImages:
            batches = [_unpickle(f) for f in files]
            images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            return ArrayImages(np.ascontiguousarray(images), [y for b in batches for y in b[key]])

        return read(train_files), read([test_file]), classes
    return None


def _holdout(targets: Sequence[int], per_class: int, where: Path) -> tuple[list[int], list[int]]:
    """Indices of (train, val) where val is the last ``per_class`` items of each class, in order."""
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    train, val = [], []
    for target, indices in sorted(by_class.items()):
        if len(indices) <= per_class:
            raise UserError(f"holdout_per_class {per_class} leaves no training image of class {target} in {where} "
                            f"({len(indices)} images)")
        train += indices[:-per_class]
        val += indices[-per_class:]
    return train, val


def _digits() -> tuple[Dataset, Dataset, DataInfo]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.uint8).unsqueeze(1)     # values 0-16
    labels = torch.tensor(digits.target)
    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=digits.target,
                                          random_state=0)
    train = TensorImages(images[train_idx], labels[train_idx], 16.0, DIGITS_MEAN, DIGITS_STD)
    val = TensorImages(images[val_idx], labels[val_idx], 16.0, DIGITS_MEAN, DIGITS_STD)
    return train, val, DataInfo("digits", 10, 1, 8, len(train), len(val))


def open_data(data: str, holdout_per_class: int = 0, need_train: bool = True) -> tuple[Optional[Dataset], Dataset, DataInfo]:
    """``(train, val, info)`` for a ``data`` string; images untransformed (PIL) except the digits."""
    if data == "digits":
        return _digits()
    root = Path(data).expanduser()
    if not root.exists():
        raise UserError(f"data {data!r} does not exist (expected 'digits', a folder or a .tar.gz)")
    if root.is_file():
        if not tarfile.is_tarfile(root):
            raise UserError(f"data {root} is a file but not a tar archive (expected a folder or a .tar.gz)")
        root = extract_archive(root)
        inner = [p for p in root.iterdir() if p.is_dir()]
        if len(inner) == 1 and not (root / "train").is_dir():
            root = inner[0]          # archives that wrap everything in one top folder
    name = root.name
    pickles = _cifar_pickles(root)
    if pickles is not None:
        train, val, classes = pickles
        if holdout_per_class:
            train_idx, val_idx = _holdout(train.labels, holdout_per_class, root)
            train, val = Subset(train, train_idx), Subset(train, val_idx)
        return train, val, DataInfo(f"cifar{classes}", classes, 3, None, len(train), len(val))
    train_root = root / "train" if (root / "train").is_dir() else None
    val_root = root / "val" if (root / "val").is_dir() else None
    if train_root is None and val_root is None:
        if need_train and not holdout_per_class:
            raise UserError(f"data folder {root} has no train/ folder (set holdout_per_class to carve a validation "
                            f"split out of a single tree)")
        train_root = root
    train = ImageFiles(train_root) if train_root and (need_train or holdout_per_class or not val_root) else None
    if holdout_per_class:
        train_idx, val_idx = _holdout([t for _, t in train.samples], holdout_per_class, train_root)
        train, val = Subset(train, train_idx), Subset(train, val_idx)
        classes = len(train.dataset.classes)
    elif val_root is not None:
        val = ImageFiles(val_root)
        classes = len(val.classes)
        if train is not None and train.classes != val.classes:
            raise UserError(f"{train_root} and {val_root} hold different class folders")
    elif need_train:
        raise UserError(f"data folder {root} has no val/ folder (add one, or set holdout_per_class)")
    else:
        train, val, classes = None, train, len(train.classes)
    return train, val, DataInfo(name, classes, 3, None, len(train) if train is not None else 0, len(val))


def subset(dataset: Dataset, size: int) -> Dataset:
    if not size or size >= len(dataset):
        return dataset
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:size].sort().values
    return Subset(dataset, indices.tolist())


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


def _mean_std(cfg: dict[str, Any]) -> tuple[Sequence[float], Sequence[float]]:
    """The normalisation of RGB images: the model's, or ImageNet's for a grey-image model default."""
    if len(cfg["mean"]) != 3:
        return timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD
    return cfg["mean"], cfg["std"]


def build_transforms(config: TrainConfig, info: DataInfo) -> tuple[Optional[Callable], Optional[Callable]]:
    """(train, eval) transforms from timm's ``create_transform``; none for tensor data (digits)."""
    if info.img_size is not None:
        return None, None
    cfg = data_config(config)
    mean, std = _mean_std(cfg)
    train = create_transform(cfg["input_size"], is_training=True, scale=tuple(config.scale), hflip=config.hflip,
                             color_jitter=config.color_jitter or None, auto_augment=config.aa,
                             interpolation=config.interpolation, mean=mean, std=std, re_prob=config.reprob,
                             re_mode="pixel", re_count=1)
    val = create_transform(cfg["input_size"], is_training=False, interpolation=config.interpolation,
                           mean=mean, std=std, crop_pct=cfg["crop_pct"])
    return train, val


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
        levels, (mean, std) = 255.0, _mean_std(cfg)
        crop = CropSpec(size, tuple(config.scale), CROP_RATIO, config.hflip, GRID_MODES[config.interpolation])
        val_images = _eval_pixels(val_array[0], build_transforms(config, info)[1])
    train_set = DeviceImages(train_array[0].to(device), train_array[1].to(device), levels, mean, std, crop,
                             seed=config.seed)
    val_set = DeviceImages(val_images.to(device), val_array[1].to(device), levels, mean, std)
    return train_set, val_set


def build_mixup(config: TrainConfig, num_classes: int) -> Optional[Mixup]:
    if not (config.mixup > 0 or config.cutmix > 0):
        return None
    return Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, prob=config.mixup_prob,
                 switch_prob=config.mixup_switch_prob, label_smoothing=config.smoothing, num_classes=num_classes)


def per_rank_batch(config: TrainConfig, env: Dist) -> int:
    if config.batch_size < 1 or config.batch_size % env.world_size:
        raise UserError(f"batch_size {config.batch_size} must be a positive multiple of the {env.world_size} "
                        f"processes (it is the global batch)")
    return config.batch_size // env.world_size


def build_loaders(config: TrainConfig, env: Optional[Dist] = None) -> Loaders:
    """Train/val loaders for ``config`` on this process (rank ``env.rank`` of ``env.world_size``)."""
    env = env or Dist(0, 1, torch.device("cpu"))
    train, val, info = open_data(config.data, config.holdout_per_class)
    train, val = subset(train, config.train_subset), subset(val, config.val_subset)
    info = DataInfo(info.name, info.num_classes, info.in_chans, info.img_size, len(train), len(val))
    batch = per_rank_batch(config, env)
    in_memory = device_sets(config, info, train, val, env.device)
    if in_memory is not None:
        train_set, val_set = in_memory
    else:
        train_tf, val_tf = build_transforms(config, info)
        train_set, val_set = Augmented(train, train_tf, seed=config.seed), Augmented(val, val_tf)
    mixup = build_mixup(config, info.num_classes)
    if mixup is not None and batch % 2:
        raise UserError(f"mixup/cutmix need an even batch per process, got {batch}")
    if len(train_set) < config.batch_size:
        raise UserError(f"{len(train_set)} training images are fewer than one batch of {config.batch_size}")
    sampler = ResumableSampler(train_set, env, seed=config.seed)
    # A private generator: creating an iterator must not draw from the global RNG (exact resume).
    train_loader = DataLoader(train_set, batch_size=batch, sampler=sampler, drop_last=True,
                              generator=torch.Generator().manual_seed(config.seed),
                              **_loading(train_set, config.workers, env))
    val_loader = build_eval_loader(val_set, batch * 2, config.workers, env)
    return Loaders(train_loader, val_loader, sampler, info, mixup, train_set)


def _loading(dataset: Dataset, workers: int, env: Dist) -> dict[str, Any]:
    """DataLoader options: :class:`DeviceImages` batches are made on the device by the main process."""
    if isinstance(dataset, DeviceImages):
        return {"num_workers": 0, "collate_fn": _whole_batch}
    return {"num_workers": workers, "pin_memory": env.device.type == "cuda"}


def build_eval_loader(dataset: Dataset, batch_size: int, workers: int, env: Dist) -> DataLoader:
    """Every process takes every ``world_size``-th image (no padding, so reduced metrics are exact)."""
    part = Subset(dataset, range(env.rank, len(dataset), env.world_size)) if env.enabled else dataset
    return DataLoader(part, batch_size=batch_size, shuffle=False, **_loading(dataset, workers, env))
