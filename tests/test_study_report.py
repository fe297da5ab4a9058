"""`experiments/cifar10/study.py report` on a fresh machine: runs whose folders are gone keep the
last report's record, so re-running a few runs adds to the study instead of erasing it."""

from __future__ import annotations

import importlib.util
import json
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
    assert summary["als"] == record["als"] and summary["alphas"] == record["alphas"]
    text = (results / "summary.md").read_text()
    assert "| sch1 | `sch1` | 3 | 6 | 2 | 44.25 ± 0.35 | 44.00 / 44.50 | -1.00 / +1.50 |" in text
    assert "| deep-mixed | `0-2:all` | 3 | 9 | 1 | 41.00 | 41.00 | +1.00 |" in text   # paired with deep-none
    assert "α of soft-s0 per layer (heads): 0.25 0.50 0.75" in text and "-> `none`" in text
    assert (results / "accuracy.png").is_file() and (results / "als_by_layer.png").is_file()


def test_report_without_any_run_says_so(study, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no finished run"):
        study.report(tmp_path / "runs")
