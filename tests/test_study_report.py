"""`experiments/cifar10/study.py report` on a fresh machine: runs whose folders are gone keep the
last report's record, so re-running a few runs adds to the study instead of erasing it."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "experiments" / "cifar10" / "study.py"


@pytest.fixture()
def study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("cifar10_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    return module


def row(run: str, scheme: str, seed: int, acc1: float) -> dict:
    return {"run": run, "variant": run.rsplit("-s", 1)[0], "seed": seed, "scheme": scheme, "mask_size": 3,
            "depth": 6, "params_m": 0.683, "gmacs": 0.048, "acc1": acc1, "best_acc1": acc1, "train_min": 8.0}


def test_report_keeps_runs_whose_folders_are_gone(study, tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    rows = [row("none-s0", "none", 0, 45.0), row("sch1-s0", "sch1", 0, 44.0),
            row("none-s1", "none", 1, 43.0), row("sch1-s1", "sch1", 1, 44.5),
            {**row("deep-none-s0", "none", 0, 40.0), "depth": 9}, {**row("deep-mixed-s0", "0-2:all", 0, 41.0), "depth": 9}]
    record = {"runs": rows, "als": {"none": [[0.1, 0.2, 0.3]]}, "alphas": {"soft-s0": [[0.25, 0.5, 0.75]]},
              "similarity": {}, "search": {"source": "sch1-s0", "decisions": ["remove"], "scheme": "none"}}
    (results / "summary.json").write_text(json.dumps(record))
    (tmp_path / "runs").mkdir()

    study.report(tmp_path / "runs")

    summary = json.loads((results / "summary.json").read_text())
    assert [r["run"] for r in summary["runs"]] == ["sch1-s0", "none-s0", "sch1-s1", "none-s1",
                                                   "deep-none-s0", "deep-mixed-s0"]          # runs.yaml order
    sch1 = next(v for v in summary["variants"] if v["variant"] == "sch1")
    assert sch1["acc1_all"] == [44.0, 44.5] and sch1["delta_vs_none"] == [-1.0, 1.5]
    half = math.tan(0.475 * math.pi) * (2.5 / math.sqrt(2)) / math.sqrt(2)   # t(0.975, 1) * std / sqrt(n)
    assert sch1["delta_ci95"] == pytest.approx([0.25 - half, 0.25 + half], rel=1e-9)
    assert summary["als"] == record["als"] and summary["alphas"] == record["alphas"]
    text = (results / "summary.md").read_text()
    assert "| sch1 | `sch1` | 3 | 6 | 2 | 44.25 ± 0.35 | 44.00 / 44.50 | +0.25 ± 1.77 (-1.00 / +1.50; -15.63 to +16.13) |" in text
    assert "| deep-mixed | `0-2:all` | 3 | 9 | 1 | 41.00 | 41.00 | +1.00 |" in text   # paired with deep-none
    assert "α of soft-s0 per layer (heads): 0.25 0.50 0.75" in text and "-> `none`" in text
    assert (results / "accuracy.png").is_file() and (results / "als_by_layer.png").is_file()


def test_report_without_any_run_says_so(study, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no finished run"):
        study.report(tmp_path / "runs")


def test_report_of_the_kept_runs_pairs_sparsifiner_with_its_control(study, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh machine: no run folders, only what the full recipe keeps in the repository.  Finished runs
    make the table (Sparsifiner paired with its control, the others with `none`); every run, finished or
    not, draws its validation curve."""
    kept = tmp_path / "results-full"
    final = {"none-s0": 80.0, "all-s0": 82.0, "none-s1": 79.0, "all-s1": 80.5, "sparsifiner-s0": 79.5,
             "sparsifiner-ctrl-s0": 80.25}
    epochs = {name: 9 if "sparsifiner" in name else 4 for name in final} | {"sch1-s0": 4}
    for name, count in epochs.items():
        folder = kept / "runs" / name
        folder.mkdir(parents=True)
        scheme = name.rsplit("-s", 1)[0]
        (folder / "config.yaml").write_text(f"model: mait_mini6_32\nscheme: {scheme if scheme in ('none', 'all') else 'none'}"
                                            f"\nseed: {name[-1]}\nepochs: {count}\n")
        logged = count if name in final else 2                               # sch1-s0 is still training
        rows = [f"{e + 1},{final.get(name, 50.0) - (logged - 1 - e)},120.0,300.0" for e in range(logged)]
        (folder / "metrics.csv").write_text("epoch,val_acc1,epoch_time,train_images_per_s\n" + "\n".join(rows) + "\n")
        if name in final:
            (kept / "checkpoints").mkdir(exist_ok=True)
            (kept / "checkpoints" / f"{name}.safetensors").write_bytes(b"")
    epoch = "epoch   {}/4  train_loss 1.0  val_loss 1.0  acc1  80.00  acc5  99.00  lr 1e-3  120.0s  300 img/s"
    (kept / "runs" / "all-s0" / "train.log").write_text("\n".join([
        "training mait_mini6_32 on cifar10; output folder: runs/all-s0", epoch.format(1), epoch.format(2),
        "resuming runs/all-s0 at epoch 3, step 0/312", "machine: CPU A, 1 thread", epoch.format(3),
        "resuming runs/all-s0 at epoch 3, step 0/312", "precision: fp32", "machine: CPU B, 1 thread",
        epoch.format(3), epoch.format(4), "finished in 480.0 s: validation top-1 82.00 %"]) + "\n")
    monkeypatch.setattr(study, "cost_of", lambda checkpoint: {
        "depth": 6, "params_m": 0.68, "gmacs": 0.05, "mhsa_mmacs": 3.0 if "all" in checkpoint.name else 9.0,
        "mhsa_sparse_mmacs": 4.0 if checkpoint.name.startswith("sparsifiner-s") else
        (3.0 if "all" in checkpoint.name else 9.0)})
    monkeypatch.setattr(study, "analyse", lambda run_dir, out, earlier, kept=None:
                        {"als": {}, "alphas": {}, "similarity": {}})
    results = tmp_path / "report"
    study.report(tmp_path / "gone", results, kept)

    text = (results / "summary.md").read_text()
    assert "| none | `none` | 3 | 6 | 2 | 79.50 ± 0.71 | 80.00 / 79.00 |  |" in text
    assert "| all | `all` | 3 | 6 | 2 | 81.25 ± 1.06 | 82.00 / 80.50 | +1.75 ± 0.35 (+2.00 / +1.50; -1.43 to +4.93) | 0.680 | 50.0 | 3.00 | 300 | 8.0 |" in text
    assert ("| sparsifiner | `none` | 3 | 6 | 1 | 79.50 | 79.50 | -0.75 (vs sparsifiner-ctrl) | 0.680 | 50.0 | "
            "9.00 (4.00 pruned) | 300 | 18.0 |") in text
    assert "| all-s0 | 82.00 | 82.00 | 4 | 0.13 | 300 | not logged: 2; CPU B: 2 |" in text   # epoch 3 reran on B
    assert "| none-s1 | 79.00 | 79.00 | 4 | 0.13 | 300 |  |" in text                         # no train.log kept
    assert "sch1" not in text, "an unfinished run is not in the table"
    summary = json.loads((results / "summary.json").read_text())
    assert {r["run"] for r in summary["runs"]} == set(final)
    assert (results / "accuracy_per_epoch.png").stat().st_size > 10_000


def test_an_unfinished_run_has_no_final_weights(study, tmp_path: Path) -> None:
    """The analyses read final weights only: a run still training has a ``last.safetensors`` of some epoch."""
    folder = tmp_path / "runs" / "sch1-s0"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("epochs: 3\n")
    (folder / "last.safetensors").write_bytes(b"")
    for epochs_logged, expected in ((2, None), (3, folder / "last.safetensors")):
        rows = "".join(f"{epoch},0.5\n" for epoch in range(1, epochs_logged + 1))
        (folder / "metrics.csv").write_text("epoch,val_acc1\n" + rows)
        assert study.final_checkpoint("sch1-s0", tmp_path / "runs", None) == expected


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_t_quantile_matches_the_closed_forms(study, p: float) -> None:
    """One and two degrees of freedom have closed forms: tan(π(p - 1/2)) and (2p - 1) / sqrt(2p(1 - p))."""
    assert study.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-8)
    assert study.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-8)


def test_t_quantile_matches_the_tables_and_the_normal_limit(study) -> None:
    assert study.t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-6)      # standard t tables
    assert study.t_quantile(0.975, 10) == pytest.approx(2.228139, abs=1e-6)
    assert study.t_quantile(0.95, 30) == pytest.approx(1.697261, abs=1e-6)
    assert study.t_quantile(0.975, 100_000) == pytest.approx(1.959964, abs=1e-4)  # the normal quantile
    with pytest.raises(ValueError, match="p=0.3"):
        study.t_quantile(0.3, 2)
