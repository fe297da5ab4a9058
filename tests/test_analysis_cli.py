"""The analysis commands (als, similarity, alphas, show-mask, search) run on tiny models and write their files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mait import MaskingScheme
from mait.analysis import harden, read_alphas
from mait.train.runs import open_run
from mait.cli import main
from mait.search import Thresholds, assign, calibrate
from mait.train import load_config, open_data, train

TINY = {"epochs": 1, "train_subset": 64, "val_subset": 32, "warmup_epochs": 0, "progress": False}


@pytest.fixture(scope="module")
def soft_run(tmp_path_factory):
    """A one-epoch digits run of the nano model with soft heads in layer 0."""
    output = tmp_path_factory.mktemp("run") / "soft"
    result = train(load_config(None, dict(TINY, scheme="0:soft,1-3:1h", output=str(output))))
    return result.last_checkpoint


def test_als_cli_writes_table_and_heatmap(soft_run, capsys):
    assert main(["als", "--checkpoint", str(soft_run), "--max-images", "16"]) == 0
    out = capsys.readouterr().out
    folder = soft_run.parent / "analysis"
    assert "Attention Locality Score (R = 3) of mait_nano4_8" in out and "16 held-out images" in out
    assert (folder / "als.png").stat().st_size > 0 and (folder / "als.txt").is_file()
    rows = (folder / "als.csv").read_text().splitlines()
    assert rows[0] == "layer,head,value,kind" and len(rows) == 1 + 4 * 4
    values = [float(r.split(",")[2]) for r in rows[1:]]
    assert all(0.0 < v < 1.0 for v in values)


def test_similarity_cli_writes_one_heatmap_per_head(soft_run, capsys, tmp_path):
    assert main(["similarity", "--checkpoint", str(soft_run), "--max-images", "8", "--last", "3",
                 "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layers 0-3: mean similarity among the last 3 layers" in out
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [f"similarity_head{h}.png" for h in range(4)]
    rows = (tmp_path / "similarity.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 4 * 4
    diagonal = [float(r.split(",")[3]) for r in rows[1:] if r.split(",")[1] == r.split(",")[2]]
    assert np.allclose(diagonal, 1.0, atol=1e-5)


def test_alphas_cli_reads_soft_alphas_and_hardens(soft_run, capsys, tmp_path):
    assert main(["alphas", "--checkpoint", str(soft_run), "--threshold", "0.5", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    model = open_run(soft_run).model(open_data("digits")[2])
    expected = harden(model, 0.5)
    assert f"hardened at α < 0.5: {expected}" in out
    assert (tmp_path / "hardened_scheme.txt").read_text().strip() == str(expected)
    assert MaskingScheme.parse(str(expected), 4, 4) == expected
    rows = (tmp_path / "alphas.csv").read_text().splitlines()[1:]
    alphas = read_alphas(model)
    for row in rows:
        layer, head, value, kind = row.split(",")
        assert float(value) == pytest.approx(float(alphas[int(layer)][int(head)]), abs=1e-6)
        assert kind == ("s" if layer == "0" else ("h" if head == "0" else "u"))
    assert (tmp_path / "alphas.png").stat().st_size > 0


def _image_folder(root):
    for label in ("a", "b"):
        (root / "val" / label).mkdir(parents=True)
        for i in range(2):
            pixels = np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "val" / label / f"{i}.png")
    return root


def test_similarity_cli_on_hierarchical_model_goes_stage_by_stage(tmp_path, capsys):
    kwargs = "{embed_dim: 24, depths: [2, 3, 1, 1], num_heads: [1, 2, 3, 3], masked_heads: [1, 1, 1, 0]}"
    assert main(["similarity", "--model", "hmait_tiny_224", "--img-size", "64", "--model-kwargs", kwargs,
                 "--data", str(_image_folder(tmp_path)), "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    # stages 0 (layers 0-1) and 1 (2-4) are compared; stages 2 and 3 have one layer each and the same
    # head count, but different grids, so they are not comparable
    assert "layers 0-1: mean similarity among the last 2 layers" in out and "layers 2-4:" in out
    assert "layers 5-6" not in out
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names == ["similarity_layers0-1_head0.png"] + [f"similarity_layers2-4_head{h}.png" for h in range(2)]


def test_als_cli_on_plain_timm_model_without_checkpoint(tmp_path, capsys):
    _image_folder(tmp_path)
    assert main(["als", "--model", "vit_tiny_patch16_224", "--data", str(tmp_path), "--max-images", "0",
                 "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "4 held-out images" in out and "(H hard-masked" not in out   # a plain model has no kinds
    assert len((tmp_path / "out" / "als.csv").read_text().splitlines()) == 1 + 12 * 3


def test_show_mask_cli(tmp_path, capsys):
    path = tmp_path / "mask.png"
    assert main(["show-mask", "--grid", "14", "--mask-size", "3", "--token", "16", "--output", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    grid = [line.split() for line in lines if set(line.replace(" ", "")) <= set("#.*") and line.strip()]
    assert len(grid) == 14 and grid[1][2] == "*"
    kept = {(i, j) for i, row in enumerate(grid) for j, c in enumerate(row) if c in "#*"}
    assert kept == {(i, j) for i in range(3) for j in range(1, 4)}
    assert path.stat().st_size > 0
    assert main(["show-mask", "--grid", "4x5", "--token", "20"]) == 2
    assert "--token 20 is not a patch of the 4x5 grid" in capsys.readouterr().err


def test_search_end_to_end(tmp_path, capsys):
    output = tmp_path / "search"
    # thresholds low enough that a barely trained model's layers all take the all-heads branch and calibrate
    args = ["search", "--output", str(output), "--high", "0.05", "--low", "0.05", "--als-images", "32"]
    for key, value in TINY.items():
        args += [f"--{key.replace('_', '-')}", str(value)] if key != "progress" else ["--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    summary = json.loads((output / "search.json").read_text())
    for name in ("sch1", "assigned"):
        assert all((output / f"als_{name}.{ext}").is_file() for ext in ("txt", "csv", "png"))
    assert (output / "step1-sch1" / "last.safetensors").is_file()
    thresholds = Thresholds(high=0.05, low=0.05)
    assignment = assign(summary["als"]["sch1"], thresholds)
    assert summary["decisions"] == list(assignment.decisions) == ["all"] * 4
    expected = calibrate(assignment, summary["als"]["assigned"], thresholds)
    assert summary["scheme"] == str(expected) == (output / "scheme.txt").read_text().strip()
    assert f"searched scheme: {expected}" in out
    assert main(args) == 2          # the folder now holds a search
    assert "already holds a search" in capsys.readouterr().err


def test_search_calibrates_from_the_initial_run_and_retrains(tmp_path, capsys):
    output = tmp_path / "search"
    args = ["search", "--output", str(output), "--high", "0.05", "--low", "0.05", "--calibration", "initial",
            "--retrain-epochs", "1", "--als-images", "32", "--epochs", "1", "--train-subset", "64",
            "--val-subset", "32", "--warmup-epochs", "0", "--no-progress"]
    assert main(args) == 0
    summary = json.loads((output / "search.json").read_text())
    assert set(summary["als"]) == {"sch1", "final"} and not (output / "step2-assigned").exists()
    thresholds = Thresholds(high=0.05, low=0.05)
    expected = calibrate(assign(summary["als"]["sch1"], thresholds), summary["als"]["sch1"], thresholds)
    assert summary["scheme"] == str(expected)
    assert load_config(output / "step3-final" / "config.yaml").scheme == str(expected)
    assert set(summary["accuracy"]) == {"sch1", "final"}
    assert (output / "als_final.png").is_file()
