"""Tests of the quick empirical search (paper §4.3): the assignment rules on hand-made ALS tables."""

from __future__ import annotations

import pytest

from mait import HeadKind, MaskingScheme
from mait.search import ALL, KEEP, REMOVE, Thresholds, assign, calibrate

H, U = HeadKind.HARD, HeadKind.NONE


def test_assign_takes_all_three_branches_from_head_zero():
    # head 0 decides; the other heads' values must not matter for step 2
    table = [[0.90, 0.10, 0.10],   # > 0.65: mask all heads
             [0.66, 0.99, 0.99],   # just above high
             [0.65, 0.99, 0.00],   # == high: keep (0.35-0.65 inclusive)
             [0.50, 0.90, 0.90],   # keep
             [0.35, 0.00, 0.00],   # == low: keep
             [0.34, 0.99, 0.99]]   # < 0.35: remove
    result = assign(table)
    assert result.decisions == (ALL, ALL, KEEP, KEEP, KEEP, REMOVE)
    assert result.scheme.layers == ((H, H, H), (H, H, H), (H, U, U), (H, U, U), (H, U, U), (U, U, U))
    assert str(result.scheme) == "0-1:all,2-4:1h"


def test_thresholds_are_parameters():
    table = [[0.6, 0.2], [0.3, 0.2], [0.1, 0.9]]
    assert assign(table, Thresholds(high=0.55, low=0.25)).decisions == (ALL, KEEP, REMOVE)
    assert assign(table, Thresholds(high=0.9, low=0.05)).decisions == (KEEP, KEEP, KEEP)
    with pytest.raises(ValueError, match="low <= high"):
        Thresholds(high=0.3, low=0.5)


def test_calibration_unmasks_low_als_heads_in_all_layers_only():
    assignment = assign([[0.9, 0.5, 0.5], [0.5, 0.1, 0.1], [0.2, 0.9, 0.9]])
    # ALS measured after training the assigned scheme
    after = [[0.80, 0.34, 0.35],   # all-layer: head 1 below low is unmasked, head 2 == low stays
             [0.10, 0.00, 0.00],   # keep-layer: untouched even though head 0 dropped
             [0.90, 0.90, 0.90]]   # remove-layer: untouched
    scheme = calibrate(assignment, after)
    assert scheme.layers == ((H, U, H), (H, U, U), (U, U, U))
    assert MaskingScheme.parse(str(scheme), 3, 3) == scheme   # round-trips as --scheme text
    # head 0 is calibrated too, and a stricter low removes more
    assert calibrate(assignment, [[0.3, 0.9, 0.9]] + after[1:]).layers[0] == (U, H, H)
    assert calibrate(assignment, after, Thresholds(high=0.9, low=0.85)).layers[0] == (U, U, U)


def test_rules_reject_bad_tables():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        assign([[1.2, 0.0]])
    with pytest.raises(ValueError, match="at least one layer"):
        assign([])
    assignment = assign([[0.9, 0.9]])
    with pytest.raises(ValueError, match="heads per layer"):
        calibrate(assignment, [[0.9, 0.9, 0.9]])
