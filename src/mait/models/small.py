""" Small MaiT models for laptops and tests (not in the paper)

``mait_nano4_8`` is the built-in default of ``mait train``: pixel tokens (patch size 1) on
scikit-learn's 8x8 handwritten digits, one hard-masked head per layer (Sch.1).  On this
shape Sch.1 measured 97.5 % against 91.7 % unmasked, because locality is exactly
what pixel tokens lack.  A one-pixel token carries a single number, so the position
embedding starts at the scale of the pixel embedding (std 0.5, not timm's 0.02); otherwise
positions stay indistinguishable for hundreds of steps and the loss sits at ln(10).
``mait_micro4_32`` is a CIFAR-sized model (32 px, patch 4, 8x8 grid) small enough for a
10-epoch CPU run; ``mait_mini6_32`` is the shape of the CIFAR-10 study
(``experiments/cifar10``): DeiT's layer design (MLP ratio 4, head dim 32) at D = 96, 6 layers.
"""

from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model

from .mait import MaiT, _cfg, _model

__all__ = ["mait_nano4_8", "mait_micro4_32", "mait_mini6_32"]

PIXEL_POS_EMBED_STD = 0.5
# Backbone shapes shared with the Sparsifiner variants (models/sparsifiner.py).
NANO4_8 = dict(img_size=8, patch_size=1, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4,
               mlp_ratio=2.0, pos_embed_std=PIXEL_POS_EMBED_STD)
MINI6_32 = dict(img_size=32, patch_size=4, num_classes=10, embed_dim=96, depth=6, num_heads=3)


default_cfgs = generate_default_cfgs({
    "mait_nano4_8": _cfg(num_classes=10, input_size=(1, 8, 8), crop_pct=1.0, mean=(0.3053,), std=(0.3760,),
                         first_conv="patch_embed.proj"),
    "mait_micro4_32": _cfg(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0,
                           mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "mait_mini6_32": _cfg(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0,
                          mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
})


@register_model
def mait_nano4_8(pretrained: bool = False, **kwargs: Any) -> MaiT:
    """Digits default: 8x8 grayscale, patch 1, D=64, 4 heads, 4 layers, MLP ratio 2, Sch.1."""
    return _model("mait_nano4_8", pretrained, dict(NANO4_8, scheme="sch1"), kwargs)


@register_model
def mait_micro4_32(pretrained: bool = False, **kwargs: Any) -> MaiT:
    """CIFAR-sized: 32x32 RGB, patch 4 (8x8 grid), D=64, 4 heads, 4 layers, MLP ratio 2, Sch.1 (0.14 M params)."""
    args = dict(img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=4, num_heads=4,
                mlp_ratio=2.0, scheme="sch1")
    return _model("mait_micro4_32", pretrained, args, kwargs)


@register_model
def mait_mini6_32(pretrained: bool = False, **kwargs: Any) -> MaiT:
    """CIFAR-10 study: 32x32 RGB, patch 4 (8x8 grid), D=96, 3 heads of 32, 6 layers, MLP ratio 4, Sch.1 (0.68 M)."""
    return _model("mait_mini6_32", pretrained, dict(MINI6_32, scheme="sch1"), kwargs)
