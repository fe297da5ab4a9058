"""The FlexAttention backend (GPU path) against the reference, run eagerly on CPU."""

from __future__ import annotations

import itertools

import pytest
import torch

import mait
from mait.backends import flex

pytestmark = pytest.mark.skipif(not flex.available(), reason="torch without FlexAttention")


def _qkv(grid, prefix, heads=2, dim=8, batch=2, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = prefix + grid[0] * grid[1]
    return [2 * torch.randn(batch, heads, tokens, dim, generator=generator, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("mode", ["zero", "neg_inf"])
def test_flex_matches_reference(mode):
    for seed, (grid, size, prefix) in enumerate(itertools.product([(1, 1), (2, 3), (5, 5), (15, 9)], [1, 3, 7],
                                                                  [0, 1, 2])):
        q, k, v = _qkv(grid, prefix, seed=seed)
        kwargs = dict(grid_size=grid, mask_size=size, num_prefix_tokens=prefix, mode=mode)
        expected = mait.masked_attention(q, k, v, backend="reference", **kwargs)
        got = mait.masked_attention(q, k, v, backend="flex", **kwargs)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=f"{grid} R {size} P {prefix}")


def test_flex_float32():
    q, k, v = _qkv((9, 7), 1, dtype=torch.float32, dim=16)
    truth = mait.masked_attention(q.double(), k.double(), v.double(), grid_size=(9, 7), backend="reference")
    got = mait.masked_attention(q, k, v, grid_size=(9, 7), backend="flex")
    torch.testing.assert_close(got, truth.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on CPU")
def test_flex_gradients_match_reference():
    grid, prefix = (4, 5), 1
    grads = []
    for backend in ("reference", "flex"):
        inputs = [t.cuda().requires_grad_() for t in _qkv(grid, prefix, seed=4)]
        out = mait.masked_attention(*inputs, grid_size=grid, num_prefix_tokens=prefix, backend=backend)
        grads.append(torch.autograd.grad(out.pow(2).sum(), inputs))
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_flex_refuses_soft_heads():
    q, k, v = _qkv((3, 3), 1)
    with pytest.raises(ValueError, match="hard-masked"):
        mait.masked_attention(q, k, v, grid_size=3, alpha=[0.0, 0.5], backend="flex")
