"""The ``mait`` command line, a package of its own so that it answers before torch is imported.

``import mait`` registers the MaiT models in timm, so it imports timm and torch, which takes
seconds.  This package imports neither: :mod:`mait_cli.options` declares every command's
options with argparse alone (the training config keys are read from the source of
``mait/train/config.py`` by :mod:`mait_cli.config_keys`), :func:`main` parses the command line,
and only then imports ``mait.commands.<name>`` and calls its ``run(args) -> int``.  So
``mait --help``, ``mait COMMAND --help`` and a wrong option answer at once.

Errors.  A mistake the user can fix ends as one line on stderr, ``mait COMMAND: error: ...``,
with exit status 2: argparse's own errors, ``mait.errors.UserError``, ``ValueError`` (how the
library rejects a bad argument) and ``OSError`` (a path that cannot be read or written).  Any
other exception is a bug and keeps its traceback.  ``MAIT_LOG_LEVEL=debug`` prints the
traceback of every error.  Warnings are one line each; Ctrl-C says what was kept and how to
continue (exit status 130).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
import traceback
import warnings
from typing import Optional, Sequence

from .options import COMMANDS

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (its usage block is what ``--help`` is for)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _command_module(name: str):
    return importlib.import_module(f"mait.commands.{name.replace('-', '_')}")


def build_parser(command: Optional[str]) -> tuple[argparse.ArgumentParser, Optional[argparse.ArgumentParser]]:
    """The parser of ``mait`` and the one of ``command``: only its options are declared (the others just list
    their help)."""
    parser = _Parser(prog="mait", description="Masked-attention vision transformers (MaiT).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = None
    for name, (help_text, declare) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            declare(command_parser)
            chosen = command_parser
    return parser, chosen


def parse(argv: list[str]) -> argparse.Namespace:
    """``argv`` as options; an unknown option is an error of its command, naming the closest known one."""
    parser, command_parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args, unknown = parser.parse_known_args(argv)
    if unknown:                               # argparse lists its options only in _actions
        known = [flag for action in (command_parser or parser)._actions for flag in action.option_strings]
        close = difflib.get_close_matches(unknown[0].split("=")[0], known, n=1, cutoff=0.6)
        (command_parser or parser).error(f"unrecognized arguments: {' '.join(unknown)}"
                                         + (f" (did you mean {close[0]}?)" if close else ""))
    return args


def _user_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions that are the user's to fix (``mait.errors`` is only there once a command was imported)."""
    errors = sys.modules.get("mait.errors")
    return (ValueError, OSError) + ((errors.UserError,) if errors is not None else ())


def _one_line(error: BaseException) -> str:
    message = str(error).strip() or type(error).__name__
    return " ".join(message.split())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``mait`` with ``argv`` (default: the process's arguments); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse(argv or ["--help"])
    except SystemExit as exit_:               # --help, or an error argparse printed
        return int(exit_.code or 0)
    debug = os.environ.get("MAIT_LOG_LEVEL", "").lower() == "debug"

    def show(message, category, *where, **options) -> None:
        print(f"mait {args.command}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            return int(_command_module(args.command).run(args) or 0)
    except KeyboardInterrupt as interrupt:
        if debug:
            traceback.print_exc()
        print(f"\nmait {args.command}: {interrupt.args[0] if interrupt.args else 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as error:
        if not isinstance(error, _user_error_types()):
            raise
        if debug:
            traceback.print_exc()
        print(f"mait {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
