"""Shared command-line plumbing: one clear line on stderr and exit code 2 for bad input.

Every ``python -m split_alexnet.<tool>`` entry point wraps its ``main`` with :func:`run`, and
raises :class:`UsageError` for anything the user got wrong (a missing folder, a bad flag value,
a garbage checkpoint). The user then sees ``split_alexnet.<tool>: error: <message>`` and no
traceback. Bugs still raise normally, so they are not hidden.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr with exit code 2."""


def run(main: Callable[[Sequence[str] | None], int | None], prog: str,
        argv: Sequence[str] | None = None) -> int:
    """Call ``main(argv)``; turn :class:`UsageError` into one stderr line and exit code 2."""
    try:
        rc = main(argv)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0 if rc is None else int(rc)
