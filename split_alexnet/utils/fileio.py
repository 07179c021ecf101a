"""One atomic file writer for everything the project writes (checkpoints, statistics,
metadata, prepared images), the one JSON writer on it, the one opener of files written in
place (:func:`open_own_file`: never through a symbolic link), the one bounded reader of
small inputs (:func:`read_bounded`), and the check that an output folder can be written:
standard library only, so worker processes can use it without importing torch."""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from split_alexnet.utils.cli import UsageError


def _temp_name(path: Path, suffix: str) -> str:
    """A hidden temporary name ``.<name>.<random><suffix>`` beside ``path``."""
    return str(path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}")


def atomic_write(path: Path | str, write: Callable[[BinaryIO], None], *,
                 fsync: bool = True, suffix: str = ".tmp", private: bool = True,
                 uncached: bool = False) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, (fsync it,) rename it over
    ``path``, (fsync the folder). On any failure the temporary file is removed and ``path`` is
    untouched: a reader sees the old file or the new one, never half of one.

    ``suffix`` ends the temporary file's name (so a caller can recognise and remove the
    leftovers of a killed process); ``private=False`` gives the new file the permissions of a
    plain ``open()`` (0o666 minus the umask) instead of owner-only 0o600. ``uncached`` (with
    ``fsync``): the file's pages leave the page cache once on disk (``POSIX_FADV_DONTNEED``,
    where the OS has it; a RAM filesystem keeps them), for a large file read back rarely, a
    checkpoint: it does not push the training images out of the cache, and on the 2-core VM
    of docs/benchmarks.md the next save of 456 MB took 0.33 s instead of 1.25 s. An
    ``OSError`` that names no file (a failed ``write``: full disk, file too large) gets
    ``path`` as its ``filename``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The name is drawn before the file exists and the file is created inside the try: an
    # exception at any point after its creation (a second signal, raised by its handler)
    # removes it. Owner-only (0o600, as ``tempfile`` makes it) when ``private``.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    tmp = _temp_name(path, suffix)
    try:
        while True:
            try:
                fd = os.open(tmp, flags, 0o600 if private else 0o666)
                break
            except FileExistsError:  # a name taken by another writer: draw again
                tmp = _temp_name(path, suffix)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
                if uncached and hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a failed write() names no file: name the target
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


def check_own_file(path: Path | str) -> None:
    """One-line :class:`UsageError` if ``path`` is a symbolic link or exists as anything but a
    regular file: what :func:`open_own_file` refuses, checked before any work."""
    path = Path(path)
    if path.is_symlink():
        raise UsageError(f"{path} is a symbolic link (to {os.readlink(path)}): refusing to "
                         "write through it; remove it")
    if path.exists() and not path.is_file():
        raise UsageError(f"{path} is not a regular file: refusing to write into it; remove it")


def open_own_file(path: Path | str, flags: int, mode: int = 0o644) -> int:
    """``os.open(path, flags | O_NOFOLLOW, mode)`` for a file a tool writes in place (a lock,
    an appended log): a descriptor of a regular file, or the one-line :class:`UsageError` of
    :func:`check_own_file` when ``path`` is a symbolic link (the write would land wherever it
    points) or not a regular file (a FIFO, a device, a folder), before anything is written.
    Other ``OSError`` s propagate. (Files replaced whole go through :func:`atomic_write`,
    whose rename replaces a link instead of following it.)"""
    path = Path(path)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0),
                     mode)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):  # a link, a FIFO, a folder
            check_own_file(path)
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            check_own_file(path)  # raises, unless the path changed since the open
            raise UsageError(f"{path} is not a regular file: refusing to write into it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bounded(path: Path | str, limit: int, what: str) -> bytes:
    """The bytes of the regular file ``path`` (after symbolic links), of at most ``limit``
    bytes: a FIFO, a device (``/dev/zero``) or a folder, and a larger file, are one-line
    :class:`UsageError` s naming it as ``what``, checked on the opened file before reading
    (a non-blocking open: a FIFO cannot hang it). A missing file raises
    ``FileNotFoundError``."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{what} {path} is not a regular file")
        if st.st_size > limit:
            raise UsageError(f"{what} {path} holds {st.st_size:,} bytes, more than the "
                             f"{limit:,} it may")
        os.set_blocking(fd, True)
        data = f.read(limit + 1)
    if len(data) > limit:  # it grew since
        raise UsageError(f"{what} {path} holds more than the {limit:,} bytes it may")
    return data


def write_json(path: Path | str, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
               fsync: bool = True, suffix: str = ".tmp") -> None:
    """``obj`` as UTF-8 JSON text (``indent``, ``sort_keys``; values JSON cannot hold are
    written with ``str``) ending in a newline, by :func:`atomic_write` with the permissions of
    a plain ``open()``: the one JSON writer of the project."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False,
                      default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), fsync=fsync, suffix=suffix,
                 private=False)


def check_output_dir(path: Path | str, what: str) -> None:
    """UsageError (one line, exit 2) unless ``path`` is a writable folder or can be created as
    one. Nothing is created: an existing folder is probed with a temporary file (removed), a
    missing one by its nearest existing parent (a folder, writable and searchable).
    ``what`` names it in the message (e.g. ``"DST"``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is not a folder")
    parent = path
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{what} {path} cannot be created: {parent} is not a folder")
    if parent != path:
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"{what} {path} cannot be created: {parent} is not writable")
        return
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UsageError(f"{what} {path} is not writable: {e.strerror or e}") from None


def make_output_dir(path: Path | str, what: str) -> Path:
    """Create the folder ``path`` (and its parents); UsageError (one line) if that fails."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{what} {path} cannot be created: {e.strerror or e}") from None
    return path
