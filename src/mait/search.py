"""The quick empirical mask search of the paper (§4.3, DESIGN §4).

1. **Initialisation**: hard-mask head 0 of every layer (Sch.1) and train for a budget.
2. **Assignment** from the ALS of head 0 of each layer ``l`` on held-out data:
   ``> high`` (0.65) mask all heads of ``l`` (then calibrate); ``low..high`` keep head 0's
   mask only; ``< low`` (0.35) remove the mask.
3. **Calibration**: in the layers that got all heads masked, remove the mask of every head
   whose own ALS is ``< low``.  By default those ALS come from a second training run with
   the assigned scheme (each head measured *as a masked head*, the paper's "2-3 training
   iterations"); ``calibration="initial"`` reuses the first run's per-head ALS instead.
4. Optionally retrain the final scheme and report its accuracy.

The rules (:func:`assign`, :func:`calibrate`) are pure functions of an ALS table, separate
from the training (:func:`run_search`), so they can be checked on hand-made tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .schemes import HeadKind, MaskingScheme

ALL, KEEP, REMOVE = "all", "keep", "remove"
AlsTable = Sequence[Sequence[float]]


@dataclass(frozen=True)
class Thresholds:
    """ALS thresholds of the assignment: above ``high`` mask all heads, below ``low`` remove."""

    high: float = 0.65
    low: float = 0.35

    def __post_init__(self) -> None:
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(f"thresholds must satisfy 0 <= low <= high <= 1, got low={self.low}, high={self.high}")


@dataclass(frozen=True)
class Assignment:
    """Result of step 2: the scheme, and per layer the branch taken (``all`` / ``keep`` / ``remove``)."""

    scheme: MaskingScheme
    decisions: tuple[str, ...]


def _check_table(als: AlsTable) -> list[list[float]]:
    table = [[float(v) for v in layer] for layer in als]
    if not table or any(len(layer) == 0 for layer in table):
        raise ValueError("the ALS table needs at least one layer, each with at least one head")
    bad = [(i, h, v) for i, layer in enumerate(table) for h, v in enumerate(layer) if not 0.0 <= v <= 1.0]
    if bad:
        raise ValueError(f"ALS values must lie in [0, 1]; got (layer, head, value) {bad[:4]}")
    return table


def assign(als: AlsTable, thresholds: Thresholds = Thresholds()) -> Assignment:
    """Step 2: assign each layer from the ALS of its head 0 (measured on the Sch.1 model)."""
    table = _check_table(als)
    layers, decisions = [], []
    for layer in table:
        heads = len(layer)
        if layer[0] > thresholds.high:
            decisions.append(ALL)
            layers.append((HeadKind.HARD,) * heads)
        elif layer[0] >= thresholds.low:
            decisions.append(KEEP)
            layers.append((HeadKind.HARD,) + (HeadKind.NONE,) * (heads - 1))
        else:
            decisions.append(REMOVE)
            layers.append((HeadKind.NONE,) * heads)
    return Assignment(MaskingScheme(tuple(layers)), tuple(decisions))


def calibrate(assignment: Assignment, als: AlsTable, thresholds: Thresholds = Thresholds()) -> MaskingScheme:
    """Step 3: in the ``all`` layers, unmask every head whose own ALS is below ``thresholds.low``."""
    table = _check_table(als)
    if [len(layer) for layer in table] != list(assignment.scheme.num_heads):
        raise ValueError(f"the ALS table has {[len(layer) for layer in table]} heads per layer but the "
                         f"assigned scheme has {list(assignment.scheme.num_heads)}")
    layers = []
    for kinds, decision, layer in zip(assignment.scheme.layers, assignment.decisions, table):
        if decision == ALL:
            kinds = tuple(HeadKind.HARD if value >= thresholds.low else HeadKind.NONE for value in layer)
        layers.append(kinds)
    return MaskingScheme(tuple(layers))
