"""Interchangeable backends for :func:`mait.masked_attention` (the NATTEN pattern).

Every backend computes exactly the same function (docs/semantics.md) for the calls it
accepts; ``reference`` is the truth the others are tested against.  A backend is one file
with two functions and a registration here:

* ``can_run(call) -> None | str``: ``None`` when it can run the :class:`AttentionCall`,
  else a short reason.  ``auto`` and an explicitly named backend use the same check.
* ``run(q, k, v, *, alpha, keep, call, scale, dropout_p, bias) -> Tensor``; ``bias`` is the
  ``(heads, T, T)`` or ``(1, heads, T, T)`` logit bias of a call with ``call.bias`` (BEiT's
  relative position bias), else None; a backend registered with ``table_bias=True`` gets a
  :class:`~mait.bias.RelativeBias` as the layer holds it (its tables, to read where it needs them),
  the others the dense matrix.

An :class:`AttentionCall` describes a call without its tensors (geometry, head kinds,
device, dtype, gradient, dropout), so it is hashable: :func:`plan_attention` turns it into
an :class:`AttentionPlan` (which backend runs which heads) once, and the plan is cached.
A :class:`~mait.MaskedAttention` layer decides its plan on its first call per patch grid,
device, dtype and training state, and logs it to the ``mait`` logger (``MAIT_LOG_LEVEL=debug``);
its learned (Sparsifiner) heads are one ``learned`` step of that plan (:mod:`.learned`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Callable, Optional, Sequence

import torch

from ..bias import Bias, bias_heads, dense_bias
from ..schemes import HeadKind
from . import blocksparse, compiled, flex, learned, local, matmul, reference, sdpa, triton_local

logger = logging.getLogger("mait")

RunFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class AttentionCall:
    """One masked-attention call as the backends see it: everything but the tensors.

    ``head_kinds`` holds :class:`HeadKind.HARD`, ``SOFT`` or ``NONE`` per head: a head is
    ``HARD`` when its α is a constant 0, ``NONE`` when a constant 1 and ``SOFT`` otherwise
    (any α that needs a gradient); a layer's call also holds ``LEARNED`` heads.  ``custom_mask`` says that the keep mask is a given
    tensor (random-mask heads, a user mask) rather than the local ``R x R`` window.  ``bias`` says that the
    logits carry an additive ``(heads, T, T)`` (or ``(1, heads, T, T)``) bias before the mask
    (docs/semantics.md, "Logit bias").
    """

    grid_size: tuple[int, int]
    mask_size: int
    num_prefix_tokens: int
    head_kinds: tuple[HeadKind, ...]
    mode: str = "zero"
    custom_mask: bool = False
    device_type: str = "cpu"
    dtype: torch.dtype = torch.float32
    head_dim: int = 64
    needs_grad: bool = False
    dropout: bool = False
    bias: bool = False

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]

    def subset(self, heads: Sequence[int]) -> "AttentionCall":
        return replace(self, head_kinds=tuple(self.head_kinds[h] for h in heads))


@dataclass(frozen=True)
class Backend:
    name: str
    run: RunFn
    can_run: Callable[[AttentionCall], Optional[str]]
    needs_keep: Callable[[AttentionCall], bool]   # whether ``run`` reads the boolean keep mask
    takes_predictor: bool = False                 # whether ``run`` needs the layer's connectivity predictor
    table_bias: bool = False                      # whether ``run`` reads a RelativeBias's tables (no dense matrix)


BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, run: RunFn, can_run: Callable[[AttentionCall], Optional[str]],
                     needs_keep: Callable[[AttentionCall], bool] = lambda call: False,
                     takes_predictor: bool = False, table_bias: bool = False) -> None:
    """Make a backend selectable by name (``auto`` picks among them by the rules below)."""
    BACKENDS[name] = Backend(name, run, can_run, needs_keep, takes_predictor, table_bias)


register_backend("reference", reference.run, reference.can_run, lambda call: True)
register_backend("matmul", matmul.run, reference.can_run, lambda call: True)   # runs every call, like the reference
register_backend("sdpa", sdpa.run, sdpa.can_run)
register_backend("local", local.run, local.can_run, table_bias=True)
register_backend("compiled", compiled.run, compiled.can_run)    # by auto only with MAIT_AUTO_COMPILE=1 (see below)
register_backend("flex", flex.run, flex.can_run, lambda call: call.custom_mask)
register_backend("blocksparse", blocksparse.run, blocksparse.can_run)
register_backend("triton", triton_local.run, triton_local.can_run)   # by name only until measured on a GPU
register_backend("learned", learned.run, learned.can_run, takes_predictor=True)   # a layer's learned heads


# ------------------------------------------------------------------------------ auto's rules
def local_is_faster(grid_size: tuple[int, int], mask_size: int) -> bool:
    """CPU shape rule for hard heads: the linear backend beats the dense one on this grid.

    The linear backend costs about 5x more per (query, window slot) than the dense one per
    (query, key) and has a fixed overhead per window offset, so it wins once the grid holds
    well over ``R²`` patches (measured crossover on CPU: between 7x7 and 14x14 for R = 3;
    see ``benchmarks/README.md``).
    """
    patches = grid_size[0] * grid_size[1]
    return patches >= max(128, 8 * mask_size * mask_size)


# GPU shape rule (H200 measurements in benchmarks/README.md): the fused dense kernel wins up
# to a couple of thousand tokens, the block-sparse identity (O(T·R²·d)) above that.
BLOCKSPARSE_MIN_TOKENS = 2048


def _gpu_whole_layer(call: AttentionCall) -> Optional[Backend]:
    """The one backend that runs a whole CUDA layer, or None to fall back to per-kind groups."""
    if sdpa.can_run(call) is None:                     # no head masked
        return BACKENDS["sdpa"]
    if call.num_tokens >= BLOCKSPARSE_MIN_TOKENS and blocksparse.can_run(call) is None:
        return BACKENDS["blocksparse"]
    if flex.can_run(call) is None:
        return BACKENDS["flex"]
    return None


def _group_backend(call: AttentionCall) -> Backend:
    """Backend for a group of heads of one kind (the CPU policy; CUDA's fallback)."""
    kind = call.head_kinds[0]
    if kind is HeadKind.NONE and sdpa.can_run(call) is None:
        return BACKENDS["sdpa"]
    if kind is HeadKind.HARD and local.can_run(call) is None and (
            call.device_type == "cuda" or local_is_faster(call.grid_size, call.mask_size)):
        if compiled.auto_enabled() and compiled.can_run(call) is None:
            return BACKENDS["compiled"]
        return BACKENDS["local"]
    return BACKENDS["matmul"]


# ------------------------------------------------------------------------------ plans
@dataclass(frozen=True)
class PlanStep:
    backend: Backend
    heads: tuple[int, ...]
    call: AttentionCall

    @property
    def index(self) -> slice | list[int]:
        """The step's heads as a slice when contiguous (a view), else an index list."""
        first, last = self.heads[0], self.heads[-1]
        if last - first + 1 == len(self.heads):
            return slice(first, last + 1)
        return list(self.heads)


@dataclass(frozen=True)
class AttentionPlan:
    """Which backend runs which heads of one call; decided once per :class:`AttentionCall`."""

    call: AttentionCall
    steps: tuple[PlanStep, ...]

    @property
    def needs_keep(self) -> bool:
        return any(step.backend.needs_keep(step.call) for step in self.steps)

    def describe(self) -> str:
        call = self.call
        parts = ", ".join(f"heads {_span(step.heads)} ({''.join(k.value for k in step.call.head_kinds)}) -> "
                          f"{step.backend.name}" for step in self.steps)
        return (f"grid {call.grid_size[0]}x{call.grid_size[1]} R {call.mask_size} prefix {call.num_prefix_tokens} "
                f"{call.mode} on {call.device_type}/{str(call.dtype).replace('torch.', '')}"
                f"{' train' if call.needs_grad else ''}{' bias' if call.bias else ''}: {parts}")

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, alpha: torch.Tensor,
            keep: Optional[torch.Tensor], scale: float, dropout_p: float = 0.0, predictor: Optional[Any] = None,
            capture: bool = False, bias: Optional[Bias] = None) -> torch.Tensor:
        """Every step on its heads; ``predictor`` (and ``capture``) go to a layer's learned-heads step, the
        logit ``bias`` (calls with ``call.bias``) to every step, sliced to its heads (a table bias expanded for the
        steps whose backend reads the dense matrix)."""
        if (bias is not None) != self.call.bias:
            raise ValueError(f"this plan was made for a call {'with' if self.call.bias else 'without'} a logit bias")
        if len(self.steps) == 1:
            return self._run_step(self.steps[0], q, k, v, alpha, keep, scale, dropout_p, predictor, capture, bias)
        out = local.empty_sdpa_layout(v)        # not torch.cat: keeps the module's transpose a free view
        for step in self.steps:
            index = step.index
            step_keep = keep[index] if keep is not None and keep.dim() == 3 else keep
            out[:, index] = self._run_step(step, q[:, index], k[:, index], v[:, index], alpha[index], step_keep,
                                           scale, dropout_p, predictor, capture,
                                           None if bias is None else bias_heads(bias, index))
        return out

    @staticmethod
    def _run_step(step: PlanStep, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor,
                  keep: Optional[torch.Tensor], scale: float, dropout_p: float, predictor: Optional[Any],
                  capture: bool, bias: Optional[Bias]) -> torch.Tensor:
        extra = dict(predictor=predictor, capture=capture) if step.backend.takes_predictor else {}
        if bias is not None:
            extra["bias"] = bias if step.backend.table_bias else dense_bias(bias)
        return step.backend.run(q, k, v, alpha=alpha, keep=keep, call=step.call, scale=scale, dropout_p=dropout_p,
                                **extra)


def _span(heads: tuple[int, ...]) -> str:
    if len(heads) > 1 and heads[-1] - heads[0] + 1 == len(heads):
        return f"{heads[0]}-{heads[-1]}"
    return ",".join(map(str, heads))


@lru_cache(maxsize=512)
def plan_attention(call: AttentionCall, backend: str = "auto") -> AttentionPlan:
    """The plan for ``call``: one named backend for every fixed-mask head, or ``auto``'s choice.

    ``auto`` on CUDA runs a whole layer in one kernel (SDPA when no head is masked, the
    block-sparse identity for long all-hard layers, the fused FlexAttention kernel
    otherwise); on the CPU, and wherever no single fast backend fits, it groups heads by
    kind: unmasked heads on SDPA, hard heads on the linear backend when
    :func:`local_is_faster` (always on CUDA), the rest on the dense ``matmul`` backend.
    Those linear hard heads go to the ``compiled`` backend instead only when the user opts in
    (``MAIT_AUTO_COMPILE=1``, read when a plan is made): its first call per geometry compiles for
    seconds, which ``auto`` does not impose unasked (``torch.compile(model)`` fuses the linear
    backend's window without it).
    Learned heads (a layer's Sparsifiner heads) are always one ``learned`` step, whichever
    backend runs the others.  A named backend that cannot run its heads is an error naming
    the reason.  Steps are numbered with the layer's own heads.
    """
    heads = range(len(call.head_kinds))
    learned_heads = tuple(h for h in heads if call.head_kinds[h] is HeadKind.LEARNED)
    fixed_heads = tuple(h for h in heads if call.head_kinds[h] is not HeadKind.LEARNED)
    steps = []
    if fixed_heads:
        fixed = call.subset(fixed_heads) if learned_heads else call
        steps += [PlanStep(step.backend, tuple(fixed_heads[h] for h in step.heads), step.call)
                  for step in _fixed_steps(fixed, backend)]
    if learned_heads:
        steps.append(PlanStep(BACKENDS["learned"], learned_heads, call.subset(learned_heads)))
    return AttentionPlan(call, tuple(sorted(steps, key=lambda step: step.heads[0])))


def _fixed_steps(call: AttentionCall, backend: str) -> list[PlanStep]:
    """Steps for heads with fixed masks (numbered within ``call``): the named backend, or ``auto``'s groups."""
    heads = tuple(range(len(call.head_kinds)))
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; expected 'auto' or one of {sorted(BACKENDS)}")
        chosen = BACKENDS[backend]
        reason = chosen.can_run(call)
        if reason is not None:
            raise ValueError(f"backend {backend!r} cannot run this call: {reason}")
        return [PlanStep(chosen, heads, call)]
    if call.device_type == "cuda":
        whole = _gpu_whole_layer(call)
        if whole is not None:
            return [PlanStep(whole, heads, call)]
        if call.bias:
            logger.info("a layer with a logit bias on the %dx%d grid runs its heads by kind (hard heads on the "
                        "linear-time backend, the others dense): the fused FlexAttention kernels %s",
                        *call.grid_size, flex.can_run(call))
    groups: dict[str, list[int]] = {}
    for kind in dict.fromkeys(call.head_kinds):
        members = [h for h in heads if call.head_kinds[h] is kind]
        groups.setdefault(_group_backend(call.subset(members)).name, []).extend(members)
    if len(groups) == 1:
        return [PlanStep(BACKENDS[next(iter(groups))], heads, call)]
    return [PlanStep(BACKENDS[name], tuple(sorted(members)), call.subset(sorted(members)))
            for name, members in groups.items()]


__all__ = ["AttentionCall", "AttentionPlan", "BACKENDS", "Backend", "PlanStep", "local_is_faster",
           "plan_attention", "register_backend"]
