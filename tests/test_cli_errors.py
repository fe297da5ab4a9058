"""Every wrong use of the command line ends in one line on stderr (exit status 2) and leaves every file
as it was; a bug keeps its traceback; Ctrl-C ends in one paragraph that says what was kept and how
to continue (exit status 130)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

import mait.train.engine as engine
from mait_cli import main
from mait_cli.options import COMMANDS

SHORT = ["--train-subset", "128", "--val-subset", "32", "--batch-size", "32", "--warmup-epochs", "0", "--no-progress"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA on a machine without it")


def _fails(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """A finished digits run (CK: its best checkpoint) and paths that are wrong in some way."""
    root = tmp_path_factory.mktemp("wrong_uses")
    assert main(["train", "--epochs", "1", "--output", str(root / "run"), *SHORT]) == 0
    (root / "a_file.txt").write_text("not a folder")
    (root / "earlier.pt2").write_bytes(b"an earlier export")
    (root / "folder").mkdir()
    return {"CK": str(root / "run" / "best.safetensors"), "LAST": str(root / "run" / "last.safetensors"),
            "RUN": str(root / "run"), "FILE": str(root / "a_file.txt"), "DIR": str(root / "folder"),
            "OLD": str(root / "earlier.pt2"), "TMP": str(root)}


# (command line, what its error says); CK, LAST, RUN, FILE, DIR, OLD and TMP are the places above.
WRONG_USES = [
    # export: never the checkpoint, never over a file without --force, the path checked before the work
    ("export --checkpoint CK --format pt2 --output CK", "--output CK is the checkpoint being exported"),
    ("export --checkpoint CK --format onnx --output CK --force", "--output CK is the checkpoint being exported"),
    ("export --checkpoint CK --format pt2 --output LAST", "--output LAST must end in .pt2"),
    ("export --checkpoint CK --format pt2 --output TMP/model.onnx", "--output TMP/model.onnx must end in .pt2"),
    ("export --checkpoint CK --format onnx --output TMP/model.pt2", "--output TMP/model.pt2 must end in .onnx"),
    ("export --checkpoint CK --format pt2 --output OLD", "--output OLD exists; give --force to replace it"),
    ("export --checkpoint CK --format pt2 --output DIR",
     "--output DIR is a folder; give a file path such as DIR/out.pt2"),
    ("export --checkpoint CK --format pt2 --output FILE/model.pt2", "lies under FILE, which is a file"),
    pytest.param("export --checkpoint CK --format pt2 --output /sys/mait.pt2",
                 "--output /sys/mait.pt2: cannot write in /sys",
                 marks=pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a folder nobody may write in")),
    ("export --checkpoint CK --format tflite", "argument --format: invalid choice: 'tflite' (choose from"),
    ("export --checkpoint TMP/missing.safetensors --format pt2", "checkpoint TMP/missing.safetensors does not exist"),
    ("export --checkpoint RUN --format pt2", "checkpoint RUN is a folder; give a .safetensors file in it"),
    ("export --checkpoint CK --format pt2 --atol -1", "argument --atol: must be 0 or more, got -1"),
    ("export --checkpoint CK --format pt2 --batch-size 0", "argument --batch-size: must be at least 1, got 0"),
    # --device: one rule in every command
    pytest.param("eval --checkpoint CK --device cuda", "device 'cuda' was asked for but CUDA is not available",
                 marks=NO_CUDA),
    pytest.param("predict --checkpoint CK FILE --device cuda", "device 'cuda' was asked for but CUDA is not",
                 marks=NO_CUDA),
    pytest.param("train --device cuda --epochs 1", "device 'cuda' was asked for but CUDA is not", marks=NO_CUDA),
    pytest.param("bench --models mait_nano4_8 --device cuda", "device 'cuda' was asked for but CUDA is not",
                 marks=NO_CUDA),
    ("eval --checkpoint CK --device gpu", "device must be auto, cpu or cuda, got 'gpu'"),
    ("predict --checkpoint CK FILE --device tpu", "device must be auto, cpu or cuda, got 'tpu'"),
    ("bench --models mait_nano4_8 --device cuda:1", "device must be auto, cpu or cuda, got 'cuda:1'"),
    # the mask size: odd, and no larger than the grid needs, in every command
    ("show-mask --mask-size 99", "--mask-size 99 is larger than the 14x14 patch grid needs (R = 27 already covers "
                                 "it, so masked heads would be unmasked); use R <= 27"),
    ("show-mask --random --grid 7x10 --mask-size 21", "larger than the 7x10 patch grid needs"),
    ("show-mask --mask-size 4", "argument --mask-size: must be an odd positive number (1, 3, 5, ...), got 4"),
    ("demo --model mait_nano4_8 --mask-size 0", "argument --mask-size: must be an odd positive number"),
    ("demo --model mait_nano4_8 --mask-size 17", "mask_size 17 is larger than the 8x8 patch grid needs"),
    ("flops mait_t24_224 --mask-size 99", "mask_size 99 is larger than the 14x14 patch grid needs"),
    ("eval --checkpoint CK --mask-size 99", "mask_size 99 is larger than the 8x8 patch grid needs"),
    ("eval --checkpoint CK --mask-size 4", "mask_size must be an odd positive integer"),
    ("als --model mait_nano4_8 --data digits --window 17", "--window 17 is larger than the 8x8 patch grid needs"),
    ("als --model mait_nano4_8 --data digits --mask-size 17", "mask_size 17 is larger than the 8x8 patch grid"),
    # sizes and counts
    ("flops deit_tiny_patch16_224 --img-size 7", "--img-size 7 is smaller than one 16x16 patch of "
                                                 "deit_tiny_patch16_224; use at least 16"),
    ("flops mait_t24_224 --img-size 100", "img_size 100 is not divisible by patch_size 16"),
    ("flops deit_tiny_patch16_224 --img-size 0", "argument --img-size: must be at least 1, got 0"),
    ("flops resnet18 --img-size 64", "model resnet18 takes no --img-size"),
    ("flops xcit_nano_12_p16_224 --scheme sch1", "mask_model cannot mask Xcit: cross-covariance attention"),
    ("demo --batch-size 0", "argument --batch-size: must be at least 1, got 0"),
    ("predict --checkpoint CK FILE --top-k 0", "argument --top-k: must be at least 1, got 0"),
    ("als --model mait_nano4_8 --max-images -1", "argument --max-images: must be at least 0, got -1"),
    ("als --model mait_nano4_8 --batch-size 0", "argument --batch-size: must be at least 1, got 0"),
    ("similarity --model mait_nano4_8 --last 1", "argument --last: must be at least 2, got 1"),
    ("alphas --model mait_nano4_8 --threshold 2", "argument --threshold: must lie in [0, 1], got 2"),
    ("search --high 1.5", "argument --high: must lie in [0, 1], got 1.5"),
    ("show-mask --grid 0", "argument --grid: expected N or HxW with positive whole numbers"),
    ("show-mask --grid 4x5 --token 20", "--token 20 is not a patch of the 4x5 grid (expected 0 to 19)"),
    ("show-mask --alpha 1.5", "argument --alpha: must lie in [0, 1], got 1.5"),
    ("show-mask --seed x", "argument --seed: invalid int value: 'x'"),
    ("eval --checkpoint CK --img-size 16", "--img-size 16 does not apply to digits, whose images are 8x8; drop it"),
    ("als --model mait_nano4_8 --data digits --img-size 7", "--img-size 7 does not apply to digits"),
    ("train --epochs 0", "epochs must be at least 1, got 0"),
    ("train --batch-size 0", "batch_size 0 must be a positive multiple of the 1 processes"),
    # output paths
    ("show-mask --output DIR", "--output DIR is a folder; give a file path such as DIR/out.png"),
    ("show-mask --output FILE/mask.png", "--output FILE/mask.png lies under FILE, which is a file"),
    ("show-mask --output TMP/mask.jpg", "--output TMP/mask.jpg must end in .png or .pdf or .svg"),
    ("train --output FILE", "--output FILE is a file; give a folder"),
    ("train --resume FILE", "--resume FILE is a file; give a folder"),
    ("search --output FILE", "--output FILE is a file; give a folder"),
    ("als --checkpoint CK --output FILE", "--output FILE is a file; give a folder"),
    ("alphas --checkpoint CK --output FILE/analysis", "--output FILE/analysis lies under FILE, which is a file"),
    # models, configs, inputs
    ("demo --model nosuchmodel", "unknown model 'nosuchmodel'; see timm.list_models"),
    ("demo --model mait_t24", "unknown model 'mait_t24' (did you mean mait_t"),
    ("demo --model deit_tiny_patch16_224", "deit_tiny_patch16_224 is not a MaiT model (it has no masking scheme)"),
    ("flops nosuchmodel", "unknown model 'nosuchmodel'"),
    ("als --model deit_tiny_patch16_224 --data digits",
     "model deit_tiny_patch16_224 cuts 16x16 patches, larger than the 8x8 images of digits; choose a model with "
     "smaller patches (mait_nano4_8 for the digits)"),
    ("train --config digitz", "config file digitz does not exist, and it names no preset"),
    ("train --in-memory maybe", "in_memory must be one of auto, true, false, got 'maybe'"),
    ("train --scale 2", "config key 'scale' expects list, got 2"),
    ("train --no-such-key 1", "unrecognized arguments: --no-such-key 1"),
    ("train --epoch-count 3", "unrecognized arguments: --epoch-count 3 (did you mean --epochs?)"),
    ("eval --checkpoint RUN", "checkpoint RUN is a folder; give a .safetensors file in it (e.g. RUN/best.safetensors"),
    ("eval --checkpoint FILE", "checkpoint FILE is not a readable safetensors file"),
    ("predict --checkpoint CK TMP/no.png", "image TMP/no.png does not exist"),
    ("predict --checkpoint CK FILE", "cannot read image FILE"),
    ("predict --checkpoint CK DIR", "folder DIR holds no images (.jpg, .jpeg, .png"),
    ("nosuchcommand", "argument COMMAND: invalid choice: 'nosuchcommand'"),
]


def _fill(text: str, places: dict[str, str]) -> str:
    for name in sorted(places, key=len, reverse=True):
        text = text.replace(name, places[name])
    return text


def _state(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with a hash of its bytes."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command_line, message", WRONG_USES)
def test_wrong_use_is_one_line_and_changes_no_file(places: dict[str, str], capsys, monkeypatch,
                                                   command_line: str, message: str) -> None:
    monkeypatch.chdir(places["TMP"])                   # a default output would land in the place watched
    before = _state(Path(places["TMP"]))
    argv = _fill(command_line, places).split()
    line = _fails(capsys, argv)
    assert line.startswith(f"mait {argv[0]}: error: " if argv[0] in COMMANDS else "mait: error: "), line
    assert _fill(message, places) in line, line
    assert _state(Path(places["TMP"])) == before


def _hide_the_export_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import onnx`` and friends fail in this test, as they do without the ``[export]`` extra."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)


EXPORT_USES = [use for use in WRONG_USES if (use.values if hasattr(use, "values") else use)[0].startswith("export ")]


@pytest.mark.parametrize("command_line, message", EXPORT_USES)
def test_wrong_export_use_reads_the_same_without_the_export_extra(places: dict[str, str], capsys, monkeypatch,
                                                                  command_line: str, message: str) -> None:
    _hide_the_export_extra(monkeypatch)
    test_wrong_use_is_one_line_and_changes_no_file(places, capsys, monkeypatch, command_line, message)


def test_onnx_export_without_the_export_extra_says_how_to_install_it(places: dict[str, str], tmp_path: Path,
                                                                     capsys, monkeypatch) -> None:
    _hide_the_export_extra(monkeypatch)
    line = _fails(capsys, ["export", "--checkpoint", places["CK"], "--format", "onnx",
                           "--output", str(tmp_path / "model.onnx")])
    assert line == ('mait export: error: ONNX export needs the onnx and onnxscript packages: '
                    'pip install -e ".[export]" in the mait checkout')
    assert list(tmp_path.iterdir()) == []


def test_a_bug_keeps_its_traceback(monkeypatch) -> None:
    import mait.commands.demo as demo

    def broken(args):
        return {}["a key that is not there"]
    monkeypatch.setattr(demo, "run", broken)
    with pytest.raises(KeyError):
        main(["demo"])


def test_debug_log_level_shows_the_traceback_of_a_user_error(capsys, monkeypatch) -> None:
    monkeypatch.setenv("MAIT_LOG_LEVEL", "debug")
    assert main(["demo", "--model", "nosuchmodel"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "UserError: unknown model" in err
    assert err.strip().splitlines()[-1].startswith("mait demo: error: unknown model 'nosuchmodel'")


def test_help_and_no_command_answer(capsys) -> None:
    assert main(["--help"]) == 0 and "show-mask" in capsys.readouterr().out
    assert main([]) == 0 and "COMMAND" in capsys.readouterr().out
    assert main(["export", "--help"]) == 0 and "--force" in capsys.readouterr().out


def test_demo_of_a_one_channel_model_feeds_it_one_channel(capsys) -> None:
    assert main(["demo", "--model", "mait_nano4_8"]) == 0
    assert "forward of (2, 1, 8, 8) -> (2, 10)" in capsys.readouterr().out


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


def test_export_replaces_a_file_only_with_force_and_only_by_a_faithful_export(places: dict[str, str], tmp_path: Path,
                                                                              capsys) -> None:
    output = tmp_path / "model.pt2"
    argv = ["export", "--checkpoint", places["CK"], "--format", "pt2", "--output", str(output)]
    assert main(argv) == 0 and f"wrote {output} (" in capsys.readouterr().out
    first = output.read_bytes()
    assert "exists; give --force to replace it" in _fails(capsys, argv)
    assert output.read_bytes() == first
    assert main([*argv, "--force"]) == 0
    assert f"wrote {output} (replaced the earlier file) (" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]      # no temporary file left behind

    pytest.importorskip("onnxscript", reason="ONNX export needs the [export] extra")
    pytest.importorskip("onnxruntime", reason="the check needs onnxruntime (the [export] extra)")
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"an earlier export")
    argv = ["export", "--checkpoint", places["CK"], "--format", "onnx", "--output", str(onnx_file), "--force"]
    line = _fails(capsys, [*argv, "--atol", "0"])      # onnxruntime's float sums differ from PyTorch's in the last bits
    assert line.startswith("mait export: error: the exported onnx program's logits differ from PyTorch's by up to ")
    assert line.endswith(f"(allowed: 0), so {onnx_file} was not written")
    assert onnx_file.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.pt2"]


def test_predict_says_which_images_it_converted(places: dict[str, str], tmp_path: Path, capsys) -> None:
    from PIL import Image
    Image.new("RGB", (640, 480), (90, 90, 90)).save(tmp_path / "photo.png")
    Image.new("L", (1, 1), 255).save(tmp_path / "dot.png")
    Image.new("L", (8, 8), 0).save(tmp_path / "digit.png")
    images = [str(tmp_path / name) for name in ("photo.png", "dot.png", "digit.png")]
    assert main(["predict", "--checkpoint", places["CK"], *images]) == 0
    captured = capsys.readouterr()
    assert captured.err == (f"mait predict: note: mait_nano4_8 takes 8x8 grey images; converted to that: "
                            f"{images[0]} (640x480 RGB), {images[1]} (1x1 grey) (--quiet hides this note)\n")
    assert len(captured.out.splitlines()) == 4
    assert main(["predict", "--checkpoint", places["CK"], *images, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["predict", "--checkpoint", places["CK"], images[2]]) == 0
    assert capsys.readouterr().err == ""
