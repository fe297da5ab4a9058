"""Data sources of ``mait train``: digits, ImageFolder trees, hold-out split, CIFAR pickles, tarballs, errors."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mait.errors import UserError
from mait.train import TrainConfig, build_loaders, open_data
from mait.train.data import Augmented, CorruptImageError, ResumableSampler, build_transforms
from mait.train.distributed import Dist


def _tree(root: Path, classes: dict[str, int], size: int = 12) -> None:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:04d}.png")


def test_digits_split_is_fixed_and_stratified() -> None:
    train, val, info = open_data("digits")
    assert (info.num_classes, info.in_chans, info.img_size) == (10, 1, 8)
    assert len(train) + len(val) == 1797 and len(val) == 360
    train_counts = torch.bincount(train.tensors[1], minlength=10).float()
    val_counts = torch.bincount(val.tensors[1], minlength=10).float()
    assert torch.allclose(val_counts / train_counts, torch.full((10,), 0.25), atol=0.02)   # 80/20 in every class
    again = open_data("digits")[1]
    assert torch.equal(again.tensors[0], val.tensors[0])


def test_image_folder_with_train_and_val(tmp_path: Path) -> None:
    _tree(tmp_path / "train", {"cat": 5, "dog": 4})
    _tree(tmp_path / "val", {"cat": 2, "dog": 2})
    train, val, info = open_data(str(tmp_path))
    assert (len(train), len(val), info.num_classes) == (9, 4, 2)
    image, target = val[3]
    assert isinstance(image, Image.Image) and target == 1


def test_holdout_takes_the_last_images_of_each_class(tmp_path: Path) -> None:
    _tree(tmp_path / "train", {"a": 6, "b": 5})
    train, val, info = open_data(str(tmp_path), holdout_per_class=2)
    names = [Path(val.dataset.samples[i][0]).name for i in val.indices]
    assert names == ["0004.png", "0005.png", "0003.png", "0004.png"]
    assert len(train) == 7 and not set(train.indices) & set(val.indices)
    with pytest.raises(UserError, match="leaves no training image of class"):
        open_data(str(tmp_path), holdout_per_class=5)


def test_eval_only_tree_of_class_folders(tmp_path: Path) -> None:
    _tree(tmp_path, {"a": 2, "b": 3})
    _, val, info = open_data(str(tmp_path), need_train=False)
    assert len(val) == 5 and info.num_classes == 2
    with pytest.raises(UserError, match="no train/ folder"):
        open_data(str(tmp_path))


@pytest.mark.parametrize("layout", ["cifar10", "cifar100"])
def test_cifar_pickles_and_their_tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / ("cifar-10-batches-py" if layout == "cifar10" else "cifar-100-python")
    folder.mkdir()
    key, names = ("labels", ["data_batch_1", "data_batch_2"]) if layout == "cifar10" else ("fine_labels", ["train"])
    labels = []
    for name in names:
        batch_labels = rng.integers(0, 10, 6).tolist()
        labels += batch_labels
        data = rng.integers(0, 255, (6, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": data, key: batch_labels}, handle)
    test = rng.integers(0, 255, (4, 3 * 32 * 32), dtype=np.uint8)
    with open(folder / ("test_batch" if layout == "cifar10" else "test"), "wb") as handle:
        pickle.dump({"data": test, key: [1, 2, 3, 4]}, handle)
    train, val, info = open_data(str(tmp_path))
    assert len(train) == len(labels) and len(val) == 4
    assert info.num_classes == (10 if layout == "cifar10" else 100)
    image, target = val[2]
    assert target == 3 and np.array_equal(np.asarray(image), test[2].reshape(3, 32, 32).transpose(1, 2, 0))

    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    monkeypatch.setenv("MAIT_CACHE", str(tmp_path / "cache"))
    train2, val2, _ = open_data(str(archive))
    assert len(train2) == len(train) and np.array_equal(np.asarray(val2[2][0]), np.asarray(image))
    extracted = list((tmp_path / "cache").iterdir())
    assert len(extracted) == 1 and not extracted[0].name.startswith(".")    # renamed into place
    open_data(str(archive))
    assert list((tmp_path / "cache").iterdir()) == extracted                 # extracted once
    copy = tmp_path / "elsewhere" / "cifar.tar.gz"                           # same bytes, new path and mtime
    copy.parent.mkdir()
    copy.write_bytes(archive.read_bytes())
    os.utime(copy, ns=(0, 0))
    open_data(str(copy))
    assert list((tmp_path / "cache").iterdir()) == extracted                 # keyed by content
    with tarfile.open(copy, "w:gz") as tar:                                  # new content: a new extraction
        tar.add(folder / "test_batch" if layout == "cifar10" else folder / "test", arcname=f"{folder.name}/x")
        tar.add(folder, arcname=folder.name)
    open_data(str(copy))
    assert len(list((tmp_path / "cache").iterdir())) == 2


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "no train/ folder"),
])
def test_bad_data_folders(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(UserError, match=message):
        open_data(str(make(tmp_path)))


def test_folder_without_images_names_it(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "notes.txt").write_text("x")
    (tmp_path / "val").mkdir()
    with pytest.raises(UserError, match=f"data folder {tmp_path / 'train'} has no images"):
        open_data(str(tmp_path))


@pytest.mark.parametrize("workers, in_memory", [(0, "false"), (1, "false"), (0, "true")])
def test_corrupt_image_names_its_path(tmp_path: Path, workers: int, in_memory: str) -> None:
    """Read by a loader worker, by the main process, or when an in-memory set is decoded."""
    _tree(tmp_path / "train", {"a": 4, "b": 4})
    _tree(tmp_path / "val", {"a": 1, "b": 1})
    bad = tmp_path / "train" / "b" / "0002.png"
    bad.write_bytes(b"not a png")
    config = TrainConfig(data=str(tmp_path), model="mait_micro4_32", batch_size=8, workers=workers,
                         in_memory=in_memory)
    with pytest.raises(CorruptImageError) as error:
        list(build_loaders(config).train)
    assert str(error.value).startswith(f"corrupt image {bad}") and "\n" not in str(error.value)


def test_corrupt_image_through_the_cli_is_one_line(tmp_path: Path) -> None:
    _tree(tmp_path / "train", {"a": 2, "b": 2})
    _tree(tmp_path / "val", {"a": 1, "b": 1})
    bad = tmp_path / "train" / "a" / "0001.png"
    bad.write_bytes(b"\x89PNG broken")
    proc = subprocess.run([sys.executable, "-m", "mait", "train", "--data", str(tmp_path), "--model", "mait_micro4_32",
                           "--batch-size", "2", "--epochs", "1", "--workers", "1", "--no-progress",
                           "--output", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert f"corrupt image {bad}" in proc.stderr


def test_sampler_resumes_mid_epoch_and_splits_ranks() -> None:
    data = list(range(20))
    whole = ResumableSampler(data, Dist(0, 1, torch.device("cpu")), seed=5)
    whole.start_at(3, 0)
    order = list(whole)
    whole.start_at(3, 7)
    assert list(whole) == order[7:]
    assert list(whole) == order, "the skip applies to one iteration only"
    ranks = [ResumableSampler(data, Dist(r, 2, torch.device("cpu")), seed=5) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(3)
    assert [list(s) for s in ranks] == [order[0::2], order[1::2]]


def test_augmentation_is_seeded_per_epoch_and_image(tmp_path: Path) -> None:
    _tree(tmp_path / "train", {"a": 3, "b": 3}, size=40)
    _tree(tmp_path / "val", {"a": 1, "b": 1}, size=40)
    config = TrainConfig(data=str(tmp_path), model="mait_micro4_32", aa="rand-m9-mstd0.5-inc1", reprob=0.5)
    train, _, info = open_data(config.data)
    transform, _ = build_transforms(config, info)
    augmented = Augmented(train, transform, seed=0)
    first = augmented[4][0]
    torch.manual_seed(123)                   # the global RNG does not matter ...
    assert torch.equal(augmented[4][0], first)
    assert not torch.equal(augmented[3][0], first)
    augmented.epoch = 1                      # ... the epoch does
    assert not torch.equal(augmented[4][0], first)
    state = torch.get_rng_state()
    augmented[2]
    assert torch.equal(torch.get_rng_state(), state), "augmenting leaves the global RNG alone"
