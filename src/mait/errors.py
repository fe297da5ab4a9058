"""Errors the user can fix: the command line prints them as one sentence, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input (a bad path, value or combination of options)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a long job; the message says what was kept and how to continue."""
