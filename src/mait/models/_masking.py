"""Shared plumbing: turn the attention layers of a timm model into masked ones, per a scheme."""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..attention import MaskedAttention
from ..masks import check_mask_size, max_useful_mask_size, to_grid
from ..schemes import HeadsSpec, MaskingScheme, resolve_scheme

# Parameters a masked model adds to its timm base: soft heads' α and learned heads' connectivity predictor.
MAIT_ONLY_KEYS = (".attn.alpha_logit", ".attn.predictor.")


def with_mait_only_parameters(filter_fn: Callable[[dict, nn.Module], dict],
                              own_keys: tuple[str, ...] = MAIT_ONLY_KEYS) -> Callable[[dict, nn.Module], dict]:
    """A pretrained-checkpoint filter for a masked model: ``filter_fn`` (timm's conversions for the base
    architecture), then the model's initial values for the parameters the base lacks (keys containing one
    of ``own_keys``) where the checkpoint has none.  Filling those in keeps the load strict for every other
    key, so a checkpoint of another architecture fails loudly instead of leaving layers at their random
    initialisation."""

    def filter_checkpoint(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        state_dict = filter_fn(state_dict, model)
        for key, value in model.state_dict().items():
            if any(part in key for part in own_keys):
                state_dict.setdefault(key, value)
        return state_dict

    return filter_checkpoint


def check_image_size(img_size: Union[int, Sequence[int]], patch_size: Union[int, Sequence[int]]) -> None:
    """Masks live on the patch grid, so the image must tile exactly into patches."""
    img = to_grid(img_size)
    patch = to_grid(patch_size)
    if img[0] % patch[0] or img[1] % patch[1]:
        raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}; "
                         f"use a multiple of the patch size (e.g. {img[0] // patch[0] * patch[0] or patch[0]})")


def apply_masking(blocks: Iterable[nn.Module], *, scheme: Union[str, MaskingScheme], depth: int,
                  num_heads: HeadsSpec, grid_size: Sequence[int], num_prefix_tokens: int, mask_size: int = 3,
                  soft_alpha_init: float = 0.5, mask_seed: int = 0, attention_mode: str = "zero",
                  attention_backend: str = "auto", keep_rate: Optional[float] = None,
                  learned_mode: str = "neg_inf", wrap: Callable[..., nn.Module] = MaskedAttention.from_attention) -> MaskingScheme:
    """Replace ``block.attn`` of every block by a masked layer configured from ``scheme``.

    Unmasked layers are converted too (their α is 1 and they run plain SDPA), so every layer
    exposes the same ``alpha`` / ``head_kinds`` / ``capture_attention`` interface.  Learned
    (``l``) heads get a connectivity predictor keeping ``keep_rate`` of the keys (a model that
    passes no ``keep_rate`` cannot hold learned heads).
    """
    resolved = resolve_scheme(scheme, depth, num_heads)
    check_mask_size(mask_size)
    limit = max_useful_mask_size(grid_size)
    if mask_size > limit and any(resolved.num_masked(i) for i in range(depth)):
        raise ValueError(f"mask_size {mask_size} is larger than the {grid_size[0]}x{grid_size[1]} patch grid needs "
                         f"(R = {limit} already covers it, so masked heads would be unmasked); use R <= {limit}")
    learned = dict(keep_rate=keep_rate, learned_mode=learned_mode) if resolved.has_learned else {}
    if resolved.has_learned and keep_rate is None:
        raise ValueError(f"scheme {str(resolved)!r} has learned heads ('l'), but this model builds no connectivity "
                         f"predictor; use a MaiT / Sparsifiner model (keep_rate=...)")
    for index, block in enumerate(blocks):
        block.attn = wrap(block.attn, grid_size=tuple(grid_size), mask_size=mask_size,
                          num_prefix_tokens=num_prefix_tokens, head_kinds=resolved.layer(index),
                          soft_alpha_init=soft_alpha_init, mask_seed=mask_seed + index, mode=attention_mode,
                          backend=attention_backend, **learned)
    return resolved


def alpha_no_weight_decay(model: nn.Module) -> set[str]:
    """Names of the soft-mask α parameters (excluded from weight decay like LayerScale/pos-embed)."""
    return {name for name, _ in model.named_parameters() if name.endswith("alpha_logit")}


def check_input_size(x: torch.Tensor, img_size: Sequence[int]) -> None:
    if tuple(x.shape[-2:]) != tuple(img_size):
        raise ValueError(f"input images are {tuple(x.shape[-2:])} but the model was built for img_size "
                         f"{tuple(img_size)}; resize them or create the model with img_size={tuple(x.shape[-2:])}")
