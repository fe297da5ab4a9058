"""Interchangeable backends for :func:`mait.masked_attention` (the NATTEN pattern).

Every backend computes exactly the same function (DESIGN §1) and takes the same keyword
arguments (see :class:`AttentionCall`); ``reference`` is the truth the others are tested
against.  :func:`select_backend` resolves ``backend="auto"`` to the best one that supports
a call.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional, Union

import torch

import torch.nn.functional as F

from . import flex, local, reference


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
    # Per-head "hard" / "soft" / "none" when known without reading α (a module knows its
    # heads statically); lets ``auto`` group heads without a host sync or a data-dependent
    # branch, so models stay exportable and GPU calls stay asynchronous.
    head_kinds: Optional[tuple[str, ...]] = None

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


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, dropout_p: float = 0.0,
          **_: object) -> torch.Tensor:
    """Unmasked heads (α = 1): plain ``scaled_dot_product_attention``."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale, dropout_p=dropout_p)


def _sdpa_unsupported(call: AttentionCall) -> Optional[str]:
    alpha = call.alpha.detach()
    if call.alpha.requires_grad:
        return "alpha requires grad; plain SDPA has no gradient with respect to alpha"
    if not bool((alpha == 1).all()):
        return f"every head must be unmasked (alpha 1), got alpha {alpha.tolist()}"
    return None


register_backend("reference", reference.masked_attention)
register_backend("local", local.local_attention, local.unsupported)
register_backend("sdpa", _sdpa, _sdpa_unsupported)
register_backend("flex", flex.flex_local_attention, flex.unsupported)


def local_is_faster(grid_size: tuple[int, int], mask_size: int) -> bool:
    """Shape rule of ``auto`` for hard heads: the linear backend beats the dense one on this grid.

    The linear backend costs about 5x more per (query, window slot) than the dense one per
    (query, key) and has a fixed overhead per window offset, so it wins once the grid holds
    well over ``R²`` patches (measured crossover on CPU: between 7x7 and 14x14 for R = 3;
    see ``benchmarks/README.md``).
    """
    patches = grid_size[0] * grid_size[1]
    return patches >= max(128, 8 * mask_size * mask_size)


def _hard_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid_size: tuple[int, int],
                  mask_size: int) -> Backend:
    # FlexAttention's backward through its lse could not be verified here (no GPU): training
    # stays on the pure-PyTorch linear backend, which runs on CUDA too.
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.is_cuda and flex.available() and not needs_grad:
        return BACKENDS["flex"]
    return BACKENDS["local" if local_is_faster(grid_size, mask_size) else "reference"]


def _group_backend(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kwargs: dict) -> Backend:
    if kind == "hard":
        return _hard_backend(q, k, v, kwargs["grid_size"], kwargs["mask_size"])
    return BACKENDS["sdpa" if kind == "none" else "reference"]


def _subset(call: AttentionCall, heads: Union[torch.Tensor, slice]) -> AttentionCall:
    """The same call restricted to some heads (the local mask is shared by every head)."""
    kinds = call.head_kinds
    if kinds is not None:
        kinds = kinds[heads] if isinstance(heads, slice) else tuple(kinds[h] for h in heads.tolist())
    return replace(call, q=call.q[:, heads], k=call.k[:, heads], v=call.v[:, heads], alpha=call.alpha[heads],
                   head_kinds=kinds)


def _grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """``auto``: run hard, unmasked and soft heads each on their best backend, then reassemble."""
    kinds = kwargs.get("head_kinds")
    if kinds is None:
        alpha = kwargs["alpha"].detach().tolist()      # one host sync; the α vector is tiny
        kinds = ["hard" if a == 0 else "none" if a == 1 else "soft" for a in alpha]
    kinds = list(kinds)
    if len(set(kinds)) == 1:
        return _group_backend(kinds[0], q, k, v, kwargs).fn(q, k, v, **kwargs)
    call = AttentionCall(q, k, v, **kwargs)  # type: ignore[arg-type]
    runs = list(_runs(kinds))
    contiguous = len(runs) == len(set(kinds))   # each kind is one block of heads (the usual "first k heads")
    if contiguous:
        parts = [(_subset(call, slice(a, b)), kind) for a, b, kind in runs]
    else:
        parts = [(_subset(call, torch.tensor([h for h, k in enumerate(kinds) if k == kind], device=q.device)), kind)
                 for kind in dict.fromkeys(kinds)]
    outs = [_group_backend(kind, part.q, part.k, part.v, part.kwargs()).fn(part.q, part.k, part.v, **part.kwargs())
            for part, kind in parts]
    out = local.empty_sdpa_layout(v)       # not torch.cat: keeps the module's transpose a free view
    if contiguous:
        for (start, stop, _), part_out in zip(runs, outs):
            out[:, start:stop] = part_out
    else:
        for (part, kind), part_out in zip(parts, outs):
            out[:, [h for h, k in enumerate(kinds) if k == kind]] = part_out
    return out


def _runs(kinds: list[str]) -> Iterator[tuple[int, int, str]]:
    """``(start, stop, kind)`` for each maximal run of equal kinds."""
    start = 0
    for kind, group in itertools.groupby(kinds):
        stop = start + len(list(group))
        yield start, stop, kind
        start = stop


_AUTO = Backend("auto", _grouped, lambda call: None)


def _auto_is_reference(call: AttentionCall) -> bool:
    """Calls only the dense reference can run as a whole (custom masks, dropout, gradient for α)."""
    return call.custom_mask or call.dropout_p > 0.0 or call.alpha.requires_grad


def select_backend(call: AttentionCall, backend: str = "auto") -> Backend:
    """Return the backend to run ``call`` with; a named backend that cannot run it is an error.

    ``auto`` runs custom masks, attention dropout and calls that need a gradient for α on
    the reference; otherwise it groups heads by α: unmasked heads on SDPA, hard heads on
    FlexAttention plus the identity on CUDA (inference), else on the linear backend when
    :func:`local_is_faster` says so (else on the reference), soft heads on the reference.
    """
    if backend == "auto":
        return BACKENDS["reference"] if _auto_is_reference(call) else _AUTO
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected 'auto' or one of {sorted(BACKENDS)}")
    chosen = BACKENDS[backend]
    reason = chosen.unsupported(call)
    if reason is not None:
        raise ValueError(f"backend {backend!r} cannot run this call: {reason}")
    return chosen
