""" H-MaiT: hierarchical MaiT (Swin's hierarchy with masked attention over the whole stage grid)

From "MaiT: Leverage Attention Masks for More Efficient Image Transformers",
Ling Li, Ali Shafiee Ardestani, Joseph Hassoun, arXiv 2207.03006 (§5.4, Tables 5 and 7).

H-MaiT keeps Swin's layout (patch 4, embed 96, patch merging between stages, depths
[2, 2, 6, 2] or [2, 2, 18, 2], heads [3, 6, 12, 24]) and replaces shifted-window attention
by :class:`mait.MaskedAttention` over the whole stage grid (56², 28², 14², 7² tokens at
224 px, no prefix token).  By default the first ``[3, 6, 4, 0]`` heads of every block of
each stage are hard-masked (``R x R`` window, docs/semantics.md), the rest attend globally.

Positions: Swin's relative position bias is window-local and has no meaning once attention
spans the stage grid, so it is dropped.  H-MaiT adds one learned absolute position
embedding to the stage-1 tokens (``patch_embed.pos_embed``, ``(1, 56, 56, 96)``,
truncated-normal init, no weight decay), as ViT/DeiT do; later stages inherit positions
through patch merging, and masked heads are local by construction.

Parameter names follow timm's Swin (``layers.i.blocks.j.attn.qkv`` ...); the attention
layers carry no relative-position tables, so a Swin checkpoint loads (``pretrained_cfg_overlay=
dict(file=...)``) with everything but those tables and the position embedding, which keeps its initialisation.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, resample_abs_pos_embed_nhwc, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn as swin_checkpoint_filter_fn

from ..attention import MaskedAttention
from ..masks import check_mask_fits_grid, check_mask_size, to_grid
from ..schemes import MaskingScheme, resolve_scheme
from ._masking import (MAIT_ONLY_KEYS, alpha_no_weight_decay, check_image_size, fit_position_embedding,
                       with_mait_only_parameters)
from .mait import _cfg

__all__ = ["HMaiT", "HMaiTBlock", "PositionalPatchEmbed"]


class PositionalPatchEmbed(PatchEmbed):
    """Swin's patch embedding (``(B, H, W, C)`` out) plus H-MaiT's learned absolute position embedding.

    The position embedding (``(1, H, W, C)`` for the built grid, truncated-normal init) is part of the
    embedding step, so every path through the model (``forward_features``, ``forward_intermediates``,
    ``features_only``) adds it; on another grid it is resampled like timm's ViT position embeddings.
    """

    def __init__(self, *args: Any, embed_dim: int = 768, **kwargs: Any) -> None:
        super().__init__(*args, embed_dim=embed_dim, **kwargs)
        self.pos_embed = nn.Parameter(torch.zeros(1, *self.grid_size, embed_dim))
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return x + resample_abs_pos_embed_nhwc(self.pos_embed, [x.shape[1], x.shape[2]])

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None,
                       patch_size: Optional[Union[int, Tuple[int, int]]] = None) -> None:
        old_grid = self.grid_size
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        if self.grid_size != old_grid:
            self.pos_embed = nn.Parameter(resample_abs_pos_embed_nhwc(self.pos_embed.detach(), list(self.grid_size)))


class HMaiTBlock(nn.Module):
    """Pre-norm transformer block on a ``(B, H, W, C)`` stage grid with masked global attention.

    Norms, MLP and drop-path are taken over from a Swin block (same names and init); the
    window attention is replaced by ``attn``, which works on the grid of each input.
    """

    def __init__(self, swin_block: nn.Module, attn: MaskedAttention) -> None:
        super().__init__()
        self.norm1 = swin_block.norm1
        self.attn = attn
        self.drop_path1 = swin_block.drop_path1
        self.norm2 = swin_block.norm2
        self.mlp = swin_block.mlp
        self.drop_path2 = swin_block.drop_path2

    def set_input_size(self, feat_size: Tuple[int, int], window_size: Any = None,
                       always_partition: Optional[bool] = None) -> None:
        """Swin's stage interface: the block's grid becomes ``feat_size`` (H-MaiT has no windows)."""
        self.attn.set_grid(feat_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        x = x.reshape(batch, height * width, channels)
        x = x + self.drop_path1(self.attn(self.norm1(x), grid_size=(height, width)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x.reshape(batch, height, width, channels)


def _stage_scheme(masked_heads: Sequence[int], depths: Sequence[int]) -> str:
    """Scheme text giving the first ``masked_heads[i]`` heads of every block of stage ``i`` a hard mask."""
    groups, start = [], 0
    for masked, depth in zip(masked_heads, depths):
        if masked:
            span = str(start) if depth == 1 else f"{start}-{start + depth - 1}"
            groups.append(f"{span}:{masked}h")
        start += depth
    return ",".join(groups)


def stage_grids(patch_grid: Sequence[int], num_stages: int) -> list[tuple[int, int]]:
    """The token grid of each stage: the patch grid, then halved (rounded up, as Swin pads) per merging."""
    grids, grid = [], tuple(patch_grid)
    for index in range(num_stages):
        if index:
            grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
        grids.append(grid)
    return grids


class HMaiT(SwinTransformer):
    """Hierarchical MaiT: timm's ``SwinTransformer`` with masked attention over each stage grid.

    Args (beyond timm's ``SwinTransformer``; ``window_size`` is ignored):
        masked_heads: hard-masked heads per stage (the paper's ``[3, 6, 4, 0]``).
        scheme: a scheme over all blocks in order (name or text, see :mod:`mait.schemes`);
            overrides ``masked_heads`` (e.g. ``"none"`` for global attention everywhere).
        mask_size: odd window size R (3 in the paper).
        soft_alpha_init, mask_seed, attention_mode, attention_backend: as in :class:`mait.MaiT`.

    Like Swin, ``dynamic_img_size=True`` takes any multiple of the patch size (odd stage grids
    are padded by patch merging) and ``set_input_size`` moves the model to another size; the
    position embedding is resampled to the grid.
    """

    def __init__(self, *, masked_heads: Sequence[int] = (3, 6, 4, 0), scheme: Optional[Union[str, MaskingScheme]] = None,
                 mask_size: int = 3, soft_alpha_init: float = 0.5, mask_seed: int = 0, attention_mode: str = "zero",
                 attention_backend: str = "auto", **kwargs: Any) -> None:
        kwargs.pop("window_size", None)
        if kwargs.pop("dynamic_img_size", False):     # Swin's spelling of it (older timm releases know only this)
            kwargs["strict_img_size"] = False
        check_image_size(kwargs.get("img_size", 224), kwargs.get("patch_size", 4))
        super().__init__(embed_layer=PositionalPatchEmbed, **kwargs)
        depths = [len(stage.blocks) for stage in self.layers]
        heads = [stage.blocks[0].attn.num_heads for stage in self.layers]
        if len(masked_heads) != len(depths) or any(not 0 <= m <= h for m, h in zip(masked_heads, heads)):
            raise ValueError(f"masked_heads must give 0..heads masked heads for each of the {len(depths)} stages "
                             f"(heads {heads}), got {list(masked_heads)}")
        self.mask_size = check_mask_size(mask_size)
        per_layer_heads = [h for h, d in zip(heads, depths) for _ in range(d)]
        self.scheme = resolve_scheme(_stage_scheme(masked_heads, depths) if scheme is None else scheme,
                                     sum(depths), per_layer_heads)
        index = 0
        for stage, grid in zip(self.layers, stage_grids(self.patch_embed.grid_size, len(self.layers))):
            blocks = []
            for block in stage.blocks:
                attn = MaskedAttention(block.attn.qkv.in_features, block.attn.num_heads, grid_size=grid,
                                       mask_size=mask_size, num_prefix_tokens=0, head_kinds=self.scheme.layer(index),
                                       soft_alpha_init=soft_alpha_init, mask_seed=mask_seed + index,
                                       mode=attention_mode, backend=attention_backend,
                                       qkv_bias=block.attn.qkv.bias is not None)
                attn.qkv, attn.proj = block.attn.qkv, block.attn.proj   # Swin-initialised, same names
                blocks.append(HMaiTBlock(block, attn))
                index += 1
            stage.blocks = nn.Sequential(*blocks)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {"patch_embed.pos_embed"} | alpha_no_weight_decay(self)

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None,
                       patch_size: Optional[Union[int, Tuple[int, int]]] = None, **window_args: Any) -> None:
        """Move the model to another image (or patch) size; refused, before anything changes, where a stage's
        grid cannot hold its masks.  Swin's window arguments are accepted and have no effect."""
        new_img = to_grid(img_size) if img_size is not None else self.patch_embed.img_size
        new_patch = to_grid(patch_size) if patch_size is not None else self.patch_embed.patch_size
        check_image_size(new_img, new_patch)
        grids = stage_grids((new_img[0] // new_patch[0], new_img[1] // new_patch[1]), len(self.layers))
        index = 0
        for stage, grid in zip(self.layers, grids):
            for _ in stage.blocks:
                if self.scheme.num_masked(index):
                    check_mask_fits_grid(self.mask_size, grid)
                index += 1
        super().set_input_size(img_size=img_size, patch_size=patch_size)


def _from_swin(state_dict: dict[str, torch.Tensor], model: HMaiT) -> dict[str, torch.Tensor]:
    """timm's Swin conversions, without Swin's window-local relative-position tables (H-MaiT has none), and the
    position embedding fitted to the model's grid."""
    state_dict = {key: value for key, value in state_dict.items() if not key.endswith("relative_position_bias_table")}
    return fit_position_embedding(swin_checkpoint_filter_fn(state_dict, model), model)


# Swin (or H-MaiT) checkpoints: H-MaiT's position embedding and soft heads' α start from their initialisation
# where the checkpoint has none; every other key loads strictly.
swin_checkpoint_filter = with_mait_only_parameters(_from_swin, MAIT_ONLY_KEYS + ("pos_embed",))


def _create_hmait(variant: str, pretrained: bool = False, **kwargs: Any) -> HMaiT:
    rate = kwargs.pop("token_keep_rate", 1.0)
    if rate != 1.0 or kwargs.pop("token_prune_layers", None) is not None:
        raise ValueError(f"H-MaiT cannot prune tokens (token_keep_rate={rate}): its shifted windows and patch merging "
                         f"need the whole patch grid; prune tokens on a monolithic MaiT (mait_t12_224, mait_s24_224, "
                         f"Masked CaiT) or a mask_model'ed ViT")
    return build_model_with_cfg(
        HMaiT, variant, pretrained,
        pretrained_filter_fn=swin_checkpoint_filter,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


default_cfgs = generate_default_cfgs({
    "hmait_tiny_224": _cfg(classifier="head.fc", pool_size=(7, 7)),
    "hmait_small_224": _cfg(classifier="head.fc", pool_size=(7, 7)),
})


@register_model
def hmait_tiny_224(pretrained: bool = False, **kwargs: Any) -> HMaiT:
    """H-MaiT-T (Tables 5, 7): Swin-T layout, hard-masked heads per stage [3, 6, 4, 0]."""
    args = dict(patch_size=4, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2)
    return _create_hmait("hmait_tiny_224", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def hmait_small_224(pretrained: bool = False, **kwargs: Any) -> HMaiT:
    """H-MaiT-S (Tables 5, 7): Swin-S layout, hard-masked heads per stage [3, 6, 4, 0]."""
    args = dict(patch_size=4, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3)
    return _create_hmait("hmait_small_224", pretrained=pretrained, **dict(args, **kwargs))
