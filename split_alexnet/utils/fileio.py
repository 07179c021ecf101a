"""One atomic file writer for everything the project writes (checkpoints, statistics,
metadata, prepared images): standard library only, so worker processes can use it without
importing torch."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def _open_temp(path: Path, suffix: str, private: bool) -> tuple[int, str]:
    """A new hidden temporary file ``.<name>.<random><suffix>`` beside ``path``: (fd, name).
    ``private``: owner-only (0o600, as ``tempfile`` makes it); else 0o666 minus the umask,
    the permissions a plain ``open(path, "w")`` would give."""
    if private:
        return tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # a name taken by another writer: draw again
            continue


def atomic_write(path: Path | str, write: Callable[[BinaryIO], None], *,
                 fsync: bool = True, suffix: str = ".tmp", private: bool = True) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, (fsync it,) rename it over
    ``path``, (fsync the folder). On any failure the temporary file is removed and ``path`` is
    untouched: a reader sees the old file or the new one, never half of one.

    ``suffix`` ends the temporary file's name (so a caller can recognise and remove the
    leftovers of a killed process); ``private=False`` gives the new file the permissions of a
    plain ``open()`` (0o666 minus the umask) instead of owner-only 0o600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _open_temp(path, suffix, private)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if fsync:
        try:
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:  # some filesystems cannot fsync a folder; the rename is still atomic
            pass
