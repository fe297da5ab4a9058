"""Every registered mait model keeps timm's model contract, checked the way timm checks its own models.

Modelled on the generic tests of timm's ``tests/test_models.py`` (which ``benchmarks/timm_model_tests.py``
runs on mait's models against a timm checkout): forward and backward, the default config, forward_features
and forward_head, forward_intermediates and the features built on it, torch.fx forward and backward, and
TorchScript's refusal.  The 224-px models run here at a small image size (every mait model takes
``img_size``), so the whole family is checked in the default suite.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import mait
from mait.learned import reconstruction_loss

MODELS = timm.list_models(["mait_*", "hmait_*", "sparsifiner_*"])
HIERARCHICAL = [name for name in MODELS if name.startswith("hmait_")]
SMALL_SIZE = 64      # the 224-px models are checked at 64 px (a 4x4 grid at patch 16, 16x16 at patch 4)


def _size(name: str) -> int:
    return min(timm.get_pretrained_cfg(name).input_size[-1], SMALL_SIZE)


def _create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    size = _size(name)
    if size != timm.get_pretrained_cfg(name).input_size[-1]:
        kwargs["img_size"] = size
    return timm.create_model(name, **kwargs)


def _input(name: str, batch: int = 1) -> torch.Tensor:
    chans = timm.get_pretrained_cfg(name).input_size[0]
    return torch.randn(batch, chans, _size(name), _size(name), generator=torch.Generator().manual_seed(1))


def _fx(model: torch.nn.Module) -> torch.nn.Module:
    """The model traced by torch.fx with timm's leaf modules and wrapped functions, returning its last node."""
    tracer = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                  param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer)


def _check_backward(model: torch.nn.Module, out: torch.Tensor) -> None:
    """A 42-class output whose mean's gradient reaches every parameter the task loss trains: all but learned
    heads' connectivity predictors (see ``test_learned_heads_predictor_learns_from_the_trainers_loss``)."""
    assert out.shape == (2, 42) and not torch.isnan(out).any()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None and ".predictor." not in n]
    assert not missing, f"no gradient for {missing}"


def test_every_model_is_covered():
    assert len(MODELS) == 19 and all(timm.get_pretrained_cfg(name).fixed_input_size for name in MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_forward_and_grad_checkpointing(name):
    model = _create(name).eval()
    x = _input(name)
    with torch.no_grad():
        out = model(x)
        model.set_grad_checkpointing(True)
        again = model(x)
    assert out.shape == (1, model.num_classes) and not torch.isnan(out).any()
    torch.testing.assert_close(again, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_parameter(name):
    model = _create(name, num_classes=42).train()
    _check_backward(model, model(_input(name, batch=2)))


@pytest.mark.parametrize("name", [n for n in MODELS if n.startswith("sparsifiner_")])
def test_learned_heads_predictor_learns_from_the_trainers_loss(name):
    """The task loss trains the backbone; the reconstruction loss the trainer adds trains the predictors."""
    model = _create(name, num_classes=42).train()
    out = model(_input(name, batch=2))
    loss = out.mean() + reconstruction_loss(model)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if ".predictor." in n)


@pytest.mark.parametrize("name", MODELS)
def test_default_config_features_and_head(name):
    model = _create(name).eval()
    cfg = model.pretrained_cfg
    x = _input(name)
    state = model.state_dict()
    assert model.num_classes == cfg["num_classes"] and model.num_features > 0 and model.head_hidden_size > 0
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (1, model.head_hidden_size)
        if name in HIERARCHICAL:      # Swin's layout: an NHWC map, pool_size at the default size
            assert model.output_fmt == "NHWC" and cfg["pool_size"] == (7, 7)
            stride = cfg["input_size"][-1] // cfg["pool_size"][0]
            spatial = [features.shape[d] for d in get_spatial_dim(model.output_fmt)]
            assert spatial == [_size(name) // stride] * 2
            assert features.shape[get_channel_dim(model.output_fmt)] == model.num_features
        else:                         # timm's ViTs: tokens, prefix tokens first
            grid = model.patch_embed.grid_size
            prefix = getattr(model, "num_prefix_tokens", 1)      # CaiT's class token (no attribute before timm 1.0.31)
            assert features.shape == (1, prefix + grid[0] * grid[1], model.num_features)
        model.reset_classifier(0)
        pooled = model(x)
        assert pooled.shape == pre_logits.shape
        torch.testing.assert_close(pooled, pre_logits)
        if name in HIERARCHICAL:
            model.reset_classifier(0, "")
            assert model(x).dim() == 4
    classifiers = cfg["classifier"] if isinstance(cfg["classifier"], (tuple, list)) else (cfg["classifier"],)
    assert all(f"{c}.weight" in state for c in classifiers)
    assert f"{cfg['first_conv']}.weight" in state


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates(name):
    model = _create(name).eval()
    x = _input(name)
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(info.channels()) >= 3
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
        assert len(intermediates) == len(info.channels())
        for channels, reduction, tensor in zip(info.channels(), info.reduction(), intermediates):
            assert tensor.shape[:2] == (1, channels)
            assert tensor.shape[2:] == (math.ceil(_size(name) / reduction),) * 2
        torch.testing.assert_close(final, model.forward_features(x))
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_features_only(name):
    model = _create(name, features_only=True).eval()
    x = _input(name)
    with torch.no_grad():
        maps = model(x)
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(maps) == len(channels) >= 3
    fmt = getattr(model, "output_fmt", "NCHW")
    for expected, reduction, tensor in zip(channels, reductions, maps):
        assert tensor.shape[get_channel_dim(fmt)] == expected
        assert [tensor.shape[d] for d in get_spatial_dim(fmt)] == [math.ceil(_size(name) / reduction)] * 2
        assert not torch.isnan(tensor).any()


@pytest.mark.parametrize("name", MODELS)
def test_fx_forward_equals_eager(name):
    model = _create(name).eval()
    x = _input(name)
    with torch.inference_mode():
        expected = model(x)
        traced = tuple(_fx(model)(x).values())[0]
    assert torch.equal(traced, expected)


@pytest.mark.parametrize("name", MODELS)
def test_fx_backward_reaches_every_parameter(name):
    traced = _fx(_create(name, num_classes=42).train())
    _check_backward(traced, tuple(traced(_input(name, batch=2)).values())[0])


@pytest.mark.parametrize("name", ["mait_nano4_8", "mait_cait_xxs24_224", "hmait_tiny_224", "sparsifiner_nano4_8"])
def test_torchscript_refuses_in_one_line_naming_torch_export(name):
    with timm.set_scriptable(True):
        model = _create(name).eval()
    with pytest.raises(RuntimeError, match=r"^mait's masked attention does not compile with TorchScript") as error:
        torch.jit.script(model)
    assert "\n" not in str(error.value) and "torch.export" in str(error.value)
    assert mait.attention.SCRIPTING_UNSUPPORTED == str(error.value)
