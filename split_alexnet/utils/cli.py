"""Shared command-line plumbing: one clear line on stderr and the exit code of why a command
stopped (2 for bad input, 1 for a run that must stop, 130 for work a signal cut short).

Every ``python -m split_alexnet.<tool>`` entry point wraps its ``main`` with :func:`run`, and
raises :class:`UsageError` for anything the user got wrong (a missing folder, a bad flag value,
a garbage checkpoint), :class:`Abort` for a run that cannot go on, :class:`Interrupted` for
work a signal stopped before it could finish. The user then sees
``split_alexnet.<tool>: error: <message>`` and no traceback. Bugs still raise normally, so they
are not hidden. :class:`Parser` is every tool's argparse parser: its usage line names the
command as the user typed it, flags are never abbreviated, and a misspelt flag is one line
with the nearest real one.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import Callable, NoReturn, Sequence


class Abort(Exception):
    """A run that must stop (NaN loss, a dead rank): one line on stderr, exit code 1. With
    ``quiet`` set (a rank of a torchrun job whose rank 0 reports the same stop) the exit code
    alone, so that the job prints its line once."""

    code = 1
    quiet = False


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
    line (none when it is ``quiet``) and its exit code, and a ``KeyboardInterrupt`` into
    ``interrupted`` and 130."""
    try:
        rc = main(argv)
    except Abort as e:
        if not e.quiet:
            print(f"{prog}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0 if rc is None else int(rc)


def first_sentence(doc: str | None) -> str:
    """A module docstring's first sentence, across its line breaks: a tool's description."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    end = text.find(". ")
    return text if end < 0 else text[:end + 1]


def command_name(module: str) -> str:
    """How the user called the tool of ``module`` (``split_alexnet.train``): its console
    command (``split-alexnet-train``) when that is what ran, else ``python -m module``."""
    typed = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if typed.startswith("split-alexnet-"):
        return typed
    return f"python -m {module}"


class Parser(argparse.ArgumentParser):
    """argparse for every tool: ``Parser(module="split_alexnet.train", ...)`` names the command
    as typed (:func:`command_name`); no abbreviations (``--device`` is not ``--devices``); a
    usage error is one line, exit 2, with "did you mean" for a misspelt flag."""

    def __init__(self, *args, module: str | None = None, **kw) -> None:
        kw.setdefault("allow_abbrev", False)
        if module is not None:
            kw["prog"] = command_name(module)
        super().__init__(*args, **kw)

    def _flags(self) -> list[str]:
        """Every option string of this parser and its subcommands."""
        out = []
        for a in self._actions:
            out += a.option_strings
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    out += sub._flags() if isinstance(sub, Parser) else []
        return out

    def error(self, message: str) -> NoReturn:
        hint = ""
        if message.startswith("unrecognized arguments: "):
            flags = self._flags()
            for word in message.split(": ", 1)[1].split():
                close = difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.6) \
                    if word.startswith("--") else []
                if close:
                    hint = f"; did you mean {close[0]}?"
                    break
        self.exit(2, f"{self.prog}: error: {message}{hint} (--help lists every flag)\n")
