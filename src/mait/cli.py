"""``mait.cli.main(argv)``: the ``mait`` command line, in-process (it lives in :mod:`mait_cli`)."""

from mait_cli import main

from .errors import UserError

__all__ = ["UserError", "main"]
