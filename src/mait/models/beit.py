""" Masked BEiT: timm's Beit (BEiT, BEiT v2) with mait's masks

BEiT adds a learned relative position bias ``B`` (per layer, or one shared by every layer) to the
attention logits.  The masked layer keeps it inside the masked logits, ``softmax(Mα ⊙ (S + B))``
(docs/semantics.md, "Logit bias"): a hard-masked head's non-neighbour logits are 0, bias included,
its neighbour logits and prefix rows/columns carry the bias, and an unmasked head sees ``S + B`` exactly
as BEiT does.  The plan runs biased calls on the backends that take a bias (SDPA for unmasked heads,
the dense ``matmul`` for masked ones) and logs why the linear-time backend is not used.
:func:`mait.mask_model` turns a ``Beit`` into a masked one in place.
"""

from __future__ import annotations

from typing import Optional

import torch
from timm.layers import register_notrace_module
from timm.models.beit import Attention as BeitAttention

from ..masks import GridSize
from .eva import MaskedEvaAttention
from .mait import MaskedViTMixin

__all__ = ["MaskedBeitAttention", "MaskedBeitMixin"]


@register_notrace_module
class MaskedBeitAttention(MaskedEvaAttention):
    """timm's BEiT ``Attention`` with per-head α masks over the biased logits.

    Its q, k, v are EVA's (BEiT is EVA's ancestor: one qkv projection with q and v biases); its own and the
    model's shared relative position bias enter the logits before the mask.
    """

    _rel_pos_bias = BeitAttention._get_rel_pos_bias
    _init_buffers = BeitAttention._init_buffers
    if hasattr(BeitAttention, "set_window_size"):      # Beit.set_input_size resizes every layer's table
        set_window_size = BeitAttention.set_window_size

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None,
                grid_size: Optional[GridSize] = None) -> torch.Tensor:
        """``x``: ``(B, T, C)`` tokens on the layer's patch grid; ``shared_rel_pos_bias``: the model's shared bias."""
        self._begin_call(x, None, False, grid_size)
        batch, tokens, _ = x.shape
        q, k, v = self._project(x)
        bias = self._rel_pos_bias() if self.relative_position_bias_table is not None else None   # (1, heads, T, T)
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        x = self._attend(q, k, v, bias).transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj_drop(self.proj(x))


class MaskedBeitMixin(MaskedViTMixin):
    """Masked attention in every block of a timm ``Beit`` (the class :func:`mait.mask_model` gives one).
    BEiT runs at the image size it was built for (no ``dynamic_img_size``)."""

    _wrap_attention = staticmethod(MaskedBeitAttention.adopt)
    dynamic_img_size = False
