"""Shared plumbing: turn the attention layers of a timm model into masked ones, per a scheme, and route each
batch's patch grid to them."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
from timm.layers import register_notrace_module, resample_abs_pos_embed, resample_abs_pos_embed_nhwc

from ..attention import MaskedAttention
from ..masks import check_mask_size, to_grid
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


@contextmanager
def block_inputs(blocks: Sequence[nn.Module], inputs: Sequence[dict]) -> Iterator[None]:
    """Inside, every call of ``blocks[i]`` also gets the keywords ``inputs[i]``: what a timm family's
    ``forward_features`` hands its blocks (Eva's rotary embedding, BEiT's shared bias), for a loop that calls
    ``block(x)`` (token pruning's)."""
    handles = [block.register_forward_pre_hook(lambda module, args, kwargs, extra=extra: (args, {**kwargs, **extra}),
                                               with_kwargs=True) for block, extra in zip(blocks, inputs)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_no_checkpointing(model: nn.Module) -> None:
    """A token-pruning model refuses to train under gradient checkpointing, which cannot replay the pruning."""
    if model.grad_checkpointing and model.training:
        raise ValueError(f"gradient checkpointing cannot replay token pruning (token_keep_rate="
                         f"{model.token_keep_rate:g}); turn one of them off")


def pruned_features(model: nn.Module, x: torch.Tensor, inputs: Sequence[dict] = ()) -> torch.Tensor:
    """The blocks of a token-pruning model (:meth:`MaskedViTMixin._pruned_blocks`) on its embedded tokens ``x``,
    each block also given its ``inputs``, then the final norm."""
    check_no_checkpointing(model)
    with block_inputs(model.blocks, inputs):
        return model.norm(model._pruned_blocks(x))


def apply_masking(blocks: Iterable[nn.Module], *, scheme: Union[str, MaskingScheme], depth: int,
                  num_heads: HeadsSpec, grid_size: Sequence[int], num_prefix_tokens: int, mask_size: int = 3,
                  soft_alpha_init: float = 0.5, mask_seed: int = 0, attention_mode: str = "zero",
                  attention_backend: str = "auto", keep_rate: Union[float, Sequence[float], None] = None,
                  learned_mode: str = "neg_inf", predictor_options: Optional[dict] = None,
                  wrap: Callable[..., nn.Module] = MaskedAttention.from_attention) -> MaskingScheme:
    """Replace ``block.attn`` of every block by a masked layer configured from ``scheme``.

    Unmasked layers are converted too (their α is 1 and they run plain SDPA), so every layer
    exposes the same ``alpha`` / ``head_kinds`` / ``capture_attention`` interface.  Learned
    (``l``) heads get a connectivity predictor keeping ``keep_rate`` of the keys (one rate, or one
    per layer; a model that passes no ``keep_rate`` cannot hold learned heads) and built with
    ``predictor_options``.  A mask too large for the grid is an error raised by the layers
    (:meth:`mait.MaskedAttention.set_grid`).
    """
    resolved = resolve_scheme(scheme, depth, num_heads)
    check_mask_size(mask_size)
    if resolved.has_learned and keep_rate is None:
        raise ValueError(f"scheme {str(resolved)!r} has learned heads ('l'), but this model builds no connectivity "
                         f"predictor; use a MaiT / Sparsifiner model (keep_rate=...)")
    keep_rates = per_layer_keep_rates(keep_rate, depth)
    blocks = list(blocks)

    def learned(index: int) -> dict:
        if not resolved.has_learned:
            return {}
        return dict(keep_rate=keep_rates[index], learned_mode=learned_mode, predictor_options=predictor_options)

    masked = [wrap(block.attn, grid_size=tuple(grid_size), mask_size=mask_size, num_prefix_tokens=num_prefix_tokens,
                   head_kinds=resolved.layer(index), soft_alpha_init=soft_alpha_init, mask_seed=mask_seed + index,
                   mode=attention_mode, backend=attention_backend, **learned(index))
              for index, block in enumerate(blocks)]
    for block, layer in zip(blocks, masked):      # only once every layer is built: an error changes nothing
        block.attn = layer
    return resolved


def per_layer_keep_rates(keep_rate: Union[float, Sequence[float], None], depth: int) -> list:
    """One keep rate per layer: ``keep_rate`` repeated, or a sequence of exactly ``depth`` rates."""
    if isinstance(keep_rate, (list, tuple)):
        if len(keep_rate) != depth:
            raise ValueError(f"keep_rate lists {len(keep_rate)} per-layer rates but the model has {depth} layers")
        return list(keep_rate)
    return [keep_rate] * depth


def alpha_no_weight_decay(model: nn.Module) -> set[str]:
    """Names of the soft-mask α parameters (excluded from weight decay like LayerScale/pos-embed)."""
    return {name for name, _ in model.named_parameters() if name.endswith("alpha_logit")}


@register_notrace_module
class PatchGrid(nn.Module):
    """Hands the patch grid of each batch to a model's masked attention layers (dynamic image size).

    Called on the ``(B, H, W, C)`` patch embeddings before they are flattened into tokens, it
    sets ``(H, W)`` on every layer and returns its input unchanged.  It is an fx leaf, so a
    traced model keeps calling it and its layers follow the grid of every batch there too.
    The layers are referenced, not owned (they stay registered where they are).
    """

    def __init__(self, layers: Sequence[MaskedAttention]) -> None:
        super().__init__()
        self.layers = tuple(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = (int(x.shape[1]), int(x.shape[2]))
        for layer in self.layers:
            layer.set_grid(grid)
        return x

    def extra_repr(self) -> str:
        return f"layers={len(self.layers)}"


def fit_position_embedding(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Resample a checkpoint's absolute position embedding to ``model``'s patch grid, as timm does for ViTs.

    Token layouts ``(1, P + h*w, C)`` (ViT/DeiT/CaiT, ``P`` prefix positions, the checkpoint's grid square)
    and grid layouts ``(1, h, w, C)`` (H-MaiT, whose earlier checkpoints keep it as ``pos_embed``) are
    resampled bicubically; a checkpoint at the model's own size passes unchanged.  A token count that fits no square grid is a one-line error.
    """
    own_state = model.state_dict()
    if "patch_embed.pos_embed" in own_state and "pos_embed" in state_dict:   # H-MaiT's earlier key
        state_dict["patch_embed.pos_embed"] = state_dict.pop("pos_embed")
    for key in ("pos_embed", "patch_embed.pos_embed"):
        theirs, own = state_dict.get(key), own_state.get(key)
        if theirs is None or own is None or theirs.shape == own.shape or theirs.dim() != own.dim():
            continue
        if own.dim() == 4:
            state_dict[key] = resample_abs_pos_embed_nhwc(theirs, list(own.shape[1:3]))
            continue
        grid = tuple(model.patch_embed.grid_size)
        prefix = own.shape[1] - grid[0] * grid[1]
        side = math.isqrt(max(theirs.shape[1] - prefix, 0))
        if side * side != theirs.shape[1] - prefix:
            raise ValueError(f"the checkpoint's {key} holds {theirs.shape[1]} positions, which is not {prefix} prefix "
                             f"positions plus a square patch grid; load it into a model of its own image size")
        state_dict[key] = resample_abs_pos_embed(theirs, new_size=list(grid), old_size=[side, side],
                                                 num_prefix_tokens=prefix)
    return state_dict
