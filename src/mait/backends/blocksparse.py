"""Long sequences: block-sparse FlexAttention over the neighbourhood plus the linear-time identity.

FlexAttention with a block mask skips the blocks that hold no neighbour pair, which is
strict (``-inf``) neighbourhood attention in O(T·R²·d) work.  The paper's zero-logit mask
adds the non-neighbours back as a "rest" bucket: each of the ``c_i = T - n_i``
non-neighbours has logit 0 (weight ``e^0``), so with ``Z_i = e^{lse_i}`` the neighbourhood
normaliser returned by FlexAttention::

    out_i = (Z_i · local_i + rest_i) / (Z_i + c_i) = w_i · local_i + (1 - w_i) · rest_i / c_i
    w_i   = sigmoid(lse_i - log c_i),   rest_i = Σ_all v - Σ_{Nb(i)} v

``Σ_{Nb(i)} v`` is a box filter on the grid (zero padded, so border windows are truncated)
plus the prefix values; prefix rows have ``c_i = 0`` and ``w_i = 1``.  Every per-grid
constant (the block mask, ``log c`` and ``1 / c``) is built once per (grid, R, prefix,
device) on the device itself, in O(T) memory: no host work and no T x T tensor per call.

Inference only: training routes to the fused kernel or the linear backend (the backward
through FlexAttention's lse is not exact in every torch release).
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ..masks import window_counts
from ..schemes import HeadKind
from .flex import GPU_DTYPES, available, neighbour_test

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the installed torch
    create_block_mask = flex_attention = None
try:  # torch >= 2.9 asks for the lse through AuxRequest (return_lse is deprecated)
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - depends on the installed torch
    AuxRequest = None


@lru_cache(maxsize=32)
def grid_constants(grid: tuple[int, int], mask_size: int, prefix: int, device: str,
                   dtype: torch.dtype) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """``(block_mask, log_rest_count, inv_rest_count)`` of one geometry, built on ``device``.

    ``rest_count`` is ``c_i`` per token (0 for prefix rows: ``log c = -inf``, weight 1);
    ``dtype`` is the precision the identity combines in (float32, or float64 for float64 inputs).
    """
    with torch.inference_mode(False):     # cached: usable by later calls in any mode
        return _grid_constants(grid, mask_size, prefix, device, dtype)


def _grid_constants(grid: tuple[int, int], mask_size: int, prefix: int, device: str,
                    dtype: torch.dtype) -> tuple[Any, torch.Tensor, torch.Tensor]:
    tokens = prefix + grid[0] * grid[1]
    near = neighbour_test(grid[1], (mask_size - 1) // 2, prefix)
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: near(q_idx, kv_idx), None, None, tokens, tokens,
                                   device=device)
    counts = window_counts(grid, mask_size, device=device).to(dtype)
    rest = F.pad(grid[0] * grid[1] - counts, (prefix, 0))
    return block_mask, torch.log(rest), 1.0 / rest.clamp(min=1)


def identity(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, log_rest: torch.Tensor,
             inv_rest: torch.Tensor, scale: float, grid: tuple[int, int], mask_size: int, prefix: int,
             zero: bool) -> torch.Tensor:
    """Hard-masked attention of every head from one block-sparse FlexAttention call (module doc)."""
    batch, heads, tokens, dim = q.shape
    h, w = grid
    if AuxRequest is None:
        local, lse = flex_attention(q, k, v, block_mask=block_mask, scale=scale, return_lse=True)
    else:
        local, aux = flex_attention(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True))
        lse = aux.lse
    if not zero:
        return local
    acc = log_rest.dtype                              # float32 (float64 for float64 inputs)
    grid_v = v[:, :, prefix:].reshape(batch * heads, h, w, dim).permute(0, 3, 1, 2).to(acc)
    window_sum = F.avg_pool2d(grid_v, mask_size, stride=1, padding=(mask_size - 1) // 2,
                              count_include_pad=True) * mask_size ** 2
    window_sum = window_sum.permute(0, 2, 3, 1).reshape(batch, heads, h * w, dim)
    rest = v[:, :, prefix:].to(acc).sum(2, keepdim=True) - window_sum          # Σ_all v - Σ_Nb v
    rest = F.pad(rest, (0, 0, prefix, 0))
    weight = torch.sigmoid(lse.to(acc) - log_rest).unsqueeze(-1)              # c = 0 -> weight 1
    out = weight * local.to(acc) + (1 - weight) * rest * inv_rest.unsqueeze(-1)
    return out.to(v.dtype)


@lru_cache(maxsize=1)
def compiled() -> Callable[..., torch.Tensor]:
    """The compiled :func:`identity` (one per process; dynamo caches per geometry and dtype)."""
    return torch.compile(identity, dynamic=False)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, call: Any, scale: float, **_: Any) -> torch.Tensor:
    if torch.is_autocast_enabled(q.device.type):         # FlexAttention is not an autocast op
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    block_mask, log_rest, inv_rest = grid_constants(call.grid_size, call.mask_size, call.num_prefix_tokens,
                                                    str(q.device), torch.promote_types(q.dtype, torch.float32))
    args = (q, k, v, block_mask, log_rest, inv_rest, float(scale), call.grid_size, call.mask_size,
            call.num_prefix_tokens, call.mode == "zero")
    if q.is_cuda:
        return compiled()(*args)
    with warnings.catch_warnings():       # eager FlexAttention warns that it is unfused
        warnings.simplefilter("ignore", UserWarning)
        return identity(*args)


def can_run(call: Any) -> Optional[str]:
    """Hard heads on the local window, inference only."""
    if not available():
        return "torch.nn.attention.flex_attention is not available in this torch"
    if call.custom_mask:
        return "it only implements the local R x R mask, not a custom mask"
    if call.dropout:
        return "attention dropout needs the dense probabilities (use dropout_p=0 or the reference backend)"
    if set(call.head_kinds) != {HeadKind.HARD}:
        return (f"every head must be hard-masked (alpha a constant 0), got head kinds "
                f"{''.join(k.value for k in call.head_kinds)!r}")
    if call.needs_grad:
        return "it runs inference only (training uses the 'flex' or 'local' backend)"
    if call.device_type == "cuda":
        if call.dtype not in GPU_DTYPES:
            return f"FlexAttention's GPU kernels take float16, bfloat16 or float32, not {call.dtype}"
        if call.head_dim < 16:
            return f"FlexAttention's GPU kernels need head_dim >= 16, got {call.head_dim}"
    return None
