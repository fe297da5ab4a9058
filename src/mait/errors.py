"""Errors the user can fix: the command line prints them as one sentence, without a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


class UserError(Exception):
    """An error caused by the user's input (a bad path, value or combination of options)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a long job; the message says what was kept and how to continue.

    ``checkpoint`` is the last checkpoint written before the interruption (None: none yet).
    """

    def __init__(self, message: str, checkpoint: Optional[Path] = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
