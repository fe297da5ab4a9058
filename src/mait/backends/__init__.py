"""Interchangeable backends for :func:`mait.masked_attention` (the NATTEN pattern).

Every backend computes exactly the same function (DESIGN §1) and takes the same keyword
arguments (see :class:`AttentionCall`); ``reference`` is the truth the others are tested
against.  :func:`select_backend` resolves ``backend="auto"`` to the best one that supports
a call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import reference


@dataclass(frozen=True)
class AttentionCall:
    """Everything a backend needs to know about one call, validated by the front end."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    keep: torch.Tensor              # bool (T, T) or (heads, T, T): True = full-strength logit
    alpha: torch.Tensor             # (heads,) in [0, 1]
    mode: str                       # "zero" (paper) or "neg_inf" (strict neighbourhood)
    grid_size: tuple[int, int]
    mask_size: int
    num_prefix_tokens: int
    custom_mask: bool               # True when ``keep`` is not the local R x R mask
    scale: float
    dropout_p: float

    def kwargs(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__ if f not in ("q", "k", "v")}


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable[..., torch.Tensor]
    # Returns None when the backend can run the call, else a short reason why not.
    unsupported: Callable[[AttentionCall], Optional[str]]


BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, fn: Callable[..., torch.Tensor],
                     unsupported: Callable[[AttentionCall], Optional[str]] = lambda call: None) -> None:
    BACKENDS[name] = Backend(name, fn, unsupported)


register_backend("reference", reference.masked_attention)


def select_backend(call: AttentionCall, backend: str = "auto") -> Backend:
    """Return the backend to run ``call`` with; a named backend that cannot run it is an error."""
    if backend == "auto":
        return BACKENDS["reference"]
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected 'auto' or one of {sorted(BACKENDS)}")
    chosen = BACKENDS[backend]
    reason = chosen.unsupported(call)
    if reason is not None:
        raise ValueError(f"backend {backend!r} cannot run this call: {reason}")
    return chosen
