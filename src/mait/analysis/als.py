"""Attention Locality Score (paper Eq. 3; docs/analysis.md).

For one head with attention probabilities ``A``, ``ALS_n = Σ_{j ∈ spatial neighbours of n} A[n, j]``
for every *patch* row ``n`` (prefix rows are left out and prefix columns are not
neighbours), and the head's ALS is the mean over the ``H*W`` patch rows and over images.
It is defined for masked and unmasked heads alike, with the same ``R x R`` window.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from ..masks import GridSize, check_mask_size, check_num_prefix_tokens, patch_neighbours, to_grid
from .collect import Images, attention_layers, iter_attention


def locality_per_patch(attn: torch.Tensor, grid_size: GridSize, mask_size: int = 3,
                       num_prefix_tokens: int = 1) -> torch.Tensor:
    """``ALS_n`` of every patch row: ``(..., heads, T, T)`` maps -> ``(..., heads, H*W)``."""
    grid = to_grid(grid_size)
    check_mask_size(mask_size)
    prefix = check_num_prefix_tokens(num_prefix_tokens)
    tokens = prefix + grid[0] * grid[1]
    if attn.dim() < 3 or attn.shape[-2:] != (tokens, tokens):
        raise ValueError(f"attention maps must be (..., heads, T, T) with T = {prefix} prefix + "
                         f"{grid[0]}x{grid[1]} patches = {tokens}; got shape {tuple(attn.shape)}")
    neighbours = patch_neighbours(grid, mask_size).to(device=attn.device, dtype=attn.dtype)
    return (attn[..., prefix:, prefix:] * neighbours).sum(-1)


def attention_locality_score(attn: torch.Tensor, grid_size: GridSize, mask_size: int = 3,
                             num_prefix_tokens: int = 1) -> torch.Tensor:
    """ALS per head: ``(B, heads, T, T)`` (or ``(heads, T, T)``) maps -> ``(heads,)``, mean over patches and images."""
    per_patch = locality_per_patch(attn, grid_size, mask_size, num_prefix_tokens)
    return per_patch.reshape(-1, *per_patch.shape[-2:]).mean(dim=(0, 2))


def measure_als(model: nn.Module, images: Images, *, mask_size: Optional[int] = None,
                device: Optional[Union[str, torch.device]] = None) -> list[torch.Tensor]:
    """ALS of every head of every self-attention layer over a batch or a loader: a list of ``(heads,)``.

    ``mask_size`` defaults to each masked layer's own R (3 for plain timm layers).  Maps
    are reduced batch by batch; the mean is over all images (batches weighted by size).
    """
    layers = attention_layers(model)
    sums: list[Optional[torch.Tensor]] = [None] * len(layers)
    count = 0
    for maps in iter_attention(model, images, device=device):
        for index, (layer, attn) in enumerate(zip(layers, maps)):
            size = mask_size if mask_size is not None else (layer.mask_size or 3)
            total = locality_per_patch(attn.double(), layer.grid_size, size,
                                       layer.num_prefix_tokens(attn.shape[-1])).mean(-1).sum(0)
            sums[index] = total if sums[index] is None else sums[index] + total
        count += maps[0].shape[0]
    if count == 0:
        raise ValueError("no images: the data is empty")
    return [(s / count).float().cpu() for s in sums]  # type: ignore[operator]
