"""``mait.mask_model`` on timm's other ViT families: Eva (EVA-02, rotary-position ViTs, DINOv3-style registers),
BEiT (relative position bias) and CaiT (talking heads), and the one-line refusals of the rest."""

from __future__ import annotations

import copy
import inspect
import logging
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch
from timm.models.beit import Beit
from timm.models.eva import Eva

import mait
from mait.bias import RelativeBias
from mait.commands.export import export_pt2, set_backend
from mait.tokens import kept_tokens
from mait.train.checkpoint import load_weights, save_weights

from naive import naive_multiplier

TINY = dict(img_size=96, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10)   # a 12x12 patch grid
EVA_ARGS = set(inspect.signature(Eva.__init__).parameters)
TIMM_VERSION = tuple(int(part) for part in timm.__version__.split(".")[:3])

# Eva variants: what timm's EVA-02, EVA-CLIP, Naver RoPE-ViT (axial, mixed), DINOv3, the "rope_reg1_gap" ViTs and
# Perception Encoder build (fused or separate q/k/v, scale norm, per-depth rotary, registers, no class token, ...).
EVA_VARIANTS = {
    "eva02": dict(use_rot_pos_emb=True, swiglu_mlp=True, scale_mlp=True, ref_feat_shape=(12, 12)),
    "eva_clip": dict(use_rot_pos_emb=True, qkv_fused=False, scale_attn_inner=True, swiglu_mlp=True),
    "rope_mixed": dict(use_rot_pos_emb=True, use_abs_pos_emb=False, rope_type="mixed", init_values=1.0),
    "dinov3": dict(use_rot_pos_emb=True, use_abs_pos_emb=False, rope_type="dinov3", num_reg_tokens=4,
                   rope_rotate_half=True, init_values=1.0),
    "reg1_gap": dict(use_rot_pos_emb=True, class_token=False, num_reg_tokens=1, global_pool="avg", no_embed_class=True,
                     init_values=1.0),
    "pe_rope_attention": dict(use_rot_pos_emb=True, attn_type="rope", use_abs_pos_emb=False),
}
if {"qk_norm", "num_kv_heads"} <= EVA_ARGS:     # timm >= 1.0.31
    EVA_VARIANTS["qk_norm_gqa"] = dict(use_rot_pos_emb=True, attn_type="rope", qkv_fused=False, qk_norm=True,
                                       num_kv_heads=2)
BEIT_VARIANTS = {
    "beit": dict(use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=1.0),
    "beit_shared": dict(use_abs_pos_emb=False, use_shared_rel_pos_bias=True, init_values=1.0),
    "beit_abs": dict(use_abs_pos_emb=True, init_values=1.0),
}


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with every parameter moved off its initialisation (zero biases and tables, tiny layer scales),
    so that the masks and biases change what it computes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model.eval()


def _family(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name in EVA_VARIANTS:
        return _randomised(Eva(**TINY, **EVA_VARIANTS[name]))
    if name in BEIT_VARIANTS:
        return _randomised(Beit(**TINY, **BEIT_VARIANTS[name]))
    return _randomised(timm.create_model(name, **TINY))


FAMILIES = [*EVA_VARIANTS, *BEIT_VARIANTS, "cait_xxs24_224"]


def _images(size=96, batch: int = 2, width=None) -> torch.Tensor:
    return torch.randn(batch, 3, size, width or size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", FAMILIES)
def test_scheme_none_is_the_timm_model(name):
    """``none`` computes what timm computes: bit for bit against timm's fused path, within float eps of its
    unfused one (the logits with the bias, rotary embedding, registers and talking heads)."""
    model = _family(name)
    x = _images()
    with torch.no_grad():
        fused = model(x)
        fused_layers = [module for module in model.modules() if getattr(module, "fused_attn", False)]
        for module in fused_layers:
            module.fused_attn = False
        unfused = model(x)
        for module in fused_layers:       # CaiT's class attention stays timm's: back to its fused path
            module.fused_attn = True
        mait.mask_model(model, scheme="none")
        ours = model(x)
    assert torch.equal(ours, fused)
    torch.testing.assert_close(ours, unfused, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("scheme", ["0:hrsu,1:all", "0:hsuu,1:1h"])
def test_auto_backend_equals_reference_and_a_hard_scheme_changes_the_logits(name, scheme):
    dtype, atol = torch.float64, 1e-10
    if name == "rope_mixed" and TIMM_VERSION < (1, 0, 31):    # timm's mixed rope runs in float32 only there
        dtype, atol = torch.float32, 2e-5
    model = _family(name).to(dtype)
    x = _images().to(dtype)
    with torch.no_grad():
        plain = model(x)
        mait.mask_model(model, scheme=scheme)
        auto = model(x)
        assert set_backend(model, "reference") == len(model.blocks)
        reference = model(x)
    torch.testing.assert_close(auto, reference, rtol=0, atol=atol)
    assert (auto - plain).abs().max() > 1e-3, "a masked scheme must change the logits"


@pytest.mark.parametrize("name", ["eva02", "dinov3", "beit", "beit_shared"])
def test_masked_layer_equals_the_definition_on_its_rotated_or_biased_logits(name):
    """A layer's output is softmax(Mα ⊙ (S + B)) v on the q, k timm's layer forms (rope first; B the relative
    position bias, 0 for Eva), with the prefix tokens (class + registers) never masked: checked against a naive
    per-entry Mα, not the library's mask."""
    model = mait.mask_model(_family(name).double(), scheme="0:hsuu,1:all")
    layer = model.blocks[0].attn
    assert layer.num_prefix_tokens == model.num_prefix_tokens
    captured = {}

    def grab(module, args, kwargs, output):
        captured.update(x=args[0], kwargs=kwargs, out=output)

    handle = layer.register_forward_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(_images().double())
    handle.remove()
    x, kwargs = captured["x"], captured["kwargs"]
    q, k, v = layer._project(x)
    if not isinstance(model, Beit):
        q, k = layer.q_norm(q), layer.k_norm(k)
    prefix = layer.num_prefix_tokens
    if kwargs.get("rope") is not None:
        from timm.layers import apply_rot_embed_cat
        half = getattr(layer, "rotate_half", False)
        q = torch.cat([q[:, :, :prefix], apply_rot_embed_cat(q[:, :, prefix:], kwargs["rope"], half=half)], dim=2)
        k = torch.cat([k[:, :, :prefix], apply_rot_embed_cat(k[:, :, prefix:], kwargs["rope"], half=half)], dim=2)
    bias = 0.0
    if isinstance(model, Beit):
        from timm.models.beit import Attention as BeitAttention
        from timm.models.beit import RelativePositionBias
        bias = BeitAttention._get_rel_pos_bias(layer)[0] if layer.relative_position_bias_table is not None else 0.0
        if model.rel_pos_bias is not None:      # timm's expansion of the shared table the layers read
            bias = bias + RelativePositionBias.forward(model.rel_pos_bias)
    logits = (q * layer.scale) @ k.transpose(-2, -1) + bias
    multiplier = torch.stack([naive_multiplier((12, 12), 3, prefix, float(a)) for a in layer.alpha.detach()])
    out = (logits * multiplier).softmax(-1) @ v
    flat = out.transpose(1, 2).flatten(2)
    expected = layer.proj(flat if isinstance(model, Beit) else layer.norm(flat))
    torch.testing.assert_close(captured["out"], expected, rtol=0, atol=1e-10)


def test_beit_plans_carry_the_bias_and_say_so(caplog):
    """BEiT's hard heads run on the linear-time backend with the bias on the window slots; soft heads densely."""
    model = mait.mask_model(_family("beit"), scheme="0:all,1:hsuu")
    with caplog.at_level(logging.DEBUG, logger="mait"), torch.no_grad():
        model(_images())
    messages = [record.getMessage() for record in caplog.records]
    assert any("bias: heads 0-3 (hhhh) -> local" in m for m in messages), messages
    assert any("bias: heads 0 (h) -> local, heads 1 (s) -> matmul, heads 2-3 (uu) -> sdpa" in m
               for m in messages), messages
    cuda = mait.backends.AttentionCall((12, 12), 3, 1, model.blocks[1].attn.head_kinds, device_type="cuda",
                                       bias=True)
    with caplog.at_level(logging.INFO, logger="mait"):
        plan = mait.backends.plan_attention(cuda)
    assert [step.backend.name for step in plan.steps] == ["local", "matmul", "sdpa"]
    assert "the fused FlexAttention kernels it takes no additive logit bias" in caplog.records[-1].getMessage()


@pytest.mark.parametrize("grid,prefix,size,mode,band_bytes", [
    ((5, 6), 1, 3, "zero", None), ((4, 4), 0, 3, "neg_inf", None), ((7, 9), 5, 5, "zero", None),
    ((13, 11), 1, 3, "zero", 4096), ((9, 8), 2, 5, "neg_inf", 2048)])
def test_linear_time_backend_carries_the_bias_forward_and_backward(grid, prefix, size, mode, band_bytes,
                                                                   monkeypatch):
    """The bias on the window slots and prefix rows/columns, also when the loop walks the grid in row bands, and
    inside a torch.compile (or torch.export) trace, where the local backend runs as the compiled backend's plain
    tensor code."""
    if band_bytes is not None:
        monkeypatch.setattr(mait.backends.local, "BAND_BYTES", band_bytes)
        assert len(mait.backends.local.row_bands(torch.empty(2, 3, *grid, 16, dtype=torch.float64))) > 2
    generator = torch.Generator().manual_seed(5)
    tokens = prefix + grid[0] * grid[1]
    q, k, v = (torch.randn(2, 3, tokens, 16, generator=generator, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    bias = torch.randn(3, tokens, tokens, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, tokens, 16, generator=generator, dtype=torch.float64)

    def attend(backend: str) -> tuple[torch.Tensor, ...]:
        out = mait.masked_attention(q, k, v, grid_size=grid, num_prefix_tokens=prefix, mask_size=size, alpha=0.0,
                                    mode=mode, bias=bias, backend=backend)
        return (out, *torch.autograd.grad((out * weights).sum(), (q, k, v, bias)))

    expected = attend("reference")
    torch._dynamo.reset()
    for results in (attend("local"), torch.compile(attend, backend="eager")("local")):
        for got, want in zip(results, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


def _relative_bias(grid, heads, generator, shared=False):
    """A BEiT relative position bias for ``grid`` (timm's index, a random float64 table that learns)."""
    from timm.models.beit import gen_relative_position_index
    index = gen_relative_position_index(grid)
    table = torch.randn(int(index.max()) + 1, heads, generator=generator, dtype=torch.float64, requires_grad=True)
    return RelativeBias([(table, index)], shared=shared), table, index


@pytest.mark.parametrize("grid,size,mode", [((5, 6), 3, "zero"), ((7, 9), 5, "neg_inf"), ((6, 4), 3, "neg_inf"),
                                            ((9, 8), 7, "zero"), ((11, 13), 3, "zero")])
def test_bias_table_read_on_the_window_equals_the_full_matrix(grid, size, mode):
    """BEiT's bias as its tables (a layer's plus a shared one): the linear-time backend reads them on the window
    offsets (padded slots 0) without the (heads, T, T) matrix, and computes what the full matrix gives the
    reference: forward, and the gradients of q, k, v and both tables; eagerly and inside a torch.compile trace."""
    generator = torch.Generator().manual_seed(11)
    tokens = 1 + grid[0] * grid[1]
    layer_bias, layer_table, index = _relative_bias(grid, 3, generator)
    shared_bias, shared_table, _ = _relative_bias(grid, 3, generator, shared=True)
    bias = layer_bias + shared_bias
    q, k, v = (torch.randn(2, 3, tokens, 8, generator=generator, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    weights = torch.randn(2, 3, tokens, 8, generator=generator, dtype=torch.float64)
    inputs = (q, k, v, layer_table, shared_table)
    full = (layer_table[index] + shared_table[index]).permute(2, 0, 1)      # (heads, T, T), as timm expands it
    parts = mait.backends.local.window_bias(bias, grid, size, 1)
    for got, want in zip(parts, mait.backends.local.window_bias(full, grid, size, 1)):
        assert torch.equal(got, want)

    def attend(backend: str, given) -> tuple[torch.Tensor, ...]:
        out = mait.masked_attention(q, k, v, grid_size=grid, mask_size=size, alpha=0.0, mode=mode, bias=given,
                                    backend=backend)
        return (out, *torch.autograd.grad((out * weights).sum(), inputs))

    expected = attend("reference", full)
    torch._dynamo.reset()
    for results in (attend("local", bias), torch.compile(attend, backend="eager")("local", bias),
                    attend("reference", bias)):
        for got, want in zip(results, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


def test_masked_beit_never_expands_its_bias_on_the_linear_time_backend(monkeypatch):
    """Every head hard: the layers' and the shared tables reach the local backend as tables (the dense matrix would
    be O(T²) per layer); the heads on dense backends get the matrix of their heads."""
    for name in ("beit", "beit_shared"):
        model = mait.mask_model(_family(name), scheme="all")
        with torch.no_grad():
            expected = model(_images())
        with monkeypatch.context() as patch:
            patch.setattr(RelativeBias, "dense", lambda self: pytest.fail("the (heads, T, T) bias was expanded"))
            with torch.no_grad():
                assert torch.equal(model(_images()), expected)
    expanded = []
    monkeypatch.setattr(RelativeBias, "dense",
                        lambda self, dense=RelativeBias.dense: expanded.append(self.num_heads) or dense(self))
    with torch.no_grad():
        mait.mask_model(_family("beit"), scheme="0:hsuu,1:all")(_images())
    assert sorted(expanded) == [1, 2], "layer 0's soft head (matmul) and unmasked heads (sdpa) only"


def _excluding_reference(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token pruning on an Eva or BEiT, written from its description: every token kept, the pruned ones excluded
    (no query attends to them, their outputs ignored); the rotary embedding and the relative position bias of the
    whole grid (timm's own expansion); the class row's attention, bias included, ranks the patches present.
    Returns the logits and the features of the tokens left, in order."""
    from timm.layers import apply_rot_embed_cat
    from timm.models.beit import Attention as BeitAttention
    from timm.models.beit import RelativePositionBias
    prefix, eva = model.num_prefix_tokens, isinstance(model, Eva)
    if eva:
        x, rope = model._pos_embed(model.patch_embed(images))
        x = model.norm_pre(x)
    else:
        x = torch.cat([model.cls_token.expand(len(images), -1, -1), model.patch_embed(images)], dim=1)
        x, rope = x if model.pos_embed is None else x + model.pos_embed, None
    batch, tokens, channels = x.shape
    patches = tokens - prefix
    alive = torch.ones(batch, tokens, dtype=torch.bool)
    stage = 0
    for number, block in enumerate(model.blocks):
        layer, h = block.attn, block.norm1(x)
        q, k, v = layer._project(h)
        bias = 0.0
        if eva:
            q, k = layer.q_norm(q), layer.k_norm(k)
            if rope is not None:
                block_rope = rope[number] if getattr(model, "rope_mixed", False) else rope
                half = getattr(layer, "rotate_half", False)
                q, k = (torch.cat([t[:, :, :prefix], apply_rot_embed_cat(t[:, :, prefix:], block_rope, half=half)], 2)
                        for t in (q, k))
        else:
            if layer.relative_position_bias_table is not None:
                bias = BeitAttention._get_rel_pos_bias(layer)[0]
            if model.rel_pos_bias is not None:
                bias = bias + RelativePositionBias.forward(model.rel_pos_bias)
        s = (q * layer.scale) @ k.transpose(-2, -1) + bias
        keep = layer.keep_mask().expand(layer.num_heads, tokens, tokens)
        logits = torch.where(keep, s, layer.alpha.detach().view(-1, 1, 1) * s)
        logits = logits.masked_fill(~alive[:, None, None, :], float("-inf"))
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, -1)
        if eva:
            out = layer.norm(out)
        out = layer.proj(out)
        x = x + (out if block.gamma_1 is None else block.gamma_1 * out)
        mlp = block.mlp(block.norm2(x))
        x = x + (mlp if block.gamma_2 is None else block.gamma_2 * mlp)
        if number in model.token_prune_layers:
            stage += 1
            count = kept_tokens(patches, model.token_keep_rate, stage)
            row = s[:, :, 0].masked_fill(~alive[:, None, :], float("-inf")).softmax(-1).mean(1)[:, prefix:]
            row = row.masked_fill(~alive[:, prefix:], float("-inf"))
            chosen = torch.zeros(batch, patches, dtype=torch.bool).scatter(1, row.topk(count).indices, True)
            alive = torch.cat([alive[:, :prefix], chosen], dim=1)
    x = model.norm(x)[alive].view(batch, -1, channels)
    return model.forward_head(x), x


@pytest.mark.parametrize("name", ["eva02", "dinov3", "rope_mixed", "beit", "beit_shared", "beit_abs"])
def test_token_pruning_drops_what_the_excluding_reference_excludes(name):
    """Eva and BEiT masked with token pruning: each kept patch keeps its window, rotary embedding and relative
    position bias of its original grid position; dropping the pruned tokens computes what excluding them does."""
    model = mait.mask_model(_family(name).double(), scheme="0:hsru,1:hhsu", token_keep_rate=0.5)
    with torch.no_grad():      # BEiT: head 0's class row weighs the class token far more, so the class row's bias
        for module in model.modules():      # changes the heads' average, and with it which patches are kept
            table = getattr(module, "relative_position_bias_table", None)
            if table is not None:
                table[-1, 0] += 8.0
    images = _images(batch=3).double()
    with torch.no_grad():
        features = model.forward_features(images)
        logits = model.forward_head(features)
        want_logits, want_features = _excluding_reference(model, images)
    assert model.token_prune_layers == (0, 1) and model.token_index.shape == (3, 36)
    assert features.shape == (3, model.num_prefix_tokens + 36, 32)
    torch.testing.assert_close(features, want_features, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(logits, want_logits, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["eva02", "beit_shared"])
def test_token_pruned_families_train_and_keep_rate_one_is_no_pruning(name):
    model = mait.mask_model(_family(name), scheme="sch1", token_keep_rate=0.5).train()
    model(_images()).sum().backward()
    assert model.token_index.shape == (2, 36)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    unpruned = mait.mask_model(_family(name), scheme="sch1", token_keep_rate=1.0)
    with torch.no_grad():
        assert torch.equal(unpruned(_images()), mait.mask_model(_family(name), scheme="sch1")(_images()))


def test_token_pruning_on_cait_is_masked_caits():
    cait = _family("cait_xxs24_224")
    weights = {key: value.clone() for key, value in cait.state_dict().items()}
    mait.mask_model(cait, "sch1", token_keep_rate=0.5, token_prune_layers=(0, 1))
    reference = timm.create_model("mait_cait_xxs24_224", scheme="sch1", token_keep_rate=0.5,
                                  token_prune_layers=(0, 1), **TINY).eval()
    reference.load_state_dict(weights)
    with torch.no_grad():
        pruned = cait(_images())
        assert torch.equal(pruned, reference(_images()))
        assert cait.token_index.shape[1] < cait.patch_embed.num_patches, "tokens were dropped"
        assert not torch.equal(pruned, mait.mask_model(_family("cait_xxs24_224"), "sch1")(_images()))
    wrong_uses = (({"token_keep_rate": 1.5}, r"token_keep_rate"),
                  ({"token_prune_layers": (1, 0)}, r"strictly increasing block indices in \[0, 1\]"))
    for wrong, message in wrong_uses:
        model = _family("cait_xxs24_224")
        with pytest.raises(ValueError, match=message):
            mait.mask_model(model, "sch1", **{"token_keep_rate": 0.5, **wrong})
        assert not any(isinstance(m, mait.MaskedAttention) for m in model.modules()), "a refused model is unchanged"


def test_token_pruning_needs_a_class_token():
    no_class = Eva(**TINY, class_token=False, num_reg_tokens=1, global_pool="avg")
    with pytest.raises(ValueError, match="no class token; use class_token=True"):
        mait.mask_model(no_class, token_keep_rate=0.5)


def test_bias_semantics_of_the_op():
    """Hard head: non-neighbour logits are 0 whatever the bias; neighbour and prefix logits carry it; an unmasked
    head sees S + B (the functional op, against a naive per-entry Mα)."""
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 1 + 20, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(3, 21, 21, generator=generator, dtype=torch.float64)
    alphas = [0.0, 0.4, 1.0]
    multiplier = torch.stack([naive_multiplier((4, 5), 3, 1, a) for a in alphas])
    expected = ((q @ k.transpose(-2, -1) / 8 ** 0.5 + bias) * multiplier).softmax(-1) @ v
    for backend in ("auto", "reference", "matmul"):
        out = mait.masked_attention(q, k, v, grid_size=(4, 5), alpha=alphas, bias=bias, backend=backend)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    hard = mait.masked_attention(q[:, :1], k[:, :1], v[:, :1], grid_size=(4, 5), bias=bias[:1], backend="local")
    torch.testing.assert_close(hard, expected[:, :1], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="backend 'flex' cannot run this call: it takes no additive logit bias"):
        mait.masked_attention(q, k, v, grid_size=(4, 5), alpha=0.0, bias=bias, backend="flex")
    with pytest.raises(ValueError, match=r"bias must be a float tensor of shape \(heads, T, T\) = \(3, 21, 21\)"):
        mait.masked_attention(q, k, v, grid_size=(4, 5), bias=bias[:2])


def test_dynamic_eva_stays_dynamic_and_follows_each_grid():
    torch.manual_seed(0)
    model = _randomised(Eva(**dict(TINY, depth=1), use_rot_pos_emb=True, num_reg_tokens=2, dynamic_img_size=True))
    timm_model = copy.deepcopy(model)
    x = _images(64, 1, width=104)                 # an 8x13 grid
    with torch.no_grad():
        expected = timm_model(x)
        assert torch.equal(mait.mask_model(copy.deepcopy(model), scheme="none")(x), expected)
        mait.mask_model(model, scheme="all")
        auto = model(x)
        assert model.blocks[0].attn.grid_size == (8, 13) and model.blocks[0].attn.num_prefix_tokens == 3
        set_backend(model, "reference")
        torch.testing.assert_close(model(x), auto, rtol=0, atol=1e-5)
    assert (auto - expected).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["eva02", pytest.param("beit", marks=pytest.mark.skipif(
    not hasattr(Beit, "set_input_size"), reason="timm's Beit has set_input_size from timm 1.0.31"))])
def test_set_input_size_of_a_masked_model_equals_the_model_built_for_the_size(name):
    """timm resamples the position embedding, the rotary grid or the bias tables; the masked layers take the grid."""
    model = mait.mask_model(_family(name), scheme="0:hsuu,1:all")
    model.set_input_size(img_size=64)
    assert all(block.attn.grid_size == (8, 8) for block in model.blocks)
    cls, variants = (Eva, EVA_VARIANTS) if name in EVA_VARIANTS else (Beit, BEIT_VARIANTS)
    built = mait.mask_model(cls(**dict(TINY, img_size=64), **variants[name]).eval(), scheme="0:hsuu,1:all")
    built.load_state_dict(model.state_dict())
    x = _images(64, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), built(x), rtol=0, atol=1e-5)


def test_cait_equals_masked_cait_with_the_same_weights():
    cait = _family("cait_xxs24_224")
    weights = {key: value.clone() for key, value in cait.state_dict().items()}
    scheme = "0:hsuu,1:all"
    mait.mask_model(cait, scheme=scheme)
    reference = timm.create_model("mait_cait_xxs24_224", scheme=scheme, **TINY).eval()
    missing = reference.load_state_dict(weights, strict=False).missing_keys
    assert missing == ["blocks.0.attn.alpha_logit"]
    reference.blocks[0].attn.alpha_logit.data.copy_(cait.blocks[0].attn.alpha_logit)
    assert isinstance(cait, mait.MaskedCait) and str(cait.scheme) == str(reference.scheme)
    assert type(cait.blocks_token_only[0].attn).__name__ == "ClassAttn"       # class attention untouched
    with torch.no_grad():
        assert torch.equal(cait(_images()), reference(_images()))
    with pytest.raises(ValueError, match="talking heads mix the heads around the softmax"):
        mait.mask_model(_family("cait_xxs24_224"), scheme="sch1", attention_backend="local")


@pytest.mark.parametrize("name", ["eva02", "beit", "cait_xxs24_224"])
def test_train_step_fx_analysis_and_export(name, tmp_path):
    model = mait.mask_model(_family(name), scheme="0:hsuu,1:soft")
    x = _images()
    # a training step reaches every parameter, α included
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert {"blocks.1.attn.alpha_logit"} <= model.no_weight_decay()
    model.eval()
    # torch.fx: the masked layers are leaves; the traced model computes the same logits
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    tracer = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    nodes = get_graph_node_names(model, tracer_kwargs=tracer)[1]
    traced = create_feature_extractor(model, return_nodes=[nodes[-1]], tracer_kwargs=tracer)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(next(iter(traced(x).values())), expected, rtol=0, atol=1e-6)
    # analysis: ALS and cross-layer similarity read the masked layers' maps
    als = mait.analysis.measure_als(model, x)
    assert len(als) == 2 and all(torch.isfinite(a).all() for a in als)
    similarity = mait.analysis.measure_similarity(model, [x])
    assert similarity.shape[-2:] == (2, 2)
    # torch.export (what `mait export --format pt2` runs) computes the same logits
    program = export_pt2(model, x, tmp_path / "model.pt2")
    with torch.no_grad():
        torch.testing.assert_close(program.module()(torch.cat([x, x])), torch.cat([expected, expected]), rtol=0,
                                   atol=1e-5)


def test_pretrained_weights_from_a_local_file_then_masked(tmp_path):
    """The path of a model timm creates with pretrained weights (here from a local file), masked afterwards;
    its masked checkpoint round-trips through mait's loader."""
    source = timm.create_model("eva02_tiny_patch14_224", img_size=56, depth=2)
    path = tmp_path / "eva02.safetensors"
    safetensors.torch.save_file(_randomised(source).state_dict(), path)
    model = timm.create_model("eva02_tiny_patch14_224", img_size=56, depth=2, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert torch.equal(model.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    x = _images(56, 1)
    with torch.no_grad():
        expected = source(x)
        mait.mask_model(model, scheme="sch1")
        masked = model(x)
    assert (masked - expected).abs().max() > 1e-4
    save_weights(model, tmp_path / "masked.safetensors")
    again = mait.mask_model(timm.create_model("eva02_tiny_patch14_224", img_size=56, depth=2).eval(), scheme="sch1")
    load_weights(again, tmp_path / "masked.safetensors")
    with torch.no_grad():
        assert torch.equal(again(x), masked)


@pytest.mark.parametrize("make,needle", [
    (lambda: timm.create_model("xcit_nano_12_p16_224", depth=2),
     "cannot mask Xcit: cross-covariance attention attends across channels"),
    (lambda: timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1)),
     "cannot mask SwinTransformer: its window attention is local already"),
    (lambda: timm.create_model("convit_tiny", depth=2), "cannot mask ConVit: its gated positional self-attention"),
    (lambda: timm.create_model("pvt_v2_b0"), "cannot mask PyramidVisionTransformerV2: its attention reads pooled"),
    (lambda: Eva(**TINY, patch_drop_rate=0.5), "patch dropout removes tokens from the patch grid"),
    (lambda: mait.mask_model(Eva(**TINY), scheme="none"), "MaskedEva is already masked"),
    (lambda: mait.mask_model(Beit(**TINY), scheme="none"), "MaskedBeit is already masked"),
    (lambda: mait.mask_model(timm.create_model("cait_xxs24_224", **TINY), scheme="none"), "MaskedCait is already"),
])
def test_families_that_cannot_be_masked_are_one_line_errors(make, needle):
    model = make()
    kind = type(model)
    with pytest.raises(ValueError, match=needle) as raised:
        mait.mask_model(model, scheme="sch1")
    assert "\n" not in str(raised.value)
    assert type(model) is kind


@pytest.mark.parametrize("model,kwargs", [
    ("eva02_tiny_patch14_224", '{"patch_size": 2, "depth": 2, "embed_dim": 16, "num_heads": 2}'),
    pytest.param("beit_base_patch16_224", '{"patch_size": 2, "depth": 2, "embed_dim": 16, "num_heads": 2}',
                 marks=pytest.mark.slow),
    pytest.param("cait_xxs24_224", '{"patch_size": 2, "depth": 2, "depth_token_only": 1, "embed_dim": 16, '
                 '"num_heads": 2}', marks=pytest.mark.slow),
])
def test_mait_train_and_flops_on_the_families(model, kwargs, tmp_path):
    """``mait train --model <an Eva, BEiT or CaiT> --scheme ...`` trains the masked model a couple of steps and
    ``mait eval`` rebuilds it; ``mait flops`` counts its masked heads."""
    run = tmp_path / "run"
    common = ["--model", model, "--scheme", "sch1", "--model-kwargs", kwargs]
    train = subprocess.run([sys.executable, "-m", "mait", "train", *common, "--epochs", "1", "--train-subset", "32",
                            "--val-subset", "16", "--batch-size", "16", "--output", str(run),
                            "--no-progress"], capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr
    evaluated = subprocess.run([sys.executable, "-m", "mait", "eval", "--checkpoint", str(run / "last.safetensors")],
                               capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0 and "top-1" in evaluated.stdout, evaluated.stderr
    exported = subprocess.run([sys.executable, "-m", "mait", "export", "--checkpoint", str(run / "last.safetensors"),
                               "--format", "pt2", "--output", str(tmp_path / "model.pt2")],
                              capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0 and (tmp_path / "model.pt2").exists(), exported.stderr
    from mait.commands._model import create_model
    from mait.cost import count_macs
    dense = count_macs(create_model(model, img_size=224, depth=2))
    masked = count_macs(create_model(model, img_size=224, depth=2, scheme="all"))
    if model.startswith("cait"):     # talking heads mix every head's full map: masks save no attention MACs
        assert masked.attention_map == dense.attention_map > 0
    else:
        assert 0 < masked.attention_map < dense.attention_map / 5


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "beit_base_patch16_224"])
def test_flops_with_token_pruning_on_eva_and_beit(name, capsys):
    """``mait flops <Eva/BEiT> --token-keep-rate ρ`` prunes the timm model (heads left unmasked without
    --scheme) and prints its whole-model reduction against the same model unpruned."""
    from mait.cli import main
    from mait.cost import count_macs
    assert main(["flops", name, "--token-keep-rate", "0.5", "--stages-only"]) == 0
    text = capsys.readouterr().out
    pruned = count_macs(mait.mask_model(timm.create_model(name), scheme="none", token_keep_rate=0.5))
    unpruned = count_macs(timm.create_model(name))
    line = next(line for line in text.splitlines() if line.startswith("model "))
    assert f"{pruned.macs / 1e9:.3f}" in line and f"{unpruned.macs / 1e9:.3f}" in line
    assert f"{100 * (pruned.macs / unpruned.macs - 1):.1f}%" in line and "after blocks 3, 6, 9" in text


def test_training_config_prunes_tokens_of_a_timm_family():
    """Token pruning in a run's ``model_kwargs`` reaches a timm Eva through mask_model (every head unmasked
    unless the run names a scheme), as it reaches mait's own models."""
    from mait.train import load_config
    from mait.train.data import DataInfo
    from mait.train.models import build_model
    kwargs = dict(patch_size=8, embed_dim=32, depth=4, num_heads=4, token_keep_rate=0.5, token_prune_layers=[1])
    info = DataInfo("images", 10, 3, 96, 0, 0)
    model = build_model(load_config(None, {"model": "eva02_tiny_patch14_224", "model_kwargs": kwargs}), info)
    assert (str(model.scheme), model.token_keep_rate) == ("none", 0.5)
    masked = build_model(load_config(None, {"model": "eva02_tiny_patch14_224", "scheme": "all",
                                            "model_kwargs": kwargs}), info)
    assert str(masked.scheme) != "none" and masked.token_keep_rate == 0.5
    with torch.no_grad():
        assert model(torch.randn(2, 3, 96, 96)).shape == (2, 10)
