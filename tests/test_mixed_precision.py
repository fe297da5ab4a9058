"""Every backend under ``torch.autocast`` (bf16; CPU, and CUDA where present) against the float64
reference, forward and backward, and the attention module inside ``torch.compile`` of a whole model."""

from __future__ import annotations

import pytest
import timm
import torch

import mait
from mait.backends import BACKENDS, flex, triton_local
from mait.backends.learned import learned_attention

BF16_TOL = dict(rtol=3e-2, atol=3e-2)


def _layer(kinds, grid=(12, 12), prefix=1, seed=0):
    torch.manual_seed(seed)
    return mait.MaskedAttention(16 * len(kinds), len(kinds), grid_size=grid, num_prefix_tokens=prefix,
                                head_kinds=kinds)


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("kinds,backend", [("hsuh", "auto"), ("hhhh", "local"), ("hsuh", "reference"),
                                           ("hsuh", "matmul"), ("uuuu", "sdpa"), ("hrsu", "auto")])
def test_module_forward_backward_under_cpu_bf16_autocast(kinds, backend):
    """Forward and gradients (inputs, weights, α) under bf16 autocast match float64 to bf16 accuracy."""
    layer = _layer(kinds)
    layer.backend = backend
    x = torch.randn(2, 145, layer.qkv.in_features)
    truth = _layer(kinds).double()
    truth.load_state_dict(layer.state_dict())
    truth.backend = "reference"
    x64 = x.double().requires_grad_()
    out64 = truth(x64)
    out64.pow(2).sum().backward()

    x32 = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x32)
        assert out.dtype == torch.bfloat16
        loss = out.float().pow(2).sum()
    loss.backward()
    assert _rel(out, out64) < 2e-2
    assert _rel(x32.grad, x64.grad) < 3e-2
    assert _rel(layer.qkv.weight.grad, truth.qkv.weight.grad) < 3e-2
    if layer.alpha_logit is not None:
        torch.testing.assert_close(layer.alpha_logit.grad.double(), truth.alpha_logit.grad, **BF16_TOL)


# α per head of a call each backend accepts: mixed hard/soft/unmasked heads where it runs them
BF16_CASES = {"reference": [0.0, 0.4, 1.0], "matmul": [0.0, 0.4, 1.0], "flex": [0.0, 0.4, 1.0],
              "local": [0.0, 0.0, 0.0], "compiled": [0.0, 0.0, 0.0], "blocksparse": [0.0, 0.0, 0.0], "triton": [0.0, 0.0, 0.0],
              "sdpa": [1.0, 1.0, 1.0]}
FORWARD_ONLY = {"triton"}                               # inference kernels
NO_CPU_BACKWARD = {"flex", "blocksparse"}              # FlexAttention has no backward on the CPU
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


LEARNED_CASES = [(path, mode) for path in ("dense", "gather") for mode in ("neg_inf", "zero")]


def test_every_registered_backend_has_a_bf16_check():
    """Every backend callable by name is in ``BF16_CASES``; ``learned`` (which needs its layer's
    predictor) is checked through its functional op below."""
    assert set(BF16_CASES) | {"learned"} == set(BACKENDS)


def _skip_unless_runnable(backend: str, device: str) -> None:
    if backend in ("flex", "blocksparse") and not flex.available():
        pytest.skip("torch without FlexAttention")
    if backend == "triton" and (not triton_local.available() or device != "cuda"):
        pytest.skip("the Triton kernel's bf16 runs on CUDA only: Triton's CPU interpreter multiplies bf16 as raw "
                    "bits in tl.dot (triton-lang/triton#11584), so it is not a reference for bf16 there")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend,train", [(name, train) for name in sorted(BF16_CASES) for train in (False, True)
                                           if not (train and name in FORWARD_ONLY)])
def test_every_backend_under_bf16_autocast_matches_float64(backend, train, device):
    """Each backend by name on bf16 q, k, v (what the qkv projection gives under autocast): output and
    dq, dk, dv (and dα of soft heads) against the float64 reference, to bf16 accuracy."""
    _skip_unless_runnable(backend, device)
    if train and device == "cpu" and backend in NO_CPU_BACKWARD:
        pytest.skip("FlexAttention has no backward on the CPU (its CUDA backward runs in the CUDA case)")
    generator = torch.Generator().manual_seed(7)
    grid, prefix = (14, 14), 1
    q, k, v = (torch.randn(2, 3, prefix + grid[0] * grid[1], 16, generator=generator) for _ in range(3))
    weight = torch.randn(q.shape, generator=generator)
    alpha = torch.tensor(BF16_CASES[backend])
    soft = train and backend in ("reference", "matmul", "flex")    # a learnable α makes every head soft
    truth_in = [t.double().requires_grad_(train) for t in (q, k, v)]
    truth_alpha = alpha.double().requires_grad_(soft)
    truth = mait.masked_attention(*truth_in, grid_size=grid, num_prefix_tokens=prefix, alpha=truth_alpha,
                                  backend="reference")

    inputs = [t.to(device, torch.bfloat16).requires_grad_(train) for t in (q, k, v)]
    call_alpha = alpha.to(device).requires_grad_(soft)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = mait.masked_attention(*inputs, grid_size=grid, num_prefix_tokens=prefix, alpha=call_alpha,
                                    backend=backend)
    assert got.dtype == torch.bfloat16
    assert _rel(got, truth) < 2e-2
    if not train:
        return
    wanted = truth_in + ([truth_alpha] if soft else [])
    truth_grads = torch.autograd.grad((truth * weight.double()).sum(), wanted)
    grads = torch.autograd.grad((got.float() * weight.to(device)).sum(), inputs + ([call_alpha] if soft else []))
    for name, grad, expected in zip(("dq", "dk", "dv"), grads, truth_grads):
        assert grad.dtype == torch.bfloat16
        assert _rel(grad, expected) < 3e-2, name
    if soft:
        torch.testing.assert_close(grads[3].double().cpu(), truth_grads[3], **BF16_TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path,mode", LEARNED_CASES)
def test_learned_backend_under_bf16_autocast_matches_float64(path, mode, device):
    """The learned heads' op on bf16 q, k, v with a fixed kept-key index (what the predictor hands
    it): output and dq, dk, dv against the same op in float64, to bf16 accuracy."""
    generator = torch.Generator().manual_seed(11)
    batch, heads, prefix, patches, kept, dim = 2, 3, 1, 64, 9, 16
    q, k, v = (torch.randn(batch, heads, prefix + patches, dim, generator=generator) for _ in range(3))
    scores = torch.rand(batch, heads, patches, prefix + patches, generator=generator)
    index = scores.topk(kept, dim=-1).indices
    weight = torch.randn(q.shape, generator=generator)
    truth_in = [t.double().requires_grad_() for t in (q, k, v)]
    truth = learned_attention(*truth_in, index, num_prefix_tokens=prefix, mode=mode, backend=path)
    inputs = [t.to(device, torch.bfloat16).requires_grad_() for t in (q, k, v)]
    with torch.autocast(device, dtype=torch.bfloat16):
        got = learned_attention(*inputs, index.to(device), num_prefix_tokens=prefix, mode=mode, backend=path)
    assert got.dtype == torch.bfloat16
    assert _rel(got, truth) < 2e-2
    truth_grads = torch.autograd.grad((truth * weight.double()).sum(), truth_in)
    grads = torch.autograd.grad((got.float() * weight.to(device)).sum(), inputs)
    for name, grad, expected in zip(("dq", "dk", "dv"), grads, truth_grads):
        assert grad.dtype == torch.bfloat16
        assert _rel(grad, expected) < 3e-2, name


def test_train_step_under_cpu_bf16_autocast_with_linear_backend():
    """A model whose hard heads run on the linear backend trains under bf16 autocast."""
    model = timm.create_model("hmait_tiny_224", img_size=64, window_size=2, embed_dim=32, depths=(1, 1, 1, 1),
                              num_heads=(2, 2, 2, 2), masked_heads=(2, 1, 0, 0), num_classes=3)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    first = model.layers[0].blocks[0].attn
    assert first.plan(torch.empty(0, dtype=torch.bfloat16, requires_grad=True)).steps[0].backend.name == "local"
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("scheme", ["sch1", "*:hsur"])
def test_whole_model_compiles_in_one_graph(scheme):
    """``torch.compile(model, fullgraph=True)`` traces the masked layers (plan lookup included)."""
    model = timm.create_model("mait_nano4_8", scheme=scheme).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), eager)


def test_masks_cached_in_inference_mode_serve_training():
    """The functional op's cached local mask, first built under ``torch.inference_mode``, serves training later."""
    q = torch.randn(1, 2, 2 + 3 * 5, 8)
    with torch.inference_mode():
        mait.masked_attention(q, q, q, grid_size=(3, 5), num_prefix_tokens=2, alpha=0.3, backend="reference")
    x = q.clone().requires_grad_()
    mait.masked_attention(x, x, x, grid_size=(3, 5), num_prefix_tokens=2, alpha=0.3, backend="reference").sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_exporting_leaves_the_model_usable_eagerly():
    """Tracing (torch.export) must not leave traced tensors in any cache the eager model reads later."""
    model = timm.create_model("mait_nano4_8", scheme="*:hsur").eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
        torch.export.export(model, (x,), strict=False)
        torch.testing.assert_close(model(torch.cat([x, x])), torch.cat([before, before]))
