"""``mait bench``: runs end to end on tiny settings and writes its JSON/CSV/PNG (no timing asserts)."""

from __future__ import annotations

import json

import pytest
import torch

from mait.cli import main
from mait.benchmarking import parse_spec, peak_extra_memory


def test_attention_sweep_writes_results(tmp_path, capsys):
    prefix = tmp_path / "attention"
    assert main(["bench", "--attention", "--grids", "3", "6", "--heads", "2", "--head-dim", "4", "--batch-size", "1",
                 "--warmup", "0", "--repeats", "1", "--out", str(prefix)]) == 0
    rows = json.loads(prefix.with_suffix(".json").read_text())["rows"]
    assert [row["tokens"] for row in rows] == [10, 37]
    assert all(row[f"{m}_ms"] > 0 for row in rows for m in ("dense", "linear", "auto", "sdpa"))
    assert prefix.with_suffix(".csv").read_text().startswith("grid,tokens,")
    assert prefix.with_suffix(".png").stat().st_size > 0
    assert "auto/best" in capsys.readouterr().out


def test_attention_sweep_skips_dense_above_memory_limit(capsys):
    assert main(["bench", "--attention", "--grids", "4", "--max-dense-gib", "0", "--repeats", "1", "--warmup", "0",
                 "--no-memory", "--train"]) == 0
    assert "skipped" in capsys.readouterr().out


def test_model_bench_ratios(tmp_path, capsys):
    prefix = tmp_path / "models"
    specs = ["mait_t24_224:depth=1,img_size=32", "mait_t24_224:depth=1,img_size=32,scheme=none"]
    assert main(["bench", "--models", *specs, "--baseline", specs[1], "--batch-size", "2", "--warmup", "0",
                 "--repeats", "1", "--train", "--out", str(prefix)]) == 0
    result = json.loads(prefix.with_suffix(".json").read_text())
    assert result["mode"] == "train" and result["baseline"] == specs[1]
    assert [row["ratio"] for row in result["rows"]][1] == 1.0
    assert "images/s" in capsys.readouterr().out


def test_parse_spec_and_errors(capsys):
    assert parse_spec("mait_t24_224:scheme=sch1,mask_size=5,drop_rate=0.1") == (
        "mait_t24_224", {"scheme": "sch1", "mask_size": 5, "drop_rate": 0.1})
    assert main(["bench", "--models", "mait_t24_224:scheme"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert main(["bench", "--models", "nope_model"]) == 2
    assert main(["bench", "--models", "mait_t24_224", "--baseline", "other"]) == 2
    assert "--baseline" in capsys.readouterr().err


def test_peak_memory_counts_temporaries():
    x = torch.ones(256, 256)
    peak = peak_extra_memory(lambda: (x @ x).exp().sum(), torch.device("cpu"))
    assert peak >= 2 * 256 * 256 * 4          # the product and its exp are alive together


def test_gpu_check_script_runs_its_smoke_mode(capsys):
    """``benchmarks/gpu.sh --smoke``: the GPU check's correctness part runs on the CPU and passes."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--smoke", "--skip", "attention", "models", "train"]) == 0
    out = capsys.readouterr().out
    assert "correctness: 8 of 8 checks within tolerance" in out and "backend=flex" in out and "backend=matmul" in out
