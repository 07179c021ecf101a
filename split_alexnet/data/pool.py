"""The data side's worker processes (prepare and the statistics): a pool whose workers never
outlive the parent, and that stops promptly when a signal asks it to.

* :class:`WorkerPool`: worker processes (:func:`mp_context`), one pipe each, that ignore
  SIGINT and SIGTERM (a Ctrl-C or a ``kill`` of the process group reaches the parent, which
  decides), exit by themselves as soon as their parent process is gone (even after SIGKILL),
  and are killed (SIGKILL) when the parent stops early. With 0 workers the tasks run in the
  calling process, with the same stop checks between tasks.
* The stop: the parent's :class:`split_alexnet.utils.signals.StopOnSignal`, checked between
  chunks (:meth:`WorkerPool.results` every 0.2 s), so a signal is honoured within one chunk; a
  stopped computation raises :class:`split_alexnet.utils.cli.Interrupted` (exit code 130).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from multiprocessing import connection
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Callable, Iterator

from split_alexnet.utils.cli import Abort
from split_alexnet.utils.signals import StopOnSignal

__all__ = ["mp_context", "WorkerPool"]

POLL = 0.2          # seconds between two checks of the stop flag while waiting for a result
PARENT_POLL = 0.5   # seconds between two checks, in a worker, that its parent still exists


def mp_context() -> BaseContext:
    """forkserver where available (one fresh server imports the package - which imports torch -
    once; workers are forked from it cheaply and safely), else spawn."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # The server imports the package itself, not only through __main__ (the default preload):
    # called from a program that is not one of the package's commands (a notebook, a script
    # that imports the package later, a test runner) every worker would import torch anew.
    # Set before the server starts; afterwards it changes nothing.
    ctx.set_forkserver_preload(["__main__", __name__])
    return ctx


def _watch_parent(ppid: int) -> None:
    while os.getppid() == ppid:
        time.sleep(PARENT_POLL)
    os._exit(1)  # the parent is gone: nobody will read our results


def _worker(conn: Connection) -> None:
    """A worker process: leave signals to the parent, exit when the parent process is gone
    (with forkserver the parent is the server, which exits when the main process does) or
    closes the pipe; run ``(fn, task)`` messages, answer ``("ok", result)`` or ``("error",
    exception)``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        fn, task = msg
        try:
            out = ("ok", fn(task))
        except Exception as e:  # noqa: BLE001 - re-raised in the parent
            out = ("error", e)
        try:
            conn.send(out)
        except (EOFError, OSError):
            return
        except Exception as e:  # noqa: BLE001 - an exception that does not pickle
            conn.send(("error", RuntimeError(f"{type(out[1]).__name__}: {out[1]} ({e})")))


def _died(p: BaseProcess) -> None:
    """Abort (one line, exit 1) for worker ``p``, which is gone."""
    p.join(1)
    code = p.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 \
        else f"exit code {code}"
    raise Abort(f"a data worker process died ({how}; out of memory?); rerun with --workers 0 "
                f"to see the error")


class WorkerPool:
    """``with WorkerPool(workers, stop) as pool: for res in pool.results(fn, tasks): ...``.

    ``results`` yields ``fn(task)`` for every task (in order if ``ordered``), from the worker
    processes, or in this process for 0 workers or a single task; it returns early once
    ``stop`` is set, and re-raises an exception a task raised. Each worker has its own pipe
    (no lock is shared, so killing a worker never blocks the others or the parent). Leaving
    the block after all results were read lets the workers exit; leaving it early (a stop,
    an error) kills them. The processes are started on first need (:meth:`start`); one that
    dies is one line (:class:`split_alexnet.utils.cli.Abort`, exit 1)."""

    def __init__(self, workers: int, stop: StopOnSignal | None = None) -> None:
        self.workers, self.stop = workers, stop
        self.procs: list[tuple[BaseProcess, Connection]] = []
        self._finished = False

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        self.close(kill=exc_type is not None or not self._finished or self._stopped())

    def _stopped(self) -> bool:
        return self.stop is not None and bool(self.stop)

    def start(self) -> None:
        """Start the workers now and wait until they are ready (so that their start-up is
        not in a progress line's rate)."""
        if self.workers <= 0 or self.procs:
            return
        ctx = mp_context()
        for _ in range(self.workers):
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(theirs,), daemon=True)
            p.start()
            theirs.close()
            self.procs.append((p, mine))
        for p, conn in self.procs:
            self._receive(p, conn, None)

    def _receive(self, p: BaseProcess, conn: Connection, timeout: float | None):
        """The next message of worker ``p`` (re-raising a task's exception); Abort if the
        worker died without one."""
        msg = None
        if conn in connection.wait([conn, p.sentinel], timeout):
            try:
                msg = conn.recv()
            except EOFError:  # the worker's end closed: it is gone
                pass
        if msg is None:
            _died(p)
        kind, value = msg
        if kind == "error":
            raise value
        return value

    def results(self, fn: Callable, tasks: list, ordered: bool = False) -> Iterator:
        self._finished = False
        if self.workers > 0 and len(tasks) > 1:
            self.start()
            yield from self._parallel(fn, tasks, ordered)
        else:
            for task in tasks:
                if self._stopped():
                    return
                yield fn(task)
        self._finished = not self._stopped()

    def _parallel(self, fn: Callable, tasks: list, ordered: bool) -> Iterator:
        todo = list(enumerate(tasks))[::-1]
        idle = list(self.procs)
        busy: dict[Connection, tuple[BaseProcess, int]] = {}
        done: dict[int, object] = {}
        nxt = 0
        while todo or busy:
            while idle and todo:
                p, conn = idle.pop()
                i, task = todo.pop()
                try:
                    conn.send((fn, task))
                except OSError:  # its end of the pipe is closed: it is gone
                    _died(p)
                busy[conn] = (p, i)
            if self._stopped():
                return
            waiting = list(busy) + [p.sentinel for p, _ in busy.values()]
            ready = set(connection.wait(waiting, POLL))
            if self._stopped():
                return
            for conn in [c for c in busy if c in ready or busy[c][0].sentinel in ready]:
                p, i = busy.pop(conn)
                done[i] = self._receive(p, conn, 0)
                idle.append((p, conn))
            while done and (not ordered or nxt in done):
                i = nxt if ordered else next(iter(done))
                yield done.pop(i)
                nxt += 1

    def close(self, kill: bool = True) -> None:
        """End the workers: let them exit (``kill=False``, after all results were read) or
        kill them at once."""
        procs, self.procs = self.procs, []
        for p, conn in procs:
            if kill:
                p.kill()
            else:
                try:
                    conn.send(None)
                except OSError:
                    p.kill()
        for p, conn in procs:
            p.join(5)
            if p.exitcode is None:
                p.kill()
                p.join()
            conn.close()
