"""The CIFAR-10 study of docs/reproduction.md: run it (or any subset) and regenerate its tables and figures.

    python experiments/cifar10/study.py run                 # every run of runs.yaml not finished yet
    python experiments/cifar10/study.py run 'sch1-*' --jobs 1 --threads 2
    python experiments/cifar10/study.py report              # tables + figures from the saved runs
    python experiments/cifar10/study.py command none-s0     # the plain `mait train` command of one run
    python experiments/cifar10/study.py run --recipe full   # the 50-epoch study: resumes wherever it stopped
    python experiments/cifar10/study.py status --recipe full   # where each run stands
    python experiments/cifar10/study.py report --recipe full

Each run is ``mait train --config base.yaml`` plus the keys of the recipe (``--recipe``:
``short``, the 2-epoch CPU study of base.yaml; ``full``, full.yaml's 50 epochs; ``smoke``,
smoke.yaml's 2 epochs on subsets) plus the keys of its entry in ``runs.yaml``, written to
``runs/cifar10-study[-<recipe>]/<name>`` (a killed run is resumed).  ``scheme: search`` is
the scheme the quick empirical search (§4.3) derives from the ALS of run ``sch1-s0``; an entry's
``from: <run>`` starts it from that run's final weights (and distils from them), after that run.

The full recipe keeps its runs in the repository, in ``experiments/cifar10/results-full/``: every
finished run's final weights (``checkpoints/<run>.safetensors``), every run's config, metrics and log
(``runs/<run>/``), and each unfinished run's latest checkpoint (``resume/<run>/``, refreshed at every
epoch), from which ``run`` continues on a machine whose run folders are gone.
``report`` reads the run folders (or the kept ones) and writes ``experiments/cifar10/results[-<recipe>]/``;
runs of the last report whose folders are gone (a fresh machine) keep that report's figures.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BASE, RUNS = HERE / "base.yaml", HERE / "runs.yaml"
RESULTS = HERE / "results"
DEFAULT_RUN_DIR = ROOT / "runs" / "cifar10-study"
RECIPES = {"short": None, "full": HERE / "full.yaml", "smoke": HERE / "smoke.yaml"}   # keys on top of base.yaml
POLL_S = 2.0                                    # how often the runner looks at its jobs
SEARCH_SOURCE = "sch1-s0"                       # the Sch.1 run the search measures
ALS_IMAGES, SIMILARITY_IMAGES = 1000, 500       # held-out images for the analyses
VARIANTS = ["none", "all", "sch1", "mixed", "soft", "random", "sch1-r5", "search", "sparsifiner",
            "sparsifiner-ctrl"]   # table order
# The runs of a recipe when none are named, in the order they start: the 50-epoch study is the four
# arms of docs/reproduction.md seed by seed (each finished seed is a paired comparison), then
# Sparsifiner's released recipe from each unmasked run beside its control.  The other recipes run
# every entry that starts from scratch.
RECIPE_RUNS = {"full": [f"{arm}-s{seed}" for seed in range(3) for arm in ("none", "all", "sch1", "mixed")]
                       + [f"{arm}-s{seed}" for seed in range(3) for arm in ("sparsifiner", "sparsifiner-ctrl")]}
KEPT_RECIPES = {"full"}              # recipes whose runs live on in the repository (results-<recipe>/)
PAIRED_WITH = {"sparsifiner": "sparsifiner-ctrl"}      # a variant's baseline when it is not the unmasked run
RECORD_FILES = ("config.yaml", "metrics.csv", "train.log")                  # kept for every run
RESUME_FILES = ("last.state.pt", "last.safetensors", "best.safetensors")   # kept while a run is unfinished


def load_runs() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(RUNS.read_text())


def variant_of(name: str) -> str:
    return name.rsplit("-s", 1)[0]


def select(names: list[str], patterns: list[str]) -> list[str]:
    """The runs the patterns name, in the order of the patterns (then of ``names``)."""
    if not patterns:
        return names
    chosen = list(dict.fromkeys(n for p in patterns for n in names if fnmatch.fnmatchcase(n, p)))
    if not chosen:
        raise SystemExit(f"no run matches {patterns}; runs: {', '.join(names)}")
    return chosen


# ------------------------------------------------------------------------------------------ running

def search_scheme(run_dir: Path) -> str:
    """The quick empirical search on run ``sch1-s0``: ALS of head 0 per layer -> assign -> calibrate."""
    folder = run_dir / "search"
    if (folder / "scheme.txt").is_file():
        return (folder / "scheme.txt").read_text().strip()
    import torch
    from mait.analysis import measure_als, model_scheme, save_report
    from mait.train.runs import held_out_images, open_run
    from mait.search import assign, calibrate

    checkpoint = run_dir / SEARCH_SOURCE / "last.safetensors"
    run = open_run(checkpoint)
    loader, info = held_out_images(run.config, ALS_IMAGES, batch_size=250)
    model = run.model(info)
    with torch.inference_mode():
        als = measure_als(model, loader)
    table = [a.tolist() for a in als]
    assignment = assign(table)
    scheme = calibrate(assignment, table)        # "initial" calibration: the Sch.1 run's per-head ALS
    save_report(als, folder, "als_sch1", scheme=model_scheme(model), colorbar_label="ALS",
                title=f"Search input: ALS of {SEARCH_SOURCE} ({ALS_IMAGES} held-out images)")
    (folder / "search.json").write_text(json.dumps(
        {"source": SEARCH_SOURCE, "als": table, "decisions": list(assignment.decisions),
         "assigned": str(assignment.scheme), "scheme": str(scheme)}, indent=2) + "\n")
    (folder / "scheme.txt").write_text(f"{scheme}\n")
    print(f"[study] searched scheme: {scheme} (decisions {', '.join(assignment.decisions)})", flush=True)
    return str(scheme)


def recipe_keys(recipe: str) -> dict[str, Any]:
    """The keys a recipe adds to base.yaml."""
    if recipe not in RECIPES:
        raise SystemExit(f"unknown recipe {recipe!r}; recipes: {', '.join(RECIPES)}")
    return yaml.safe_load(RECIPES[recipe].read_text()) if RECIPES[recipe] else {}


def run_keys(name: str, recipe: str, extra: dict[str, Any]) -> dict[str, Any]:
    """The keys run ``name`` adds to base.yaml: the recipe's, then its runs.yaml entry's, then ``extra``
    (``from`` still unresolved: see :func:`resolve_keys`)."""
    return {**recipe_keys(recipe), **load_runs()[name], **extra}


def recipe_runs(recipe: str) -> list[str]:
    """The runs a recipe trains when none are named."""
    runs = load_runs()
    return RECIPE_RUNS.get(recipe) or [n for n in runs if "from" not in runs[n]]


def kept_dir(recipe: str, keep: Optional[bool] = None) -> Optional[Path]:
    """Where a recipe keeps its runs in the repository (None: only in its run folders); ``keep`` overrides
    the default of :data:`KEPT_RECIPES`."""
    keep = recipe in KEPT_RECIPES if keep is None else keep
    return RESULTS.with_name(f"{RESULTS.name}-{recipe}") if keep else None


def epochs_of(keys: dict[str, Any]) -> int:
    return int(keys.get("epochs", yaml.safe_load(BASE.read_text())["epochs"]))


def dependency(keys: dict[str, Any]) -> Optional[str]:
    """The run that must finish before this one starts: its ``from`` run, or the run the search measures."""
    return keys.get("from") or (SEARCH_SOURCE if keys.get("scheme") == "search" else None)


def final_checkpoint(name: str, run_dir: Path, kept: Optional[Path]) -> Optional[Path]:
    """The final weights of finished run ``name``: the kept copy when the recipe keeps runs, else its folder's
    (``None`` while the run is unfinished: its ``last.safetensors`` is then an intermediate epoch's)."""
    if kept is not None and (kept / "checkpoints" / f"{name}.safetensors").is_file():
        return kept / "checkpoints" / f"{name}.safetensors"
    config = run_dir / name / "config.yaml"
    if config.is_file() and finished(run_dir / name, yaml.safe_load(config.read_text())["epochs"]):
        return run_dir / name / "last.safetensors"
    return None


def is_finished(name: str, epochs: int, run_dir: Path, kept: Optional[Path]) -> bool:
    """All epochs logged and the final weights written, in the run folder or kept in the repository."""
    if finished(run_dir / name, epochs):
        return True
    return (kept is not None and len(read_metrics(kept / "runs" / name)) >= epochs
            and (kept / "checkpoints" / f"{name}.safetensors").is_file())


def resolve_keys(name: str, keys: dict[str, Any], run_dir: Path, kept: Optional[Path]) -> dict[str, Any]:
    """``keys`` with ``scheme: search`` and ``from: <run>`` turned into ``mait train`` keys."""
    keys = dict(keys)
    if keys.get("scheme") == "search":
        keys["scheme"] = search_scheme(run_dir)
    source = keys.pop("from", None)
    if source is not None:
        weights = final_checkpoint(source, run_dir, kept) or (     # where it will be once that run has finished
            kept / "checkpoints" / f"{source}.safetensors" if kept else run_dir / source / "last.safetensors")
        weights = weights.relative_to(ROOT) if weights.is_relative_to(ROOT) else weights
        keys.update(init_from=str(weights), teacher_checkpoint=str(weights))
    return keys


def train_command(name: str, keys: dict[str, Any], run_dir: Path) -> list[str]:
    """``mait train`` for one run (its keys resolved by :func:`resolve_keys`)."""
    output = run_dir / name
    output = output.relative_to(ROOT) if output.is_relative_to(ROOT) else output
    command = [sys.executable, "-m", "mait", "train", "--config", str(BASE.relative_to(ROOT)), "--output", str(output)]
    for key, value in keys.items():
        text = yaml.safe_dump(value, default_flow_style=True).strip() if isinstance(value, (dict, list)) else str(value)
        command += ["--" + key.replace("_", "-"), text]
    return command


def finished(folder: Path, epochs: int) -> bool:
    rows = read_metrics(folder)
    return len(rows) >= epochs and (folder / "last.safetensors").is_file()


def prepare_data(keys: dict[str, Any]) -> None:
    """Extract and decode the data set once, before the runs that share it start side by side."""
    from mait.train import load_config, open_data
    from mait.train.data.in_memory import image_array
    config = load_config(BASE, {k: v for k, v in keys.items() if k != "from"})
    if str(config.in_memory).lower() != "false":
        image_array(open_data(config.data, config.holdout_per_class)[0])


def _copy(source: Path, target: Path) -> None:
    """Copy a file so that ``target`` is always whole: a temporary name, then a rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def keep(name: str, epochs: int, run_dir: Path, kept: Path) -> None:
    """Keep run ``name`` in the repository: its config, metrics and log; its final weights once finished
    (and its resume point dropped), else its latest checkpoint, from which a fresh machine continues it.
    The training state is copied first: it holds the weights, so it alone resumes the run exactly."""
    folder = run_dir / name
    if not (folder / "metrics.csv").is_file():
        return
    for file in RECORD_FILES:
        if (folder / file).is_file():
            _copy(folder / file, kept / "runs" / name / file)
    if finished(folder, epochs):
        _copy(folder / "last.safetensors", kept / "checkpoints" / f"{name}.safetensors")
        shutil.rmtree(kept / "resume" / name, ignore_errors=True)
        return
    for file in RESUME_FILES:
        if (folder / file).is_file():
            _copy(folder / file, kept / "resume" / name / file)


def restore(name: str, run_dir: Path, kept: Path) -> bool:
    """Put a kept unfinished run back into its run folder when that folder has no checkpoint (a fresh machine)."""
    folder, source = run_dir / name, kept / "resume" / name
    if (folder / "last.state.pt").is_file() or not (source / "last.state.pt").is_file():
        return False
    for file in RESUME_FILES:
        if (source / file).is_file():
            _copy(source / file, folder / file)
    for file in RECORD_FILES:
        if (kept / "runs" / name / file).is_file():
            _copy(kept / "runs" / name / file, folder / file)
    return True


def where(name: str, epochs: int, run_dir: Path, kept: Optional[Path]) -> str:
    """One line on run ``name``: epoch, validation top-1, training images/s and the estimated time left."""
    rows = read_metrics(run_dir / name) or (read_metrics(kept / "runs" / name) if kept else [])
    if not rows:
        return f"{name}: not started"
    last, recent = rows[-1], [r["epoch_time"] for r in rows[-3:] if "epoch_time" in r]
    speed = f"  {last['train_images_per_s']:.0f} img/s" if "train_images_per_s" in last else ""
    hours = sum(r.get("epoch_time", 0.0) for r in rows) / 3600
    left = "finished" if len(rows) >= epochs else \
        f"~{(epochs - len(rows)) * statistics.mean(recent) / 3600:.1f} h left" if recent else ""
    return (f"{name}: epoch {len(rows)}/{epochs}  val top-1 {last['val_acc1']:.2f}{speed}  "
            f"{hours:.2f} h so far  {left}").rstrip()


def run_study(patterns: list[str], jobs: int, threads: int, run_dir: Path, recipe: str = "short",
              extra: Optional[dict[str, Any]] = None, keep_runs: Optional[bool] = None) -> None:
    """Train the selected runs not finished yet, ``jobs`` at a time, continuing killed ones from their last
    checkpoint; ``extra`` keys (e.g. ``device``) go to every run.  With ``keep_runs`` (default: the recipes
    of :data:`KEPT_RECIPES`) every run is kept in the repository at each epoch (:func:`keep`)."""
    if jobs < 1 or threads < 1:
        raise SystemExit(f"--jobs and --threads must be at least 1, got {jobs} and {threads}")
    kept = kept_dir(recipe, keep_runs)
    runs, extra = load_runs(), dict(extra or {})
    keys = {name: run_keys(name, recipe, extra) for name in runs}
    epochs = {name: epochs_of(keys[name]) for name in runs}
    todo = [n for n in select(list(runs), patterns or recipe_runs(recipe))
            if not is_finished(n, epochs[n], run_dir, kept)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    active: dict[str, subprocess.Popen] = {}
    logged: dict[str, int] = {}
    failed: list[str] = []
    print(f"[study] recipe {recipe}: {len(todo)} runs to do, {jobs} at a time, {threads} thread(s) each: "
          f"{', '.join(todo)}" + (f"; kept in {kept}" if kept else ""), flush=True)
    if todo:
        prepare_data(keys[todo[0]])
    started = time.perf_counter()
    while todo or active:
        for name, proc in list(active.items()):
            rows = len(read_metrics(run_dir / name))
            ended = proc.poll() is not None
            if rows != logged[name] or ended:
                logged[name] = rows
                if kept is not None:
                    keep(name, epochs[name], run_dir, kept)
                print(f"[study] {time.strftime('%H:%M:%S')} {where(name, epochs[name], run_dir, kept)}", flush=True)
            if ended:
                del active[name]
                if proc.returncode:
                    failed.append(name)
                    print(f"[study] {time.strftime('%H:%M:%S')} {name} FAILED (exit {proc.returncode}); "
                          f"see {run_dir / name / 'train.log'}", flush=True)
        for name in list(todo):
            if len(active) >= jobs:
                break
            needed = dependency(keys[name])
            if needed and not is_finished(needed, epochs[needed], run_dir, kept):
                if needed in todo or needed in active:
                    continue                      # wait for the run it starts from
                raise SystemExit(f"{name} needs the finished run {needed} in {run_dir}")
            folder = run_dir / name
            if kept is not None and restore(name, run_dir, kept):
                print(f"[study] {name}: continuing from the checkpoint kept in {kept / 'resume' / name}", flush=True)
            command = train_command(name, resolve_keys(name, keys[name], run_dir, kept), run_dir)
            if (folder / "last.state.pt").is_file():
                command += ["--resume", command[command.index("--output") + 1]]
            folder.mkdir(parents=True, exist_ok=True)
            log = open(folder / "train.log", "a")
            print(f"[study] {time.strftime('%H:%M:%S')} start {name}: {shlex.join(command[1:])}", flush=True)
            active[name] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            logged[name] = len(read_metrics(folder))
            todo.remove(name)
        time.sleep(POLL_S)
    print(f"[study] {time.strftime('%H:%M:%S')} all runs ended after {(time.perf_counter() - started) / 60:.1f} min",
          flush=True)
    if failed:
        raise SystemExit(f"[study] failed runs (see their train.log): {', '.join(failed)}")


def status(patterns: list[str], run_dir: Path, recipe: str) -> None:
    """Print where each run of the selection stands."""
    kept, runs = kept_dir(recipe), load_runs()
    for name in select(list(runs), patterns or recipe_runs(recipe)):
        print(where(name, epochs_of(run_keys(name, recipe, {})), run_dir, kept))


# ------------------------------------------------------------------------------------------ report

def read_metrics(folder: Path) -> list[dict[str, float]]:
    path = folder / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as handle:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(handle)]


def record_folder(name: str, run_dir: Path, kept: Optional[Path]) -> Path:
    """The folder with run ``name``'s config and metrics: its run folder, else the kept copy."""
    if (run_dir / name / "metrics.csv").is_file() or kept is None:
        return run_dir / name
    return kept / "runs" / name


def cost_of(checkpoint: Path, images: int = 256) -> dict[str, float]:
    """Parameters, MACs and MHSA MACs per image of the model in ``checkpoint``; a learned mask's pruned
    count is averaged over ``images`` held-out images (it depends on the input)."""
    import torch
    from mait.cost import count_macs
    from mait.train.runs import held_out_images, open_run
    run = open_run(checkpoint)
    loader, info = held_out_images(run.config, images, batch_size=images)
    model = run.model(info)
    with torch.inference_mode():
        report = count_macs(model, images=next(iter(loader))[0])
    return {"depth": len(model.blocks), "params_m": report.params / 1e6, "gmacs": report.macs / 1e9,
            "mhsa_mmacs": report.mhsa / 1e6, "mhsa_sparse_mmacs": report.mhsa_sparse / 1e6}


EPOCH_LINE = re.compile(r"epoch\s+(\d+)/\d+\s")


def machines(folder: Path) -> dict[str, int]:
    """Epochs trained per machine, from the ``machine:`` line ``mait train`` logs at each start and resume
    (parts of a run logged before that line existed count as ``not logged``; an epoch logged twice counts
    where it last ran)."""
    log = folder / "train.log"
    ran_on: dict[int, str] = {}
    machine = "not logged"
    for line in log.read_text().splitlines() if log.is_file() else []:
        if line.startswith(("training ", "resuming ")):
            machine = "not logged"
        elif line.startswith("machine: "):
            machine = line.removeprefix("machine: ").rsplit(",", 1)[0]
        elif match := EPOCH_LINE.match(line):
            ran_on[int(match.group(1))] = machine
    return dict(Counter(ran_on.values()))


def run_rows(run_dir: Path, kept: Optional[Path] = None) -> list[dict[str, Any]]:
    """One row per finished run: accuracy, scheme, params, MACs, training speed and time."""
    from mait.train import load_config
    from mait.train.card import read_card

    rows = []
    for name in load_runs():
        folder = record_folder(name, run_dir, kept)
        metrics = read_metrics(folder)
        checkpoint = final_checkpoint(name, run_dir, kept)
        if not (folder / "config.yaml").is_file() or not metrics or checkpoint is None:
            continue
        config = load_config(folder / "config.yaml", {})
        if len(metrics) < config.epochs:
            continue
        speeds = [r["train_images_per_s"] for r in metrics if "train_images_per_s" in r]
        card = read_card(checkpoint) if config.scheme is None else None      # the model's own scheme
        ran_on = machines(folder)
        rows.append({"run": name, "variant": variant_of(name), "seed": config.seed,
                     "scheme": card.scheme if card else config.scheme, "mask_size": config.mask_size or 3,
                     **cost_of(checkpoint), "acc1": metrics[-1]["val_acc1"],
                     "best_acc1": max(r["val_acc1"] for r in metrics), "epochs": len(metrics),
                     "train_min": sum(r["epoch_time"] for r in metrics) / 60,
                     "img_s": statistics.median(speeds) if speeds else float("nan"),
                     "machines": "; ".join(f"{machine}: {count}" for machine, count in ran_on.items())})
    return rows


def is_baseline(variant: str) -> bool:
    """The unmasked runs (``none``, ``deep-none``) every run of the same depth and seed is paired with."""
    return variant == "none" or variant.endswith("-none")


def variant_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant: accuracy over seeds and the paired difference to its baseline of the same seed
    (the unmasked run of the same depth, or the variant :data:`PAIRED_WITH` names)."""
    baseline = {(r["depth"], r["seed"]): r["acc1"] for r in rows if is_baseline(r["variant"])}
    by_run = {(r["variant"], r["seed"]): r["acc1"] for r in rows}
    table = []
    for variant in dict.fromkeys([*VARIANTS, *(r["variant"] for r in rows)]):
        group = [r for r in rows if r["variant"] == variant]
        if not group:
            continue
        accs = [r["acc1"] for r in group]
        if variant in PAIRED_WITH:
            paired = [r["acc1"] - by_run[PAIRED_WITH[variant], r["seed"]] for r in group
                      if (PAIRED_WITH[variant], r["seed"]) in by_run]
        else:
            paired = [r["acc1"] - baseline[r["depth"], r["seed"]] for r in group if (r["depth"], r["seed"]) in baseline]

        def mean(key: str) -> float:
            values = [r[key] for r in group if key in r]
            return statistics.mean(values) if values else float("nan")

        table.append({"variant": variant, "scheme": group[0]["scheme"], "mask_size": group[0]["mask_size"],
                      "depth": group[0]["depth"], "seeds": len(group), "acc1_mean": statistics.mean(accs),
                      "acc1_std": statistics.stdev(accs) if len(accs) > 1 else float("nan"), "acc1_all": accs,
                      "baseline": PAIRED_WITH.get(variant, "none"), "delta_vs_none": paired,
                      "delta_ci95": paired_interval(paired) if len(paired) > 1 else None,
                      "params_m": group[0]["params_m"], "gmacs": group[0]["gmacs"],
                      "mhsa_mmacs": mean("mhsa_mmacs"), "mhsa_sparse_mmacs": mean("mhsa_sparse_mmacs"),
                      "img_s": mean("img_s"), "train_min": mean("train_min")})
    return table


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile with ``df`` degrees of freedom (``p > 0.5``): its density integrated by
    Simpson's rule and inverted by bisection, so the report needs no scipy."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    log_scale = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def tail_above_half(t: float, steps: int = 2000) -> float:          # P(0 < T < t), Simpson's rule
        h = t / steps
        density = [math.exp(log_scale - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(steps + 1)]
        return h / 3 * (density[0] + density[-1] + 4 * sum(density[1:-1:2]) + 2 * sum(density[2:-1:2]))

    low, high = 0.0, 1.0
    while 0.5 + tail_above_half(high) < p:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if 0.5 + tail_above_half(middle) < p else (low, middle)
    return (low + high) / 2


def paired_interval(deltas: list[float], level: float = 0.95) -> tuple[float, float]:
    """The ``level`` t-interval of the mean of paired differences (at least two)."""
    half = t_quantile((1 + level) / 2, len(deltas) - 1) * statistics.stdev(deltas) / math.sqrt(len(deltas))
    return statistics.mean(deltas) - half, statistics.mean(deltas) + half


def _number(value: float, spec: str) -> str:
    return "" if value != value else format(value, spec)        # NaN (not measured) -> empty cell


def markdown_table(table: list[dict[str, Any]]) -> str:
    lines = ["| variant | scheme | R | layers | seeds | val top-1 (mean ± std) | per seed | "
             "Δ vs baseline, same seed (mean ± std; per seed; 95 % t-interval) | params (M) | MMACs | "
             "MHSA MMACs | train img/s | train time (min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        std = "" if t["acc1_std"] != t["acc1_std"] else f" ± {t['acc1_std']:.2f}"
        seeds = " / ".join(f"{a:.2f}" for a in t["acc1_all"])
        deltas = [] if is_baseline(t["variant"]) else t["delta_vs_none"]
        delta = " / ".join(f"{d:+.2f}" for d in deltas)
        if len(deltas) > 1:                 # the paired mean is what a verdict quotes; the seeds show its spread
            low, high = t["delta_ci95"]
            delta = (f"{statistics.mean(deltas):+.2f} ± {statistics.stdev(deltas):.2f} ({delta}; "
                     f"{low:+.2f} to {high:+.2f})")
        if delta and t.get("baseline", "none") != "none":
            delta += f" (vs {t['baseline']})"
        mhsa = _number(t.get("mhsa_mmacs", float("nan")), ".2f")
        sparse = t.get("mhsa_sparse_mmacs", float("nan"))
        if mhsa and sparse == sparse and abs(sparse - t["mhsa_mmacs"]) > 1e-6:
            mhsa += f" ({sparse:.2f} pruned)"
        lines.append(f"| {t['variant']} | `{t['scheme']}` | {t['mask_size']} | {t['depth']} | {t['seeds']} | "
                     f"{t['acc1_mean']:.2f}{std} | {seeds} | {delta} | {t['params_m']:.3f} | {t['gmacs'] * 1e3:.1f} | "
                     f"{mhsa} | {_number(t.get('img_s', float('nan')), '.0f')} | {t['train_min']:.1f} |")
    return "\n".join(lines)


def runs_table(rows: list[dict[str, Any]]) -> str:
    """One line per finished run: where each figure of the variant table comes from, and where it ran."""
    lines = ["| run | val top-1 | best | epochs | training time (h) | median train img/s | machine: epochs |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['acc1']:.2f} | {r['best_acc1']:.2f} | {r.get('epochs', '')} | "
                     f"{r['train_min'] / 60:.2f} | {_number(r.get('img_s', float('nan')), '.0f')} | "
                     f"{r.get('machines', '')} |")
    return "\n".join(lines)


def plot_accuracy(table: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7.5, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for i, t in enumerate(table):
        ax.bar(i, t["acc1_mean"], color="tab:gray" if is_baseline(t["variant"]) else "tab:blue", alpha=0.6)
        ax.scatter([i] * len(t["acc1_all"]), t["acc1_all"], color="black", s=14, zorder=3)
    ax.set_xticks(range(len(table)), [f"{t['variant']}\n({t['depth']} layers)" if t["depth"] != table[0]["depth"]
                                      else t["variant"] for t in table], fontsize=8)
    low = min(a for t in table for a in t["acc1_all"])
    ax.set_ylim(max(0.0, low - 5), max(a for t in table for a in t["acc1_all"]) + 2)
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("CIFAR-10 study: final validation top-1 per variant (bars: mean, dots: seeds)", fontsize=10)
    fig.savefig(path, dpi=120)


def plot_curves(curves: dict[str, list[dict[str, float]]], epochs: dict[str, int], path: Path) -> None:
    """Validation top-1 per epoch of every run, finished or not (one colour per variant, one line style per
    seed), beside a zoom on the last 40 % of the epochs, where the runs converge and the arms separate; the
    fine-tunes that start from a finished run are drawn after its last epoch."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(12.0, 5.0), layout="constrained")
    whole, zoom = fig.subplots(1, 2, width_ratios=[3, 2])
    variants = list(dict.fromkeys(variant_of(n) for n in curves))
    colours = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    styles = ["-", "--", ":"]
    runs = load_runs()
    lines = {}
    for name, rows in curves.items():
        source = runs[name].get("from")
        offset = len(curves.get(source, [])) if source else 0
        lines[name] = ([offset + r["epoch"] for r in rows], [r["val_acc1"] for r in rows])
    last = max(x for xs, _ in lines.values() for x in xs)
    start = max(1.0, 0.6 * last)
    for name, (xs, ys) in lines.items():
        seed = int(name.rsplit("-s", 1)[1])
        done = "" if len(xs) >= epochs[name] else f" ({len(xs)}/{epochs[name]} epochs)"
        for ax in (whole, zoom):
            ax.plot(xs, ys, styles[seed % 3], color=colours[variant_of(name)], label=f"{name}{done}", linewidth=1.2)
    late = [y for xs, ys in lines.values() for x, y in zip(xs, ys) if x >= start]
    zoom.set_xlim(start, last + 0.5)
    if late:
        zoom.set_ylim(min(late) - 0.5, max(late) + 0.5)
    for ax in (whole, zoom):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    whole.set_ylabel("validation top-1 (%)")
    whole.set_title("CIFAR-10 study: validation top-1 per epoch (line style: seed)", fontsize=10)
    zoom.set_title(f"from epoch {start:.0f}", fontsize=10)
    whole.legend(fontsize=7, ncol=3)
    fig.savefig(path, dpi=120)


def plot_als_by_layer(als: dict[str, list[list[float]]], path: Path) -> None:
    """ALS of every head against depth, one panel per variant (does locality fade with depth?)."""
    from matplotlib.figure import Figure
    cols = min(3, len(als))
    rows = -(-len(als) // cols)
    fig = Figure(figsize=(4.0 * cols, 3.2 * rows), layout="constrained")
    for i, (variant, table) in enumerate(als.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for head in range(len(table[0])):
            ax.plot(range(len(table)), [layer[head] for layer in table], marker="o", label=f"head {head}")
        ax.set_ylim(0, 1)
        ax.set_xlabel("layer")
        ax.set_ylabel("ALS")
        ax.set_title(f"{variant}", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("Attention Locality Score per layer and head (seed 0, 1,000 held-out images; R = 3)", fontsize=10)
    fig.savefig(path, dpi=120)


def analyse(run_dir: Path, out: Path, earlier: dict[str, Any], kept: Optional[Path] = None) -> dict[str, Any]:
    """ALS of the seed-0 models, α of the soft models, similarity of the deeper pair
    (``earlier`` holds the last report's values, kept for runs whose folders are gone)."""
    import torch
    from mait.analysis import (last_layers_similarity, measure_als, measure_similarity, model_scheme,
                               read_alphas, save_report)
    from mait.analysis.plots import plot_similarity
    from mait.train.runs import held_out_images, open_run

    def model_and_images(name: str, images: int):
        run = open_run(final_checkpoint(name, run_dir, kept))
        loader, info = held_out_images(run.config, images, batch_size=250)
        return run.model(info), loader

    found: dict[str, Any] = {key: dict(earlier.get(key) or {}) for key in ("als", "alphas", "similarity")}
    with torch.inference_mode():
        for variant in ["none", "sch1", "mixed", "soft", "random", "search"]:
            name = f"{variant}-s0"
            if final_checkpoint(name, run_dir, kept) is None:
                continue
            model, loader = model_and_images(name, ALS_IMAGES)
            als = measure_als(model, loader, mask_size=3)
            found["als"][variant] = [a.tolist() for a in als]
            save_report(als, out, f"als_{variant}", scheme=model_scheme(model), colorbar_label="ALS (R = 3)",
                        title=f"ALS of run {name} ({ALS_IMAGES} held-out images, R = 3)")
        for name in [n for n in load_runs() if variant_of(n) == "soft"]:
            if final_checkpoint(name, run_dir, kept) is not None:
                model, _ = model_and_images(name, 1)
                alphas = read_alphas(model)
                found["alphas"][name] = [a.tolist() for a in alphas]
                save_report(alphas, out, f"alpha_{name}", colorbar_label="α (0 hard mask, 1 unmasked)",
                            title=f"Learned soft-mask α of run {name}", cmap="coolwarm")
        for variant in ["deep-none", "deep-mixed"]:
            name = f"{variant}-s0"
            if final_checkpoint(name, run_dir, kept) is None:
                continue
            model, loader = model_and_images(name, SIMILARITY_IMAGES)
            similarity = measure_similarity(model, loader)
            depth = similarity.shape[-1]
            last = {k: last_layers_similarity(similarity, k).tolist() for k in (3, depth // 2)}
            found["similarity"][variant] = {"matrix": similarity.tolist(), "last": last}
            plot_similarity(similarity, out, stem=f"similarity_{variant}",
                            title=f"Cross-layer similarity, {name}")
    if found["als"]:
        plot_als_by_layer(found["als"], out / "als_by_layer.png")
    return found


def earlier_record(results: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and analyses of the last report in ``results``, for runs whose folders are gone."""
    summary = results / "summary.json"
    if not summary.is_file():
        return [], {}
    record = json.loads(summary.read_text())
    return record.get("runs", []), {k: record.get(k) for k in ("als", "alphas", "similarity", "search")}


def report(run_dir: Path, results: Optional[Path] = None, kept: Optional[Path] = None) -> None:
    """Tables and figures from the run folders (or the runs ``kept`` in the repository) into ``results``
    (default :data:`RESULTS`); runs reported before whose folders are gone (a fresh machine) keep the
    figures of the last report, so partial re-runs add to it."""
    results = results or RESULTS
    results.mkdir(parents=True, exist_ok=True)
    old_rows, old_found = earlier_record(results)
    rows = run_rows(run_dir, kept)
    curves = {name: read_metrics(record_folder(name, run_dir, kept)) for name in load_runs()}
    curves = {name: rows_ for name, rows_ in curves.items() if rows_}
    if curves:
        epochs = {name: epochs_of(yaml.safe_load((record_folder(name, run_dir, kept) / "config.yaml").read_text()))
                  for name in curves}
        plot_curves(curves, epochs, results / "accuracy_per_epoch.png")
    fresh = {r["run"] for r in rows}
    earlier = [r for r in old_rows if r["run"] not in fresh]
    if earlier:
        print(f"[study] keeping the last report's figures for {len(earlier)} runs not in {run_dir}: "
              f"{', '.join(r['run'] for r in earlier)}", flush=True)
    order = list(load_runs())
    rows = sorted(rows + earlier, key=lambda r: order.index(r["run"]) if r["run"] in order else len(order))
    if not rows:
        raise SystemExit(f"no finished run in {run_dir}; run the study first")
    table = variant_table(rows)
    with (results / "runs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_accuracy(table, results / "accuracy.png")
    found = analyse(run_dir, results, old_found, kept)
    search = run_dir / "search" / "search.json"
    found["search"] = json.loads(search.read_text()) if search.is_file() else old_found.get("search")
    (results / "summary.json").write_text(json.dumps({"variants": table, "runs": rows, **found}, indent=1) + "\n")
    text = ["# CIFAR-10 study: results (written by `study.py report`)", "", markdown_table(table), "",
            "Per run (training time: the sum of the epochs' wall times; machine: the CPU or GPU each epoch ran on, "
            "as `mait train` logs it):", "", runs_table(rows), ""]
    for variant, values in found["similarity"].items():
        for k, per_head in values["last"].items():
            text.append(f"- {variant}: mean similarity among the last {k} layers per head "
                        f"{' / '.join(f'{v:.3f}' for v in per_head)} (mean {statistics.mean(per_head):.3f})")
    for name, alphas in found["alphas"].items():
        text.append(f"- α of {name} per layer (heads): " +
                    "; ".join(" ".join(f"{a:.2f}" for a in layer) for layer in alphas))
    if found["search"]:
        text.append(f"- search on {found['search']['source']}: decisions {', '.join(found['search']['decisions'])}"
                    f" -> `{found['search']['scheme']}`")
    (results / "summary.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


def key_values(pairs: list[str]) -> dict[str, Any]:
    """``["compile=true", "batch_size=256"]`` -> mait train keys (values read as YAML)."""
    keys = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        keys[key.replace("-", "_")] = yaml.safe_load(value)
    return keys


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe_help = "short: base.yaml's 2 epochs; full: the 50-epoch study; smoke: 2 epochs on subsets"
    parser.add_argument("--recipe", default="short", choices=list(RECIPES), help=recipe_help)
    parser.add_argument("--runs-dir", type=Path, help="where the run folders live (default runs/cifar10-study[-RECIPE])")
    sub = parser.add_subparsers(dest="action", required=True)

    def action(name: str, help: str) -> argparse.ArgumentParser:
        """A sub-command that also takes --recipe after its name."""
        command = sub.add_parser(name, help=help)
        command.add_argument("--recipe", choices=list(RECIPES), default=argparse.SUPPRESS, help=recipe_help)
        return command

    run = action("run", "train the runs not finished yet (resuming killed ones)")
    run.add_argument("patterns", nargs="*", help="run names or globs from runs.yaml, started in this order "
                     "(default: the recipe's runs)")
    run.add_argument("--jobs", type=int, default=2, help="runs side by side (default 2)")
    run.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="device of every run (default: mait train's)")
    run.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more mait train keys for every run")
    run.add_argument("--keep", action=argparse.BooleanOptionalAction, default=None,
                     help="keep the runs in experiments/cifar10/results-RECIPE/ (default: for the full recipe)")
    state = action("status", "where each run stands: epoch, validation top-1, images/s, time left")
    state.add_argument("patterns", nargs="*", help="run names or globs (default: the recipe's runs)")
    reporting = action("report", "tables and figures from the finished runs into experiments/cifar10/results[-RECIPE]")
    reporting.add_argument("--results", type=Path, help="output folder (default experiments/cifar10/results[-RECIPE])")
    command = action("command", "print the `mait train` command of one run")
    command.add_argument("name")
    args = parser.parse_args(argv)
    suffix = "" if args.recipe == "short" else f"-{args.recipe}"
    run_dir = args.runs_dir or DEFAULT_RUN_DIR.with_name(DEFAULT_RUN_DIR.name + suffix)
    if args.action == "run":
        extra = key_values(args.set) | ({"device": args.device} if args.device else {})
        run_study(args.patterns, args.jobs, args.threads, run_dir, args.recipe, extra, args.keep)
    elif args.action == "status":
        status(args.patterns, run_dir, args.recipe)
    elif args.action == "report":
        report(run_dir, args.results or RESULTS.with_name(RESULTS.name + suffix), kept_dir(args.recipe))
    else:
        runs = load_runs()
        if args.name not in runs:
            raise SystemExit(f"unknown run {args.name!r}; runs: {', '.join(runs)}")
        keys = resolve_keys(args.name, run_keys(args.name, args.recipe, {}), run_dir, kept_dir(args.recipe))
        print(shlex.join(["mait", *train_command(args.name, keys, run_dir)[3:]]))


if __name__ == "__main__":
    main()
