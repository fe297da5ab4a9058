"""In-memory data (``in_memory``): the crop distribution and pixels of timm's transforms, batches that are a
function of (seed, epoch, image), the digits unchanged, the choice of path, the decoded cache, mixup."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from mait.errors import UserError
from mait.train import TrainConfig, build_loaders, train
from mait.train.data import cache as data_cache
from mait.train.data import in_memory as data_in_memory
from mait.train.data.device_augment import CROP_DRAWS, CROP_RATIO, DeviceImages, crop_boxes, resized_crops, uniforms
from mait.train.data.sources import ImageFiles
from mait.train.data.transforms import Augmented
from mait.train.distributed import Dist


def _smooth(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """uint8 images with detail at a few pixels' scale (bicubic kernels differ little on them)."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, 4, 5, generator=generator) * 255
    return F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False).round().to(torch.uint8)


def _folder(root: Path, images: torch.Tensor, classes: int = 2) -> None:
    for i, image in enumerate(images):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")


def _tree(root: Path, train: int = 40, val: int = 10, size: int = 32) -> Path:
    _folder(root / "train", _smooth(train, size, size, seed=1))
    _folder(root / "val", _smooth(val, size, size, seed=2))
    return root


def _total_variation(a: np.ndarray, b: np.ndarray) -> float:
    values = np.union1d(a, b)
    return 0.5 * float(sum(abs((a == v).mean() - (b == v).mean()) for v in values))


@pytest.mark.parametrize("height, width, scale, ratio", [
    (32, 32, (0.08, 1.0), CROP_RATIO),        # the presets' crop on CIFAR
    (24, 40, (0.35, 1.0), CROP_RATIO),        # landscape image
    (32, 32, (0.9, 1.0), (0.5, 2.0)),         # most attempts too large: many fall back
    (10, 40, (0.5, 1.0), CROP_RATIO),         # no attempt fits: always the clamped central crop
])
def test_crop_boxes_have_timms_distribution(height: int, width: int, scale, ratio) -> None:
    """top, left, h, w each have the distribution of timm's get_params (total variation at 20,000 draws)."""
    count = 20_000
    image = Image.new("RGB", (width, height))
    random.seed(0)
    want = np.array([RandomResizedCropAndInterpolation.get_params(image, scale, ratio) for _ in range(count)])
    got = crop_boxes(uniforms(0, 0, torch.arange(count), CROP_DRAWS), height, width, scale, ratio).numpy()
    assert ((got[:, 2] <= height) & (got[:, 3] <= width) & (got[:, 0] + got[:, 2] <= height)
            & (got[:, 1] + got[:, 3] <= width) & (got.min(axis=1) >= 0)).all()
    for column, name in enumerate(["top", "left", "h", "w"]):
        distance = _total_variation(want[:, column], got[:, column])
        assert distance < 0.04, f"{name}: total variation {distance:.3f} from timm's crop parameters"


@pytest.mark.parametrize("height, width, size, mode, mean_tol", [
    (32, 32, 32, "bicubic", 1.0), (24, 40, 32, "bicubic", 1.0), (32, 32, 32, "bilinear", 0.5), (12, 12, 32, "bicubic", 3.0),
])
def test_resized_crops_match_pil(height: int, width: int, size: int, mode: str, mean_tol: float) -> None:
    """Each crop equals torchvision's PIL resized_crop + hflip up to the bicubic kernel (a = -0.75 vs PIL's -0.5)
    and the pixels just outside a crop that grid_sample reads at its edges (mean |difference| in 0-255 levels)."""
    count = 100
    images = _smooth(count, height, width)
    draws = uniforms(3, 1, torch.arange(count), CROP_DRAWS)
    boxes = crop_boxes(draws, height, width, (0.08, 1.0), CROP_RATIO)
    flips = draws[:, 22] < 0.5
    got = resized_crops(images, boxes, flips, size, mode)
    interpolation = InterpolationMode.BICUBIC if mode == "bicubic" else InterpolationMode.BILINEAR
    want = []
    for image, box, flip in zip(images, boxes.int().tolist(), flips):
        crop = TF.resized_crop(Image.fromarray(image.permute(1, 2, 0).numpy()), *box, [size, size], interpolation)
        crop = TF.hflip(crop) if flip else crop
        want.append(torch.from_numpy(np.array(crop)).permute(2, 0, 1).float())
    difference = (got - torch.stack(want)).abs()
    assert difference.mean() < mean_tol, difference.mean()
    assert difference.flatten().quantile(0.95) <= 3 * mean_tol
    square = _smooth(count, size, size)
    whole = torch.tensor([[0.0, 0.0, size, size]]).expand(count, 4)
    unflipped = resized_crops(square, whole, torch.zeros(count, dtype=torch.bool), size, mode)
    assert torch.equal(unflipped, square.float()), "the whole image at its own size is returned unchanged"
    assert torch.equal(resized_crops(square, whole, torch.ones(count, dtype=torch.bool), size, mode),
                       square.float().flip(-1))


def test_in_memory_batches_have_the_pixel_statistics_of_timms_loader(tmp_path: Path) -> None:
    """Per-channel mean/std and the per-pixel mean of many augmented epochs agree with timm's transforms."""
    root = _tree(tmp_path, train=64, val=8)
    config = dict(data=str(root), model="mait_micro4_32", batch_size=64, scale=[0.2, 1.0], seed=0)
    stats = {}
    for choice in ("true", "false"):
        loaders = build_loaders(TrainConfig(**config, in_memory=choice))
        batches = []
        for epoch in range(30):
            loaders.train_set.epoch = epoch
            loaders.sampler.set_epoch(epoch)
            batches += [images for images, _ in loaders.train]
        stats[choice] = torch.cat(batches)
    fast, timm_loader = stats["true"], stats["false"]
    assert fast.shape == timm_loader.shape == (64 * 30, 3, 32, 32)
    for reduce in (lambda x: x.mean(dim=(0, 2, 3)), lambda x: x.std(dim=(0, 2, 3))):
        torch.testing.assert_close(reduce(fast), reduce(timm_loader), rtol=0, atol=0.02)
    per_pixel_se = (timm_loader.var(dim=0) * 2 / len(timm_loader)).sqrt()
    z = (fast.mean(dim=0) - timm_loader.mean(dim=0)) / per_pixel_se
    assert z.abs().mean() < 1.2 and z.abs().max() < 5, (z.abs().mean(), z.abs().max())


def test_a_batch_is_a_function_of_seed_epoch_and_image(tmp_path: Path) -> None:
    loaders = build_loaders(TrainConfig(data=str(_tree(tmp_path)), model="mait_micro4_32", batch_size=8,
                                        in_memory="true", seed=4))
    images: DeviceImages = loaders.train_set
    assert isinstance(images, DeviceImages)
    batch, labels = images.__getitems__([3, 5, 7])
    state = torch.get_rng_state()
    torch.manual_seed(99)
    alone, label = images[7]
    assert torch.equal(alone, batch[2]) and label == labels[2], "the same image whatever batch it is drawn in"
    assert not torch.equal(batch[0], batch[1])
    images.epoch = 1
    assert not torch.equal(images[7][0], alone)
    images.epoch, images.seed = 0, 5
    assert not torch.equal(images[7][0], alone)
    torch.set_rng_state(state)
    images.seed = 4
    images[2]
    assert torch.equal(torch.get_rng_state(), state), "augmenting leaves the global RNG alone"


def test_two_ranks_see_the_images_one_process_sees(tmp_path: Path) -> None:
    """DDP sharding: rank r of 2 gets every other image of the epoch's order, augmented exactly as in one process."""
    config = TrainConfig(data=str(_tree(tmp_path)), model="mait_micro4_32", batch_size=8, in_memory="true", seed=1)

    def by_index(env: Dist) -> dict[int, torch.Tensor]:
        loaders = build_loaders(config, env)
        loaders.sampler.start_at(2, 0)
        loaders.train_set.epoch = 2
        order = list(loaders.sampler)
        loaders.sampler.start_at(2, 0)
        images = torch.cat([batch for batch, _ in loaders.train])
        return dict(zip(order, images))

    one = by_index(Dist(0, 1, torch.device("cpu")))
    ranks = [by_index(Dist(rank, 2, torch.device("cpu"))) for rank in range(2)]
    assert len(one) == 40 and len(ranks[0]) == len(ranks[1]) == 20 and not set(ranks[0]) & set(ranks[1])
    for shard in ranks:
        for index, image in shard.items():
            assert torch.equal(image, one[index]), index


def test_digits_in_memory_are_the_same_batches() -> None:
    base = dict(batch_size=32, seed=2)
    fast, slow = build_loaders(TrainConfig(**base)), build_loaders(TrainConfig(**base, in_memory="false"))
    assert isinstance(fast.train_set, DeviceImages) and isinstance(slow.train_set, Augmented)   # auto: digits fit
    for loader_a, loader_b in ((fast.train, slow.train), (fast.val, slow.val)):
        pairs = list(zip(loader_a, loader_b, strict=True))
        assert len(pairs) > 5
        for (images_a, labels_a), (images_b, labels_b) in pairs:
            assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


def test_in_memory_choice_and_its_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = str(_tree(tmp_path / "small"))
    kinds = lambda **keys: type(build_loaders(TrainConfig(data=root, model="mait_micro4_32", batch_size=8,  # noqa: E731
                                                          **keys)).train_set).__name__
    assert kinds() == "DeviceImages"
    assert kinds(in_memory="false") == kinds(aa="rand-m9-mstd0.5-inc1") == kinds(reprob=0.25) == "Augmented"
    assert kinds(in_memory=True) == "DeviceImages"                  # a YAML boolean
    with pytest.raises(UserError, match="in_memory: true cannot hold .*aa 'rand-m9"):
        kinds(in_memory="true", aa="rand-m9-mstd0.5-inc1")
    with pytest.raises(UserError, match="in_memory must be one of auto, true, false, got 'sometimes'"):
        kinds(in_memory="sometimes")
    monkeypatch.setattr(data_in_memory, "IN_MEMORY_AUTO_BYTES", 50 * 32 * 32 * 3 - 1)   # one byte too few for 50 images
    assert kinds() == "Augmented" and kinds(in_memory="true") == "DeviceImages"
    big = str(_tree(tmp_path / "big", train=4, val=2, size=40))
    with pytest.raises(UserError, match="40x40 images are larger than the model input 32"):
        build_loaders(TrainConfig(data=big, model="mait_micro4_32", batch_size=2, in_memory="true"))


def test_image_folders_are_decoded_once_and_mixed_sizes_stay_on_timm(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data_cache, "DECODED_CACHE_MIN", 6)
    root = _tree(tmp_path / "data", train=6, val=2, size=16)
    assert ImageFiles(root / "val").array()[0].shape == (2, 3, 16, 16)
    assert not (tmp_path / "cache").exists(), "2 images are not worth a cache file"
    images, labels = ImageFiles(root / "train").array()
    cached = list((tmp_path / "cache" / "decoded").iterdir())
    assert len(cached) == 1 and images.shape == (6, 3, 16, 16) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    first = np.asarray(Image.open(root / "train" / "c0" / "0000.png"))
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), first)
    again, _ = ImageFiles(root / "train").array()
    assert torch.equal(again, images) and list((tmp_path / "cache" / "decoded").iterdir()) == cached
    Image.fromarray(np.zeros((20, 16, 3), dtype=np.uint8)).save(root / "train" / "c1" / "odd.png")
    assert ImageFiles(root / "train").array() is None
    config = TrainConfig(data=str(root), model="mait_micro4_32", batch_size=2)
    assert isinstance(build_loaders(config).train_set, Augmented)
    with pytest.raises(UserError, match="not all of one size"):
        build_loaders(TrainConfig.from_dict({"in_memory": "true"}, base=config))


def test_mixup_cutmix_on_in_memory_batches_and_images_per_s_logged(tmp_path: Path) -> None:
    config = TrainConfig(data=str(_tree(tmp_path / "data")), model="mait_micro4_32", batch_size=8, epochs=1,
                         warmup_epochs=0, mixup=0.8, cutmix=1.0, in_memory="true", progress=False,
                         model_kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2}, output=str(tmp_path / "run"))
    result = train(config)
    assert np.isfinite(result.history[0]["train_loss"]) and result.history[0]["train_images_per_s"] > 0
    with open(tmp_path / "run" / "metrics.csv") as handle:
        row = next(csv.DictReader(handle))
    assert float(row["train_images_per_s"]) == pytest.approx(result.history[0]["train_images_per_s"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert "train_images_per_s" in events.Tags()["scalars"]


@pytest.mark.slow
def test_compile_trains_like_eager(tmp_path: Path) -> None:
    """`--compile` (torch.compile of the training forward) gives the eager run's losses and weights."""
    keys = dict(model_kwargs={"depth": 1, "embed_dim": 16, "num_heads": 2}, epochs=1, warmup_epochs=0, batch_size=64,
                drop_path=0.0, progress=False)
    eager = train(TrainConfig(**keys, output=str(tmp_path / "eager")))
    compiled = train(TrainConfig(**keys, compile=True, output=str(tmp_path / "compiled")))
    assert compiled.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"], rel=1e-4)
    assert compiled.final_acc1 == pytest.approx(eager.final_acc1, abs=0.3)
    from safetensors.torch import load_file
    want, got = load_file(str(eager.last_checkpoint)), load_file(str(compiled.last_checkpoint))
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-4, msg=key)
