"""Collect attention maps (softmax probabilities) from mait models and unmodified timm ViT/DeiT/CaiT.

mait's :class:`~mait.MaskedAttention` layers (and Masked CaiT's talking-heads layers) can
keep their probabilities themselves (``capture_attention``).  timm's own ``Attention`` runs
fused SDPA and never forms the map, so for it the probabilities are recomputed from the
layer's input with its own ``qkv``, ``q_norm``/``k_norm`` and ``scale`` in a forward hook;
the model's output is untouched.  For CaiT's talking heads the map is the one *after* the
softmax and before the post-softmax head mixing (``proj_w``), as for Masked CaiT.

Only self-attention over the whole token sequence is collected: CaiT's class-attention
layers (one query) are skipped.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Union

import torch
import torch.nn as nn
from timm.layers import Attention as TimmAttention
from timm.models.cait import TalkingHeadAttn

from ..attention import MaskedAttention

Images = Union[torch.Tensor, Iterable]


@dataclass(frozen=True)
class AttentionLayer:
    """One self-attention layer of a model and the token layout its maps live on."""

    name: str
    module: nn.Module
    model_grid: Optional[tuple[int, int]]   # the model's fixed patch grid, for plain timm layers
    mask_size: Optional[int]                # the layer's own R for masked layers, None for plain timm layers

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid of the layer's last call (masked layers follow each batch's grid), else the model's."""
        if isinstance(self.module, MaskedAttention):
            return tuple(self.module.grid_size)
        return self.model_grid

    def num_prefix_tokens(self, tokens: int) -> int:
        """Prefix tokens in front of the grid, given the map size ``T`` (``T - H*W``)."""
        prefix = tokens - self.grid_size[0] * self.grid_size[1]
        if prefix < 0:
            raise ValueError(f"layer {self.name} has {tokens} tokens, fewer than its "
                             f"{self.grid_size[0]}x{self.grid_size[1]} patch grid")
        return prefix


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The model's self-attention layers in forward order (module registration order).

    Masked layers know the grid of each call (also in dynamic-size models); plain timm layers take the
    model's fixed ``patch_embed.grid_size``.
    """
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, MaskedAttention):
            layers.append(AttentionLayer(name, module, None, module.mask_size))
        elif isinstance(module, (TimmAttention, TalkingHeadAttn)):
            patch_embed = getattr(model, "patch_embed", None)
            grid = getattr(patch_embed, "grid_size", None)
            if grid is None or getattr(patch_embed, "dynamic_img_size", False):
                raise ValueError(f"cannot tell the patch grid of layer {name!r}: the model has no fixed "
                                 f"patch_embed.grid_size")
            layers.append(AttentionLayer(name, module, tuple(grid), None))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention layer that collect_attention understands "
                         f"(mait MaskedAttention, timm Attention or CaiT TalkingHeadAttn)")
    return layers


def _timm_probs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Recompute the softmax attention map of a timm ``Attention`` / ``TalkingHeadAttn`` from its input."""
    batch, tokens, _ = x.shape
    heads = module.num_heads
    qkv = module.qkv(x).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    if isinstance(module, TalkingHeadAttn):
        scores = (q * module.scale) @ k.transpose(-2, -1)
        scores = module.proj_l(scores.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    else:
        q, k = module.q_norm(q), module.k_norm(k)
        scores = (q * module.scale) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1)


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[list[Optional[torch.Tensor]]]:
    """Within the block, every forward of ``model`` fills the yielded list with one map per layer.

    The list is overwritten on each forward, so only the last batch's maps are held.
    """
    layers = attention_layers(model)
    maps: list[Optional[torch.Tensor]] = [None] * len(layers)
    handles, flags = [], []

    def hook_for(index: int, layer: AttentionLayer):
        if isinstance(layer.module, MaskedAttention):
            def hook(module, args, kwargs, output):
                maps[index] = module.last_attention
                module.last_attention = None
        else:
            def hook(module, args, kwargs, output):
                if kwargs.get("attn_mask") is not None or len(args) > 1:
                    raise ValueError(f"layer {layer.name} was called with an extra attention mask; "
                                     f"collect_attention cannot reproduce it")
                maps[index] = _timm_probs(module, args[0] if args else kwargs["x"]).detach()
        return hook

    try:
        for index, layer in enumerate(layers):
            if isinstance(layer.module, MaskedAttention):
                flags.append((layer.module, layer.module.capture_attention))
                layer.module.capture_attention = True
            handles.append(layer.module.register_forward_hook(hook_for(index, layer), with_kwargs=True))
        yield maps
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.capture_attention = flag
            module.last_attention = None


def _batches(images: Images) -> Iterator[torch.Tensor]:
    """Yield image tensors from one ``(B, C, H, W)`` batch or an iterable of batches / (images, labels)."""
    if isinstance(images, torch.Tensor):
        batches: Iterable = [images]
    else:
        batches = images
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(f"expected image batches of shape (B, C, H, W) (or (images, labels) pairs), got {shape}")
        yield batch


def iter_attention(model: nn.Module, images: Images, *,
                   device: Optional[Union[str, torch.device]] = None) -> Iterator[list[torch.Tensor]]:
    """Run ``model`` (in eval mode, without gradients) over the batches and yield each batch's maps.

    Each item is a list over layers of ``(B, heads, T, T)`` probabilities; nothing of earlier
    batches is kept, so reductions over a loader hold one batch of maps at a time.
    """
    rate = getattr(model, "token_keep_rate", 1.0)
    if rate < 1.0:
        raise ValueError(f"attention maps over the patch grid need every token, which token pruning "
                         f"(token_keep_rate={rate:g}) drops; analyse the model after model.set_token_pruning(1.0)")
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with capture_attention(model) as maps, torch.no_grad():
            for batch in _batches(images):
                model(batch.to(device))
                if any(m is None for m in maps):
                    missing = [layer.name for layer, m in zip(attention_layers(model), maps) if m is None]
                    raise ValueError(f"the forward pass did not run attention layers {missing}")
                yield list(maps)  # type: ignore[arg-type]
    finally:
        model.train(was_training)


def collect_attention(model: nn.Module, images: Images, *,
                      device: Optional[Union[str, torch.device]] = None) -> list[torch.Tensor]:
    """Attention probabilities of every self-attention layer: a list over layers of ``(B, heads, T, T)``.

    ``images`` is one ``(B, C, H, W)`` batch or an iterable of batches (a ``DataLoader``
    yielding ``(images, labels)`` works); batches are concatenated, so for a whole data set
    prefer the streaming reductions :func:`mait.analysis.measure_als` and
    :func:`mait.analysis.measure_similarity`, which hold one batch of maps at a time.
    """
    per_batch = [[m.cpu() for m in maps] for maps in iter_attention(model, images, device=device)]
    if not per_batch:
        raise ValueError("no images: the data is empty")
    return [torch.cat(layer_maps) for layer_maps in zip(*per_batch)]

