"""One atomic file writer for everything the project writes (checkpoints, statistics,
metadata): standard library only, so worker processes can use it without importing torch."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: Path | str, write: Callable[[BinaryIO], None], *,
                 fsync: bool = True) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, (fsync it,) rename it over
    ``path``, (fsync the folder). On any failure the temporary file is removed and ``path`` is
    untouched: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
