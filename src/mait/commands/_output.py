"""Output paths of the commands, checked before any work and written atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from ..errors import UserError
from ..train.checkpoint import new_file_mode


def _file_in_the_way(folder: Path) -> Optional[Path]:
    """The file that ``folder`` or its nearest existing ancestor is, if it is one (a folder cannot be made there)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return None if folder.is_dir() else folder


def check_output_folder(path: Path, option: str = "--output") -> Path:
    """``path`` as a folder to write in: an existing folder, or one that can be made (no file in the way)."""
    blocker = _file_in_the_way(path)
    if blocker is not None:
        where = "is a file" if blocker == path else f"lies under {blocker}, which is a file"
        raise UserError(f"{option} {path} {where}; give a folder")
    return path


@contextlib.contextmanager
def new_file(path: Path, suffixes: tuple[str, ...], force: bool = False, option: str = "--output") -> Iterator[Path]:
    """Reserve ``path`` for a new file before the work that fills it; yields a temporary file beside it.

    ``path`` must end in one of ``suffixes`` and must not be a folder or lie under a file; an existing
    file there is replaced only with ``force``.  The temporary file (same folder and suffix, so the
    writers that look at the suffix accept it) is created at once, which proves the folder writable;
    it becomes ``path`` when the block ends without an error and is removed otherwise, so ``path``
    holds either its old content or the whole new file, never a partial one.
    """
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file path such as {path / ('out' + suffixes[0])}")
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{option} {path} must end in {' or '.join(suffixes)}")
    if path.exists() and not force:
        raise UserError(f"{option} {path} exists; give --force to replace it, or another path")
    blocker = _file_in_the_way(path.parent)
    if blocker is not None:
        raise UserError(f"{option} {path} lies under {blocker}, which is a file; give a path in a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    except OSError as error:
        raise UserError(f"{option} {path}: cannot write in {path.parent} ({error.strerror})") from None
    os.close(handle)
    temporary = Path(name)
    os.chmod(temporary, new_file_mode())            # mkstemp makes it private; give it a new file's mode
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
