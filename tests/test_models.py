"""The MaiT model family in timm: registration, shapes, parameter counts, checkpoint compatibility."""

from __future__ import annotations

import pytest
import safetensors.torch
import timm
import torch

import mait
from mait import HeadKind

MODELS = ["mait_xt24_224", "mait_t24_224", "mait_xs24_224", "mait_s24_224", "mait_t12_224", "mait_s12_224",
          "mait_t36_224", "mait_xt24_distilled_224", "mait_cait_xxs24_224", "mait_cait_s24_224"]

# Paper (Tables 2, 6, 7) parameter counts in millions, 1000 classes at 224 px.
PAPER_PARAMS = {"mait_xt24_224": 6.3, "mait_t24_224": 11.0, "mait_xs24_224": 24.5, "mait_s24_224": 43.3,
                "mait_xt24_distilled_224": 6.4}


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_all_models_are_registered():
    available = set(timm.list_models("mait_*"))
    assert set(MODELS) <= available


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_small(name):
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=32, num_classes=7, drop_path_rate=0.1)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    feats = model.forward_features(x)
    assert feats.shape[0] == 2 and torch.is_tensor(model.forward_head(feats))
    model.reset_classifier(3)
    assert model.eval()(x).shape == (2, 3)
    assert model.pretrained_cfg["architecture"] == name
    model.set_grad_checkpointing(True)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert len(groups) > 2  # stem, one group per block, head (used by layer-wise lr decay)


@pytest.mark.parametrize("name,paper", sorted(PAPER_PARAMS.items()))
def test_parameter_counts_match_paper(name, paper):
    millions = _params(timm.create_model(name)) / 1e6
    assert abs(millions - paper) / paper < 0.03, f"{name}: {millions:.2f} M vs paper {paper} M"


@pytest.mark.parametrize("ours,theirs", [("mait_cait_xxs24_224", "cait_xxs24_224"),
                                         ("mait_cait_s24_224", "cait_s24_224")])
def test_masked_cait_has_cait_parameter_count(ours, theirs):
    assert _params(timm.create_model(ours)) == _params(timm.create_model(theirs))


def test_default_schemes_follow_the_paper():
    def scheme(name):
        return timm.create_model(name, img_size=32).scheme

    assert str(scheme("mait_t24_224")) == "0-20:soft"
    assert str(scheme("mait_xt24_224")) == "0-20:soft"
    assert str(scheme("mait_xs24_224")) == "0-7:2h,8-19:1h"
    assert str(scheme("mait_s24_224")) == "0-7:5h,8-19:1h"
    assert str(scheme("mait_t12_224")) == "*:soft"
    assert str(scheme("mait_t36_224")) == "0-11:all,12-35:1h"
    assert str(scheme("mait_cait_xxs24_224")) == "*:1h"
    layerscale = timm.create_model("mait_xs24_224", img_size=32).blocks[0].ls1
    assert isinstance(layerscale, timm.layers.LayerScale)


def test_scheme_and_mask_size_keywords():
    model = timm.create_model("mait_s12_224", scheme="sch1", mask_size=5, img_size=96)
    attn = model.blocks[3].attn
    assert attn.head_kinds == (HeadKind.HARD,) + (HeadKind.NONE,) * 5
    assert attn.mask_size == 5 and attn.grid_size == (6, 6)
    assert torch.equal(attn.mask, mait.local_mask((6, 6), 5, 1))
    assert "mask" not in model.state_dict() and not any(k.endswith(".mask") for k in model.state_dict())


def test_soft_alpha_excluded_from_weight_decay():
    model = timm.create_model("mait_t12_224", img_size=32)
    nwd = model.no_weight_decay()
    assert "blocks.0.attn.alpha_logit" in nwd and "cls_token" in nwd


def _copy_and_compare(ours: str, theirs: str, ours_kwargs: dict | None = None, **kwargs):
    """Our model with scheme ``none`` loads timm's weights strictly and gives the very same logits."""
    torch.manual_seed(0)
    reference = timm.create_model(theirs, **kwargs).eval()
    model = timm.create_model(ours, scheme="none", **(ours_kwargs or {}), **kwargs).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_mait_t12_none_equals_deit_tiny():
    _copy_and_compare("mait_t12_224", "deit_tiny_patch16_224")


def test_pretrained_path_loads_deit_weights_into_a_soft_mait(tmp_path):
    """``pretrained=True`` (timm's loader, a local DeiT-T file): every DeiT weight strictly, the soft
    heads' α at its initialisation."""
    torch.manual_seed(0)
    reference = timm.create_model("deit_tiny_patch16_224").state_dict()
    safetensors.torch.save_file(reference, tmp_path / "deit_tiny.safetensors")
    model = timm.create_model("mait_t12_224", pretrained=True, soft_alpha_init=0.3,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "deit_tiny.safetensors")))
    loaded = model.state_dict()
    assert set(loaded) - set(reference) == {f"blocks.{i}.attn.alpha_logit" for i in range(12)}
    for key, value in reference.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(model.blocks[4].attn.alpha, torch.full((3,), 0.3))
    truncated = {k: v for k, v in reference.items() if k != "blocks.7.attn.proj.bias"}
    safetensors.torch.save_file(truncated, tmp_path / "truncated.safetensors")
    with pytest.raises(RuntimeError, match=r"blocks\.7\.attn\.proj\.bias"):
        timm.create_model("mait_t12_224", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "truncated.safetensors")))


def test_pretrained_path_loads_cait_weights_into_a_soft_masked_cait(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("cait_xxs24_224").state_dict()
    safetensors.torch.save_file({k: v.contiguous() for k, v in reference.items()}, tmp_path / "cait.safetensors")
    model = timm.create_model("mait_cait_xxs24_224", pretrained=True, scheme="soft",
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "cait.safetensors")))
    loaded = model.state_dict()
    assert set(loaded) - set(reference) == {f"blocks.{i}.attn.alpha_logit" for i in range(24)}
    for key, value in reference.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


def test_deit_tiny_distilled_weights_load_into_distilled_mait():
    _copy_and_compare("mait_xt24_distilled_224", "deit_tiny_distilled_patch16_224",
                      ours_kwargs=dict(embed_dim=192, depth=12, init_values=0.0))


def test_masked_cait_none_equals_cait_xxs24():
    _copy_and_compare("mait_cait_xxs24_224", "cait_xxs24_224")


def test_masking_changes_the_output():
    torch.manual_seed(0)
    plain = timm.create_model("mait_t12_224", scheme="none", img_size=64).eval()
    masked = timm.create_model("mait_t12_224", scheme="sch1", img_size=64).eval()
    masked.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(plain(x), masked(x))


@pytest.mark.parametrize("kwargs,match", [
    (dict(img_size=100), "img_size 100 is not divisible by patch_size 16"),
    (dict(mask_size=4), "mask_size must be an odd positive integer"),
    (dict(scheme="0-40:1h"), "names layer 40, which does not exist: the model has 12 layers"),
    (dict(scheme="0:4h"), "asks for 4 masked heads in layer 0, which has 3 heads"),
    (dict(scheme="sch9"), "must look like 'LAYERS:HEADS'"),
    (dict(img_size=32, mask_size=5), "mask_size 5 is larger than the 2x2 patch grid needs"),
])
def test_bad_model_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("mait_t12_224", **kwargs)


def test_wrong_image_size_at_forward():
    """A model built for one size refuses another at its patch embedding, as timm's ViTs do."""
    model = timm.create_model("mait_t12_224", img_size=32)
    with pytest.raises(AssertionError, match=r"Input height \(48\) doesn't match model \(32\)"):
        model(torch.randn(1, 3, 48, 48))


def test_torch_export_round_trip():
    """Deployment path: a mixed hard/soft/unmasked MaiT exports with torch.export and gives the same logits."""
    torch.manual_seed(0)
    model = timm.create_model("mait_t12_224", img_size=32, depth=2, scheme="0:hsu,1:1h").eval()
    x = torch.randn(2, 3, 32, 32)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize("name,params,shape", [("mait_nano4_8", 0.139, (1, 8, 8)), ("mait_micro4_32", 0.142, (3, 32, 32)),
                                               ("mait_mini6_32", 0.68, (3, 32, 32))])
def test_small_models_run_at_their_own_size(name, params, shape):
    """The laptop-sized models of the digits default and the CIFAR presets/study."""
    model = timm.create_model(name)
    assert abs(_params(model) / 1e6 - params) < 0.01, _params(model)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert mait.MaskingScheme.parse("sch1", len(model.blocks), model.blocks[0].attn.num_heads) == \
        mait.MaskingScheme(tuple(b.attn.head_kinds for b in model.blocks))
