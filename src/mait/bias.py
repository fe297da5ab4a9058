"""Logit biases of the masked attention op (docs/semantics.md, "Logit bias").

A bias reaches the backends as a dense ``(heads, T, T)`` tensor, or as a :class:`RelativeBias`: BEiT's learned
tables of relative positions with their ``(T, T)`` index, never expanded by the linear-time backends.  A dense
backend gets the expanded matrix (:func:`dense_bias`, exactly what BEiT computes); the linear-time backend reads
the tables on the ``R x R`` window offsets and the prefix rows and columns (:meth:`RelativeBias.window`), so a
layer's bias costs O(heads·T·R²) instead of O(heads·T²) (at 896 px, T = 3137: 39 MB per head in float32).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

__all__ = ["Bias", "RelativeBias", "add_biases", "bias_at", "bias_heads", "dense_bias", "first_rows"]


class RelativeBias:
    """A logit bias held as learned tables of relative positions: ``B[h, i, j] = Σ_t table_t[index_t[i, j], h]``.

    Each term is a ``(rows, heads)`` table and a ``(T, T)`` long index into it, as BEiT holds its per-layer bias
    and its model-wide shared one (timm's ``relative_position_bias_table`` and ``relative_position_index``).
    Between two patches the index depends only on their offset on the grid (BEiT's layout), which is what lets the
    window read one table row per window slot.  Gradients reach the tables through every read.  ``shared``: the
    dense matrix is ``(heads, T, T)``, as timm's shared bias module returns it, rather than ``(1, heads, T, T)``,
    as BEiT's layers make theirs (SDPA rounds the two differently, and ``scheme="none"`` is BEiT bit for bit).
    """

    def __init__(self, terms: Sequence[tuple[torch.Tensor, torch.Tensor]], shared: bool = False) -> None:
        self.terms = tuple(terms)
        self.shared = shared

    @property
    def num_heads(self) -> int:
        return self.terms[0][0].shape[1]

    @property
    def num_tokens(self) -> int:
        return self.terms[0][1].shape[0]

    @property
    def tables(self) -> tuple[torch.Tensor, ...]:
        return tuple(table for table, _ in self.terms)

    def __add__(self, other: "RelativeBias") -> "RelativeBias":
        return RelativeBias(self.terms + other.terms, self.shared and other.shared)

    def heads(self, index: Union[slice, list[int]]) -> "RelativeBias":
        """The bias of the heads ``index`` only."""
        return RelativeBias([(table[:, index], rows) for table, rows in self.terms], self.shared)

    def dense(self) -> torch.Tensor:
        """The ``(1, heads, T, T)`` matrix (``(heads, T, T)`` when ``shared``), computed as timm's BEiT computes it
        (term by term, summed in order)."""
        total = None
        for table, index in self.terms:
            tokens = index.shape[0]
            term = table[index.view(-1)].view(tokens, tokens, -1).permute(2, 0, 1).contiguous()
            total = term if total is None else total + term
        return total if self.shared else total.unsqueeze(0)

    def rows(self, count: int) -> torch.Tensor:
        """The ``(heads, count, T)`` bias of the first ``count`` query rows (the prefix tokens')."""
        return sum(table[index[:count]] for table, index in self.terms).permute(2, 0, 1)

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """The ``(B, heads, T', T')`` bias among the tokens at ``positions`` ``(B, T')`` of the unpruned order
        (token pruning: each kept token keeps its original position)."""
        pairs = (positions[:, :, None], positions[:, None, :])
        return sum(table[index[pairs]] for table, index in self.terms).permute(0, 3, 1, 2)

    def window(self, keys: torch.Tensor, inside: torch.Tensor, num_prefix_tokens: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The bias as the linear-time loop reads it, without the ``(heads, T, T)`` matrix: ``(heads, N, R²)`` on the
        window slots (0 on padded slots, ``inside`` False, which keep their zero logit), ``(heads, N, P)`` on the
        prefix columns and ``(heads, P, T)`` on the prefix rows.  ``keys, inside``: ``(N, R²)``, the patch of each
        window slot of each of the ``N`` patches and whether it lies in the grid (``local.window_keys``).

        A slot's table row is read once, at a patch whose slot lies inside the grid, and broadcast over the
        patches: ``R²`` rows per term in place of ``N·R²``."""
        p = num_prefix_tokens
        first = inside.to(torch.uint8).argmax(0)      # (R²,) a patch whose slot s is inside (0 where none is)
        slot_keys = keys.gather(0, first[None])[0]
        zero = torch.zeros((), dtype=self.terms[0][0].dtype, device=keys.device)
        slots = prefix = 0
        for table, index in self.terms:
            slot_rows = table[index[p + first, p + slot_keys]].t()                  # (heads, R²)
            slots = slots + torch.where(inside, slot_rows[:, None, :], zero)
            prefix = prefix + table[index[p:, :p]].permute(2, 0, 1)
        return slots, prefix, self.rows(p)


Bias = Union[torch.Tensor, RelativeBias]


def dense_bias(bias: Bias) -> torch.Tensor:
    """``bias`` as a dense ``(heads, T, T)`` or ``(1, heads, T, T)`` tensor (the backends that read every logit)."""
    return bias.dense() if isinstance(bias, RelativeBias) else bias


def bias_heads(bias: Bias, index: Union[slice, list[int]]) -> Bias:
    """The bias of the heads ``index`` of a ``(heads, T, T)``, ``(1, heads, T, T)`` or table bias."""
    return bias.heads(index) if isinstance(bias, RelativeBias) else bias[..., index, :, :]


def first_rows(bias: Bias, count: int) -> torch.Tensor:
    """The bias of the first ``count`` query rows, ``(…, heads, count, T)`` (the class token's row: ``count=1``)."""
    return bias.rows(count) if isinstance(bias, RelativeBias) else bias[..., :count, :]


def bias_at(bias: Bias, positions: torch.Tensor) -> torch.Tensor:
    """The dense ``(B, heads, T', T')`` bias among the tokens at ``positions`` ``(B, T')`` of the unpruned order."""
    if isinstance(bias, RelativeBias):
        return bias.at(positions)
    bias = bias.reshape(-1, *bias.shape[-2:])
    return bias[:, positions[:, :, None], positions[:, None, :]].transpose(0, 1)


def add_biases(first: Bias, second: Bias) -> Bias:
    """``first + second``: a table bias while both are, else dense."""
    if isinstance(first, RelativeBias) and isinstance(second, RelativeBias):
        return first + second
    return dense_bias(first) + dense_bias(second)
