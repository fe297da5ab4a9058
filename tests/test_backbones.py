"""mait models as backbones: any image size (dynamic or set once), dense features, checkpoints of other sizes,
and masks on any timm ViT (``mait.mask_model``)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch
from timm.layers import resample_abs_pos_embed, resample_abs_pos_embed_nhwc

import mait
from mait.errors import UserError
from mait.train.checkpoint import load_weights, save_weights


def _images(height: int, width: int, batch: int = 2, chans: int = 3) -> torch.Tensor:
    return torch.randn(batch, chans, height, width, generator=torch.Generator().manual_seed(0))


def _built_for(name: str, size, source: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """``name`` built for ``size`` with ``source``'s weights, its position embedding resampled by timm."""
    model = timm.create_model(name, img_size=size, **kwargs).eval()
    state = dict(source.state_dict())
    grid = model.patch_embed.grid_size
    if "pos_embed" in state:
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(grid),
                                                    old_size=list(source.patch_embed.grid_size),
                                                    num_prefix_tokens=source.num_prefix_tokens)
    else:
        state["patch_embed.pos_embed"] = resample_abs_pos_embed_nhwc(state["patch_embed.pos_embed"], list(grid))
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("name,scheme", [("mait_t12_224", "sch1"), ("mait_t12_224", "0-3:soft,4-7:hsu,8:rhu"),
                                         ("mait_xt24_distilled_224", None)])
def test_dynamic_model_equals_model_built_for_the_size(name, scheme):
    """A rectangular 320x256 image (20x16 grid): masks and plans follow the batch's grid."""
    torch.manual_seed(0)
    extra = {} if scheme is None else dict(scheme=scheme)
    dynamic = timm.create_model(name, dynamic_img_size=True, **extra).eval()
    fixed = _built_for(name, (320, 256), dynamic, **extra)
    x = _images(320, 256)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), fixed(x), rtol=0, atol=1e-4)
        assert dynamic.blocks[5].attn.grid_size == (20, 16)
        torch.testing.assert_close(dynamic(_images(224, 224)), dynamic.eval()(_images(224, 224)))


def test_dynamic_unmasked_model_equals_timm_deit():
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224", dynamic_img_size=True).eval()
    ours = timm.create_model("mait_t12_224", dynamic_img_size=True, scheme="none").eval()
    ours.load_state_dict(deit.state_dict())
    with torch.no_grad():
        for height, width in ((320, 256), (96, 160)):
            x = _images(height, width)
            torch.testing.assert_close(ours(x), deit(x), rtol=0, atol=1e-5)


def test_set_input_size_equals_model_built_for_the_size():
    torch.manual_seed(0)
    model = timm.create_model("mait_t12_224", scheme="0-5:hsu,6-11:soft").eval()
    original = {key: value.clone() for key, value in model.state_dict().items()}
    model.set_input_size(img_size=288)
    assert model.patch_embed.grid_size == (18, 18) and all(b.attn.grid_size == (18, 18) for b in model.blocks)
    built = timm.create_model("mait_t12_224", scheme="0-5:hsu,6-11:soft", img_size=288).eval()
    built.load_state_dict(model.state_dict())
    x = _images(288, 288)
    with torch.no_grad():
        torch.testing.assert_close(model(x), built(x), rtol=0, atol=0)
    torch.testing.assert_close(model.pos_embed, resample_abs_pos_embed(original["pos_embed"], [18, 18],
                                                                       num_prefix_tokens=1))


def test_hmait_any_size_and_set_input_size():
    torch.manual_seed(0)
    dynamic = timm.create_model("hmait_tiny_224", dynamic_img_size=True).eval()
    x = _images(160, 96)               # stage grids 40x24, 20x12, 10x6, 5x3
    fixed = _built_for("hmait_tiny_224", (160, 96), dynamic)
    with torch.no_grad():
        torch.testing.assert_close(dynamic(x), fixed(x), rtol=0, atol=1e-4)
        odd = dynamic(_images(72, 104))    # 18x26 patches: odd stage grids are padded by patch merging, as in Swin
    assert odd.shape == (2, 1000)
    assert [stage.blocks[0].attn.grid_size for stage in dynamic.layers] == [(18, 26), (9, 13), (5, 7), (3, 4)]
    resized = timm.create_model("hmait_tiny_224", img_size=64).eval()
    resized.set_input_size(img_size=(96, 128))
    assert [stage.blocks[0].attn.grid_size for stage in resized.layers] == [(24, 32), (12, 16), (6, 8), (3, 4)]
    assert resized(_images(96, 128, batch=1)).shape == (1, 1000)


def test_plans_and_masks_are_decided_once_per_grid_and_bounded(caplog):
    model = timm.create_model("mait_t12_224", dynamic_img_size=True, scheme="0:rsu,1:soft", depth=2).eval()
    layer = model.blocks[0].attn
    with caplog.at_level(logging.DEBUG, logger="mait"), torch.no_grad():
        model(_images(64, 48, batch=1))
        first_mask = layer.keep_mask()
        model(_images(64, 48, batch=1))
        model(_images(48, 64, batch=1))       # the transposed grid holds as many tokens: a grid of its own
    plans = [r.message for r in caplog.records if r.message.startswith("MaskedAttention(rsu)")]
    assert len(plans) == 2 and "grid 4x3" in plans[0] and "grid 3x4" in plans[1]
    assert layer.keep_mask().shape == (3, 13, 13)
    layer.set_grid((4, 3))
    assert layer.keep_mask() is first_mask, "a grid's mask is built once per device"
    with torch.no_grad():
        for width in range(3, 3 + 40):
            model(_images(32, 16 * width, batch=1))
    assert len(layer._plans) <= mait.attention.PLAN_CACHE_SIZE
    assert len(layer._random_masks) <= mait.attention.MASK_CACHE_SIZE


def test_dense_features_of_hmait_and_mait():
    torch.manual_seed(0)
    hmait = timm.create_model("hmait_tiny_224", features_only=True).eval()
    assert hmait.feature_info.channels() == [96, 192, 384, 768]
    assert hmait.feature_info.reduction() == [4, 8, 16, 32]
    assert hmait.output_fmt == "NHWC"
    with torch.no_grad():
        maps = hmait(_images(224, 224, batch=1))
    assert [tuple(m.shape) for m in maps] == [(1, 56, 56, 96), (1, 28, 28, 192), (1, 14, 14, 384), (1, 7, 7, 768)]
    model = timm.create_model("mait_s12_224", dynamic_img_size=True, features_only=True, out_indices=(3, 7, 11)).eval()
    assert model.feature_info.channels() == [384] * 3 and model.feature_info.reduction() == [16] * 3
    with torch.no_grad():
        maps = model(_images(320, 256, batch=1))
    assert [tuple(m.shape) for m in maps] == [(1, 384, 20, 16)] * 3


def test_hmait_features_carry_the_position_embedding():
    """features_only runs the model's own modules: its maps equal forward_intermediates' (position included)."""
    torch.manual_seed(0)
    model = timm.create_model("hmait_tiny_224", img_size=64).eval()
    torch.manual_seed(0)                                     # the same weights, wrapped for features
    features = timm.create_model("hmait_tiny_224", img_size=64, features_only=True).eval()
    assert torch.equal(features.patch_embed.pos_embed, model.patch_embed.pos_embed)
    x = _images(64, 64, batch=1)
    with torch.no_grad():
        _, intermediates = model.forward_intermediates(x)
        for ours, reference in zip(features(x), intermediates):
            torch.testing.assert_close(ours.permute(0, 3, 1, 2), reference)


def test_checkpoint_of_another_size_loads_with_the_position_embedding_resampled(tmp_path):
    torch.manual_seed(0)
    small = timm.create_model("mait_t12_224", img_size=64, scheme="sch1").eval()
    save_weights(small, tmp_path / "small.safetensors")
    large = timm.create_model("mait_t12_224", img_size=96, scheme="sch1").eval()
    load_weights(large, tmp_path / "small.safetensors")
    expected = resample_abs_pos_embed(small.pos_embed, [6, 6], num_prefix_tokens=1)
    torch.testing.assert_close(large.pos_embed, expected)
    assert torch.equal(large.blocks[3].attn.qkv.weight, small.blocks[3].attn.qkv.weight)
    hmait = timm.create_model("hmait_tiny_224", img_size=64).eval()
    save_weights(hmait, tmp_path / "hmait.safetensors")
    bigger = timm.create_model("hmait_tiny_224", img_size=96).eval()
    load_weights(bigger, tmp_path / "hmait.safetensors")
    torch.testing.assert_close(bigger.patch_embed.pos_embed,
                               resample_abs_pos_embed_nhwc(hmait.patch_embed.pos_embed, [24, 24]))


def test_hmait_checkpoint_with_the_earlier_position_key_loads(tmp_path):
    model = timm.create_model("hmait_tiny_224", img_size=64).eval()
    state = {key.replace("patch_embed.pos_embed", "pos_embed"): value for key, value in model.state_dict().items()}
    safetensors.torch.save_file(state, tmp_path / "earlier.safetensors")
    fresh = timm.create_model("hmait_tiny_224", img_size=64).eval()
    load_weights(fresh, tmp_path / "earlier.safetensors")
    assert torch.equal(fresh.patch_embed.pos_embed, model.patch_embed.pos_embed)


def test_mask_model_keeps_weights_and_equals_mait():
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224", img_size=64).eval()
    weights = {key: value.clone() for key, value in deit.state_dict().items()}
    x = _images(64, 64)
    with torch.no_grad():
        expected = deit(x)
        assert mait.mask_model(deit, scheme="none") is deit
        assert torch.equal(deit(x), expected)
    sch1 = timm.create_model("deit_tiny_patch16_224", img_size=64).eval()
    sch1.load_state_dict(weights)
    mait.mask_model(sch1, scheme="sch1")
    reference = timm.create_model("mait_t12_224", img_size=64, scheme="sch1").eval()
    reference.load_state_dict(weights)
    assert isinstance(sch1, mait.MaiT) and str(sch1.scheme) == str(reference.scheme)
    with torch.no_grad():
        assert torch.equal(sch1(x), reference(x))
    assert set(sch1.state_dict()) == set(weights)
    assert {"blocks.0.attn.alpha_logit"} <= mait.mask_model(
        timm.create_model("deit_tiny_patch16_224", img_size=64), scheme="soft").no_weight_decay()


def test_mask_model_on_distilled_deit3_and_dynamic_vits():
    distilled = mait.mask_model(timm.create_model("deit_tiny_distilled_patch16_224", img_size=64), scheme="sch1")
    assert isinstance(distilled, mait.MaiTDistilled) and distilled.num_prefix_tokens == 2
    deit3 = mait.mask_model(timm.create_model("deit3_small_patch16_224", img_size=64), scheme="sch2")
    assert type(deit3).__name__ == "MaiT" and deit3.blocks[0].attn.grid_size == (4, 4)
    vit = mait.mask_model(timm.create_model("vit_small_patch16_224", dynamic_img_size=True, depth=2), "sch1")
    with torch.no_grad():
        assert vit.eval()(_images(96, 128, batch=1)).shape == (1, 1000)
    assert vit.blocks[1].attn.grid_size == (6, 8)


@pytest.mark.parametrize("make,needle", [
    (lambda: timm.create_model("resnet18"), "not ResNet; for a Swin layout use hmait_tiny_224"),
    (lambda: timm.create_model("swin_tiny_patch4_window7_224"), "cannot mask SwinTransformer: its window attention"),
    (lambda: timm.create_model("mait_t12_224", img_size=32), "already masked"),
    (lambda: timm.create_model("vit_small_patch16_224", attn_layer="diff"), "attends with DiffAttention"),
])
def test_mask_model_refuses_what_it_cannot_mask(make, needle):
    model = make()
    with pytest.raises(ValueError, match=needle):
        mait.mask_model(model, scheme="sch1")


def test_mask_model_error_leaves_the_model_unchanged():
    vit = timm.create_model("vit_small_patch16_224", img_size=32, depth=3)
    with pytest.raises(ValueError, match="mask_size 7 is larger than the 2x2 patch grid needs"):
        mait.mask_model(vit, scheme="sch1", mask_size=7)
    with pytest.raises(ValueError, match="cannot be combined with soft"):
        mait.mask_model(vit, scheme="0:hhhhhh,1-2:soft", attention_mode="neg_inf")
    assert type(vit) is timm.models.VisionTransformer
    assert all(type(block.attn) is timm.layers.Attention for block in vit.blocks)


@pytest.mark.parametrize("make,error,needle", [
    (lambda: timm.create_model("mait_t12_224", dynamic_img_size=True)(_images(100, 64)), AssertionError,
     r"Input height \(100\) should be divisible by patch size \(16\)"),
    (lambda: timm.create_model("mait_t12_224", dynamic_img_size=True, scheme="sch1", mask_size=5)(_images(32, 32)),
     ValueError, r"mask_size 5 is larger than the 2x2 patch grid needs \(R = 3 already covers it"),
    (lambda: timm.create_model("mait_t12_224", scheme="sch1", mask_size=5).set_input_size(img_size=32),
     ValueError, r"mask_size 5 is larger than the 2x2 patch grid"),
    (lambda: timm.create_model("sparsifiner_nano4_8", dynamic_img_size=True), ValueError,
     r"dynamic_img_size=True is not available with learned \(Sparsifiner\) heads"),
    (lambda: timm.create_model("sparsifiner_nano4_8").set_input_size(img_size=12), ValueError,
     r"set_input_size\(\) is not available with learned"),
    (lambda: timm.create_model("mait_cait_xxs24_224", dynamic_img_size=True), ValueError,
     "timm's CaiT runs at the image size it was built for"),
    (lambda: timm.create_model("hmait_tiny_224", dynamic_img_size=True)(_images(66, 64)), AssertionError,
     r"Input height \(66\) should be divisible by patch size \(4\)"),
    (lambda: timm.create_model("hmait_tiny_224", img_size=64).set_input_size(img_size=8), ValueError,
     r"mask_size 3 is larger than the 1x1 patch grid"),
    (lambda: timm.create_model("mait_t12_224", img_size=200), ValueError, "img_size 200 is not divisible"),
])
def test_bad_sizes_are_one_line_errors(make, error, needle):
    with pytest.raises(error, match=needle) as raised:
        make()
    assert "\n" not in str(raised.value)


def test_sparsifiner_checkpoint_of_another_size_is_refused_in_one_line(tmp_path):
    save_weights(timm.create_model("sparsifiner_mini6_32"), tmp_path / "s.safetensors")
    other = timm.create_model("sparsifiner_mini6_32", img_size=48)
    with pytest.raises(UserError, match="connectivity predictors hold per-token tables") as raised:
        load_weights(other, tmp_path / "s.safetensors")
    assert "\n" not in str(raised.value)


def test_deepcopy_and_ema_of_a_dynamic_model_route_their_own_grid():
    """The grid router of a copied model (e.g. timm's EMA) drives the copy's layers, not the original's."""
    import copy
    model = timm.create_model("mait_t12_224", dynamic_img_size=True, depth=2, scheme="sch1").eval()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone(_images(96, 64, batch=1))
    assert clone.blocks[0].attn.grid_size == (6, 4) and model.blocks[0].attn.grid_size == (14, 14)


def test_mait_train_masks_a_timm_vit_and_eval_rebuilds_it(tmp_path):
    """``mait train --model vit_* --scheme ...`` trains the ViT with mait's masks (mask_model); the checkpoint
    evaluates as the same masked model."""
    run = tmp_path / "vit"
    kwargs = '{"patch_size": 1, "depth": 2, "embed_dim": 16, "num_heads": 2}'
    common = ["--model", "vit_tiny_patch16_224", "--scheme", "sch1", "--model-kwargs", kwargs]
    train = subprocess.run([sys.executable, "-m", "mait", "train", *common, "--epochs", "1", "--train-subset", "64",
                            "--val-subset", "32", "--output", str(run), "--no-progress"],
                           capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    evaluated = subprocess.run([sys.executable, "-m", "mait", "eval", "--checkpoint", str(run / "last.safetensors")],
                               capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "top-1" in evaluated.stdout
    from mait.train import TrainConfig, build_loaders, build_model
    config = TrainConfig.from_dict(dict(model="vit_tiny_patch16_224", scheme="sch1", model_kwargs=json.loads(kwargs),
                                        train_subset=64, val_subset=32))
    model = build_model(config, build_loaders(config).info)
    assert isinstance(model, mait.MaiT) and str(model.scheme) == "*:1h" and model.blocks[0].attn.grid_size == (8, 8)


def test_als_of_a_dynamic_model_uses_each_batchs_grid():
    torch.manual_seed(0)
    dynamic = timm.create_model("mait_t12_224", dynamic_img_size=True, depth=2, scheme="0:hsu,1:soft").eval()
    fixed = _built_for("mait_t12_224", (48, 64), dynamic, depth=2, scheme="0:hsu,1:soft")
    images = _images(48, 64)
    for got, expected in zip(mait.analysis.measure_als(dynamic, images), mait.analysis.measure_als(fixed, images)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
