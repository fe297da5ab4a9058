"""Cross-layer similarity of attention maps (paper Appendix A.2, Eq. 4; docs/analysis.md).

``M[h, i, j]`` is the cosine similarity between the attention *rows* ``A^i[h, t, :]`` and
``A^j[h, t, :]`` of layers i and j, averaged over every token t (prefix tokens included, as
in the paper's ``N + 1`` tokens) and over images.  The paper follows DeepViT's metric but
on rows (what token t gathers), whereas DeepViT compares columns; rows are used here.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from .collect import Images, iter_attention


def _similarity_sum(attns: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum over images and tokens of the row cosines, ``(heads, L, L)``, and the number of rows summed per image."""
    if len(attns) == 0:
        raise ValueError("cross-layer similarity needs at least one layer of attention maps")
    shapes = {tuple(a.shape) for a in attns}
    if len(shapes) != 1 or attns[0].dim() != 4 or attns[0].shape[-1] != attns[0].shape[-2]:
        raise ValueError(f"every layer's maps must share one shape (B, heads, T, T) to be compared; "
                         f"got {sorted(shapes)} (hierarchical models: pass the layers of one stage)")
    rows = [torch.nn.functional.normalize(a, dim=-1) for a in attns]
    total = torch.zeros(attns[0].shape[1], len(rows), len(rows), dtype=torch.float64, device=attns[0].device)
    for i in range(len(rows)):
        for j in range(i, len(rows)):
            cosines = (rows[i] * rows[j]).sum(-1)          # (B, heads, T), one cosine per row
            total[:, i, j] = total[:, j, i] = cosines.double().sum(dim=(0, 2))
    return total, attns[0].shape[-2]


def cross_layer_similarity(attns: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(heads, L, L)`` mean row cosine similarity between the layers' ``(B, heads, T, T)`` maps."""
    total, tokens = _similarity_sum(attns)
    return (total / (attns[0].shape[0] * tokens)).to(attns[0].dtype)


def measure_similarity(model: nn.Module, images: Images, *, layers: Optional[Sequence[int]] = None,
                       device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Cross-layer similarity over a batch or a loader, one batch of maps at a time: ``(heads, L, L)``.

    ``layers`` selects (in order) the layers to compare, default all.
    """
    total: Optional[torch.Tensor] = None
    rows = 0
    for maps in iter_attention(model, images, device=device):
        if layers is not None:
            bad = [i for i in layers if not 0 <= i < len(maps)]
            if bad:
                raise ValueError(f"layers {bad} do not exist: the model has {len(maps)} attention layers")
            maps = [maps[i] for i in layers]
        batch_total, tokens = _similarity_sum(maps)
        total = batch_total if total is None else total + batch_total
        rows += maps[0].shape[0] * tokens
    if total is None:
        raise ValueError("no images: the data is empty")
    return (total / rows).float().cpu()


def last_layers_similarity(similarity: torch.Tensor, last: int) -> torch.Tensor:
    """Mean similarity among the last ``last`` layers, per head (off-diagonal pairs only): ``(heads,)``.

    This is the paper's comparison (0.75 for DeiT-T's last 8 layers, 0.65 with mixed masking).
    """
    depth = similarity.shape[-1]
    if not 2 <= last <= depth:
        raise ValueError(f"last must be between 2 and the number of layers ({depth}), got {last}")
    block = similarity[:, depth - last:, depth - last:]
    off_diagonal = ~torch.eye(last, dtype=torch.bool, device=similarity.device)
    return block[:, off_diagonal].mean(-1)
