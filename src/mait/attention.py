"""The masked attention layer :class:`MaskedAttention`: timm's ``Attention`` with one α per head.

It computes what the functional op :func:`mait.masked_attention` computes (docs/semantics.md,
paper Eq. 2), through an attention plan per layer (:func:`mait.backends.plan_attention`):
which backend runs which of its heads, learned heads included, decided once per patch grid,
device, dtype, gradient and dropout, and logged.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from .backends import AttentionCall, AttentionPlan, learned as learned_backend, logger, plan_attention, reference
from .backends.local import empty_sdpa_layout
from .bias import Bias, bias_at, dense_bias, first_rows
from .functional import MODES, cached_local_mask, needs_grad
from .learned import ConnectivityPredictor, check_learned_mode
from .masks import (GridSize, check_mask_fits_grid, check_mask_size, check_num_prefix_tokens, local_mask, random_mask,
                    to_grid)
from .schemes import HeadKind
from .tokens import class_attention_scores, token_positions

MASK_CACHE_SIZE = 8      # grids whose random masks a layer keeps per device
PLAN_CACHE_SIZE = 32     # (grid, device, dtype, gradient, dropout) plans a layer keeps
SCRIPTING_UNSUPPORTED = ("mait's masked attention does not compile with TorchScript (deprecated in PyTorch); "
                         "use torch.export, torch.compile or `mait export` instead (docs/backbones.md)")


class BoundedCache(OrderedDict):
    """A small least-recently-used map: per-grid plans and masks of a layer stay bounded at ``maxsize``.

    Not state: a copied or pickled layer (``copy.deepcopy``, EMA, ``torch.save``) starts with an empty cache.
    """

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize

    def __reduce__(self) -> tuple:
        return type(self), (self.maxsize,)

    def lookup(self, key: Hashable) -> Any:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def store(self, key: Hashable, value: Any) -> Any:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.maxsize:
            self.popitem(last=False)
        return value


@register_notrace_module   # an fx leaf, like timm's own attention layers: traced models call it as a whole
class MaskedAttention(nn.Module):
    """Drop-in replacement for timm's ``Attention`` with one α per head.

    Parameter names (``qkv``, ``q_norm``, ``k_norm``, ``proj``) match timm's, so DeiT/ViT
    checkpoints load.  Each head is hard-masked (α = 0), soft-masked (learnable α =
    sigmoid(``alpha_logit``) in (0, 1)), a random-mask control, or unmasked (α = 1), given by
    ``head_kinds`` (default: every head hard).  Learned heads (``l``) need ``keep_rate``: the
    layer then owns a connectivity predictor (``predictor``, one per layer, shared by those heads;
    ``predictor_options`` are its further keywords, e.g. ``basis_threshold``) and runs them as the
    ``learned`` step of its plan (:func:`mait.learned.learned_attention`, ``learned_mode``
    ``"neg_inf"`` or ``"zero"``; no attention dropout on them).

    The layer works on the patch grid ``grid_size``: the one it was built for, or the grid of
    the current batch, which a dynamic-size model hands over with :meth:`set_grid` (or a
    caller passes as ``forward(x, grid_size=...)``).  Attention plans are decided once per
    (grid, device, dtype, gradient, dropout) and logged; keep masks are built only for plans
    that read them, once per grid and device; both caches are bounded.

    Set ``capture_attention = True`` to keep the last attention probabilities in
    ``last_attention`` (``(B, heads, T, T)``, detached) for analysis; off by default so the
    normal path never materialises them when a backend does not need to.

    Token pruning (:mod:`mait.tokens`; the model sets these around each call): with ``token_index``
    ``(B, n)`` the call's tokens are the prefix tokens and the patches at those positions of the grid
    (row-major), the others dropped.  Fixed-mask heads then apply their mask over the tokens present
    (a kept patch's window is its ``R x R`` window on the original grid; the other tokens present get
    the head's α, i.e. logit 0 for hard heads), learned heads run their predictor on the tokens present
    (per-token tables indexed by original position).  With ``score_tokens`` the call leaves the class
    token's head-averaged attention to the patches present in ``token_scores`` ``(B, n)``.
    """

    _reused_modules = ("qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop")
    token_index: Optional[torch.Tensor] = None     # patches present after token pruning (None: the whole grid)
    score_tokens: bool = False
    token_scores: Optional[torch.Tensor] = None

    def __init__(self, dim: int, num_heads: int = 8, *, grid_size: GridSize, mask_size: int = 3,
                 num_prefix_tokens: int = 1, head_kinds: Optional[Sequence[Union[HeadKind, str]]] = None,
                 soft_alpha_init: float = 0.5, mask_seed: int = 0, mode: str = "zero", backend: str = "auto",
                 keep_rate: Optional[float] = None, learned_mode: str = "neg_inf",
                 predictor_options: Optional[Mapping[str, Any]] = None, qkv_bias: bool = False, qk_norm: bool = False,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: Optional[type[nn.Module]] = None) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm and norm_layer else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm and norm_layer else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self._setup_masking(grid_size, mask_size, num_prefix_tokens, head_kinds, soft_alpha_init, mask_seed,
                            mode, backend, keep_rate, learned_mode, predictor_options)

    @classmethod
    def from_attention(cls, attn: nn.Module, **masking: Any) -> "MaskedAttention":
        """Wrap an existing timm attention layer, reusing its (already initialised) sub-modules."""
        if getattr(attn, "gate", None) is not None or not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            raise ValueError("MaskedAttention does not support gated or scale-normed timm attention")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.num_heads = attn.num_heads
        self.head_dim = getattr(attn, "head_dim", attn.qkv.in_features // attn.num_heads)
        self.scale = attn.scale
        for name in cls._reused_modules:
            setattr(self, name, getattr(attn, name))
        self._setup_masking(**masking)
        return self

    @classmethod
    def adopt(cls, attn: nn.Module, **masking: Any) -> "MaskedAttention":
        """Wrap a timm attention layer whose computation a subclass reimplements (Eva's, BEiT's): the masked layer
        takes over all of ``attn``'s parameters, buffers (persistent or not), sub-modules and settings, so the
        model's state-dict keys stay timm's."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._parameters.update(attn._parameters)
        self._buffers.update(attn._buffers)
        self._non_persistent_buffers_set.update(attn._non_persistent_buffers_set)
        self._modules.update(attn._modules)
        self.__dict__.update({name: value for name, value in vars(attn).items() if not name.startswith("_")})
        self.head_dim = getattr(attn, "head_dim", None) or self.proj.in_features // self.num_heads
        self._setup_masking(**masking)
        return self

    def _setup_masking(self, grid_size: GridSize, mask_size: int = 3, num_prefix_tokens: int = 1,
                       head_kinds: Optional[Sequence[Union[HeadKind, str]]] = None, soft_alpha_init: float = 0.5,
                       mask_seed: int = 0, mode: str = "zero", backend: str = "auto",
                       keep_rate: Optional[float] = None, learned_mode: str = "neg_inf",
                       predictor_options: Optional[Mapping[str, Any]] = None) -> None:
        heads = self.num_heads
        kinds = tuple(HeadKind(k) for k in (head_kinds if head_kinds is not None else "h" * heads))
        if len(kinds) != heads:
            raise ValueError(f"head_kinds names {len(kinds)} heads but the layer has {heads}")
        if not 0.0 < soft_alpha_init < 1.0:
            raise ValueError(f"soft_alpha_init must lie in (0, 1), got {soft_alpha_init}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "neg_inf" and HeadKind.SOFT in kinds:
            raise ValueError("mode='neg_inf' cannot be combined with soft-masked heads")
        self.mask_size = check_mask_size(mask_size)
        self.num_prefix_tokens = check_num_prefix_tokens(num_prefix_tokens)
        self.head_kinds = kinds
        self.mode = mode
        self.mask_seed = mask_seed
        self.capture_attention = False
        self.last_attention: Optional[torch.Tensor] = None
        self.custom_mask = HeadKind.RANDOM in kinds      # random-mask heads: a per-layer (heads, T, T) mask
        self._random_masks = BoundedCache(MASK_CACHE_SIZE)
        check_learned_mode(learned_mode)

        fixed = torch.tensor([1.0 if k in (HeadKind.NONE, HeadKind.LEARNED) else 0.0 for k in kinds])
        self.register_buffer("alpha_fixed", fixed, persistent=False)
        soft = [h for h, k in enumerate(kinds) if k is HeadKind.SOFT]
        self.register_buffer("soft_index", torch.tensor(soft, dtype=torch.long), persistent=False)
        init_logit = torch.logit(torch.tensor(soft_alpha_init))
        self.alpha_logit = nn.Parameter(init_logit.repeat(len(soft))) if soft else None
        self.unmasked = all(k is HeadKind.NONE for k in kinds)
        # What the plan sees: random-mask heads as hard heads whose window is the stored mask.
        self._call_kinds = tuple(HeadKind.HARD if kind is HeadKind.RANDOM else kind for kind in kinds)
        learned = [h for h, kind in enumerate(kinds) if kind is HeadKind.LEARNED]
        self.register_buffer("learned_index", torch.tensor(learned, dtype=torch.long), persistent=False)
        self.predictor: Optional[ConnectivityPredictor] = None
        self.set_grid(grid_size)
        if learned:
            if keep_rate is None:
                raise ValueError(f"learned heads (kind 'l', heads {learned}) need a connectivity predictor, but this "
                                 f"layer was built without one (keep_rate=None); models that support learned heads "
                                 f"take keep_rate")
            self.predictor = ConnectivityPredictor(self.head_dim, self.num_tokens, self.num_prefix_tokens, keep_rate,
                                                   learned_mode, num_heads=heads, **(predictor_options or {}))
        self.backend = backend

    def __prepare_scriptable__(self) -> "MaskedAttention":
        raise RuntimeError(SCRIPTING_UNSUPPORTED)

    @property
    def backend(self) -> str:
        """The attention backend of this layer (``"auto"`` or a registered name); setting it re-plans."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = name
        self._plans = BoundedCache(PLAN_CACHE_SIZE)

    @property
    def num_tokens(self) -> int:
        """Tokens of a call on the current grid: prefix tokens plus ``H * W`` patches."""
        return self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]

    def set_grid(self, grid_size: GridSize) -> None:
        """Make ``grid_size`` the patch grid of the next calls (a dynamic-size model sets each batch's grid).

        A grid that the ``R x R`` window covers from every patch would leave masked heads unmasked, and a
        learned head's predictor holds tables for one token count: both are one-line errors.
        """
        grid = to_grid(grid_size)
        if grid == getattr(self, "grid_size", None):
            return
        if any(kind.is_masked for kind in self.head_kinds):
            check_mask_fits_grid(self.mask_size, grid)
        if self.predictor is not None and self.num_prefix_tokens + grid[0] * grid[1] != self.predictor.num_tokens:
            predictor_grid = self.grid_size
            raise ValueError(f"a learned head's connectivity predictor holds per-token tables for the "
                             f"{predictor_grid[0]}x{predictor_grid[1]} patch grid, not {grid[0]}x{grid[1]}; "
                             f"build the model for the image size it runs at (img_size=...)")
        self.grid_size = grid
        if self.custom_mask and not torch.compiler.is_compiling():
            self.keep_mask("cpu")     # built eagerly, so a later trace (torch.export) reads it as a constant

    def keep_mask(self, device: Union[torch.device, str, None] = None) -> torch.Tensor:
        """The boolean keep mask of the current grid on ``device`` (default: the layer's):
        ``(T, T)`` local window, or ``(heads, T, T)`` with random-mask heads.  Built once per grid and device."""
        device = torch.device(device) if device is not None else self.alpha_fixed.device
        if not self.custom_mask:
            return cached_local_mask(self.grid_size, self.mask_size, self.num_prefix_tokens, device)
        key = (self.grid_size, str(device))
        mask = self._random_masks.lookup(key)
        if mask is not None:
            return mask
        on_cpu = self._random_masks.lookup((self.grid_size, "cpu"))
        if torch.compiler.is_compiling():            # a tensor made while tracing must not be cached
            return (on_cpu if on_cpu is not None else self._random_keep()).to(device)
        with torch.inference_mode(False):            # usable by training even when first asked for in inference
            mask = (on_cpu if on_cpu is not None else self._random_keep()).to(device)
        return self._random_masks.store(key, mask)

    def _random_keep(self) -> torch.Tensor:
        """``(heads, T, T)``: the local window for masked heads, a seeded random mask for random-mask heads."""
        grid, size, prefix = self.grid_size, self.mask_size, self.num_prefix_tokens
        keep = local_mask(grid, size, prefix).expand(self.num_heads, -1, -1).clone()
        for head, kind in enumerate(self.head_kinds):
            if kind is HeadKind.RANDOM:
                keep[head] = random_mask(grid, size, prefix, seed=self.mask_seed * 1009 + head)
        return keep

    @property
    def mask(self) -> torch.Tensor:
        """Boolean keep mask of the current grid (see :meth:`keep_mask`) on the layer's device."""
        return self.keep_mask()

    def plan(self, q: torch.Tensor, dropout: bool = False, bias: bool = False) -> AttentionPlan:
        """The layer's attention plan for inputs like ``q`` on the current grid; decided once per grid,
        device, dtype, gradient, dropout and logit bias (``bias``: the logits carry an additive bias)."""
        grad = needs_grad(q) or (self.alpha_logit is not None and needs_grad(self.alpha_logit))
        key = (self.grid_size, q.device.type, q.dtype, grad, dropout, bias)
        plan = self._plans.lookup(key)
        if plan is None:
            call = AttentionCall(self.grid_size, self.mask_size, self.num_prefix_tokens, self._call_kinds,
                                 mode=self.mode, custom_mask=self.custom_mask, device_type=q.device.type,
                                 dtype=q.dtype, head_dim=self.head_dim, needs_grad=grad, dropout=dropout,
                                 bias=bias)
            if torch.compiler.is_compiling():
                # traced without its lru_cache, and not cached: dynamo guards on the cache (filling it recompiles)
                return plan_attention.__wrapped__(call, self.backend)
            plan = self._plans.store(key, plan_attention(call, self.backend))
            logger.debug("%s(%s) plan: %s", type(self).__name__, "".join(k.value for k in self.head_kinds),
                         plan.describe())
        return plan

    @property
    def alpha(self) -> torch.Tensor:
        """α per head, ``(heads,)``: 0 hard/random, 1 unmasked, sigmoid(logit) soft."""
        if self.alpha_logit is None:
            return self.alpha_fixed
        return self.alpha_fixed.index_put((self.soft_index,), torch.sigmoid(self.alpha_logit))

    def extra_repr(self) -> str:
        kinds = "".join(k.value for k in self.head_kinds)
        return (f"heads={self.num_heads}, grid={self.grid_size}, mask_size={self.mask_size}, "
                f"prefix={self.num_prefix_tokens}, kinds={kinds!r}, mode={self.mode!r}")

    def _begin_call(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool,
                    grid_size: Optional[GridSize]) -> None:
        """Checks shared by every forward: no outside mask, and tokens that fit the call's grid."""
        if attn_mask is not None or is_causal:
            raise ValueError("MaskedAttention builds its own mask; an extra attn_mask or is_causal is not supported")
        if grid_size is not None:
            self.set_grid(grid_size)
        tokens = x.shape[1]
        if self.token_index is not None:
            if tokens != self.num_prefix_tokens + self.token_index.shape[1]:
                raise ValueError(f"{type(self).__name__} got {tokens} tokens but token pruning left "
                                 f"{self.num_prefix_tokens} prefix + {self.token_index.shape[1]} patch tokens")
        elif tokens != self.num_tokens:
            raise ValueError(f"{type(self).__name__} got {tokens} tokens but its patch grid holds {self.num_tokens} "
                             f"({self.num_prefix_tokens} prefix + {self.grid_size[0]}x{self.grid_size[1]} grid); "
                             f"run it inside its model, or pass grid_size=(H, W) for this input")

    def pruned_keep(self, positions: torch.Tensor) -> torch.Tensor:
        """The keep mask among the tokens present after token pruning, ``(B, 1 or heads, T', T')``: the grid's
        mask (:meth:`keep_mask`) at the tokens' unpruned ``positions`` ``(B, T')``, so a kept patch's window is
        its window on the original grid."""
        full = self.keep_mask(positions.device)
        rows, cols = positions[:, :, None], positions[:, None, :]
        return full[rows, cols][:, None] if full.dim() == 2 else full[:, rows, cols].transpose(0, 1)

    def _pruned_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
                          dropout_p: float, positions: torch.Tensor, bias: Optional[torch.Tensor] = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention among the tokens left by token pruning (at ``positions`` of the unpruned order) and its keep
        mask: fixed-mask heads by the dense definition over the ``T'`` tokens present (SDPA when none is masked),
        with the ``(B, heads, T', T')`` logit ``bias`` when given, learned heads by their predictor on those
        tokens."""
        keep = self.pruned_keep(positions)
        out = empty_sdpa_layout(v)          # the module's transpose back to (B, T', C) is then a free view
        fixed = [h for h, kind in enumerate(self.head_kinds) if kind is not HeadKind.LEARNED]
        if fixed and self.unmasked:
            out[:, fixed] = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p,
                                                           scale=self.scale)
        elif fixed:
            out[:, fixed] = reference.masked_attention(q[:, fixed], k[:, fixed], v[:, fixed],
                                                       keep=keep if keep.shape[1] == 1 else keep[:, fixed],
                                                       alpha=alpha[fixed], mode=self.mode, scale=self.scale,
                                                       dropout_p=dropout_p,
                                                       bias=None if bias is None else bias[:, fixed])
        if self.predictor is not None:
            heads = self.learned_index
            # ``call`` is read for its num_prefix_tokens only, which the layer holds.
            out[:, heads] = learned_backend.run(q[:, heads], k[:, heads], v[:, heads], call=self, scale=self.scale,
                                                predictor=self.predictor, capture=self.capture_attention,
                                                positions=positions)
        return out, keep

    def _probabilities(self, q: torch.Tensor, k: torch.Tensor, alpha: torch.Tensor, keep: torch.Tensor,
                       bias: Optional[Bias] = None) -> torch.Tensor:
        """The attention probabilities of a call, for analysis: the fixed-mask heads' from the definition with
        ``keep`` (and ``bias``), the learned heads' from the masks their predictor kept in that call."""
        q, k = q.detach(), k.detach()
        probs = reference.attention_probs(q, k, keep=keep, alpha=alpha.detach(), mode=self.mode, scale=self.scale,
                                          bias=None if bias is None else dense_bias(bias).detach())
        if self.predictor is None:
            return probs
        heads = self.learned_index
        learned = reference.attention_probs(q.index_select(1, heads), k.index_select(1, heads),
                                            keep=self.predictor.last_keep, alpha=q.new_zeros(len(heads)),
                                            mode=self.predictor.mode, scale=self.scale)
        return probs.index_copy(1, heads, learned)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                grid_size: Optional[GridSize] = None) -> torch.Tensor:
        """``x``: ``(B, T, C)`` tokens on the current patch grid, or on ``grid_size`` when given."""
        self._begin_call(x, attn_mask, is_causal, grid_size)
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = self._attend(q, k, v).transpose(1, 2).reshape(batch, tokens, channels)
        return self.proj_drop(self.proj(x))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                bias: Optional[Bias] = None) -> torch.Tensor:
        """Masked attention of ``(B, heads, T, d)`` queries, keys and values through the layer's plan; ``bias`` an
        optional ``(heads, T, T)`` or ``(1, heads, T, T)`` logit bias, or a :class:`~mait.bias.RelativeBias`, added
        before the mask (docs/semantics.md)."""
        dropout_p = self.attn_drop.p if self.training else 0.0
        alpha = self.alpha
        if self.token_index is None:
            plan = self.plan(q, dropout_p > 0.0, bias is not None)
            keep = self.keep_mask(q.device) if plan.needs_keep or self.capture_attention else None
            out = plan.run(q, k, v, alpha=alpha, keep=keep if plan.needs_keep else None, scale=self.scale,
                           dropout_p=dropout_p, predictor=self.predictor, capture=self.capture_attention, bias=bias)
        else:
            positions = token_positions(self.token_index, self.num_prefix_tokens)
            if bias is not None:      # each kept token's bias at its original position
                bias = bias_at(bias, positions).to(q.dtype)
            out, keep = self._pruned_attention(q, k, v, alpha, dropout_p, positions, bias)
        if self.score_tokens:       # the class token's row of this layer's attention, its bias included
            self.token_scores = class_attention_scores(q, k, self.scale, self.num_prefix_tokens,
                                                       None if bias is None else first_rows(bias, 1))
        if self.capture_attention:
            self.last_attention = self._probabilities(q, k, alpha, keep, bias)
        return out
