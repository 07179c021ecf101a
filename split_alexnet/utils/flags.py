"""Numeric settings checked for range and finiteness: the one rule behind every numeric flag of
every tool and every numeric field of the training config, so that a bad number is one line on
stderr and exit code 2 before any work is done.

Bounds are keywords: ``min`` and ``max`` (inclusive), ``above`` and ``below`` (exclusive). A
float must also be finite: ``nan``, ``inf`` and a TOML ``1e400`` (which reads as ``inf``) are
refused. On the command line, :class:`Number` is the ``action`` of such a flag::

    p.add_argument("--rows", action=Number, kind=int, min=1, default=20, help="...")

and :func:`check_output` checks, before the work, that an output file can be written.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, Sequence

from split_alexnet.utils.cli import UsageError

BOUNDS = ("min", "above", "max", "below")

#: DataLoader worker processes per process: a ceiling far above what any machine needs, so
#: that a typo cannot fork thousands of processes.
WORKERS: dict[str, int] = {"min": 0, "max": 256}


def describe(bounds: dict[str, Any]) -> str:
    """``{"min": 0, "below": 1}`` -> ``"at least 0 and less than 1"``."""
    words = {"min": "at least", "above": "greater than", "max": "at most", "below": "less than"}
    return " and ".join(f"{words[k]} {show_bound(bounds[k])}" for k in BOUNDS if k in bounds)


def show_bound(value: Any) -> str:
    """A bound as a person reads it: ``3.4e+38`` for float32's largest value, not its 17
    digits."""
    return f"{value:.2g}" if isinstance(value, float) and abs(value) >= 1e6 else str(value)


def problem(value: Any, kind: type, bounds: dict[str, Any]) -> str | None:
    """What ``value`` must be and is not (the words after "must be"), or None when it is an
    acceptable ``kind`` (int, or float: an int is a float here) within ``bounds``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (kind is int and not isinstance(value, int)):
        return "an integer" if kind is int else "a number"
    if not math.isfinite(value):
        return "a finite number"
    if any(k in bounds and bad(value, bounds[k]) for k, bad in (
            ("min", lambda v, b: v < b), ("above", lambda v, b: v <= b),
            ("max", lambda v, b: v > b), ("below", lambda v, b: v >= b))):
        return describe(bounds)
    return None


def check_number(name: str, value: Any, kind: type = int, **bounds: Any) -> Any:
    """``value`` (a float for ``kind=float``), or a :class:`UsageError` naming ``name``:
    ``--rows must be at least 1, got 0``."""
    why = problem(value, kind, bounds)
    if why:
        raise UsageError(f"{name} must be {why}, got {value!r}")
    return float(value) if kind is float else value


class Number(argparse.Action):
    """A numeric flag: its string parsed as ``kind`` (int or float) and checked against the
    bounds given to ``add_argument`` (``min=1``, ...), which also end its help text. A bad
    value is a :class:`UsageError` naming the flag, raised from ``parse_args``."""

    def __init__(self, option_strings, dest, *, kind: type = int, **kw) -> None:
        self.kind = kind
        self.bounds = {k: kw.pop(k) for k in BOUNDS if k in kw}
        if kw.get("help") and self.bounds:
            kw["help"] = f"{kw['help']}; {describe(self.bounds)}"
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        try:
            value = self.kind(values)
        except (TypeError, ValueError):
            raise UsageError(f"{option_string} must be "
                             f"{'an integer' if self.kind is int else 'a number'}, got "
                             f"{values!r}") from None
        setattr(namespace, self.dest,
                check_number(option_string, value, self.kind, **self.bounds))


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether the paths ``a`` and ``b`` name one file: the same path after symbolic links,
    or (both existing) the same inode, as a hard link."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(flag: str, path: str | Path | None,
                 inputs: dict[str, str | Path | None] | None = None) -> None:
    """An output file ``path`` (given with ``flag``) that can be written: not one of the
    command's ``inputs`` (flag -> path: writing it would replace what the command reads), not
    a folder, and its nearest existing parent a writable folder (missing folders below it are
    created when the file is written). Checked before the work, which would otherwise end in
    a failed write. ``None`` (the flag not given) passes."""
    if path is None:
        return
    path = Path(path)
    for in_flag, in_path in (inputs or {}).items():
        if in_path is not None and same_file(path, in_path):
            raise UsageError(f"{flag} {path} is {in_flag} {in_path}, an input of this command: "
                             f"writing it would replace what it reads; give another {flag}")
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder, not a file")
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: the folder {parent} is not writable")


def check_input(flag: str, path: str | Path | None) -> None:
    """An input file ``path`` (given with ``flag``) that is, after symlinks, a regular file:
    a FIFO, a device or a socket would hang or never end the read, so they are refused
    before it. A missing file is left to the reader, whose message names it. ``None``
    passes."""
    if path is None or not os.path.lexists(path):
        return
    if not Path(path).is_file():
        what = "a folder" if Path(path).is_dir() else \
            "a dangling link" if not Path(path).exists() else "not a regular file"
        raise UsageError(f"{flag} {path} is {what}")


def layer_names(spec: str | None, flag: str, allowed: Sequence[str]) -> tuple[str, ...]:
    """A comma list of layer names (``"fc7,fc8"``), in network order; a name not in
    ``allowed`` is a :class:`UsageError`."""
    names = [n.strip() for n in (spec or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or (spec is not None and not names):
        raise UsageError(f"{flag} takes layer names from {', '.join(allowed)}; got {spec!r}")
    return tuple(n for n in allowed if n in names)
