"""The training loop (DeiT recipe from timm's parts), evaluation, and the run's checkpoints.

:func:`train` is the programmatic entry point (``mait train`` is a thin layer over it):
it builds data and model from a :class:`TrainConfig`, trains with timm's optimizer,
scheduler, EMA and losses, evaluates every epoch, keeps ``last`` and ``best`` checkpoints,
and resumes a killed run exactly, mid-epoch included.  Under ``torchrun`` it trains with
DistributedDataParallel; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import ModelEmaV3, random_seed
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..errors import Interrupted, UserError
from . import checkpoint as ckpt
from .card import ModelCard, check_against_card, make_card
from .config import TrainConfig
from .data import Loaders, build_loaders, build_transforms, per_rank_batch
from .distributed import Dist, all_sum, cleanup, setup
from .logs import PLOT_NAME, RunLog, epoch_line, plot_curves, progress_bar
from .models import build_model
from .objectives import Objective, build_criterion, build_teacher
from .precision import choose_precision, device_name
from .stages import enter_stage, plan_stages, stage_at, stage_summary


@dataclass
class TrainResult:
    """What a finished run produced (accuracies in %)."""

    best_acc1: float
    best_epoch: int
    final_acc1: float
    final_acc5: float
    final_loss: float
    output: Path
    last_checkpoint: Path
    best_checkpoint: Path
    plot: Optional[Path]
    wall_time: float
    history: list[dict[str, Any]] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, env: Optional[Dist] = None,
             amp_dtype: Optional[torch.dtype] = None, progress: bool = False) -> dict[str, float]:
    """Top-1/top-5 accuracy (%), mean cross-entropy and images/s over ``loader``, summed over all processes."""
    env = env or Dist(0, 1, next(model.parameters()).device)
    model.eval()
    loss_sum = correct1 = correct5 = count = 0.0
    start = time.perf_counter()
    for images, targets in progress_bar(progress and env.is_main, loader, desc="eval", leave=False):
        images, targets = images.to(env.device, non_blocking=True), targets.to(env.device, non_blocking=True)
        with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == targets[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += len(targets)
    elapsed = time.perf_counter() - start
    loss_sum, correct1, correct5, count = all_sum([loss_sum, correct1, correct5, count], env)
    if count == 0:
        raise UserError("the validation set is empty")
    return {"loss": loss_sum / count, "acc1": 100 * correct1 / count, "acc5": 100 * correct5 / count,
            "images": int(count), "images_per_s": count / max(elapsed, 1e-9)}


def _default_output(config: TrainConfig, env: Dist) -> Path:
    name = "digits" if config.data == "digits" else Path(config.data).name.split(".")[0]
    stamp = [datetime.now().strftime("%Y%m%d-%H%M%S")]
    if env.enabled:                      # every rank must agree on the folder
        dist.broadcast_object_list(stamp, src=0)
    return Path("runs") / f"{config.model}-{name}-{stamp[0]}"


def _gather(obj: Any, env: Dist) -> list[Any]:
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


class _Run:
    """The mutable parts of one run that a checkpoint must capture."""

    def __init__(self, config: TrainConfig, env: Dist, output: Path, loaders: Loaders, model: nn.Module,
                 card: ModelCard, teacher: Optional[nn.Module]) -> None:
        self.config, self.env, self.output, self.loaders, self.model = config, env, output, loaders, model
        self.card, self.teacher = card, teacher
        self.steps = loaders.steps_per_epoch
        self.stages, self.stage, self.stage_start = plan_stages(config), -1, 0
        self.criterion = build_criterion(config, loaders.mixup is not None)
        self.objective: Optional[Objective] = None
        self.ema = ModelEmaV3(model, decay=config.ema_decay) if config.ema else None
        self.enter_stage(0)               # after the EMA's copy: the loss's hooks stay on the trained model
        self.precision = choose_precision(config.amp, env.device)
        self.amp_dtype = self.precision.dtype
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.amp_dtype == torch.float16)
        self.epoch, self.step, self.history = 0, 0, []
        self.loss_sum, self.loss_count, self.recon_sum = 0.0, 0, 0.0
        self.best_acc1, self.best_epoch = -1.0, 0
        self.images_per_s = 0.0                  # training throughput of the last epoch
        self.saved: Optional[tuple[int, int]] = None      # (epoch, step) of the last checkpoint on disk

    def enter_stage(self, index: int) -> bool:
        """Train as stage ``index`` says from here (fresh optimizer, schedule and loss); False if already so."""
        if index == self.stage:
            return False
        stage, config = self.stages[index], self.config
        self.stage, self.stage_start = index, sum(s.epochs for s in self.stages[:index])
        self.optimizer, self.scheduler = enter_stage(config, self.model, stage, self.steps)
        if self.objective is not None:
            self.objective.close()
        self.objective = Objective(stage.losses, self.criterion, self.teacher, self.model,
                                   config.reconstruction_target, config.reconstruction_reduction)
        return True

    def save(self) -> None:
        """Write weights + training state (all ranks take part in gathering; rank 0 writes)."""
        per_rank = _gather({"rng": ckpt.rng_states(), "loss": (self.loss_sum, self.loss_count),
                            "recon": self.recon_sum}, self.env)
        self.saved = (self.epoch, self.step)
        if not self.env.is_main:
            return
        # The state holds the weights too, so it alone is a complete resume point: a process killed between
        # the two writes leaves a state that resumes exactly, whatever last.safetensors holds.
        ckpt.save_state({
            "epoch": self.epoch, "step": self.step, "model": ckpt.weights_of(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
            "scaler": self.scaler.state_dict(), "ranks": per_rank, "history": self.history,
            "best": (self.best_acc1, self.best_epoch), "world_size": self.env.world_size, "stage": self.stage,
        }, self.output / ckpt.STATE)
        ckpt.save_weights(self.model, self.output / ckpt.LAST, self.card.metadata(epoch=self.epoch))

    def restore(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.env.world_size:
            raise UserError(f"the run was saved with {state['world_size']} processes; resume it with as many "
                            f"(got {self.env.world_size})")
        if "model" in state:
            ckpt.load_tensors(self.model, state["model"], self.output / ckpt.STATE)
        else:                                             # states written before they held the weights
            ckpt.load_weights(self.model, self.output / ckpt.LAST)
        self.enter_stage(state.get("stage", 0))          # the stage whose optimizer was saved
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.scaler.load_state_dict(state["scaler"])
        mine = state["ranks"][self.env.rank]
        ckpt.set_rng_states(mine["rng"])
        self.loss_sum, self.loss_count = mine["loss"]
        self.recon_sum = mine.get("recon", 0.0)
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        self.best_acc1, self.best_epoch = state["best"]
        self.saved = (self.epoch, self.step)

    def interrupted(self) -> str:
        """What Ctrl-C leaves behind and how to continue."""
        where = f"interrupted in epoch {self.epoch + 1}/{self.config.epochs} (step {self.step}/{self.steps})"
        if self.saved is None:
            return (f"{where} before the first checkpoint; nothing to resume in {self.output} "
                    f"(checkpoints are written at the end of each epoch, or every --checkpoint-every steps)")
        epoch, step = self.saved
        at = f"epoch {epoch + 1}, step {step}/{self.steps}" if step else f"after epoch {epoch}"
        return (f"{where}; the last checkpoint ({at}) is {self.output / ckpt.LAST}; "
                f"continue with: mait train --resume {self.output}")


def train(config: TrainConfig, resume: bool = False) -> TrainResult:
    """Train ``config.model`` as ``config`` says; with ``resume`` continue the run saved in ``config.output``."""
    start = time.perf_counter()
    env = setup(config.device)
    try:
        return _train(config, resume, env, start)
    finally:
        cleanup()


def _train(config: TrainConfig, resume: bool, env: Dist, start: float) -> TrainResult:
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if resume and not config.output:
        raise UserError("resume needs the run's output folder")
    output = Path(config.output) if config.output else _default_output(config, env)
    if resume and not output.is_dir():
        raise UserError(f"--resume {output}: the folder does not exist")
    with ckpt.training_lock(output) if env.is_main else contextlib.nullcontext():
        return _train_into(config, resume, env, start, output)


def _train_into(config: TrainConfig, resume: bool, env: Dist, start: float, output: Path) -> TrainResult:
    state = ckpt.load_state(output) if resume else None
    if not resume and (output / ckpt.STATE).exists():
        raise UserError(f"{output} already holds a run; continue it with --resume {output} or choose another --output")
    random_seed(config.seed)
    loaders = build_loaders(config, env)
    model = build_model(config, loaders.info)
    say = print if env.is_main else (lambda *a, **k: None)
    if config.init_from and state is None:
        source = Path(config.init_from)
        metadata, weights = ckpt.read_checkpoint(source)
        check_against_card(model, config.model, ModelCard.from_metadata(metadata), source,
                           consequence="fine-tuning starts from weights trained for another setting")
        kept_init = ckpt.load_tensors(model, weights, source, allow_head_reset=True, strict=False).describe()
        say(f"initialised from {config.init_from}" + (f"; {kept_init}" if kept_init else ""))
    teacher = build_teacher(config, loaders.info, attention=config.reconstruction_target == "teacher")
    model.to(env.device)
    if teacher is not None:
        teacher.to(env.device)
    card = make_card(config, loaders.info, model, loaders.val.dataset, build_transforms(config, loaders.info)[1])
    run = _Run(config, env, output, loaders, model, card, teacher)
    if state is not None:
        run.restore(state)
        if run.epoch >= config.epochs:
            say(f"{output} has finished all {config.epochs} epochs: nothing left to do "
                f"(give --epochs above {config.epochs} to train longer)")
        else:
            say(f"resuming {output} at epoch {run.epoch + 1}, step {run.step}/{run.steps}")
    else:
        say(f"training {config.model} on {loaders.info.name}; output folder: {output}")
        random_seed(config.seed, env.rank)
    say(f"precision: {run.precision.describe()}")
    say(f"machine: {device_name(env.device)}")
    if env.is_main:
        config.save(output / "config.yaml")
        if stage_summary(run.stages):
            say(stage_summary(run.stages))
    if teacher is not None and hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)
    log = RunLog(output, env.is_main, run.epoch)
    batch = per_rank_batch(config, env)
    net = None
    try:
        while run.epoch < config.epochs:
            if run.enter_stage(stage_at(run.stages, run.epoch)[0]) or net is None:
                net = _wrap(model, config, env)       # a stage changes what is trainable: wrap afresh
            _train_epoch(run, net, batch)
            _end_epoch(run, log)
    except KeyboardInterrupt:
        raise Interrupted(run.interrupted(), output / ckpt.LAST if run.saved is not None else None) from None
    finally:
        log.close()
    plot = plot_curves(run.history, output / PLOT_NAME, f"{config.model} on {loaders.info.name}") \
        if env.is_main else None
    last = run.history[-1]
    return TrainResult(best_acc1=run.best_acc1, best_epoch=run.best_epoch, final_acc1=last["val_acc1"],
                       final_acc5=last["val_acc5"], final_loss=last["val_loss"], output=output,
                       last_checkpoint=output / ckpt.LAST, best_checkpoint=output / ckpt.BEST, plot=plot,
                       wall_time=time.perf_counter() - start, history=run.history)


def _wrap(model: nn.Module, config: TrainConfig, env: Dist) -> nn.Module:
    """The model as the training steps call it: DistributedDataParallel across processes, compiled if asked."""
    net = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None) \
        if env.enabled else model
    return torch.compile(net) if config.compile else net   # evaluation and checkpoints use the plain model


def _train_epoch(run: _Run, net: nn.Module, batch: int) -> None:
    config, env, loaders = run.config, run.env, run.loaders
    if run.step == 0:
        run.loss_sum, run.loss_count, run.recon_sum = 0.0, 0, 0.0
    loaders.sampler.start_at(run.epoch, run.step * batch)
    loaders.train_set.epoch = run.epoch
    net.train()
    run.epoch_start = time.perf_counter()
    bar = progress_bar(config.progress and env.is_main, total=run.steps, initial=run.step,
                       desc=f"epoch {run.epoch + 1}/{config.epochs}", leave=False, unit="step", dynamic_ncols=True)
    tick, done = time.perf_counter(), 0
    for images, targets in loaders.train:
        images, targets = images.to(env.device, non_blocking=True), targets.to(env.device, non_blocking=True)
        if loaders.mixup is not None:
            images, targets = loaders.mixup(images, targets)
        with torch.autocast(env.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            outputs = net(images)
            loss, recon = run.objective(run.model, images, outputs, targets)     # mait.train.objectives
            if recon is not None:
                run.recon_sum += recon.item()
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"loss is {loss.item()} at epoch {run.epoch + 1}, step {run.step}; "
                               f"lower the learning rate or enable clip_grad")
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if config.clip_grad:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), config.clip_grad)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        if run.ema is not None:
            run.ema.update(run.model)
        run.step += 1
        run.scheduler.step_update(num_updates=(run.epoch - run.stage_start) * run.steps + run.step)
        run.loss_sum += loss.item()
        run.loss_count += 1
        done += 1
        lr = run.optimizer.param_groups[0]["lr"]
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}",
                        img_s=f"{done * batch * env.world_size / (time.perf_counter() - tick):.0f}", refresh=False)
        bar.update()
        global_step = run.epoch * run.steps + run.step
        if config.checkpoint_every and global_step % config.checkpoint_every == 0 and run.step < run.steps:
            run.save()
    bar.close()
    # Training throughput of this epoch (the steps run since it started or resumed; evaluation excluded).
    run.images_per_s = done * batch * env.world_size / max(time.perf_counter() - tick, 1e-9)


def _end_epoch(run: _Run, log: RunLog) -> None:
    config, env = run.config, run.env
    loss_sum, loss_count, recon_sum = all_sum([run.loss_sum, run.loss_count, run.recon_sum], env)
    metrics = evaluate(run.model, run.loaders.val, env, run.amp_dtype)
    row = {"epoch": run.epoch + 1, "train_loss": loss_sum / max(loss_count, 1), "val_loss": metrics["loss"],
           "val_acc1": metrics["acc1"], "val_acc5": metrics["acc5"], "lr": run.optimizer.param_groups[0]["lr"],
           "epoch_time": time.perf_counter() - run.epoch_start, "train_images_per_s": run.images_per_s}
    if recon_sum:
        row["train_recon_loss"] = recon_sum / max(loss_count, 1)
    if len(run.stages) > 1:
        row["stage"] = run.stage + 1
    if run.ema is not None:
        row["ema_acc1"] = evaluate(run.ema.module, run.loaders.val, env, run.amp_dtype)["acc1"]
    run.history.append(row)
    run.epoch, run.step = run.epoch + 1, 0
    if row["val_acc1"] > run.best_acc1:
        run.best_acc1, run.best_epoch = row["val_acc1"], row["epoch"]
        if env.is_main:
            ckpt.save_weights(run.model, run.output / ckpt.BEST,
                              run.card.metadata(epoch=row["epoch"], acc1=f"{row['val_acc1']:.4f}"))
    run.save()
    log.write(run.history)
    if env.is_main:
        tqdm.write(epoch_line(row, config.epochs))


def summary(result: TrainResult) -> str:
    """The closing lines of ``mait train``: accuracy, time and where the files are."""
    return (f"finished in {result.wall_time:.1f} s: validation top-1 {result.final_acc1:.2f} % "
            f"(best {result.best_acc1:.2f} % at epoch {result.best_epoch}), top-5 {result.final_acc5:.2f} %\n"
            f"checkpoints: {result.best_checkpoint} (best), {result.last_checkpoint} (last)\n"
            f"curves: {result.plot}; log: {result.output / 'metrics.csv'}; "
            f"tensorboard: {result.output / 'tensorboard'}")
