""" Sparsifiner: learned, instance-dependent sparse attention on DeiT backbones

From "Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision
Transformers", Cong Wei, Brendan Duke, Ruowei Jiang, Parham Aarabi, Graham W. Taylor,
Florian Shkurti, CVPR 2023 (arXiv 2303.13755).

Every head of every layer is a learned head (scheme ``*:<heads>l``): a connectivity
predictor per layer picks, per image, the top ``ceil(keep_rate · T)`` keys of each patch
query (:mod:`mait.learned`), built as the authors released it: ``n = T // 6`` basis tokens,
and masks decided by the sparse basis (``basis_threshold=0.02``, ``coef_topk=8``).  The
backbone is DeiT with timm's parameter names, so every DeiT checkpoint loads; only the
predictor's keys (``blocks.*.attn.predictor.*``) are new.  With ``keep_rate=1.0`` the model
computes exactly the dense backbone.

Keyword arguments beyond a MaiT model's: ``keep_rate`` (default 0.25, the release's; a list
gives one per layer), ``mode`` (``"neg_inf"``: the release's semantics; ``"zero"``: MaiT's
zero-logit semantics on the learned mask, mait's variant) and the predictor's
``basis_reduction``, ``basis_threshold``, ``coef_topk`` and ``sparse_basis`` (``False``:
mait's unpruned variant).  ``token_keep_rate`` (default 1.0: off) adds the release's token pruning
(after blocks 3, 6 and 9 of 12 keep ``ceil(ρ^j · N)`` patches; ``token_prune_layers``), the pruned
tokens dropped (docs/sparsity.md).  ``scheme=`` still works, e.g. ``"*:hllu"`` mixes fixed and learned heads.
The release trains it in two stages from the dense model; see the ``sparsifiner_*`` presets.
"""

from __future__ import annotations

from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .mait import MaiT, _cfg, check_features_only, deit_checkpoint_filter
from .small import MINI6_32, NANO4_8, default_cfgs as small_cfgs

__all__ = ["sparsifiner_deit_tiny_224", "sparsifiner_deit_small_224", "sparsifiner_nano4_8", "sparsifiner_mini6_32"]

_PAPER = dict(paper_ids="arXiv:2303.13755", paper_name="Sparsifiner")

default_cfgs = generate_default_cfgs({
    "sparsifiner_deit_tiny_224.fb_in1k": _cfg(hf_hub_id="timm/deit_tiny_patch16_224.fb_in1k", **_PAPER),
    "sparsifiner_deit_small_224.fb_in1k": _cfg(hf_hub_id="timm/deit_small_patch16_224.fb_in1k", **_PAPER),
    "sparsifiner_nano4_8": {**small_cfgs["mait_nano4_8"].default.to_dict(), **_PAPER},
    "sparsifiner_mini6_32": {**small_cfgs["mait_mini6_32"].default.to_dict(), **_PAPER},
})


def _create(variant: str, pretrained: bool, model_args: dict, kwargs: dict) -> MaiT:
    """Build a Sparsifiner model; ``mode`` names the learned heads' semantics (MaiT's ``learned_mode``)."""
    check_features_only(kwargs)
    if "mode" in kwargs:
        kwargs["learned_mode"] = kwargs.pop("mode")
    heads = kwargs.get("num_heads", model_args["num_heads"])
    args = {**model_args, "scheme": f"*:{heads}l", **kwargs}
    return build_model_with_cfg(MaiT, variant, pretrained, pretrained_filter_fn=deit_checkpoint_filter,
                                feature_cfg=dict(out_indices=3, feature_cls="getter"), **args)


@register_model
def sparsifiner_deit_tiny_224(pretrained: bool = False, **kwargs: Any) -> MaiT:
    """Sparsifiner on DeiT-Tiny: D=192, 3 heads, 12 layers, every head learned (keep_rate 0.25)."""
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create("sparsifiner_deit_tiny_224", pretrained, args, kwargs)


@register_model
def sparsifiner_deit_small_224(pretrained: bool = False, **kwargs: Any) -> MaiT:
    """Sparsifiner on DeiT-Small: D=384, 6 heads, 12 layers, every head learned (keep_rate 0.25)."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create("sparsifiner_deit_small_224", pretrained, args, kwargs)


@register_model
def sparsifiner_nano4_8(pretrained: bool = False, **kwargs: Any) -> MaiT:
    """Digits: ``mait_nano4_8``'s shape (8x8 pixel tokens, D=64, 4 heads, 4 layers) with every head learned."""
    return _create("sparsifiner_nano4_8", pretrained, NANO4_8, kwargs)


@register_model
def sparsifiner_mini6_32(pretrained: bool = False, **kwargs: Any) -> MaiT:
    """CIFAR-10: ``mait_mini6_32``'s shape (32 px, patch 4, D=96, 3 heads, 6 layers) with every head learned."""
    return _create("sparsifiner_mini6_32", pretrained, MINI6_32, kwargs)
