"""One epoch of the CIFAR-10 preset on a subset of the JPEG set in ../shared/data (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mait.train import CIFAR10_JPG_HOLDOUT, load_config, open_data, train

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-train-jpg.tar.gz"
pytestmark = pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"CIFAR-10 JPEG set not found at {ARCHIVE}")


def test_cifar10_split_is_the_last_thousand_of_each_class() -> None:
    train, val, info = open_data(str(ARCHIVE), holdout_per_class=CIFAR10_JPG_HOLDOUT)
    assert (info.num_classes, len(train), len(val)) == (10, 40_000, 10_000)
    names = [Path(val.dataset.samples[i][0]) for i in val.indices]
    assert names[0].name == "4000.jpg" and names[999].name == "4999.jpg" and names[0].parent.name == "airplane"


def test_one_epoch_of_the_cifar10_preset_on_a_subset(tmp_path: Path) -> None:
    config = load_config("cifar10",
                         {"data": str(ARCHIVE), "epochs": 1, "train_subset": 512, "val_subset": 256, "batch_size": 64,
                          "workers": 0, "warmup_epochs": 0, "output": str(tmp_path / "run"), "progress": False})
    result = train(config)
    assert len(result.history) == 1
    assert 0 <= result.final_acc1 <= 100 and result.history[0]["train_loss"] > 0
    assert result.best_checkpoint.is_file() and (tmp_path / "run" / "metrics.csv").is_file()
