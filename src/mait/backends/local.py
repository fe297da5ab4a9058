"""The exact linear-time backend for hard-masked heads (docs/semantics.md, "linear-time identity").

With α = 0 every non-neighbour logit is exactly 0, so each patch row of the softmax only
needs its ``R x R`` window and the prefix columns; the other ``T - n_i`` columns all weigh
``e^0`` and contribute ``Σ_all v - Σ_window v``.  With ``m_i = max(0, max_window S_ij)``::

    num_i = Σ_{j∈Nb(i)} (e^{S_ij - m_i} - e^{-m_i}) v_j  +  e^{-m_i} Σ_{all j} v_j
    den_i = Σ_{j∈Nb(i)}  e^{S_ij - m_i}  +  (T - n_i) e^{-m_i}

Keys and values are zero-padded by ``r = (R - 1) / 2`` on the grid, so every window has
exactly ``R²`` slots.  A padded slot has ``S = 0`` and ``v = 0``: it adds ``e^{-m}`` to the
denominator, which the constant count ``(N - R²)`` in place of ``(T - n_i - P)`` takes back,
and nothing to the numerator.  Border truncation is therefore exact without a validity
mask (``mode="neg_inf"`` gives the padded slots -inf instead).  Prefix rows attend to
everything and run through ``scaled_dot_product_attention``.

A logit bias (BEiT's relative position bias) is read where the loop needs it: on the ``R²`` window slots
of each patch (padded slots keep their zero logit) and the prefix rows and columns (:func:`window_bias`);
BEiT's bias arrives as its table (:class:`~mait.bias.RelativeBias`), read on the window offsets, so the
``(heads, T, T)`` matrix is never built.

Time and memory are O(T·R²·d).  This is eager code; inside a ``torch.compile`` or ``torch.export``
trace the same function is traced as the compiled backend's plain tensor code (:mod:`.compiled`), which
the compiler fuses and differentiates.  The backward pass is explicit (:class:`_LocalRows`): the
standard softmax gradient restricted to the window and prefix logits (the zero logits
depend on nothing), with every value also receiving ``Σ_i rest_i dout_i``.

Under ``torch.autocast`` the inputs are cast to the autocast dtype once and the kernel runs
with autocast off in both passes (its element-wise sums must not mix dtypes), so it works
the same under bf16/fp16 on CUDA and bf16 on the CPU; on a CPU the slot loop itself runs in
float32 (1.15-1.6x faster than bf16 element-wise work there, and exact) and the output is
cast back to the autocast dtype.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..bias import Bias, RelativeBias
from ._common import autocast_inputs, hard_local_only, no_autocast
from .compiled import compiled_window_attention


@lru_cache(maxsize=64)
def _pad_bias(grid: tuple[int, int], mask_size: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """``(H, W, R²)`` additive bias: 0 on slots inside the grid, -inf on padded slots (mode ``neg_inf``)."""
    h, w = grid
    r = (mask_size - 1) // 2
    inside = F.pad(torch.ones(h, w), (r, r, r, r)).unfold(0, mask_size, 1).unfold(1, mask_size, 1)
    bias = torch.zeros(h, w, mask_size * mask_size, dtype=dtype)
    return bias.masked_fill(inside.reshape(h, w, -1) == 0, float("-inf")).to(device)


BAND_BYTES = 2 << 20      # a row band's (B, heads, rows, W, d) slice


def row_bands(qg: torch.Tensor) -> list[tuple[int, int]]:
    """Row ranges ``[y0, y1)`` of the grid, each holding at most :data:`BAND_BYTES` of a ``(B, heads, H, W, d)``
    tensor (at least one row).  Every pass over the ``R²`` window slots runs band by band, so the slot loop
    re-reads cache-resident data instead of streaming the whole grid from memory ``R²`` times.

    A tensor of up to two bands is one band: it stays in cache anyway, and more (smaller) operations only add
    overhead.  Measured on a 2-core EPYC, one thread: from 4.6 MiB per tensor (56x56 at batch 4) 2 MiB bands
    are 1.0-1.6x faster than whole-grid passes, forward and backward (benchmarks/README.md)."""
    batch, heads, h, w, dim = qg.shape
    row = batch * heads * w * dim * qg.element_size()
    if row * h <= 2 * BAND_BYTES:
        return [(0, h)]
    rows = max(1, BAND_BYTES // row)
    return [(y0, min(h, y0 + rows)) for y0 in range(0, h, rows)]


def _windows(x: torch.Tensor, size: int, rows: tuple[int, int], w: int):
    """The ``R²`` shifted ``(…, rows, W, d)`` views of a zero-padded grid tensor for grid rows ``[y0, y1)``,
    in window-slot order."""
    y0, y1 = rows
    return [x[:, :, y0 + dy:y1 + dy, dx:dx + w] for dy in range(size) for dx in range(size)]


class _LocalRows(torch.autograd.Function):
    """Patch rows of hard-masked attention with an explicit O(T·R²·d) backward.

    Inputs are the scaled grid queries ``qg`` and grid keys/values ``kg, vg`` (``(B, h, H, W, d)``)
    and the prefix keys/values ``kp, vp`` (``(B, h, P, d)``), and optionally the logit bias of the
    window slots and prefix columns (``(1, h, H, W, R²)``, ``(1, h, H, W, P)``, :func:`window_bias`).
    Autograd through the slot loop would allocate one full padded gradient per slot; here gradients
    accumulate in place.  Both passes walk the grid in row bands (:func:`row_bands`).
    """

    @staticmethod
    def forward(ctx, qg, kg, vg, kp, vp, size: int, zero: bool,  # type: ignore[override]
                slot_bias=None, prefix_bias=None):
        with no_autocast(qg):
            return _LocalRows._forward(ctx, qg, kg, vg, kp, vp, size, zero, slot_bias, prefix_bias)

    @staticmethod
    def _forward(ctx, qg, kg, vg, kp, vp, size: int, zero: bool,  # type: ignore[no-untyped-def]
                 slot_bias, prefix_bias):
        batch, heads, h, w, dim = qg.shape
        r, n, p = (size - 1) // 2, h * w, kp.shape[2]
        pad = (0, 0, r, r, r, r)
        kpad, vpad = F.pad(kg, pad), F.pad(vg, pad)
        bands = row_bands(qg)
        # Window logits (B, heads, H, W, R²); padded slots are exactly 0 (see the module docstring).
        # One product buffer, the size of a band, for every slot and band.
        scores = qg.new_empty(batch, heads, h, w, size * size)
        product = qg.new_empty(batch, heads, bands[0][1] - bands[0][0], w, dim)
        for y0, y1 in bands:
            band_product = product[:, :, :y1 - y0]
            for i, kw in enumerate(_windows(kpad, size, (y0, y1), w)):
                torch.sum(torch.mul(qg[:, :, y0:y1], kw, out=band_product), -1, out=scores[:, :, y0:y1, :, i])
        del product
        if slot_bias is not None:      # the logit bias of every window slot; 0 on padded slots (see window_bias)
            scores += slot_bias
        if not zero:
            scores += _pad_bias((h, w), size, scores.dtype, str(scores.device))
        peak = scores.amax(-1, keepdim=True)
        prefix_scores = (qg.reshape(batch, heads, n, dim) @ kp.transpose(-2, -1)).reshape(batch, heads, h, w, p)
        if prefix_bias is not None:
            prefix_scores = prefix_scores + prefix_bias
        if p:
            peak = torch.maximum(peak, prefix_scores.amax(-1, keepdim=True))
        if zero:
            peak = peak.clamp(min=0)
        probs = torch.exp(scores - peak)
        prefix_probs = torch.exp(prefix_scores - peak)
        rest = torch.exp(-peak) if zero else torch.zeros_like(peak)       # weight of each zero logit
        den = probs.sum(-1, keepdim=True) + prefix_probs.sum(-1, keepdim=True) + (n - size * size) * rest
        probs, prefix_probs, rest = probs / den, prefix_probs / den, rest / den
        slot_weights = probs - rest
        out = ((prefix_probs - rest).reshape(batch, heads, n, p) @ vp).reshape(batch, heads, h, w, dim)
        for y0, y1 in bands:
            band_out = out[:, :, y0:y1]
            for i, vw in enumerate(_windows(vpad, size, (y0, y1), w)):
                band_out.addcmul_(slot_weights[:, :, y0:y1, :, i, None], vw)
        if zero:
            out.addcmul_(rest, (vg.sum((2, 3)) + vp.sum(2))[:, :, None, None, :])
        ctx.save_for_backward(qg, kpad, vpad, kp, vp, probs, prefix_probs, rest, out)
        ctx.size = size
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        with no_autocast(grad):
            return _LocalRows._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):  # type: ignore[no-untyped-def]
        qg, kpad, vpad, kp, vp, probs, prefix_probs, rest, out = ctx.saved_tensors
        size = ctx.size
        batch, heads, h, w, dim = qg.shape
        r, n, p = (size - 1) // 2, h * w, kp.shape[2]
        grad = grad.contiguous().to(qg.dtype)
        bands = row_bands(qg)
        product = qg.new_empty(batch, heads, bands[0][1] - bands[0][0], w, dim)   # reused, as in the forward
        delta = (grad * out).sum(-1, keepdim=True)                                # Σ_j P_ij dP_ij
        dq = torch.zeros_like(qg)
        dkpad, dvpad = torch.zeros_like(kpad), torch.zeros_like(vpad)
        dslot = probs.new_zeros(probs.shape[1:]) if ctx.needs_input_grad[7] else None    # (heads, H, W, R²)
        for y0, y1 in bands:
            band_grad, band_q, band_dq = grad[:, :, y0:y1], qg[:, :, y0:y1], dq[:, :, y0:y1]
            band_product, band_delta = product[:, :, :y1 - y0], delta[:, :, y0:y1]
            band_probs, band_rest = probs[:, :, y0:y1], rest[:, :, y0:y1]
            windows = zip(_windows(kpad, size, (y0, y1), w), _windows(vpad, size, (y0, y1), w),
                          _windows(dkpad, size, (y0, y1), w), _windows(dvpad, size, (y0, y1), w))
            for i, (kw, vw, dkw, dvw) in enumerate(windows):
                slot = band_probs[..., i, None]
                dscore = slot * (torch.sum(torch.mul(band_grad, vw, out=band_product), -1, keepdim=True) - band_delta)
                if dslot is not None:
                    dslot[:, y0:y1, :, i] = dscore.sum((0, -1))
                band_dq.addcmul_(dscore, kw)
                dkw.addcmul_(dscore, band_q)
                dvw.addcmul_(slot - band_rest, band_grad)
        grad_rows = grad.reshape(batch, heads, n, dim)
        dprefix = prefix_probs * ((grad_rows @ vp.transpose(-2, -1)).reshape(batch, heads, h, w, p) - delta)
        dprefix = dprefix.reshape(batch, heads, n, p)
        dq += (dprefix @ kp).reshape(batch, heads, h, w, dim)
        dkp = dprefix.transpose(-2, -1) @ qg.reshape(batch, heads, n, dim)
        everyone = (rest * grad).sum((2, 3))[:, :, None, :]             # every token gets Σ_i rest_i dout_i
        dvp = (prefix_probs - rest).reshape(batch, heads, n, p).transpose(-2, -1) @ grad_rows + everyone
        dvg = dvpad[:, :, r:r + h, r:r + w] + everyone[:, :, :, None, :]
        dprefix_bias = dprefix.sum(0).reshape(1, heads, h, w, p) if ctx.needs_input_grad[8] else None
        return (dq, dkpad[:, :, r:r + h, r:r + w], dvg, dkp, dvp, None, None,
                None if dslot is None else dslot[None], dprefix_bias)


def empty_sdpa_layout(v: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An empty ``(B, heads, T, d)`` output (``v``'s dtype unless given) stored as ``(B, T, heads, d)``, the layout
    SDPA returns: the attention module's transpose back to ``(B, T, heads * d)`` is then a free view."""
    batch, heads, tokens, dim = v.shape
    return v.new_empty(batch, tokens, heads, dim, dtype=dtype).transpose(1, 2)


def window_keys(grid: tuple[int, int], mask_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys, inside)``, both ``(H·W, R²)``: the patch index of each window slot of each patch, in the slot order
    of the linear-time loop (0 on padded slots), and whether the slot lies inside the grid."""
    h, w = grid
    r = (mask_size - 1) // 2
    index = F.pad(torch.arange(h * w, device=device, dtype=torch.float32).reshape(1, h, w) + 1, (r, r, r, r))[0]
    slots = index.unfold(0, mask_size, 1).unfold(1, mask_size, 1).reshape(h * w, mask_size * mask_size)
    return (slots - 1).clamp(min=0).long(), slots > 0


def window_bias(bias: Bias, grid: tuple[int, int], mask_size: int, num_prefix_tokens: int,
                dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A logit bias as the linear-time loop reads it (in ``dtype`` when given): ``(1, heads, H, W, R²)`` on the window slots
    (0 on padded slots, which must keep their zero logit), ``(1, heads, H, W, P)`` on the prefix columns and
    ``(heads, P, T)`` on the prefix rows.  O(T·R²) entries: gathered from a dense ``(heads, T, T)`` bias, or read
    from a :class:`~mait.bias.RelativeBias`'s tables on the window offsets without expanding them.
    Differentiable (BEiT's bias table learns)."""
    p, (h, w) = num_prefix_tokens, grid
    if isinstance(bias, RelativeBias):
        keys, inside = window_keys(grid, mask_size, bias.terms[0][1].device)
        slots, prefix, rows = (part.to(dtype or part.dtype) for part in bias.window(keys, inside, p))
    else:
        heads, tokens = bias.shape[-3], bias.shape[-1]
        bias = bias.reshape(heads, tokens, tokens).to(dtype or bias.dtype)
        keys, inside = window_keys(grid, mask_size, bias.device)
        slots = bias[:, p:, p:].gather(-1, keys.expand(heads, -1, -1))
        slots = torch.where(inside, slots, torch.zeros((), dtype=bias.dtype, device=bias.device))
        prefix, rows = bias[:, p:, :p], bias[:, :p]
    heads = slots.shape[0]
    return slots.reshape(1, heads, h, w, -1), prefix.reshape(1, heads, h, w, p), rows


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid_size: tuple[int, int],
                    mask_size: int, num_prefix_tokens: int, mode: str = "zero", scale: Optional[float] = None,
                    bias: Optional[Bias] = None, **_: object) -> torch.Tensor:
    """Hard-masked attention (every head α = 0) in O(T·R²·d); same result as the dense reference.

    ``q, k, v`` are ``(B, heads, T, d)`` with ``T = num_prefix_tokens + H * W``; ``bias`` an optional
    ``(heads, T, T)`` or ``(1, heads, T, T)`` logit bias or a :class:`~mait.bias.RelativeBias`, read on the window
    slots and prefix rows/columns only (the other logits of a hard head are 0, bias included).
    """
    if torch.compiler.is_compiling():    # the same function as fusable tensor code (no graph break)
        if bias is not None:
            bias = window_bias(bias, grid_size, mask_size, num_prefix_tokens)
        return compiled_window_attention(q, k, v, grid_size=grid_size, mask_size=mask_size,
                                         num_prefix_tokens=num_prefix_tokens, mode=mode, scale=scale, bias=bias)
    q, k, v = autocast_inputs(q, k, v)
    half = q.dtype if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) else None
    if half is not None:     # a CPU runs the slot loop's elementwise work faster (and more exactly) in float32
        q, k, v = q.float(), k.float(), v.float()
    batch, heads, _, dim = q.shape
    p, (h, w) = num_prefix_tokens, grid_size
    scale = dim ** -0.5 if scale is None else scale
    slot_bias = prefix_bias = row_bias = None
    if bias is not None:
        slot_bias, prefix_bias, row_bias = window_bias(bias, grid_size, mask_size, p, q.dtype)
    qg = (q[:, :, p:] * scale).reshape(batch, heads, h, w, dim)
    kg = k[:, :, p:].reshape(batch, heads, h, w, dim)
    vg = v[:, :, p:].reshape(batch, heads, h, w, dim)
    rows = _LocalRows.apply(qg, kg, vg, k[:, :, :p], v[:, :, :p], mask_size, mode == "zero", slot_bias, prefix_bias)
    rows = rows.reshape(batch, heads, h * w, dim)
    if not p:
        return rows if half is None else rows.to(half)
    # Prefix rows are unmasked in every mode: one dense row each.
    out = empty_sdpa_layout(v, half)
    out[:, :, :p] = F.scaled_dot_product_attention(q[:, :, :p], k, v, attn_mask=row_bias, scale=scale)
    out[:, :, p:] = rows
    return out


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, call: Any, scale: float,
        bias: Optional[Bias] = None, **_: Any) -> torch.Tensor:
    return local_attention(q, k, v, grid_size=call.grid_size, mask_size=call.mask_size,
                           num_prefix_tokens=call.num_prefix_tokens, mode=call.mode, scale=scale, bias=bias)


def can_run(call: Any) -> Optional[str]:
    """Hard heads on the local window, without attention dropout; a logit bias is read on the window slots."""
    return hard_local_only(call, bias=True)
