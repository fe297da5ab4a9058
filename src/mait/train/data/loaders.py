"""The DataLoaders of a config: in-memory or timm's, resumable mid-epoch, sharded over the processes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
from timm.data import Mixup
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ...errors import UserError
from ..config import TrainConfig
from ..distributed import Dist
from .device_augment import DeviceImages
from .in_memory import device_sets
from .sources import DataInfo, open_data, subset
from .transforms import Augmented, build_mixup, build_transforms


@dataclass
class Loaders:
    """What a training run reads: its loaders, the resumable sampler, the data's shape and mixup."""

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


def per_rank_batch(config: TrainConfig, env: Dist) -> int:
    """This process's share of the global ``batch_size``."""
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


def _whole_batch(batch: Any) -> Any:
    """The DataLoader's collate for :class:`DeviceImages`: ``__getitems__`` already returns the batch."""
    return batch


def build_eval_loader(dataset: Dataset, batch_size: int, workers: int, env: Dist) -> DataLoader:
    """Every process takes every ``world_size``-th image (no padding, so reduced metrics are exact)."""
    part = Subset(dataset, range(env.rank, len(dataset), env.world_size)) if env.enabled else dataset
    return DataLoader(part, batch_size=batch_size, shuffle=False, **_loading(dataset, workers, env))
