"""``mait eval``: top-1, top-5, loss and images/s of a checkpoint on a validation set, in the precision
``amp`` chooses (as ``mait train`` does)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .train import overrides_from


def run(args: argparse.Namespace) -> int:
    from ..train import evaluate
    from ..train.data import Augmented, DataInfo, build_eval_loader, build_transforms, open_data, subset
    from ..train.distributed import Dist, setup
    from ..train.precision import choose_precision
    from ..train.runs import open_run

    # The device is the one asked for on this command line (the run's config.yaml names the machine it ran on).
    device = setup(args.device or "auto").device
    checkpoint = Path(args.checkpoint)
    saved = open_run(checkpoint, args.config, **overrides_from(args))
    config = saved.config
    _, val, info = open_data(config.data, config.holdout_per_class, need_train=False)
    val = subset(val, config.val_subset)
    info = DataInfo(info.name, info.num_classes, info.in_chans, info.img_size, 0, len(val))
    _, transform = build_transforms(config, info)
    env = Dist(0, 1, device)
    loader = build_eval_loader(Augmented(val, transform), config.batch_size, config.workers, env)
    model = saved.model(info)
    precision = choose_precision(config.amp, device)        # as in training: --amp / --no-amp override the run's
    print(f"precision: {precision.describe()}")
    metrics = evaluate(model.to(device), loader, env, precision.dtype, progress=config.progress)
    split = f", the last {config.holdout_per_class} of each class" if config.holdout_per_class else ""
    print(f"{config.model} on {info.name} ({metrics['images']} images{split}): top-1 {metrics['acc1']:.2f} %  "
          f"top-5 {metrics['acc5']:.2f} %  loss {metrics['loss']:.4f}  {metrics['images_per_s']:.0f} images/s")
    return 0
