"""A deliberately plain float64 implementation of docs/semantics.md, independent of the library code.

It builds ``Mα`` entry by entry with Python loops, so a bug in the vectorised mask or
backend code cannot hide in a shared helper.
"""

from __future__ import annotations

import math

import torch


def naive_multiplier(grid: tuple[int, int], mask_size: int, prefix: int, alpha: float) -> torch.Tensor:
    """``Mα`` for one head: 1 on prefix rows/cols and neighbours, α elsewhere."""
    h, w = grid
    tokens = prefix + h * w
    r = (mask_size - 1) // 2
    m = torch.empty(tokens, tokens, dtype=torch.float64)
    for i in range(tokens):
        for j in range(tokens):
            if i < prefix or j < prefix:
                m[i, j] = 1.0
                continue
            ri, ci = divmod(i - prefix, w)
            rj, cj = divmod(j - prefix, w)
            m[i, j] = 1.0 if abs(ri - rj) <= r and abs(ci - cj) <= r else alpha
    return m


def naive_masked_attention(q, k, v, grid, mask_size, prefix, alphas, mode="zero"):
    """``softmax(Mα ⊙ q kᵀ/√d) v`` per batch and head, in float64."""
    q, k, v = (t.double() for t in (q, k, v))
    batch, heads, tokens, dim = q.shape
    out = torch.empty(batch, heads, tokens, v.shape[-1], dtype=torch.float64)
    for h in range(heads):
        alpha = float(alphas[h])
        m = naive_multiplier(grid, mask_size, prefix, alpha)
        for b in range(batch):
            s = q[b, h] @ k[b, h].T / math.sqrt(dim)
            if mode == "zero":
                s = m * s
            elif alpha == 0.0:
                s = torch.where(m == 1.0, s, torch.full_like(s, -math.inf))
            out[b, h] = torch.softmax(s, dim=-1) @ v[b, h]
    return out
