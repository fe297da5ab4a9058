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

# A stand-in for `mait train`: logs its start (and whether it resumes) and end, logs one metrics row and
# writes a training state per epoch, and either finishes (final weights) or dies after epoch ``stop``.
FAKE_RUN = """
import sys, time, pathlib
args = sys.argv[1:]
resume = "--resume" in args
if resume:
    del args[args.index("--resume"):args.index("--resume") + 2]
folder, epochs, log, stop = pathlib.Path(args[0]), int(args[1]), args[2], int(args[3])
metrics = folder / "metrics.csv"
done = len(metrics.read_text().splitlines()) - 1 if resume else 0
with open(log, "a") as handle:
    handle.write(f"{'resume' if resume else 'start'} {folder.name} {time.monotonic()}\\n")
(folder / "config.yaml").write_text(f"epochs: {epochs}\\n")
for epoch in range(done, min(epochs, stop)):
    time.sleep(0.15)
    rows = "".join(f"{e + 1},{10.0 + e},1.0,100.0\\n" for e in range(epoch + 1))
    (folder / "last.state.pt").write_text(f"after epoch {epoch + 1}")
    metrics.write_text("epoch,val_acc1,epoch_time,train_images_per_s\\n" + rows)
if stop < epochs:
    raise SystemExit(1)
(folder / "last.safetensors").write_text("final weights")
with open(log, "a") as handle:
    handle.write(f"end {folder.name} {time.monotonic()}\\n")
"""


@pytest.fixture()
def study(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    spec = importlib.util.spec_from_file_location("cifar10_study_runner", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "POLL_S", 0.05)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")      # kept runs go to tmp_path/results-full
    monkeypatch.setattr(module, "prepare_data", lambda keys: None)
    return module


def fake_runs(study, monkeypatch: pytest.MonkeyPatch, log: Path, stop: dict[str, int] | None = None) -> dict:
    """Replace `mait train` by FAKE_RUN; returns the keys each run was started with."""
    seen: dict[str, dict] = {}

    def fake_command(name, keys, run_dir):
        seen[name] = keys
        return [sys.executable, "-c", FAKE_RUN, str(run_dir / name), str(keys["epochs"]), str(log),
                str((stop or {}).get(name, 10_000)), "--output", str(run_dir / name)]

    monkeypatch.setattr(study, "train_command", fake_command)
    return seen


def events(log: Path) -> list[tuple[str, str, float]]:
    return [(kind, name, float(t)) for kind, name, t in (line.split() for line in log.read_text().splitlines())]


def test_runs_side_by_side_and_dependent_runs_wait(study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    log = tmp_path / "events.log"
    seen = fake_runs(study, monkeypatch, log)
    monkeypatch.setattr(study, "search_scheme", lambda run_dir: "0-5:1h")
    runs = tmp_path / "runs"
    study.run_study(["*-s0"], jobs=3, threads=1, run_dir=runs, recipe="full", extra={"device": "cuda", "epochs": 2})

    names = [n for n in study.load_runs() if n.endswith("-s0")]
    assert sorted(seen) == sorted(names) and len(names) == 12   # 8 variants, the 9-layer pair, Sparsifiner + control
    assert all(keys["device"] == "cuda" for keys in seen.values())
    assert seen["search-s0"]["scheme"] == "0-5:1h" and seen["deep-mixed-s0"]["model_kwargs"] == {"depth": 9}
    kept = tmp_path / "results-full"
    start = kept / "checkpoints" / "none-s0.safetensors"
    assert seen["sparsifiner-s0"]["init_from"] == str(start) == seen["sparsifiner-ctrl-s0"]["teacher_checkpoint"]
    assert "from" not in seen["sparsifiner-s0"] and seen["sparsifiner-s0"]["model"] == "sparsifiner_mini6_32"
    times = {(kind, name): t for kind, name, t in events(log)}
    active = peak = 0
    for kind, _, _ in sorted(events(log), key=lambda e: e[2]):
        active += 1 if kind == "start" else -1
        peak = max(peak, active)
    assert peak == 3, "three runs side by side, never more"
    assert times["start", "search-s0"] > times["end", "sch1-s0"], "the search reads the finished sch1-s0"
    for run in ("sparsifiner-s0", "sparsifiner-ctrl-s0"):
        assert times["start", run] > times["end", "none-s0"], f"{run} starts from the finished none-s0"
    out = capsys.readouterr().out
    assert "none-s0: epoch 1/2  val top-1 10.00  100 img/s  0.00 h so far  ~0.0 h left" in out
    assert "none-s0: epoch 2/2  val top-1 11.00  100 img/s  0.00 h so far  finished" in out
    # every finished run is kept: final weights and records, no resume point
    assert sorted(p.stem for p in (kept / "checkpoints").iterdir()) == sorted(names)
    assert (kept / "runs" / "all-s0" / "metrics.csv").read_text() == (runs / "all-s0" / "metrics.csv").read_text()
    assert not (kept / "resume").exists() or not any((kept / "resume").iterdir())

    seen.clear()
    study.run_study(["*-s0"], jobs=3, threads=1, run_dir=runs, recipe="full", extra={"epochs": 2})
    assert not seen, "finished runs are not run again"
    study.run_study(["*-s0"], jobs=3, threads=1, run_dir=tmp_path / "fresh", recipe="full", extra={"epochs": 2})
    assert not seen, "nor on a fresh machine, whose run folders are gone but whose kept runs are there"
    monkeypatch.setattr(study, "train_command", lambda name, keys, run_dir: [sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(SystemExit, match=r"failed runs \(see their train.log\): none-s1"):
        study.run_study(["none-s1"], jobs=2, threads=1, run_dir=runs, recipe="full")
    with pytest.raises(SystemExit, match="--jobs and --threads must be at least 1, got 0"):
        study.run_study([], jobs=0, threads=1, run_dir=runs)


def test_a_killed_run_continues_from_its_kept_checkpoint_on_a_fresh_machine(
        study, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    log, kept = tmp_path / "events.log", tmp_path / "results-full"
    fake_runs(study, monkeypatch, log, stop={"none-s0": 2})
    with pytest.raises(SystemExit, match="failed runs"):                    # dies after epoch 2 of 4
        study.run_study(["none-s0"], jobs=1, threads=1, run_dir=tmp_path / "first", recipe="full",
                        extra={"epochs": 4})
    assert (kept / "resume" / "none-s0" / "last.state.pt").read_text() == "after epoch 2"
    assert len((kept / "runs" / "none-s0" / "metrics.csv").read_text().splitlines()) == 3
    study.status(["none-s0"], tmp_path / "elsewhere", "full")
    assert "none-s0: epoch 2/50  val top-1 11.00" in capsys.readouterr().out     # read from the kept copy

    fake_runs(study, monkeypatch, log)
    fresh = tmp_path / "second"                                               # the run folders are gone
    study.run_study(["none-s0"], jobs=1, threads=1, run_dir=fresh, recipe="full", extra={"epochs": 4})
    assert [(kind, name) for kind, name, _ in events(log)] == [("start", "none-s0"), ("resume", "none-s0"),
                                                               ("end", "none-s0")]
    assert "continuing from the checkpoint kept in" in capsys.readouterr().out
    assert len((fresh / "none-s0" / "metrics.csv").read_text().splitlines()) == 5
    assert (kept / "checkpoints" / "none-s0.safetensors").read_text() == "final weights"
    assert not (kept / "resume" / "none-s0").exists(), "a finished run drops its resume point"


@pytest.mark.slow
@pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"CIFAR-10 JPEG set not found at {ARCHIVE}")
def test_smoke_of_the_whole_study_on_cpu(tmp_path: Path) -> None:
    """Every seed-0 run from scratch (8 variants + the 9-layer pair), the search and the report, 2 epochs on
    subsets."""
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
    assert [v["variant"] for v in summary["variants"]] == ["none", "all", "sch1", "mixed", "soft", "random", "sch1-r5",
                                                           "search", "deep-none", "deep-mixed"]
    assert all(v["seeds"] == 1 and 0 <= v["acc1_mean"] <= 100 for v in summary["variants"])
    assert set(summary["similarity"]) == {"deep-none", "deep-mixed"} and summary["search"]["source"] == "sch1-s0"
    for name in ("none-s0", "deep-mixed-s0"):
        rows = (runs / name / "metrics.csv").read_text().splitlines()
        assert len(rows) == 3 and "train_images_per_s" in rows[0]
