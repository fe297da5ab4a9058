"""The fused GPU backend: one FlexAttention call per layer for any mix of head kinds.

FlexAttention applies a ``score_mod`` to every logit inside a fused, FlashAttention-style
kernel.  The paper's mask is exactly such a modification::

    score_mod(s, b, h, q, kv) = s            if q, kv are neighbours (or either is a prefix token)
                                α[h] · s     otherwise              (mode "zero")
                                -inf         otherwise, hard head   (mode "neg_inf")

so hard (α = 0), soft (learnable α), random-mask (neighbourhood read from a boolean lookup
table instead of the window) and unmasked (α = 1) heads run together in one kernel, forward
and backward, with the gradient for α.  It is dense — O(T²·d) work, O(T·d) memory — which
is the fastest exact choice for ViT sequence lengths (a few hundred to a few thousand
tokens); see ``blocksparse`` for long sequences.

Compile discipline: α and the lookup table are *inputs* of the compiled function, the
geometry is passed as plain ints, so every layer with the same (grid, R, prefix, mode,
dtype, gradient) shares one compiled kernel whatever its α.  On CUDA the function is
compiled once per process (``torch.compile``, static shapes); elsewhere FlexAttention runs
eagerly (unfused, forward only: a CPU reference for tests).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Optional

import torch

from ._common import autocast_inputs, eager, gpu_kernel_limits

try:  # FlexAttention appeared in torch 2.5
    from torch.nn.attention.flex_attention import flex_attention
except ImportError:  # pragma: no cover - depends on the installed torch
    flex_attention = None


def available() -> bool:
    return flex_attention is not None


def neighbour_test(width: int, radius: int, prefix: int) -> Callable[..., torch.Tensor]:
    """``near(q_idx, kv_idx)``: True on prefix rows/columns and within the ``R x R`` window."""

    def near(q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        qp, kp = q_idx - prefix, kv_idx - prefix
        window = ((qp // width - kp // width).abs() <= radius) & ((qp % width - kp % width).abs() <= radius)
        return (q_idx < prefix) | (kv_idx < prefix) | window

    return near


def fused_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
                           table: Optional[torch.Tensor], scale: float, width: int, radius: int, prefix: int,
                           neg_inf: bool) -> torch.Tensor:
    """One FlexAttention call computing ``softmax(Mα ⊙ S) v`` for every head (see the module doc).

    ``alpha`` is ``(heads,)`` float32; ``table`` an optional ``(heads, T, T)`` bool keep mask
    that replaces the local window (random-mask heads, user masks).
    """
    near_window = neighbour_test(width, radius, prefix)

    def score_mod(score: torch.Tensor, b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        near = table[h, q_idx, kv_idx] if table is not None else near_window(q_idx, kv_idx)
        if neg_inf:
            far = torch.where(alpha[h] == 0, torch.full_like(score, float("-inf")), score)
        else:
            far = score * alpha[h]
        return torch.where(near, score, far)

    return flex_attention(q, k, v, score_mod=score_mod, scale=scale)


def allow_recompiles(limit: int = 64) -> None:
    """Let dynamo keep up to ``limit`` compiled versions of one function (torch's default is 8).

    A compiled kernel is specialised on its geometry, dtype and gradient, so a process that runs
    several models (a benchmark, H-MaiT's four stages in training and inference) needs more than 8.
    """
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


@lru_cache(maxsize=1)
def compiled() -> Callable[..., torch.Tensor]:
    """The compiled :func:`fused_masked_attention` (one per process; dynamo caches per geometry)."""
    allow_recompiles()
    return torch.compile(fused_masked_attention, dynamic=False)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, alpha: torch.Tensor, keep: Optional[torch.Tensor],
        call: Any, scale: float, **_: Any) -> torch.Tensor:
    table = None
    if call.custom_mask:
        table = keep if keep.dim() == 3 else keep.expand(q.shape[1], -1, -1)
    q, k, v = autocast_inputs(q, k, v)                    # FlexAttention is not an autocast op
    alpha = alpha if alpha.dtype == torch.float64 else alpha.float()     # float32 on GPUs: one kernel per dtype
    args = (q, k, v, alpha, table, float(scale), call.grid_size[1], (call.mask_size - 1) // 2,
            call.num_prefix_tokens, call.mode == "neg_inf")
    return compiled()(*args) if q.is_cuda else eager(fused_masked_attention, *args)


def can_run(call: Any) -> Optional[str]:
    """Any head kinds and masks; no attention dropout; a GPU kernel (CPU: forward only)."""
    if not available():
        return "torch.nn.attention.flex_attention is not available in this torch"
    if call.bias:
        return "it takes no additive logit bias (use the matmul or reference backend)"
    if call.dropout:
        return "FlexAttention has no attention dropout (use dropout_p=0, or the matmul or reference backend)"
    if call.device_type != "cuda" and call.needs_grad:
        return "FlexAttention has no backward on the CPU (use the reference or local backend to train there)"
    return gpu_kernel_limits(call, "FlexAttention's GPU kernel")
