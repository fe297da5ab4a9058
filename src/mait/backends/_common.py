"""Checks and helpers shared by several backends."""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Optional

import torch

from ..schemes import HeadKind

GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast tensors to the active autocast dtype of their device (unchanged when autocast is off):
    for kernels that are not autocast ops themselves."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def no_autocast(like: torch.Tensor) -> ContextManager[Any]:
    """Autocast off for ``like``'s device type (a no-op context where autocast is not on)."""
    device_type = like.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def hard_local_only(call: Any, bias: bool = False) -> Optional[str]:
    """Why a hard-heads-only, local-window, dropout-free backend cannot run ``call`` (None: it can); ``bias``: the
    backend takes a logit bias."""
    if call.custom_mask:
        return "it only implements the local R x R mask, not a custom mask"
    if call.bias and not bias:
        return ("it takes no additive logit bias (BEiT's relative position bias); the local, matmul, reference "
                "and (unmasked heads) sdpa backends do")
    if call.dropout:
        return "attention dropout needs the dense probabilities (use dropout_p=0, or the matmul or reference backend)"
    if set(call.head_kinds) != {HeadKind.HARD}:
        return (f"every head must be hard-masked (alpha a constant 0), got head kinds "
                f"{''.join(k.value for k in call.head_kinds)!r}")
    return None


def gpu_kernel_limits(call: Any, what: str) -> Optional[str]:
    """Dtype and head-size limits of compiled GPU attention kernels (``what`` names them)."""
    if call.device_type != "cuda":
        return None
    if call.dtype not in GPU_DTYPES:
        return f"{what} takes float16, bfloat16 or float32, not {call.dtype}"
    if call.head_dim < 16:
        return f"{what} needs head_dim >= 16, got {call.head_dim}"
    return None


def eager(fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
    """Run FlexAttention code eagerly (off CUDA: tests), without its warning that it is unfused."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)
