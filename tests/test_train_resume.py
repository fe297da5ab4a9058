"""Kill a training run with SIGKILL mid-epoch, resume it, and get the uninterrupted run's weights."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

# 10 steps per epoch, a checkpoint every 3 steps; drop path makes the RNG state matter.
ARGS = ["--model-kwargs", "{depth: 2, embed_dim: 32}", "--epochs", "3", "--batch-size", "32", "--train-subset", "320",
        "--val-subset", "60", "--warmup-epochs", "1", "--drop-path", "0.2", "--deterministic",
        "--checkpoint-every", "3", "--no-progress"]
STEPS_PER_EPOCH = 10
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _train(*extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mait", "train", *extra], env=ENV, **popen)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def _state(path: Path):
    try:
        return torch.load(path, weights_only=False)
    except (OSError, EOFError, RuntimeError):   # not there yet
        return None


def _resume(folder: Path, expect: str) -> None:
    proc = _train("--resume", str(folder), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert expect in out


def _assert_same_run(full: Path, other: Path) -> None:
    want, got = load_file(str(full / "last.safetensors")), load_file(str(other / "last.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=f"{other.name}: {key}")
    for a, b in zip(_rows(full), _rows(other), strict=True):
        for key in ("train_loss", "val_loss", "val_acc1"):
            assert abs(float(a[key]) - float(b[key])) <= 1e-6, (other.name, key, a, b)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    """One kill, three resumes: as left; with last.safetensors lagging behind the state (a kill between the
    two writes, which the state survives because it holds the weights); and from a state of the earlier
    layout without weights, which resumes from last.safetensors."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    reference = _train(*ARGS, "--output", str(full), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = _train(*ARGS, "--output", str(killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while True:   # kill as soon as a checkpoint inside the second epoch exists
        state = _state(killed / "last.state.pt") if (killed / "last.state.pt").exists() else None
        if state is not None and state["epoch"] >= 1 and state["step"] > 0:
            break
        assert victim.poll() is None, f"the run ended before it could be killed: {victim.communicate()[1]}"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    state = torch.load(killed / "last.state.pt", weights_only=False)
    assert state["epoch"] < 3 and 0 < state["step"] < STEPS_PER_EPOCH, "the kill must leave a mid-epoch checkpoint"

    lagging, legacy = tmp_path / "lagging", tmp_path / "legacy"
    shutil.copytree(killed, lagging)
    stale = {key: torch.zeros_like(value) for key, value in load_file(str(killed / "last.safetensors")).items()}
    save_file(stale, str(lagging / "last.safetensors"))
    shutil.copytree(killed, legacy)
    save_file(state["model"], str(legacy / "last.safetensors"))
    torch.save({key: value for key, value in state.items() if key != "model"}, legacy / "last.state.pt")

    where = f"at epoch {state['epoch'] + 1}, step {state['step']}/{STEPS_PER_EPOCH}"
    for folder in (killed, lagging, legacy):
        _resume(folder, f"resuming {folder} {where}")
    _finish(reference)
    for folder in (killed, lagging, legacy):
        _assert_same_run(full, folder)


def test_a_second_process_training_into_the_same_folder_is_refused(tmp_path: Path) -> None:
    """While a run holds its output folder, another `mait train` into it (a second study runner, a resume
    started twice) gets a one-line error naming the holder, and nothing of the first run is touched."""
    from mait.train.checkpoint import training_lock
    folder = tmp_path / "run"
    with training_lock(folder):
        proc = subprocess.run([sys.executable, "-m", "mait", "train", "--output", str(folder), "--epochs", "1"],
                              env=ENV, capture_output=True, text=True, timeout=120)
        assert sorted(p.name for p in folder.iterdir()) == [".lock"]
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert f"{folder} is being trained into by process {os.getpid()}" in proc.stderr
    assert not folder.exists(), "the holder leaves no lock behind, nor the folder it made for nothing"
    with training_lock(folder):        # the folder can be taken again
        (folder / "metrics.csv").write_text("epoch\n")
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.csv"]


def test_a_corrupt_state_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "last.state.pt").write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "mait", "train", "--resume", str(tmp_path)], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "last.state.pt is not a readable training state" in proc.stderr


def test_resume_without_checkpoint_is_one_line_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "mait", "train", "--resume", str(tmp_path)], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "no checkpoint there" in proc.stderr and str(tmp_path) in proc.stderr


def test_resume_accepts_the_same_folder_spelled_differently(tmp_path: Path) -> None:
    """`--resume DIR --output DIR` (relative vs absolute) is one folder; another --output is refused."""
    same = os.path.relpath(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "mait", "train", "--resume", str(tmp_path), "--output", same],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no checkpoint there" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "mait", "train", "--resume", str(tmp_path), "--output",
                           str(tmp_path / "other")], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "drop --output" in proc.stderr, proc.stderr
