"""Analysis of attention maps: collection, Attention Locality Score, cross-layer similarity, soft-mask α.

See ``docs/analysis.md``.  Everything here works on mait models and on unmodified timm
ViT/DeiT/CaiT models.
"""

from .alphas import harden, masked_layers, model_scheme, read_alphas
from .als import attention_locality_score, locality_per_patch, measure_als
from .collect import AttentionLayer, attention_layers, capture_attention, collect_attention, iter_attention
from .similarity import cross_layer_similarity, last_layers_similarity, measure_similarity
from .tables import format_table, save_report, write_csv

__all__ = [
    "AttentionLayer", "attention_layers", "attention_locality_score", "capture_attention", "collect_attention",
    "cross_layer_similarity", "format_table", "harden", "iter_attention", "last_layers_similarity",
    "locality_per_patch", "masked_layers", "measure_als", "measure_similarity", "model_scheme", "read_alphas",
    "save_report", "write_csv",
]
