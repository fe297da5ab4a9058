"""Learned (Sparsifiner) masks: the op against a float64 reference, the predictor, models, cost, errors."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import mait
from mait.cli import UserError
from mait.cost import count_macs
from mait.analysis.learned_masks import mask_locality, measure_mask_locality
from mait.learned import ConnectivityPredictor, keep_mask, kept_keys, learned_attention, reconstruction_loss
from mait.schemes import HeadKind, MaskingScheme
from mait.train import TrainConfig, build_model, load_weights, train
from mait.train.data import build_loaders


def _random_index(batch: int, heads: int, rows: int, tokens: int, kept: int, seed: int) -> torch.Tensor:
    """Distinct random kept keys per row, as a top-k would give."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, heads, rows, tokens, generator=g).topk(kept, dim=-1).indices


def _naive(q, k, v, index, prefix, mode):
    """Float64, loop over rows: softmax over kept keys (neg_inf) or with other logits set to 0 (zero)."""
    q, k, v = (t.double() for t in (q, k, v))
    batch, heads, tokens, dim = q.shape
    out = torch.empty(batch, heads, tokens, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            s = q[b, h] @ k[b, h].T / math.sqrt(dim)
            for i in range(tokens):
                row = s[i].clone()
                if i >= prefix:
                    kept = torch.zeros(tokens, dtype=torch.bool)
                    kept[index[b, h, i - prefix]] = True
                    row = row.masked_fill(~kept, float("-inf") if mode == "neg_inf" else 0.0)
                out[b, h, i] = row.softmax(-1) @ v[b, h]
    return out


SHAPES = [  # batch, heads, prefix, tokens, dim, kept
    (2, 3, 1, 17, 8, 5), (1, 2, 0, 16, 4, 1), (2, 1, 2, 26, 16, 7), (3, 2, 1, 10, 8, 9), (1, 4, 1, 50, 8, 13)]


@pytest.mark.parametrize("backend", ["dense", "gather", "auto"])
@pytest.mark.parametrize("mode", ["neg_inf", "zero"])
@pytest.mark.parametrize("shape", SHAPES)
def test_learned_attention_matches_float64_reference(shape, mode, backend):
    batch, heads, prefix, tokens, dim, kept = shape
    torch.manual_seed(sum(shape))
    q, k, v = (torch.randn(batch, heads, tokens, dim, dtype=torch.float64, requires_grad=True) * 2 for _ in range(3))
    index = _random_index(batch, heads, tokens - prefix, tokens, kept, seed=tokens)
    out = learned_attention(q, k, v, index, num_prefix_tokens=prefix, mode=mode, backend=backend)
    want = _naive(q.detach(), k.detach(), v.detach(), index, prefix, mode)
    torch.testing.assert_close(out.detach(), want, rtol=1e-10, atol=1e-10)
    # Backward against autograd through the dense float64 definition.
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    alpha = torch.zeros(heads, dtype=torch.float64)
    ref = mait.backends.reference.masked_attention(q, k, v, keep=keep_mask(index, tokens, prefix), alpha=alpha,
                                                   mode=mode)
    want_grad = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(got, want_grad):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", ["neg_inf", "zero"])
def test_float32_paths_agree(mode):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 65, 16) for _ in range(3))
    index = _random_index(2, 3, 64, 65, 17, seed=1)
    dense = learned_attention(q, k, v, index, mode=mode, backend="dense")
    gather = learned_attention(q, k, v, index, mode=mode, backend="gather")
    torch.testing.assert_close(gather, dense, rtol=1e-5, atol=1e-5)


def test_every_key_kept_is_plain_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 10, 8) for _ in range(3))
    index = torch.arange(10).expand(2, 2, 9, 10)
    for mode in ("neg_inf", "zero"):
        out = learned_attention(q, k, v, index, mode=mode)
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)


@pytest.mark.parametrize("sparse_basis", [True, False])
def test_predictor_keeps_exactly_k_per_row_and_depends_on_the_input(sparse_basis):
    torch.manual_seed(0)
    predictor = ConnectivityPredictor(head_dim=16, num_tokens=65, num_prefix_tokens=1, keep_rate=0.25,
                                      sparse_basis=sparse_basis)
    with torch.no_grad():                  # a trained predictor's scale (the init is nearly input-independent)
        predictor.proj_n.normal_()
        predictor.proj_back_n.normal_()
    q, k = torch.randn(2, 3, 65, 16), torch.randn(2, 3, 65, 16)
    _, index = predictor(q, k)
    coef = predictor.coefficients(q, k)
    approx = predictor.pruned_coefficients(coef) @ predictor.pruned_basis() if sparse_basis else \
        coef @ predictor.proj_back_n.t()
    assert approx.shape == (2, 3, 64, 65) and index.shape == (2, 3, 64, kept_keys(65, 0.25)) and index.shape[-1] == 17
    keep = keep_mask(index, 65, 1)
    assert bool((keep[:, :, 1:].sum(-1) == 17).all()) and bool(keep[:, :, 0].all())
    # The kept keys are the k largest entries of the approximate map.
    threshold = approx.gather(-1, index).amin(-1, keepdim=True)
    assert bool((approx.masked_fill(keep[:, :, 1:], float("-inf")) <= threshold).all())
    assert not torch.equal(keep[0], keep[1]), "two images must get different masks"
    assert not index.requires_grad


@pytest.mark.parametrize("keep_rate, tokens, want", [(0.25, 197, 50), (0.25, 65, 17), (1.0, 65, 65),
                                                     (0.13, 65, 9), (0.001, 65, 1), (0.5, 10, 5)])
def test_kept_keys_is_ceil(keep_rate, tokens, want):
    assert kept_keys(tokens, keep_rate) == want


def test_scheme_letter_l_round_trips():
    scheme = MaskingScheme.parse("*:hllu", depth=4, num_heads=4)
    assert scheme.layer(2) == (HeadKind.HARD, HeadKind.LEARNED, HeadKind.LEARNED, HeadKind.NONE)
    for text, heads in (("*:hllu", 4), ("*:2l", 3), ("0-1:all,2:3l", 3), ("*:llll", 4), ("0:lhu,1:1h", 3)):
        parsed = MaskingScheme.parse(text, depth=4, num_heads=heads)
        assert MaskingScheme.parse(str(parsed), depth=4, num_heads=heads) == parsed
    assert str(MaskingScheme.parse("*:2l", 4, 3)) == "*:2l"
    assert "learned" in MaskingScheme.parse("*:2l", 4, 3).describe()


@pytest.mark.parametrize("ours, theirs", [("sparsifiner_deit_tiny_224", "deit_tiny_patch16_224"),
                                          ("sparsifiner_deit_small_224", "deit_small_patch16_224")])
def test_keep_rate_one_is_exactly_the_dense_backbone(ours, theirs):
    torch.manual_seed(0)
    reference = timm.create_model(theirs).eval()
    model = timm.create_model(ours, keep_rate=1.0).eval()
    missing, unexpected = model.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected and missing and all(".attn.predictor." in key for key in missing)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
        sparse = timm.create_model(ours, keep_rate=0.25).eval()
        sparse.load_state_dict(model.state_dict())
        assert not torch.allclose(sparse(x), reference(x))


def test_pretrained_loads_a_deit_checkpoint_strictly_except_for_the_predictor(tmp_path):
    """``pretrained=True`` through timm's loader, from a local file in the DeiT hub checkpoint's format."""
    torch.manual_seed(0)
    reference = timm.create_model("deit_tiny_patch16_224").eval()
    weights = tmp_path / "deit_tiny.safetensors"
    safetensors.torch.save_file(reference.state_dict(), weights)
    model = timm.create_model("sparsifiner_deit_tiny_224", pretrained=True, keep_rate=1.0,
                              pretrained_cfg_overlay=dict(file=str(weights))).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    fine_tune = timm.create_model("sparsifiner_deit_tiny_224", pretrained=True, num_classes=10,
                                  pretrained_cfg_overlay=dict(file=str(weights)))
    torch.testing.assert_close(fine_tune.blocks[5].attn.qkv.weight, reference.blocks[5].attn.qkv.weight)
    truncated = dict(reference.state_dict())
    del truncated["blocks.3.mlp.fc1.weight"]
    safetensors.torch.save_file(truncated, tmp_path / "truncated.safetensors")
    with pytest.raises(RuntimeError, match=re.escape("blocks.3.mlp.fc1.weight")):
        timm.create_model("sparsifiner_deit_tiny_224", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "truncated.safetensors")))


def test_hybrid_model_trains_and_reports_the_reconstruction_loss():
    torch.manual_seed(0)
    model = timm.create_model("mait_nano4_8", scheme="*:hllu", keep_rate=0.25)
    assert model.blocks[0].attn.learned_index.tolist() == [1, 2]
    out = model(torch.randn(3, 1, 8, 8))
    loss = reconstruction_loss(model)
    assert loss is not None and loss.requires_grad
    assert reconstruction_loss(model) is None, "a layer's loss is handed out once"
    (out.sum() + loss).backward()
    predictor = model.blocks[0].attn.predictor
    assert predictor.proj_back_n.grad is not None and predictor.proj_c_q.weight.grad is not None
    model.eval()
    model(torch.randn(3, 1, 8, 8))
    assert reconstruction_loss(model) is None, "no reconstruction loss in eval mode"


def test_hybrid_layer_plan_is_one_plan_with_the_layers_head_numbers(caplog):
    """Fixed-mask, learned and unmasked heads are steps of one plan, logged with the layer's own head numbers."""
    torch.manual_seed(0)
    model = timm.create_model("mait_nano4_8", scheme="*:hllu", keep_rate=0.25, depth=1).eval()
    layer = model.blocks[0].attn
    with caplog.at_level(logging.DEBUG, logger="mait"), torch.no_grad():
        model(torch.randn(2, 1, 8, 8))
    plans = [r.message for r in caplog.records if r.message.startswith("MaskedAttention(hllu) plan:")]
    assert len(plans) == 1
    assert plans[0].endswith("heads 0 (h) -> matmul, heads 1-2 (ll) -> learned, heads 3 (u) -> sdpa"), plans[0]
    assert isinstance(layer.predictor, ConnectivityPredictor) and "predictor" in dict(layer.named_children())
    with pytest.raises(ValueError, match="backend 'learned' cannot run this call: it runs learned"):
        layer.backend = "learned"
        model(torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("mode", ["neg_inf", "zero"])
def test_model_modes_differ(mode):
    torch.manual_seed(0)
    model = timm.create_model("sparsifiner_nano4_8", keep_rate=0.25, mode=mode).eval()
    assert all(block.attn.predictor.mode == mode for block in model.blocks)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_reconstruction_loss_decreases_when_training_the_predictor():
    torch.manual_seed(0)
    model = timm.create_model("sparsifiner_nano4_8", keep_rate=0.25)
    x = torch.randn(16, 1, 8, 8)
    predictors = [p for n, p in model.named_parameters() if ".predictor." in n]
    optimizer = torch.optim.AdamW(predictors, lr=1e-2)
    losses = []
    for _ in range(40):
        model(x)
        loss = reconstruction_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_short_digits_run_logs_the_reconstruction_loss(tmp_path: Path):
    """mait's joint variant from scratch: one stage, each layer's own attention as the target."""
    config = TrainConfig.from_dict(dict(model="sparsifiner_nano4_8", epochs=3, warmup_epochs=1, batch_size=32,
                                        train_subset=256, val_subset=64, progress=False, lr=5e-3,
                                        output=str(tmp_path / "run")))
    with pytest.raises(UserError, match="needs a teacher.*or set reconstruction_target: self"):
        train(config)          # the released target is the dense teacher's attention
    config = TrainConfig.from_dict(dict(reconstruction_target="self", reconstruction_reduction="row_mean",
                                        reconstruction_weight=1.0, output=str(tmp_path / "run2")), base=config)
    result = train(config)
    recon = [row["train_recon_loss"] for row in result.history]
    assert recon[-1] < recon[0]
    header = (tmp_path / "run2" / "metrics.csv").read_text().splitlines()[0]
    assert "train_recon_loss" in header


def test_dense_checkpoint_loads_with_init_from_but_not_strictly(tmp_path: Path):
    dense = timm.create_model("mait_nano4_8", scheme="none")
    path = tmp_path / "dense.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(path))
    config = TrainConfig.from_dict(dict(model="sparsifiner_nano4_8"))
    model = build_model(config, build_loaders(config).info)
    with pytest.raises(UserError, match=r"predictor.*--init-from"):
        load_weights(model, path)
    report = load_weights(model, path, strict=False)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, dense.blocks[0].attn.qkv.weight)
    predictor_keys = [key for key in model.state_dict() if ".attn.predictor." in key]
    assert report.reset == [] and report.missing == predictor_keys and len(predictor_keys) == 4 * 6
    assert report.describe() == ("blocks.*.attn.predictor.proj_n, blocks.*.attn.predictor.proj_back_n, "
                                 "blocks.*.attn.predictor.proj_c_q.weight, blocks.*.attn.predictor.proj_c_q.bias, "
                                 "blocks.*.attn.predictor.proj_c_k.weight, blocks.*.attn.predictor.proj_c_k.bias "
                                 "(24 tensors) keep their initialisation (not in the checkpoint)")


def test_cost_counts_kept_pairs_and_predictor_by_hand():
    # DeiT-S at keep 0.25: T = 197, P = 1, 6 heads of d = 64, k = 50, c = 32, n = 197 // 6 = 32.
    report = count_macs(timm.create_model("sparsifiner_deit_small_224", keep_rate=0.25))
    kept_pairs = 2 * 64 * (1 * 197 + 196 * 50) * 6
    predictor = ((196 + 197) * 64 * 32 + 32 * 197 * 32 + 196 * 32 * 32 + 196 * 32 * 197) * 6
    assert report.attention_map == 12 * kept_pairs
    assert report.predictor == 12 * predictor
    dense = count_macs(timm.create_model("deit_small_patch16_224"))
    assert dense.attention_map == 12 * 2 * 197 * 197 * 384
    # Everything else (qkv, proj, MLP, patch embedding, head) is unchanged.
    assert report.macs - report.mhsa == dense.macs - dense.attention_map
    hybrid = count_macs(timm.create_model("mait_nano4_8", scheme="*:hllu", keep_rate=0.25))
    full, local = 2 * 65 * 65 * 16, 2 * 16 * (64 * (9 + 1) + 65)
    assert hybrid.attention_map == 4 * (full + local + 2 * 2 * 16 * (65 + 64 * 17))


def test_mask_locality_of_a_local_mask_is_one_and_measured_per_layer():
    keep = mait.local_mask((4, 4), 3, 1)[None, None]
    # Patch rows keep their window plus the class token: (n_i) / (n_i + 1) inside the window.
    counts = mait.neighbour_counts((4, 4), 3).flatten().double()
    want = (counts / (counts + 1)).mean().float()
    torch.testing.assert_close(mask_locality(keep, (4, 4), 3, 1), want.view(1))
    model = timm.create_model("mait_nano4_8", scheme="0:hllu", keep_rate=0.25)
    values = measure_mask_locality(model, torch.randn(4, 1, 8, 8))
    assert len(values) == 1 and values[0].shape == (2,) and bool(((values[0] > 0) & (values[0] < 1)).all())


@pytest.mark.parametrize("keep_rate", [0, -0.5, 1.5, True, "0.25"])
def test_bad_keep_rate(keep_rate):
    with pytest.raises(ValueError, match="keep_rate must lie in \\(0, 1\\]"):
        timm.create_model("sparsifiner_nano4_8", keep_rate=keep_rate)


def test_learned_heads_need_a_predictor():
    with pytest.raises(ValueError, match="connectivity predictor"):
        mait.MaskedAttention(32, 2, grid_size=4, head_kinds="lu")
    with pytest.raises(ValueError, match="connectivity predictor"):
        timm.create_model("mait_cait_xxs24_224", scheme="*:1l", img_size=32, depth=2)
    with pytest.raises(ValueError, match="connectivity predictor"):
        timm.create_model("hmait_tiny_224", scheme="*:1l", img_size=64)


def test_bad_learned_attention_calls():
    q = torch.randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match="zero kept keys"):
        learned_attention(q, q, q, torch.empty(1, 2, 9, 0, dtype=torch.long), mode="neg_inf")
    with pytest.raises(ValueError, match="mode must be one of"):
        learned_attention(q, q, q, torch.zeros(1, 2, 9, 3, dtype=torch.long), mode="soft")
    with pytest.raises(ValueError, match="index must be a long tensor"):
        learned_attention(q, q, q, torch.zeros(1, 2, 10, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="backend must be one of"):
        learned_attention(q, q, q, torch.zeros(1, 2, 9, 3, dtype=torch.long), backend="flash")
    with pytest.raises(ValueError, match="mode must be one of"):
        timm.create_model("sparsifiner_nano4_8", mode="strict")


def test_flops_cli_prints_the_mhsa_reduction(capsys):
    from mait.cli import main
    assert main(["flops", "sparsifiner_nano4_8", "--keep-rate", "0.25", "--stages-only"]) == 0
    text = capsys.readouterr().out
    report = count_macs(timm.create_model("sparsifiner_nano4_8", keep_rate=0.25))
    full = count_macs(timm.create_model("sparsifiner_nano4_8"), mask_savings=False).attention_map
    total = [line for line in text.splitlines() if line.startswith("total")][0]
    assert f"{100 * (1 - report.mhsa / full):.1f}%" in total and "blocks.3" in text


def test_show_mask_and_als_on_a_learned_checkpoint(tmp_path: Path, capsys):
    from PIL import Image
    from mait.cli import main
    from mait.train.checkpoint import save_weights
    torch.manual_seed(0)
    model = timm.create_model("sparsifiner_nano4_8", keep_rate=0.25)
    save_weights(model, tmp_path / "last.safetensors")
    TrainConfig.from_dict(dict(model="sparsifiner_nano4_8")).save(tmp_path / "config.yaml")
    Image.fromarray((torch.rand(32, 32) * 255).to(torch.uint8).numpy()).save(tmp_path / "some.png")
    checkpoint = str(tmp_path / "last.safetensors")
    assert main(["show-mask", "--checkpoint", checkpoint, "--image", str(tmp_path / "some.png"), "--layer", "3",
                 "--query", "40", "--output", str(tmp_path / "mask.png")]) == 0
    out = capsys.readouterr().out
    kept = re.findall(r"head \d: (\d+) of 64 patch keys kept", out)   # k = 17 keys, the class token may be one
    assert (tmp_path / "mask.png").is_file() and len(kept) == 4 and set(kept) <= {"16", "17"}
    assert main(["show-mask", "--checkpoint", checkpoint, "--layer", "4"]) == 2
    assert "not a learned layer" in capsys.readouterr().err
    assert main(["als", "--checkpoint", checkpoint, "--max-images", "16", "--output", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "mask_als.csv").is_file()
