"""The learned-mask backend: attention in which each patch query sees only the keys its layer's
connectivity predictor kept (Sparsifiner, Wei et al., CVPR 2023; docs/sparsity.md).

:func:`learned_attention` is the functional op with two exact paths, ``dense`` (a per-instance
boolean mask on the dense definition) and ``gather`` (``O(T·k·d)``: gathers each query's ``k``
keys), chosen by ``backend="auto"`` from a measured rule.  As a step of a layer's attention plan
(``learned``), :func:`run` asks the layer's :class:`mait.learned.ConnectivityPredictor` for the
kept keys, leaves its reconstruction loss (training) and masks (analysis) on the predictor, and
attends.  Prefix rows (class / distillation token) stay dense.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..schemes import HeadKind
from . import reference

LEARNED_MODES = ("neg_inf", "zero")
LEARNED_BACKENDS = ("auto", "dense", "gather")


def check_learned_mode(mode: str) -> str:
    if mode not in LEARNED_MODES:
        raise ValueError(f"learned-mask mode must be one of {LEARNED_MODES}, got {mode!r}")
    return mode


def keep_mask(index: torch.Tensor, tokens: int, num_prefix_tokens: int) -> torch.Tensor:
    """Dense boolean ``(B, heads, T, T)`` mask from kept-key indices ``(B, heads, T - P, k)``; prefix rows all True."""
    batch, heads, rows, _ = index.shape
    patch = torch.zeros(batch, heads, rows, tokens, dtype=torch.bool, device=index.device)
    patch.scatter_(-1, index, True)
    prefix = torch.ones(batch, heads, num_prefix_tokens, tokens, dtype=torch.bool, device=index.device)
    return torch.cat([prefix, patch], dim=2)


def _check_index(q: torch.Tensor, index: torch.Tensor, num_prefix_tokens: int, mode: str) -> None:
    batch, heads, tokens, _ = q.shape
    rows = tokens - num_prefix_tokens
    if index.dtype != torch.long or index.dim() != 4 or tuple(index.shape[:3]) != (batch, heads, rows):
        raise ValueError(f"index must be a long tensor (B, heads, T - P, k) = ({batch}, {heads}, {rows}, k); "
                         f"got {index.dtype} {tuple(index.shape)}")
    if index.shape[-1] > tokens:
        raise ValueError(f"index keeps {index.shape[-1]} keys per query but there are only T = {tokens} tokens")
    if mode == "neg_inf" and index.shape[-1] == 0 and rows > 0:
        raise ValueError("mode='neg_inf' with zero kept keys per query leaves every softmax row empty; "
                         "keep at least one key (keep_rate > 0)")


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, num_prefix_tokens: int,
           mode: str, scale: float) -> torch.Tensor:
    """The dense definition with a per-instance mask: bool-mask SDPA (``neg_inf``) or the reference (``zero``)."""
    keep = keep_mask(index, q.shape[2], num_prefix_tokens)
    if mode == "neg_inf":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    alpha = torch.zeros(q.shape[1], dtype=q.dtype, device=q.device)
    return reference.masked_attention(q, k, v, keep=keep, alpha=alpha, mode="zero", scale=scale)


def _gather(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, num_prefix_tokens: int,
            mode: str, scale: float) -> torch.Tensor:
    """``O(T·k·d)``: each patch query attends to its ``k`` gathered keys; prefix rows run dense.

    ``zero`` mode adds the constant mass of the non-kept logits (each exactly 0): with
    ``m = max(0, max kept s)``, ``num = Σ_kept (e^{s-m} - e^{-m}) v + e^{-m} Σ_all v`` and
    ``den = Σ_kept e^{s-m} + (T - k) e^{-m}`` (the linear-time identity of docs/semantics.md).
    """
    batch, heads, tokens, dim = q.shape
    prefix = num_prefix_tokens
    flat = index.flatten(2)                                                  # (B, h, (T-P)·k)
    k_sel = k.gather(2, flat[..., None].expand(-1, -1, -1, dim)).view(*index.shape, dim)
    v_sel = v.gather(2, flat[..., None].expand(-1, -1, -1, v.shape[-1])).view(*index.shape, v.shape[-1])
    scores = torch.einsum("bhnd,bhnkd->bhnk", q[:, :, prefix:] * scale, k_sel)
    if mode == "neg_inf":
        patch_out = torch.einsum("bhnk,bhnkd->bhnd", scores.softmax(dim=-1), v_sel)
    else:
        m = scores.amax(dim=-1, keepdim=True).clamp_min(0).detach()
        weights = torch.exp(scores - m)
        floor = torch.exp(-m)
        num = torch.einsum("bhnk,bhnkd->bhnd", weights - floor, v_sel) + floor * v.sum(dim=2, keepdim=True)
        den = weights.sum(dim=-1, keepdim=True) + (tokens - index.shape[-1]) * floor
        patch_out = num / den
    if prefix == 0:
        return patch_out
    prefix_out = F.scaled_dot_product_attention(q[:, :, :prefix], k, v, scale=scale)
    return torch.cat([prefix_out, patch_out], dim=2)


def gather_is_faster(tokens: int, kept: int) -> bool:
    """Rule of ``backend="auto"``: the gather path beats the dense one for this shape.

    Measured on CPU, one thread (``benchmarks/learned_attention.py``, see docs/sparsity.md):
    a gathered (query, key) pair costs 5-10x a dense one, so the dense path wins at every
    ViT size (2-10x faster up to 1601 tokens at keep 0.05-0.25); the gather path first wins
    at 3137 tokens keeping 2 % of the keys (1.07x) and still loses keeping 5 % (0.47x).
    """
    return tokens >= 3000 and kept * 40 <= tokens


def learned_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, *,
                      num_prefix_tokens: int = 1, mode: str = "neg_inf", scale: Optional[float] = None,
                      backend: str = "auto") -> torch.Tensor:
    """Attention in which each patch query sees only its kept keys (prefix queries see every key).

    Args:
        q, k, v: ``(B, heads, T, d)``.
        index: ``(B, heads, T - P, k)`` long: the keys each patch query keeps (distinct per row).
        num_prefix_tokens: ``P``, the class/distillation tokens in front of the patches (dense rows).
        mode: ``"neg_inf"`` (Sparsifiner: other logits -inf) or ``"zero"`` (MaiT: other logits 0).
        scale: logit scale, default ``d ** -0.5``.
        backend: ``"dense"``, ``"gather"`` or ``"auto"`` (:func:`gather_is_faster`).

    Returns:
        ``(B, heads, T, d)``.
    """
    check_learned_mode(mode)
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v must be (B, heads, T, d) with matching B, heads, T; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not 0 <= num_prefix_tokens <= q.shape[2]:
        raise ValueError(f"num_prefix_tokens must lie in [0, T = {q.shape[2]}], got {num_prefix_tokens}")
    _check_index(q, index, num_prefix_tokens, mode)
    if backend not in LEARNED_BACKENDS:
        raise ValueError(f"learned-attention backend must be one of {LEARNED_BACKENDS}, got {backend!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    tokens, kept = q.shape[2], index.shape[-1]
    if kept == tokens:          # every key kept: exactly plain attention, in both modes
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if backend == "auto":
        backend = "gather" if gather_is_faster(tokens, kept) else "dense"
    path = _gather if backend == "gather" else _dense
    return path(q, k, v, index, num_prefix_tokens, mode, scale)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, call: Any, scale: float, predictor: Any,
        capture: bool = False, positions: Optional[torch.Tensor] = None, **_: Any) -> torch.Tensor:
    """The learned heads of a layer: the predictor's kept keys, then :func:`learned_attention`.

    A training call with gradients in the predictor's ``"joint"`` or ``"reconstruct"`` phase
    leaves its dense map on the predictor (``predictor.recorded``, read by
    :func:`mait.learned.reconstruction_loss`); in ``"reconstruct"`` the heads attend densely (the
    backbone's attention stays undistorted while the predictor learns, as released).  With
    ``capture`` the boolean masks ``(B, heads, T, T)`` of the call go to ``predictor.last_keep``.  After token
    pruning ``positions`` ``(B, T')`` are the tokens' unpruned positions (:mod:`mait.tokens`).
    """
    learning = predictor.training and torch.is_grad_enabled() and predictor.phase != "frozen"
    approx, index = predictor(q, k, positions, dense=learning)
    predictor.record(approx if learning else None, q, k, scale)
    dense = learning and predictor.phase == "reconstruct"
    if capture:
        tokens = q.shape[2]
        predictor.last_keep = q.new_ones(*q.shape[:2], tokens, tokens, dtype=torch.bool) if dense else \
            keep_mask(index, tokens, call.num_prefix_tokens)
    else:
        predictor.last_keep = None
    if dense:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return learned_attention(q, k, v, index, num_prefix_tokens=call.num_prefix_tokens, mode=predictor.mode,
                             scale=scale, backend="auto")


def can_run(call: Any) -> Optional[str]:
    """Learned heads only: they need their layer's connectivity predictor."""
    if set(call.head_kinds) != {HeadKind.LEARNED}:
        return "it runs learned (Sparsifiner) heads only, with their layer's connectivity predictor"
    if call.bias:
        return "it takes no additive logit bias"
    return None
