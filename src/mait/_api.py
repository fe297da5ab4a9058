"""The public API that ``mait`` re-exports; importing it imports torch and timm and registers the MaiT models in timm."""

from .analysis import attention_locality_score, collect_attention, cross_layer_similarity, harden, read_alphas
from .attention import MaskedAttention
from .functional import masked_attention
from .masks import local_mask, neighbour_counts, patch_neighbours, random_mask
from .models import HMaiT, MaiT, MaiTDistilled, MaskedCait, mask_model
from .schemes import BUILTIN_SCHEMES, HeadKind, MaskingScheme, resolve_scheme

__all__ = [
    "BUILTIN_SCHEMES", "HMaiT", "HeadKind", "MaiT", "MaiTDistilled", "MaskedAttention", "MaskedCait", "MaskingScheme",
    "attention_locality_score", "collect_attention", "cross_layer_similarity", "harden", "read_alphas",
    "local_mask", "mask_model", "masked_attention", "neighbour_counts", "patch_neighbours", "random_mask", "resolve_scheme",
]
