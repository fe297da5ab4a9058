"""The MaiT model family, registered in timm on import (``timm.create_model("mait_t24_224")``)."""

from .cait import MaskedCait, MaskedTalkingHeadAttn
from .hmait import HMaiT
from .mait import MaiT, MaiTDistilled
from .mask_model import mask_model
from . import small, sparsifiner  # noqa: F401  (register the small and Sparsifiner models)

__all__ = ["HMaiT", "MaiT", "MaiTDistilled", "MaskedCait", "MaskedTalkingHeadAttn", "mask_model"]
