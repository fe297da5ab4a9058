"""H-MaiT: Swin layout with masked attention over the whole stage grid."""

from __future__ import annotations

import re

import pytest
import safetensors.torch
import timm
import torch

import mait
from mait.models.hmait import HMaiT


def _tiny(**kwargs):
    return timm.create_model("hmait_tiny_224", img_size=64, **kwargs)


def test_registered_and_layout():
    assert {"hmait_tiny_224", "hmait_small_224"} <= set(timm.list_models("hmait_*"))
    model = timm.create_model("hmait_small_224")
    assert isinstance(model, HMaiT)
    assert [len(stage.blocks) for stage in model.layers] == [2, 2, 18, 2]
    grids = [stage.blocks[0].attn.grid_size for stage in model.layers]
    assert grids == [(56, 56), (28, 28), (14, 14), (7, 7)]
    heads = [stage.blocks[0].attn.num_heads for stage in model.layers]
    assert heads == [3, 6, 12, 24]
    masked = [sum(k.is_masked for k in stage.blocks[0].attn.head_kinds) for stage in model.layers]
    assert masked == [3, 6, 4, 0]
    assert all(block.attn.num_prefix_tokens == 0 for stage in model.layers for block in stage.blocks)
    assert model.patch_embed.pos_embed.shape == (1, 56, 56, 96)
    assert "patch_embed.pos_embed" in model.no_weight_decay()


def test_forward_backward_small_image():
    torch.manual_seed(0)
    model = _tiny(num_classes=10)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert model.patch_embed.pos_embed.grad is not None and model.layers[0].blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_fast_backend_matches_reference_in_the_model():
    torch.manual_seed(0)
    model = _tiny(num_classes=10).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        fast = model(x)
        for stage in model.layers:
            for block in stage.blocks:
                block.attn.backend = "reference"
        slow = model(x)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-10)


def test_scheme_and_mask_size_overrides():
    model = _tiny(masked_heads=(1, 0, 0, 0), mask_size=5)
    assert str(model.scheme) == "0-1:1h" and model.mask_size == 5
    assert model.layers[0].blocks[0].attn.mask_size == 5
    unmasked = _tiny(scheme="none")
    assert all(block.attn.unmasked for stage in unmasked.layers for block in stage.blocks)
    soft = _tiny(scheme="0-3:soft")
    assert soft.layers[1].blocks[1].attn.alpha_logit is not None


@pytest.mark.parametrize("kwargs,needle", [
    (dict(masked_heads=(3, 7, 0, 0)), "masked_heads"),
    (dict(masked_heads=(3, 6)), "masked_heads"),
    (dict(mask_size=4), "odd"),
    (dict(mask_size=9), "larger than"),
])
def test_bad_configuration_is_an_error(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        _tiny(**kwargs)


def test_wrong_image_size_is_an_error():
    with pytest.raises(AssertionError, match=r"Input height \(96\) doesn't match model \(64\)"):
        _tiny()(torch.randn(1, 3, 96, 96))


def test_exported_from_package():
    assert mait.models.HMaiT is HMaiT


def test_swin_checkpoint_loads_strictly_except_position_tables(tmp_path):
    """A timm Swin-T checkpoint, and the same weights in the original (Microsoft) key layout, load
    through timm's ``pretrained=True`` path: every shared weight equal, a missing one an error."""
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224").state_dict()
    original = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
                .replace("head.fc.", "head."): value for key, value in swin.items()}
    for name, weights in (("timm", swin), ("original", original)):
        safetensors.torch.save_file({k: v.contiguous() for k, v in weights.items()}, tmp_path / f"{name}.safetensors")
        model = timm.create_model("hmait_tiny_224", pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / f"{name}.safetensors")))
        loaded = model.state_dict()
        shared = [key for key in swin if key in loaded]
        assert len(shared) == len(loaded) - 1, "everything but the position embedding comes from the checkpoint"
        for key in shared:
            torch.testing.assert_close(loaded[key], swin[key], rtol=0, atol=0, msg=key)
    soft = timm.create_model("hmait_tiny_224", pretrained=True, scheme="soft",
                             pretrained_cfg_overlay=dict(file=str(tmp_path / "timm.safetensors")))
    torch.testing.assert_close(soft.layers[2].blocks[1].attn.qkv.weight, swin["layers.2.blocks.1.attn.qkv.weight"])
    del swin["layers.2.blocks.4.mlp.fc2.bias"]
    safetensors.torch.save_file(swin, tmp_path / "truncated.safetensors")
    with pytest.raises(RuntimeError, match=r"layers\.2\.blocks\.4\.mlp\.fc2\.bias"):
        timm.create_model("hmait_tiny_224", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "truncated.safetensors")))
