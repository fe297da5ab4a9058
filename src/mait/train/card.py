"""What a checkpoint records about its model: enough to rebuild it and to feed it images.

``mait train`` writes a :class:`ModelCard` as JSON into the metadata of every
``.safetensors`` file it saves (key ``"mait"``): the timm model name, the masking scheme as
text, the mask size, image size, channels, classes and their names, the training data and its
validation split, and the evaluation transform (mean, std, crop, interpolation).  ``mait eval``,
``mait predict``, ``mait export``, the analysis commands and ``--init-from`` read it, so a
checkpoint copied away from its ``config.yaml`` still means what it meant.  Files written
before the card existed carry only ``model``/``epoch``/``acc1``; they keep loading.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch.nn as nn
from torch.utils.data import Dataset

from .checkpoint import read_metadata
from .config import TrainConfig
from .data import DIGITS_MEAN, DIGITS_STD, DataInfo

CARD_KEY = "mait"
CARD_VERSION = 1


class CheckpointMismatch(UserWarning):
    """An explicit setting contradicts what the checkpoint's card says its weights were trained with."""


@dataclass(frozen=True)
class ModelCard:
    """The model behind a checkpoint and the input it expects."""

    model: str
    num_classes: int
    in_chans: int
    img_size: int
    scheme: Optional[str]                  # the resolved scheme text (None: a model without masking)
    mask_size: Optional[int]
    model_kwargs: dict
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float
    interpolation: str
    class_names: Optional[tuple[str, ...]]
    data: str                              # the training data (a name or the path it had)
    holdout_per_class: int = 0             # its validation split: the last N images of each class (0: its own)
    version: int = CARD_VERSION

    def metadata(self, **extra: Any) -> dict[str, str]:
        """The safetensors metadata: the card as JSON plus ``model`` and ``extra`` as plain strings."""
        return {CARD_KEY: json.dumps(dataclasses.asdict(self)), "model": self.model,
                **{key: str(value) for key, value in extra.items()}}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> Optional["ModelCard"]:
        """The card in ``metadata``, or None for a file written without one."""
        if CARD_KEY not in metadata:
            return None
        values = json.loads(metadata[CARD_KEY])
        names = values.get("class_names")
        values.update(mean=tuple(values["mean"]), std=tuple(values["std"]),
                      class_names=tuple(names) if names is not None else None)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def config_values(self) -> dict[str, Any]:
        """The :class:`TrainConfig` keys that rebuild this model and its evaluation transform."""
        return {"model": self.model, "scheme": self.scheme, "mask_size": self.mask_size, "img_size": self.img_size,
                "model_kwargs": dict(self.model_kwargs), "crop_pct": self.crop_pct,
                "interpolation": self.interpolation, "data": self.data,
                "holdout_per_class": self.holdout_per_class}

    def data_info(self) -> DataInfo:
        """The classes, channels and image size the model was built for (no images attached)."""
        return DataInfo(self.data, self.num_classes, self.in_chans, self.img_size, 0, 0)

    def class_name(self, index: int) -> str:
        return self.class_names[index] if self.class_names else str(index)

    def transform(self) -> Callable:
        """timm's evaluation transform for a PIL image (grey for 1-channel models) -> normalised tensor."""
        from timm.data import create_transform
        resize = create_transform((self.in_chans, self.img_size, self.img_size), is_training=False,
                                  interpolation=self.interpolation, crop_pct=self.crop_pct,
                                  mean=self.mean, std=self.std)
        mode = "L" if self.in_chans == 1 else "RGB"
        return lambda image: resize(image.convert(mode))


def read_card(path: Path) -> Optional[ModelCard]:
    """The :class:`ModelCard` of a checkpoint, or None for one written without it."""
    return ModelCard.from_metadata(read_metadata(path))


def _cifar_label_names(data: str) -> Optional[tuple[str, ...]]:
    """The class names in the ``batches.meta`` (CIFAR-10) or ``meta`` (CIFAR-100) file of CIFAR pickles."""
    from .data import extract_archive
    root = Path(data).expanduser()
    if root.is_file() and tarfile.is_tarfile(root):
        root = extract_archive(root)             # already extracted when the data was opened
    for folder in (root, *sorted(root.glob("cifar-*"))):
        for name, key in (("batches.meta", "label_names"), ("meta", "fine_label_names")):
            if (folder / name).is_file():
                with open(folder / name, "rb") as handle:
                    return tuple(pickle.load(handle, encoding="latin1")[key])
    return None


def _class_names(dataset: Dataset, info: DataInfo, data: str) -> Optional[tuple[str, ...]]:
    """Folder names of an ImageFolder tree (through Subset/Augmented wrappers), CIFAR's label names,
    0-9 for the digits; None when the data names no classes."""
    while dataset is not None:
        if hasattr(dataset, "classes"):
            return tuple(dataset.classes)
        dataset = getattr(dataset, "dataset", None)
    if info.name == "digits":
        return tuple(str(i) for i in range(10))
    return _cifar_label_names(data)


def make_card(config: TrainConfig, info: DataInfo, model: nn.Module, val_set: Dataset,
              eval_transform: Optional[Callable]) -> ModelCard:
    """The card of ``model`` trained by ``config`` on ``info``'s data, evaluated with ``eval_transform``."""
    from torchvision.transforms import Normalize
    from .data import data_config

    if eval_transform is None:          # tensor data: the digits, normalised when loaded
        mean, std, crop_pct, img_size = DIGITS_MEAN, DIGITS_STD, 1.0, info.img_size
    else:
        normalize = next(t for t in eval_transform.transforms if isinstance(t, Normalize))
        mean, std = tuple(float(v) for v in normalize.mean), tuple(float(v) for v in normalize.std)
        resolved = data_config(config)
        crop_pct, img_size = float(resolved["crop_pct"]), int(resolved["input_size"][-1])
    scheme = getattr(model, "scheme", None)
    return ModelCard(model=config.model, num_classes=info.num_classes, in_chans=info.in_chans, img_size=img_size,
                     scheme=str(scheme) if scheme is not None else None, mask_size=getattr(model, "mask_size", None),
                     model_kwargs=dict(config.model_kwargs), mean=tuple(mean), std=tuple(std), crop_pct=crop_pct,
                     interpolation=config.interpolation, class_names=_class_names(val_set, info, config.data),
                     data=config.data, holdout_per_class=config.holdout_per_class)


def check_against_card(model: nn.Module, model_name: str, card: Optional[ModelCard], source: Path,
                       consequence: str = "drop the override to use the checkpoint's") -> None:
    """Warn (:class:`CheckpointMismatch`) where ``model`` differs from what ``source``'s card records."""
    if card is None:
        return
    scheme = getattr(model, "scheme", None)
    built = {"model": model_name, "scheme": str(scheme) if scheme is not None else None,
             "mask size": getattr(model, "mask_size", None)}
    recorded = {"model": card.model, "scheme": card.scheme, "mask size": card.mask_size}
    for key, value in built.items():
        if value != recorded[key]:
            warnings.warn(f"{source} was trained with {key} {recorded[key]} (its metadata), but {value} is used "
                          f"here as asked; {consequence}", CheckpointMismatch,
                          stacklevel=2)
