"""Token pruning (Sparsifiner's token sparsity, the pruned tokens dropped): the selection against a loop
reference, MaiT's masks among the kept tokens against a mask built from their (row, col), and whole models
against a float64 reference that keeps every token but excludes the pruned ones."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models.vision_transformer import ResPostBlock

import mait
from mait import MaskedAttention
from mait.backends import compiled
from mait.cost import count_macs
from mait.learned import set_phase
from mait.tokens import (class_attention_scores, default_prune_layers, kept_tokens, select_tokens,
                         token_positions)


# ----------------------------------------------------------------------------------- the selection rule
def _loop_selection(q: torch.Tensor, k: torch.Tensor, prefix: int, count: int) -> list[list[int]]:
    """From the description: the class token's attention probabilities (softmax over the tokens present),
    averaged over the heads, score the patches; the ``count`` best are kept, listed in order."""
    batch, heads, tokens, dim = q.shape
    chosen = []
    for b in range(batch):
        score = [0.0] * (tokens - prefix)
        for h in range(heads):
            logits = [sum(q[b, h, 0, c].item() * k[b, h, j, c].item() for c in range(dim)) / math.sqrt(dim)
                      for j in range(tokens)]
            total = sum(math.exp(s) for s in logits)
            for j in range(prefix, tokens):
                score[j - prefix] += math.exp(logits[j]) / total / heads
        best = sorted(range(tokens - prefix), key=lambda j: -score[j])[:count]
        chosen.append(sorted(best))
    return chosen


@pytest.mark.parametrize("batch,heads,prefix,patches,dim,count", [
    (2, 3, 1, 16, 4, 8), (3, 1, 2, 9, 8, 1), (1, 6, 1, 49, 4, 25), (2, 2, 1, 7, 3, 7)])
def test_selection_matches_the_loop_reference(batch, heads, prefix, patches, dim, count):
    torch.manual_seed(patches + count)
    q, k = (torch.randn(batch, heads, prefix + patches, dim, dtype=torch.float64) * 2 for _ in range(2))
    scores = class_attention_scores(q, k, dim ** -0.5, prefix)
    assert select_tokens(scores, count).tolist() == _loop_selection(q, k, prefix, count)


def test_kept_counts_and_default_prune_layers():
    assert [kept_tokens(196, 0.7, stage) for stage in (1, 2, 3)] == [math.ceil(0.7 * 196), math.ceil(0.49 * 196),
                                                                     math.ceil(0.343 * 196)]
    assert [kept_tokens(196, 0.5, stage) for stage in (1, 2, 3)] == [98, 49, 25]
    assert kept_tokens(4, 0.01, 3) == 1
    assert default_prune_layers(12) == (3, 6, 9)
    assert default_prune_layers(24) == (6, 12, 18)
    assert default_prune_layers(6) == (1, 3, 4)
    assert default_prune_layers(4) == (1, 2, 3)
    assert default_prune_layers(2) == (0, 1)


# ------------------------------------------------------------------------- one layer among kept tokens
def _random_index(batch: int, patches: int, kept: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, patches, generator=g).topk(kept, dim=-1).indices.sort(dim=-1).values


def _window_mask_by_rows_and_cols(index: torch.Tensor, grid: tuple[int, int], size: int, prefix: int) -> torch.Tensor:
    """``(B, T', T')`` from the kept patches' original (row, col): neighbours within ``r`` rows and columns,
    prefix rows and columns kept."""
    r = (size - 1) // 2
    batch, kept = index.shape
    mask = torch.ones(batch, prefix + kept, prefix + kept, dtype=torch.bool)
    for b in range(batch):
        for i in range(kept):
            for j in range(kept):
                row_i, col_i = divmod(int(index[b, i]), grid[1])
                row_j, col_j = divmod(int(index[b, j]), grid[1])
                mask[b, prefix + i, prefix + j] = abs(row_i - row_j) <= r and abs(col_i - col_j) <= r
    return mask


@pytest.mark.parametrize("grid,size,prefix,kept", [((4, 4), 3, 1, 7), ((5, 3), 3, 2, 9), ((6, 6), 5, 1, 12)])
def test_kept_windows_are_the_original_grids(grid, size, prefix, kept):
    layer = MaskedAttention(8, 2, grid_size=grid, mask_size=size, num_prefix_tokens=prefix)
    index = _random_index(3, grid[0] * grid[1], kept, seed=kept)
    keep = layer.pruned_keep(token_positions(index, prefix))
    assert keep.shape == (3, 1, prefix + kept, prefix + kept)
    assert torch.equal(keep[:, 0], _window_mask_by_rows_and_cols(index, grid, size, prefix))


def _layer_reference(layer: MaskedAttention, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Float64 loop over rows: MaiT's semantics among the tokens present, mask from their (row, col)."""
    batch, tokens, channels = x.shape
    heads, dim, prefix = layer.num_heads, layer.head_dim, layer.num_prefix_tokens
    near = _window_mask_by_rows_and_cols(index, layer.grid_size, layer.mask_size, prefix)
    qkv = layer.qkv(x).reshape(batch, tokens, 3, heads, dim).permute(2, 0, 3, 1, 4)
    alpha = layer.alpha.detach()
    out = torch.empty(batch, heads, tokens, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            s = qkv[0, b, h] @ qkv[1, b, h].T * dim ** -0.5
            for i in range(tokens):
                row = torch.where(near[b, i], s[i], alpha[h] * s[i])
                if layer.mode == "neg_inf" and alpha[h] == 0:
                    row = s[i].masked_fill(~near[b, i], float("-inf"))
                out[b, h, i] = row.softmax(-1) @ qkv[2, b, h]
    return layer.proj(out.transpose(1, 2).reshape(batch, tokens, channels))


@pytest.mark.parametrize("kinds,mode", [("hh", "zero"), ("hs", "zero"), ("hu", "zero"), ("uu", "zero"),
                                        ("hu", "neg_inf"), ("sh", "zero")])
@pytest.mark.parametrize("grid,size,prefix,kept", [((4, 4), 3, 1, 7), ((5, 3), 3, 2, 11), ((3, 3), 1, 1, 4)])
def test_pruned_layer_matches_the_dense_reference(kinds, mode, grid, size, prefix, kept):
    torch.manual_seed(kept)
    layer = MaskedAttention(8, 2, grid_size=grid, mask_size=size, num_prefix_tokens=prefix, head_kinds=kinds,
                            mode=mode, qkv_bias=True).double().eval()
    index = _random_index(2, grid[0] * grid[1], kept, seed=kept + 1)
    x = torch.randn(2, prefix + kept, 8, dtype=torch.float64)
    layer.token_index = index
    got = layer(x)
    layer.token_index = None
    torch.testing.assert_close(got, _layer_reference(layer, x, index), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kinds", ["hh", "hs", "ru", "ll"])
def test_every_patch_present_is_the_unpruned_layer(kinds):
    torch.manual_seed(0)
    layer = MaskedAttention(8, 2, grid_size=(4, 4), num_prefix_tokens=1, head_kinds=kinds,
                            keep_rate=0.3 if "l" in kinds else None).double().eval()
    x = torch.randn(3, 17, 8, dtype=torch.float64)
    layer.capture_attention = True
    layer.token_index = torch.arange(16).expand(3, -1)
    got, probs = layer(x), layer.last_attention
    layer.token_index = None
    torch.testing.assert_close(got, layer(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(probs, layer.last_attention, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------- whole models: dropping = excluding
def _excluding_reference(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token kept, the pruned ones excluded: no query attends to them (their logits -inf, not counted in
    any softmax), their own outputs ignored; learned heads' predictors as released (pruned keys' reduced
    channels zeroed, pruned columns never kept, at most as many keys kept as patches remain).  Returns the
    class logits and the features of the tokens left, in order."""
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    batch, tokens, channels = x.shape
    patches = tokens - prefix
    alive = torch.ones(batch, tokens, dtype=torch.bool)
    stage = 0
    for number, block in enumerate(model.blocks):
        layer = block.attn
        heads, dim = layer.num_heads, layer.head_dim
        post_norm = isinstance(block, ResPostBlock)
        q, k, v = layer.qkv(x if post_norm else block.norm1(x)).reshape(batch, tokens, 3, heads, dim).permute(
            2, 0, 3, 1, 4)
        s = (q * layer.scale) @ k.transpose(-2, -1)
        keep = layer.keep_mask().expand(heads, tokens, tokens)
        alpha = layer.alpha.detach().view(heads, 1, 1)
        logits = torch.where(keep, s, alpha * s)
        if layer.mode == "neg_inf":
            logits = s.masked_fill((alpha == 0) & ~keep, float("-inf"))
        predictor = layer.predictor
        if predictor is not None:
            learned = layer.learned_index
            ql, kl = q[:, learned], k[:, learned]
            k_c = predictor.proj_c_k(kl) * alive[:, None, :, None]
            coef = (predictor.proj_c_q(ql[:, :, prefix:]) @ (k_c.transpose(-2, -1) @ predictor.proj_n)
                    * predictor.scale).softmax(-1)
            decide = predictor.pruned_coefficients(coef) @ predictor.pruned_basis() if predictor.sparse_basis \
                else coef @ predictor.proj_back_n.t()
            decide = decide.masked_fill(~alive[:, None, None, :], float("-inf"))
            budget = min(predictor.kept, int(alive[0, prefix:].sum()))
            kept = torch.zeros_like(decide, dtype=torch.bool).scatter(-1, decide.topk(budget, dim=-1).indices, True)
            outside = float("-inf") if predictor.mode == "neg_inf" else 0.0
            patch_rows = s[:, learned, prefix:].masked_fill(~kept, outside)
            logits[:, learned] = torch.cat([s[:, learned, :prefix], patch_rows], dim=2)
        logits = logits.masked_fill(~alive[:, None, None, :], float("-inf"))
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, channels)
        if post_norm:
            x = x + block.norm1(layer.proj(out))
            x = x + block.norm2(block.mlp(x))
        else:
            x = x + block.ls1(layer.proj(out))
            x = x + block.ls2(block.mlp(block.norm2(x)))
        if number in model.token_prune_layers:
            stage += 1
            count = kept_tokens(patches, model.token_keep_rate, stage)
            row = s[:, :, 0].masked_fill(~alive[:, None, :], float("-inf")).softmax(-1).mean(1)[:, prefix:]
            row = row.masked_fill(~alive[:, prefix:], float("-inf"))
            if count < int(alive[0, prefix:].sum()):
                chosen = torch.zeros(batch, patches, dtype=torch.bool).scatter(1, row.topk(count).indices, True)
                alive = torch.cat([alive[:, :prefix], chosen], dim=1)
    x = model.norm(x)
    return model.forward_head(x), x[alive].view(batch, -1, channels)


def _tiny_vit(**kwargs) -> torch.nn.Module:
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2,
                            num_classes=5, **kwargs)
    return mait.mask_model(vit, "*:hs", token_keep_rate=0.6)


MODELS = {
    "mait, every kind": lambda: timm.create_model("mait_nano4_8", scheme="*:hslu", token_keep_rate=0.5),
    "mait, random heads, neg_inf": lambda: timm.create_model("mait_nano4_8", scheme="*:hrhu", attention_mode="neg_inf",
                                                             token_keep_rate=0.7, token_prune_layers=(0, 2)),
    "sparsifiner": lambda: timm.create_model("sparsifiner_nano4_8", token_keep_rate=0.5, keep_rate=0.4),
    "sparsifiner, zero, unpruned map": lambda: timm.create_model("sparsifiner_nano4_8", token_keep_rate=0.4,
                                                                 mode="zero", sparse_basis=False),
    # 17 tokens leave n = 2 basis tokens: thresholding the basis would tie many map entries at 0
    "sparsifiner, cifar shape": lambda: timm.create_model("sparsifiner_mini6_32", img_size=16, token_keep_rate=0.5,
                                                          embed_dim=24, basis_threshold=0.0),
    "mask_model": lambda: _tiny_vit(init_values=0.1),
    "mask_model, post-norm blocks": lambda: _tiny_vit(block_fn=ResPostBlock),
}


@pytest.mark.parametrize("name", MODELS)
def test_dropping_equals_excluding(name):
    torch.manual_seed(0)
    model = MODELS[name]().double().eval()
    images = torch.randn(3, model.patch_embed.proj.in_channels, *model.patch_embed.img_size, dtype=torch.float64)
    with torch.no_grad():
        features = model.forward_features(images)
        logits = model.forward_head(features)
        want_logits, want_features = _excluding_reference(model, images)
    patches = model.patch_embed.num_patches
    last = kept_tokens(patches, model.token_keep_rate, len(model.token_prune_layers))
    assert features.shape[1] == model.num_prefix_tokens + last < model.num_prefix_tokens + patches
    torch.testing.assert_close(features, want_features, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(logits, want_logits, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["mait_nano4_8", "sparsifiner_nano4_8"])
def test_keep_rate_one_is_no_pruning(name):
    torch.manual_seed(0)
    plain = timm.create_model(name).eval()
    images = torch.randn(4, 1, 8, 8)
    for rate in (1.0, 0.995):      # 0.995: every stage keeps ceil(0.985 · 64) = 64 patches
        pruned = timm.create_model(name, token_keep_rate=rate).eval()
        pruned.load_state_dict(plain.state_dict())
        assert torch.equal(pruned(images), plain(images))
        assert pruned.token_index is None


def test_pruning_follows_the_predictor_phase_and_trains():
    torch.manual_seed(0)
    model = timm.create_model("sparsifiner_nano4_8", token_keep_rate=0.5, drop_path_rate=0.1)
    images = torch.randn(4, 1, 8, 8)
    model.train()
    for phase, prunes in (("reconstruct", False), ("joint", False), ("frozen", True)):
        set_phase(model, phase)
        model(images).sum().backward()
        assert (model.token_index is not None) == prunes, phase
    assert model.blocks[0].attn.qkv.weight.grad is not None
    mait_model = timm.create_model("mait_nano4_8", token_keep_rate=0.5).train()
    mait_model(images).sum().backward()
    assert mait_model.token_index.shape == (4, 8)
    assert all(p.grad is not None for p in mait_model.parameters() if p.requires_grad)


def test_whole_model_cost_counts_the_tokens_left():
    model = timm.create_model("mait_micro4_32", token_keep_rate=0.5, scheme="none")
    report = count_macs(model)
    dim, patches, want = 64, 64, 0
    count, stage = patches, 0
    for number in range(4):                 # a prune layer's MLP runs on the tokens it keeps
        attention = 1 + count
        if number in model.token_prune_layers:
            stage += 1
            count = kept_tokens(patches, 0.5, stage)
        want += attention * dim * dim * 4 + 2 * attention * attention * dim + (1 + count) * dim * dim * 2 * 2
    blocks = sum(layer.macs for layer in report.layers if layer.name.startswith("blocks."))
    assert blocks == want


# ------------------------------------------------------------------------------------------ wrong uses
@pytest.mark.parametrize("kwargs,message", [
    (dict(token_keep_rate=0.0), "token_keep_rate must lie in (0, 1]"),
    (dict(token_keep_rate=1.5), "token_keep_rate must lie in (0, 1]"),
    (dict(token_keep_rate=True), "token_keep_rate must lie in (0, 1]"),
    (dict(token_keep_rate=0.5, token_prune_layers=(1, 1)), "strictly increasing block indices in [0, 3]"),
    (dict(token_keep_rate=0.5, token_prune_layers=(2, 1)), "strictly increasing"),
    (dict(token_keep_rate=0.5, token_prune_layers=(1, 4)), "got (1, 4)"),
    (dict(token_keep_rate=0.5, token_prune_layers=()), "strictly increasing"),
    (dict(token_keep_rate=0.5, token_prune_layers=3), "got 3"),
    (dict(token_keep_rate=0.5, features_only=True), "features_only=True returns a feature map of every patch"),
])
def test_bad_token_pruning_is_a_one_line_error(kwargs, message):
    with pytest.raises(ValueError) as error:
        timm.create_model("mait_nano4_8", **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_wrong_uses_of_a_pruned_model():
    model = timm.create_model("mait_nano4_8", token_keep_rate=0.5)
    with pytest.raises(ValueError, match=r"forward_intermediates\(\) returns a feature map .* token_keep_rate=1.0"):
        model.forward_intermediates(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="features_only=True"):
        timm.create_model("sparsifiner_nano4_8", token_keep_rate=0.5, features_only=True)
    learned = timm.create_model("sparsifiner_nano4_8", token_keep_rate=0.5)
    with pytest.raises(ValueError, match="per-token tables"):
        learned.set_input_size(img_size=16)
    no_class = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=32, depth=2,
                                 num_heads=2, class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="no class token; use class_token=True"):
        mait.mask_model(no_class, token_keep_rate=0.5)
    assert not isinstance(no_class, mait.MaiT)                      # refused before anything changed
    with pytest.raises(ValueError, match=r"token pruning \(token_keep_rate=0.5\) drops; analyse the model after"):
        mait.analysis.collect_attention(model, torch.randn(2, 1, 8, 8))
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="gradient checkpointing cannot replay token pruning"):
        model.train()(torch.randn(2, 1, 8, 8))


def test_fixed_masks_follow_a_size_change_under_pruning():
    model = timm.create_model("mait_micro4_32", token_keep_rate=0.5).eval()
    model.set_input_size(img_size=48)
    out = model(torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 10) and model.token_index.shape == (2, kept_tokens(144, 0.5, 3))


def test_predictor_cost_on_the_tokens_left():
    torch.manual_seed(0)
    model = timm.create_model("sparsifiner_nano4_8", token_keep_rate=0.5, sparse_basis=False).eval()
    report = count_macs(model)
    predictor = model.blocks[3].attn.predictor               # after two prune layers: 1 + 16 tokens of 65
    tokens, rows, reduced, basis, dim = 17, 16, 8, 10, 16
    want = (rows + tokens) * dim * reduced + reduced * tokens * basis + rows * reduced * basis + rows * basis * tokens
    layer = next(item for item in report.layers if item.name == "blocks.3")
    assert layer.predictor == 4 * want == layer.predictor_sparse      # unpruned map: the dense count
    kept = predictor.kept_for(tokens)
    assert kept == min(predictor.kept, rows) == 16
    assert layer.attention_map == 4 * 2 * dim * (tokens + rows * kept)


def test_flops_cli_prints_the_whole_model_reduction(capsys):
    from mait.cli import main
    assert main(["flops", "sparsifiner_nano4_8", "--token-keep-rate", "0.5", "--stages-only"]) == 0
    text = capsys.readouterr().out
    torch.manual_seed(0)
    pruned = count_macs(timm.create_model("sparsifiner_nano4_8", token_keep_rate=0.5, sparse_basis=False))
    unpruned = count_macs(timm.create_model("sparsifiner_nano4_8", sparse_basis=False))
    dense = count_macs(timm.create_model("mait_nano4_8", scheme="none"))
    line = next(line for line in text.splitlines() if line.startswith("predictor counted densely"))
    assert f"{pruned.macs / 1e9:.3f}" in line and f"{100 * (pruned.macs / unpruned.macs - 1):.1f}%" in line
    assert f"{100 * (pruned.macs / dense.macs - 1):.1f}%" in line
    assert "after blocks 1, 2, 3" in text and "predictor by its nonzeros" in text


def test_token_distillation_compares_the_kept_tokens():
    from mait.train.objectives import Objective
    torch.manual_seed(0)
    teacher = timm.create_model("mait_nano4_8", scheme="none").eval()
    student = timm.create_model("sparsifiner_nano4_8", token_keep_rate=0.5)
    set_phase(student, "frozen")
    images = torch.randn(3, 1, 8, 8)
    objective = Objective({"tokens": 1.0}, torch.nn.CrossEntropyLoss(), teacher, student)
    loss, _ = objective(student, images, student.train()(images), torch.zeros(3, dtype=torch.long))
    objective.close()
    with torch.no_grad():
        theirs = teacher.forward_features(images)[:, 1:]
        mine = student.eval().forward_features(images)[:, 1:]     # drop path 0: training computes the same
    kept = student.token_index
    assert kept.shape == (3, 8)
    want = torch.stack([(mine[b] - theirs[b, kept[b]]).pow(2).mean() for b in range(3)]).mean()
    torch.testing.assert_close(loss, want)


# ------------------------------------------------------------------------------------------ Masked CaiT
def _cait_excluding_reference(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked CaiT with every patch kept and the pruned ones excluded: in the self-attention layers no patch
    attends to them (logits -inf after the talking-heads mixing and the masks), a patch's score is the attention
    it receives from the patches alive (probabilities before the mixing, averaged over heads and those queries);
    the class-attention layers' class token attends to the patches alive.  Returns the class logits and the
    features of the class token and the patches left, in order."""
    x = model.patch_embed(images) + model.pos_embed
    batch, patches, channels = x.shape
    alive = torch.ones(batch, patches, dtype=torch.bool)
    stage = 0
    for number, block in enumerate(model.blocks):
        layer = block.attn
        heads, dim = layer.num_heads, layer.head_dim
        q, k, v = layer.qkv(block.norm1(x)).reshape(batch, patches, 3, heads, dim).permute(2, 0, 3, 1, 4)
        s = layer.proj_l(((q * layer.scale) @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        keep = layer.keep_mask().expand(heads, patches, patches)
        alpha = layer.alpha.detach().view(heads, 1, 1)
        logits = torch.where(keep, s, alpha * s)
        if layer.mode == "neg_inf":
            logits = s.masked_fill((alpha == 0) & ~keep, float("-inf"))
        probs = logits.masked_fill(~alive[:, None, None, :], float("-inf")).softmax(-1)
        probs = probs.masked_fill(~alive[:, None, :, None], 0.0)   # excluded rows (all -inf with neg_inf) ignored
        mixed = layer.proj_w(probs.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x + block.gamma_1 * layer.proj((mixed @ v).transpose(1, 2).reshape(batch, patches, channels))
        x = x + block.gamma_2 * block.mlp(block.norm2(x))
        if number in model.token_prune_layers:
            stage += 1
            count = kept_tokens(patches, model.token_keep_rate, stage)
            received = (probs * alive[:, None, :, None]).sum((1, 2)) / (heads * alive.sum(-1, keepdim=True))
            if count < int(alive[0].sum()):
                best = received.masked_fill(~alive, float("-inf")).topk(count).indices
                alive = torch.zeros(batch, patches, dtype=torch.bool).scatter(1, best, True)
    cls = model.cls_token.expand(batch, -1, -1)
    present = torch.cat([torch.ones(batch, 1, dtype=torch.bool), alive], dim=1)
    for block in model.blocks_token_only:
        layer, u = block.attn, block.norm1(torch.cat([cls, x], dim=1))
        heads = layer.num_heads
        q = layer.q(u[:, :1]).reshape(batch, 1, heads, -1).transpose(1, 2)
        k, v = (proj(u).reshape(batch, 1 + patches, heads, -1).transpose(1, 2) for proj in (layer.k, layer.v))
        logits = ((q * layer.scale) @ k.transpose(-2, -1)).masked_fill(~present[:, None, None, :], float("-inf"))
        cls = cls + block.gamma_1 * layer.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, 1, channels))
        cls = cls + block.gamma_2 * block.mlp(block.norm2(cls))
    x = model.norm(torch.cat([cls, x], dim=1))
    return model.forward_head(x), x[present].view(batch, -1, channels)


def _tiny_cait(**kwargs) -> torch.nn.Module:
    return timm.create_model("mait_cait_xxs24_224", img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=4,
                             depth_token_only=2, num_classes=5, init_values=0.1, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(scheme="*:hsuh", token_keep_rate=0.5),
                                    dict(scheme="*:hrhu", token_keep_rate=0.6, token_prune_layers=(0, 3)),
                                    dict(scheme="*:hhuh", attention_mode="neg_inf", token_keep_rate=0.7,
                                         token_prune_layers=(0, 2))])
def test_masked_cait_dropping_equals_excluding(kwargs):
    torch.manual_seed(0)
    model = _tiny_cait(**kwargs).double().eval()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        features = model.forward_features(images)
        logits = model.forward_head(features)
        want_logits, want_features = _cait_excluding_reference(model, images)
    last = kept_tokens(64, model.token_keep_rate, len(model.token_prune_layers))
    assert features.shape[1] == 1 + last < 65 and model.token_index.shape == (3, last)
    torch.testing.assert_close(features, want_features, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(logits, want_logits, rtol=1e-9, atol=1e-10)
    model.set_token_pruning(1.0)                          # ρ = 1: the unpruned model
    plain = _tiny_cait(scheme=kwargs["scheme"], attention_mode=kwargs.get("attention_mode", "zero")).double().eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(images), plain(images)) and model.token_index is None


def test_masked_cait_and_hmait_wrong_uses():
    with pytest.raises(ValueError, match="features_only=True returns a feature map of every patch"):
        _tiny_cait(token_keep_rate=0.5, features_only=True)
    with pytest.raises(ValueError, match="token_prune_layers must be strictly increasing block indices in"):
        _tiny_cait(token_keep_rate=0.5, token_prune_layers=(2, 1))
    model = _tiny_cait(token_keep_rate=0.5)
    with pytest.raises(ValueError, match=r"forward_intermediates\(\) returns a feature map"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="can drop every key of a random-mask head's row under attention_mode"):
        _tiny_cait(scheme="*:hruh", attention_mode="neg_inf", token_keep_rate=0.7)
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match="gradient checkpointing cannot replay token pruning"):
        model.train()(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError) as error:
        timm.create_model("hmait_tiny_224", token_keep_rate=0.5)
    assert "shifted windows and patch merging need the whole patch grid; prune tokens on a monolithic MaiT" \
        in str(error.value) and "\n" not in str(error.value)


# ------------------------------------------------------------------------------- compile and export
@pytest.mark.slow          # torch.export takes a minute or more on a loaded CPU
def test_a_pruned_model_compiles_and_exports(tmp_path):
    """``torch.compile`` (dynamo's eager backend: no inductor needed) and the ``torch.export`` program of
    ``mait export`` (dynamic batch) of a token-pruned MaiT model give the eager model's logits and kept tokens,
    at another batch size than the export example's too."""
    from mait.commands.export import export_pt2
    torch.manual_seed(0)
    model = timm.create_model("mait_nano4_8", scheme="*:hsru", token_keep_rate=0.5).double().eval()
    images = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        want = model(images)
        kept = model.token_index
        model.token_index = None
        torch.testing.assert_close(torch.compile(model, backend="eager")(images), want, rtol=1e-10, atol=1e-12)
        assert torch.equal(model.token_index, kept)
        program = export_pt2(model, images[:3], tmp_path / "pruned.pt2")
        torch.testing.assert_close(program.module()(images), want, rtol=1e-10, atol=1e-12)
        loaded = torch.export.load(str(tmp_path / "pruned.pt2")).module()
        torch.testing.assert_close(loaded(images[:2]), want[:2], rtol=1e-10, atol=1e-12)


@pytest.mark.slow          # inductor's C++ compile: about 30 s on an idle CPU
@pytest.mark.skipif(compiled.unavailable_reason("cpu") is not None, reason=str(compiled.unavailable_reason("cpu")))
def test_a_pruned_model_compiles_with_inductor():
    """``torch.compile`` with inductor (fused kernels, float32) of a token-pruned MaiT keeps the eager logits and
    the kept tokens, and compiles once for repeated calls at one batch size."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model("mait_nano4_8", scheme="sch1", token_keep_rate=0.5).eval()
    images = torch.randn(4, 1, 8, 8)
    counter = CompileCounterWithBackend("inductor")
    run = torch.compile(model, backend=counter)
    with torch.no_grad():
        want = model(images)
        kept = model.token_index
        outputs = [run(images) for _ in range(2)]
    torch.testing.assert_close(outputs[0], want, rtol=1e-4, atol=1e-5)
    assert torch.equal(outputs[1], outputs[0]) and torch.equal(model.token_index, kept)
    assert counter.frame_count == 1
