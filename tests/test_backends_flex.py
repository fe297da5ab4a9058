"""The FlexAttention backends (GPU path) against the float64 reference, run eagerly on the CPU.

FlexAttention has no CPU backward: gradients of these backends are checked by
``benchmarks/gpu.sh`` on a GPU (and by the CUDA-only test below when one is present).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import mait
from mait.backends import blocksparse, flex

pytestmark = pytest.mark.skipif(not flex.available(), reason="torch without FlexAttention")


def _qkv(grid, prefix, heads=2, dim=8, batch=2, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = prefix + grid[0] * grid[1]
    return [2 * torch.randn(batch, heads, tokens, dim, generator=generator, dtype=dtype) for _ in range(3)]


CASES = list(itertools.product([(1, 1), (2, 3), (5, 5), (15, 9)], [1, 3, 7], [0, 1, 2]))


@pytest.mark.parametrize("alpha", [[0.0, 0.0, 0.0], [0.0, 0.37, 1.0], [1.0, 0.0, 0.8]])
def test_fused_matches_reference_any_head_mix(alpha):
    for seed, (grid, size, prefix) in enumerate(CASES):
        q, k, v = _qkv(grid, prefix, heads=3, seed=seed)
        kwargs = dict(grid_size=grid, mask_size=size, num_prefix_tokens=prefix, alpha=torch.tensor(alpha).double())
        expected = mait.masked_attention(q, k, v, backend="reference", **kwargs)
        got = mait.masked_attention(q, k, v, backend="flex", **kwargs)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=f"{grid} R {size} P {prefix}")


def test_fused_neg_inf_and_custom_masks():
    for seed, (grid, size, prefix) in enumerate(CASES[::2]):
        q, k, v = _qkv(grid, prefix, heads=3, seed=seed)
        random = torch.stack([mait.random_mask(grid, size, prefix, seed=seed + h) for h in range(3)])
        random |= torch.eye(random.shape[-1], dtype=torch.bool)   # no row without a kept key (-inf rows are NaN)
        for mode, alpha, mask in [("neg_inf", [0.0, 1.0, 0.0], None), ("zero", [0.0, 0.5, 1.0], random),
                                  ("neg_inf", [0.0, 0.0, 1.0], random), ("zero", [0.0, 0.0, 0.0], random[0])]:
            kwargs = dict(grid_size=grid, mask_size=size, num_prefix_tokens=prefix, mode=mode, mask=mask,
                          alpha=torch.tensor(alpha).double())
            expected = mait.masked_attention(q, k, v, backend="reference", **kwargs)
            got = mait.masked_attention(q, k, v, backend="flex", **kwargs)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=f"{grid} R {size} {mode}")


@pytest.mark.parametrize("mode", ["zero", "neg_inf"])
def test_blocksparse_matches_reference(mode):
    for seed, (grid, size, prefix) in enumerate(CASES):
        q, k, v = _qkv(grid, prefix, seed=seed)
        kwargs = dict(grid_size=grid, mask_size=size, num_prefix_tokens=prefix, mode=mode)
        expected = mait.masked_attention(q, k, v, backend="reference", **kwargs)
        got = mait.masked_attention(q, k, v, backend="blocksparse", **kwargs)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=f"{grid} R {size} P {prefix}")


def test_blocksparse_constants_are_linear_in_tokens():
    """The per-grid constants hold O(T) numbers (no T x T tensor) and equal the dense counts."""
    grid, size, prefix = (15, 9), 5, 1
    _, log_rest, inv_rest = blocksparse.grid_constants(grid, size, prefix, "cpu", torch.float64)
    dense = mait.local_mask(grid, size, prefix)
    rest = (~dense).sum(-1).double()
    assert log_rest.shape == inv_rest.shape == (prefix + 135,)
    torch.testing.assert_close(log_rest.exp(), rest)
    torch.testing.assert_close(inv_rest, 1 / rest.clamp(min=1))


def _dense_neighbourhood(keep, scale):
    """A dense stand-in for block-sparse FlexAttention: strict neighbourhood attention and its lse."""

    def attend(q, k, v):
        scores = ((q * scale) @ k.transpose(-2, -1)).masked_fill(~keep, float("-inf"))
        return scores.softmax(-1) @ v, scores.logsumexp(-1)

    return attend


@pytest.mark.parametrize("grid,size,prefix", [((3, 4), 3, 1), ((2, 5), 1, 0), ((4, 4), 5, 2)])
def test_blocksparse_backward_includes_the_lse_gradient(grid, size, prefix):
    """The identity's gradients (through ``lse`` too) equal the reference's: gradcheck in float64,
    with a dense strict-neighbourhood stand-in for FlexAttention (which has no CPU backward)."""
    q, k, v = (t.requires_grad_() for t in _qkv(grid, prefix, heads=2, dim=3, batch=1, seed=sum(grid)))
    scale = 3 ** -0.5
    _, log_rest, inv_rest = blocksparse.grid_constants(grid, size, prefix, "cpu", torch.float64)
    attend = _dense_neighbourhood(mait.local_mask(grid, size, prefix), scale)

    def fn(q, k, v):
        return blocksparse.identity(q, k, v, None, log_rest, inv_rest, scale, grid, size, prefix, True, attend=attend)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    weight = torch.randn_like(q)
    got = torch.autograd.grad((fn(q, k, v) * weight).sum(), (q, k, v))
    ref = mait.masked_attention(q, k, v, grid_size=grid, mask_size=size, num_prefix_tokens=prefix, scale=scale,
                                backend="reference")
    expected = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", ["flex", "blocksparse"])
def test_float32(backend):
    q, k, v = _qkv((9, 7), 1, dtype=torch.float32, dim=16)
    truth = mait.masked_attention(q.double(), k.double(), v.double(), grid_size=(9, 7), backend="reference")
    got = mait.masked_attention(q, k, v, grid_size=(9, 7), backend=backend)
    torch.testing.assert_close(got, truth.float(), rtol=1e-4, atol=1e-5)


def test_one_compilation_per_geometry_and_dtype():
    """Layers that differ only in α share one compiled kernel; a new grid, R or dtype compiles once more."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    fn = torch.compile(flex.fused_masked_attention, backend=counter, dynamic=False)
    torch._dynamo.reset()
    for grid, dtype in [((4, 4), torch.float32), ((5, 3), torch.float32), ((4, 4), torch.float64)]:
        q, k, v = _qkv(grid, 1, heads=3, dtype=dtype)
        for layer_alpha in ([0.0, 0.0, 1.0], [0.0, 0.3, 0.9], [1.0, 0.5, 0.0]):   # three "layers"
            alpha = torch.tensor(layer_alpha)
            got = fn(q, k, v, alpha, None, 8 ** -0.5, grid[1], 1, 1, False)
            expected = mait.masked_attention(q, k, v, grid_size=grid, alpha=alpha.to(dtype), backend="reference")
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward on the CPU")
@pytest.mark.parametrize("alpha", [[0.0, 0.0, 0.0], [0.0, 0.4, 1.0]])
def test_fused_gradients_match_reference_cuda(alpha):
    grid, prefix = (6, 5), 1
    grads = []
    for backend in ("reference", "flex"):
        inputs = [t.cuda().float().requires_grad_() for t in _qkv(grid, prefix, heads=3, dim=16, seed=4)]
        a = torch.tensor(alpha, device="cuda", requires_grad=True)
        out = mait.masked_attention(*inputs, grid_size=grid, num_prefix_tokens=prefix, alpha=a, backend=backend)
        grads.append(torch.autograd.grad(out.pow(2).sum(), inputs + [a]))
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_compiled_kernels_may_specialise_per_geometry_more_than_eight_times():
    """Several models (or H-MaiT's stages in training and inference) need more than dynamo's default 8."""
    flex.compiled()
    blocksparse.compiled()
    config = torch._dynamo.config
    assert getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 0)) >= 64


def test_whole_model_compile_builds_the_block_mask_once(monkeypatch):
    """Under torch.compile of a whole model the block-sparse constants are a traced-in constant:
    built once per geometry (not once per call inside the graph) and the output stays exact."""
    import timm
    built = []
    original = blocksparse.create_block_mask

    def counting(*args, **kwargs):
        built.append(args[3:5])
        return original(*args, **kwargs)

    monkeypatch.setattr(blocksparse, "create_block_mask", counting)
    blocksparse.grid_constants.cache_clear()
    torch._dynamo.reset()
    model = timm.create_model("mait_t12_224", num_classes=7, img_size=32, patch_size=4, depth=2,
                              scheme="all").eval()
    for layer in model.modules():
        if isinstance(layer, mait.attention.MaskedAttention):
            layer.backend = "blocksparse"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
        compiled = torch.compile(model, backend="eager")
        for _ in range(3):
            assert torch.equal(compiled(images), expected)
    assert built == [(65, 65)]
    blocksparse.grid_constants.cache_clear()
