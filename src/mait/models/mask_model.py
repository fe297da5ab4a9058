"""Masks for any timm ViT (the paper's "model-agnostic"): :func:`mask_model` turns a timm ViT-family model (ViT and
its subclasses, Eva, BEiT, CaiT) into a masked one in place, keeping its weights."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch.nn as nn
from timm.layers import AttentionRope
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Beit
from timm.models.cait import Cait, TalkingHeadAttn
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva, EvaAttention
from timm.models.vision_transformer import Attention, VisionTransformer

from ..schemes import MaskingScheme
from ..tokens import check_token_keep_rate, prune_layers
from ._masking import check_image_size
from .beit import MaskedBeitMixin
from .cait import MaskedCait
from .eva import MaskedEvaMixin
from .mait import MaiT, MaiTDistilled, MaskedViTMixin

__all__ = ["mask_model"]

# Each maskable timm family: its model class, the attention classes its blocks may use, and the mixin that masks it.
_FAMILIES: tuple[tuple[type, tuple[type, ...], type], ...] = (
    (VisionTransformer, (Attention,), MaskedViTMixin),
    (Eva, (EvaAttention, AttentionRope), MaskedEvaMixin),
    (Beit, (BeitAttention,), MaskedBeitMixin),
)
# The masked class of each timm class; other classes of a family get one made on first use.
_MASKED_CLASSES: dict[type, type] = {VisionTransformer: MaiT, VisionTransformerDistilled: MaiTDistilled}

# Why the other timm transformer families cannot be masked, and what to use instead.
_SWIN = "its window attention is local already (shifted windows); for a masked hierarchical model use hmait_tiny_224"
_REDUCED = ("its attention reads pooled or spatially reduced keys, not one key per patch of the query's grid, so a "
            "patch-window mask has no meaning there; mask a ViT, Eva or BEiT instead")
_REFUSED = {
    "Xcit": "cross-covariance attention attends across channels (a d x d map per head), so there is no "
            "token-to-token map to mask; mask a ViT, Eva or BEiT instead",
    "SwinTransformer": _SWIN, "SwinTransformerV2": _SWIN, "SwinTransformerV2Cr": _SWIN,
    "MaxxVit": "its block and grid attention is windowed already; for a masked hierarchical model use hmait_tiny_224",
    "VisionTransformerSAM": "its blocks attend in local windows already (with decomposed relative positions); "
                            "mask a ViT, Eva or BEiT instead",
    "ConVit": "its gated positional self-attention mixes a learned positional map into the softmax, which has no "
              "masked form in mait; mask a ViT instead",
    "Levit": _REDUCED, "PoolingVisionTransformer": _REDUCED, "Twins": _REDUCED, "PyramidVisionTransformerV2": _REDUCED,
    "MultiScaleVit": _REDUCED,
    "VOLO": "outlook attention is local already; mask a ViT, Eva or BEiT instead",
    "CrossVit": "its two branches attend across two patch grids of different sizes; mask a ViT instead",
}


def masked_class(cls: type, mixin: type = MaskedViTMixin) -> type:
    """The class a masked ``cls`` model becomes: MaiT for timm's ViT, MaiTDistilled for the distilled DeiT,
    ``Masked<cls>`` (``mixin`` over ``cls``) for the other classes of a family."""
    if cls not in _MASKED_CLASSES:
        _MASKED_CLASSES[cls] = type(f"Masked{cls.__name__}", (mixin, cls), {
            "__module__": __name__, "__doc__": f"timm's {cls.__name__} with mait's masked attention (mask_model)."})
    return _MASKED_CLASSES[cls]


def mask_model(model: nn.Module, scheme: Union[str, MaskingScheme] = "sch1", *, mask_size: int = 3,
               soft_alpha_init: float = 0.5, mask_seed: int = 0, attention_mode: str = "zero",
               attention_backend: str = "auto", token_keep_rate: float = 1.0,
               token_prune_layers: Optional[Sequence[int]] = None) -> nn.Module:
    """Give a timm ViT mait's masked attention heads, in place, keeping its weights; returns the model.

    ``model`` is one of timm's ViT families: ``VisionTransformer`` and its subclasses (ViT, DeiT and distilled
    DeiT, DeiT-III, DINOv2, ...), ``Eva`` (EVA-02, the rotary-position ViTs ``vit_*_rope_*``, DINOv3; masks act
    on the rotated q and k), ``Beit`` (BEiT, BEiT v2; the relative position bias stays inside the masked logits)
    or ``Cait`` (its self-attention layers masked as Masked CaiT's, the class-attention layers untouched).  Every
    block's attention becomes a :class:`mait.MaskedAttention` configured by ``scheme`` (see
    :mod:`mait.schemes`; ``"none"`` leaves the logits unchanged) and the model a masked class
    (``mask_model(deit_tiny, "sch1")`` computes what ``mait_t12_224`` with ``scheme="sch1"`` and the same weights
    computes, ``mask_model(cait_xxs24, "sch1")`` what ``mait_cait_xxs24_224`` computes).  A model built with
    ``dynamic_img_size=True`` stays dynamic.  The other arguments are those of :class:`mait.MaiT` (token
    pruning included, ``token_keep_rate`` and ``token_prune_layers``: a kept patch keeps its original position
    for its window, rotary embedding and relative position bias; on a CaiT, pruning as Masked CaiT's); soft
    heads start at ``soft_alpha_init``.  Anything else is a one-line error naming why and what to use instead.
    """
    kind = type(model).__name__
    if isinstance(model, (MaskedViTMixin, MaskedCait)):
        raise ValueError(f"{kind} is already masked (scheme {str(model.scheme)!r}); mask the unmasked timm model")
    if isinstance(model, Cait):
        return _mask_cait(model, scheme=scheme, mask_size=mask_size, soft_alpha_init=soft_alpha_init,
                          mask_seed=mask_seed, attention_mode=attention_mode, attention_backend=attention_backend,
                          token_keep_rate=token_keep_rate, token_prune_layers=token_prune_layers)
    family = next((family for family in _FAMILIES if isinstance(model, family[0])), None)
    if family is None:
        reason = _REFUSED.get(kind)
        if reason is not None:
            raise ValueError(f"mask_model cannot mask {kind}: {reason}")
        raise ValueError(f"mask_model masks timm's ViT families (VisionTransformer: ViT, DeiT, DeiT-III, DINOv2; "
                         f"Eva: EVA-02, vit_*_rope_*, DINOv3; Beit; Cait), not {kind}; for a Swin layout use "
                         f"hmait_tiny_224 or hmait_small_224")
    base, attention_classes, mixin = family
    for index, block in enumerate(model.blocks):
        attention = getattr(block, "attn", None)
        if type(attention) not in attention_classes:
            names = " or ".join(cls.__name__ for cls in attention_classes)
            raise ValueError(f"block {index} of {kind} attends with {type(attention).__name__}, not timm's {names}; "
                             f"mask_model masks {base.__name__} models whose blocks use it")
    if not getattr(model.patch_embed, "dynamic_img_pad", False):
        check_image_size(model.patch_embed.img_size, model.patch_embed.patch_size)
    if not hasattr(model, "has_class_token"):      # timm's Eva and BEiT: what token pruning ranks patches by
        model.has_class_token = getattr(model, "cls_token", None) is not None
    mixin.set_token_pruning(model, token_keep_rate, token_prune_layers)
    mixin.install_masks(model, scheme=scheme, mask_size=mask_size, soft_alpha_init=soft_alpha_init,
                        mask_seed=mask_seed, attention_mode=attention_mode, attention_backend=attention_backend,
                        keep_rate=None, wrap=mixin._wrap_attention)
    model.__class__ = masked_class(type(model), mixin)
    return model


def _mask_cait(model: Cait, *, attention_backend: str, token_keep_rate: float,
               token_prune_layers: Optional[Sequence[int]], **masking) -> MaskedCait:
    """timm's CaiT becomes a Masked CaiT (its talking-heads self-attention masked, class attention untouched;
    token pruning in the self-attention layers as Masked CaiT's)."""
    if type(model) is not Cait:
        raise ValueError(f"mask_model masks timm's Cait itself, not the subclass {type(model).__name__}")
    if attention_backend != "auto":
        raise ValueError(f"CaiT's talking heads mix the heads around the softmax, so its masked layers always run "
                         f"densely; attention_backend {attention_backend!r} does not apply (use 'auto')")
    for index, block in enumerate(model.blocks):
        if type(block.attn) is not TalkingHeadAttn:
            raise ValueError(f"block {index} of Cait attends with {type(block.attn).__name__}, not timm's "
                             f"TalkingHeadAttn; mask_model masks CaiTs built with it (cait_*)")
    check_image_size(model.patch_embed.img_size, model.patch_embed.patch_size)
    check_token_keep_rate(token_keep_rate)
    prune_layers(token_prune_layers, len(model.blocks))      # both checked before the model changes
    MaskedCait.install_masks(model, **masking)
    MaskedCait.set_token_pruning(model, token_keep_rate, token_prune_layers)
    model.__class__ = MaskedCait
    return model
