"""``mait search``: the paper's quick empirical mask search (§4.3), end to end, on a training config."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from ._output import check_output_folder
from .train import overrides_from


def run(args: argparse.Namespace) -> int:
    from ..search import Thresholds, run_search
    from ..train import load_config

    config = load_config(args.config, overrides_from(args))
    if args.resume and not config.output:
        raise UserError("--resume continues the search in --output; give --output (the search folder)")
    if config.output:
        check_output_folder(Path(config.output))
    result = run_search(config, thresholds=Thresholds(high=args.high, low=args.low), calibration=args.calibration,
                        retrain_epochs=args.retrain_epochs, als_images=args.als_images, resume=args.resume)
    accuracy = ", ".join(f"{step} {value:.2f} %" for step, value in result.accuracy.items())
    print(f"searched scheme: {result.scheme}   (top-1 by step: {accuracy})")
    return 0
