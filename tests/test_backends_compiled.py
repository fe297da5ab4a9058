"""The compiled backend (the window as plain tensor code, fused by inductor) against the dense reference.

The plain function is checked eagerly over many shapes (cheap); inductor compiles take seconds to a minute
each on a CPU, so the default suite compiles two geometries here (tests/test_mixed_precision.py one more, in
bf16) and the rest are marked slow.
"""

from __future__ import annotations

import itertools
import logging

import pytest
import timm
import torch

import mait
from mait import HeadKind
from mait.backends import AttentionCall, compiled, plan_attention
from mait.backends.compiled import window_attention

GRIDS = [(1, 1), (1, 5), (2, 3), (4, 4), (5, 2), (7, 7), (9, 6)]
needs_inductor = pytest.mark.skipif(compiled.unavailable_reason("cpu") is not None,
                                    reason=str(compiled.unavailable_reason("cpu")))


def _qkv(grid, prefix, heads=3, dim=8, batch=2, dtype=torch.float64, seed=0, grad=False):
    generator = torch.Generator().manual_seed(seed)
    tokens = prefix + grid[0] * grid[1]
    return [(2 * torch.randn(batch, heads, tokens, dim, generator=generator, dtype=dtype)).requires_grad_(grad)
            for _ in range(3)]


def _forward_backward(inputs, backend, grid, size, prefix, mode):
    out = mait.masked_attention(*inputs, grid_size=grid, mask_size=size, num_prefix_tokens=prefix, mode=mode,
                                backend=backend)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out.dtype)
    return out, torch.autograd.grad((out * weight).sum(), inputs)


@pytest.mark.parametrize("mode", ["zero", "neg_inf"])
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_plain_window_code_matches_reference_forward_and_backward(mode, prefix):
    """The function the compiler fuses, run eagerly: every grid (borders truncated wherever R > grid), R 1-7."""
    for seed, (grid, size) in enumerate(itertools.product(GRIDS, [1, 3, 5, 7])):
        inputs = _qkv(grid, prefix, seed=seed, grad=True)
        expected, expected_grads = _forward_backward(inputs, "reference", grid, size, prefix, mode)
        got = window_attention(*inputs, grid_size=grid, mask_size=size, num_prefix_tokens=prefix,
                               zero=mode == "zero", scale=8 ** -0.5)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=f"grid {grid} R {size}")
        weight = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        for name, g, e in zip("qkv", torch.autograd.grad((got * weight).sum(), inputs), expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11, msg=f"d{name} grid {grid} R {size}")


def _check_compiled(grid, size, prefix, mode, dtype, grad):
    """The compiled backend against the reference: float64 to 1e-10, float32 no worse than dense float32."""
    inputs = _qkv(grid, prefix, dtype=dtype, seed=size + prefix, grad=grad)
    truth_inputs = [t.detach().double().requires_grad_(grad) for t in inputs]
    if grad:
        got, got_grads = _forward_backward(inputs, "compiled", grid, size, prefix, mode)
        truth, truth_grads = _forward_backward(truth_inputs, "reference", grid, size, prefix, mode)
    else:
        got = mait.masked_attention(*inputs, grid_size=grid, mask_size=size, num_prefix_tokens=prefix, mode=mode,
                                    backend="compiled")
        truth = mait.masked_attention(*truth_inputs, grid_size=grid, mask_size=size, num_prefix_tokens=prefix,
                                      mode=mode, backend="reference")
        got_grads, truth_grads = (), ()
    assert got.dtype == dtype
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got.double(), truth, **tol)
    for name, g, e in zip("qkv", got_grads, truth_grads):
        torch.testing.assert_close(g.double(), e, **(tol if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)),
                                   msg=f"d{name}")


@needs_inductor
def test_compiled_float64_forward_backward_and_one_compile_log(caplog):
    grid, size, prefix = (7, 6), 3, 1
    with caplog.at_level(logging.INFO, logger="mait"):
        _check_compiled(grid, size, prefix, "zero", torch.float64, grad=True)
        _check_compiled(grid, size, prefix, "zero", torch.float64, grad=True)     # reuses the compiled code
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if "compiled backend" in r.getMessage()]
    assert [level for level, _ in logged] == ["WARNING", "INFO"], logged      # before compiling, then its time
    assert "compiling the window for grid 7x6 R 3 prefix 1 zero" in logged[0][1], logged
    assert "with gradients compiled in" in logged[1][1], logged


@needs_inductor
def test_compiled_float32_truncated_borders_neg_inf_forward_backward():
    _check_compiled((4, 3), 5, 2, "neg_inf", torch.float32, grad=True)      # every window crosses the border


@pytest.mark.slow
@needs_inductor
def test_compiled_float32_no_prefix_inference():
    _check_compiled((9, 5), 3, 0, "zero", torch.float32, grad=False)


@pytest.mark.slow
@needs_inductor
@pytest.mark.parametrize("grid,size,prefix,mode,dtype", [
    (grid, size, prefix, mode, dtype)
    for (grid, size), prefix, mode, dtype in itertools.product([((6, 7), 3), ((3, 4), 5)], [0, 1, 2],
                                                                ["zero", "neg_inf"], [torch.float64, torch.float32])])
def test_compiled_matches_reference_many_shapes(grid, size, prefix, mode, dtype):
    _check_compiled(grid, size, prefix, mode, dtype, grad=True)


def _call(kinds="hh", grid=(14, 14), **kwargs):
    return AttentionCall(grid, 3, 1, tuple(HeadKind(k) for k in kinds), **kwargs)


def _steps(plan):
    return [(step.backend.name, step.heads) for step in plan.steps]


def test_auto_picks_compiled_only_when_opted_in(monkeypatch):
    plan_attention.cache_clear()
    try:
        monkeypatch.delenv(compiled.AUTO_ENV, raising=False)
        assert _steps(plan_attention(_call("hhu"))) == [("local", (0, 1)), ("sdpa", (2,))]
        monkeypatch.setenv(compiled.AUTO_ENV, "1")
        plan_attention.cache_clear()
        if compiled.unavailable_reason("cpu") is None:
            assert _steps(plan_attention(_call("hhu"))) == [("compiled", (0, 1)), ("sdpa", (2,))]
        # the shape rule still holds: a small grid stays dense
        assert _steps(plan_attention(_call("hh", grid=(7, 7)))) == [("matmul", (0, 1))]
    finally:
        plan_attention.cache_clear()


def test_refuses_in_one_line_without_inductor_and_auto_falls_back(monkeypatch):
    reason = "inductor needs a C++ compiler on the CPU and none was found (install g++ or set CXX)"
    monkeypatch.setattr(compiled, "unavailable_reason", lambda device_type: reason)
    monkeypatch.setenv(compiled.AUTO_ENV, "1")
    plan_attention.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"backend 'compiled' cannot run this call: inductor needs a C\+\+"):
            plan_attention(_call(), "compiled")
        assert _steps(plan_attention(_call())) == [("local", (0, 1))]
    finally:
        plan_attention.cache_clear()


@pytest.mark.parametrize("kinds,mode", [("hhs", "zero"), ("hh", "zero")])
def test_refuses_what_the_window_cannot_compute(kinds, mode):
    call = _call(kinds, dropout=kinds == "hh")
    with pytest.raises(ValueError, match="hard-masked" if "s" in kinds else "dropout"):
        plan_attention(call, "compiled")


def _small_mait(backend):
    """A masked model whose 14x14 grid puts its hard heads on the linear backend (``auto``) or ``backend``."""
    torch.manual_seed(0)
    model = timm.create_model("mait_t12_224", num_classes=5, img_size=56, patch_size=4, depth=2, embed_dim=24,
                              num_heads=3, scheme="all").double()
    for layer in model.modules():
        if isinstance(layer, mait.attention.MaskedAttention):
            layer.backend = backend
    return model


@pytest.mark.parametrize("backend", ["auto", "compiled"])
def test_whole_model_traces_in_one_graph_with_the_window(backend):
    """``torch.compile(model, fullgraph=True)``: the masked layers trace without a graph break, in inference and
    training, and give the eager model's output and gradients (dynamo's eager backend: no inductor needed)."""
    model = _small_mait(backend)
    assert model.blocks[0].attn.plan(torch.empty(0, dtype=torch.float64)).steps[0].backend.name == (
        "local" if backend == "auto" else backend)
    images = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    explained = torch._dynamo.explain(model.eval())(images)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    traced = torch.compile(model, backend="eager", fullgraph=True)
    for training in (False, True):
        model.train(training)
        eager = model(images)
        eager_grads = torch.autograd.grad(eager.sum(), list(model.parameters()))
        got = traced(images)
        got_grads = torch.autograd.grad(got.sum(), list(model.parameters()))
        torch.testing.assert_close(got, eager, rtol=1e-10, atol=1e-12)
        for g, e in zip(got_grads, eager_grads):
            torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10)


@pytest.mark.slow
@needs_inductor
def test_whole_model_under_inductor_matches_eager():
    model = _small_mait("auto").float().eval()
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(images), model(images), rtol=1e-4, atol=1e-4)


def test_a_compiled_model_compiles_once():
    """The layers' per-grid caches (plans, masks) do not make dynamo recompile on the second call: a compiled
    model that has never run eagerly compiles once, however often it is called at one geometry."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    model = _small_mait("auto").eval()
    compiled = torch.compile(model, backend=counter)
    images = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    with torch.no_grad():
        outputs = [compiled(images) for _ in range(3)]
        torch.testing.assert_close(outputs[0], model(images), rtol=1e-10, atol=1e-12)
    assert all(torch.equal(out, outputs[0]) for out in outputs)
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for one geometry"
