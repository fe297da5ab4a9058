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


def load_train_config(config_file: typing.Optional[typing.Union[str, Path]], overrides: dict[str, typing.Any]):
    """The run's config: defaults <- config file <- command line.  With ``--init-from`` a checkpoint with a
    card, that model's settings (name, scheme, mask size, kwargs, image size) come first, so fine-tuning needs
    no --model; when the file or the command line names another model they are dropped, since a scheme or
    kwargs of the card's model are not the named model's (a dense checkpoint's ``scheme: none`` would
    otherwise strip a Sparsifiner model of its learned heads)."""
    from ..train import TrainConfig, load_config
    from ..train.card import read_card
    card = read_card(Path(overrides["init_from"])) if overrides.get("init_from") else None
    if card is None:
        return load_config(config_file, overrides)
    keys = ("model", "scheme", "mask_size", "model_kwargs", "img_size")
    base = TrainConfig.from_dict({key: value for key, value in card.config_values().items() if key in keys})
    config = load_config(config_file, overrides, base=base)
    return config if config.model == base.model else load_config(config_file, overrides)


def run(args: argparse.Namespace) -> int:
    from ..train import summary, train
    overrides = overrides_from(args)
    config_file = args.config
    if args.resume:
        folder = Path(args.resume)
        if Path(overrides.get("output", folder)).resolve() != folder.resolve():
            raise UserError(f"--resume {folder} continues that folder; drop --output {overrides['output']}")
        overrides["output"] = str(folder)
        if config_file is None and (folder / "config.yaml").is_file():
            config_file = folder / "config.yaml"
    config = load_train_config(config_file, overrides)
    if config.output:
        check_output_folder(Path(config.output), "--resume" if args.resume else "--output")
    result = train(config, resume=bool(args.resume))
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary(result))
    return 0
