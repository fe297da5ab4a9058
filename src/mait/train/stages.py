"""Training in stages: each with its own epochs, learning-rate schedule, trainable parameters and loss.

A run's ``stages:`` (docs/training.md) is a list of mappings; every key a stage leaves out
comes from the run's own keys.  The Sparsifiner release trains in two:

    stages:
      - {name: reconstruct, epochs: 5, lr: 3.0e-4, min_lr: 2.0e-4, warmup_epochs: 3,
         train: predictor, predictor: reconstruct, losses: {reconstruction: 0.01}}
      - {name: sparse, epochs: 45, lr: 8.0e-5, min_lr: 2.0e-6, warmup_epochs: 3,
         train: backbone, predictor: frozen, losses: {ce: 1.0, kl: 0.5, tokens: 0.5}}

``train`` names the parameters the stage's optimizer updates (``all``, ``backbone``: every
parameter outside the connectivity predictors, ``predictor``: only theirs; the others are
frozen); ``predictor`` is the learned heads' phase (:func:`mait.learned.set_phase`);
``losses`` weights the terms of :mod:`mait.train.objectives`.  Each stage starts a fresh
optimizer and a schedule of its own: a linear warm-up from ``warmup_lr`` over
``warmup_epochs`` (fractions allowed, rounded to whole steps), then a cosine to ``min_lr``
over the rest of the stage.  Without ``stages:`` a run is one stage made of its own keys,
scheduled as before (the warm-up inside the cosine), every parameter trained.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from ..errors import UserError
from ..learned import PHASES, predictors, set_phase
from .config import TrainConfig

TRAINABLE = ("all", "backbone", "predictor")
STAGE_KEYS = ("name", "epochs", "lr", "min_lr", "warmup_epochs", "warmup_lr", "train", "predictor", "losses")


@dataclass(frozen=True)
class Stage:
    """One stage of a run (see the module docs)."""

    name: str
    epochs: int
    lr: float
    min_lr: float
    warmup_epochs: float
    warmup_lr: float
    train: str = "all"
    predictor: str = "joint"
    losses: Mapping[str, float] = field(default_factory=dict)
    warmup_prefix: bool = True       # the warm-up before the cosine (stages) or inside it (a run without stages)


def default_losses(config: TrainConfig) -> dict[str, float]:
    """A run's loss without ``stages:``: the class criterion, DeiT's hard distillation when it has a teacher,
    and the learned heads' reconstruction loss."""
    if config.teacher is None:
        return {"ce": 1.0, "reconstruction": config.reconstruction_weight}
    alpha = config.distillation_alpha
    return {"ce": 1.0 - alpha, "hard_distillation": alpha, "reconstruction": config.reconstruction_weight}


def _number(where: str, key: str, value: Any, kind: type = float, minimum: float = 0.0) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum or \
            (kind is int and float(value) != int(value)):
        raise UserError(f"{where}: {key} must be {'an integer' if kind is int else 'a number'} >= {minimum:g}, "
                        f"got {value!r}")
    return kind(value)


def parse_stage(index: int, spec: Any, config: TrainConfig) -> Stage:
    """One entry of ``stages:``, its missing keys taken from ``config``; a one-line error for a bad one."""
    where = f"stage {index + 1}"
    if not isinstance(spec, Mapping):
        raise UserError(f"{where}: a stage is a mapping of {', '.join(STAGE_KEYS)}, got {spec!r}")
    for key in spec:
        if key not in STAGE_KEYS:
            close = difflib.get_close_matches(str(key), STAGE_KEYS, n=1)
            raise UserError(f"{where}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else
                                                               f"; the keys are {', '.join(STAGE_KEYS)}"))
    where = f"stage {index + 1} ({spec.get('name', f'stage{index + 1}')})"
    stage = Stage(name=str(spec.get("name", f"stage{index + 1}")),
                  epochs=_number(where, "epochs", spec.get("epochs", config.epochs), int, 1),
                  lr=_number(where, "lr", spec.get("lr", config.lr)),
                  min_lr=_number(where, "min_lr", spec.get("min_lr", config.min_lr)),
                  warmup_epochs=_number(where, "warmup_epochs", spec.get("warmup_epochs", config.warmup_epochs)),
                  warmup_lr=_number(where, "warmup_lr", spec.get("warmup_lr", config.warmup_lr)),
                  train=spec.get("train", "all"), predictor=spec.get("predictor", "joint"),
                  losses=dict(spec.get("losses", default_losses(config))))
    for key, allowed in (("train", TRAINABLE), ("predictor", PHASES)):
        if getattr(stage, key) not in allowed:
            raise UserError(f"{where}: {key} must be one of {', '.join(allowed)}, got {getattr(stage, key)!r}")
    if stage.warmup_epochs >= stage.epochs:
        raise UserError(f"{where}: warmup_epochs ({stage.warmup_epochs:g}) must be shorter than the stage "
                        f"({stage.epochs} epochs)")
    for term, weight in stage.losses.items():
        _number(where, f"the weight of loss term {term!r}", weight)
    learns = bool(stage.losses.get("reconstruction"))
    if learns and stage.predictor == "frozen":
        raise UserError(f"{where}: the reconstruction loss trains the predictor, which predictor: frozen keeps "
                        f"still; use predictor: reconstruct or joint")
    if stage.predictor == "frozen" and stage.train != "backbone":
        raise UserError(f"{where}: with predictor: frozen nothing reaches the predictor; use train: backbone")
    if stage.train == "predictor" and not learns:
        raise UserError(f"{where}: train: predictor updates only the connectivity predictors, which learn only "
                        f"from the reconstruction loss; give losses a reconstruction weight")
    return stage


def plan_stages(config: TrainConfig) -> list[Stage]:
    """The stages of ``config``: its ``stages:`` (their epochs must add up to ``epochs``), or one stage made of
    the run's own keys."""
    if not config.stages:
        return [Stage("train", config.epochs, config.lr, config.min_lr, config.warmup_epochs, config.warmup_lr,
                      losses=default_losses(config), warmup_prefix=False)]
    stages = [parse_stage(index, spec, config) for index, spec in enumerate(config.stages)]
    total = sum(stage.epochs for stage in stages)
    if total != config.epochs:
        parts = " + ".join(f"{stage.name} {stage.epochs}" for stage in stages)
        raise UserError(f"epochs is {config.epochs} but the stages add up to {total} ({parts}); set epochs: {total} "
                        f"or change the stages' epochs")
    return stages


def stage_at(stages: list[Stage], epoch: int) -> tuple[int, int]:
    """``(index, first epoch)`` of the stage that trains (0-based) ``epoch``; the last stage past the end."""
    start = 0
    for index, stage in enumerate(stages):
        if epoch < start + stage.epochs or index == len(stages) - 1:
            return index, start
        start += stage.epochs
    raise ValueError("a run has at least one stage")


def set_trainable(model: nn.Module, train: str) -> None:
    """``requires_grad`` per ``train``: every parameter, all but the connectivity predictors', or only theirs."""
    own = {id(param) for predictor in predictors(model) for param in predictor.parameters()}
    if train == "predictor" and not own:
        raise UserError("a stage trains only the connectivity predictors (train: predictor), but the model has "
                        "no learned heads")
    for param in model.parameters():
        param.requires_grad_(train == "all" or (id(param) in own) == (train == "predictor"))


def enter_stage(config: TrainConfig, model: nn.Module, stage: Stage, steps: int) -> tuple[Any, Any]:
    """Make ``model`` train as ``stage`` says; returns its fresh optimizer and learning-rate schedule."""
    set_trainable(model, stage.train)
    set_phase(model, stage.predictor)
    optimizer = create_optimizer_v2(model, opt=config.opt, lr=stage.lr, weight_decay=config.weight_decay,
                                    momentum=config.momentum)
    warmup = round(stage.warmup_epochs * steps) / steps
    scheduler, _ = create_scheduler_v2(optimizer, sched=config.sched,
                                       num_epochs=stage.epochs - (warmup if stage.warmup_prefix else 0),
                                       warmup_epochs=warmup, warmup_lr=stage.warmup_lr, min_lr=stage.min_lr,
                                       warmup_prefix=stage.warmup_prefix, step_on_epochs=False,
                                       updates_per_epoch=steps)
    return optimizer, scheduler


def stage_summary(stages: list[Stage]) -> Optional[str]:
    """One line naming the stages of a staged run (None for a run without ``stages:``)."""
    if len(stages) == 1 and not stages[0].warmup_prefix:
        return None
    return "stages: " + "; ".join(f"{stage.name} ({stage.epochs} epochs, train {stage.train}, predictor "
                                  f"{stage.predictor}, losses {dict(stage.losses)})" for stage in stages)
