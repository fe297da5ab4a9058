"""The functional op :func:`masked_attention`: masked multi-head attention with the paper's semantics.

Semantics (docs/semantics.md, paper Eq. 2): ``A = softmax(Mα ⊙ (q kᵀ / √d + B))``, ``out = A v``
where ``Mα`` is 1 on prefix rows/columns and on spatial neighbours within the ``R x R``
window and the head's α elsewhere, and ``B`` an optional logit bias (0 unless given).
α = 0 is the paper's hard mask (non-neighbour logits become 0, *not* -inf), 0 < α < 1 a soft
mask, α = 1 plain attention.  The op runs through an attention plan
(:func:`mait.backends.plan_attention`): which backend runs which heads, decided once per call
shape and cached.  The module :class:`mait.MaskedAttention` (``mait.attention``)
computes the same function inside a model.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence, Union

import torch

from .backends import AttentionCall, plan_attention
from .bias import Bias, RelativeBias
from .masks import GridSize, check_mask_size, check_num_prefix_tokens, local_mask, to_grid
from .schemes import HeadKind

MODES = ("zero", "neg_inf")
AlphaLike = Union[float, int, torch.Tensor, Sequence[float]]
LOCAL_MASK_CACHE_SIZE = 16     # (grid, R, prefix, device) local keep masks shared by every layer


@lru_cache(maxsize=LOCAL_MASK_CACHE_SIZE)
def _cached_local_mask(grid: tuple[int, int], mask_size: int, num_prefix_tokens: int, device: str) -> torch.Tensor:
    # Built outside inference mode even when first asked for inside it, so training can use it later.
    with torch.inference_mode(False):
        return local_mask(grid, mask_size, num_prefix_tokens, device=device)


def cached_local_mask(grid: tuple[int, int], mask_size: int, num_prefix_tokens: int,
                      device: torch.device) -> torch.Tensor:
    """The ``(T, T)`` local keep mask, shared by the op and every layer: cached per geometry and device,
    except while tracing (torch.compile / torch.export), where a cached tensor would be a traced one."""
    if torch.compiler.is_compiling():
        return local_mask(grid, mask_size, num_prefix_tokens, device=device)
    return _cached_local_mask(grid, mask_size, num_prefix_tokens, str(device))


def _alpha_tensor(alpha: AlphaLike, heads: int, like: torch.Tensor) -> torch.Tensor:
    """Validate α and return it as a ``(heads,)`` tensor on ``like``'s device and dtype."""
    if not isinstance(alpha, torch.Tensor):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, list, tuple)):
            raise TypeError(f"alpha must be a float, a sequence of floats or a tensor, got {type(alpha).__name__}")
        if isinstance(alpha, (int, float)):      # the common case: checked without a tensor round trip
            if not 0.0 <= alpha <= 1.0:
                raise ValueError(f"alpha must lie in [0, 1] (0 hard mask, 1 unmasked), got {alpha}")
            return torch.full((heads,), float(alpha), dtype=like.dtype, device=like.device)
        alpha = torch.tensor(alpha, dtype=like.dtype)
    if alpha.dim() == 0:
        alpha = alpha.expand(heads)
    if alpha.dim() != 1 or alpha.shape[0] != heads:
        raise ValueError(f"alpha must be a scalar or have one value per head ({heads},), got shape {tuple(alpha.shape)}")
    if not torch.is_floating_point(alpha):
        alpha = alpha.to(like.dtype)
    bad = (alpha.detach() < 0) | (alpha.detach() > 1) | torch.isnan(alpha.detach())
    if bool(bad.any()):
        raise ValueError(f"alpha must lie in [0, 1] (0 hard mask, 1 unmasked), got {alpha.detach().tolist()}")
    return alpha.to(device=like.device)


def _head_kinds(alpha: AlphaLike, alpha_t: torch.Tensor) -> tuple[HeadKind, ...]:
    """Head kinds of a functional call: from a plain number without a host sync, else from α's values."""
    if isinstance(alpha, (int, float)):
        values = [float(alpha)] * alpha_t.shape[0]
    elif alpha_t.requires_grad:
        return (HeadKind.SOFT,) * alpha_t.shape[0]      # every head needs its α gradient
    else:
        values = alpha_t.detach().tolist()               # one host sync; the α vector is tiny
    return tuple(HeadKind.HARD if a == 0 else HeadKind.NONE if a == 1 else HeadKind.SOFT for a in values)


def _check_mode(mode: str, alpha: torch.Tensor) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "neg_inf":
        soft = (alpha.detach() > 0) & (alpha.detach() < 1)
        if bool(soft.any()):
            raise ValueError(f"mode='neg_inf' supports only hard (α = 0) and unmasked (α = 1) heads; "
                             f"got soft α {alpha.detach().tolist()}")


def needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid_size: GridSize,
                     mask_size: int = 3, num_prefix_tokens: int = 1, alpha: AlphaLike = 0.0,
                     mode: str = "zero", mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                     dropout_p: float = 0.0, bias: Optional[Bias] = None,
                     backend: str = "auto") -> torch.Tensor:
    """Masked multi-head attention with the paper's semantics.

    Args:
        q, k, v: ``(B, heads, T, d)`` with ``T = num_prefix_tokens + H * W``.
        grid_size: ``(H, W)`` patch grid (or one int for a square grid).
        mask_size: odd window size ``R >= 1``.
        num_prefix_tokens: class/distillation tokens in front of the grid (never masked).
        alpha: float or ``(heads,)`` tensor in [0, 1]: 0 hard mask, 1 unmasked, between soft.
            Differentiable.
        mode: ``"zero"`` (paper: non-neighbour logits times α) or ``"neg_inf"`` (hard heads get
            -inf outside the window: strict neighbourhood attention; soft α is an error).
        mask: optional boolean ``(T, T)`` or ``(heads, T, T)`` mask replacing the local window
            (``True`` = full-strength logit), e.g. :func:`mait.random_mask`.
        scale: logit scale, default ``d ** -0.5``.
        dropout_p: dropout on the attention probabilities (training only).
        bias: optional ``(heads, T, T)`` (or ``(1, heads, T, T)``) float logit bias ``B`` added before the mask,
            ``softmax(Mα ⊙ (S + B))`` (BEiT's relative position bias; docs/semantics.md), or the same bias held
            as its tables (:class:`mait.bias.RelativeBias`), which the linear-time backend reads on the window
            without expanding it.
        backend: ``"auto"`` or the name of a registered backend (see :mod:`mait.backends`).

    Returns:
        ``(B, heads, T, d)`` output.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v must be (B, heads, T, d) with matching B, heads, T; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    heads, tokens = q.shape[1], q.shape[2]
    grid = to_grid(grid_size)
    check_mask_size(mask_size)
    check_num_prefix_tokens(num_prefix_tokens)
    if tokens != num_prefix_tokens + grid[0] * grid[1]:
        raise ValueError(f"T = {tokens} tokens does not match grid_size {grid} with {num_prefix_tokens} prefix "
                         f"tokens (expected {num_prefix_tokens + grid[0] * grid[1]})")
    alpha_t = _alpha_tensor(alpha, heads, q)
    _check_mode(mode, alpha_t)
    if mask is not None and (mask.dtype != torch.bool or mask.shape[-2:] != (tokens, tokens)
                             or mask.dim() not in (2, 3) or (mask.dim() == 3 and mask.shape[0] != heads)):
        raise ValueError(f"mask must be a bool tensor of shape (T, T) or (heads, T, T) = ({heads}, {tokens}, "
                         f"{tokens}); got {mask.dtype} {tuple(mask.shape)}")
    if isinstance(bias, RelativeBias):
        if (bias.num_heads, bias.num_tokens) != (heads, tokens):
            raise ValueError(f"bias holds tables for {bias.num_heads} heads and {bias.num_tokens} tokens; the call "
                             f"has {heads} heads and T = {tokens} tokens")
    elif bias is not None and (not torch.is_floating_point(bias) or tuple(bias.shape)[-3:] != (heads, tokens, tokens)
                               or bias.dim() not in (3, 4) or (bias.dim() == 4 and bias.shape[0] != 1)):
        raise ValueError(f"bias must be a float tensor of shape (heads, T, T) = ({heads}, {tokens}, {tokens}) or "
                         f"(1, heads, T, T); got {bias.dtype} {tuple(bias.shape)}")
    bias_tensors = [] if bias is None else bias.tables if isinstance(bias, RelativeBias) else [bias]
    grad = needs_grad(q, k, v, alpha_t, *bias_tensors)
    call = AttentionCall(grid, mask_size, num_prefix_tokens, _head_kinds(alpha, alpha_t), mode=mode,
                         custom_mask=mask is not None, device_type=q.device.type, dtype=q.dtype,
                         head_dim=q.shape[-1], needs_grad=grad, dropout=dropout_p > 0.0, bias=bias is not None)
    plan = plan_attention(call, backend)
    keep = None
    if plan.needs_keep:
        keep = mask.to(q.device) if mask is not None else cached_local_mask(grid, mask_size, num_prefix_tokens, q.device)
    return plan.run(q, k, v, alpha=alpha_t, keep=keep, scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
                    dropout_p=float(dropout_p), bias=bias)
