"""mait: masked-attention vision transformers (MaiT, arXiv 2207.03006) for PyTorch and timm.

``import mait`` registers the MaiT models in timm; the public API is re-exported here.
"""

import logging as _logging
import os as _os

from .analysis import attention_locality_score, collect_attention, cross_layer_similarity, harden, read_alphas
from .attention import MaskedAttention
from .functional import masked_attention
from .masks import local_mask, neighbour_counts, patch_neighbours, random_mask
from .models import HMaiT, MaiT, MaiTDistilled, MaskedCait, mask_model
from .schemes import BUILTIN_SCHEMES, HeadKind, MaskingScheme, resolve_scheme

__version__ = "0.1.0"


def _configure_logging() -> None:
    """``MAIT_LOG_LEVEL=debug`` (or info, warning) prints the library's log, e.g. each layer's attention plan."""
    level = _os.environ.get("MAIT_LOG_LEVEL")
    if not level:
        return
    logger = _logging.getLogger("mait")
    if level.upper() not in _logging.getLevelNamesMapping():
        raise ValueError(f"MAIT_LOG_LEVEL must be one of debug, info, warning, error; got {level!r}")
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = _logging.StreamHandler()
        handler.setFormatter(_logging.Formatter("mait %(levelname)s: %(message)s"))
        logger.addHandler(handler)


_configure_logging()

__all__ = [
    "BUILTIN_SCHEMES", "HMaiT", "HeadKind", "MaiT", "MaiTDistilled", "MaskedAttention", "MaskedCait", "MaskingScheme",
    "attention_locality_score", "collect_attention", "cross_layer_similarity", "harden", "read_alphas",
    "local_mask", "mask_model", "masked_attention", "neighbour_counts", "patch_neighbours", "random_mask", "resolve_scheme",
]
