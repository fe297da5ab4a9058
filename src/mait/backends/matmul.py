"""The dense backend for speed: the reference's function with one fewer pass over the T x T logits.

It computes exactly what ``reference`` computes, ``softmax(Mα ⊙ S) v`` over the full logit
matrix, for every head kind, mode, custom mask and dtype, but folds the logit scale into
``Mα`` (a ``(heads, T, T)`` factor, small next to the ``(B, heads, T, T)`` logits) and
applies it to the logits in place: two batched GEMMs, one multiply, one softmax.  The
reference keeps the definition's form (scaled queries, a separate masked copy of the
logits) because it is the truth the other backends are tested against.

It is the CPU's choice wherever the linear backend does not pay (small grids, soft and
random-mask heads): the op is 1.2-1.6x faster than the reference in inference, and the
hard-masked CIFAR model ``mait_mini6_32`` infers 1.13x faster (training steps are dominated by
other work and are unchanged; benchmarks/README.md).  O(T²) time and memory.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .reference import weighted_values


def scaled_mask_factor(keep: torch.Tensor, alpha: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``scale · Mα``: ``scale`` where ``keep``, ``scale · α[h]`` elsewhere; ``(heads, T, T)``."""
    heads = alpha.shape[0]
    full = torch.full((), scale, dtype=dtype, device=keep.device)
    return torch.where(keep, full, alpha.to(dtype).view(heads, 1, 1) * scale)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, keep: torch.Tensor,
                     alpha: torch.Tensor, mode: str = "zero", scale: Optional[float] = None,
                     dropout_p: float = 0.0, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softmax(Mα ⊙ (S + B)) v`` like :func:`mait.backends.reference.masked_attention` (same arguments;
    ``keep`` may also be a per-instance ``(B, heads, T, T)`` mask)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-2, -1)
    if bias is not None:     # the bias enters before the mask: scale and add it first, then Mα as the reference does
        scores = torch.addcmul(bias, scores, torch.full((), scale, dtype=scores.dtype, device=scores.device))
        scale = 1.0
    if mode == "zero":
        factor = scaled_mask_factor(keep, alpha, scale, scores.dtype)
        # in place unless α needs its gradient (which reads the unscaled logits)
        scores = scores * factor if factor.requires_grad else scores.mul_(factor)
    else:
        hard = (alpha == 0).view(-1, 1, 1)
        scores = scores.mul_(scale).masked_fill_(hard & ~keep, float("-inf"))
    return weighted_values(scores.softmax(dim=-1), v, dropout_p)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, alpha: torch.Tensor, keep: torch.Tensor,
        call: Any, scale: float, dropout_p: float = 0.0, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return masked_attention(q, k, v, keep=keep, alpha=alpha, mode=call.mode, scale=scale, dropout_p=dropout_p,
                            bias=bias)
