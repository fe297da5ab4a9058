"""Token pruning (Sparsifiner's token sparsity, Wei et al., CVPR 2023; docs/sparsity.md): patch tokens dropped.

At a few *prune layers* the class token's attention, averaged over the heads, scores the patch
tokens that remain; the top ``ceil(ρ^j · N)`` of the ``N`` patches of the image are kept after
the ``j``-th prune layer (the release's per-block keep rates ``[1]*3 + [ρ]*3 + [ρ²]*3 + [ρ³]*3``
on DeiT's 12 blocks, prune layers 3, 6 and 9).  The others are **dropped**: gathered out of the
token sequence, so every later layer computes on fewer tokens.  Each kept token keeps its
original patch position, which the attention layers read to build MaiT's windows on the original
grid and to index the connectivity predictor's per-token tables.

The selection is not differentiable.  This module holds the rule; :class:`mait.MaiT` (and
every model masked with :func:`mait.mask_model`) runs it (``token_keep_rate``, ``token_prune_layers``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = ["RELEASE_PRUNE_LAYERS", "check_token_keep_rate", "class_attention_scores", "default_prune_layers",
           "gather_tokens", "kept_tokens", "prune_layers", "prune_tokens", "select_tokens", "token_positions"]

RELEASE_PRUNE_LAYERS = (3, 6, 9)   # of DeiT's 12 blocks (the release's TOKEN_PRUNING_LOC)
RELEASE_DEPTH = 12


def check_token_keep_rate(keep_rate: float) -> float:
    """``ρ`` must lie in (0, 1]: the fraction of the patch tokens each prune layer keeps (1: no pruning)."""
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"token_keep_rate must lie in (0, 1] (the fraction of patch tokens each prune layer "
                         f"keeps; 1.0: no pruning), got {keep_rate!r}")
    return float(keep_rate)


def default_prune_layers(depth: int) -> tuple[int, ...]:
    """The release's prune layers 3, 6, 9 of 12 scaled to ``depth``: ``l · depth // 12``, repeats removed
    (depth 4: 1, 2, 3; depth 6: 1, 3, 4; depth 24: 6, 12, 18)."""
    return tuple(sorted({layer * depth // RELEASE_DEPTH for layer in RELEASE_PRUNE_LAYERS}))


def prune_layers(layers: Optional[Sequence[int]], depth: int) -> tuple[int, ...]:
    """``layers`` checked (strictly increasing block indices in ``[0, depth)``), or the default for ``depth``."""
    if layers is None:
        return default_prune_layers(depth)
    values = tuple(layers) if isinstance(layers, (list, tuple)) else None
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < depth for v in values) \
            or any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"token_prune_layers must be strictly increasing block indices in [0, {depth - 1}] "
                         f"(default {default_prune_layers(depth)} for depth {depth}), got {layers!r}")
    return values


def kept_tokens(patches: int, keep_rate: float, stage: int) -> int:
    """Patch tokens left after the ``stage``-th prune layer (1-based): ``ceil(ρ^stage · N)``, at least 1."""
    return min(patches, max(1, math.ceil(keep_rate ** stage * patches - 1e-9)))


def class_attention_scores(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix_tokens: int,
                           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each patch token's score ``(B, N')``: the class token's (token 0) attention probability to it, over the
    tokens present, averaged over the heads.  ``q, k``: ``(B, heads, T', d)``; ``bias``: the class row's logit
    bias (BEiT's), broadcastable to ``(B, heads, 1, T')``.  The class row is dense in every head kind and mode,
    so this is that row of the layer's own attention."""
    with torch.no_grad():
        logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)                              # (B, heads, 1, T')
        if bias is not None:
            logits = logits + bias
        row = (logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits).softmax(dim=-1)
        return row.mean(dim=1)[:, 0, num_prefix_tokens:]


def select_tokens(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` highest-scoring tokens of each image ``(B, count)``, in their current (= original) order."""
    return scores.topk(count, dim=-1, sorted=False).indices.sort(dim=-1).values


def gather_tokens(x: torch.Tensor, num_prefix_tokens: int, chosen: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, P + N', C)`` with only the prefix tokens and the ``chosen`` patch tokens ``(B, n)``."""
    patches = x[:, num_prefix_tokens:].gather(1, chosen[..., None].expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :num_prefix_tokens], patches], dim=1)


def prune_tokens(x: torch.Tensor, scores: torch.Tensor, index: Optional[torch.Tensor], patches: int,
                 keep_rate: float, stage: int, num_prefix_tokens: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """After the ``stage``-th prune layer: ``x`` with the prefix tokens and the ``ceil(ρ^stage · N)`` best-scoring
    of its patches (``scores`` ``(B, N')``), and their positions on the grid of ``patches`` (``index``: those of
    the patches present, None for the whole grid)."""
    count = kept_tokens(patches, keep_rate, stage)
    if count >= scores.shape[1]:
        return x, index
    chosen = select_tokens(scores, count)
    return gather_tokens(x, num_prefix_tokens, chosen), chosen if index is None else index.gather(1, chosen)


def token_positions(index: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """``(B, P + n)`` positions in the unpruned token order of the prefix tokens and the kept patches ``index``
    (``(B, n)``, positions on the patch grid, row-major)."""
    prefix = torch.arange(num_prefix_tokens, device=index.device).expand(index.shape[0], -1)
    return torch.cat([prefix, index + num_prefix_tokens], dim=1)
