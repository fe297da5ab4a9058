"""Every wrong use of the command line ends in one sentence (exit status 2), Ctrl-C in one
paragraph that says what was kept and how to continue (exit status 130)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mait.train.engine as engine
from mait.cli import main

SHORT = ["--train-subset", "128", "--val-subset", "32", "--batch-size", "32", "--warmup-epochs", "0", "--no-progress"]


def _fails(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_demo_of_a_one_channel_model_feeds_it_one_channel(capsys) -> None:
    assert main(["demo", "--model", "mait_nano4_8"]) == 0
    assert "forward of (2, 1, 8, 8) -> (2, 10)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["demo", "--model", "nosuchmodel"], "mait demo: error: unknown model 'nosuchmodel'; see timm.list_models"),
    (["demo", "--model", "mait_t24"], "mait demo: error: unknown model 'mait_t24' (did you mean mait_t"),
    (["demo", "--batch-size", "0"], "mait demo: error: --batch-size must be at least 1, got 0"),
    (["demo", "--model", "deit_tiny_patch16_224"],
     "mait demo: error: deit_tiny_patch16_224 is not a MaiT model (it takes no scheme or mask size)"),
    (["als", "--model", "deit_tiny_patch16_224", "--data", "digits"],
     "mait als: error: model deit_tiny_patch16_224 cuts 16x16 patches, larger than the 8x8 images of digits; "
     "choose a model with smaller patches (mait_nano4_8 for the digits)"),
    (["als", "--model", "mait_nano4_8", "--batch-size", "0"], "mait als: error: --batch-size must be at least 1, got 0"),
    (["flops", "nosuchmodel"], "mait flops: error: unknown model 'nosuchmodel'"),
    (["train", "--config", "digitz"], "mait train: error: config file digitz does not exist, and it names no preset"),
])
def test_wrong_use_is_one_sentence(capsys, argv: list[str], message: str) -> None:
    assert _fails(capsys, argv).startswith(message)


def test_checkpoint_errors(tmp_path: Path, capsys) -> None:
    assert _fails(capsys, ["eval", "--checkpoint", str(tmp_path)]) == (
        f"mait eval: error: checkpoint {tmp_path} is a folder; give a .safetensors file in it "
        f"(e.g. {tmp_path / 'best.safetensors'} or {tmp_path / 'last.safetensors'})")
    missing = tmp_path / "nothing.safetensors"
    for command, extra in (("eval", []), ("export", ["--format", "pt2"])):
        assert _fails(capsys, [command, "--checkpoint", str(missing), *extra]) == \
            f"mait {command}: error: checkpoint {missing} does not exist"
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not weights")
    assert "is not a readable safetensors file" in _fails(capsys, ["eval", "--checkpoint", str(junk)])


def test_predict_errors(tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "w.safetensors"            # never read: the images are checked first
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert _fails(capsys, ["predict", "--checkpoint", str(checkpoint), str(tmp_path / "no.png")]) == \
        f"mait predict: error: image {tmp_path / 'no.png'} does not exist"
    (tmp_path / "empty").mkdir()
    assert _fails(capsys, ["predict", "--checkpoint", str(checkpoint), str(tmp_path / "empty")]).startswith(
        f"mait predict: error: folder {tmp_path / 'empty'} holds no images (.jpg, .jpeg, .png")
    assert _fails(capsys, ["predict", "--checkpoint", str(checkpoint), str(bad), "--top-k", "0"]) == \
        "mait predict: error: --top-k must be at least 1, got 0"


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """Ctrl-C at the ``call``-th end of an epoch (before its checkpoint is written)."""
    original, calls = engine._end_epoch, []

    def end_epoch(run, log):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        original(run, log)
    monkeypatch.setattr(engine, "_end_epoch", end_epoch)


def test_ctrl_c_in_train_says_where_the_checkpoint_is(tmp_path: Path, capsys, monkeypatch) -> None:
    run = tmp_path / "run"
    argv = ["train", "--epochs", "2", "--output", str(run), *SHORT]
    _interrupt_at(monkeypatch, 2)
    assert main(argv) == 130
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"training mait_nano4_8 on digits; output folder: {run}"
    assert err.strip() == (f"mait train: interrupted in epoch 2/2 (step 4/4); the last checkpoint (after epoch 1) is "
                           f"{run / 'last.safetensors'}; continue with: mait train --resume {run}")
    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run} at epoch 2, step 0/4" in out and "finished in" in out
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{run} has finished all 2 epochs: nothing left to do (give --epochs above 2")


def test_ctrl_c_before_the_first_checkpoint(tmp_path: Path, capsys, monkeypatch) -> None:
    run = tmp_path / "run"
    _interrupt_at(monkeypatch, 1)
    assert main(["train", "--epochs", "2", "--output", str(run), *SHORT]) == 130
    assert capsys.readouterr().err.strip() == (
        f"mait train: interrupted in epoch 1/2 (step 4/4) before the first checkpoint; nothing to resume in {run} "
        f"(checkpoints are written at the end of each epoch, or every --checkpoint-every steps)")
    monkeypatch.undo()
    assert main(["train", "--epochs", "1", "--output", str(run), *SHORT]) == 0    # the same folder starts afresh


def test_ctrl_c_in_search_and_its_resume(tmp_path: Path, capsys, monkeypatch) -> None:
    output = tmp_path / "search"
    argv = ["search", "--output", str(output), "--epochs", "2", "--high", "0.05", "--low", "0.05",
            "--calibration", "initial", "--als-images", "32", *SHORT]
    _interrupt_at(monkeypatch, 2)
    assert main(argv) == 130
    assert capsys.readouterr().err.strip() == (
        f"mait search: search interrupted while training step1-sch1 (its last checkpoint is "
        f"{output / 'step1-sch1' / 'last.safetensors'}); continue the search with the same options plus "
        f"--resume --output {output}")
    monkeypatch.undo()
    assert "already holds a search; continue it with --resume" in _fails(capsys, argv)
    assert main([*argv, "--resume"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert json.loads((output / "search.json").read_text())["epochs"] == 2
