"""Masks for any timm ViT (the paper's "model-agnostic"): :func:`mask_model` turns a timm
VisionTransformer-family model into a masked one in place, keeping its weights."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch.nn as nn
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Attention, VisionTransformer

from ..schemes import MaskingScheme
from ._masking import check_image_size
from .mait import MaiT, MaiTDistilled, MaskedViTMixin

__all__ = ["mask_model"]

# The masked class of each timm ViT class; subclasses of VisionTransformer get one made on first use.
_MASKED_CLASSES: dict[type, type] = {VisionTransformer: MaiT, VisionTransformerDistilled: MaiTDistilled}


def masked_class(cls: type) -> type:
    """The class a masked ``cls`` model becomes: MaiT for timm's ViT, MaiTDistilled for the distilled DeiT,
    ``Masked<cls>`` (mait's mixin over ``cls``) for other VisionTransformer subclasses."""
    if cls not in _MASKED_CLASSES:
        _MASKED_CLASSES[cls] = type(f"Masked{cls.__name__}", (MaskedViTMixin, cls), {
            "__module__": __name__, "__doc__": f"timm's {cls.__name__} with mait's masked attention (mask_model)."})
    return _MASKED_CLASSES[cls]


def mask_model(model: nn.Module, scheme: Union[str, MaskingScheme] = "sch1", *, mask_size: int = 3,
               soft_alpha_init: float = 0.5, mask_seed: int = 0, attention_mode: str = "zero",
               attention_backend: str = "auto", token_keep_rate: float = 1.0,
               token_prune_layers: Optional[Sequence[int]] = None) -> nn.Module:
    """Give a timm ViT mait's masked attention heads, in place, keeping its weights; returns the model.

    ``model`` is a timm ``VisionTransformer`` or subclass (ViT, DeiT and distilled DeiT, DeiT-III, ...)
    whose blocks use timm's ``Attention`` on the patch grid.  Every block's attention becomes a
    :class:`mait.MaskedAttention` configured by ``scheme`` (see :mod:`mait.schemes`; ``"none"`` leaves the
    logits unchanged), and the model becomes the matching MaiT class (``mask_model(deit_tiny, "sch1")``
    computes what ``mait_t12_224`` with ``scheme="sch1"`` and the same weights computes).  A model built with
    ``dynamic_img_size=True`` stays dynamic.  The other arguments are those of :class:`mait.MaiT` (token
    pruning included: ``token_keep_rate``, ``token_prune_layers``); soft heads start at ``soft_alpha_init``.  Anything else is a one-line error naming what can be masked.
    """
    kind = type(model).__name__
    if isinstance(model, MaskedViTMixin):
        raise ValueError(f"{kind} is already masked (scheme {str(model.scheme)!r}); mask the unmasked timm model")
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"mask_model masks timm VisionTransformer-family models (ViT, DeiT, DeiT-III: blocks with "
                         f"timm's Attention on a patch grid), not {kind}; for a Swin layout use hmait_tiny_224 or "
                         f"hmait_small_224, for CaiT mait_cait_xxs24_224 or mait_cait_s24_224")
    for index, block in enumerate(model.blocks):
        attention = getattr(block, "attn", None)
        if type(attention) is not Attention:
            raise ValueError(f"block {index} of {kind} attends with {type(attention).__name__}, not timm's Attention; "
                             f"mask_model masks ViTs whose blocks use timm's Attention (e.g. vit_*, deit_*, deit3_*)")
    if not model.patch_embed.dynamic_img_pad:
        check_image_size(model.patch_embed.img_size, model.patch_embed.patch_size)
    MaskedViTMixin.set_token_pruning(model, token_keep_rate, token_prune_layers)
    MaskedViTMixin.install_masks(model, scheme=scheme, mask_size=mask_size, soft_alpha_init=soft_alpha_init,
                                 mask_seed=mask_seed, attention_mode=attention_mode,
                                 attention_backend=attention_backend, keep_rate=None)
    model.__class__ = masked_class(type(model))
    return model
