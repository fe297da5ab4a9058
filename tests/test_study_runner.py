"""`experiments/cifar10/study.py run`: the job scheduling (with stand-in runs) and, slow, a 2-epoch smoke of the
whole study on subsets of the CIFAR-10 JPEG set."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "experiments" / "cifar10" / "study.py"
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-train-jpg.tar.gz"

# A stand-in for `mait train`: logs its start and end, sleeps, and leaves a finished run folder.
FAKE_RUN = """
import sys, time, pathlib
folder, epochs, log = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
with open(log, "a") as handle:
    handle.write(f"start {folder.name} {time.monotonic()}\\n")
time.sleep(0.4)
rows = "".join(f"{e + 1},{10.0 + e},1.0\\n" for e in range(epochs))
(folder / "metrics.csv").write_text("epoch,val_acc1,epoch_time\\n" + rows)
(folder / "last.safetensors").write_bytes(b"")
with open(log, "a") as handle:
    handle.write(f"end {folder.name} {time.monotonic()}\\n")
"""


@pytest.fixture()
def study(monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("cifar10_study_runner", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "POLL_S", 0.05)
    return module


def test_runs_side_by_side_search_waits_for_its_source(study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log, seen = tmp_path / "events.log", {}

    def fake_command(name, keys, run_dir):
        seen[name] = keys
        return [sys.executable, "-c", FAKE_RUN, str(run_dir / name), str(keys["epochs"]), str(log)]

    monkeypatch.setattr(study, "train_command", fake_command)
    monkeypatch.setattr(study, "search_scheme", lambda run_dir: "0-5:1h")
    monkeypatch.setattr(study, "prepare_data", lambda keys: None)
    runs = tmp_path / "runs"
    study.run_study(["*-s0"], jobs=3, threads=1, run_dir=runs, recipe="full", extra={"device": "cuda"})

    names = [n for n in study.load_runs() if n.endswith("-s0")]
    assert sorted(seen) == sorted(names) and len(names) == 9            # 7 variants + the 9-layer pair
    assert all(keys["device"] == "cuda" and keys["epochs"] == 50 for keys in seen.values())
    assert seen["search-s0"]["scheme"] == "0-5:1h" and seen["deep-mixed-s0"]["model_kwargs"] == {"depth": 9}
    events = [line.split() for line in log.read_text().splitlines()]
    times = {(kind, name): float(t) for kind, name, t in events}
    active = peak = 0
    for kind, _, _ in sorted(events, key=lambda e: float(e[2])):
        active += 1 if kind == "start" else -1
        peak = max(peak, active)
    assert peak == 3, "three runs side by side, never more"
    assert times["start", "search-s0"] > times["end", "sch1-s0"], "the search reads the finished sch1-s0"

    seen.clear()
    study.run_study(["*-s0"], jobs=3, threads=1, run_dir=runs, recipe="full")
    assert not seen, "finished runs are not run again"
    monkeypatch.setattr(study, "train_command", lambda name, keys, run_dir: [sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(SystemExit, match=r"failed runs \(see their train.log\): none-s1"):
        study.run_study(["none-s1"], jobs=2, threads=1, run_dir=runs, recipe="full")
    with pytest.raises(SystemExit, match="--jobs and --threads must be at least 1, got 0"):
        study.run_study([], jobs=0, threads=1, run_dir=runs)


@pytest.mark.slow
@pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"CIFAR-10 JPEG set not found at {ARCHIVE}")
def test_smoke_of_the_whole_study_on_cpu(tmp_path: Path) -> None:
    """Every seed-0 run (7 variants + the 9-layer pair), the search and the report, 2 epochs on subsets."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    runs, results = tmp_path / "runs", tmp_path / "results"
    common = [sys.executable, str(STUDY), "--recipe", "smoke", "--runs-dir", str(runs)]
    proc = subprocess.run([*common, "run", "*-s0", "--jobs", "2", "--device", "cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = subprocess.run([*common, "report", "--results", str(results)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    summary = json.loads((results / "summary.json").read_text())
    assert [v["variant"] for v in summary["variants"]] == ["none", "sch1", "mixed", "soft", "random", "sch1-r5",
                                                           "search", "deep-none", "deep-mixed"]
    assert all(v["seeds"] == 1 and 0 <= v["acc1_mean"] <= 100 for v in summary["variants"])
    assert set(summary["similarity"]) == {"deep-none", "deep-mixed"} and summary["search"]["source"] == "sch1-s0"
    for name in ("none-s0", "deep-mixed-s0"):
        rows = (runs / name / "metrics.csv").read_text().splitlines()
        assert len(rows) == 3 and "train_images_per_s" in rows[0]
