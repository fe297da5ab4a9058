"""A Triton kernel for hard-masked heads: neighbourhood attention with the rest bucket folded in.

One pass per block of patch queries over the key rows that can hold their neighbours (plus
the prefix keys), with an online softmax whose running maximum starts at 0 — the zero
logits' value — and, in the same loop, the neighbourhood's value sum and count::

    out_i = (Σ_{Nb(i)} e^{S_ij - m_i} v_j + e^{-m_i} (Σ_all v - Σ_{Nb(i)} v))
            / (Σ_{Nb(i)} e^{S_ij - m_i} + (T - n_i) e^{-m_i})

so the paper's zero-logit mask costs what strict neighbourhood attention costs: no second
call, no box filter, no lse round trip (mode ``neg_inf`` drops the rest terms).  Prefix query
rows are dense rows and run through SDPA.  Inference only (no backward).  It runs on CUDA,
and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported), which is how it is tested.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ._common import GPU_DTYPES, autocast_inputs, hard_local_only

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch on Linux
    triton = tl = None

BLOCK_M = 64
BLOCK_N = 64


def available() -> bool:
    return triton is not None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=1)
def kernel() -> Callable[..., Any]:
    """The jitted kernel, defined on first use."""

    @triton.jit
    def local_rows(q_ptr, k_ptr, v_ptr, vsum_ptr, out_ptr, scale, tokens, prefix, grid_h, grid_w, radius, dim,
                   ZERO: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
        block, bh = tl.program_id(0), tl.program_id(1)
        base = bh * tokens * dim
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)               # patch indices of this block
        patches = grid_h * grid_w
        valid_row = rows < patches
        row_y, row_x = rows // grid_w, rows % grid_w
        cols = tl.arange(0, BLOCK_D)
        valid_col = cols < dim
        q = tl.load(q_ptr + base + (prefix + rows)[:, None] * dim + cols[None, :],
                    mask=valid_row[:, None] & valid_col[None, :], other=0.0)
        if ZERO:
            peak = tl.zeros([BLOCK_M], dtype=tl.float32)              # the zero logits' value
        else:
            peak = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        weight = tl.zeros([BLOCK_M], dtype=tl.float32)
        count = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        near_sum = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        first_row = tl.maximum(block * BLOCK_M // grid_w - radius, 0)
        last_row = tl.minimum((block * BLOCK_M + BLOCK_M - 1) // grid_w + radius + 1, grid_h)
        # key chunk -1 is the prefix keys (always neighbours); then the patch keys of rows first..last
        for start in range(first_row * grid_w - BLOCK_N, last_row * grid_w, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            if start < first_row * grid_w:                            # the prefix chunk
                token = tl.arange(0, BLOCK_N)
                in_range = token < prefix
                near = in_range[None, :] & valid_row[:, None]
            else:
                token = prefix + keys
                in_range = keys < last_row * grid_w
                key_y, key_x = keys // grid_w, keys % grid_w
                near = (tl.abs(row_y[:, None] - key_y[None, :]) <= radius) & (
                    tl.abs(row_x[:, None] - key_x[None, :]) <= radius) & in_range[None, :] & valid_row[:, None]
            k = tl.load(k_ptr + base + token[:, None] * dim + cols[None, :],
                        mask=in_range[:, None] & valid_col[None, :], other=0.0)
            v = tl.load(v_ptr + base + token[:, None] * dim + cols[None, :],
                        mask=in_range[:, None] & valid_col[None, :], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
            scores = tl.where(near, scores, float("-inf"))
            new_peak = tl.maximum(peak, tl.max(scores, 1))
            shift = tl.where(new_peak == float("-inf"), 0.0, new_peak)
            decay = tl.exp(peak - shift)
            probs = tl.exp(scores - shift[:, None])
            weight = weight * decay + tl.sum(probs, 1)
            acc = acc * decay[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
            if ZERO:
                near_sum += tl.dot(near.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
                count += tl.sum(near.to(tl.float32), 1)
            peak = new_peak
        if ZERO:
            rest = tl.exp(-peak)
            vsum = tl.load(vsum_ptr + bh * dim + cols, mask=valid_col, other=0.0)
            acc += rest[:, None] * (vsum[None, :] - near_sum)
            weight += (tokens - count) * rest
        out = acc / weight[:, None]
        tl.store(out_ptr + base + (prefix + rows)[:, None] * dim + cols[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=valid_row[:, None] & valid_col[None, :])

    return local_rows


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, call: Any, scale: float, **_: Any) -> torch.Tensor:
    q, k, v = (t.contiguous() for t in autocast_inputs(q, k, v))
    batch, heads, tokens, dim = q.shape
    prefix, (grid_h, grid_w) = call.num_prefix_tokens, call.grid_size
    out = torch.empty_like(q)
    if prefix:
        out[:, :, :prefix] = F.scaled_dot_product_attention(q[:, :, :prefix], k, v, scale=scale)
    vsum = v.float().sum(2).contiguous()
    block_d = max(16, triton.next_power_of_2(dim))
    launch = (triton.cdiv(grid_h * grid_w, BLOCK_M), batch * heads)
    kernel()[launch](q, k, v, vsum, out, float(scale), tokens, prefix, grid_h, grid_w,
                                  (call.mask_size - 1) // 2, dim, ZERO=call.mode == "zero",
                                  PRECISION="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_M=BLOCK_M,
                                  BLOCK_N=BLOCK_N, BLOCK_D=block_d)
    return out


def can_run(call: Any) -> Optional[str]:
    """Hard heads on the local window, inference, on CUDA (or the CPU under TRITON_INTERPRET=1)."""
    if not available():
        return "triton is not installed"
    if call.device_type != "cuda" and not interpreted():
        return "the Triton kernel runs on CUDA (or on the CPU with TRITON_INTERPRET=1)"
    if call.needs_grad:
        return "the Triton kernel has no backward (training uses the 'blocksparse', 'flex' or 'local' backend)"
    if call.dtype not in GPU_DTYPES:
        return f"the Triton kernel takes float16, bfloat16 or float32, not {call.dtype}"
    return hard_local_only(call)
