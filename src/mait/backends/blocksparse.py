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

Training: FlexAttention's own backward does not give the gradient through ``lse`` exactly in
every torch release, so :class:`_NeighbourhoodAttention` supplies it.  With ``P`` the strict
neighbourhood probabilities, ``∂lse_i/∂S_ij = P_ij``, so an upstream ``g_i = ∂L/∂lse_i`` adds
``scale · g_i · Σ_j P_ij k_j`` to ``dq_i`` and ``scale · Σ_i g_i P_ij q_i`` to ``dk_j``: one more
block-sparse call with the keys as values (its output is ``Σ_j P_ij k_j``, its value gradient the
second sum).  Everything after ``(local, lse)`` — weights, box filter, rest bucket — is plain
autograd.  The math is checked on the CPU with a dense stand-in for FlexAttention
(``tests/test_backends_flex.py``) and on the GPU by ``benchmarks/gpu.sh``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ..masks import window_counts
from ._common import autocast_inputs, eager, gpu_kernel_limits, hard_local_only
from .flex import allow_recompiles, available, neighbour_test

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
        tokens = prefix + grid[0] * grid[1]
        near = neighbour_test(grid[1], (mask_size - 1) // 2, prefix)
        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: near(q_idx, kv_idx), None, None, tokens, tokens,
                                       device=device)
        counts = window_counts(grid, mask_size, device=device).to(dtype)
        rest = F.pad(grid[0] * grid[1] - counts, (prefix, 0))
        return block_mask, torch.log(rest), 1.0 / rest.clamp(min=1)


@torch.compiler.assume_constant_result
def traced_grid_constants(grid: tuple[int, int], mask_size: int, prefix: int, device: str,
                          dtype: torch.dtype) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """:func:`grid_constants` as one constant of a compiled graph.

    Under ``torch.compile`` of a whole model, dynamo ignores ``lru_cache`` and would trace the
    builder into the graph, rebuilding the block mask (a pass over all T x T pairs) on every
    call; marked as a constant result, it is called once while tracing and its value is baked in.
    Its arguments are plain ints, strings and dtypes, which dynamo guards on.
    """
    return grid_constants(grid, mask_size, prefix, device, dtype)


NeighbourhoodFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def flex_neighbourhood(block_mask: Any, scale: float, flex: Optional[Callable[..., Any]] = None) -> NeighbourhoodFn:
    """``(q, k, v) -> (out, lse)`` of strict neighbourhood attention: block-sparse FlexAttention
    (``flex``: a compiled ``flex_attention``, default the eager one)."""
    flex = flex or flex_attention

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if AuxRequest is None:
            return flex(q, k, v, block_mask=block_mask, scale=scale, return_lse=True)
        out, aux = flex(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True))
        return out, aux.lse

    return attend


class _NeighbourhoodAttention(torch.autograd.Function):
    """``(out, lse)`` of strict neighbourhood attention whose backward includes the lse gradient."""

    @staticmethod
    def forward(ctx, q, k, v, attend: NeighbourhoodFn, scale: float):  # type: ignore[override]
        with torch.no_grad():
            out, lse = attend(q, k, v)
        ctx.save_for_backward(q, k, v)
        ctx.attend, ctx.scale = attend, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):  # type: ignore[override]
        q, k, v = ctx.saved_tensors
        attend, scale = ctx.attend, ctx.scale
        with torch.enable_grad():
            q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))
            out, _ = attend(q_, k_, v_)
            grad_out = torch.zeros_like(out) if grad_out is None else grad_out.to(out.dtype)
            dq, dk, dv = torch.autograd.grad(out, (q_, k_, v_), grad_out)
            if grad_lse is not None:
                # lse path: dq_i += scale g_i Σ_j P_ij k_j, dk_j += scale Σ_i g_i P_ij q_i
                keys = k.detach().requires_grad_()
                k_mean, _ = attend(q.detach(), k.detach(), keys)
                acc = torch.promote_types(q.dtype, torch.float32)
                g = grad_lse.unsqueeze(-1).to(acc) * scale
                (dk_lse,) = torch.autograd.grad(k_mean, keys, (g * q.to(acc)).to(k_mean.dtype))
                dq = dq + (g * k_mean.to(acc)).to(dq.dtype)
                dk = dk + dk_lse
        return dq, dk, dv, None, None


def identity(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, log_rest: torch.Tensor,
             inv_rest: torch.Tensor, scale: float, grid: tuple[int, int], mask_size: int, prefix: int,
             zero: bool, attend: Optional[NeighbourhoodFn] = None) -> torch.Tensor:
    """Hard-masked attention of every head from block-sparse FlexAttention plus the rest bucket (module doc).

    ``attend`` replaces FlexAttention by another strict neighbourhood attention (tests).
    """
    batch, heads, tokens, dim = q.shape
    h, w = grid
    attend = attend or flex_neighbourhood(block_mask, scale)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        local, lse = _NeighbourhoodAttention.apply(q, k, v, attend, scale)
    else:
        local, lse = attend(q, k, v)
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
    """The compiled :func:`identity` for inference (one per process; dynamo caches per geometry and dtype)."""
    allow_recompiles()
    return torch.compile(identity, dynamic=False)


@lru_cache(maxsize=1)
def compiled_flex() -> Callable[..., Any]:
    """Compiled ``flex_attention`` for training, where the identity runs eagerly around it."""
    allow_recompiles()
    return torch.compile(flex_attention, dynamic=False)


@torch.compiler.disable   # its autograd function calls autograd.grad in backward: a graph break, not a trace
def _train_identity(*args: Any) -> torch.Tensor:
    """Training on CUDA: the identity eagerly around compiled FlexAttention calls."""
    block_mask, scale = args[3], args[6]
    return identity(*args, attend=flex_neighbourhood(block_mask, scale, compiled_flex()))


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, call: Any, scale: float, **_: Any) -> torch.Tensor:
    q, k, v = autocast_inputs(q, k, v)                    # FlexAttention is not an autocast op
    block_mask, log_rest, inv_rest = traced_grid_constants(call.grid_size, call.mask_size, call.num_prefix_tokens,
                                                           str(q.device), torch.promote_types(q.dtype, torch.float32))
    args = (q, k, v, block_mask, log_rest, inv_rest, float(scale), call.grid_size, call.mask_size,
            call.num_prefix_tokens, call.mode == "zero")
    if q.is_cuda and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _train_identity(*args)
    return compiled()(*args) if q.is_cuda else eager(identity, *args)


def can_run(call: Any) -> Optional[str]:
    """Hard heads on the local window (training on CUDA only: FlexAttention has no CPU backward)."""
    if not available():
        return "torch.nn.attention.flex_attention is not available in this torch"
    if call.needs_grad and call.device_type != "cuda":
        return "FlexAttention has no backward on the CPU (use the local backend to train there)"
    return hard_local_only(call) or gpu_kernel_limits(call, "FlexAttention's GPU kernel")
