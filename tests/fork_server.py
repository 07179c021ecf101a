"""Child processes forked from one interpreter that has imported torch once: the server, and
:class:`Forked`, the ``subprocess.Popen`` of a process it started.

A test that runs a command in a process of its own (``python -m split_alexnet.train ...``,
``python PROGRAM ...``) pays about 4 CPU-seconds, on the test machines, before the command does
anything: the imports of torch and of its compiler (torch's optimizers import it), numpy and
PIL. The server pays them once per pytest worker (the compiler's only from torch 2.14:
:data:`COMPILER_FROM`). It then forks one process per command, which
runs as ``python`` runs it (``runpy``, ``__main__``, ``sys.argv``, ``sys.path[0]``), in its own
working folder and environment, with the three descriptors it was given as stdin, stdout and
stderr, its own exit code, and the interpreter's own ending: an exception that escapes is a
traceback and exit code 1, ``sys.exit(n)`` is n, atexit handlers run. Only third-party modules
are imported in advance: the package's own modules are imported by each command, as a fresh
interpreter imports them (a missing import still fails).

What still differs from a fresh interpreter, and so stays with one (``helpers.run_python(...,
fresh=True)``, or ``subprocess`` itself): what an interpreter imports (test_utils), another
``sys.path`` than this checkout's (test_packaging), a ``preexec_fn`` such as an address-space
limit (the server's address space already holds torch), processes found by their environment
in /proc/PID/environ (which shows the server's), and the real entry points themselves
(``python -m split_alexnet.train --help``, the console scripts). ``pytest
--fresh-interpreters`` runs every command in a fresh interpreter: the suite passes either way.

The protocol: one SOCK_SEQPACKET connection per process. The client sends one message: a
JSON header (argv, env, cwd, session, file-size limit, tie, unbuffered) with the descriptors
0, 1 and 2 of the process to be (SCM_RIGHTS). The server forks and answers ``{"pid": N}``; when the
process has ended, ``{"status": S}`` (``os.waitpid``'s status), and closes the connection.
With ``tie``, a connection closed first (its client died) SIGKILLs the process. With
``unbuffered``, stdout and stderr are written through, as with ``python -u``. A process reads
$OMP_NUM_THREADS as it starts; OpenMP read the server's, so the process sets torch's thread
count from its own.

The server ends when its stdin closes (the pytest worker that started it has ended).

Usage: ``python tests/fork_server.py SOCKET`` (started by :func:`server`).
"""

from __future__ import annotations

import atexit
import io
import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys

#: What the server imports before it forks: every third-party module the commands import
#: first and that takes noticeable time; and torch's compiler (:data:`COMPILER_FROM`).
PRELOAD = ("torch", "torch.distributed", "numpy", "PIL.Image")
#: The first torch whose compiler (``torch._dynamo``, imported by torch's optimizers: 1.2
#: CPU-s) is imported by the server too: a process forked after importing torch 2.4's
#: compiler aborts as it exits ("terminate called after throwing an instance of
#: 'std::system_error', what(): No such process") or hangs there; 2.14's is checked (the
#: suite). Versions between: not tried, so not preloaded.
COMPILER_FROM = (2, 14)
#: The server's ``sys.path`` after its own folder (it starts without $PYTHONPATH): the site
#: folders.
SITE_PATH = sys.path[1:]
HEADER_MAX = 1 << 20


# ----------------------------------------------------------------------------- the server


def _run_command(argv: list[str], cwd: str) -> None:
    """Runs ``python *argv`` (``-m MODULE ARGS`` or ``PROGRAM ARGS``) in this process, with
    the ``sys.path`` that ``python`` would give it: the module's folder (the working one for
    ``-m``), then $PYTHONPATH, then the site folders."""
    import runpy
    first = cwd if argv[0] == "-m" else os.path.dirname(os.path.abspath(argv[0]))
    extra = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
             if p]
    sys.path[:] = [first, *extra, *SITE_PATH]
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]  # runpy puts the module's file in sys.argv[0]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")


def _child(header: dict, fds: list[int], server_objects: list, server_fds: list[int]) -> None:
    """In the forked process: becomes the command's process, then runs it. Returns only by
    an exception (the command's own, or SystemExit at its end)."""
    try:
        for obj in server_objects:  # the server's sockets and selector, closed in this copy
            obj.close()
        for fd in server_fds:
            os.close(fd)
        if header["session"]:
            os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(header["cwd"])
        os.environ.clear()
        os.environ.update(header["env"])
        if "OMP_NUM_THREADS" in os.environ:  # read by OpenMP as the server started, not now
            import torch
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        if header["unbuffered"]:  # python -u
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True,
                                          encoding=sys.stdout.encoding, errors=sys.stdout.errors)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True,
                                          encoding=sys.stderr.encoding, errors=sys.stderr.errors)
        if header["fsize"] is not None:
            limit_file_size(header["fsize"])
    except BaseException as e:  # noqa: BLE001 - the process cannot start: say why, exit 127
        os.write(2, f"fork_server: cannot start {header['argv']}: {e!r}\n".encode())
        os._exit(127)
    _run_command(header["argv"], header["cwd"])
    raise SystemExit(0)


def limit_file_size(nbytes: int) -> None:
    """From now on, in this process: writes past ``nbytes`` in a file fail with EFBIG, as on
    a full disk (SIGXFSZ ignored: the write fails, the process is not killed)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


class _Process:
    """The server's record of a process it forked."""

    def __init__(self, pid: int, conn: socket.socket, tie: bool) -> None:
        self.pid, self.conn, self.tie = pid, conn, tie
        self.pidfd = os.pidfd_open(pid)  # readable once the process has ended
        self.open = True  # the client's connection


def serve(path: str) -> None:
    """Imports :data:`PRELOAD`, then serves ``path`` until stdin closes. No ``with`` or
    ``finally`` here: a forked process leaves through this function's frames."""
    import importlib
    for name in PRELOAD:
        importlib.import_module(name)
    import torch
    if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= COMPILER_FROM:
        importlib.import_module("torch._dynamo")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(64)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    procs: dict[int, _Process] = {}
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            what = key.data
            if what == "stdin":
                if not os.read(sys.stdin.fileno(), 4096):
                    return
            elif what == "accept":
                conn, _ = listener.accept()
                msg, fds, _, _ = socket.recv_fds(conn, HEADER_MAX, 3)
                header = json.loads(msg)
                pid = os.fork()
                if pid == 0:
                    _child(header, fds, [listener, sel, conn,
                                         *(p.conn for p in procs.values() if p.open)],
                           [p.pidfd for p in procs.values()])
                for fd in fds:
                    os.close(fd)
                proc = procs[pid] = _Process(pid, conn, header["tie"])
                sel.register(proc.pidfd, selectors.EVENT_READ, ("exit", proc))
                sel.register(conn, selectors.EVENT_READ, ("conn", proc))
                conn.send(json.dumps({"pid": pid}).encode())
            elif what[0] == "exit":
                proc = procs.pop(what[1].pid)
                _, status = os.waitpid(proc.pid, 0)
                sel.unregister(proc.pidfd)
                os.close(proc.pidfd)
                if proc.open:
                    sel.unregister(proc.conn)
                    try:
                        proc.conn.send(json.dumps({"status": status}).encode())
                    except OSError:
                        pass  # the client has just gone
                proc.conn.close()
            elif what[0] == "conn":  # a client closed its end before its process ended
                proc = what[1]
                if not proc.conn.recv(16):
                    sel.unregister(proc.conn)
                    proc.open = False
                    if proc.tie:
                        os.kill(proc.pid, signal.SIGKILL)


# ----------------------------------------------------------------------------- the client

_SERVER: dict[str, object] = {}


def server() -> str:
    """The socket of the server: $FORK_SERVER's (a process started by a test, such as
    programs/forked.py under torchrun, uses its test's server), or this process's own,
    started on first use and ended with this process."""
    if os.environ.get("FORK_SERVER"):
        return os.environ["FORK_SERVER"]
    if "path" not in _SERVER:
        import tempfile
        folder = tempfile.mkdtemp(prefix="fork_server.")
        path = os.path.join(folder, "socket")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.Popen([sys.executable, __file__, path], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env)
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the fork server did not start (rc {proc.wait()})")

        def stop() -> None:
            proc.stdin.close()
            proc.wait(timeout=30)
            os.unlink(path)
            os.rmdir(folder)
        atexit.register(stop)
        _SERVER.update(path=path, proc=proc)
    return _SERVER["path"]


def _fd(stream, default: int) -> tuple[int, bool]:
    """A descriptor for ``stream`` (None: this process's ``default``; DEVNULL; a file object
    or a descriptor) and whether it was opened here."""
    if stream is subprocess.DEVNULL:
        return os.open(os.devnull, os.O_RDWR), True
    if stream is None:
        return default, False
    return (stream if isinstance(stream, int) else stream.fileno()), False


class Forked:
    """A command's process started by the fork server: the part of ``subprocess.Popen`` the
    tests use (``pid``, ``returncode``, ``poll``, ``wait``, ``send_signal``, ``terminate``,
    ``kill``)."""

    def __init__(self, argv: list[str], *, env: dict[str, str], cwd, stdout=None,
                 stderr=None, session: bool = False, fsize: int | None = None,
                 tie: bool = False, unbuffered: bool = False) -> None:
        self.args = [sys.executable, *argv]
        self.returncode: int | None = None
        header = json.dumps({"argv": [str(a) for a in argv], "env": env, "cwd": str(cwd),
                             "session": session, "fsize": fsize, "tie": tie,
                             "unbuffered": unbuffered}).encode()
        opened = [_fd(subprocess.DEVNULL, 0), _fd(stdout, 1), _fd(stderr, 2)]
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._conn.connect(server())
            socket.send_fds(self._conn, [header], [fd for fd, _ in opened])
        finally:
            for fd, mine in opened:
                if mine:
                    os.close(fd)
        self.pid = json.loads(self._conn.recv(4096))["pid"]

    def _status(self, timeout: float | None) -> bool:
        """Waits up to ``timeout`` seconds (None: for ever, 0: not at all) for the exit."""
        if self.returncode is not None:
            return True
        self._conn.settimeout(timeout)
        try:
            msg = self._conn.recv(4096)
        except (TimeoutError, BlockingIOError):
            return False
        if not msg:
            raise RuntimeError(f"the fork server lost process {self.pid}")
        self.returncode = os.waitstatus_to_exitcode(json.loads(msg)["status"])
        self._conn.close()
        return True

    def poll(self) -> int | None:
        self._status(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._status(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run(argv: list[str], *, env: dict[str, str], cwd, timeout: float,
        fsize: int | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(capture_output=True, text=True)`` of a forked command: stdout and
    stderr are pipes, read as the process writes them; the process is killed after
    ``timeout`` seconds, as subprocess.run kills it."""
    import threading
    pipes = [os.pipe(), os.pipe()]
    try:
        proc = Forked(argv, env=env, cwd=cwd, stdout=pipes[0][1], stderr=pipes[1][1],
                      fsize=fsize)
    finally:
        for _, w in pipes:
            os.close(w)
    texts = ["", ""]

    def read(i: int) -> None:
        with open(pipes[i][0], encoding="utf-8", errors="replace") as f:
            texts[i] = f.read()
    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in (0, 1)]
    for t in readers:
        t.start()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    for t in readers:
        t.join()
    return subprocess.CompletedProcess(proc.args, proc.returncode, *texts)


if __name__ == "__main__":
    serve(sys.argv[1])
