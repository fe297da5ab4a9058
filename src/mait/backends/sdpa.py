"""Unmasked heads (α = 1): plain ``scaled_dot_product_attention`` (FlashAttention on GPUs)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..schemes import HeadKind


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, dropout_p: float = 0.0,
        bias: Optional[torch.Tensor] = None, **_: Any) -> torch.Tensor:
    """Plain attention; a logit ``bias`` is SDPA's additive mask, passed in the shape its caller made it (BEiT's
    ``(1, heads, T, T)`` or ``(heads, T, T)``: SDPA's CPU kernel sums in another order for each)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, dropout_p=dropout_p)


def can_run(call: Any) -> Optional[str]:
    if set(call.head_kinds) != {HeadKind.NONE}:
        return (f"every head must be unmasked (alpha a constant 1), got head kinds "
                f"{''.join(k.value for k in call.head_kinds)!r}")
    return None
