""" Masked Eva: timm's Eva family (EVA-02, the rotary-position ViTs ``vit_*_rope_*``, DINOv3, PE) with mait's masks

timm's ``Eva`` attends with ``EvaAttention`` or ``AttentionRope``: q and k are (optionally) normalised, then
rotated by the rotary position embedding on the patch tokens only (prefix tokens, the class token and
registers, are not rotated).  The masked layer computes the same q, k, v, rope first, and runs the
masked attention of docs/semantics.md on the rotated q and k; prefix rows and columns are never masked.
Everything after the attention (Eva's scale norm, gate, projection) is timm's.  :func:`mait.mask_model`
turns an ``Eva`` into a masked one in place.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat, register_notrace_module

from ..attention import MaskedAttention
from ..masks import GridSize
from ._masking import pruned_features
from .mait import MaskedViTMixin

__all__ = ["MaskedEvaAttention", "MaskedEvaMixin", "kept_rope"]


@register_notrace_module
class MaskedEvaAttention(MaskedAttention):
    """timm's ``EvaAttention`` / ``AttentionRope`` with per-head α masks on the rotated q and k.

    Built from the timm layer by :meth:`adopt` (its parameters and settings kept): fused qkv with EVA's
    q/v biases (``qkv_bias_separate`` too) or separate q/k/v projections, q/k norm, rotary embedding
    (interleaved or ``rotate_half``), grouped-query attention, scale norm and gate all as timm computes them.
    """

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, heads, T, d)`` q, k, v of timm's layer before its q/k norm and rotary embedding."""
        batch, tokens, _ = x.shape
        if self.qkv is None:
            q = self.q_proj(x).reshape(batch, tokens, -1, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).reshape(batch, tokens, -1, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).reshape(batch, tokens, -1, self.head_dim).transpose(1, 2)
            return q, k, v
        q_bias = getattr(self, "q_bias", None)
        if q_bias is None:
            qkv = self.qkv(x)
        else:
            qkv_bias = torch.cat((q_bias, self.k_bias, self.v_bias))
            if self.qkv_bias_separate:
                qkv = self.qkv(x)
                qkv += qkv_bias
            else:
                qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, grid_size: Optional[GridSize] = None) -> torch.Tensor:
        """``x``: ``(B, T, C)`` tokens on the current patch grid; ``rope``: the rotary embedding of its patches."""
        self._begin_call(x, attn_mask, is_causal, grid_size)
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        q, k, v = self._project(x)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            if self.token_index is not None:      # token pruning: each kept patch's rotation at its original position
                rope = kept_rope(rope, self.token_index)
            prefix, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
            q = torch.cat([q[:, :, :prefix], apply_rot_embed_cat(q[:, :, prefix:], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :prefix], apply_rot_embed_cat(k[:, :, prefix:], rope, half=half)], dim=2).type_as(v)
        groups = getattr(self, "num_kv_groups", 1)
        if groups > 1:      # grouped-query attention: head h reads key/value head h // groups, as in timm
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        x = self._attend(q, k, v).transpose(1, 2).reshape(batch, tokens, -1)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


def kept_rope(rope: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rotary embedding ``(N, 2d)``, ``(heads, N, 2d)`` or ``(B, heads, N, 2d)`` of a grid's patches at the kept
    patches ``index`` ``(B, n)``, as ``(B, 1 or heads, n, 2d)``."""
    if rope.dim() == 2:
        return rope[index][:, None]
    if rope.dim() == 3:
        return rope[:, index].transpose(0, 1)
    return rope.gather(2, index[:, None, :, None].expand(-1, rope.shape[1], -1, rope.shape[-1]))


class MaskedEvaMixin(MaskedViTMixin):
    """Masked attention in every block of a timm ``Eva`` (the class :func:`mait.mask_model` gives one); a model
    with ``dynamic_img_size=True`` stays dynamic, its rotary embedding and masks following each batch's grid.
    Under token pruning every kept patch is rotated by the embedding of its original grid position."""

    _wrap_attention = staticmethod(MaskedEvaAttention.adopt)

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        if not self.prunes_tokens():
            return MaskedViTMixin.forward_features(self, x, attn_mask, is_causal)
        x, rope = self._pos_embed(self.patch_embed(x))
        ropes = rope if getattr(self, "rope_mixed", False) and rope is not None else [rope] * len(self.blocks)
        return pruned_features(self, self.norm_pre(x), [dict(rope=block_rope) for block_rope in ropes])
