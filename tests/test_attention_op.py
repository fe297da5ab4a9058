"""The functional op against a plain float64 implementation of docs/semantics.md, plus its error handling."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import mait
from naive import naive_masked_attention

GRIDS = [(1, 1), (1, 6), (3, 1), (2, 3), (4, 4), (5, 7), (15, 9)]
MASK_SIZES = [1, 3, 5, 7]
PREFIXES = [0, 1, 2]


def _qkv(grid, prefix, heads=3, dim=8, batch=2, dtype=torch.float64, seed=0):
    tokens = prefix + grid[0] * grid[1]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, dim, generator=gen, dtype=dtype) * 1.5 for _ in range(3)]


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("grid,mask_size,prefix", list(itertools.product(GRIDS, MASK_SIZES, PREFIXES)))
@pytest.mark.parametrize("mode,alphas", [("zero", [0.0, 0.37, 1.0]), ("neg_inf", [0.0, 1.0, 0.0])])
def test_matches_naive_float64_and_float32(grid, mask_size, prefix, mode, alphas):
    q, k, v = _qkv(grid, prefix, seed=hash((grid, mask_size, prefix)) % 1000)
    expected = naive_masked_attention(q, k, v, grid, mask_size, prefix, alphas, mode)
    kwargs = dict(grid_size=grid, mask_size=mask_size, num_prefix_tokens=prefix, mode=mode,
                  backend="reference")
    out64 = mait.masked_attention(q, k, v, alpha=torch.tensor(alphas, dtype=torch.float64), **kwargs)
    assert out64.dtype == torch.float64
    assert _rel_err(out64, expected) < 1e-6
    out32 = mait.masked_attention(q.float(), k.float(), v.float(), alpha=torch.tensor(alphas), **kwargs)
    assert out32.dtype == torch.float32
    assert _rel_err(out32, expected) < 1e-4


@pytest.mark.parametrize("grid,mask_size,prefix", [((3, 2), 3, 1), ((2, 4), 1, 2), ((3, 3), 5, 0)])
def test_gradcheck_q_k_v(grid, mask_size, prefix):
    q, k, v = (t.requires_grad_() for t in _qkv(grid, prefix, dim=4, batch=1))
    alpha = torch.tensor([0.0, 0.4, 1.0], dtype=torch.float64)

    def fn(q, k, v):
        return mait.masked_attention(q, k, v, grid_size=grid, mask_size=mask_size, num_prefix_tokens=prefix,
                                     alpha=alpha)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gradcheck_alpha():
    grid, prefix = (3, 3), 1
    q, k, v = _qkv(grid, prefix, dim=4, batch=1)
    alpha = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64, requires_grad=True)

    def fn(alpha):
        return mait.masked_attention(q, k, v, grid_size=grid, mask_size=3, num_prefix_tokens=prefix, alpha=alpha)

    assert torch.autograd.gradcheck(fn, (alpha,))


def test_alpha_gradient_is_nonzero_for_soft_heads():
    q, k, v = _qkv((4, 4), 1)
    alpha = torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64, requires_grad=True)
    mait.masked_attention(q, k, v, grid_size=(4, 4), alpha=alpha).square().sum().backward()
    assert alpha.grad is not None and bool((alpha.grad.abs() > 0).all())


def test_unmasked_equals_softmax_attention():
    q, k, v = _qkv((6, 5), 1)
    out = mait.masked_attention(q, k, v, grid_size=(6, 5), alpha=1.0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("grid", [(4, 4), (3, 7)])
def test_mask_covering_the_grid_equals_plain_attention(grid):
    q, k, v = _qkv(grid, 1)
    cover = mait.masks.max_useful_mask_size(grid)
    out = mait.masked_attention(q, k, v, grid_size=grid, mask_size=cover, alpha=0.0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-10, atol=1e-12)
    smaller = mait.masked_attention(q, k, v, grid_size=grid, mask_size=cover - 2, alpha=0.0)
    assert not torch.allclose(smaller, out)


def test_hard_mask_gives_non_neighbours_logit_zero_not_minus_inf():
    # One query on a 1x3 grid, no prefix, R = 1: only itself is a neighbour.
    q = torch.tensor([[[[1.0], [0.0], [0.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[2.0], [5.0], [-5.0]]]], dtype=torch.float64)
    v = torch.eye(3, dtype=torch.float64).view(1, 1, 3, 3)
    out = mait.masked_attention(q, k, v, grid_size=(1, 3), mask_size=1, num_prefix_tokens=0, alpha=0.0)
    # Row 0: logits [2, 0, 0] (non-neighbours are 0 whatever q·k is), so weights e^2, 1, 1.
    expected = torch.tensor([torch.e ** 2, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(out[0, 0, 0], expected / expected.sum())
    strict = mait.masked_attention(q, k, v, grid_size=(1, 3), mask_size=1, num_prefix_tokens=0, alpha=0.0,
                                   mode="neg_inf")
    torch.testing.assert_close(strict[0, 0, 0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_float_alpha_and_sequence_alpha_are_accepted():
    q, k, v = _qkv((3, 3), 1)
    a = mait.masked_attention(q, k, v, grid_size=3, alpha=0.25)
    b = mait.masked_attention(q, k, v, grid_size=(3, 3), alpha=[0.25, 0.25, 0.25])
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mask_size=2), "mask_size must be an odd positive integer.*2"),
    (dict(mask_size=0), "mask_size must be an odd positive integer.*0"),
    (dict(mask_size=-3), "mask_size must be an odd positive integer.*-3"),
    (dict(grid_size=(4, 5)), r"T = 17 tokens does not match grid_size \(4, 5\)"),
    (dict(num_prefix_tokens=2), "expected 18"),
    (dict(alpha=1.5), r"alpha must lie in \[0, 1\].*1.5"),
    (dict(alpha=[-0.1, 0.0, 0.0]), r"alpha must lie in \[0, 1\]"),
    (dict(alpha=[0.0, 1.0]), r"one value per head \(3,\), got shape \(2,\)"),
    (dict(alpha=[0.0, 0.5, 1.0], mode="neg_inf"), "neg_inf.*soft"),
    (dict(mode="minus_inf"), "mode must be one of"),
    (dict(backend="cuda_magic"), "unknown attention backend 'cuda_magic'"),
    (dict(mask=torch.ones(5, 5, dtype=torch.bool)), r"mask must be a bool tensor of shape \(T, T\)"),
])
def test_bad_input_raises_clear_value_error(kwargs, match):
    q, k, v = _qkv((4, 4), 1)
    args = dict(grid_size=(4, 4), mask_size=3, num_prefix_tokens=1, alpha=0.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        mait.masked_attention(q, k, v, **args)


def test_bad_alpha_type_raises_type_error():
    q, k, v = _qkv((2, 2), 1)
    with pytest.raises(TypeError, match="alpha must be"):
        mait.masked_attention(q, k, v, grid_size=2, alpha="hard")


def test_custom_mask_replaces_local_window():
    grid, prefix = (4, 4), 1
    q, k, v = _qkv(grid, prefix)
    keep = mait.random_mask(grid, 3, prefix, seed=3)
    out = mait.masked_attention(q, k, v, grid_size=grid, alpha=0.0, mask=keep)
    s = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    expected = torch.softmax(torch.where(keep, s, torch.zeros_like(s)), dim=-1) @ v
    torch.testing.assert_close(out, expected)
