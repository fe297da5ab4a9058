"""``mait train``: train a model from a YAML config and/or command-line keys (default: the built-in digits job)."""

from __future__ import annotations

import argparse
import os
import typing
from pathlib import Path

from ..errors import UserError
from ._output import check_output_folder


def overrides_from(args: argparse.Namespace) -> dict[str, typing.Any]:
    from ..train import TrainConfig
    return {key: getattr(args, key) for key in TrainConfig.keys() if getattr(args, key, None) is not None}


def _init_from_base(init_from: typing.Optional[str]):
    """With ``--init-from`` a checkpoint with a card: its model (name, scheme, mask size, kwargs, image
    size) under the config file and the command line, so fine-tuning needs no --model."""
    from ..train import TrainConfig
    from ..train.card import read_card
    card = read_card(Path(init_from)) if init_from else None
    if card is None:
        return None
    keys = ("model", "scheme", "mask_size", "model_kwargs", "img_size")
    return TrainConfig.from_dict({key: value for key, value in card.config_values().items() if key in keys})


def run(args: argparse.Namespace) -> int:
    from ..train import load_config, summary, train
    overrides = overrides_from(args)
    config_file = args.config
    if args.resume:
        folder = Path(args.resume)
        if Path(overrides.get("output", folder)).resolve() != folder.resolve():
            raise UserError(f"--resume {folder} continues that folder; drop --output {overrides['output']}")
        overrides["output"] = str(folder)
        if config_file is None and (folder / "config.yaml").is_file():
            config_file = folder / "config.yaml"
    config = load_config(config_file, overrides, base=_init_from_base(overrides.get("init_from")))
    if config.output:
        check_output_folder(Path(config.output), "--resume" if args.resume else "--output")
    result = train(config, resume=bool(args.resume))
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary(result))
    return 0
