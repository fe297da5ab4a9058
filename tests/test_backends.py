"""Every fast backend against the dense reference (docs/semantics.md, docs/performance.md) on random inputs of many shapes."""

from __future__ import annotations

import itertools

import pytest
import torch

import mait
from mait.backends import BACKENDS, AttentionCall, local_is_faster, reference, select_backend
from mait.backends.local import local_attention
from mait.masks import local_mask

GRIDS = [(1, 1), (1, 5), (2, 3), (4, 4), (5, 2), (7, 7), (15, 9)]
SIZES = [1, 3, 5, 7]
PREFIXES = [0, 1, 2]


def _qkv(grid, prefix, heads=3, dim=8, batch=2, dtype=torch.float64, seed=0, spread=2.0):
    generator = torch.Generator().manual_seed(seed)
    tokens = prefix + grid[0] * grid[1]
    return [torch.randn(batch, heads, tokens, dim, generator=generator, dtype=dtype) * spread for _ in range(3)]


def _reference(q, k, v, grid, size, prefix, alpha, mode="zero"):
    return mait.masked_attention(q, k, v, grid_size=grid, mask_size=size, num_prefix_tokens=prefix, alpha=alpha,
                                 mode=mode, backend="reference")


@pytest.mark.parametrize("mode", ["zero", "neg_inf"])
@pytest.mark.parametrize("prefix", PREFIXES)
def test_local_matches_reference_float64(mode, prefix):
    for seed, (grid, size) in enumerate(itertools.product(GRIDS, SIZES)):
        q, k, v = _qkv(grid, prefix, seed=seed)
        expected = _reference(q, k, v, grid, size, prefix, 0.0, mode)
        got = local_attention(q, k, v, grid_size=grid, mask_size=size, num_prefix_tokens=prefix, mode=mode)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=f"grid {grid} R {size}")


@pytest.mark.parametrize("prefix", PREFIXES)
def test_local_matches_reference_float32(prefix):
    for seed, (grid, size) in enumerate(itertools.product([(3, 5), (9, 9), (15, 9)], [3, 5])):
        q, k, v = _qkv(grid, prefix, dtype=torch.float32, dim=16, seed=seed, spread=3.0)
        truth = _reference(q.double(), k.double(), v.double(), grid, size, prefix, 0.0)
        dense = _reference(q, k, v, grid, size, prefix, 0.0)
        got = mait.masked_attention(q, k, v, grid_size=grid, mask_size=size, num_prefix_tokens=prefix,
                                    backend="local")
        # float32 rounding: no worse than the dense float32 computation of the same call.
        error, dense_error = (got.double() - truth).abs().max(), (dense.double() - truth).abs().max()
        assert error <= 2 * dense_error + 1e-6, (grid, size, float(error), float(dense_error))
        torch.testing.assert_close(got, truth.float(), rtol=1e-4, atol=1e-4)


def test_local_large_logits_stay_finite():
    """Logits far above and below 0 (m_i clamps at 0; e^{-m} underflows) remain exact."""
    for spread in (0.01, 30.0):
        q, k, v = _qkv((6, 5), 1, spread=spread, seed=3)
        got = local_attention(q, k, v, grid_size=(6, 5), mask_size=3, num_prefix_tokens=1)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, _reference(q, k, v, (6, 5), 3, 1, 0.0), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("mode", ["zero", "neg_inf"])
def test_local_gradcheck(prefix, mode):
    q, k, v = (t.requires_grad_() for t in _qkv((3, 4), prefix, heads=2, dim=3, batch=1, seed=prefix))

    def fn(q, k, v):
        return local_attention(q, k, v, grid_size=(3, 4), mask_size=3, num_prefix_tokens=prefix, mode=mode)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_local_gradients_match_reference():
    grid, prefix, size = (7, 6), 1, 5
    inputs = [t.requires_grad_() for t in _qkv(grid, prefix, seed=7)]
    weight = torch.randn_like(inputs[0])
    grads = []
    for backend in ("reference", "local"):
        out = mait.masked_attention(*inputs, grid_size=grid, mask_size=size, num_prefix_tokens=prefix,
                                    backend=backend)
        grads.append(torch.autograd.grad((out * weight).sum(), inputs))
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("grid", [(5, 7), (12, 12), (15, 9)])
@pytest.mark.parametrize("alpha", [[0.0, 1.0, 0.3, 0.0], [1.0, 1.0, 0.0, 0.0], [0.7, 0.2, 0.0, 1.0], [1.0] * 4])
def test_auto_mixed_heads_match_reference(grid, alpha):
    for prefix, size in itertools.product(PREFIXES, [3, 5]):
        q, k, v = _qkv(grid, prefix, heads=4, seed=prefix + size)
        a = torch.tensor(alpha, dtype=torch.float64)
        expected = _reference(q, k, v, grid, size, prefix, a)
        got = mait.masked_attention(q, k, v, grid_size=grid, mask_size=size, num_prefix_tokens=prefix, alpha=a)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [[0.0, 1.0, 0.4], [0.0, 1.0, 0.0]])   # contiguous / interleaved head groups
def test_auto_mixed_heads_gradients(alpha):
    grid, prefix = (12, 12), 1
    inputs = [t.requires_grad_() for t in _qkv(grid, prefix, heads=3, seed=11)]
    alpha = torch.tensor(alpha, dtype=torch.float64)
    grads = []
    for backend in ("reference", "auto"):
        out = mait.masked_attention(*inputs, grid_size=grid, num_prefix_tokens=prefix, alpha=alpha, backend=backend)
        grads.append(torch.autograd.grad(out.pow(2).sum(), inputs))
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


def test_auto_neg_inf_mixed_heads():
    grid, prefix = (14, 14), 2
    q, k, v = _qkv(grid, prefix, heads=3, seed=5)
    alpha = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    expected = _reference(q, k, v, grid, 3, prefix, alpha, mode="neg_inf")
    got = mait.masked_attention(q, k, v, grid_size=grid, num_prefix_tokens=prefix, alpha=alpha, mode="neg_inf")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_alpha_gradient_is_kept():
    """A differentiable α must get its gradient, so ``auto`` may not route it to a fast path."""
    grid = (12, 12)
    q, k, v = _qkv(grid, 1, heads=2, seed=2)
    grads = []
    for backend in ("reference", "auto"):
        alpha = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
        out = mait.masked_attention(q, k, v, grid_size=grid, alpha=alpha, backend=backend)
        grads.append(torch.autograd.grad(out.sum(), alpha)[0])
    assert grads[0].abs().min() > 0
    torch.testing.assert_close(grads[1], grads[0])


def _call(grid=(14, 14), size=3, prefix=1, alpha=(0.0, 0.0), custom=False, dropout=0.0, grad=False):
    q, k, v = _qkv(grid, prefix, heads=len(alpha), batch=1, dim=4)
    a = torch.tensor(alpha, dtype=torch.float64, requires_grad=grad)
    keep = local_mask(grid, size, prefix)
    return AttentionCall(q, k, v, keep=keep, alpha=a, mode="zero", grid_size=grid, mask_size=size,
                         num_prefix_tokens=prefix, custom_mask=custom, scale=0.5, dropout_p=dropout)


def test_auto_choice():
    assert not local_is_faster((7, 7), 3) and local_is_faster((14, 14), 3) and local_is_faster((56, 56), 3)
    assert not local_is_faster((14, 14), 7) and local_is_faster((56, 56), 7)
    assert select_backend(_call(custom=True)).name == "reference"
    assert select_backend(_call(dropout=0.1)).name == "reference"
    assert select_backend(_call(grad=True)).name == "reference"
    assert select_backend(_call()).name == "auto"


@pytest.mark.parametrize("backend,call,needle", [
    ("local", dict(alpha=(0.0, 0.5)), "hard-masked"),
    ("local", dict(custom=True), "custom mask"),
    ("local", dict(dropout=0.1), "dropout"),
    ("local", dict(grad=True), "requires grad"),
    ("sdpa", dict(alpha=(1.0, 0.0)), "unmasked"),
])
def test_named_backend_refuses_what_it_cannot_run(backend, call, needle):
    with pytest.raises(ValueError, match=needle):
        select_backend(_call(**call), backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        select_backend(_call(), "nope")
    assert {"reference", "local", "sdpa"} <= set(BACKENDS)


def test_module_uses_fast_path_and_matches_reference():
    """A ``MaskedAttention`` layer mixing h/s/u heads gives the same output on auto and reference."""
    torch.manual_seed(0)
    layer = mait.MaskedAttention(48, 4, grid_size=(12, 12), num_prefix_tokens=1, head_kinds="hsuh").double()
    x = torch.randn(2, 145, 48, dtype=torch.float64)
    with torch.no_grad():
        fast = layer(x)
        layer.backend = "reference"
        slow = layer(x)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


def test_reference_is_the_dense_definition():
    """Guard the truth itself: one head, written out with a Python loop over rows."""
    grid, prefix, size = (3, 3), 1, 3
    q, k, v = _qkv(grid, prefix, heads=1, batch=1, dim=2, seed=9)
    keep = local_mask(grid, size, prefix)
    scores = (q[0, 0] @ k[0, 0].T) / 2 ** 0.5
    rows = [torch.softmax(torch.where(keep[i], scores[i], torch.zeros(())), -1) @ v[0, 0] for i in range(10)]
    got = reference.masked_attention(q, k, v, keep=keep, alpha=torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(got[0, 0], torch.stack(rows))
