"""Spatial neighbourhoods and attention masks (docs/semantics.md).

Tokens are ``T = P + H*W``: ``P`` prefix tokens (class / distillation token) followed by
the ``H x W`` patch grid in row-major order.  A mask is a boolean ``(T, T)`` tensor that is
``True`` where attention is *kept* at full strength: every prefix row and column, and every
pair of patches within ``r = (R - 1) / 2`` rows and columns of each other (windows are
truncated at the border, a patch is its own neighbour).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence, Union

import torch

GridSize = Union[int, Sequence[int]]


def to_grid(grid_size: GridSize) -> tuple[int, int]:
    """Normalise ``14`` or ``(14, 14)`` to a ``(H, W)`` tuple of positive ints."""
    if isinstance(grid_size, int):
        grid = (grid_size, grid_size)
    else:
        grid = tuple(int(g) for g in grid_size)
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"grid_size must be a positive int or a (H, W) pair of positive ints, got {grid_size!r}")
    return grid  # type: ignore[return-value]


def check_mask_size(mask_size: int) -> int:
    """Return ``mask_size`` if it is an odd positive int (the mask is ``R x R`` centred on the patch)."""
    if isinstance(mask_size, bool) or not isinstance(mask_size, int) or mask_size < 1 or mask_size % 2 == 0:
        raise ValueError(f"mask_size must be an odd positive integer (1, 3, 5, ...), got {mask_size!r}")
    return mask_size


def check_num_prefix_tokens(num_prefix_tokens: int) -> int:
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}")
    return num_prefix_tokens


def max_useful_mask_size(grid_size: GridSize) -> int:
    """Smallest ``R`` whose window covers the whole grid from every patch (``2 * max(H, W) - 1``)."""
    h, w = to_grid(grid_size)
    return 2 * max(h, w) - 1


def check_mask_fits_grid(mask_size: int, grid_size: GridSize, name: str = "mask_size") -> None:
    """A masked head needs a window smaller than its grid: once ``R`` covers the whole grid from every
    patch, the head would be unmasked.  One-line error naming the value (as ``name``, e.g. a command's
    option) and the largest useful ``R``."""
    h, w = to_grid(grid_size)
    limit = max_useful_mask_size((h, w))
    if mask_size > limit:
        raise ValueError(f"{name} {mask_size} is larger than the {h}x{w} patch grid needs (R = {limit} already "
                         f"covers it, so masked heads would be unmasked); use R <= {limit} or larger images")


@lru_cache(maxsize=64)
def _patch_neighbours(h: int, w: int, mask_size: int) -> torch.Tensor:
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    r = (mask_size - 1) // 2
    near_rows = (rows[:, None] - rows[None, :]).abs() <= r
    near_cols = (cols[:, None] - cols[None, :]).abs() <= r
    return near_rows & near_cols


def _neighbours(h: int, w: int, mask_size: int) -> torch.Tensor:
    """:func:`_patch_neighbours`, cached except while tracing (torch.compile / torch.export), where a cached
    tensor would be a traced one."""
    if torch.compiler.is_compiling():
        return _patch_neighbours.__wrapped__(h, w, mask_size)
    return _patch_neighbours(h, w, mask_size)


def patch_neighbours(grid_size: GridSize, mask_size: int = 3) -> torch.Tensor:
    """Boolean ``(H*W, H*W)`` matrix: ``True`` where two patches are spatial neighbours."""
    h, w = to_grid(grid_size)
    return _neighbours(h, w, check_mask_size(mask_size)).clone()


def local_mask(grid_size: GridSize, mask_size: int = 3, num_prefix_tokens: int = 1,
               device: torch.device | str | None = None) -> torch.Tensor:
    """The ``R x R`` local attention mask of the paper as a boolean ``(T, T)`` tensor.

    ``True`` = full-strength logit (prefix rows/columns and spatial neighbours),
    ``False`` = logit scaled by the head's α (0 for a hard mask).
    """
    h, w = to_grid(grid_size)
    p = check_num_prefix_tokens(num_prefix_tokens)
    n = h * w
    mask = torch.ones(p + n, p + n, dtype=torch.bool)
    mask[p:, p:] = _neighbours(h, w, check_mask_size(mask_size))
    return mask.to(device) if device is not None else mask


def window_counts(grid_size: GridSize, mask_size: int = 3,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Number of spatial neighbours of each patch, ``(H*W,)`` int64, in O(H*W) memory on ``device``.

    A truncated window spans ``min(row + r, H - 1) - max(row - r, 0) + 1`` rows, likewise columns.
    """
    h, w = to_grid(grid_size)
    r = (check_mask_size(mask_size) - 1) // 2

    def span(n: int) -> torch.Tensor:
        index = torch.arange(n, device=device)
        return (index + r).clamp(max=n - 1) - (index - r).clamp(min=0) + 1

    return (span(h)[:, None] * span(w)[None, :]).reshape(-1)


def neighbour_counts(grid_size: GridSize, mask_size: int = 3) -> torch.Tensor:
    """Number of spatial neighbours of each patch (border windows are truncated)."""
    return window_counts(grid_size, mask_size)


def random_mask(grid_size: GridSize, mask_size: int = 3, num_prefix_tokens: int = 1, seed: int = 0) -> torch.Tensor:
    """A random control mask (paper §5.6) with the same kept fraction as the ``R x R`` mask.

    Prefix rows and columns stay unmasked, exactly as in :func:`local_mask`; among the
    patch-patch entries the same *number* of entries as the local mask keeps are chosen
    uniformly at random (reproducibly, from ``seed``), so only their placement differs.
    """
    h, w = to_grid(grid_size)
    p = check_num_prefix_tokens(num_prefix_tokens)
    n = h * w
    kept = int(_neighbours(h, w, check_mask_size(mask_size)).sum())
    generator = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(n * n, generator=generator)[:kept]
    block = torch.zeros(n * n, dtype=torch.bool)
    block[chosen] = True
    mask = torch.ones(p + n, p + n, dtype=torch.bool)
    mask[p:, p:] = block.view(n, n)
    return mask
