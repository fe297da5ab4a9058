"""GPU path for hard-masked heads: FlexAttention over the neighbourhood plus the DESIGN §2 identity.

FlexAttention skips the blocks a ``mask_mod`` excludes, which is the strict (``-inf``)
neighbourhood attention.  The paper's zero-logit mask adds the non-neighbours back as a
"rest" bucket: each of the ``c_i = T - n_i`` non-neighbours has logit 0 (weight ``e^0``), so
with ``Z_i = e^{lse_i}`` the neighbourhood normaliser returned by FlexAttention::

    out_i = (Z_i · local_i + rest_i) / (Z_i + c_i) = w_i · local_i + (1 - w_i) · rest_i / c_i
    w_i   = sigmoid(lse_i - log c_i),   rest_i = Σ_all v - Σ_{Nb(i)} v

``Σ_{Nb(i)} v`` is a box filter on the grid (zero padded, so border windows are truncated)
plus the prefix values; prefix rows have ``c_i = 0`` and ``w_i = 1``.  On CUDA the
FlexAttention call is compiled (fused, block-sparse: O(T·R²·d) work); elsewhere it runs
eagerly (dense, for tests only).  Import-safe without FlexAttention: :func:`available`
says whether it can run.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ..masks import neighbour_counts

try:  # FlexAttention appeared in torch 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the installed torch
    create_block_mask = flex_attention = None
try:  # torch >= 2.9 asks for the lse through AuxRequest (return_lse is deprecated)
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - depends on the installed torch
    AuxRequest = None


def available() -> bool:
    return flex_attention is not None


def _mask_mod(grid: tuple[int, int], mask_size: int, prefix: int) -> Callable[..., torch.Tensor]:
    width, r = grid[1], (mask_size - 1) // 2

    def neighbours(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        qp, kp = q_idx - prefix, kv_idx - prefix
        near = ((qp // width - kp // width).abs() <= r) & ((qp % width - kp % width).abs() <= r)
        return (q_idx < prefix) | (kv_idx < prefix) | near

    return neighbours


@lru_cache(maxsize=32)
def _block_mask(grid: tuple[int, int], mask_size: int, prefix: int, device: str) -> Any:
    tokens = prefix + grid[0] * grid[1]
    return create_block_mask(_mask_mod(grid, mask_size, prefix), None, None, tokens, tokens, device=device)


@lru_cache(maxsize=4)
def _compiled_flex() -> Callable[..., Any]:
    return torch.compile(flex_attention, dynamic=False)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any,
          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of FlexAttention: compiled on CUDA, eager (unfused, warning silenced) elsewhere."""
    fn = _compiled_flex() if q.is_cuda else flex_attention
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if AuxRequest is None:
            return fn(q, k, v, block_mask=block_mask, scale=scale, return_lse=True)
        out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True))
        return out, aux.lse


def flex_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid_size: tuple[int, int],
                         mask_size: int, num_prefix_tokens: int, mode: str = "zero", scale: Optional[float] = None,
                         **_: object) -> torch.Tensor:
    """Hard-masked attention (every head α = 0) with FlexAttention; same result as the reference."""
    batch, heads, tokens, dim = q.shape
    p, (h, w), size = num_prefix_tokens, grid_size, mask_size
    scale = dim ** -0.5 if scale is None else scale
    block_mask = _block_mask(grid_size, size, p, str(q.device))
    local, lse = _flex(q, k, v, block_mask, scale)
    if mode != "zero":
        return local
    # Non-neighbour count c_i and value sum rest_i of every row (prefix rows: 0 and 0).
    counts = neighbour_counts(grid_size, size).to(device=q.device, dtype=lse.dtype)
    rest_count = F.pad(h * w - counts, (p, 0))                                      # (T,)
    grid_v = v[:, :, p:].reshape(batch * heads, h, w, dim).permute(0, 3, 1, 2)
    window_sum = F.avg_pool2d(grid_v, size, stride=1, padding=(size - 1) // 2, count_include_pad=True) * size ** 2
    window_sum = window_sum.permute(0, 2, 3, 1).reshape(batch, heads, h * w, dim)
    rest = v[:, :, p:].sum(2, keepdim=True) - window_sum                            # Σ_all v - Σ_Nb v
    rest = F.pad(rest, (0, 0, p, 0))
    weight = torch.sigmoid(lse - torch.log(rest_count)).unsqueeze(-1).to(v.dtype)   # c = 0 -> weight 1
    return weight * local + (1 - weight) * rest / rest_count.clamp(min=1).unsqueeze(-1).to(v.dtype)


def unsupported(call: Any) -> Optional[str]:
    """Why :func:`flex_local_attention` cannot run ``call`` (None when it can)."""
    if not available():
        return "torch.nn.attention.flex_attention is not available in this torch"
    if call.custom_mask:
        return "it only implements the local R x R mask, not a custom mask"
    if call.dropout_p > 0.0:
        return "attention dropout needs the dense probabilities (use dropout_p=0 or the reference backend)"
    if call.alpha.requires_grad:
        return "alpha requires grad; the flex backend has no gradient with respect to alpha"
    if not bool((call.alpha.detach() == 0).all()):
        return f"every head must be hard-masked (alpha 0), got alpha {call.alpha.detach().tolist()}"
    return None
