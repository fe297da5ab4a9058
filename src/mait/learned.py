"""Learned, instance-dependent attention masks (Sparsifiner, Wei et al., CVPR 2023): the connectivity predictor.

A lightweight *connectivity predictor* estimates, per image and head, which token pairs
matter; every patch query then attends only to its top ``k = ceil(keep_rate · T)`` keys.
As the authors released it (docs/sparsity.md has the point-by-point comparison), the
predictor works on the layer's raw queries and keys:

* ``proj_c_q`` / ``proj_c_k``: linear maps of the head dimension ``d`` to ``c = d / 2``;
* ``proj_n``: a learned ``(T, n)`` matrix that mixes the ``T`` keys into ``n = T // 6`` basis tokens;
* ``softmax(q_c · (k_c P_n)ᵀ / √heads)`` gives each patch query coefficients over the basis, and
  the learned token basis ``proj_back_nᵀ`` ``(n, T)`` turns them into an approximate
  ``(T - P) x T`` connectivity map.

While it learns (the reconstruction loss, :func:`reconstruction_loss`) the predictor uses that
dense map.  Everywhere else its **sparse basis** decides the masks: the basis becomes
``|W|`` where ``|W| > basis_threshold`` (0 elsewhere), each row keeps its ``coef_topk``
largest coefficients (0: all), and the top ``k`` entries of that pruned map are the query's kept
keys.  ``sparse_basis=False`` is mait's unpruned variant (masks from the signed dense map).

Prefix rows (class / distillation token) stay dense.  The mask is not differentiable.  What a
training forward does is the predictor's ``phase`` (set by the training stages,
:mod:`mait.train.stages`): ``"reconstruct"`` (the release's first stage: the layer attends
densely, the predictor records its map for the loss), ``"frozen"`` (the release's second stage:
the layer attends to the pruned predictor's masks, nothing is recorded) or ``"joint"`` (mait's:
both at once).  ``mode="neg_inf"`` is the released semantics (other logits -inf);
``mode="zero"`` applies MaiT's zero-logit semantics to the learned mask (mait's variant).

A :class:`mait.MaskedAttention` layer with learned (``l``) heads owns one predictor (shared by
those heads) and runs them as the ``learned`` step of its attention plan; the attention itself
is :func:`learned_attention` (:mod:`mait.backends.learned`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

from .backends.learned import LEARNED_MODES, check_learned_mode, keep_mask, learned_attention

__all__ = ["ConnectivityPredictor", "LEARNED_MODES", "PHASES", "Prediction", "check_keep_rate", "keep_mask",
           "kept_keys", "learned_attention", "predictors", "reconstruction_loss", "set_phase"]

BASIS_REDUCTION = 6        # n = T // 6 basis tokens (the release's REDUCE_N_FACTOR)
CHANNEL_REDUCTION = 2      # d -> d / 2 channels (REDUCE_C_FACTOR)
BASIS_THRESHOLD = 0.02     # sparse basis: |W| > 0.02 kept (BASIS_THRESHOLD)
COEF_TOPK = 8              # sparse coefficients: the 8 largest of n kept (BASIS_COEF.TOPK)
PHASES = ("joint", "reconstruct", "frozen")
RECONSTRUCTION_REDUCTIONS = ("sum", "row_mean")


def check_keep_rate(keep_rate: float) -> float:
    """``keep_rate`` must lie in (0, 1]: the fraction of keys each patch query keeps."""
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, (int, float)) or not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate must lie in (0, 1] (the fraction of keys each query keeps), got {keep_rate!r}")
    return float(keep_rate)


def kept_keys(tokens: int, keep_rate: float) -> int:
    """``k = ceil(keep_rate · T)``: keys kept per patch query (at least 1, at most T)."""
    return min(tokens, max(1, math.ceil(check_keep_rate(keep_rate) * tokens - 1e-9)))


def _check_options(basis_reduction: int, sparse_basis: bool, basis_threshold: float, coef_topk: int,
                   num_tokens: int) -> None:
    if isinstance(basis_reduction, bool) or not isinstance(basis_reduction, int) \
            or not 1 <= basis_reduction <= num_tokens:
        raise ValueError(f"basis_reduction must be an integer in [1, T = {num_tokens}] (n = T // basis_reduction "
                         f"basis tokens), got {basis_reduction!r}")
    if not isinstance(sparse_basis, bool):
        raise ValueError(f"sparse_basis must be true (masks from the pruned predictor, as released) or false "
                         f"(from the dense map, mait's variant), got {sparse_basis!r}")
    if isinstance(basis_threshold, bool) or not isinstance(basis_threshold, (int, float)) or basis_threshold < 0:
        raise ValueError(f"basis_threshold must be a number >= 0, got {basis_threshold!r}")
    if isinstance(coef_topk, bool) or not isinstance(coef_topk, int) or coef_topk < 0:
        raise ValueError(f"coef_topk must be an integer >= 0 (0: every coefficient), got {coef_topk!r}")


class Prediction(NamedTuple):
    """What a learning call of a predictor leaves for the reconstruction loss: its dense approximate
    map ``(B, heads, T - P, T)`` (differentiable) and the queries and keys it came from (detached)."""

    approx: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    scale: float


class ConnectivityPredictor(nn.Module):
    """Sparsifiner's low-rank connectivity predictor for one layer (its weights are shared by the layer's heads).

    ``forward(q, k, positions=None, dense=False)`` takes the raw queries and keys ``(B, heads, T, d)`` (or
    ``(B, heads, T', d)`` after token pruning, with the tokens' unpruned ``positions`` ``(B, T')``) and returns
    the dense approximate map ``(B, heads, T - P, T)`` (only with ``dense``; else None) and the
    kept-key indices ``(B, heads, T - P, k)`` (detached; the ``k`` largest entries of each row of
    the pruned map).  ``num_heads`` is the layer's head count (the softmax scale is
    ``num_heads ** -0.5``, as released).  The learned step of the layer's plan leaves two results
    on the predictor: ``recorded`` (a :class:`Prediction` of the last learning call, read by
    :func:`reconstruction_loss`) and ``last_keep`` (the boolean masks of the last call, when the
    layer captures attention).
    """

    def __init__(self, head_dim: int, num_tokens: int, num_prefix_tokens: int = 1, keep_rate: float = 0.25,
                 mode: str = "neg_inf", *, num_heads: int = 1, basis_reduction: int = BASIS_REDUCTION,
                 sparse_basis: bool = True, basis_threshold: float = BASIS_THRESHOLD, coef_topk: int = COEF_TOPK) -> None:
        super().__init__()
        _check_options(basis_reduction, sparse_basis, basis_threshold, coef_topk, num_tokens)
        self.num_tokens = num_tokens
        self.num_prefix_tokens = num_prefix_tokens
        self.keep_rate = check_keep_rate(keep_rate)
        self.kept = kept_keys(num_tokens, keep_rate)
        self.mode = check_learned_mode(mode)
        self.sparse_basis = sparse_basis
        self.basis_threshold = float(basis_threshold)
        self.coef_topk = coef_topk
        reduced = max(1, head_dim // CHANNEL_REDUCTION)
        basis = max(1, num_tokens // basis_reduction)
        self.proj_c_q = nn.Linear(head_dim, reduced)
        self.proj_c_k = nn.Linear(head_dim, reduced)
        self.proj_n = nn.Parameter(torch.empty(num_tokens, basis))
        self.proj_back_n = nn.Parameter(torch.empty(num_tokens, basis))
        self.scale = num_heads ** -0.5
        for weight in (self.proj_c_q.weight, self.proj_c_k.weight, self.proj_n, self.proj_back_n):
            nn.init.trunc_normal_(weight, std=0.02)
        nn.init.zeros_(self.proj_c_q.bias)
        nn.init.zeros_(self.proj_c_k.bias)
        self.phase = "joint"
        self.recorded: Optional[Prediction] = None
        self.last_keep: Optional[torch.Tensor] = None

    @property
    def num_basis(self) -> int:
        """``n``: the basis tokens."""
        return self.proj_n.shape[1]

    def extra_repr(self) -> str:
        return (f"tokens={self.num_tokens}, basis={self.num_basis}, keep_rate={self.keep_rate:g}, k={self.kept}, "
                f"mode={self.mode!r}" + (f", basis_threshold={self.basis_threshold:g}, coef_topk={self.coef_topk}"
                                         if self.sparse_basis else ", sparse_basis=False"))

    def coefficients(self, q: torch.Tensor, k: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The patch queries' coefficients over the basis tokens, ``(B, heads, T - P, n)`` (rows sum to 1).

        ``positions`` ``(B, T')``: the tokens present (after token pruning) by their unpruned position, whose
        rows of the per-token table ``proj_n`` mix the keys (default: all ``T``, in order)."""
        q_c = self.proj_c_q(q[:, :, self.num_prefix_tokens:])                # (B, h, T-P, c)
        mix = self.proj_n if positions is None else self.proj_n[positions][:, None]   # (T, n) or (B, 1, T', n)
        k_basis = self.proj_c_k(k).transpose(-2, -1) @ mix                    # (B, h, c, n)
        return (q_c @ k_basis * self.scale).softmax(dim=-1)

    def pruned_basis(self) -> torch.Tensor:
        """The sparse basis ``(n, T)`` that decides masks: ``|W|`` where it exceeds ``basis_threshold``, else 0."""
        magnitude = self.proj_back_n.t().abs()
        return magnitude * (magnitude > self.basis_threshold)

    def kept_for(self, tokens: int) -> int:
        """Keys kept per patch query among ``tokens`` present: ``k``, but at most the patches left after token
        pruning (the release's ``min(attention budget, token budget)``)."""
        return min(self.kept, tokens - self.num_prefix_tokens) if tokens < self.num_tokens else self.kept

    def pruned_coefficients(self, coef: torch.Tensor) -> torch.Tensor:
        """``coef`` with all but its ``coef_topk`` largest entries per row zeroed (unchanged for 0 or ``>= n``)."""
        if self.coef_topk == 0 or self.coef_topk >= coef.shape[-1]:
            return coef
        top = coef.topk(self.coef_topk, dim=-1, sorted=False)
        return torch.zeros_like(coef).scatter(-1, top.indices, top.values)

    def record(self, approx: Optional[torch.Tensor], q: Optional[torch.Tensor] = None,
               k: Optional[torch.Tensor] = None, scale: float = 1.0) -> None:
        """Keep a learning call's dense map (and its detached inputs) for the reconstruction loss; None forgets."""
        self.recorded = None if approx is None else Prediction(approx, q.detach(), k.detach(), scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: Optional[torch.Tensor] = None,
                dense: bool = False) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        if positions is None and q.shape[2] != self.num_tokens:
            raise ValueError(f"the connectivity predictor was built for {self.num_tokens} tokens, got {q.shape[2]}")
        if positions is not None and tuple(positions.shape) != (q.shape[0], q.shape[2]):
            raise ValueError(f"positions must be (B, T') = ({q.shape[0]}, {q.shape[2]}), got {tuple(positions.shape)}")
        coef = self.coefficients(q, k, positions)
        basis = self.proj_back_n.t() if positions is None else self.proj_back_n[positions].transpose(-2, -1)[:, None]
        approx = coef @ basis if dense or not self.sparse_basis else None
        with torch.no_grad():
            if self.sparse_basis:
                pruned = self.pruned_basis() if positions is None else \
                    self.pruned_basis()[:, positions].permute(1, 0, 2)[:, None]       # (B, 1, n, T')
                decide = self.pruned_coefficients(coef) @ pruned
            else:
                decide = approx
            index = decide.topk(self.kept_for(q.shape[2]), dim=-1, sorted=False).indices
        return approx, index


def predictors(model: nn.Module) -> list[ConnectivityPredictor]:
    """The model's connectivity predictors in forward order."""
    return [module for module in model.modules() if isinstance(module, ConnectivityPredictor)]


def set_phase(model: nn.Module, phase: str) -> None:
    """What the model's learned heads do in a training forward (see the module docs): ``"joint"``,
    ``"reconstruct"`` or ``"frozen"``.  Evaluation always attends to the pruned predictor's masks."""
    if phase not in PHASES:
        raise ValueError(f"predictor phase must be one of {PHASES}, got {phase!r}")
    for predictor in predictors(model):
        predictor.phase = phase
        predictor.recorded = None


def reconstruction_error(approx: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """Squared error of one layer's approximate map against its target attention (patch rows): summed over
    everything (``"sum"``, as released) or over keys and averaged over rows, heads and images (``"row_mean"``,
    mait's)."""
    error = (approx - target.to(approx.dtype)).pow(2)
    return error.sum() if reduction == "sum" else error.sum(dim=-1).mean()


def reconstruction_loss(model: nn.Module, targets: Optional[Sequence[Optional[torch.Tensor]]] = None,
                        reduction: str = "sum") -> Optional[torch.Tensor]:
    """Attention-reconstruction loss of the model's last training forward, averaged over its learning predictors.

    ``targets`` (one per predictor, :func:`predictors` order) are the attention maps each predictor
    reconstructs, ``(B, heads, T - P, T)``: the dense teacher's, as released.  Without them each
    predictor reconstructs its own layer's dense attention ``softmax(q kᵀ · scale)`` of that forward
    (mait's variant).  ``None`` when no predictor recorded a map since the last call (no learned
    head, evaluation, ``phase="frozen"``); each recording is handed out once.
    """
    if reduction not in RECONSTRUCTION_REDUCTIONS:
        raise ValueError(f"reconstruction reduction must be one of {RECONSTRUCTION_REDUCTIONS}, got {reduction!r}")
    found = predictors(model)
    if targets is not None and len(targets) != len(found):
        raise ValueError(f"{len(targets)} reconstruction targets for {len(found)} connectivity predictors")
    losses = []
    for index, predictor in enumerate(found):
        recorded, predictor.recorded = predictor.recorded, None
        if recorded is None:
            continue
        target = targets[index] if targets is not None else None
        if target is None:
            with torch.no_grad():
                prefix = predictor.num_prefix_tokens
                target = ((recorded.q[:, :, prefix:] * recorded.scale) @ recorded.k.transpose(-2, -1)).softmax(-1)
        if target.shape != recorded.approx.shape:
            raise ValueError(f"reconstruction target {tuple(target.shape)} does not match the predictor's map "
                             f"{tuple(recorded.approx.shape)}")
        losses.append(reconstruction_error(recorded.approx, target, reduction))
    return torch.stack(losses).mean() if losses else None


def predictor_options(basis_reduction: int = BASIS_REDUCTION, sparse_basis: bool = True,
                      basis_threshold: float = BASIS_THRESHOLD, coef_topk: int = COEF_TOPK) -> dict[str, Any]:
    """The predictor keywords a model passes to its learned layers."""
    return dict(basis_reduction=basis_reduction, sparse_basis=sparse_basis, basis_threshold=basis_threshold,
                coef_topk=coef_topk)


LEGACY_KEYS = ("reduce_c_q.weight", "reduce_c_q.bias", "reduce_c_k.weight", "reduce_c_k.bias", "reduce_n", "basis")


def convert_legacy_predictors(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rewrite the connectivity predictors of a checkpoint written by mait before it followed the release.

    Those predictors (keys ``*.predictor.reduce_c_q/reduce_c_k/reduce_n/basis``) had ``n = T // 8``
    basis tokens, took the queries already scaled by ``d ** -0.5``, scaled their coefficient logits
    by ``(d/2) ** -0.5`` and decided masks from the unpruned map.  Their weights become today's
    (``proj_c_q`` absorbs the two old scales against today's ``num_heads ** -0.5``; the basis is
    stored transposed), which computes the same maps exactly, when ``model``'s predictors have as
    many basis tokens and no sparse basis; otherwise a one-line ``ValueError`` names the keywords
    that build such a model.  A checkpoint without such keys is returned unchanged.
    """
    prefixes = sorted({key[: -len(".reduce_n")] for key in state_dict if key.endswith(".predictor.reduce_n")})
    if not prefixes:
        return state_dict
    modules = dict(model.named_modules())
    for prefix in prefixes:
        predictor = modules.get(prefix)
        legacy = {name: state_dict.pop(f"{prefix}.{name}") for name in LEGACY_KEYS if f"{prefix}.{name}" in state_dict}
        basis = legacy["reduce_n"].shape[1]
        if not isinstance(predictor, ConnectivityPredictor) or predictor.num_basis != basis or predictor.sparse_basis:
            tokens = legacy["reduce_n"].shape[0]
            raise ValueError(f"its connectivity predictors are mait's earlier ones (n = {basis} basis tokens for "
                             f"T = {tokens}, masks from the unpruned map), which this model cannot hold; build it with "
                             f"model_kwargs {{basis_reduction: {tokens // basis}, sparse_basis: false}} to load "
                             f"them (their softmax scale is converted on load)")
        reduced, head_dim = legacy["reduce_c_q.weight"].shape
        query_factor = reduced ** -0.5 / predictor.scale
        state_dict[f"{prefix}.proj_c_q.weight"] = legacy["reduce_c_q.weight"] * (head_dim ** -0.5 * query_factor)
        state_dict[f"{prefix}.proj_c_q.bias"] = legacy["reduce_c_q.bias"] * query_factor
        state_dict[f"{prefix}.proj_c_k.weight"] = legacy["reduce_c_k.weight"]
        state_dict[f"{prefix}.proj_c_k.bias"] = legacy["reduce_c_k.bias"]
        state_dict[f"{prefix}.proj_n"] = legacy["reduce_n"]
        state_dict[f"{prefix}.proj_back_n"] = legacy["basis"].t().contiguous()
    return state_dict
