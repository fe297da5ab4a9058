"""Learned, instance-dependent attention masks (Sparsifiner, Wei et al., CVPR 2023).

A lightweight *connectivity predictor* estimates, per image and head, which token pairs
matter; every patch query then attends only to its top ``k = ceil(keep_rate · T)`` keys.
The predictor works on the layer's (scaled) queries and keys:

* ``reduce_c``: a linear map of the head dimension ``d`` to ``d / 2`` (for q and for k);
* ``reduce_n``: a learned ``(T, n)`` matrix that mixes the ``T`` keys into ``n = T // 8``
  basis tokens;
* ``softmax(q_c · (k_c P_n)ᵀ)`` gives each patch query coefficients over the basis, and the
  learned ``(n, T)`` token basis turns them into an approximate ``(T - P) x T``
  connectivity map; its top ``k`` entries per row are the query's kept keys.

Prefix rows (class / distillation token) stay dense.  The mask is not differentiable: the
predictor learns from an *attention-reconstruction loss* (the approximate map against the
layer's dense attention, :func:`reconstruction_loss`), while the backbone attends only to
the kept pairs.  ``mode="neg_inf"`` is the published semantics (other logits -inf, rows
renormalised over the kept keys); ``mode="zero"`` applies MaiT's zero-logit semantics to the
learned mask (see docs/semantics.md and docs/sparsity.md).

:func:`learned_attention` is the functional op with two exact paths, ``dense`` (a
per-instance boolean mask on the dense definition) and ``gather`` (``O(T·k·d)``: gathers
each query's ``k`` keys), chosen by ``backend="auto"`` from a measured rule.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends import reference

LEARNED_MODES = ("neg_inf", "zero")
LEARNED_BACKENDS = ("auto", "dense", "gather")
BASIS_REDUCTION = 8        # n = T // 8 basis tokens (reduce_n)
CHANNEL_REDUCTION = 2      # d -> d / 2 channels (reduce_c)


def check_keep_rate(keep_rate: float) -> float:
    """``keep_rate`` must lie in (0, 1]: the fraction of keys each patch query keeps."""
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate must lie in (0, 1] (the fraction of keys each query keeps), got {keep_rate!r}")
    return float(keep_rate)


def kept_keys(tokens: int, keep_rate: float) -> int:
    """``k = ceil(keep_rate · T)``: keys kept per patch query (at least 1, at most T)."""
    return min(tokens, max(1, math.ceil(check_keep_rate(keep_rate) * tokens - 1e-9)))


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


class ConnectivityPredictor(nn.Module):
    """Sparsifiner's low-rank connectivity predictor for one layer (its weights are shared by the layer's heads).

    ``forward(q, k)`` takes the scaled queries and the keys ``(B, heads, T, d)`` and returns
    the approximate connectivity map ``(B, heads, T - P, T)`` and the kept-key indices
    ``(B, heads, T - P, k)`` (detached; the ``k`` largest entries of each row).
    """

    def __init__(self, head_dim: int, num_tokens: int, num_prefix_tokens: int = 1, keep_rate: float = 0.25) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.num_prefix_tokens = num_prefix_tokens
        self.keep_rate = check_keep_rate(keep_rate)
        self.kept = kept_keys(num_tokens, keep_rate)
        reduced = max(1, head_dim // CHANNEL_REDUCTION)
        basis = max(1, num_tokens // BASIS_REDUCTION)
        self.reduce_c_q = nn.Linear(head_dim, reduced)
        self.reduce_c_k = nn.Linear(head_dim, reduced)
        self.reduce_n = nn.Parameter(torch.empty(num_tokens, basis))
        self.basis = nn.Parameter(torch.empty(basis, num_tokens))
        self.coef_scale = reduced ** -0.5
        nn.init.trunc_normal_(self.reduce_n, std=0.02)
        nn.init.trunc_normal_(self.basis, std=0.02)

    def extra_repr(self) -> str:
        return f"tokens={self.num_tokens}, basis={self.basis.shape[0]}, keep_rate={self.keep_rate:g}, k={self.kept}"

    def approximate(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The approximate connectivity map ``(B, heads, T - P, T)`` of the patch queries."""
        q_c = self.reduce_c_q(q[:, :, self.num_prefix_tokens:])              # (B, h, T-P, c)
        k_basis = self.reduce_c_k(k).transpose(-2, -1) @ self.reduce_n        # (B, h, c, n)
        coef = (q_c @ k_basis * self.coef_scale).softmax(dim=-1)              # (B, h, T-P, n)
        return coef @ self.basis                                              # (B, h, T-P, T)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if q.shape[2] != self.num_tokens:
            raise ValueError(f"the connectivity predictor was built for {self.num_tokens} tokens, got {q.shape[2]}")
        approx = self.approximate(q, k)
        index = approx.detach().topk(self.kept, dim=-1, sorted=False).indices
        return approx, index


def reconstruction_error(approx: torch.Tensor, q: torch.Tensor, k: torch.Tensor, num_prefix_tokens: int,
                         scale: float) -> torch.Tensor:
    """Attention-reconstruction loss of one layer: squared error between the approximate map and the
    (detached) dense attention of the patch rows, summed over keys and averaged over rows, heads and images."""
    with torch.no_grad():
        target = ((q[:, :, num_prefix_tokens:] * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return (approx - target.to(approx.dtype)).pow(2).sum(dim=-1).mean()


def reconstruction_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """Mean attention-reconstruction loss of the model's last training forward, over layers with learned heads.

    ``None`` when the model has no learned head (or ran no training forward since the last call).
    Each layer's loss is handed out once, so a stale value never reaches the optimiser twice.
    """
    losses = []
    for module in model.modules():
        loss = getattr(module, "reconstruction", None)
        if isinstance(loss, torch.Tensor):
            losses.append(loss)
            module.reconstruction = None
    return torch.stack(losses).mean() if losses else None


def mask_locality(keep: torch.Tensor, grid_size: tuple[int, int], mask_size: int = 3,
                  num_prefix_tokens: int = 1) -> torch.Tensor:
    """ALS of a binary mask ``(B, heads, T, T)``: per head, the fraction of each patch row's kept keys that lie
    in its ``R x R`` window (prefix keys count as outside), averaged over patch rows and images -> ``(heads,)``.

    This is the ALS of the attention map that spreads each row uniformly over its kept keys.
    """
    from .analysis.als import attention_locality_score
    uniform = keep.double() / keep.sum(dim=-1, keepdim=True).clamp_min(1)
    return attention_locality_score(uniform, grid_size, mask_size, num_prefix_tokens).float()


def add_predictor(layer: nn.Module, keep_rate: Optional[float], mode: str) -> None:
    """Give a :class:`mait.MaskedAttention` with learned (``l``) heads its connectivity predictor.

    Sets ``layer.predictor`` (``None`` without learned heads), ``layer.learned_index`` (the learned
    heads, a non-persistent buffer), ``layer.all_learned``, ``layer.learned_mode`` and the analysis
    slots ``last_keep`` / ``reconstruction``.
    """
    from .schemes import HeadKind
    heads = [h for h, kind in enumerate(layer.head_kinds) if kind is HeadKind.LEARNED]
    layer.all_learned = len(heads) == len(layer.head_kinds)
    layer.learned_mode = check_learned_mode(mode)
    layer.last_keep = None
    layer.reconstruction = None
    layer.register_buffer("learned_index", torch.tensor(heads, dtype=torch.long), persistent=False)
    if not heads:
        layer.predictor = None
        return
    if keep_rate is None:
        raise ValueError(f"learned heads (kind 'l', heads {heads}) need a connectivity predictor, but this layer "
                         f"was built without one (keep_rate=None); models that support learned heads take keep_rate")
    layer.predictor = ConnectivityPredictor(layer.head_dim, layer.num_tokens, layer.num_prefix_tokens, keep_rate)


def learned_heads_forward(layer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: Optional[torch.Tensor]) -> torch.Tensor:
    """Run a layer's learned heads: predict their masks, attend, and put their output into ``out``.

    ``out`` holds every head's output from the fixed-mask path (``None`` when every head is
    learned).  In training (with gradients) the layer's reconstruction loss is left in
    ``layer.reconstruction`` for :func:`reconstruction_loss`; with ``capture_attention`` the
    learned heads' probabilities replace theirs in ``last_attention`` and their masks go to
    ``last_keep`` (``(B, learned heads, T, T)`` bool).
    """
    heads = layer.learned_index
    if layer.all_learned:
        q_l, k_l, v_l = q, k, v
    else:
        q_l, k_l, v_l = q.index_select(1, heads), k.index_select(1, heads), v.index_select(1, heads)
    prefix = layer.num_prefix_tokens
    approx, index = layer.predictor(q_l * layer.scale, k_l)
    if layer.training and torch.is_grad_enabled():
        layer.reconstruction = reconstruction_error(approx, q_l, k_l, prefix, layer.scale)
    out_l = learned_attention(q_l, k_l, v_l, index, num_prefix_tokens=prefix, mode=layer.learned_mode,
                              scale=layer.scale, backend="auto")
    if layer.capture_attention:
        keep = keep_mask(index, q.shape[2], prefix)
        zeros = torch.zeros(len(heads), dtype=q.dtype, device=q.device)
        probs = reference.attention_probs(q_l.detach(), k_l.detach(), keep=keep, alpha=zeros,
                                          mode=layer.learned_mode, scale=layer.scale)
        layer.last_attention = probs if layer.all_learned else layer.last_attention.index_copy(1, heads, probs)
        layer.last_keep = keep
    return out_l if layer.all_learned else out.index_copy(1, heads, out_l)


def learned_map_macs(tokens: int, head_dim: int, kept: int, num_prefix_tokens: int) -> int:
    """MACs of ``q kᵀ`` and ``A v`` of one learned head for one image: ``2·d·(P·T + (T-P)·k)`` kept pairs."""
    return 2 * head_dim * (num_prefix_tokens * tokens + (tokens - num_prefix_tokens) * kept)


def predictor_macs(predictor: ConnectivityPredictor, head_dim: int) -> int:
    """MACs of one head's connectivity predictor for one image (dense products, as published before pruning).

    ``reduce_c`` on the patch queries and on every key (``d -> c``), ``k_c`` onto the ``n``
    basis tokens (``c·T·n``), the coefficients (``(T-P)·c·n``) and the map from the basis
    (``(T-P)·n·T``).
    """
    tokens, prefix = predictor.num_tokens, predictor.num_prefix_tokens
    reduced, basis = predictor.reduce_c_q.out_features, predictor.basis.shape[0]
    rows = tokens - prefix
    return (rows + tokens) * head_dim * reduced + reduced * tokens * basis + rows * reduced * basis \
        + rows * basis * tokens


def learned_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every attention layer holding a connectivity predictor, in forward order."""
    return [(name, module) for name, module in model.named_modules()
            if getattr(module, "predictor", None) is not None and hasattr(module, "learned_index")]


@torch.no_grad()
def measure_mask_locality(model: nn.Module, images: object, mask_size: int = 3) -> list[torch.Tensor]:
    """Mask ALS (:func:`mask_locality`) of every learned head of every learned layer: a list of ``(learned heads,)``.

    ``images`` is a ``(B, C, H, W)`` batch or an iterable of batches / ``(images, labels)``
    pairs; the mean is over all images.
    """
    from .analysis.collect import _batches
    layers = learned_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no learned (Sparsifiner) heads; mask ALS needs a model with "
                         f"'l' heads")
    device = next(model.parameters()).device
    sums: list[torch.Tensor] = [torch.zeros(len(layer.learned_index), dtype=torch.float64) for _, layer in layers]
    count, was_training = 0, model.training
    model.eval()
    try:
        for _, layer in layers:
            layer.capture_attention = True
        for batch in _batches(images):
            model(batch.to(device))
            for index, (_, layer) in enumerate(layers):
                sums[index] += mask_locality(layer.last_keep, layer.grid_size, mask_size,
                                             layer.num_prefix_tokens).double().cpu() * len(batch)
            count += len(batch)
    finally:
        model.train(was_training)
        for _, layer in layers:
            layer.capture_attention, layer.last_attention, layer.last_keep = False, None, None
    if count == 0:
        raise ValueError("no images: the data is empty")
    return [(total / count).float() for total in sums]
