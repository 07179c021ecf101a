"""The one SIGTERM/SIGINT handler of the project (:class:`StopOnSignal`): the first signal asks
the work to stop at its next check, a second stops it at once.

Training checks it after every batch (it saves where that is meaningful and exits 0);
``prepare`` and the statistics check it between chunks of their worker tasks
(``data/pool.py``). What a stopped computation raises is
:class:`split_alexnet.utils.cli.Interrupted` (exit code 130). Standard library only.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["StopOnSignal"]


class StopOnSignal:
    """``with StopOnSignal() as stop: ... if stop: ...``: while it is entered, the first
    SIGTERM or SIGINT only sets ``stop.signum`` (true from then on), and the work stops at its
    next check. A second raises ``KeyboardInterrupt`` at once (exit 130); :attr:`forced` then
    says so, for a save that it cut short (the save is abandoned, the previous file stays).
    Outside the main thread it installs nothing (and never stops). Leaving it restores the
    handlers it replaced, so nested uses work; it may be entered again later."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0  # signals received
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        self.count += 1
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._old.clear()

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def forced(self) -> bool:
        """A second signal arrived: stop now, without saving."""
        return self.count > 1

    @property
    def name(self) -> str:
        """``"SIGTERM"`` / ``"SIGINT"`` (the first signal received), or ``""``."""
        return signal.Signals(self.signum).name if self.signum is not None else ""
