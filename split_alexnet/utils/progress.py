"""A dependency-free progress line for long work: count, rate, ETA, on stderr.

On a terminal it redraws one line; elsewhere (logs, CI, SLURM) it prints a line every
``interval`` seconds so that a job log shows the rate and ETA without flooding.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    """``with Progress(total, "prepare") as p: ... p.update(n, extra="loss 2.3")``."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "it", interval: float = 5.0,
                 stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.2 if self.tty else interval
        self.n = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._shown: tuple[int, str] | None = None
        self.extra = ""

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if self.total:
            pct = 100.0 * self.n / self.total
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            eta_s = format_seconds(eta) if eta == eta else "?"
            head = f"{self.desc}: {self.n}/{self.total} ({pct:5.1f}%)"
            tail = f"{rate:.1f} {self.unit}/s, elapsed {format_seconds(elapsed)}, ETA {eta_s}"
        else:
            head = f"{self.desc}: {self.n}"
            tail = f"{rate:.1f} {self.unit}/s, elapsed {format_seconds(elapsed)}"
        return f"{head} | {tail}" + (f" | {self.extra}" if self.extra else "")

    def update(self, n: int = 1, extra: str | None = None) -> None:
        self.n += n
        if extra is not None:
            self.extra = extra
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._emit()

    def _emit(self) -> None:
        self._shown = (self.n, self.extra)
        if self.tty:
            self.stream.write("\r" + self.line()[:200].ljust(100))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            if self._shown != (self.n, self.extra):  # the last count or extra not yet shown
                self._emit()
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()
            self.enabled = False
