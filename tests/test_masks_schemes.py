"""Neighbourhood masks and masking schemes (text form, built-ins, validation)."""

from __future__ import annotations

import pytest
import torch

import mait
from mait import HeadKind, MaskingScheme
from naive import naive_multiplier


@pytest.mark.parametrize("grid,mask_size,prefix", [((14, 14), 3, 1), ((5, 7), 5, 2), ((1, 1), 3, 0), ((3, 8), 1, 1)])
def test_local_mask_matches_definition(grid, mask_size, prefix):
    mask = mait.local_mask(grid_size=grid, mask_size=mask_size, num_prefix_tokens=prefix)
    assert mask.dtype == torch.bool and mask.shape == (prefix + grid[0] * grid[1],) * 2
    assert torch.equal(mask, naive_multiplier(grid, mask_size, prefix, alpha=0.0) == 1.0)


def test_border_truncation_and_prefix_never_masked():
    mask = mait.local_mask(grid_size=(14, 14), mask_size=3, num_prefix_tokens=1)
    patches = mask[1:, 1:]
    assert int(patches[0].sum()) == 4          # corner: itself, right, below, diagonal
    assert int(patches[1].sum()) == 6          # top edge
    assert int(patches[15].sum()) == 9         # interior (row 1, col 1)
    assert bool(mask[0].all()) and bool(mask[:, 0].all())
    # Fig. 1 of the paper: patch 16 of a 14x14 grid sees patches 1, 2, 3, 15, 17, 29, 30, 31 (and itself).
    assert patches[16].nonzero().flatten().tolist() == [1, 2, 3, 15, 16, 17, 29, 30, 31]
    assert mait.neighbour_counts((14, 14), 3).sum() == patches.sum()


def test_random_mask_keeps_same_fraction_and_is_seeded():
    local = mait.local_mask((6, 5), 3, 1)
    rand = mait.random_mask((6, 5), 3, 1, seed=7)
    assert int(rand.sum()) == int(local.sum())
    assert bool(rand[0].all()) and bool(rand[:, 0].all())
    assert torch.equal(rand, mait.random_mask((6, 5), 3, 1, seed=7))
    assert not torch.equal(rand, mait.random_mask((6, 5), 3, 1, seed=8))
    assert not torch.equal(rand, local)


@pytest.mark.parametrize("bad", [2, 0, -1, 4, 3.0, True])
def test_bad_mask_size(bad):
    with pytest.raises(ValueError, match="mask_size must be an odd positive integer"):
        mait.local_mask((4, 4), bad)


def test_bad_grid():
    with pytest.raises(ValueError, match="grid_size must be"):
        mait.local_mask((0, 4), 3)


# ------------------------------------------------------------------ schemes
@pytest.mark.parametrize("depth,heads", [(24, 3), (24, 6), (12, 3), (36, 3), (4, 4), (1, 1), (7, 2)])
@pytest.mark.parametrize("name", mait.BUILTIN_SCHEMES)
def test_builtins_round_trip(name, depth, heads):
    scheme = MaskingScheme.parse(name, depth, heads)
    assert scheme.depth == depth and set(scheme.num_heads) == {heads}
    assert MaskingScheme.parse(str(scheme), depth, heads) == scheme


def test_paper_schemes_at_24_layers():
    sch1 = MaskingScheme.parse("sch1", 24, 3)
    assert all(layer == ("h", "u", "u") for layer in sch1.layers)
    sch2 = MaskingScheme.parse("sch2", 24, 3)
    assert [sch2.num_masked(i) for i in range(24)] == [2] * 8 + [1] * 12 + [0] * 4
    assert str(sch2) == "0-7:2h,8-19:1h"
    sch3 = MaskingScheme.parse("sch3", 24, 3)
    assert all(k is HeadKind.SOFT for i in range(21) for k in sch3.layer(i))
    assert all(k is HeadKind.NONE for i in range(21, 24) for k in sch3.layer(i))
    mixed = MaskingScheme.parse("mixed", 36, 3)
    assert [mixed.num_masked(i) for i in range(36)] == [3] * 12 + [1] * 24
    rand = MaskingScheme.parse("random", 24, 3)
    assert all(layer == ("r", "u", "u") for layer in rand.layers)
    assert str(MaskingScheme.parse("none", 24, 3)) == "none"


@pytest.mark.parametrize("text", ["0-7:2h,8-19:1h,20-23:0", "0:hsu,1-3:1s", "*:all", "2:rur,0-1:soft", "5:uhu"])
def test_text_round_trip(text):
    scheme = MaskingScheme.parse(text, 24, 3)
    again = MaskingScheme.parse(str(scheme), 24, 3)
    assert again == scheme


def test_explicit_pattern_names_heads():
    scheme = MaskingScheme.parse("0:uhs", 2, 3)
    assert scheme.layer(0) == (HeadKind.NONE, HeadKind.HARD, HeadKind.SOFT)
    assert scheme.layer(1) == (HeadKind.NONE,) * 3


def test_per_layer_head_counts():
    scheme = MaskingScheme.parse("0-1:all,2:1h", 4, [3, 3, 6, 6])
    assert scheme.num_heads == (3, 3, 6, 6)
    assert [scheme.num_masked(i) for i in range(4)] == [3, 3, 1, 0]
    assert MaskingScheme.parse(str(scheme), 4, [3, 3, 6, 6]) == scheme


@pytest.mark.parametrize("text,match", [
    ("0-30:1h", "names layer 30, which does not exist: the model has 24 layers"),
    ("24:1h", "names layer 24, which does not exist"),
    ("0:5h", "asks for 5 masked heads in layer 0, which has 3 heads"),
    ("0:hhhh", "names 4 heads, but the layer has 3 heads"),
    ("0:1h,0:1s", "names layer 0 twice"),
    ("0-7", "must look like 'LAYERS:HEADS'"),
    ("a-b:1h", "must be 'i', 'i-j' or '\\*'"),
    ("5-2:1h", "is empty"),
    ("0:2x", "head spec '2x'"),
])
def test_bad_scheme_text(text, match):
    with pytest.raises(ValueError, match=match):
        MaskingScheme.parse(text, 24, 3)


def test_validate_against_model():
    scheme = MaskingScheme.parse("sch1", 12, 3)
    assert mait.resolve_scheme(scheme, 12, 3) is scheme
    with pytest.raises(ValueError, match="scheme has 12 layers but the model has 24"):
        mait.resolve_scheme(scheme, 24, 3)
    with pytest.raises(ValueError, match="layer 0 has 6"):
        mait.resolve_scheme(scheme, 12, 6)


def test_describe_lists_every_layer_run():
    text = MaskingScheme.parse("sch2", 24, 3).describe()
    assert "0-7: hard hard -" in text and "8-19: hard - -" in text and "20-23: - - -" in text
