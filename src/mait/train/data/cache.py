"""The on-disk cache: archives extracted once and image folders decoded once, under keys of what they hold.

Everything lives in ``~/.cache/mait/`` (``$MAIT_CACHE`` overrides) and is written atomically
(a temporary name, then ``os.replace``), so concurrent runs and a killed run never leave a
half-written entry.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from ...errors import UserError

DECODED_CACHE_MIN = 1000             # folders of fewer images are decoded again rather than cached

#: Archives up to this size are keyed by their content, so a copy of the same archive (another
#: checkout, a re-mounted data folder) reuses the extraction; larger ones by path, size and mtime.
CONTENT_KEY_MAX_BYTES = 2 << 30


def cache_dir() -> Path:
    """The cache folder: ``$MAIT_CACHE``, else ``~/.cache/mait``."""
    return Path(os.environ.get("MAIT_CACHE", Path.home() / ".cache" / "mait"))


def archive_key(archive: Path) -> str:
    """A short key of ``archive``: its content hash when it is at most :data:`CONTENT_KEY_MAX_BYTES`
    (hashing 1 GiB takes about a second), otherwise its resolved path, size and modification time."""
    stat = archive.stat()
    return _archive_key(str(archive.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=16)
def _archive_key(path: str, size: int, mtime_ns: int) -> str:
    """:func:`archive_key` of one file version, hashed once per process (opening the data and
    reading its class names both ask)."""
    if size > CONTENT_KEY_MAX_BYTES:
        return hashlib.sha1(f"{path}:{size}:{mtime_ns}".encode()).hexdigest()[:12]
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def _unsafe(member: tarfile.TarInfo) -> Optional[str]:
    """Why extracting ``member`` could write outside the folder or make a device (None: it cannot)."""
    def leaves(path: str) -> bool:
        return os.path.isabs(path) or os.path.normpath(path).split(os.sep)[0] == os.pardir
    if member.name.startswith("/") or os.path.isabs(member.name):
        return "has an absolute path"
    if leaves(member.name):
        return "lies outside the folder ('..')"
    if member.issym() and leaves(os.path.join(os.path.dirname(member.name), member.linkname)):
        return f"is a link to {member.linkname!r}, outside the folder"
    if member.islnk() and leaves(member.linkname):
        return f"is a hard link to {member.linkname!r}, outside the folder"
    if member.isdev():
        return "is a device or FIFO"
    return None


def _checked_members(tar: tarfile.TarFile, archive: Path) -> Iterator[tarfile.TarInfo]:
    """The members of ``tar``, each checked as extraction reaches it: the first that would leave the folder
    (an absolute path, ``..``, a link pointing out) or is a device is a one-line UserError.

    The check is the same on every Python; where tarfile has extraction filters (3.12, 3.11.4+,
    3.10.12+) the ``"data"`` filter is applied on top and also drops set-uid bits and write bits
    for others.
    """
    for member in tar:
        reason = _unsafe(member)
        if reason is not None:
            raise UserError(f"cannot extract {archive}: its member {member.name!r} {reason}; nothing was kept")
        yield member


def extract_archive(archive: Path) -> Path:
    """Extract ``archive`` once into the cache (keyed by :func:`archive_key`) and return the folder."""
    target = cache_dir() / f"{archive.name.split('.')[0]}-{archive_key(archive)}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(archive) as tar:
            members = _checked_members(tar, archive)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, members=members, filter="data")
            else:                                          # Python 3.11.3 and older, 3.10.11 and older
                tar.extractall(tmp, members=members)
    except UserError:                                      # a member refused: drop what came before it
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (tarfile.TarError, OSError, EOFError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot extract {archive}: {error}") from None
    try:
        os.replace(tmp, target)
    except OSError:                      # another process extracted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def decoded_folder(root: Path, samples: Sequence[tuple[str, int]],
                   decode: Callable[[str], Image.Image]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """``(uint8 images (N, H, W, C), int64 labels)`` of an image folder's ``(path, label)`` samples, or
    None when the images differ in size.  The array of :data:`DECODED_CACHE_MIN` images or more is
    cached in :func:`cache_dir` under a key of the files' paths, sizes and modification times."""
    stats = ((path, os.stat(path)) for path, _ in samples)
    listing = "\n".join(f"{path}:{stat.st_size}:{stat.st_mtime_ns}" for path, stat in stats)
    digest = hashlib.sha1(f"{root.resolve()}\n{listing}".encode()).hexdigest()[:12]
    cached = cache_dir() / "decoded" / f"{root.name}-{len(samples)}-{digest}.npz"
    if cached.is_file():
        with np.load(cached) as stored:
            return stored["images"], stored["labels"]
    first = np.asarray(decode(samples[0][0]))
    images = np.empty((len(samples), *first.shape), dtype=np.uint8)
    for i, (path, _) in enumerate(samples):
        pixels = np.asarray(decode(path))
        if pixels.shape != first.shape:
            return None
        images[i] = pixels
    labels = np.array([target for _, target in samples], dtype=np.int64)
    if len(samples) >= DECODED_CACHE_MIN:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as handle:
            np.savez(handle, images=images, labels=labels)
        os.replace(tmp, cached)
    return images, labels
