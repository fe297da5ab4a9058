"""Training and evaluation data: sources, the on-disk cache, per-image and on-device augmentation, loaders.

* :mod:`.sources`: what a ``data`` string names (digits, image folders, CIFAR pickles, archives)
  as datasets, and the hold-out split;
* :mod:`.cache`: archives extracted once and image folders decoded once, in ``~/.cache/mait``;
* :mod:`.transforms`: timm's per-image transforms, seeded per (seed, epoch, image), and mixup;
* :mod:`.device_augment`: timm's crop and flip computed for whole batches on the device;
* :mod:`.in_memory`: which sets are held as one uint8 tensor on the device (``in_memory``);
* :mod:`.loaders`: the DataLoaders of a config, resumable mid-epoch and sharded per process.

The names below are the package's interface to the rest of mait; the others stay in their module.
"""

from .cache import extract_archive
from .loaders import Loaders, ResumableSampler, build_eval_loader, build_loaders, per_rank_batch
from .sources import (CIFAR10_JPG_HOLDOUT, DIGITS_MEAN, DIGITS_STD, IMAGE_EXTENSIONS, CorruptImageError, DataInfo,
                      open_data, subset)
from .transforms import Augmented, build_transforms, data_config

__all__ = [
    "Augmented", "CIFAR10_JPG_HOLDOUT", "CorruptImageError", "DIGITS_MEAN", "DIGITS_STD", "DataInfo",
    "IMAGE_EXTENSIONS", "Loaders", "ResumableSampler", "build_eval_loader", "build_loaders", "build_transforms",
    "data_config", "extract_archive", "open_data", "per_rank_batch", "subset",
]
