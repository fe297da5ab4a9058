""" MaiT: Masked attention image Transformer (monolithic, DeiT-based)

From "MaiT: Leverage Attention Masks for More Efficient Image Transformers",
Ling Li, Ali Shafiee Ardestani, Joseph Hassoun, arXiv 2207.03006.

MaiT is DeiT (patch 16, class token, optional distillation token, optional LayerScale)
whose attention heads carry local ``R x R`` masks: hard (non-neighbour logits set to 0),
soft (learnable α per head) or none, per layer as a :class:`mait.MaskingScheme` says.
Parameter names are timm's, so DeiT checkpoints load into a MaiT of the same shape.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn

from ..attention import MaskedAttention
from ..learned import BASIS_REDUCTION, BASIS_THRESHOLD, COEF_TOPK, predictor_options
from ..masks import check_mask_fits_grid, to_grid
from ..schemes import MaskingScheme, resolve_scheme
from ..tokens import check_token_keep_rate, prune_layers, prune_tokens
from ._masking import (PatchGrid, alpha_no_weight_decay, apply_masking, check_image_size, pruned_features,
                       with_mait_only_parameters)

__all__ = ["MaiT", "MaiTDistilled"]


class MaskedViTMixin:
    """Adds per-layer masked attention to a timm ``VisionTransformer`` (or a subclass such as the distilled one).

    The masks live on the patch grid.  A model built for one image size keeps its grid; with
    ``dynamic_img_size=True`` (any image size, as for timm's ViTs) each batch's grid is handed to
    the layers (:class:`PatchGrid`) and the position embedding is resampled by timm, and
    :meth:`set_input_size` moves the model to another size for good.  ``_wrap_attention`` builds the masked
    layer from a block's timm attention layer (subclasses for other timm attention classes replace it).

    With ``token_keep_rate=ρ < 1`` the model also prunes tokens (:mod:`mait.tokens`, docs/sparsity.md):
    after each of ``token_prune_layers`` (default: the release's 3, 6, 9 of 12 blocks, scaled to the
    depth) only the patch tokens the class token attends to most are kept, the ``j``-th keeping
    ``ceil(ρ^j · N)`` of the ``N`` patches, and the others are dropped from all later computation.
    Pruning is off in a training forward whose connectivity predictors learn (their ``"reconstruct"``
    or ``"joint"`` phase), as the release turns it off while they reconstruct attention.
    """

    _wrap_attention = staticmethod(MaskedAttention.from_attention)
    token_keep_rate: float = 1.0
    token_prune_layers: tuple[int, ...] = ()
    token_index: Optional[torch.Tensor] = None

    def __init__(self, *, scheme: Union[str, MaskingScheme] = "sch1", mask_size: int = 3,
                 soft_alpha_init: float = 0.5, mask_seed: int = 0, attention_mode: str = "zero",
                 attention_backend: str = "auto", keep_rate: Union[float, Sequence[float]] = 0.25,
                 learned_mode: str = "neg_inf", basis_reduction: int = BASIS_REDUCTION, sparse_basis: bool = True,
                 basis_threshold: float = BASIS_THRESHOLD, coef_topk: int = COEF_TOPK,
                 pos_embed_std: Optional[float] = None, token_keep_rate: float = 1.0,
                 token_prune_layers: Optional[Sequence[int]] = None, **kwargs: Any) -> None:
        check_image_size(kwargs.get("img_size", 224), kwargs.get("patch_size", 16))
        super().__init__(**kwargs)
        self.install_masks(scheme=scheme, mask_size=mask_size, soft_alpha_init=soft_alpha_init, mask_seed=mask_seed,
                           attention_mode=attention_mode, attention_backend=attention_backend, keep_rate=keep_rate,
                           learned_mode=learned_mode, predictor_options=predictor_options(
                               basis_reduction, sparse_basis, basis_threshold, coef_topk))
        self.set_token_pruning(token_keep_rate, token_prune_layers)
        if pos_embed_std is not None:      # e.g. pixel tokens, whose embedding is far larger than timm's 0.02
            nn.init.trunc_normal_(self.pos_embed, std=pos_embed_std)

    def set_token_pruning(self, keep_rate: float = 1.0, layers: Optional[Sequence[int]] = None) -> None:
        """Prune tokens after ``layers`` (default: the release's, scaled to the depth) keeping ``keep_rate`` of
        them at each (1.0: no pruning).  Needs a class token, whose attention scores the patches."""
        keep_rate = check_token_keep_rate(keep_rate)
        layers = prune_layers(layers, len(self.blocks))
        if keep_rate < 1.0 and not self.has_class_token:
            raise ValueError(f"token pruning (token_keep_rate={keep_rate:g}) ranks the patches by the class token's "
                             f"attention, and this model has no class token; use class_token=True")
        self.token_keep_rate, self.token_prune_layers = keep_rate, layers

    def prunes_tokens(self) -> bool:
        """Whether a forward now prunes tokens: ``token_keep_rate < 1`` and no connectivity predictor learning."""
        if self.token_keep_rate >= 1.0:
            return False
        return not (self.training and torch.is_grad_enabled() and
                    any(block.attn.predictor is not None and block.attn.predictor.phase != "frozen"
                        for block in self.blocks))

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        if not self.prunes_tokens():
            self.token_index = None
            if attn_mask is None and not is_causal:      # the call every timm family takes (BEiT's has no masks)
                return super().forward_features(x)
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        return pruned_features(self, self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x)))))

    def _pruned_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks with token pruning; the kept patches' grid positions ``(B, n)`` go to ``token_index``.

        A prune layer's class attention decides which tokens its block's output keeps, so in timm's ``Block``
        (pre-norm) the tokens are dropped right after the attention: the block's MLP, which works per token,
        already runs on the kept ones only (the same result for them as pruning after the block)."""
        prefix, patches = self.num_prefix_tokens, x.shape[1] - self.num_prefix_tokens
        index, stage = None, 0
        for number, block in enumerate(self.blocks):
            prune = number in self.token_prune_layers
            split = prune and type(block) is Block
            block.attn.token_index, block.attn.score_tokens = index, prune
            try:
                x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x)))) if split else block(x)
            finally:
                block.attn.token_index, block.attn.score_tokens = None, False
            if prune:
                stage += 1
                scores, block.attn.token_scores = block.attn.token_scores, None
                x, index = prune_tokens(x, scores, index, patches, self.token_keep_rate, stage, prefix)
            if split:
                x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        self.token_index = index
        return x

    def forward_intermediates(self, *args: Any, **kwargs: Any) -> Any:
        if self.token_keep_rate < 1.0:
            raise ValueError(_NO_DENSE_MAP.format(what="forward_intermediates()", rate=self.token_keep_rate))
        return super().forward_intermediates(*args, **kwargs)

    def install_masks(self, *, scheme: Union[str, MaskingScheme], mask_size: int = 3, soft_alpha_init: float = 0.5,
                      mask_seed: int = 0, attention_mode: str = "zero", attention_backend: str = "auto",
                      keep_rate: Union[float, Sequence[float], None] = 0.25, learned_mode: str = "neg_inf",
                      predictor_options: Optional[dict] = None,
                      wrap: Optional[Callable[..., nn.Module]] = None) -> None:
        """Replace every block's attention by a masked layer per ``scheme`` (keeping its weights), built by
        ``wrap`` (default: the class's ``_wrap_attention``)."""
        if getattr(self, "patch_drop", None) is not None and not isinstance(self.patch_drop, nn.Identity):
            raise ValueError("patch dropout removes tokens from the patch grid, which masked attention needs whole; "
                             "use patch_drop_rate=0")
        depth, heads = len(self.blocks), self.blocks[0].attn.num_heads
        if getattr(self, "dynamic_img_size", False) and resolve_scheme(scheme, depth, heads).has_learned:
            raise ValueError(_FIXED_SIZE_LEARNED.format(what="dynamic_img_size=True"))
        self.scheme = apply_masking(
            self.blocks, scheme=scheme, depth=depth, num_heads=heads, grid_size=self.patch_embed.grid_size,
            num_prefix_tokens=self.num_prefix_tokens, mask_size=mask_size, soft_alpha_init=soft_alpha_init,
            mask_seed=mask_seed, attention_mode=attention_mode, attention_backend=attention_backend,
            keep_rate=keep_rate, learned_mode=learned_mode, predictor_options=predictor_options,
            wrap=wrap or self._wrap_attention)
        self.mask_size = mask_size
        self.patch_grid = PatchGrid([block.attn for block in self.blocks])

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return super().no_weight_decay() | alpha_no_weight_decay(self)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_img_size:      # x is (B, H, W, C): this batch's patch grid
            x = self.patch_grid(x)
        return super()._pos_embed(x)

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None,
                       patch_size: Optional[Union[int, Tuple[int, int]]] = None) -> None:
        """Move the model to another image (or patch) size: timm resamples the position embedding, the
        masked layers take the new grid.  Refused, before anything changes, for a mask the new grid cannot
        hold and for learned heads (their predictor is built for one token count)."""
        if self.scheme.has_learned:
            raise ValueError(_FIXED_SIZE_LEARNED.format(what="set_input_size()"))
        new_img = to_grid(img_size) if img_size is not None else self.patch_embed.img_size
        new_patch = to_grid(patch_size) if patch_size is not None else self.patch_embed.patch_size
        check_image_size(new_img, new_patch)
        grid = (new_img[0] // new_patch[0], new_img[1] // new_patch[1])
        if any(self.scheme.num_masked(index) for index in range(len(self.blocks))):
            check_mask_fits_grid(self.mask_size, grid)
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        for block in self.blocks:
            block.attn.set_grid(self.patch_embed.grid_size)


_NO_DENSE_MAP = ("{what} returns a feature map of every patch, which token pruning (token_keep_rate={rate}) "
                 "drops; build the model with token_keep_rate=1.0 for feature extraction")

_FIXED_SIZE_LEARNED = ("{what} is not available with learned (Sparsifiner) heads: their connectivity predictor "
                       "holds per-token tables for one patch grid; build the model for the image size it runs at "
                       "(img_size=...)")


class MaiT(MaskedViTMixin, VisionTransformer):
    """Monolithic MaiT: a timm ``VisionTransformer`` with masked attention heads.

    Args (beyond timm's ``VisionTransformer``, whose ``dynamic_img_size`` and ``set_input_size``
    work as usual):
        scheme: built-in scheme name or scheme text (see :mod:`mait.schemes`).
        mask_size: odd window size R (3 in the paper).
        soft_alpha_init: initial α of soft-masked heads.
        mask_seed: seed of the random-mask control heads (``r``).
        attention_mode: ``"zero"`` (paper) or ``"neg_inf"`` (strict neighbourhood ablation).
        attention_backend: backend of :func:`mait.masked_attention` (``"auto"``).
        keep_rate: fraction of keys a learned (``l``) head keeps per patch query (see :mod:`mait.learned`),
            one for every layer or a list with one per layer.
        learned_mode: ``"neg_inf"`` (Sparsifiner) or ``"zero"`` (MaiT's semantics) for learned heads.
        basis_reduction, sparse_basis, basis_threshold, coef_topk: the learned heads' connectivity predictor:
            ``n = T // basis_reduction`` basis tokens, and the sparse basis that decides masks outside training
            (``sparse_basis=False``: mait's unpruned predictor); defaults as released (6, True, 0.02, 8).
        pos_embed_std: initialise the position embedding with this std instead of timm's 0.02.
        token_keep_rate: ``ρ``, the fraction of patch tokens each prune layer keeps (1.0: no token pruning).
        token_prune_layers: the blocks after which tokens are pruned (default: 3, 6, 9 scaled to the depth,
            ``l · depth // 12``).
    """


class MaiTDistilled(MaskedViTMixin, VisionTransformerDistilled):
    """MaiT with DeiT's distillation token and head (paper Table 6)."""


# DeiT (or MaiT) checkpoints: timm's ViT conversions; α and any predictor start from their initialisation.
deit_checkpoint_filter = with_mait_only_parameters(checkpoint_filter_fn)


def check_features_only(kwargs: dict) -> None:
    """``features_only`` needs every patch's feature map, which token pruning drops: a one-line error."""
    if kwargs.get("features_only") and kwargs.get("token_keep_rate", 1.0) != 1.0:
        raise ValueError(_NO_DENSE_MAP.format(what="features_only=True", rate=kwargs["token_keep_rate"]))


def _create_mait(variant: str, pretrained: bool = False, distilled: bool = False, **kwargs: Any):
    check_features_only(kwargs)
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        MaiTDistilled if distilled else MaiT,
        variant,
        pretrained,
        pretrained_filter_fn=deit_checkpoint_filter,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict:
    return {
        "url": "",
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": .9, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "apache-2.0", "paper_ids": "arXiv:2207.03006", "paper_name": "MaiT",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "mait_xt24_224": _cfg(),
    "mait_t24_224": _cfg(),
    "mait_xs24_224": _cfg(),
    "mait_s24_224": _cfg(),
    "mait_t12_224": _cfg(),
    "mait_s12_224": _cfg(),
    "mait_t36_224": _cfg(),
    "mait_xt24_distilled_224": _cfg(classifier=("head", "head_dist")),
})


def _model(variant: str, pretrained: bool, model_args: dict, kwargs: dict, distilled: bool = False):
    """Entry-point helper: user kwargs override the variant's defaults (scheme included)."""
    return _create_mait(variant, pretrained=pretrained, distilled=distilled, **dict(model_args, **kwargs))


@register_model
def mait_xt24_224(pretrained: bool = False, **kwargs: Any) -> MaiT:
    """MaiT-XT (Table 7): D=144, 3 heads, 24 layers, LayerScale, soft masking (Sch.3)."""
    args = dict(patch_size=16, embed_dim=144, depth=24, num_heads=3, init_values=1e-5, scheme="sch3")
    return _model("mait_xt24_224", pretrained, args, kwargs)


@register_model
def mait_t24_224(pretrained: bool = False, **kwargs: Any) -> MaiT:
    """MaiT-T (Tables 4, 7): D=192, 3 heads, 24 layers, soft masking (Sch.3)."""
    args = dict(patch_size=16, embed_dim=192, depth=24, num_heads=3, scheme="sch3")
    return _model("mait_t24_224", pretrained, args, kwargs)


@register_model
def mait_xs24_224(pretrained: bool = False, **kwargs: Any) -> MaiT:
    """MaiT-XS (Tables 5, 7): D=288, 3 heads, 24 layers, LayerScale, hard masking Sch.2."""
    args = dict(patch_size=16, embed_dim=288, depth=24, num_heads=3, init_values=1e-5, scheme="sch2")
    return _model("mait_xs24_224", pretrained, args, kwargs)


@register_model
def mait_s24_224(pretrained: bool = False, **kwargs: Any) -> MaiT:
    """MaiT-S (Tables 5, 7): D=384, 6 heads, 24 layers, LayerScale, hard masking Sch.2."""
    args = dict(patch_size=16, embed_dim=384, depth=24, num_heads=6, init_values=1e-5, scheme="sch2")
    return _model("mait_s24_224", pretrained, args, kwargs)


@register_model
def mait_t12_224(pretrained: bool = False, **kwargs: Any) -> MaiT:
    """MaiT-T, 12 layers (Table 3): DeiT-Tiny shape with soft masking in every layer."""
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, scheme="soft")
    return _model("mait_t12_224", pretrained, args, kwargs)


@register_model
def mait_s12_224(pretrained: bool = False, **kwargs: Any) -> MaiT:
    """MaiT-S, 12 layers (Table 3): DeiT-Small shape with soft masking in every layer."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, scheme="soft")
    return _model("mait_s12_224", pretrained, args, kwargs)


@register_model
def mait_t36_224(pretrained: bool = False, **kwargs: Any) -> MaiT:
    """MaiT-T, 36 layers (Fig. 3): mixed scheme, every head masked in layers 0-11, one head after."""
    args = dict(patch_size=16, embed_dim=192, depth=36, num_heads=3, scheme="mixed")
    return _model("mait_t36_224", pretrained, args, kwargs)


@register_model
def mait_xt24_distilled_224(pretrained: bool = False, **kwargs: Any) -> MaiTDistilled:
    """MaiT-XT† (Table 6): MaiT-XT with a distillation token and head, soft masking (Sch.3)."""
    args = dict(patch_size=16, embed_dim=144, depth=24, num_heads=3, init_values=1e-5, scheme="sch3")
    return _model("mait_xt24_distilled_224", pretrained, args, kwargs, distilled=True)
