"""Shared command-line plumbing: one clear line on stderr and exit code 2 for bad input.

Every ``python -m split_alexnet.<tool>`` entry point wraps its ``main`` with :func:`run`, and
raises :class:`UsageError` for anything the user got wrong (a missing folder, a bad flag value,
a garbage checkpoint). The user then sees ``split_alexnet.<tool>: error: <message>`` and no
traceback. Bugs still raise normally, so they are not hidden.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence


class Abort(Exception):
    """A run that must stop (NaN loss, a dead rank): one line on stderr, exit code 1."""

    code = 1


class UsageError(Abort):
    """Bad input from the user: reported as one line on stderr with exit code 2."""

    code = 2


def run(main: Callable[[Sequence[str] | None], int | None], prog: str,
        argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)``; turn :class:`UsageError` into one stderr line and exit code 2."""
    try:
        rc = main(argv)
    except Abort as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0 if rc is None else int(rc)
