""" Masked BEiT: timm's Beit (BEiT, BEiT v2) with mait's masks

BEiT adds a learned relative position bias ``B`` (per layer, or one shared by every layer) to the
attention logits.  The masked layer keeps it inside the masked logits, ``softmax(Mα ⊙ (S + B))``
(docs/semantics.md, "Logit bias"): a hard-masked head's non-neighbour logits are 0, bias included,
its neighbour logits and prefix rows/columns carry the bias, and an unmasked head sees ``S + B`` exactly
as BEiT does.  The bias goes to the op as its tables (:class:`mait.bias.RelativeBias`): hard heads on the
linear-time backend read them on the ``R x R`` window offsets, never building the ``(heads, T, T)`` matrix
that the dense backends (SDPA for unmasked heads, ``matmul`` for soft ones) get expanded.
:func:`mait.mask_model` turns a ``Beit`` into a masked one in place.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from timm.layers import register_notrace_module
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import RelativePositionBias

from ..bias import Bias, RelativeBias, add_biases
from ..masks import GridSize
from .eva import MaskedEvaAttention
from ._masking import pruned_features
from .mait import MaskedViTMixin

__all__ = ["MaskedBeitAttention", "MaskedBeitMixin", "SharedRelativeBias"]


@register_notrace_module
class MaskedBeitAttention(MaskedEvaAttention):
    """timm's BEiT ``Attention`` with per-head α masks over the biased logits.

    Its q, k, v are EVA's (BEiT is EVA's ancestor: one qkv projection with q and v biases); its own and the
    model's shared relative position bias enter the logits before the mask.
    """

    _init_buffers = BeitAttention._init_buffers
    if hasattr(BeitAttention, "set_window_size"):      # Beit.set_input_size resizes every layer's table
        set_window_size = BeitAttention.set_window_size

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[Bias] = None,
                grid_size: Optional[GridSize] = None) -> torch.Tensor:
        """``x``: ``(B, T, C)`` tokens on the layer's patch grid; ``shared_rel_pos_bias``: the model's shared bias
        (its tables from a masked model, a ``(heads, T, T)`` tensor from a caller)."""
        self._begin_call(x, None, False, grid_size)
        batch, tokens, _ = x.shape
        q, k, v = self._project(x)
        bias = None
        if self.relative_position_bias_table is not None:
            bias = RelativeBias([(self.relative_position_bias_table, self.relative_position_index)])
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else add_biases(bias, shared_rel_pos_bias)
        x = self._attend(q, k, v, bias).transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj_drop(self.proj(x))


@register_notrace_module
class SharedRelativeBias(RelativePositionBias):
    """timm's shared ``RelativePositionBias`` of a masked BEiT: hands the layers its table (a
    :class:`~mait.bias.RelativeBias`) instead of the expanded ``(heads, T, T)`` matrix."""

    def forward(self) -> RelativeBias:
        return RelativeBias([(self.relative_position_bias_table, self.relative_position_index)], shared=True)


class MaskedBeitMixin(MaskedViTMixin):
    """Masked attention in every block of a timm ``Beit`` (the class :func:`mait.mask_model` gives one); a shared
    relative position bias reaches the layers as its table.  Under token pruning the bias between two kept tokens
    is the bias of their original positions.  BEiT runs at the image size it was built for (no
    ``dynamic_img_size``)."""

    _wrap_attention = staticmethod(MaskedBeitAttention.adopt)
    dynamic_img_size = False

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        if not self.prunes_tokens():
            return MaskedViTMixin.forward_features(self, x, attn_mask, is_causal)
        x = self.patch_embed(x)      # timm's Beit.forward_features up to its blocks
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        shared = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        return pruned_features(self, self.pos_drop(x), [dict(shared_rel_pos_bias=shared)] * len(self.blocks))

    def install_masks(self, **masking: Any) -> None:
        MaskedViTMixin.install_masks(self, **masking)     # called on the timm model before its class changes
        if isinstance(self.rel_pos_bias, RelativePositionBias):
            self.rel_pos_bias.__class__ = SharedRelativeBias
