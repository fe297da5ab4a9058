"""The reference backend: the dense definition (docs/semantics.md), the one function that is the truth.

Every other backend is tested against this one.  It materialises the ``(B, heads, T, T)``
score matrix, so it is O(T²) in time and memory, works for every α, mode, custom mask
and dtype (float64 included), and is the only backend that can return the attention
probabilities themselves.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F


def masked_scores(scores: torch.Tensor, keep: torch.Tensor, alpha: torch.Tensor, mode: str) -> torch.Tensor:
    """Apply ``Mα`` to pre-softmax scores ``(B, heads, T, T)``.

    ``keep`` is the boolean ``(T, T)`` or ``(heads, T, T)`` mask, ``alpha`` the ``(heads,)`` α.
    ``mode="zero"``: ``Mα ⊙ S`` (non-neighbour logits times α; 0 for hard masks).
    ``mode="neg_inf"``: hard heads (α = 0) get -inf outside ``keep``; α = 1 heads untouched.
    """
    heads = scores.shape[1]
    if mode == "zero":
        m_alpha = torch.where(keep, torch.ones((), dtype=scores.dtype, device=scores.device),
                              alpha.to(scores.dtype).view(heads, 1, 1))
        return scores * m_alpha
    hard = (alpha == 0).view(heads, 1, 1)
    return scores.masked_fill(hard & ~keep, float("-inf"))


def attention_probs(q: torch.Tensor, k: torch.Tensor, *, keep: torch.Tensor, alpha: torch.Tensor,
                    mode: str = "zero", scale: float | None = None,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention probabilities ``softmax(Mα ⊙ (S + B))`` of shape ``(B, heads, T, T)``; ``bias`` is the
    ``(heads, T, T)`` logit bias ``B`` (BEiT's relative position bias), 0 when None."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    return masked_scores(scores, keep, alpha, mode).softmax(dim=-1)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, keep: torch.Tensor,
                     alpha: torch.Tensor, mode: str = "zero", scale: float | None = None,
                     dropout_p: float = 0.0, bias: Optional[torch.Tensor] = None, **_: object) -> torch.Tensor:
    """Dense masked attention ``softmax(Mα ⊙ (S + B)) @ v``; dropout (if any) is applied to the probabilities."""
    probs = attention_probs(q, k, keep=keep, alpha=alpha, mode=mode, scale=scale, bias=bias)
    return weighted_values(probs, v, dropout_p)


def weighted_values(probs: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """``dropout(probs) @ v``: the attention output from its probabilities (dropout in training only)."""
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return probs @ v


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, alpha: torch.Tensor, keep: torch.Tensor,
        call: Any, scale: float, dropout_p: float = 0.0, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return masked_attention(q, k, v, keep=keep, alpha=alpha, mode=call.mode, scale=scale, dropout_p=dropout_p,
                            bias=bias)


def can_run(call: Any) -> Optional[str]:
    """The reference runs every call."""
    return None
