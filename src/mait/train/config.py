"""Training configuration: one dataclass, loaded from YAML and overridden from the command line.

The defaults are the built-in job (``mait train`` with no flags): MaiT-nano with one
hard-masked head per layer on scikit-learn's 8x8 digits.  Every key can be set in a YAML
file (``--config``) and on the command line (``--lr 5e-4``); an unknown key is an error
that names the closest valid one.  The resolved configuration is saved as ``config.yaml``
in the output folder, so ``mait train --config runs/x/config.yaml`` repeats a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import yaml

from ..errors import UserError


@dataclass
class TrainConfig:
    """Everything a training run needs; see docs/training.md for each key."""

    # model
    model: str = "mait_nano4_8"                 # any timm model name (MaiT ones after ``import mait``)
    scheme: Optional[str] = None                # masking scheme name/text; None = the model's own
    mask_size: Optional[int] = None             # odd window size R; None = the model's (3)
    model_kwargs: dict = field(default_factory=dict)   # extra timm.create_model kwargs
    img_size: Optional[int] = None              # None = the model's (the digits are always 8)
    drop_path: float = 0.1
    init_from: Optional[str] = None             # .safetensors to fine-tune from (head reset on class mismatch)

    # data
    data: str = "digits"                        # "digits", an ImageFolder tree, CIFAR pickles, or a .tar.gz of either
    holdout_per_class: int = 0                  # validation = last N images of each class of train/ (sorted names)
    train_subset: int = 0                       # use a fixed random subset of N training images (0 = all)
    val_subset: int = 0                         # same for validation
    workers: int = 0                            # DataLoader worker processes per rank
    in_memory: str = "auto"                     # whole set as uint8 on the device, augmented there: auto | true | false
    batch_size: int = 32                        # GLOBAL batch, split evenly over the processes

    # augmentation (timm's create_transform / Mixup); 0 or None switches one off
    aa: Optional[str] = None                    # e.g. "rand-m9-mstd0.5-inc1" (DeiT)
    color_jitter: float = 0.0
    scale: list = field(default_factory=lambda: [0.08, 1.0])   # RandomResizedCrop area range
    hflip: float = 0.5
    reprob: float = 0.0                         # random erasing probability
    interpolation: str = "bicubic"
    crop_pct: Optional[float] = None            # eval resize ratio; None = the model's
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1                      # label smoothing

    # recipe (timm's optimizer/scheduler/EMA factories)
    epochs: int = 60
    opt: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    sched: str = "cosine"
    warmup_epochs: int = 5
    warmup_lr: float = 1e-5
    min_lr: float = 1e-5
    clip_grad: Optional[float] = None
    ema: bool = False
    ema_decay: float = 0.99996
    amp: Optional[bool] = None                  # autocast; None: on CUDA, off on CPUs; true: also bf16 on
                                                # CPUs with native bf16 (docs/training.md, Precision)

    # DeiT hard distillation (models with a distillation token)
    teacher: Optional[str] = None
    teacher_checkpoint: Optional[str] = None
    teacher_kwargs: dict = field(default_factory=dict)  # timm.create_model kwargs of the teacher (e.g. scheme)
    distillation_alpha: float = 0.5             # λ in (1-λ)·CE(cls) + λ·CE(dist, teacher argmax)

    # learned-mask (Sparsifiner) heads: the attention-reconstruction loss (defaults as released)
    reconstruction_weight: float = 0.01         # its weight in a run without stages
    reconstruction_target: str = "teacher"      # teacher: the dense teacher's attention; self: the layer's own (mait's)
    reconstruction_reduction: str = "sum"       # sum: over everything (released); row_mean: per query row (mait's)

    # training in stages (mait.train.stages): a list of {name, epochs, lr, min_lr, warmup_epochs, warmup_lr,
    # train, predictor, losses}; empty = one stage made of the keys above
    stages: list = field(default_factory=list)

    # run
    output: Optional[str] = None                # None = runs/<model>-<data>-<time>
    seed: int = 0
    deterministic: bool = False                 # torch.use_deterministic_algorithms (exact resume on CPU)
    checkpoint_every: int = 0                   # also save the training state every N steps (0 = per epoch)
    device: str = "auto"                        # auto | cpu | cuda
    progress: bool = True                       # tqdm bar per epoch
    compile: bool = False                       # torch.compile the model for training

    def __post_init__(self) -> None:
        """A value outside its range is a one-line error naming the key, not a failure deep inside training."""
        for key, (accepts, expected) in VALUE_RANGES.items():
            value = getattr(self, key)
            if value is not None and not accepts(value):
                raise UserError(f"config key {key} must be {expected}, got {value!r}")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: Optional["TrainConfig"] = None) -> "TrainConfig":
        """Build a config from ``values`` on top of ``base`` (default: the defaults), checking every key."""
        hints = typing.get_type_hints(cls)
        current = dataclasses.asdict(base) if base is not None else {}
        for key, value in values.items():
            key = key.replace("-", "_")
            if key not in hints:
                raise UserError(f"unknown config key {key!r}{_closest(key, cls.keys())}")
            current[key] = coerce(key, value, hints[key])
        return cls(**current)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Union[str, Path]) -> None:
        from .checkpoint import atomic_write_text  # local: checkpoint imports torch
        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


def _fraction(value: float) -> bool:
    return 0.0 <= value <= 1.0


# Keys with a range (None, where allowed, always passes): a predicate and how the error describes the range.
VALUE_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{key: (lambda v: v >= 0, "a count >= 0") for key in (
        "holdout_per_class", "train_subset", "val_subset", "workers", "warmup_epochs", "checkpoint_every")},
    **{key: (lambda v: v >= 1, "at least 1") for key in ("epochs", "img_size")},
    **{key: (lambda v: v >= 0, ">= 0") for key in (
        "lr", "weight_decay", "warmup_lr", "min_lr", "mixup", "cutmix", "color_jitter", "reconstruction_weight")},
    **{key: (_fraction, "between 0 and 1") for key in (
        "hflip", "reprob", "mixup_prob", "mixup_switch_prob", "distillation_alpha")},
    **{key: (lambda v: 0 <= v < 1, "in [0, 1)") for key in ("drop_path", "smoothing")},
    "ema_decay": (lambda v: 0 < v < 1, "in (0, 1)"),
    "clip_grad": (lambda v: v > 0, "> 0 (or none)"),
}


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else f"; valid keys: {', '.join(valid)}"


# Keys for which the word "none" is a real value, not "unset" (``scheme: none`` = no masked head).
NONE_IS_A_VALUE = frozenset({"scheme"})


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the field type, or raise naming the key."""
    args = typing.get_args(hint)
    optional = (typing.get_origin(hint) in (Union, types.UnionType)) and type(None) in args
    target = next((a for a in args if a is not type(None)), hint) if optional else hint
    if isinstance(value, str) and target is not str:
        value = yaml.safe_load(value) if value.strip() else None
    unset = ("null",) if key in NONE_IS_A_VALUE else ("none", "None", "null")
    if value is None or (optional and value in unset):
        if optional:
            return None
        raise UserError(f"config key {key!r} needs a value of type {target.__name__}, got none")
    try:
        if target is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if target is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if target is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if target is str:
            return str(value)
        origin = typing.get_origin(target) or target
        if origin is list and isinstance(value, (list, tuple)):
            return list(value)
        if origin is dict and isinstance(value, dict):
            return dict(value)
    except (TypeError, ValueError):
        pass
    raise UserError(f"config key {key!r} expects {getattr(target, '__name__', target)}, got {value!r}")


PRESETS = Path(__file__).resolve().parents[1] / "configs"


def presets() -> dict[str, Path]:
    """The configs shipped in the package by name: ``digits``, ``cifar10``, ``mait_t24`` ... (file stems)."""
    return {path.stem: path for path in sorted(PRESETS.glob("*/*.yaml"))}


def config_path(name: Union[str, Path]) -> Path:
    """A YAML file path as given, or the shipped preset of that name (``digits``, ``small/digits.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = presets()
    stem = path.name.removesuffix(".yaml")
    if stem in shipped and (len(path.parts) == 1 or shipped[stem].parent.name == path.parent.name):
        return shipped[stem]
    raise UserError(f"config file {path} does not exist, and it names no preset ({', '.join(shipped)})")


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[Mapping[str, Any]] = None,
                base: Optional[TrainConfig] = None) -> TrainConfig:
    """Defaults (or ``base``) <- YAML file at ``path`` (or preset name) <- ``overrides``; keys are checked at each step."""
    config = base or TrainConfig()
    if path is not None:
        path = config_path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise UserError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise UserError(f"config file {path} must hold a mapping of keys to values, got {type(values).__name__}")
        config = TrainConfig.from_dict(values, base=config)
    return TrainConfig.from_dict(overrides or {}, base=config)
