"""Tests of mait.analysis: ALS, cross-layer similarity, attention collection, soft-mask read-out, harden."""

from __future__ import annotations

import itertools

import pytest
import timm
import torch

import mait
from mait import HeadKind, MaskingScheme
from mait.analysis import (attention_layers, last_layers_similarity, locality_per_patch, measure_als,
                           measure_similarity, read_alphas)


def _neighbours_naive(grid, mask_size, n):
    """Patch indices within r rows and columns of patch n, by plain loops."""
    h, w = grid
    r = (mask_size - 1) // 2
    rn, cn = divmod(n, w)
    return [j for j in range(h * w) if abs(j // w - rn) <= r and abs(j % w - cn) <= r]


def _random_maps(batch, heads, tokens, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, tokens, tokens, generator=gen, dtype=dtype).mul(3).softmax(-1)


SHAPES = [((4, 4), 3, 1), ((3, 5), 3, 0), ((6, 6), 5, 2), ((2, 2), 1, 1), ((5, 3), 3, 1)]


@pytest.mark.parametrize("grid,mask_size,prefix", SHAPES)
def test_als_of_neighbourhood_only_attention_is_one(grid, mask_size, prefix):
    n = grid[0] * grid[1]
    tokens = prefix + n
    attn = torch.zeros(2, 3, tokens, tokens, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    for i in range(tokens):
        # prefix rows may attend anywhere (they are not scored); patch rows only to neighbours
        cols = list(range(tokens)) if i < prefix else [prefix + j for j in _neighbours_naive(grid, mask_size, i - prefix)]
        weights = torch.rand(2, 3, len(cols), generator=gen, dtype=torch.float64)
        attn[:, :, i, cols] = weights / weights.sum(-1, keepdim=True)
    als = mait.attention_locality_score(attn, grid_size=grid, mask_size=mask_size, num_prefix_tokens=prefix)
    assert als.shape == (3,)
    torch.testing.assert_close(als, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("grid,mask_size,prefix", SHAPES)
def test_als_of_uniform_attention_is_neighbour_fraction(grid, mask_size, prefix):
    n = grid[0] * grid[1]
    tokens = prefix + n
    attn = torch.full((1, 2, tokens, tokens), 1.0 / tokens, dtype=torch.float64)
    per_patch = locality_per_patch(attn, grid, mask_size, prefix)
    expected = torch.tensor([len(_neighbours_naive(grid, mask_size, i)) / tokens for i in range(n)],
                            dtype=torch.float64)
    torch.testing.assert_close(per_patch[0, 0], expected)  # border rows have fewer neighbours
    als = mait.attention_locality_score(attn, grid_size=grid, mask_size=mask_size, num_prefix_tokens=prefix)
    torch.testing.assert_close(als, expected.mean().expand(2))


def test_als_matches_loop_definition_and_ignores_prefix_columns():
    grid, mask_size, prefix = (4, 5), 3, 2
    attn = _random_maps(3, 2, prefix + 20, seed=3)
    expected = torch.zeros(2, dtype=torch.float64)
    for b, h, n in itertools.product(range(3), range(2), range(20)):
        expected[h] += sum(attn[b, h, prefix + n, prefix + j] for j in _neighbours_naive(grid, mask_size, n))
    expected /= 3 * 20
    torch.testing.assert_close(mait.attention_locality_score(attn, grid, mask_size, prefix), expected)
    # mass moved onto a prefix column lowers the score: prefix columns are not neighbours
    moved = attn.clone()
    moved[..., prefix:, 0] += 1.0
    moved = moved / moved.sum(-1, keepdim=True)
    assert (mait.attention_locality_score(moved, grid, mask_size, prefix) < expected).all()


def test_als_rejects_wrong_token_count():
    with pytest.raises(ValueError, match="T = 2 prefix"):
        mait.attention_locality_score(torch.rand(1, 2, 10, 10), grid_size=(3, 3), num_prefix_tokens=2)
    with pytest.raises(ValueError, match="T = 1 prefix"):
        mait.attention_locality_score(torch.rand(1, 2, 10, 10), grid_size=(3, 4), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="mask_size"):
        mait.attention_locality_score(torch.rand(1, 2, 10, 10), grid_size=(3, 3), mask_size=2)


def test_similarity_self_is_one_and_orthogonal_is_zero():
    attn = _random_maps(2, 3, 10, seed=4)
    sim = mait.cross_layer_similarity([attn, attn, attn])
    torch.testing.assert_close(sim, torch.ones(3, 3, 3, dtype=torch.float64))
    # rows with disjoint supports are orthogonal
    even = torch.zeros(2, 3, 10, 10, dtype=torch.float64)
    odd = torch.zeros_like(even)
    even[..., 0::2] = 0.2
    odd[..., 1::2] = 0.2
    sim = mait.cross_layer_similarity([even, odd])
    torch.testing.assert_close(sim, torch.eye(2, dtype=torch.float64).expand(3, 2, 2))


def test_similarity_matches_loop_definition():
    maps = [_random_maps(2, 2, 7, seed=s) for s in range(3)]
    sim = mait.cross_layer_similarity(maps)
    for h, i, j in itertools.product(range(2), range(3), range(3)):
        cosines = [torch.nn.functional.cosine_similarity(maps[i][b, h, t], maps[j][b, h, t], dim=0)
                   for b in range(2) for t in range(7)]
        torch.testing.assert_close(sim[h, i, j], torch.stack(cosines).mean())
    # last-k mean uses off-diagonal pairs of the last k layers only
    torch.testing.assert_close(last_layers_similarity(sim, 2), sim[:, 1, 2])
    with pytest.raises(ValueError, match="between 2 and"):
        last_layers_similarity(sim, 4)


def test_similarity_rejects_mixed_shapes():
    with pytest.raises(ValueError, match="share one shape"):
        mait.cross_layer_similarity([torch.rand(1, 2, 5, 5), torch.rand(1, 2, 6, 6)])


def _tiny(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=32, patch_size=8, depth=3, **kwargs).eval()


@pytest.mark.parametrize("name,kwargs,prefix", [
    ("deit_tiny_distilled_patch16_224", {}, 2),                  # plain timm, two prefix tokens
    ("mait_t12_224", {"scheme": "0:all,1:hsr"}, 1),              # hard, soft and random heads
    ("cait_xxs24_224", {}, 0),                                   # plain talking heads
    ("mait_cait_xxs24_224", {"scheme": "0:all,1:1h"}, 0),        # masked talking heads
])
def test_collect_attention_reproduces_the_layer_outputs(name, kwargs, prefix):
    model = _tiny(name, **kwargs)
    tokens, heads = prefix + 16, model.blocks[0].attn.num_heads
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected_logits = model(images)
    # record each attention layer's input (for v) and output while collecting
    seen = {}
    hooks = [layer.module.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, (a[0], o)))
             for i, layer in enumerate(attention_layers(model))]
    maps = mait.collect_attention(model, images)
    for handle in hooks:
        handle.remove()
    assert len(maps) == 3 and maps[0].shape == (2, heads, tokens, tokens)
    with torch.no_grad():
        assert torch.equal(model(images), expected_logits)  # hooks removed, output unchanged
        for i, attn in enumerate(maps):
            torch.testing.assert_close(attn.sum(-1), torch.ones(2, heads, tokens))
            x, out = seen[i]
            module = model.blocks[i].attn
            v = module.qkv(x).reshape(2, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)[2]
            if hasattr(module, "proj_w"):      # talking heads mix the probabilities after the softmax
                attn = module.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            recomputed = module.proj((attn @ v).transpose(1, 2).reshape(2, tokens, -1))
            torch.testing.assert_close(recomputed, out, atol=1e-5, rtol=1e-4)


def test_collect_attention_skips_class_attention_and_leaves_masked_layers_clean():
    images = torch.randn(2, 3, 32, 32)
    cait = _tiny("cait_xxs24_224", depth_token_only=2)
    maps = mait.collect_attention(cait, images)
    assert [m.shape for m in maps] == [(2, 4, 16, 16)] * 3   # self-attention layers only, not class attention
    masked = _tiny("mait_t12_224", scheme="0:all,1:1h")
    maps = mait.collect_attention(masked, images)
    # hard-masked heads: non-neighbour entries all equal (logit 0) within a row
    layer0 = maps[0][0, 0, 1:, 1:]
    outside = ~mait.patch_neighbours((4, 4), 3)
    row = layer0[5][outside[5]]
    torch.testing.assert_close(row, row[0].expand_as(row))
    assert all(layer.capture_attention is False and layer.last_attention is None
               for layer in mait.analysis.masked_layers(masked))


def test_collect_attention_over_loader_equals_single_batch():
    model = _tiny("mait_t12_224", scheme="sch1")
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    loader = [(images[:2], torch.zeros(2)), (images[2:], torch.zeros(3))]
    whole = mait.collect_attention(model, images)
    streamed = mait.collect_attention(model, loader)
    for a, b in zip(whole, streamed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    als = measure_als(model, loader)
    for layer_als, maps in zip(als, whole):
        torch.testing.assert_close(layer_als, mait.attention_locality_score(maps, (4, 4), 3, 1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(measure_similarity(model, loader), mait.cross_layer_similarity(whole),
                               atol=1e-6, rtol=1e-5)


def test_collect_attention_errors():
    with pytest.raises(ValueError, match="no attention layer"):
        mait.collect_attention(torch.nn.Linear(2, 2), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        mait.collect_attention(_tiny("deit_tiny_patch16_224"), torch.randn(3, 32, 32))


def test_read_alphas_and_harden_model():
    model = _tiny("mait_t12_224", scheme="0:soft,1:hsu,2:1h")
    with torch.no_grad():
        model.blocks[0].attn.alpha_logit.copy_(torch.logit(torch.tensor([0.1, 0.7, 0.5])))
        model.blocks[1].attn.alpha_logit.copy_(torch.logit(torch.tensor([0.2])))
    alphas = read_alphas(model)
    torch.testing.assert_close(alphas[0], torch.tensor([0.1, 0.7, 0.5]))
    torch.testing.assert_close(alphas[1], torch.tensor([0.0, 0.2, 1.0]))
    torch.testing.assert_close(alphas[2], torch.tensor([0.0, 1.0, 1.0]))
    hard = mait.harden(model, threshold=0.5)
    assert str(hard) == "0:1h,1:2h,2:1h"
    assert MaskingScheme.parse(str(hard), 3, 3) == hard       # usable as --scheme
    assert str(mait.harden(model, threshold=0.6)) == "0:huh,1:2h,2:1h"
    assert not hard.has_soft


def test_harden_scheme_with_alphas_and_errors():
    scheme = MaskingScheme.parse("0:soft,1:1r", 2, 2)
    hard = mait.harden(scheme, 0.3, alphas=[[0.29, 0.3], [0.0, 1.0]])
    assert hard.layers == ((HeadKind.HARD, HeadKind.NONE), (HeadKind.RANDOM, HeadKind.NONE))
    with pytest.raises(ValueError, match="needs alphas"):
        mait.harden(scheme, 0.5)
    with pytest.raises(ValueError, match="heads per layer"):
        mait.harden(scheme, 0.5, alphas=[[0.1], [0.2, 0.3]])
    with pytest.raises(ValueError, match="threshold"):
        mait.harden(scheme, 1.5, alphas=[[0.1, 0.1], [0.2, 0.3]])
    with pytest.raises(ValueError, match="no mait MaskedAttention"):
        mait.harden(torch.nn.Linear(2, 2))
