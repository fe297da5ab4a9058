"""Learned, instance-dependent attention masks (Sparsifiner, Wei et al., CVPR 2023): the connectivity predictor.

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

A :class:`mait.MaskedAttention` layer with learned (``l``) heads owns one predictor (shared by
those heads) and runs them as the ``learned`` step of its attention plan; the attention itself
is :func:`learned_attention` (:mod:`mait.backends.learned`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .backends.learned import LEARNED_MODES, check_learned_mode, keep_mask, learned_attention

__all__ = ["ConnectivityPredictor", "LEARNED_MODES", "check_keep_rate", "keep_mask", "kept_keys",
           "learned_attention", "reconstruction_loss"]

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


class ConnectivityPredictor(nn.Module):
    """Sparsifiner's low-rank connectivity predictor for one layer (its weights are shared by the layer's heads).

    ``forward(q, k)`` takes the scaled queries and the keys ``(B, heads, T, d)`` and returns
    the approximate connectivity map ``(B, heads, T - P, T)`` and the kept-key indices
    ``(B, heads, T - P, k)`` (detached; the ``k`` largest entries of each row).  ``mode`` is
    the learned heads' semantics (``"neg_inf"`` or ``"zero"``).  The learned step of the
    layer's plan leaves two results on the predictor: ``reconstruction`` (the loss of the last
    training call, collected by :func:`reconstruction_loss`) and ``last_keep`` (the boolean
    masks of the last call, when the layer captures attention).
    """

    def __init__(self, head_dim: int, num_tokens: int, num_prefix_tokens: int = 1, keep_rate: float = 0.25,
                 mode: str = "neg_inf") -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.num_prefix_tokens = num_prefix_tokens
        self.keep_rate = check_keep_rate(keep_rate)
        self.kept = kept_keys(num_tokens, keep_rate)
        self.mode = check_learned_mode(mode)
        reduced = max(1, head_dim // CHANNEL_REDUCTION)
        basis = max(1, num_tokens // BASIS_REDUCTION)
        self.reduce_c_q = nn.Linear(head_dim, reduced)
        self.reduce_c_k = nn.Linear(head_dim, reduced)
        self.reduce_n = nn.Parameter(torch.empty(num_tokens, basis))
        self.basis = nn.Parameter(torch.empty(basis, num_tokens))
        self.coef_scale = reduced ** -0.5
        nn.init.trunc_normal_(self.reduce_n, std=0.02)
        nn.init.trunc_normal_(self.basis, std=0.02)
        self.reconstruction: Optional[torch.Tensor] = None
        self.last_keep: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return (f"tokens={self.num_tokens}, basis={self.basis.shape[0]}, keep_rate={self.keep_rate:g}, k={self.kept}, "
                f"mode={self.mode!r}")

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

    def reconstruction_error(self, approx: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                             scale: float) -> torch.Tensor:
        """Attention-reconstruction loss of one call: squared error between the approximate map and the
        (detached) dense attention of the patch rows, summed over keys and averaged over rows, heads and images."""
        with torch.no_grad():
            target = ((q[:, :, self.num_prefix_tokens:] * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return (approx - target.to(approx.dtype)).pow(2).sum(dim=-1).mean()


def reconstruction_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """Mean attention-reconstruction loss of the model's last training forward, over its connectivity predictors.

    ``None`` when the model has no learned head (or ran no training forward since the last call).
    Each predictor's loss is handed out once, so a stale value never reaches the optimiser twice.
    """
    losses = []
    for module in model.modules():
        if isinstance(module, ConnectivityPredictor) and module.reconstruction is not None:
            losses.append(module.reconstruction)
            module.reconstruction = None
    return torch.stack(losses).mean() if losses else None
