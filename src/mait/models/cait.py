""" Masked CaiT (paper Table 7)

CaiT ("Going deeper with Image Transformers", Touvron et al. 2021) with local attention
masks in its self-attention layers.  Those layers see only the patch tokens (CaiT adds the
class token in its class-attention layers), so the masks have no prefix tokens; the
class-attention layers stay unmasked.  CaiT uses talking-heads attention: the mask is
applied to each head's logits *after* the pre-softmax head mixing (``proj_l``), i.e. to the
logits that actually enter the softmax, as in Eq. 2 of the MaiT paper.
Parameter names are timm's, so ``cait_*`` checkpoints load.

Token pruning (``token_keep_rate``, ``token_prune_layers``; docs/sparsity.md) drops patch tokens in
the self-attention layers, and the class-attention layers attend to the kept ones.  With no class
token in those layers, a patch's score is the attention it receives: the layer's attention
probabilities (masks applied, before the talking-heads mixing) averaged over the heads and the
patch queries present.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Set, Union

import torch
from timm.layers import register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.cait import Cait, checkpoint_filter_fn

from ..attention import MaskedAttention
from ..backends.reference import masked_scores
from ..masks import GridSize
from ..schemes import HeadKind, MaskingScheme
from ..tokens import check_token_keep_rate, prune_layers, prune_tokens, token_positions
from ._masking import (alpha_no_weight_decay, apply_masking, check_image_size, check_no_checkpointing,
                       fit_position_embedding, with_mait_only_parameters)
from .mait import _NO_DENSE_MAP, _cfg, check_features_only

__all__ = ["MaskedCait", "MaskedTalkingHeadAttn"]


@register_notrace_module
class MaskedTalkingHeadAttn(MaskedAttention):
    """CaiT's talking-heads attention with per-head α masks (dense: heads mix after softmax).  Among the tokens
    token pruning leaves (``token_index``), a kept patch's window is its window on the original grid; with
    ``score_tokens`` the call leaves the attention each patch receives in ``token_scores`` ``(B, n)``."""

    _reused_modules = ("qkv", "attn_drop", "proj", "proj_l", "proj_w", "proj_drop")

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                grid_size: Optional[GridSize] = None) -> torch.Tensor:
        self._begin_call(x, attn_mask, is_causal, grid_size)
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = self.proj_l((q @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if not self.unmasked:
            keep = self.keep_mask(x.device) if self.token_index is None else \
                self.pruned_keep(token_positions(self.token_index, self.num_prefix_tokens))
            attn = masked_scores(attn, keep, self.alpha, self.mode)
        attn = attn.softmax(dim=-1)
        if self.score_tokens:
            self.token_scores = attn.detach().mean(dim=(1, 2))
        if self.capture_attention:
            self.last_attention = attn.detach()
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(batch, tokens, channels)
        return self.proj_drop(self.proj(x))


class MaskedCait(Cait):
    """timm ``Cait`` whose self-attention layers are masked per ``scheme`` (default Sch.1)."""

    token_keep_rate: float = 1.0
    token_prune_layers: tuple[int, ...] = ()
    token_index: Optional[torch.Tensor] = None

    def __init__(self, *, scheme: Union[str, MaskingScheme] = "sch1", mask_size: int = 3,
                 soft_alpha_init: float = 0.5, mask_seed: int = 0, attention_mode: str = "zero",
                 token_keep_rate: float = 1.0, token_prune_layers: Optional[Sequence[int]] = None,
                 **kwargs: Any) -> None:
        if kwargs.pop("dynamic_img_size", False):
            raise ValueError("timm's CaiT runs at the image size it was built for (no dynamic_img_size), and so does "
                             "Masked CaiT; build it with img_size=...")
        check_image_size(kwargs.get("img_size", 224), kwargs.get("patch_size", 16))
        kwargs.pop("attention_backend", None)  # talking heads always run densely
        super().__init__(**kwargs)
        self.install_masks(scheme=scheme, mask_size=mask_size, soft_alpha_init=soft_alpha_init, mask_seed=mask_seed,
                           attention_mode=attention_mode)
        self.set_token_pruning(token_keep_rate, token_prune_layers)

    def install_masks(self, *, scheme: Union[str, MaskingScheme], mask_size: int = 3, soft_alpha_init: float = 0.5,
                      mask_seed: int = 0, attention_mode: str = "zero") -> None:
        """Replace every self-attention layer by a masked one per ``scheme`` (keeping its weights); the
        class-attention layers stay as they are."""
        self.scheme = apply_masking(
            self.blocks, scheme=scheme, depth=len(self.blocks), num_heads=self.blocks[0].attn.num_heads,
            grid_size=self.patch_embed.grid_size, num_prefix_tokens=0, mask_size=mask_size,
            soft_alpha_init=soft_alpha_init, mask_seed=mask_seed, attention_mode=attention_mode,
            wrap=MaskedTalkingHeadAttn.from_attention)
        self.mask_size = mask_size

    def set_token_pruning(self, keep_rate: float = 1.0, layers: Optional[Sequence[int]] = None) -> None:
        """Prune patch tokens after the self-attention ``layers`` (default: the release's 3, 6, 9 of 12 scaled to
        the depth) keeping ``keep_rate`` of them at each (1.0: no pruning)."""
        keep_rate = check_token_keep_rate(keep_rate)
        if keep_rate < 1.0 and any(block.attn.mode == "neg_inf" and HeadKind.RANDOM in block.attn.head_kinds
                                   for block in self.blocks):
            raise ValueError(f"token pruning (token_keep_rate={keep_rate:g}) can drop every key of a random-mask "
                             f"head's row under attention_mode='neg_inf' (CaiT's self-attention has no class token "
                             f"to fall back on); use attention_mode='zero' or hard heads")
        self.token_keep_rate, self.token_prune_layers = keep_rate, prune_layers(layers, len(self.blocks))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.token_index = None
        if self.token_keep_rate >= 1.0:
            return super().forward_features(x)
        check_no_checkpointing(self)
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        patches, index, stage = x.shape[1], None, 0
        for number, block in enumerate(self.blocks):
            prune = number in self.token_prune_layers
            block.attn.token_index, block.attn.score_tokens = index, prune
            try:    # a prune layer drops tokens right after its attention: its MLP (per token) runs on the kept ones
                x = x + block.drop_path(block.gamma_1 * block.attn(block.norm1(x))) if prune else block(x)
            finally:
                block.attn.token_index, block.attn.score_tokens = None, False
            if prune:
                stage += 1
                scores, block.attn.token_scores = block.attn.token_scores, None
                x, index = prune_tokens(x, scores, index, patches, self.token_keep_rate, stage, 0)
                x = x + block.drop_path(block.gamma_2 * block.mlp(block.norm2(x)))
        self.token_index = index
        if self.blocks_token_only is not None:
            x = self.forward_cls(x)
        return self.norm(x)

    def forward_intermediates(self, *args: Any, **kwargs: Any) -> Any:
        if self.token_keep_rate < 1.0:
            raise ValueError(_NO_DENSE_MAP.format(what="forward_intermediates()", rate=self.token_keep_rate))
        return super().forward_intermediates(*args, **kwargs)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return super().no_weight_decay() | alpha_no_weight_decay(self)


def _create_masked_cait(variant: str, pretrained: bool = False, **kwargs: Any) -> MaskedCait:
    check_features_only(kwargs)
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        MaskedCait, variant, pretrained,
        pretrained_filter_fn=with_mait_only_parameters(
            lambda state_dict, model: fit_position_embedding(checkpoint_filter_fn(state_dict, model), model)),
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


default_cfgs = generate_default_cfgs({
    "mait_cait_xxs24_224": _cfg(crop_pct=1.0),
    "mait_cait_s24_224": _cfg(crop_pct=1.0),
})


@register_model
def mait_cait_xxs24_224(pretrained: bool = False, **kwargs: Any) -> MaskedCait:
    """Masked CaiT-XXS24 (Table 7 "Masked CaiT"): CaiT-XXS24 with Sch.1 masks."""
    args = dict(patch_size=16, embed_dim=192, depth=24, num_heads=4, init_values=1e-5)
    return _create_masked_cait("mait_cait_xxs24_224", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def mait_cait_s24_224(pretrained: bool = False, **kwargs: Any) -> MaskedCait:
    """Masked CaiT-S24 (Table 7 "Masked CaiT-S"): CaiT-S24 with Sch.1 masks."""
    args = dict(patch_size=16, embed_dim=384, depth=24, num_heads=8, init_values=1e-5)
    return _create_masked_cait("mait_cait_s24_224", pretrained=pretrained, **dict(args, **kwargs))
