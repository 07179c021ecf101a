"""Shared command-line plumbing: one clear line on stderr and the exit code of why a command
stopped (2 for bad input, 1 for a run that must stop, 130 for work a signal cut short).

Every ``python -m split_alexnet.<tool>`` entry point wraps its ``main`` with :func:`run`, and
raises :class:`UsageError` for anything the user got wrong (a missing folder, a bad flag value,
a garbage checkpoint), :class:`Abort` for a run that cannot go on, :class:`Interrupted` for
work a signal stopped before it could finish. The user then sees
``split_alexnet.<tool>: error: <message>`` and no traceback. Bugs still raise normally, so they
are not hidden.
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


class Interrupted(Abort):
    """Work that a signal stopped before it could finish (a SIGTERM during the statistics, a
    second signal during a save): one line, exit code 130, as for Ctrl-C whichever the signal.
    ``signum``: the signal that stopped it, where known."""

    code = 130

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum


def run(main: Callable[[Sequence[str] | None], int | None], prog: str,
        argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)``; turn an :class:`Abort` (its subclasses included) into one stderr
    line and its exit code, and a ``KeyboardInterrupt`` into ``interrupted`` and 130."""
    try:
        rc = main(argv)
    except Abort as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0 if rc is None else int(rc)
