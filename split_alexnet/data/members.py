"""Tar members as ``prepare`` reads them: which are safe, and their names as relative paths.

Nothing is ever extracted from an archive to a path it names (members are read with
``extractfile`` or at their offsets, and outputs are named by ``prepare``); still, a member
that no ImageNet archive holds and that an extraction could turn against the disk - an
absolute name, a ``..`` component, a link, a device, a FIFO - is refused by
:func:`member_rel`, so a hostile archive is stopped with one line naming it.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import PurePosixPath

from split_alexnet.utils.cli import UsageError

__all__ = ["safe_rel", "member_rel"]


def safe_rel(name: str) -> str | None:
    """A tar member name as a safe relative posix path (no absolute, no '..'), else None."""
    p = PurePosixPath(name)
    if p.is_absolute() or any(part == ".." for part in p.parts):
        return None
    parts = [q for q in p.parts if q not in ("", ".")]
    return "/".join(parts) if parts else None


def _unsafe(m: tarfile.TarInfo) -> str | None:
    """Why member ``m`` must be refused (None: a regular file or a folder with a safe name)."""
    parts = PurePosixPath(m.name).parts
    if m.name.startswith("/") or (parts and parts[0] == "/"):
        return "an absolute path"
    if ".." in parts:
        return "a '..' component"
    for test, what in ((m.issym, "a symbolic link"), (m.islnk, "a hard link"),
                       (m.ischr, "a character device"), (m.isblk, "a block device"),
                       (m.isfifo, "a FIFO")):
        if test():
            return what
    return None if m.isfile() or m.isdir() else "not a regular file or folder"


def member_rel(m: tarfile.TarInfo, archive: str | os.PathLike) -> str | None:
    """The safe relative name of archive member ``m`` if it is a regular file, None for a
    folder. UsageError (one line naming the member and ``archive``) for a member that no
    ImageNet archive holds and that an extraction could turn against the disk: an absolute
    name, a ``..`` component, a link, a device, a FIFO. Members are only ever read, never
    extracted, so the refusal is a guard, not a repair."""
    why = _unsafe(m)
    if why:
        raise UsageError(f"unsafe member {m.name!r} in {archive}: {why}; refused (nothing is "
                         f"extracted from it)")
    return safe_rel(m.name) if m.isfile() else None
