"""The exact linear-time backend for hard-masked heads (DESIGN §2).

With α = 0 every non-neighbour logit is exactly 0, so each patch row of the softmax only
needs its ``R x R`` window and the prefix columns; the other ``T - n_i`` columns all weigh
``e^0`` and contribute ``Σ_all v - Σ_window v``.  With ``m_i = max(0, max_window S_ij)``::

    num_i = Σ_{j∈Nb(i)} (e^{S_ij - m_i} - e^{-m_i}) v_j  +  e^{-m_i} Σ_{all j} v_j
    den_i = Σ_{j∈Nb(i)}  e^{S_ij - m_i}  +  (T - n_i) e^{-m_i}

Keys and values are zero-padded by ``r = (R - 1) / 2`` on the grid, so every window has
exactly ``R²`` slots.  A padded slot has ``S = 0`` and ``v = 0``: it adds ``e^{-m}`` to the
denominator, which the constant count ``(N - R²)`` in place of ``(T - n_i - P)`` takes back,
and nothing to the numerator.  Border truncation is therefore exact without a validity
mask (``mode="neg_inf"`` gives the padded slots -inf instead).  Prefix rows attend to
everything and run through ``scaled_dot_product_attention``.

Time and memory are O(T·R²·d); the backward pass is autograd through the same loop over the
``R²`` window offsets (it saves views of the padded inputs and the ``(…, R²)`` weights).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F


@lru_cache(maxsize=64)
def _pad_bias(grid: tuple[int, int], mask_size: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """``(H, W, R²)`` additive bias: 0 on slots inside the grid, -inf on padded slots (mode ``neg_inf``)."""
    h, w = grid
    r = (mask_size - 1) // 2
    inside = F.pad(torch.ones(h, w), (r, r, r, r)).unfold(0, mask_size, 1).unfold(1, mask_size, 1)
    bias = torch.zeros(h, w, mask_size * mask_size, dtype=dtype)
    return bias.masked_fill(inside.reshape(h, w, -1) == 0, float("-inf")).to(device)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid_size: tuple[int, int],
                    mask_size: int, num_prefix_tokens: int, mode: str = "zero", scale: Optional[float] = None,
                    **_: object) -> torch.Tensor:
    """Hard-masked attention (every head α = 0) in O(T·R²·d); same result as the dense reference.

    ``q, k, v`` are ``(B, heads, T, d)`` with ``T = num_prefix_tokens + H * W``.
    """
    batch, heads, tokens, dim = q.shape
    p, (h, w), size = num_prefix_tokens, grid_size, mask_size
    r, n = (size - 1) // 2, tokens - num_prefix_tokens
    scale = dim ** -0.5 if scale is None else scale
    zero = mode == "zero"

    qg = (q[:, :, p:] * scale).reshape(batch, heads, h, w, dim)
    kpad = F.pad(k[:, :, p:].reshape(batch, heads, h, w, dim), (0, 0, r, r, r, r))
    vpad = F.pad(v[:, :, p:].reshape(batch, heads, h, w, dim), (0, 0, r, r, r, r))
    offsets = [(dy, dx) for dy in range(size) for dx in range(size)]
    # Window logits (B, heads, H, W, R²); padded slots are exactly 0.
    scores = torch.stack([(qg * kpad[:, :, dy:dy + h, dx:dx + w]).sum(-1) for dy, dx in offsets], dim=-1)
    if not zero:
        scores = scores + _pad_bias((h, w), size, scores.dtype, str(scores.device))
    peak = scores.amax(-1)
    if p:
        qflat = qg.reshape(batch, heads, n, dim)
        prefix_scores = (qflat @ k[:, :, :p].transpose(-2, -1)).reshape(batch, heads, h, w, p)
        peak = torch.maximum(peak, prefix_scores.amax(-1))
    if zero:
        peak = peak.clamp(min=0)
    peak = peak.detach().unsqueeze(-1)       # any shift gives the same softmax; no gradient through it
    weights = torch.exp(scores - peak)
    den = weights.sum(-1)
    if zero:
        rest = torch.exp(-peak)                                       # weight of each zero logit
        den = den + (n - size * size) * rest.squeeze(-1)
        weights = weights - rest
    out = sum(weights[..., i, None] * vpad[:, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets))
    if p:
        prefix_weights = torch.exp(prefix_scores - peak)
        den = den + prefix_weights.sum(-1)
        if zero:
            prefix_weights = prefix_weights - rest
        out = out + (prefix_weights.reshape(batch, heads, n, p) @ v[:, :, :p]).reshape(batch, heads, h, w, dim)
    if zero:
        out = out + rest * v.sum(2)[:, :, None, None, :]
    out = (out / den.unsqueeze(-1)).reshape(batch, heads, n, dim)
    if p:
        # Prefix rows are unmasked in every mode: one dense row each.
        head = F.scaled_dot_product_attention(q[:, :, :p], k, v, scale=scale)
        out = torch.cat([head, out], dim=2)
    return out


def unsupported(call: "object") -> Optional[str]:
    """Why :func:`local_attention` cannot run ``call`` (None when it can)."""
    if call.custom_mask:
        return "it only implements the local R x R mask, not a custom mask"
    if call.dropout_p > 0.0:
        return "attention dropout needs the dense probabilities (use dropout_p=0 or the reference backend)"
    alpha = call.alpha.detach()
    if call.alpha.requires_grad:
        return "alpha requires grad; the linear backend has no gradient with respect to alpha"
    if not bool((alpha == 0).all()):
        return f"every head must be hard-masked (alpha 0), got alpha {alpha.tolist()}"
    return None
