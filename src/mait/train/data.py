"""Data: the built-in digits, ImageFolder trees, CIFAR pickles and tarballs of them, with timm's transforms.

``data`` in the config is one of:

* ``digits``: scikit-learn's 1,797 handwritten digits (8x8, grey), a fixed stratified 80/20 split;
  no download, no augmentation.
* a folder with ``train/`` (and ``val/``) class folders (ImageFolder); with ``holdout_per_class: N``
  the validation set is instead the last N images (sorted file names) of each class of ``train/``
  (the CIFAR-10 JPEG set in ``../shared/data`` uses N = 1000, :data:`CIFAR10_JPG_HOLDOUT`);
* a folder of class folders (an evaluation set such as ``imagenet/val``);
* CIFAR-10/100 in their python-pickle format (``data_batch_*``/``test_batch`` or ``train``/``test``);
* a ``.tar.gz``/``.tgz``/``.tar`` of any of these, extracted once into ``~/.cache/mait/``
  (``$MAIT_CACHE`` overrides), atomically.

Random augmentation is seeded per (seed, epoch, image), so it is the same whatever the
number of loader workers and when a run resumes mid-epoch.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import Mixup, create_transform, resolve_data_config
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from ..errors import UserError
from .config import TrainConfig
from .distributed import Dist

CIFAR10_JPG_HOLDOUT = 1000        # the fixed validation split of the CIFAR-10 JPEG set
DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3760,)   # of the 8x8 digits scaled to [0, 1]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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
    train_set: "Augmented"

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
        self.samples, self.classes, self.loader = folder.samples, folder.classes, folder.loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, target = self.samples[index]
        return self.loader(path), target


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


def extract_archive(archive: Path) -> Path:
    """Extract ``archive`` once into the cache (keyed by name, size and mtime) and return the folder."""
    stat = archive.stat()
    digest = hashlib.sha1(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / f"{archive.name.split('.')[0]}-{digest}"
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
    images = (torch.tensor(digits.images, dtype=torch.float32) / 16.0 - DIGITS_MEAN[0]) / DIGITS_STD[0]
    labels = torch.tensor(digits.target)
    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=digits.target,
                                          random_state=0)
    images = images.unsqueeze(1)
    train = TensorDataset(images[train_idx], labels[train_idx])
    val = TensorDataset(images[val_idx], labels[val_idx])
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


def build_transforms(config: TrainConfig, info: DataInfo) -> tuple[Optional[Callable], Optional[Callable]]:
    """(train, eval) transforms from timm's ``create_transform``; none for tensor data (digits)."""
    if info.img_size is not None:
        return None, None
    cfg = data_config(config)
    mean, std = cfg["mean"], cfg["std"]
    if len(mean) != 3:                   # a grey-image model default on RGB data: use ImageNet statistics
        mean, std = timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD
    train = create_transform(cfg["input_size"], is_training=True, scale=tuple(config.scale), hflip=config.hflip,
                             color_jitter=config.color_jitter or None, auto_augment=config.aa,
                             interpolation=config.interpolation, mean=mean, std=std, re_prob=config.reprob,
                             re_mode="pixel", re_count=1)
    val = create_transform(cfg["input_size"], is_training=False, interpolation=config.interpolation,
                           mean=mean, std=std, crop_pct=cfg["crop_pct"])
    return train, val


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
    train_tf, val_tf = build_transforms(config, info)
    train_set = Augmented(train, train_tf, seed=config.seed)
    val_set = Augmented(val, val_tf)
    batch = per_rank_batch(config, env)
    mixup = build_mixup(config, info.num_classes)
    if mixup is not None and batch % 2:
        raise UserError(f"mixup/cutmix need an even batch per process, got {batch}")
    if len(train_set) < config.batch_size:
        raise UserError(f"{len(train_set)} training images are fewer than one batch of {config.batch_size}")
    sampler = ResumableSampler(train_set, env, seed=config.seed)
    pin = env.device.type == "cuda"
    # A private generator: creating an iterator must not draw from the global RNG (exact resume).
    train_loader = DataLoader(train_set, batch_size=batch, sampler=sampler, num_workers=config.workers,
                              drop_last=True, pin_memory=pin, generator=torch.Generator().manual_seed(config.seed))
    val_loader = build_eval_loader(val_set, batch * 2, config.workers, env)
    return Loaders(train_loader, val_loader, sampler, info, mixup, train_set)


def build_eval_loader(dataset: Dataset, batch_size: int, workers: int, env: Dist) -> DataLoader:
    """Every process takes every ``world_size``-th image (no padding, so reduced metrics are exact)."""
    part = Subset(dataset, range(env.rank, len(dataset), env.world_size)) if env.enabled else dataset
    return DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=env.device.type == "cuda")
