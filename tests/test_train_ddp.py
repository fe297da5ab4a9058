"""Two processes under torchrun (gloo, CPU) train like one process with the same global batch."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# Drop path draws per-rank random numbers, so the equivalence holds only without it.
ARGS = ["train", "--model-kwargs", "{depth: 2, embed_dim: 32}", "--epochs", "2", "--batch-size", "16", "--train-subset", "320",
        "--val-subset", "101", "--warmup-epochs", "1", "--no-progress", "--seed", "3", "--drop-path", "0"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.Popen([sys.executable, "-m", "mait", *ARGS, "--output", str(one)], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pair = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "mait", *ARGS, "--output", str(two)], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert pair.returncode == 0, pair.stderr[-3000:]
    _, err = single.communicate(timeout=600)
    assert single.returncode == 0, err
    assert pair.stdout.count("finished in") == 1, "only rank 0 prints the summary"
    rows_one, rows_two = _rows(one), _rows(two)
    assert len(rows_one) == len(rows_two) == 2
    for a, b in zip(rows_one, rows_two):
        for key in ("train_loss", "val_loss"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=1e-5), (key, a, b)
        assert float(b["val_acc1"]) == pytest.approx(float(a["val_acc1"]), abs=1.0)   # at most one image in 101
    want, got = load_file(str(one / "last.safetensors")), load_file(str(two / "last.safetensors"))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-4, msg=key)
    assert not list(two.glob("*.rank*")), "only rank 0 writes files"
