"""What a run trains: the model (mait's, or a timm ViT given mait's masks), the distillation teacher, and
the losses."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import mait  # noqa: F401  (registers the MaiT models in timm)

from ..errors import UserError
from ..models import mask_model
from . import checkpoint as ckpt
from .config import TrainConfig
from .data import DataInfo


def build_model(config: TrainConfig, info: DataInfo) -> nn.Module:
    """``timm.create_model`` with the config's masking and the data's classes/channels (never pretrained)."""
    kwargs: dict[str, Any] = dict(num_classes=info.num_classes, in_chans=info.in_chans)
    if info.img_size and config.img_size and config.img_size != info.img_size:
        raise UserError(f"--img-size {config.img_size} does not apply to {info.name}, whose images are "
                        f"{info.img_size}x{info.img_size}; drop it")
    if info.img_size or config.img_size:
        kwargs["img_size"] = info.img_size or config.img_size
    masking: dict[str, Any] = {}
    if config.scheme is not None:
        masking["scheme"] = config.scheme
    if config.mask_size is not None:
        masking["mask_size"] = config.mask_size
    if config.drop_path:
        kwargs["drop_path_rate"] = config.drop_path
    kwargs.update(config.model_kwargs)
    check_model_name(config.model)
    ours = is_mait_model(config.model)
    try:
        model = timm.create_model(config.model, pretrained=False, **kwargs, **(masking if ours else {}))
    except TypeError as error:
        raise UserError(f"model {config.model} rejects its arguments {dict(kwargs, **masking)}: {error}") from None
    if masking and not ours:       # a timm ViT: the masks go onto the model as built (mait.mask_model)
        model = mask_model(model, **masking)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None and "img_size" in kwargs and kwargs["img_size"] < max(patch):
        remedy = "mait_nano4_8 for the digits" if info.img_size else "or set a larger --img-size"
        raise UserError(f"model {config.model} cuts {patch[0]}x{patch[1]} patches, larger than the "
                        f"{kwargs['img_size']}x{kwargs['img_size']} images of {info.name}; choose a model with "
                        f"smaller patches ({remedy})")
    return model


def is_mait_model(name: str) -> bool:
    """Whether ``name`` is one of mait's registered models (which take the masking arguments themselves)."""
    return timm.models.model_entrypoint(name).__module__.startswith("mait.")


def check_model_name(name: str) -> None:
    """A one-line error, with the closest names, unless ``name`` is a timm model (ours included)."""
    if not timm.is_model(name):
        import difflib
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise UserError(f"unknown model {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else
                                                     "; see timm.list_models('*mait*')"))


class DistillationLoss(nn.Module):
    """DeiT hard distillation: ``(1-λ)·base(cls head) + λ·CE(dist head, teacher argmax)``.

    A model without a distillation token gives one output, used for both terms (hard
    distillation on the class token, as when fine-tuning a sparse model from its dense teacher).
    """

    def __init__(self, base: nn.Module, teacher: nn.Module, alpha: float) -> None:
        super().__init__()
        self.base, self.teacher, self.alpha = base, teacher, alpha

    def forward(self, images: torch.Tensor, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        cls_out, dist_out = outputs if isinstance(outputs, (tuple, list)) else (outputs, outputs)
        with torch.no_grad():
            teacher_labels = self.teacher(images).argmax(dim=1)
        return (1 - self.alpha) * self.base(cls_out, targets) + self.alpha * F.cross_entropy(dist_out, teacher_labels)


def build_criterion(config: TrainConfig, mixup_on: bool) -> nn.Module:
    if mixup_on:
        return SoftTargetCrossEntropy()          # mixup already smooths the targets
    if config.smoothing > 0:
        return LabelSmoothingCrossEntropy(config.smoothing)
    return nn.CrossEntropyLoss()


def build_teacher(config: TrainConfig, info: DataInfo, model: nn.Module) -> Optional[nn.Module]:
    if config.teacher is None:
        return None
    if not config.teacher_checkpoint:
        raise UserError("--teacher needs --teacher-checkpoint (a .safetensors of the trained teacher)")
    teacher_config = TrainConfig.from_dict({"model": config.teacher, "scheme": None, "mask_size": None,
                                            "model_kwargs": config.teacher_kwargs, "drop_path": 0.0}, base=config)
    teacher = build_model(teacher_config, info)
    ckpt.load_weights(teacher, Path(config.teacher_checkpoint))
    return teacher.eval().requires_grad_(False)
