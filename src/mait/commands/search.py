"""``mait search``: the paper's quick empirical mask search (§4.3), end to end, on a training config."""

from __future__ import annotations

import argparse

from ..errors import UserError
from .train import add_config_options, overrides_from


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="training config (default: the built-in digits job); "
                        "its epochs are the budget of each search step, its output the search folder")
    search = parser.add_argument_group("search")
    search.add_argument("--high", type=float, default=0.65, help="head-0 ALS above it: mask all heads (default 0.65)")
    search.add_argument("--low", type=float, default=0.35,
                        help="head-0 ALS below it: remove the mask; calibration unmasks heads below it (default 0.35)")
    search.add_argument("--calibration", choices=("retrain", "initial"), default="retrain",
                        help="per-head ALS for calibration from a run trained with the assigned scheme (retrain, "
                             "the paper's second iteration) or from the Sch.1 run (initial, one training less)")
    search.add_argument("--retrain-epochs", type=int, default=0,
                        help="train the searched scheme once more for N epochs and report its accuracy (0 = skip)")
    search.add_argument("--resume", action="store_true",
                        help="continue the interrupted search in --output (give the same options again)")
    search.add_argument("--als-images", type=int, default=512, help="held-out images for each ALS table (0 = all)")
    add_config_options(parser, skip=("scheme",))


def run(args: argparse.Namespace) -> int:
    from ..search import Thresholds, run_search
    from ..train import load_config

    config = load_config(args.config, overrides_from(args))
    if args.resume and not config.output:
        raise UserError("--resume continues the search in --output; give --output (the search folder)")
    result = run_search(config, thresholds=Thresholds(high=args.high, low=args.low), calibration=args.calibration,
                        retrain_epochs=args.retrain_epochs, als_images=args.als_images, resume=args.resume)
    accuracy = ", ".join(f"{step} {value:.2f} %" for step, value in result.accuracy.items())
    print(f"searched scheme: {result.scheme}   (top-1 by step: {accuracy})")
    return 0
