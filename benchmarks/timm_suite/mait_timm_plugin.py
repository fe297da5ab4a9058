"""pytest plugin that puts mait's models into timm's own generic model tests (timm's ``tests/test_models.py``).

Loaded with ``-p mait_timm_plugin`` (see ``benchmarks/timm_model_tests.py``): it imports mait, which registers
the models in timm, and files them as timm files its own architectures before the test module picks its models:
the ViT-like ones (MaiT, Masked CaiT, Sparsifiner) with timm's ViTs, DeiTs and CaiTs in the "non-standard"
group (features as tokens, not a spatial map), H-MaiT with Swin in the standard one, and every mait model among
those with ``forward_intermediates``.
"""

from __future__ import annotations

from typing import Any

import timm

import mait  # noqa: F401  (registers the models)

MAIT_MODELS = timm.list_models(["mait_*", "hmait_*", "sparsifiner_*"])
VIT_LIKE = [name for name in MAIT_MODELS if not name.startswith("hmait_")]
_timm_list_models = timm.list_models


def _lists_vits(filters: Any) -> bool:
    """Whether a filter list is timm's list of non-standard (ViT-like) models."""
    return isinstance(filters, (list, tuple)) and "vit_*" in filters


def list_models(*args: Any, **kwargs: Any) -> list[str]:
    names = set(_timm_list_models(*args, **kwargs))
    if kwargs.get("pretrained", False):
        return sorted(names)
    ours = _timm_list_models(["mait_*", "hmait_*", "sparsifiner_*"], include_tags=kwargs.get("include_tags", False))
    vit_like = {name for name in ours if name.split(".")[0] in VIT_LIKE}
    if _lists_vits(kwargs.get("filter", args[0] if args else "")):
        names |= vit_like
    if _lists_vits(kwargs.get("exclude_filters", "")):
        names -= vit_like
    module = kwargs.get("module", "")
    if isinstance(module, (list, tuple)) and "vision_transformer" in module:
        names |= set(ours)
    return sorted(names)


timm.list_models = list_models
