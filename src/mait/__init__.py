"""mait: masked-attention vision transformers (MaiT, arXiv 2207.03006) for PyTorch and timm.

``import mait`` registers the MaiT models in timm; the public API is re-exported here.
"""

from .analysis import attention_locality_score, collect_attention, cross_layer_similarity, harden, read_alphas
from .attention import MaskedAttention, masked_attention
from .masks import local_mask, neighbour_counts, patch_neighbours, random_mask
from .models import HMaiT, MaiT, MaiTDistilled, MaskedCait
from .schemes import BUILTIN_SCHEMES, HeadKind, MaskingScheme, resolve_scheme

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_SCHEMES", "HMaiT", "HeadKind", "MaiT", "MaiTDistilled", "MaskedAttention", "MaskedCait", "MaskingScheme",
    "attention_locality_score", "collect_attention", "cross_layer_similarity", "harden", "read_alphas",
    "local_mask", "masked_attention", "neighbour_counts", "patch_neighbours", "random_mask", "resolve_scheme",
]
