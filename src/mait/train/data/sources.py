"""Image sources: the built-in digits, ImageFolder trees, CIFAR pickles and archives of them, as datasets.

``data`` in the config is one of:

* ``digits``: scikit-learn's 1,797 handwritten digits (8x8, grey), a fixed stratified 80/20 split;
  no download, no augmentation.
* a folder with ``train/`` (and ``val/``) class folders (ImageFolder); with ``holdout_per_class: N``
  the validation set is instead the last N images (sorted file names) of each class of ``train/``
  (a CIFAR-10 JPEG tree of 5,000 images per class uses N = 1000, :data:`CIFAR10_JPG_HOLDOUT`);
* a folder of class folders (an evaluation set such as ``imagenet/val``);
* CIFAR-10/100 in their python-pickle format (``data_batch_*``/``test_batch`` or ``train``/``test``);
* a ``.tar.gz``/``.tgz``/``.tar`` of any of these, extracted once into the cache (:mod:`.cache`).

Images come out untransformed (PIL), except the digits, which are tensors already normalised.
"""

from __future__ import annotations

import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset

from ...errors import UserError
from .cache import decoded_folder, extract_archive

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
        images differ in size; decoded once per process, and cached on disk by :func:`decoded_folder`."""
        if self._array is not None:
            return self._array
        decoded = decoded_folder(self.root, self.samples, self.loader)
        if decoded is None:
            return None
        images, labels = decoded
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


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _open_image(path: str) -> Image.Image:
    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise CorruptImageError(f"corrupt image {path}: {error}") from None


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
    """A fixed random subset of ``size`` items, in their order (the same in every run); 0 = all."""
    if not size or size >= len(dataset):
        return dataset
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:size].sort().values
    return Subset(dataset, indices.tolist())
