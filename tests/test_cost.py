"""Cost accounting reproduces the paper's figures (§4.1, §5.4, Tables 1, 6, 7)."""

from __future__ import annotations

import pytest
import timm
import torch.nn as nn

import mait  # noqa: F401  (registers the models)
from mait.cost import attention_map_macs, block_macs, count_macs


def test_full_attention_block_of_3136_tokens():
    total, attn_map = block_macs(3136, 96, num_heads=3)
    assert abs(total / 1e9 - 2.23) < 0.01              # 2.235 G; the paper prints 2.23
    assert round(100 * attn_map / total, 1) == 84.5


def test_masked_block_of_3136_tokens():
    total, attn_map = block_macs(3136, 96, num_heads=3, masked_heads=3, mask_size=3)
    assert round(total / 1e9, 2) == 0.35
    full_map = attention_map_macs(3136, 96)
    assert round(100 * (1 - attn_map / full_map), 1) == 99.7        # "reduces to 9/3136 or 0.3 %"
    assert round(100 * (1 - total / block_macs(3136, 96)[0]), 1) == 84.2


def test_table1_formulas():
    n, d, r = 196, 192, 3
    assert attention_map_macs(n, d, num_heads=3) == 2 * n * n * d
    assert attention_map_macs(n, d, num_heads=3, masked_heads=3, mask_size=r) == 2 * r * r * n * d
    # prefix rows are dense, patch rows see R² neighbours plus the prefix tokens
    assert attention_map_macs(197, d, num_heads=1, masked_heads=1, num_prefix_tokens=1) == 2 * d * (196 * 10 + 197)


def test_linear_and_conv_counting_on_a_toy_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Flatten(2), nn.Linear(4, 5))
    model.pretrained_cfg = {"input_size": (3, 8, 8)}
    report = count_macs(model)
    assert report.macs == 8 * 2 * 2 * 3 * 16 + 8 * 4 * 5
    assert report.params == sum(p.numel() for p in model.parameters())


def _gmacs(name: str, **kwargs) -> tuple[float, float]:
    report = count_macs(timm.create_model(name, **kwargs), name=name)
    return report.macs / 1e9, report.params / 1e6


@pytest.mark.parametrize("name,params,gflops", [
    ("deit_tiny_patch16_224", 5.7, 1.3),          # the paper's FLOPs are MACs: DeiT-T = 1.3 G
    ("swin_tiny_patch4_window7_224", 28.3, 4.5),
    ("mait_xt24_224", 6.3, 1.5),                   # Table 7
    ("mait_t24_224", 11, 2.5),
    ("mait_xs24_224", 24.5, 5.3),
    ("mait_s24_224", 43.3, 9.1),
    ("mait_cait_xxs24_224", 12, 2.5),
    ("mait_cait_s24_224", 46.9, 9.4),
    ("hmait_tiny_224", 29, 4.5),
    ("hmait_small_224", 50, 8.9),
])
def test_paper_gflops(name, params, gflops):
    got_gmacs, got_params = _gmacs(name)
    assert abs(got_gmacs / gflops - 1) <= 0.05, (name, got_gmacs)
    assert abs(got_params / params - 1) <= 0.03, (name, got_params)


@pytest.mark.parametrize("name,gflops", [("mait_xs24_224", 5.3), ("mait_s24_224", 9.1)])
def test_table7_counts_masked_heads_dense(name, gflops):
    """Table 7's monolithic figures match to 1 % when masked heads are counted at full cost."""
    report = count_macs(timm.create_model(name), mask_savings=False)
    assert abs(report.macs / 1e9 / gflops - 1) <= 0.01, report.macs


def test_hmait_stage_reductions():
    """§5.4: masking every head cuts the attention-map cost of stages 1 and 2 by 99.7 % and 98.9 %."""
    dense = {s.name: s for s in count_macs(timm.create_model("hmait_tiny_224", scheme="none")).stages()}
    masked = {s.name: s for s in count_macs(timm.create_model("hmait_tiny_224")).stages()}
    cut = {name: 100 * (1 - masked[name].attention_map / dense[name].attention_map) for name in ("layers.0", "layers.1")}
    assert round(cut["layers.0"], 1) == 99.7 and round(cut["layers.1"], 1) == 98.9
    assert masked["layers.3"].attention_map == dense["layers.3"].attention_map   # stage 4 is unmasked
    assert round(100 * dense["layers.0"].attention_map / dense["layers.0"].macs, 1) == 84.5


def test_report_table_lists_stages_and_layers():
    report = count_macs(timm.create_model("hmait_tiny_224", img_size=64), name="hmait_tiny_224")
    table = report.table()
    assert table.startswith("hmait_tiny_224 @ 3x64x64")
    assert "layers.2.blocks.5" in table and "layers.3.downsample" in table
    assert report.input_size == (3, 64, 64)
    assert sum(s.macs for s in report.stages()) == report.macs


def test_flops_command(capsys):
    from mait.cli import main
    assert main(["flops", "hmait_tiny_224", "--img-size", "64", "--stages-only"]) == 0
    out = capsys.readouterr().out
    assert "hmait_tiny_224 @ 3x64x64" in out and "layers.3" in out and "layers.3.blocks" not in out
    assert main(["flops", "no_such_model"]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err
