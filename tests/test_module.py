"""MaskedAttention as a drop-in for timm's Attention."""

from __future__ import annotations

import pytest
import torch
from timm.layers import Attention

import mait
from mait import MaskedAttention
from mait.backends import reference


def _module(kinds="hsu", grid=(4, 3), prefix=1, dim=24, **kwargs):
    torch.manual_seed(0)
    return MaskedAttention(dim, num_heads=len(kinds), grid_size=grid, num_prefix_tokens=prefix, head_kinds=kinds,
                           qkv_bias=True, **kwargs)


def test_module_equals_functional_op():
    attn = _module("hsu", soft_alpha_init=0.3).double()
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    q, k, v = attn.qkv(x).reshape(2, 13, 3, 3, 8).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(attn.alpha, torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64))
    expected = mait.masked_attention(q, k, v, grid_size=(4, 3), alpha=attn.alpha.detach())
    expected = attn.proj(expected.transpose(1, 2).reshape(2, 13, 24))
    torch.testing.assert_close(attn(x), expected)


def test_from_timm_attention_unmasked_is_identical_and_loads_state_dict():
    torch.manual_seed(0)
    timm_attn = Attention(24, num_heads=3, qkv_bias=True).eval()
    x = torch.randn(2, 13, 24)
    expected = timm_attn(x)
    masked = MaskedAttention.from_attention(timm_attn, grid_size=(4, 3), num_prefix_tokens=1, head_kinds="uuu")
    assert torch.equal(masked(x), expected)
    fresh = _module("huu")
    fresh.load_state_dict(timm_attn.state_dict())       # same parameter names, mask not persistent
    assert "mask" not in fresh.state_dict()


def test_soft_alpha_is_learnable_and_stays_in_unit_interval():
    attn = _module("ssh")
    assert attn.alpha_logit is not None and attn.alpha_logit.shape == (2,)
    attn(torch.randn(2, 13, 24)).sum().backward()
    assert attn.alpha_logit.grad is not None and bool((attn.alpha_logit.grad != 0).all())
    with torch.no_grad():
        attn.alpha_logit.fill_(50.0)
    alpha = attn.alpha.detach()
    assert bool((alpha[:2] <= 1).all()) and float(alpha[2]) == 0.0
    assert _module("hhu").alpha_logit is None


def test_capture_attention_returns_probabilities_without_changing_output():
    attn = _module("hsu").eval()
    x = torch.randn(2, 13, 24)
    out = attn(x)
    assert attn.last_attention is None
    attn.capture_attention = True
    captured = attn(x)
    torch.testing.assert_close(captured, out)
    probs = attn.last_attention
    assert probs.shape == (2, 3, 13, 13)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 13))
    q, k, v = attn.qkv(x).reshape(2, 13, 3, 3, 8).permute(2, 0, 3, 1, 4)
    rebuilt = attn.proj((probs @ v).transpose(1, 2).reshape(2, 13, 24))
    torch.testing.assert_close(rebuilt, out, rtol=1e-5, atol=1e-6)


def test_random_heads_use_a_random_mask_with_the_local_kept_fraction():
    attn = _module("ruh", mask_seed=5)
    local = mait.local_mask((4, 3), 3, 1)
    assert attn.mask.shape == (3, 13, 13)
    assert int(attn.mask[0].sum()) == int(local.sum()) and not torch.equal(attn.mask[0], local)
    assert torch.equal(attn.mask[2], local)
    x = torch.randn(1, 13, 24, dtype=torch.float64)
    attn = attn.double()
    q, k, v = attn.qkv(x).reshape(1, 13, 3, 3, 8).permute(2, 0, 3, 1, 4)
    expected = reference.masked_attention(q, k, v, keep=attn.mask, alpha=attn.alpha, mode="zero")
    torch.testing.assert_close(attn(x), attn.proj(expected.transpose(1, 2).reshape(1, 13, 24)))


def test_wrong_token_count_is_a_clear_error():
    attn = _module()
    with pytest.raises(ValueError, match=r"got 10 tokens but its patch grid holds 13 \(1 prefix \+ 4x3 grid\)"):
        attn(torch.randn(1, 10, 24))


@pytest.mark.parametrize("kwargs,match", [
    (dict(head_kinds="hh"), "names 2 heads but the layer has 3"),
    (dict(head_kinds="hsx"), "'x' is not a valid HeadKind"),
    (dict(soft_alpha_init=1.0), "soft_alpha_init must lie in"),
    (dict(mask_size=4), "mask_size must be an odd positive integer"),
    (dict(mode="neg_inf", head_kinds="hsu"), "cannot be combined with soft"),
])
def test_bad_configuration(kwargs, match):
    args = dict(num_heads=3, grid_size=(4, 3), head_kinds="hsu")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MaskedAttention(24, **args)
