"""Self-describing checkpoints: the card in the safetensors metadata rebuilds and feeds the model
without config.yaml; `mait predict` and `mait export` on top of it."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

import mait  # noqa: F401
from mait.cli import main
from mait.commands.export import export_onnx, export_pt2, run_exported, set_backend
from mait.train import load_config, open_data, train
from mait.train import build_model
from mait.train.card import CheckpointMismatch, ModelCard, make_card, read_card
from mait.train.data import build_transforms
from mait.train.runs import open_run

TINY = {"epochs": 2, "train_subset": 256, "val_subset": 64, "warmup_epochs": 0, "progress": False, "lr": 3e-3}


@pytest.fixture(scope="module")
def unmasked_run(tmp_path_factory) -> Path:
    """A short digits run with no masked head (the nano model's own default is Sch.1)."""
    output = tmp_path_factory.mktemp("run") / "none"
    return train(load_config(None, dict(TINY, scheme="none", output=str(output)))).best_checkpoint


def _copy_away(checkpoint: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(checkpoint, folder / checkpoint.name))


def _eval_metrics(capsys, *argv: str) -> str:
    """The line `mait eval` prints, without its images/s."""
    assert main(["eval", *argv, "--no-progress"]) == 0
    return capsys.readouterr().out.strip().splitlines()[-1].rsplit("  ", 1)[0]


def test_card_records_model_scheme_input_and_class_names(unmasked_run: Path) -> None:
    card = read_card(unmasked_run)
    assert (card.model, card.scheme, card.mask_size, card.img_size, card.in_chans, card.num_classes) == \
        ("mait_nano4_8", "none", 3, 8, 1, 10)
    assert card.class_names == tuple("0123456789") and card.data == "digits"
    assert card.mean == pytest.approx((0.3053,)) and card.std == pytest.approx((0.3760,)) and card.crop_pct == 1.0
    metadata = safetensors.safe_open(str(unmasked_run), "pt").metadata()
    assert metadata["model"] == "mait_nano4_8" and int(metadata["epoch"]) >= 1 and float(metadata["acc1"]) >= 0


def _cifar_pickles(root: Path, count: int) -> Path:
    """A CIFAR-10 pickle folder of ``count`` random training images (classes in turn) and 10 test images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, images in (("data_batch_1", count), ("test_batch", 10)):
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": rng.integers(0, 255, (images, 3 * 32 * 32), dtype=np.uint8),
                         "labels": [i % 10 for i in range(images)]}, handle)
    return root


def test_card_of_cifar_pickles_names_their_classes(tmp_path: Path) -> None:
    """An RGB model on CIFAR-10 pickles: label names from batches.meta, mean/std of the eval transform."""
    folder = _cifar_pickles(tmp_path, 20) / "cifar-10-batches-py"
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": names}, handle)
    config = load_config(None, {"model": "mait_micro4_32", "data": str(tmp_path)})
    _, val, info = open_data(config.data)
    card = make_card(config, info, build_model(config, info), val, build_transforms(config, info)[1])
    assert card.class_names == tuple(names) and (card.in_chans, card.img_size, card.num_classes) == (3, 32, 10)
    assert card.mean == pytest.approx((0.4914, 0.4822, 0.4465)) and card.std == pytest.approx((0.2470, 0.2435, 0.2616))
    assert ModelCard.from_metadata(card.metadata(epoch=3)) == card


def test_kept_checkpoint_is_evaluated_on_its_held_out_split(tmp_path: Path, capsys) -> None:
    """A checkpoint copied away from its config.yaml evaluates on the images its run held out (the last N
    of each class), not on its training images; other data (--data) is evaluated on its own split."""
    data = _cifar_pickles(tmp_path / "data", 40)
    run = train(load_config(None, dict(TINY, model="mait_micro4_32", data=str(data), holdout_per_class=1,
                                       train_subset=0, val_subset=0, epochs=1, batch_size=10,
                                       output=str(tmp_path / "run"))))
    away = _copy_away(run.last_checkpoint, tmp_path / "away")
    assert read_card(away).holdout_per_class == 1
    assert open_run(away).config.holdout_per_class == 1
    assert "(10 images, the last 1 of each class)" in _eval_metrics(capsys, "--checkpoint", str(away))
    other = _cifar_pickles(tmp_path / "other", 30)
    assert "(10 images)" in _eval_metrics(capsys, "--checkpoint", str(away), "--data", str(other))
    assert "(20 images, the last 2 of each class)" in _eval_metrics(
        capsys, "--checkpoint", str(away), "--data", str(other), "--holdout-per-class", "2")


def test_eval_away_from_config_yaml_uses_the_card(unmasked_run: Path, tmp_path: Path, capsys) -> None:
    """A --scheme none checkpoint copied away from its config.yaml is still evaluated unmasked."""
    beside = _eval_metrics(capsys, "--checkpoint", str(unmasked_run))
    away = _copy_away(unmasked_run, tmp_path / "away")
    assert _eval_metrics(capsys, "--checkpoint", str(away), "--val-subset", "64") == beside
    config = open_run(away).config
    assert (config.model, config.scheme, config.img_size) == ("mait_nano4_8", "none", 8)


def test_override_that_contradicts_the_card_warns(unmasked_run: Path, tmp_path: Path, capsys) -> None:
    away = _copy_away(unmasked_run, tmp_path / "away")
    assert main(["eval", "--checkpoint", str(away), "--scheme", "sch1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"mait eval: warning: {away} was trained with scheme none (its metadata), but *:1h is used here" in err
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # agreeing settings: no warning
        open_run(away).model()


def test_a_checkpoint_is_read_once(unmasked_run: Path, monkeypatch) -> None:
    """eval opens its checkpoint file once: card, settings and weights come from that one reading."""
    import mait.train.checkpoint as checkpoint
    opened = []
    real = checkpoint.safetensors.safe_open
    monkeypatch.setattr(checkpoint.safetensors, "safe_open", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    assert main(["eval", "--checkpoint", str(unmasked_run), "--val-subset", "16", "--no-progress"]) == 0
    assert opened == [str(unmasked_run)]


def test_old_checkpoint_without_card_still_loads(unmasked_run: Path, tmp_path: Path) -> None:
    weights = safetensors.torch.load_file(str(unmasked_run))
    old = tmp_path / "old" / "best.safetensors"
    old.parent.mkdir()
    safetensors.torch.save_file(weights, str(old), metadata={"model": "mait_nano4_8", "epoch": "2"})
    assert read_card(old) is None
    with pytest.warns(CheckpointMismatch, match="records only its model"):
        saved = open_run(old, scheme="none")
    model = saved.model(open_data("digits")[2])
    reference = open_run(unmasked_run).model(open_data("digits")[2])
    images = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(model(images), reference(images), rtol=0, atol=0)
    shutil.copy(unmasked_run.parent / "config.yaml", old.parent / "config.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # config.yaml beside it: no guessing, no warning
        assert open_run(old).config.scheme == "none"


def test_init_from_warns_when_the_scheme_differs(unmasked_run: Path, tmp_path: Path) -> None:
    config = load_config(None, dict(TINY, epochs=1, scheme="sch1", init_from=str(unmasked_run),
                                    output=str(tmp_path / "ft")))
    with pytest.warns(CheckpointMismatch, match=r"trained with scheme none .* but \*:1h is used"):
        train(config)


def test_init_from_takes_the_model_from_the_card(unmasked_run: Path, tmp_path: Path, capsys) -> None:
    """`mait train --init-from X` without --model fine-tunes X's model and scheme; --scheme still wins."""
    args = ["train", "--init-from", str(unmasked_run), "--epochs", "1", "--train-subset", "64", "--val-subset", "32",
            "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    assert read_card(tmp_path / "a" / "best.safetensors").scheme == "none"
    assert main([*args, "--output", str(tmp_path / "b"), "--scheme", "sch1"]) == 0
    assert read_card(tmp_path / "b" / "best.safetensors").scheme == "*:1h"
    assert "warning: " in capsys.readouterr().err


def test_init_from_another_model_leaves_the_card_settings(unmasked_run: Path, tmp_path: Path, capsys) -> None:
    """`--init-from` a dense checkpoint with `--model` a Sparsifiner model trains that model with its own
    learned heads: the card's `scheme: none` belongs to the card's model, not to the one named."""
    args = ["train", "--init-from", str(unmasked_run), "--model", "sparsifiner_nano4_8", "--epochs", "1",
            "--train-subset", "64", "--val-subset", "32", "--no-progress", "--output", str(tmp_path / "sparse"),
            "--reconstruction-target", "self",
            "--stages", "[{name: reconstruct, epochs: 1, warmup_epochs: 0, train: predictor, predictor: reconstruct, "
                        "losses: {reconstruction: 0.01}}]"]
    assert main(args) == 0
    card = read_card(tmp_path / "sparse" / "best.safetensors")
    assert (card.model, card.scheme) == ("sparsifiner_nano4_8", "*:4l")
    assert "trained with model mait_nano4_8 (its metadata), but sparsifiner_nano4_8 is used" in capsys.readouterr().err


def test_predict_matches_the_model_on_the_digits(unmasked_run: Path, tmp_path: Path, capsys) -> None:
    """PNG files of held-out digits get the probabilities the model gives their tensors."""
    _, val, _ = open_data("digits")
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    tensors, files = [], []
    for index in range(5):
        image, _ = val[index]
        pixels = image[0] * 0.3760 + 0.3053                     # back to [0, 1]
        path = folder / ("sub" if index % 2 else "") / f"{index}.png"
        Image.fromarray(np.round(pixels.numpy() * 255).clip(0, 255).astype(np.uint8), mode="L").save(path)
        tensors.append(image)
        files.append(path)
    assert main(["predict", "--checkpoint", str(unmasked_run), str(folder), "--top-k", "3", "--json"]) == 0
    results = {Path(r["image"]): r["top"] for r in json.loads(capsys.readouterr().out)}
    assert set(results) == set(files)
    model = open_run(unmasked_run).model(open_data("digits")[2])
    with torch.no_grad():
        probs = model(torch.stack(tensors)).softmax(dim=1)
    for path, p in zip(files, probs):
        top = results[path]
        assert [t["class"] for t in top] == p.topk(3).indices.tolist()
        assert [t["name"] for t in top] == [str(c) for c in p.topk(3).indices.tolist()]
        assert [t["probability"] for t in top] == pytest.approx(p.topk(3).values.tolist(), abs=2e-3)
    assert main(["predict", "--checkpoint", str(unmasked_run), str(files[0])]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("image") and "top-5 classes" in table[0] and str(files[0]) in table[1]
    (folder / "broken.png").write_text("not an image")
    assert main(["predict", "--checkpoint", str(unmasked_run), str(folder)]) == 2
    assert capsys.readouterr().err.startswith(f"mait predict: error: cannot read image {folder / 'broken.png'}: ")


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_export_command_checks_its_output(unmasked_run: Path, tmp_path: Path, capsys, fmt: str) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxscript", reason="ONNX export needs the [export] extra")
    output = tmp_path / f"model.{fmt}"
    assert main(["export", "--checkpoint", str(unmasked_run), "--format", fmt, "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert output.is_file() and f"wrote {output}" in out and "input (batch, 1, 8, 8)" in out
    if fmt == "onnx" and "onnxruntime is not installed" in out:
        return
    difference = float(out.split("max |logit difference| to PyTorch on 3 random images: ")[1].split()[0])
    assert difference <= 1e-4


def _square_score_tensors(program: torch.export.ExportedProgram, tokens: int) -> int:
    """Intermediates of the graph whose last two dims are tokens x tokens (dense attention scores)."""
    count = 0
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if node.op == "call_function" and isinstance(value, torch.Tensor) and value.dim() >= 2:
            count += tuple(value.shape[-2:]) == (tokens, tokens)
    return count


SMALL = {
    "mait": ("mait_t12_224", dict(img_size=64, patch_size=4, depth=2, scheme="0:2h,1:all"), 1 + 16 * 16),
    "cait": ("mait_cait_xxs24_224", dict(img_size=64, patch_size=4, depth=2), 16 * 16),
    "hmait": ("hmait_tiny_224", dict(img_size=64), None),
}


@pytest.mark.parametrize("family", sorted(SMALL))
def test_pt2_export_of_each_family_matches_pytorch(family: str, tmp_path: Path) -> None:
    name, kwargs, tokens = SMALL[family]
    model = timm.create_model(name, num_classes=7, **kwargs).eval().requires_grad_(False)
    example, check = torch.randn(2, 3, 64, 64), torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        for backend in ("auto", "reference") if family == "mait" else ("auto",):
            assert set_backend(model, backend) > 0
            program = export_pt2(model, example, tmp_path / f"{backend}.pt2")
            got = run_exported(tmp_path / f"{backend}.pt2", "pt2", check)
            assert (got - model(check)).abs().max().item() <= 1e-4
            if family == "mait":   # 16x16 grid: hard heads stay on the linear-time path under auto
                assert (_square_score_tensors(program, tokens) == 0) == (backend == "auto")


def test_onnx_export_keeps_the_linear_path_and_matches_pytorch(tmp_path: Path) -> None:
    """A 16x16 grid with hard heads exports through the linear-time backend; onnxruntime matches PyTorch."""
    pytest.importorskip("onnxscript", reason="ONNX export needs the [export] extra")
    onnx = pytest.importorskip("onnx", reason="ONNX export needs the [export] extra")
    pytest.importorskip("onnxruntime", reason="the check needs onnxruntime (the [export] extra)")
    name, kwargs, tokens = SMALL["mait"]
    model = timm.create_model(name, num_classes=7, **kwargs).eval().requires_grad_(False)
    example, check = torch.randn(2, 3, 64, 64), torch.randn(5, 3, 64, 64)
    assert set_backend(model, "auto") == 2
    with torch.no_grad():
        export_onnx(model, example, tmp_path / "model.onnx")
        got = run_exported(tmp_path / "model.onnx", "onnx", check)
        assert (got - model(check)).abs().max().item() <= 1e-4
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    shapes = {value.name: [d.dim_value for d in value.type.tensor_type.shape.dim] for value in graph.value_info}
    assert any(node.op_type == "Slice" for node in graph.node)        # the R² window shifts of the linear path
    assert not any(shape[-2:] == [tokens, tokens] for shape in shapes.values() if len(shape) >= 2)


def test_checkpoints_get_a_new_files_mode(tmp_path: Path) -> None:
    """safetensors creates its file private; a checkpoint gets the mode of any new file under the umask."""
    import os
    import stat
    from mait.train.checkpoint import new_file_mode, save_weights
    save_weights(timm.create_model("mait_nano4_8"), tmp_path / "w.safetensors")
    assert stat.S_IMODE(os.stat(tmp_path / "w.safetensors").st_mode) == new_file_mode()
