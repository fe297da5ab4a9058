"""Training configuration: YAML + command-line overrides, key checks, and the paper's presets."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm

import mait  # noqa: F401
from mait.errors import UserError
from mait.train import TrainConfig, load_config
from mait.train.config import PRESETS, presets

CONFIGS = PRESETS


def test_yaml_then_overrides_and_string_coercion(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: mait_t24_224\nlr: 1e-3\nepochs: 5\nscale: [0.5, 1.0]\nmodel_kwargs: {depth: 2}\n")
    config = load_config(path, {"epochs": "7", "ema": "true", "clip-grad": "none"})
    assert config.model == "mait_t24_224" and config.lr == 1e-3 and isinstance(config.lr, float)
    assert config.epochs == 7 and config.ema is True and config.clip_grad is None
    assert config.scale == [0.5, 1.0] and config.model_kwargs == {"depth": 2}
    saved = tmp_path / "saved.yaml"
    config.save(saved)
    assert load_config(saved) == config


@pytest.mark.parametrize("values, message", [
    ({"learning_rate": 1}, "unknown config key 'learning_rate'"),
    ({"epoch": 3}, "did you mean 'epochs'"),
    ({"weight_decy": 0.1}, "did you mean 'weight_decay'"),
    ({"epochs": "many"}, "config key 'epochs' expects int, got 'many'"),
    ({"epochs": 2.5}, "expects int"),
    ({"ema": "sometimes"}, "config key 'ema' expects bool"),
    ({"scale": 3}, "config key 'scale' expects list"),
    ({"lr": None}, "needs a value"),
])
def test_bad_keys_and_values_are_named(values: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_config(None, values)


def test_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text("mixupp: 0.8\n")
    with pytest.raises(UserError, match="did you mean 'mixup'"):
        load_config(tmp_path / "typo.yaml")


def test_cli_reports_unknown_yaml_key_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "typo.yaml").write_text("epoch: 3\n")
    proc = subprocess.run([sys.executable, "-m", "mait", "train", "--config", str(tmp_path / "typo.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "mait train: error: unknown config key 'epoch' (did you mean 'epochs'?)"


# Paper Table 8 / §5.1: batch 1024, lr = base * 1024 / 512, drop path, 400 epochs for > 12 layers.
PAPER = {
    "mait_xt24": ("mait_xt24_224", 1e-3, 0.0), "mait_t24": ("mait_t24_224", 1e-3, 0.0),
    "mait_xs24": ("mait_xs24_224", 5e-4, 0.1), "mait_s24": ("mait_s24_224", 5e-4, 0.1),
    "mait_t12": ("mait_t12_224", 1e-3, 0.0), "mait_s12": ("mait_s12_224", 5e-4, 0.1),
    "mait_xt24_distilled": ("mait_xt24_distilled_224", 1e-3, 0.0), "mait_t36": ("mait_t36_224", 1e-3, 0.0),
    "mait_cait_xxs24": ("mait_cait_xxs24_224", 5e-4, 0.05), "mait_cait_s24": ("mait_cait_s24_224", 5e-4, 0.1),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_imagenet_presets_follow_the_paper(name: str) -> None:
    model, base_lr, drop_path = PAPER[name]
    config = load_config(CONFIGS / "imagenet" / f"{name}.yaml")
    assert config.model == model and timm.is_model(model)
    assert config.batch_size == 1024 and config.lr == pytest.approx(base_lr * 1024 / 512)
    assert config.drop_path == drop_path and config.epochs == 400
    assert (config.mixup, config.cutmix, config.smoothing, config.reprob) == (0.8, 1.0, 0.1, 0.25)   # DeiT
    assert config.aa == "rand-m9-mstd0.5-inc1" and config.weight_decay == 0.05 and config.warmup_epochs == 5
    if "distilled" in name:
        assert config.teacher == "regnety_160"


def test_every_preset_loads() -> None:
    files = sorted(CONFIGS.glob("*/*.yaml"))
    assert {f.parent.name for f in files} == {"imagenet", "small"} and len(files) >= 11
    for path in files:
        assert timm.is_model(load_config(path).model), path


def test_default_config_is_the_builtin_digits_job() -> None:
    config = TrainConfig()
    assert (config.model, config.data) == ("mait_nano4_8", "digits")


def test_digits_preset_is_the_builtin_default() -> None:
    """The digits preset writes out exactly what `mait train` does with no flags."""
    assert load_config(CONFIGS / "small" / "digits.yaml") == TrainConfig()


def test_presets_are_addressable_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--config digits` works from any folder; a name that is neither a file nor a preset lists the presets."""
    monkeypatch.chdir(tmp_path)
    assert {"digits", "cifar10", "cifar100", "mait_t24"} <= set(presets())
    assert load_config("digits") == load_config("small/digits.yaml") == TrainConfig()
    assert load_config("mait_t24").model == "mait_t24_224"
    with pytest.raises(UserError, match=r"config file digitz does not exist, and it names no preset \(.*digits"):
        load_config("digitz")
    with pytest.raises(UserError, match="names no preset"):
        load_config("imagenet/digits")


def test_scheme_none_is_the_unmasked_scheme_not_unset() -> None:
    """`--scheme none` must train the unmasked baseline, not fall back to the model's default scheme."""
    assert load_config(None, {"scheme": "none"}).scheme == "none"
    assert load_config(None, {"scheme": "null"}).scheme is None
    assert load_config(None, {"teacher": "none"}).teacher is None


@pytest.mark.parametrize("key,value,needle", [
    ("workers", -1, "config key workers must be a count >= 0, got -1"),
    ("holdout_per_class", -1, "holdout_per_class must be a count >= 0"),
    ("lr", -1.0, "config key lr must be >= 0, got -1.0"),
    ("hflip", 1.5, "hflip must be between 0 and 1"),
    ("drop_path", 1.0, "drop_path must be in [0, 1)"),
    ("ema_decay", 1.0, "ema_decay must be in (0, 1)"),
    ("clip_grad", 0.0, "clip_grad must be > 0 (or none)"),
    ("epochs", 0, "config key epochs must be at least 1, got 0"),
])
def test_values_out_of_range_are_one_line_errors(key, value, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        TrainConfig.from_dict({key: value})
