"""The ``mait`` command line: a thin dispatcher over :mod:`mait.commands`.

Each sub-command lives in its own module ``mait.commands.<name>`` exposing
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported lazily so
``mait --help`` stays fast.  Errors a user can fix (bad paths, bad values) are printed as
one line, warnings too, and Ctrl-C says what was kept and how to continue (exit status 130);
set ``MAIT_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import Optional, Sequence

from .errors import UserError

# name -> one-line help; the module mait.commands.<name with - replaced by _> implements it.
COMMANDS: dict[str, str] = {
    "demo": "build a MaiT model, run a sample batch and print its per-layer masking",
    "train": "train a model (default: MaiT on the built-in digits, no download); DeiT recipe, torchrun-ready",
    "eval": "evaluate a checkpoint: top-1, top-5, loss and images/s",
    "predict": "top-k classes with names and probabilities of image files under a checkpoint",
    "export": "export a checkpoint to ONNX or a torch.export program, checked against PyTorch",
    "als": "Attention Locality Score per layer and head of a model on held-out images (table + heatmap)",
    "similarity": "cross-layer similarity of attention maps, one L x L heatmap per head (paper Fig. 4-6)",
    "alphas": "learned soft-mask α per layer and head, heatmap, and the hardened scheme",
    "search": "quick empirical mask search (paper §4.3): Sch.1, ALS, assign, calibrate, optionally retrain",
    "show-mask": "draw which patches one patch token attends to at full strength (paper Fig. 1)",
    "flops": "parameters and GMACs of models in the paper's convention, per stage and per layer",
    "bench": "throughput of whole models (ours vs DeiT/CaiT/Swin) or of the attention op alone (--attention)",
}


def _module(name: str):
    return importlib.import_module(f"mait.commands.{name.replace('-', '_')}")


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mait", description="Masked-attention vision transformers (MaiT).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen sub-command's module is imported (the others just list their help).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _module(name).add_arguments(command_parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    def show(message, category, *where, **options) -> None:
        print(f"mait {args.command}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            return int(_module(args.command).run(args) or 0)
    except KeyboardInterrupt as interrupt:
        if os.environ.get("MAIT_DEBUG"):
            raise
        print(f"\nmait {args.command}: {interrupt.args[0] if interrupt.args else 'interrupted'}", file=sys.stderr)
        return 130
    except (UserError, ValueError, TypeError, FileNotFoundError, NotADirectoryError, KeyError) as error:
        if os.environ.get("MAIT_DEBUG"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"mait {args.command}: error: {message}", file=sys.stderr)
        return 2
