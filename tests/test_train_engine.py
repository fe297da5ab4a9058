"""The training engine and ``mait eval``: outputs of a run, evaluation, fine-tuning, distillation, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import mait  # noqa: F401
from mait.errors import UserError
from mait.train import TrainConfig, build_loaders, build_model, evaluate, load_config, load_weights, save_weights, train
from mait.train.objectives import Objective, build_teacher

TINY = {"model_kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 2}, "epochs": 2, "batch_size": 32,
        "train_subset": 128, "val_subset": 64, "warmup_epochs": 1, "progress": False}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mait", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory):
    output = tmp_path_factory.mktemp("digits") / "run"
    config = TrainConfig.from_dict(dict(TINY, output=str(output)))
    return config, train(config)


def test_a_run_writes_checkpoints_logs_and_curves(digits_run) -> None:
    config, result = digits_run
    out = result.output
    for name in ("last.safetensors", "best.safetensors", "last.state.pt", "config.yaml", "metrics.csv", "curves.png"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(out.glob(".*tmp*")), "temporary files are renamed into place"
    assert load_config(out / "config.yaml") == config
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 3
    assert result.best_acc1 == max(row["val_acc1"] for row in result.history)
    assert result.final_acc1 == result.history[-1]["val_acc1"]


def test_evaluate_matches_a_direct_count(digits_run) -> None:
    config, result = digits_run
    loaders = build_loaders(config)
    model = build_model(config, loaders.info)
    load_weights(model, result.last_checkpoint)
    metrics = evaluate(model, loaders.val)
    images, labels = zip(*[loaders.val.dataset[i] for i in range(len(loaders.val.dataset))])
    with torch.no_grad():
        logits = model.eval()(torch.stack(images)).double()
    labels = torch.tensor(labels)
    assert metrics["images"] == len(labels) == 64
    assert metrics["acc1"] == pytest.approx(100 * (logits.argmax(1) == labels).double().mean().item())
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).double().mean().item()
    assert metrics["acc5"] == pytest.approx(100 * top5)
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert metrics["acc1"] == pytest.approx(result.final_acc1)


def test_eval_cli_prints_metrics_of_the_checkpoint(digits_run) -> None:
    _, result = digits_run
    proc = _cli("eval", "--checkpoint", str(result.last_checkpoint), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"top-1 {result.final_acc1:.2f} %" in proc.stdout
    assert "top-5" in proc.stdout and "loss" in proc.stdout and "images/s" in proc.stdout


def test_eval_cli_rejects_a_checkpoint_of_another_model(digits_run, tmp_path: Path) -> None:
    _, result = digits_run
    proc = _cli("eval", "--checkpoint", str(result.last_checkpoint), "--config", str(result.output / "config.yaml"),
                "--model-kwargs", "{depth: 2, embed_dim: 16, num_heads: 2}")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "does not fit this model" in proc.stderr and "blocks.1." in proc.stderr
    proc = _cli("eval", "--checkpoint", str(tmp_path / "none.safetensors"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_an_existing_run_is_not_overwritten(digits_run) -> None:
    config, _ = digits_run
    with pytest.raises(UserError, match="already holds a run; continue it with --resume"):
        train(config)


def _rgb_tree(root: Path, classes: int) -> None:
    rng = np.random.default_rng(classes)
    for split, count in (("train", 6), ("val", 2)):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / f"c{c}" / f"{i}.png")


def test_fine_tuning_to_another_class_count_resets_the_head(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _rgb_tree(tmp_path / "three", 3)
    _rgb_tree(tmp_path / "two", 2)
    common = dict(TINY, epochs=1, batch_size=6, train_subset=0, val_subset=0)
    first = train(TrainConfig.from_dict(dict(common, data=str(tmp_path / "three"), output=str(tmp_path / "a"))))
    capsys.readouterr()
    second = TrainConfig.from_dict(dict(common, data=str(tmp_path / "two"), output=str(tmp_path / "b"), lr=0.0,
                                        warmup_lr=0.0, min_lr=0.0, init_from=str(first.last_checkpoint)))
    train(second)
    assert "head.weight, head.bias start fresh" in capsys.readouterr().out
    before = safetensors_load(first.last_checkpoint)
    after = safetensors_load(tmp_path / "b" / "last.safetensors")
    assert after["head.weight"].shape == (2, 16) and before["head.weight"].shape == (3, 16)
    for key in before:
        if not key.startswith("head."):
            torch.testing.assert_close(after[key], before[key], msg=key)   # lr 0: the loaded weights stay


def safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


def test_load_weights_reports_mismatched_keys(tmp_path: Path) -> None:
    small = timm.create_model("mait_nano4_8", depth=1)
    save_weights(small, tmp_path / "small.safetensors")
    other = timm.create_model("mait_nano4_8", depth=1, embed_dim=32, num_heads=2)
    with pytest.raises(UserError, match=r"shape mismatch: .*\(64,\) vs \(32,\)"):
        load_weights(other, tmp_path / "small.safetensors")
    hmait = timm.create_model("hmait_tiny_224", img_size=32, depths=(1, 1, 1, 1), num_classes=3)
    save_weights(hmait, tmp_path / "hmait.safetensors")
    fresh = timm.create_model("hmait_tiny_224", img_size=32, depths=(1, 1, 1, 1), num_classes=5)
    report = load_weights(fresh, tmp_path / "hmait.safetensors", allow_head_reset=True)
    assert report.reset == ["head.fc.weight", "head.fc.bias"] and report.missing == []
    assert report.describe() == "head.fc.weight, head.fc.bias start fresh (another class count)"
    bigger = timm.create_model("mait_nano4_8", depth=2)
    with pytest.raises(UserError, match=r"missing: blocks\.1\."):
        load_weights(bigger, tmp_path / "small.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_weights(small, tmp_path / "junk.safetensors")


def _hard_distillation(teacher: nn.Module, alpha: float, model: nn.Module) -> Objective:
    return Objective({"ce": 1 - alpha, "hard_distillation": alpha}, nn.CrossEntropyLoss(), teacher, model)


def test_distillation_loss_is_deit_hard_distillation() -> None:
    torch.manual_seed(0)
    teacher = nn.Linear(5, 4)
    images, targets = torch.randn(6, 5), torch.randint(0, 4, (6,))
    cls_out, dist_out = torch.randn(6, 4), torch.randn(6, 4)
    loss, recon = _hard_distillation(teacher, 0.3, nn.Identity())(nn.Identity(), images, (cls_out, dist_out), targets)
    assert recon is None
    want = 0.7 * F.cross_entropy(cls_out, targets) + 0.3 * F.cross_entropy(dist_out, teacher(images).argmax(1))
    torch.testing.assert_close(loss, want)


def test_distillation_run_and_averaged_heads_at_eval(digits_run, tmp_path: Path) -> None:
    _, teacher_run = digits_run
    student = {"depth": 1, "embed_dim": 24, "num_heads": 3, "img_size": 8, "patch_size": 1}
    config = TrainConfig.from_dict(dict(TINY, epochs=1, model="mait_xt24_distilled_224", model_kwargs=student,
                                        teacher="mait_nano4_8", teacher_checkpoint=str(teacher_run.last_checkpoint),
                                        output=str(tmp_path / "student")))
    # the teacher is built with the teacher run's own shape
    config = TrainConfig.from_dict({"teacher_checkpoint": str(teacher_run.last_checkpoint)}, base=config)
    with pytest.raises(UserError, match="does not fit this model"):
        train(config)   # teacher mait_nano4_8 at its default depth 4 does not match the depth-1 teacher run
    good_teacher = timm.create_model("mait_nano4_8")
    save_weights(good_teacher, tmp_path / "teacher.safetensors")
    config = TrainConfig.from_dict({"teacher_checkpoint": str(tmp_path / "teacher.safetensors"),
                                    "output": str(tmp_path / "student2")}, base=config)
    result = train(config)
    assert len(result.history) == 1 and result.history[0]["train_loss"] > 0
    model = build_model(config, build_loaders(config).info).eval()
    load_weights(model, result.last_checkpoint)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        features = model.forward_features(x)
        cls_logits, dist_logits = model.head(features[:, 0]), model.head_dist(features[:, 1])
        torch.testing.assert_close(model(x), (cls_logits + dist_logits) / 2)


def test_teacher_without_a_distillation_token_distils_into_the_class_head(tmp_path: Path) -> None:
    teacher = train(TrainConfig.from_dict(dict(TINY, epochs=1, output=str(tmp_path / "teacher"))))
    config = TrainConfig.from_dict(dict(TINY, epochs=1, teacher="mait_nano4_8", output=str(tmp_path / "r"),
                                        teacher_checkpoint=str(teacher.last_checkpoint),
                                        teacher_kwargs=TINY["model_kwargs"]))
    torch.manual_seed(0)
    info = build_loaders(config).info
    student, teacher_model = build_model(config, info).eval(), build_teacher(config, info)
    images, targets = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    loss, _ = _hard_distillation(teacher_model, 0.5, student)(student, images, student(images), targets)
    logits = student(images)
    want = 0.5 * F.cross_entropy(logits, targets) + 0.5 * F.cross_entropy(logits, teacher_model(images).argmax(1))
    torch.testing.assert_close(loss, want)
    assert train(config).final_acc1 >= 0
