"""Every fast backend against the dense reference (docs/semantics.md) on random inputs of many shapes."""

from __future__ import annotations

import itertools

import pytest
import torch

import mait
from mait import HeadKind
from mait.backends import BACKENDS, AttentionCall, local_is_faster, plan_attention, reference
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


@pytest.mark.parametrize("band_bytes", [1, 5000])
@pytest.mark.parametrize("mode", ["zero", "neg_inf"])
def test_local_row_bands_match_reference_forward_and_backward(monkeypatch, band_bytes, mode):
    """The linear backend walks the grid in row bands (one row; a few rows with a partial last band)."""
    monkeypatch.setattr(mait.backends.local, "BAND_BYTES", band_bytes)
    for seed, (grid, size, prefix) in enumerate([((7, 6), 3, 1), ((9, 5), 5, 2), ((5, 8), 7, 0), ((1, 5), 3, 1)]):
        inputs = [t.requires_grad_() for t in _qkv(grid, prefix, seed=seed)]
        assert len(mait.backends.local.row_bands(inputs[0][:, :, prefix:].reshape(2, 3, *grid, 8))) > 1 or grid[0] == 1
        weight = torch.randn_like(inputs[0])
        outs, grads = [], []
        for backend in ("reference", "local"):
            out = mait.masked_attention(*inputs, grid_size=grid, mask_size=size, num_prefix_tokens=prefix,
                                        mode=mode, backend=backend)
            outs.append(out)
            grads.append(torch.autograd.grad((out * weight).sum(), inputs))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)
        for got, expected in zip(grads[1], grads[0]):
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


MATMUL_ALPHAS = [[0.0, 0.0, 0.0], [0.0, 0.37, 1.0], [1.0, 1.0, 1.0], [0.9, 0.05, 0.5]]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("alpha", MATMUL_ALPHAS)
def test_matmul_matches_reference_float64(prefix, alpha):
    """The dense ``matmul`` backend: every head kind, R, grid and both modes, on the local and on random masks."""
    a = torch.tensor(alpha, dtype=torch.float64)
    for seed, (grid, size) in enumerate(itertools.product(GRIDS, SIZES)):
        q, k, v = _qkv(grid, prefix, seed=seed)
        for mode in ("zero", "neg_inf") if not (set(alpha) - {0.0, 1.0}) else ("zero",):
            kwargs = dict(grid_size=grid, mask_size=size, num_prefix_tokens=prefix, alpha=a, mode=mode)
            got = mait.masked_attention(q, k, v, backend="matmul", **kwargs)
            expected = mait.masked_attention(q, k, v, backend="reference", **kwargs)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=f"grid {grid} R {size} {mode}")
        masks = [mait.random_mask(grid, size, prefix, seed=seed + h) for h in range(3)]
        for mask in (masks[0], torch.stack(masks)):                  # one mask for all heads, one per head
            kwargs = dict(grid_size=grid, mask_size=size, num_prefix_tokens=prefix, alpha=a, mask=mask)
            torch.testing.assert_close(mait.masked_attention(q, k, v, backend="matmul", **kwargs),
                                       mait.masked_attention(q, k, v, backend="reference", **kwargs),
                                       rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha,mode", [(alpha, "zero") for alpha in MATMUL_ALPHAS] +
                         [(alpha, "neg_inf") for alpha in MATMUL_ALPHAS if not set(alpha) - {0.0, 1.0}])
def test_matmul_gradients_match_reference(alpha, mode):
    """Gradients for q, k, v and a learnable α (which must not be lost to the in-place mask)."""
    grid, prefix, size = (6, 5), 1, 3
    inputs = [t.requires_grad_() for t in _qkv(grid, prefix, seed=13)]
    weight = torch.randn_like(inputs[0])
    grads = []
    for backend in ("reference", "matmul"):
        a = torch.tensor(alpha, dtype=torch.float64, requires_grad=mode == "zero")
        out = mait.masked_attention(*inputs, grid_size=grid, mask_size=size, num_prefix_tokens=prefix, alpha=a,
                                    mode=mode, backend=backend)
        wanted = inputs + ([a] if a.requires_grad else [])
        grads.append(torch.autograd.grad((out * weight).sum(), wanted))
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


def test_matmul_dropout_draws_like_the_reference():
    """Attention dropout on the probabilities: the same seed gives the reference's exact output."""
    q, k, v = _qkv((4, 4), 1, seed=21)
    outs = []
    for backend in ("reference", "matmul"):
        torch.manual_seed(5)
        outs.append(mait.masked_attention(q, k, v, grid_size=(4, 4), alpha=[0.0, 0.5, 1.0], dropout_p=0.3,
                                          backend=backend))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)


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


def _call(grid=(14, 14), size=3, prefix=1, kinds="hh", custom=False, dropout=False, grad=False, device="cpu",
          dtype=torch.float32, head_dim=32, mode="zero"):
    return AttentionCall(grid, size, prefix, tuple(HeadKind(k) for k in kinds), mode=mode, custom_mask=custom,
                         device_type=device, dtype=dtype, head_dim=head_dim, needs_grad=grad, dropout=dropout)


def _steps(plan):
    return [(step.backend.name, step.heads) for step in plan.steps]


def test_cpu_plans():
    assert not local_is_faster((7, 7), 3) and local_is_faster((14, 14), 3) and local_is_faster((56, 56), 3)
    assert not local_is_faster((14, 14), 7) and local_is_faster((56, 56), 7)
    assert _steps(plan_attention(_call())) == [("local", (0, 1))]
    assert _steps(plan_attention(_call(grid=(7, 7)))) == [("matmul", (0, 1))]
    assert _steps(plan_attention(_call(custom=True))) == [("matmul", (0, 1))]
    assert _steps(plan_attention(_call(dropout=True))) == [("matmul", (0, 1))]
    assert _steps(plan_attention(_call(kinds="ss", grad=True))) == [("matmul", (0, 1))]
    assert _steps(plan_attention(_call(kinds="uu", grad=True))) == [("sdpa", (0, 1))]
    assert _steps(plan_attention(_call(kinds="hsuh"))) == [("local", (0, 3)), ("matmul", (1,)), ("sdpa", (2,))]
    # on a small grid hard and soft heads share the dense matmul backend: one step, not two
    assert _steps(plan_attention(_call(grid=(7, 7), kinds="hsu"))) == [("matmul", (0, 1)), ("sdpa", (2,))]
    # auto never picks the reference: it is the truth, kept in the definition's form
    for kinds, grid, custom, dropout, grad in itertools.product(("h", "s", "u", "hsu"), ((2, 2), (7, 7), (20, 20)),
                                                               (False, True), (False, True), (False, True)):
        call = _call(grid=grid, kinds=kinds, custom=custom, dropout=dropout, grad=grad)
        assert "reference" not in {name for name, _ in _steps(plan_attention(call))}, call


def test_gpu_plans():
    """CUDA policy (decided from the call alone, so it is tested without a GPU)."""
    gpu = dict(device="cuda", dtype=torch.bfloat16)
    assert _steps(plan_attention(_call(kinds="uuu", **gpu))) == [("sdpa", (0, 1, 2))]
    for kinds in ("hhh", "hsu", "sss", "hu"):
        for grad in (False, True):
            assert _steps(plan_attention(_call(kinds=kinds, grad=grad, **gpu))) == [("flex", tuple(range(len(kinds))))]
    assert _steps(plan_attention(_call(kinds="hhh", custom=True, **gpu))) == [("flex", (0, 1, 2))]
    # long all-hard sequences: the block-sparse identity, for inference and training
    for grad in (False, True):
        assert _steps(plan_attention(_call(grid=(56, 56), kinds="hhh", grad=grad, **gpu))) == [("blocksparse",
                                                                                                (0, 1, 2))]
    assert _steps(plan_attention(_call(grid=(56, 56), kinds="hhu", **gpu))) == [("flex", (0, 1, 2))]
    # what FlexAttention's GPU kernels cannot take falls back to per-kind groups
    assert _steps(plan_attention(_call(kinds="hsu", dropout=True, **gpu))) == [("matmul", (0, 1)), ("sdpa", (2,))]
    assert _steps(plan_attention(_call(kinds="hu", head_dim=8, **gpu))) == [("local", (0,)), ("sdpa", (1,))]
    assert _steps(plan_attention(_call(kinds="hu", device="cuda", dtype=torch.float64))) == [("local", (0,)),
                                                                                          ("sdpa", (1,))]


@pytest.mark.parametrize("backend,call,needle", [
    ("local", dict(kinds="hs"), "hard-masked"),
    ("local", dict(custom=True), "custom mask"),
    ("local", dict(dropout=True), "dropout"),
    ("sdpa", dict(kinds="uh"), "unmasked"),
    ("flex", dict(dropout=True), "dropout"),
    ("flex", dict(grad=True), "no backward on the CPU"),
    ("flex", dict(device="cuda", head_dim=8), "head_dim >= 16"),
    ("blocksparse", dict(grad=True), "no backward on the CPU"),
    ("blocksparse", dict(kinds="hu"), "hard-masked"),
])
def test_named_backend_refuses_what_it_cannot_run(backend, call, needle):
    with pytest.raises(ValueError, match=needle):
        plan_attention(_call(**call), backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        plan_attention(_call(), "nope")
    assert {"reference", "matmul", "local", "sdpa", "flex", "blocksparse", "triton"} <= set(BACKENDS)


def test_plan_is_decided_once_and_logged(caplog):
    layer = mait.MaskedAttention(48, 4, grid_size=(12, 12), num_prefix_tokens=1, head_kinds="hsuh")
    x = torch.randn(2, 145, 48)
    with caplog.at_level("DEBUG", logger="mait"):
        with torch.no_grad():
            layer(x)
            layer(x)
        layer(x).sum().backward()
    plans = [r.getMessage() for r in caplog.records if "plan:" in r.getMessage()]
    assert len(plans) == 2, plans                        # inference and training: one plan each
    assert "heads 0,3 (hh) -> local" in plans[0] and "heads 1 (s) -> matmul" in plans[0]
    assert "heads 2 (u) -> sdpa" in plans[0] and "train" in plans[1]
    layer.backend = "reference"                          # a new backend choice re-plans
    with caplog.at_level("DEBUG", logger="mait"):
        with torch.no_grad():
            layer(x)
    assert "heads 0-3 (hsuh) -> reference" in caplog.records[-1].getMessage()


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
