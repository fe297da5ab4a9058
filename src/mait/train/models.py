"""What a run trains: the model, mait's or a timm ViT given mait's masks (the teacher and the losses are
in :mod:`.objectives`)."""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn

import mait  # noqa: F401  (registers the MaiT models in timm)

from ..errors import UserError
from ..models import mask_model
from .config import TrainConfig
from .data import DataInfo


# mait.mask_model's arguments: on a timm model these go to mask_model, not to timm.create_model.
MASKING_KEYS = ("scheme", "mask_size", "soft_alpha_init", "mask_seed", "attention_mode", "attention_backend",
                "token_keep_rate", "token_prune_layers")
TOKEN_PRUNING_KEYS = ("token_keep_rate", "token_prune_layers")


def split_masking(name: str, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(create, masking)``: the options of ``timm.create_model(name, ...)`` and those of ``mask_model``.

    mait's models take every option themselves (``masking`` empty).  For a timm ViT the masking arguments go
    to :func:`mait.mask_model`; token pruning asked without a scheme keeps every head unmasked
    (``scheme="none"``) rather than taking mask_model's default masks.
    """
    if is_mait_model(name):
        return dict(options), {}
    create = {key: value for key, value in options.items() if key not in MASKING_KEYS}
    masking = {key: value for key, value in options.items() if key in MASKING_KEYS}
    if "scheme" not in masking and any(key in masking for key in TOKEN_PRUNING_KEYS):
        masking["scheme"] = "none"
    return create, masking


def build_model(config: TrainConfig, info: DataInfo) -> nn.Module:
    """``timm.create_model`` with the config's masking and the data's classes/channels (never pretrained)."""
    kwargs: dict[str, Any] = dict(num_classes=info.num_classes, in_chans=info.in_chans)
    if info.img_size and config.img_size and config.img_size != info.img_size:
        raise UserError(f"--img-size {config.img_size} does not apply to {info.name}, whose images are "
                        f"{info.img_size}x{info.img_size}; drop it")
    if info.img_size or config.img_size:
        kwargs["img_size"] = info.img_size or config.img_size
    if config.scheme is not None:
        kwargs["scheme"] = config.scheme
    if config.mask_size is not None:
        kwargs["mask_size"] = config.mask_size
    if config.drop_path:
        kwargs["drop_path_rate"] = config.drop_path
    kwargs.update(config.model_kwargs)
    check_model_name(config.model)
    kwargs, masking = split_masking(config.model, kwargs)
    try:
        model = timm.create_model(config.model, pretrained=False, **kwargs)
    except TypeError as error:
        raise UserError(f"model {config.model} rejects its arguments {dict(kwargs, **masking)}: {error}") from None
    if masking:       # a timm ViT: the masks go onto the model as built (mait.mask_model)
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
