"""The quick empirical mask search of the paper (§4.3; docs/analysis.md).

1. **Initialisation**: hard-mask head 0 of every layer (Sch.1) and train for a budget.
2. **Assignment** from the ALS of head 0 of each layer ``l`` on held-out data:
   ``> high`` (0.65) mask all heads of ``l`` (then calibrate); ``low..high`` keep head 0's
   mask only; ``< low`` (0.35) remove the mask.
3. **Calibration**: in the layers that got all heads masked, remove the mask of every head
   whose own ALS is ``< low``.  By default those ALS come from a second training run with
   the assigned scheme (each head measured *as a masked head*, the paper's "2-3 training
   iterations"); ``calibration="initial"`` reuses the first run's per-head ALS instead.
4. Optionally retrain the final scheme and report its accuracy.

The rules (:func:`assign`, :func:`calibrate`) are pure functions of an ALS table, separate
from the training (:func:`run_search`), so they can be checked on hand-made tables.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from .analysis import measure_als, model_scheme, save_report
from .train.runs import held_out_images
from .errors import Interrupted, UserError
from .schemes import HeadKind, MaskingScheme
from .train import TrainConfig, build_model, load_weights, open_data, train
from .train.checkpoint import STATE

ALL, KEEP, REMOVE = "all", "keep", "remove"
AlsTable = Sequence[Sequence[float]]


@dataclass(frozen=True)
class Thresholds:
    """ALS thresholds of the assignment: above ``high`` mask all heads, below ``low`` remove."""

    high: float = 0.65
    low: float = 0.35

    def __post_init__(self) -> None:
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(f"thresholds must satisfy 0 <= low <= high <= 1, got low={self.low}, high={self.high}")


@dataclass(frozen=True)
class Assignment:
    """Result of step 2: the scheme, and per layer the branch taken (``all`` / ``keep`` / ``remove``)."""

    scheme: MaskingScheme
    decisions: tuple[str, ...]


def _check_table(als: AlsTable) -> list[list[float]]:
    table = [[float(v) for v in layer] for layer in als]
    if not table or any(len(layer) == 0 for layer in table):
        raise ValueError("the ALS table needs at least one layer, each with at least one head")
    bad = [(i, h, v) for i, layer in enumerate(table) for h, v in enumerate(layer) if not 0.0 <= v <= 1.0]
    if bad:
        raise ValueError(f"ALS values must lie in [0, 1]; got (layer, head, value) {bad[:4]}")
    return table


def assign(als: AlsTable, thresholds: Thresholds = Thresholds()) -> Assignment:
    """Step 2: assign each layer from the ALS of its head 0 (measured on the Sch.1 model)."""
    table = _check_table(als)
    layers, decisions = [], []
    for layer in table:
        heads = len(layer)
        if layer[0] > thresholds.high:
            decisions.append(ALL)
            layers.append((HeadKind.HARD,) * heads)
        elif layer[0] >= thresholds.low:
            decisions.append(KEEP)
            layers.append((HeadKind.HARD,) + (HeadKind.NONE,) * (heads - 1))
        else:
            decisions.append(REMOVE)
            layers.append((HeadKind.NONE,) * heads)
    return Assignment(MaskingScheme(tuple(layers)), tuple(decisions))


def calibrate(assignment: Assignment, als: AlsTable, thresholds: Thresholds = Thresholds()) -> MaskingScheme:
    """Step 3: in the ``all`` layers, unmask every head whose own ALS is below ``thresholds.low``."""
    table = _check_table(als)
    if [len(layer) for layer in table] != list(assignment.scheme.num_heads):
        raise ValueError(f"the ALS table has {[len(layer) for layer in table]} heads per layer but the "
                         f"assigned scheme has {list(assignment.scheme.num_heads)}")
    layers = []
    for kinds, decision, layer in zip(assignment.scheme.layers, assignment.decisions, table):
        if decision == ALL:
            kinds = tuple(HeadKind.HARD if value >= thresholds.low else HeadKind.NONE for value in layer)
        layers.append(kinds)
    return MaskingScheme(tuple(layers))


# ---------------------------------------------------------------------------- the search, with training

CALIBRATION = ("retrain", "initial")


@dataclass
class SearchResult:
    """What :func:`run_search` found; accuracies in %, per step name (``sch1``, ``assigned``, ``final``)."""

    scheme: MaskingScheme
    assignment: Assignment
    als: dict[str, list[list[float]]]
    accuracy: dict[str, float]
    output: Path
    wall_time: float
    steps: list[str] = field(default_factory=list)


def _train_and_measure(config: TrainConfig, scheme: MaskingScheme | str, epochs: int, folder: Path,
                       als_images: int, resume: bool = False) -> tuple[list[torch.Tensor], float]:
    """Train ``scheme`` for ``epochs`` (with ``resume``: continue a saved run in ``folder``); return the
    final model's ALS per layer/head on held-out images, and its accuracy."""
    step = TrainConfig.from_dict({"scheme": str(scheme), "epochs": epochs, "output": str(folder)}, base=config)
    try:
        result = train(step, resume=resume and (folder / STATE).is_file())
    except Interrupted as stop:
        kept = f"its last checkpoint is {stop.checkpoint}" if stop.checkpoint else "before its first checkpoint"
        raise Interrupted(f"search interrupted while training {folder.name} ({kept}); continue the search with "
                          f"the same options plus --resume --output {folder.parent}", stop.checkpoint) from None
    loader, info = held_out_images(step, als_images, batch_size=max(step.batch_size, 64))
    model = build_model(step, info)
    load_weights(model, result.last_checkpoint)
    return measure_als(model, loader), result.final_acc1


def _report(name: str, als: list[torch.Tensor], scheme: MaskingScheme, output: Path, title: str) -> None:
    print(save_report(als, output, f"als_{name}", title=title, scheme=scheme,
                      colorbar_label="ALS (attention on the neighbourhood)"))


def run_search(config: TrainConfig, *, epochs: Optional[int] = None, thresholds: Thresholds = Thresholds(),
               calibration: str = "retrain", retrain_epochs: int = 0, als_images: int = 512,
               output: Optional[Path] = None, resume: bool = False) -> SearchResult:
    """The quick empirical search, end to end, on ``config``'s model and data (its scheme is replaced).

    Every training step runs for ``epochs`` (default: ``config.epochs``); ``retrain_epochs > 0``
    trains the final scheme once more and reports its accuracy.  Writes, in ``output``: one
    training run folder per step, ``als_<step>.{txt,csv,png}``, ``scheme.txt`` and ``search.json``.
    With ``resume`` an interrupted search in ``output`` continues: finished steps are read back,
    an interrupted one resumes from its last checkpoint.
    """
    if calibration not in CALIBRATION:
        raise UserError(f"calibration must be one of {CALIBRATION}, got {calibration!r}")
    epochs = config.epochs if epochs is None else epochs
    if epochs < 1 or retrain_epochs < 0:
        raise UserError(f"search epochs must be >= 1 and retrain epochs >= 0, got {epochs} and {retrain_epochs}")
    output = Path(output or config.output or f"runs/search-{config.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not resume and ((output / "search.json").exists() or (output / "step1-sch1").exists()):
        raise UserError(f"{output} already holds a search; continue it with --resume or choose another --output")
    start = time.perf_counter()
    accuracy: dict[str, float] = {}
    tables: dict[str, list[list[float]]] = {}

    # 1. initialisation: head 0 hard-masked in every layer, trained for the budget
    heads = model_scheme(build_model(config, open_data(config.data, config.holdout_per_class, need_train=False)[2]))
    initial = MaskingScheme.parse("sch1", heads.depth, heads.num_heads)
    print(f"[search] step 1: train {config.model} with Sch.1 ({initial}) for {epochs} epochs")
    als, accuracy["sch1"] = _train_and_measure(config, initial, epochs, output / "step1-sch1", als_images,
                                            resume)
    tables["sch1"] = [a.tolist() for a in als]
    _report("sch1", als, initial, output, f"Step 1: ALS of {config.model} trained with Sch.1\n"
            f"(top-1 {accuracy['sch1']:.2f} %; head 0 decides each layer)")

    # 2. assignment from head 0
    assignment = assign(tables["sch1"], thresholds)
    print(f"[search] step 2: assignment (> {thresholds.high} all heads, {thresholds.low}-{thresholds.high} keep, "
          f"< {thresholds.low} remove): {', '.join(f'{i}:{d}' for i, d in enumerate(assignment.decisions))}")
    print(f"[search] assigned scheme: {assignment.scheme}")
    scheme, steps = assignment.scheme, ["sch1"]

    # 3. calibration of the all-heads layers
    if ALL in assignment.decisions:
        if calibration == "retrain":
            print(f"[search] step 3: train the assigned scheme for {epochs} epochs to calibrate its all-heads layers")
            als, accuracy["assigned"] = _train_and_measure(config, assignment.scheme, epochs,
                                                           output / "step2-assigned", als_images, resume)
            tables["assigned"] = [a.tolist() for a in als]
            steps.append("assigned")
            _report("assigned", als, assignment.scheme, output,
                    f"Step 3: ALS of {config.model} trained with the assigned scheme\n"
                    f"(top-1 {accuracy['assigned']:.2f} %; calibrates the all-heads layers)")
        scheme = calibrate(assignment, tables[steps[-1]], thresholds)
        print(f"[search] calibrated scheme (heads with ALS < {thresholds.low} unmasked): {scheme}")
    (output / "scheme.txt").write_text(f"{scheme}\n")

    # 4. optional retraining of the result
    if retrain_epochs:
        print(f"[search] step 4: retrain the searched scheme for {retrain_epochs} epochs")
        als, accuracy["final"] = _train_and_measure(config, scheme, retrain_epochs, output / "step3-final",
                                                    als_images, resume)
        tables["final"] = [a.tolist() for a in als]
        steps.append("final")
        _report("final", als, scheme, output, f"ALS of {config.model} retrained with the searched scheme\n"
                f"(top-1 {accuracy['final']:.2f} %)")
    result = SearchResult(scheme, assignment, tables, accuracy, output, time.perf_counter() - start, steps)
    summary = {"model": config.model, "data": config.data, "epochs": epochs, "retrain_epochs": retrain_epochs,
               "thresholds": asdict(thresholds), "calibration": calibration, "initial_scheme": str(initial),
               "decisions": list(assignment.decisions), "assigned_scheme": str(assignment.scheme),
               "scheme": str(scheme), "accuracy": accuracy, "als": tables, "wall_time_s": round(result.wall_time, 1)}
    (output / "search.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[search] searched scheme: {scheme}\n{scheme.describe()}")
    print(f"[search] wrote scheme.txt, search.json and the ALS tables in {output} ({result.wall_time:.0f} s)")
    return result

