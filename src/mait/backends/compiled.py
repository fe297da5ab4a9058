"""The compiled backend: the linear-time window (``local``'s identity) as plain tensor code, fused by inductor.

:func:`window_attention` computes exactly what the ``local`` backend computes (docs/performance.md,
"The linear backend") but written for the compiler rather than for eager mode: keys and values are
zero-padded by ``r``, each of the ``R²`` window slots is one shifted slice and ``(q * k_slice).sum(-1)``,
the prefix keys are ``P`` more slots, and the zero logits are the rest bucket::

    m_i   = max(0, max_slots S_ij)
    out_i = Σ_slots (p_ij - rest_i) v_j  +  rest_i Σ_all v_j,    rest_i = e^{-m_i} / den_i

(``mode="neg_inf"``: padded slots get -inf and there is no rest bucket).  Eagerly this would be slow
(every slot a pass over memory); ``torch.compile`` (inductor) fuses the slots into one loop nest per
pass, forward and backward (the backward is autograd's, derived and fused by the compiler), so the
window is read from cache instead of streamed ``R²`` times.  Prefix rows are dense, as reductions over the tokens
(fused with the other passes over ``k`` and ``v``).  On a CPU,
half-precision inputs (bf16 autocast) are computed in float32 inside the fused code and cast back.

:func:`run` calls the function through ``torch.compile(dynamic=False)``: dynamo compiles it once per
geometry, batch, dtype, device, gradient mode and (on a CPU) torch thread count, and caches it; the
first call of each says so before it compiles (a WARNING on the ``mait`` logger, shown by default) and
logs its compile time (INFO).  Inside a ``torch.compile`` or ``torch.export`` trace of a whole model
the plain function is traced instead (no nested compile, no graph break), and so is the ``local``
backend's (:mod:`.local`): compiling a mait model fuses its window.

It needs inductor and, on a CPU, a C++ compiler (on CUDA, Triton); without them :func:`can_run`
refuses in one line and ``auto`` keeps the ``local`` backend.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from functools import lru_cache
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ._common import autocast_inputs, hard_local_only, no_autocast

logger = logging.getLogger("mait")

HALF = (torch.bfloat16, torch.float16)
AUTO_ENV = "MAIT_AUTO_COMPILE"     # "1": ``auto`` may pick this backend in eager mode (see :func:`auto_enabled`)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid_size: tuple[int, int],
                     mask_size: int, num_prefix_tokens: int, zero: bool, scale: float,
                     bias: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Hard-masked attention (every head α = 0) as compile-friendly tensor code; the reference's result.

    ``q, k, v`` are ``(B, heads, T, d)`` with ``T = num_prefix_tokens + H * W``; ``zero`` selects the
    paper's zero logits (else ``neg_inf``); ``bias`` an optional logit bias as the local backend reads it:
    on the window slots, the prefix columns and the prefix rows (``local.window_bias`` and ``bias[:, :P]``).
    """
    out_dtype = q.dtype
    if q.device.type == "cpu" and q.dtype in HALF:     # the CPU's element-wise work: faster and exact in float32
        q, k, v = q.float(), k.float(), v.float()
    slot_bias, prefix_bias, row_bias = (None, None, None) if bias is None else (b.to(q.dtype) for b in bias)
    batch, heads, _, dim = q.shape
    p, (h, w), size = num_prefix_tokens, grid_size, mask_size
    r, n = (size - 1) // 2, h * w
    qg = (q[:, :, p:] * scale).reshape(batch, heads, h, w, dim)
    pad = (0, 0, r, r, r, r)
    kpad = F.pad(k[:, :, p:].reshape(batch, heads, h, w, dim), pad)
    vg = v[:, :, p:].reshape(batch, heads, h, w, dim)
    vpad = F.pad(vg, pad)
    offsets = [(dy, dx) for dy in range(size) for dx in range(size)]
    kp, vp = k[:, :, :p, None, None, :], v[:, :, :p, None, None, :]          # (B, heads, P, 1, 1, d)
    # Logits of the R² window slots, then of the P prefix keys: R² + P tensors (B, heads, H, W, 1), kept apart so
    # that the softmax over them is element-wise code the compiler fuses into the pass over the values (a stacked
    # slot axis costs its own passes: measured in docs/performance.md).
    scores = ([(qg * kpad[:, :, dy:dy + h, dx:dx + w]).sum(-1, keepdim=True) for dy, dx in offsets]
              + [(qg * kp[:, :, j]).sum(-1, keepdim=True) for j in range(p)])
    if bias is not None:      # padded slots get 0 from window_bias, so they stay zero logits
        scores = [s + b for s, b in zip(scores, torch.cat([slot_bias, prefix_bias], -1).split(1, -1))]
    if not zero:      # padded slots are outside the grid: -inf (strict neighbourhood attention)
        inside = F.pad(torch.ones(h, w, 1, device=q.device), (0, 0, r, r, r, r))
        scores = [s.masked_fill(inside[dy:dy + h, dx:dx + w] == 0, float("-inf"))
                  for s, (dy, dx) in zip(scores, offsets)] + scores[size * size:]
    peak = functools.reduce(torch.maximum, scores)
    if zero:
        peak = peak.clamp(min=0)
    probs = [torch.exp(s - peak) for s in scores]
    rest = torch.exp(-peak) if zero else torch.zeros_like(peak)               # weight of each zero logit
    den = sum(probs) + (n - size * size) * rest
    slots = [vpad[:, :, dy:dy + h, dx:dx + w] for dy, dx in offsets] + [vp[:, :, j] for j in range(p)]
    rows = sum(((prob - rest) / den) * slot for prob, slot in zip(probs, slots))
    if zero:
        rows = rows + (rest / den) * (vg.sum((2, 3)) + v[:, :, :p].sum(2))[:, :, None, None, :]
    rows = rows.reshape(batch, heads, n, dim)
    if p:       # prefix rows are unmasked in every mode: one dense row each
        rows = torch.cat([_dense_rows(q[:, :, :p] * scale, k, v, row_bias), rows], 2)
    return rows.to(out_dtype)


def _dense_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax attention of a few (already scaled) query rows over every key, as reductions over the tokens that
    the compiler fuses with the other passes over ``k`` and ``v`` (SDPA would copy them to its own layout)."""
    logits = (q[:, :, :, None, :] * k[:, :, None, :, :]).sum(-1)             # (B, heads, P, T)
    if bias is not None:
        logits = logits + bias
    return (torch.softmax(logits, -1)[..., None] * v[:, :, None, :, :]).sum(-2)


# ------------------------------------------------------------------------------ availability
@lru_cache(maxsize=None)
def unavailable_reason(device_type: str) -> Optional[str]:
    """Why inductor cannot compile the window on ``device_type`` here (None: it can)."""
    try:
        import torch._inductor.config  # noqa: F401
    except Exception as error:  # pragma: no cover - depends on the installed torch
        return f"torch.compile's inductor is not available ({type(error).__name__}: {error})"
    if device_type == "cuda":
        from torch.utils._triton import has_triton
        return None if has_triton() else "inductor needs Triton on CUDA (pip install triton)"
    if device_type != "cpu":
        return f"inductor's window kernel runs on cpu or cuda, not {device_type}"
    candidates = [os.environ.get("CXX"), "g++", "clang++", "c++"]
    if not any(c and shutil.which(c) for c in candidates):
        return "inductor needs a C++ compiler on the CPU and none was found (install g++ or set CXX)"
    return None


def auto_enabled() -> bool:
    """Whether ``auto`` may compile the op by itself in eager mode: only when ``MAIT_AUTO_COMPILE=1``.

    Compiling costs seconds to tens of seconds per new geometry on its first call (measured in
    benchmarks/README.md), which ``auto`` must not hide; ``torch.compile(model)`` fuses the window
    anyway, without this switch.
    """
    return os.environ.get(AUTO_ENV, "") == "1"


# ------------------------------------------------------------------------------ the compiled op
@lru_cache(maxsize=1)
def compiled() -> Callable[..., torch.Tensor]:
    """The compiled :func:`window_attention` (one per process; dynamo keeps one version per geometry)."""
    from .flex import allow_recompiles
    allow_recompiles()
    return torch.compile(window_attention, dynamic=False)


_COMPILED_KEYS: set[tuple] = set()      # what has been compiled in this process (its first call was logged)


def compiled_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid_size: tuple[int, int],
                              mask_size: int, num_prefix_tokens: int, mode: str = "zero",
                              scale: Optional[float] = None,
                              bias: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """:func:`window_attention` through ``torch.compile`` (plain when already tracing, the only case that takes
    a logit ``bias``: the local backend traced inside a model); first calls logged."""
    q, k, v = autocast_inputs(q, k, v)
    kwargs = dict(grid_size=tuple(grid_size), mask_size=mask_size, num_prefix_tokens=num_prefix_tokens,
                  zero=mode == "zero", scale=q.shape[-1] ** -0.5 if scale is None else float(scale))
    with no_autocast(q):
        if torch.compiler.is_compiling():
            return window_attention(q, k, v, bias=bias, **kwargs)
        if bias is not None:
            raise ValueError("the compiled backend takes no logit bias outside a traced model; use the local backend")
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        threads = torch.get_num_threads() if q.device.type == "cpu" else 0     # dynamo guards on it too
        key = (tuple(q.shape), q.dtype, str(q.device), needs_grad, threads, tuple(sorted(kwargs.items())))
        if key in _COMPILED_KEYS:
            return compiled()(q, k, v, **kwargs)
        (h, w), batch, heads, _, dim = kwargs["grid_size"], *q.shape
        what = (f"grid {h}x{w} R {mask_size} prefix {num_prefix_tokens} {mode}, batch {batch}, {heads} heads of {dim}, "
                f"{str(q.dtype).replace('torch.', '')} on {q.device.type}{f', {threads} threads' if threads else ''}"
                f"{' with gradients' if needs_grad else ''}")
        logger.warning("compiled backend: compiling the window for %s (the first call of each geometry takes "
                       "seconds to minutes; later calls reuse it)", what)
        start = time.perf_counter()
        out = compiled()(q, k, v, **kwargs)
        _COMPILED_KEYS.add(key)
        logger.info("compiled backend: %s compiled in %.1f s", what, time.perf_counter() - start)
        return out


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, call: Any, scale: float, **_: Any) -> torch.Tensor:
    return compiled_window_attention(q, k, v, grid_size=call.grid_size, mask_size=call.mask_size,
                                     num_prefix_tokens=call.num_prefix_tokens, mode=call.mode, scale=scale)


def can_run(call: Any) -> Optional[str]:
    """Hard heads on the local window, without attention dropout, where inductor can compile (while tracing a
    model the plain code joins the model's graph, so the check is the outer compiler's)."""
    if torch.compiler.is_compiling():
        return hard_local_only(call)
    return hard_local_only(call) or unavailable_reason(call.device_type)
