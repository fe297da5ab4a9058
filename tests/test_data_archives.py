"""Archives given as ``--data`` extract only inside their cache folder, on every Python the project admits.

Each malicious tarball is built here and offered twice: as this Python's tarfile extracts it (with
the ``"data"`` filter where tarfile has one) and as Python 3.11.2's does (no ``filter`` argument:
everything in the archive is written as it says).  Both must refuse it in one line naming the
member, keep nothing, and leave every file outside the cache as it was.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from mait.errors import UserError
from mait.train.data.cache import extract_archive

_ORIGINAL_EXTRACTALL = tarfile.TarFile.extractall


def _extract_everything(tar: tarfile.TarFile, path, members=None) -> None:
    """Extraction as tarfile did before it had filters: every member as it says."""
    if hasattr(tarfile, "fully_trusted_filter"):
        _ORIGINAL_EXTRACTALL(tar, path, members, filter="fully_trusted")
    else:
        _ORIGINAL_EXTRACTALL(tar, path, members)


@pytest.fixture(params=["this python", "python without tarfile filters"])
def tarfile_of(request, monkeypatch, tmp_path: Path) -> str:
    """Extraction as this Python does it, or as one whose tarfile has no filters (3.11.3 and older)."""
    monkeypatch.setenv("MAIT_CACHE", str(tmp_path / "cache"))
    if request.param == "this python":
        if not hasattr(tarfile, "data_filter"):
            pytest.skip("this Python's tarfile has no extraction filters (the other case covers it)")
    else:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)

        def extractall(self, path=".", members=None, *, numeric_owner=False, **options):
            if options:                          # what Python 3.11.2 answers to filter=
                raise TypeError(f"TarFile.extractall() got an unexpected keyword argument {next(iter(options))!r}")
            _extract_everything(self, path, members)
        monkeypatch.setattr(tarfile.TarFile, "extractall", extractall)
    return request.param


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    data = b"written by the archive" if kind == tarfile.REGTYPE else b""
    info.size = len(data)
    return info, data


def _archive(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    """A gzipped tarball holding a harmless file first, then ``members``."""
    with tarfile.open(path, "w:gz") as tar:
        for info, data in (_member("images/ok.txt"), *members):
            tar.addfile(info, io.BytesIO(data))
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


# (member name, its kind, its link target, what the error says); OUTSIDE is a path beside the cache
MALICIOUS = [
    ("OUTSIDE/absolute.txt", tarfile.REGTYPE, "", "has an absolute path"),
    ("../escape.txt", tarfile.REGTYPE, "", "lies outside the folder ('..')"),
    ("images/../../../escape.txt", tarfile.REGTYPE, "", "lies outside the folder ('..')"),
    ("images/up", tarfile.SYMTYPE, "../../../OUTSIDE_NAME", "is a link to '../../../OUTSIDE_NAME', outside the folder"),
    ("images/abs", tarfile.SYMTYPE, "OUTSIDE", "is a link to 'OUTSIDE', outside the folder"),
    ("images/hard", tarfile.LNKTYPE, "../escape.txt", "is a hard link to '../escape.txt', outside the folder"),
    ("images/hard_abs", tarfile.LNKTYPE, "OUTSIDE/secret.txt", "is a hard link to 'OUTSIDE/secret.txt', outside the folder"),
    ("images/tty", tarfile.CHRTYPE, "", "is a device or FIFO"),
    ("images/disk", tarfile.BLKTYPE, "", "is a device or FIFO"),
    ("images/pipe", tarfile.FIFOTYPE, "", "is a device or FIFO"),
]


@pytest.mark.parametrize("name, kind, link, reason", MALICIOUS, ids=[row[0] + "-" + row[3][:12] for row in MALICIOUS])
def test_a_member_that_leaves_the_folder_is_refused_in_one_line(tmp_path: Path, tarfile_of: str, name: str,
                                                                kind: bytes, link: str, reason: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("the user's file")
    fill = {"OUTSIDE_NAME": outside.name, "OUTSIDE": str(outside)}
    for key, value in fill.items():
        name, link, reason = (text.replace(key, value) for text in (name, link, reason))
    archive = _archive(tmp_path / "data.tar.gz", _member(name, kind, link))
    before = _files(tmp_path)
    with pytest.raises(UserError) as error:
        extract_archive(archive)
    message = str(error.value)
    assert message == f"cannot extract {archive}: its member {name!r} {reason}; nothing was kept", message
    assert _files(tmp_path) == before                              # nothing written anywhere
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    assert not (tmp_path / "escape.txt").exists() and sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


def test_the_archives_above_are_malicious(tmp_path: Path) -> None:
    """Without the check, extracting the '..' and the link archives writes outside the folder."""
    archive = _archive(tmp_path / "dots.tar.gz", _member("../../escape.txt"))
    (tmp_path / "a" / "b").mkdir(parents=True)
    with tarfile.open(archive) as tar:
        _extract_everything(tar, tmp_path / "a" / "b")
    assert (tmp_path / "escape.txt").read_bytes() == b"written by the archive"

    outside = tmp_path / "outside"
    outside.mkdir()
    archive = _archive(tmp_path / "link.tar.gz", _member("images/out", tarfile.SYMTYPE, str(outside)),
                       _member("images/out/planted.txt"))
    with tarfile.open(archive) as tar:
        _extract_everything(tar, tmp_path / "into")
    assert (outside / "planted.txt").read_bytes() == b"written by the archive"


def test_a_harmless_archive_extracts_with_its_inner_links(tmp_path: Path, tarfile_of: str) -> None:
    archive = _archive(tmp_path / "data.tar.gz", _member("images/train/a.txt"),
                       _member("images/link", tarfile.SYMTYPE, "train/a.txt"),
                       _member("images/train/same", tarfile.LNKTYPE, "images/train/a.txt"),
                       _member("images/train/../b.txt"))
    folder = extract_archive(archive)
    assert folder.parent == tmp_path / "cache" and sorted(p.name for p in folder.parent.iterdir()) == [folder.name]
    assert (folder / "images" / "ok.txt").read_bytes() == b"written by the archive"
    assert (folder / "images" / "link").is_symlink() and (folder / "images" / "link").read_bytes() == \
        b"written by the archive"
    assert (folder / "images" / "train" / "same").read_bytes() == b"written by the archive"
    assert (folder / "images" / "b.txt").is_file()
    assert extract_archive(archive) == folder                       # extracted once
