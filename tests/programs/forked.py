"""Runs ``PROGRAM ARGS`` as this process would run them, in a process forked by the test's
fork server (tests/fork_server.py, its socket in $FORK_SERVER): with this process's
environment, working folder, stdin, stdout and stderr, and ``python -u``'s unbuffered output.
The signals this process receives (SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2) are passed on,
this process ends as that one ends (its exit code, or killed by its signal), and if this one
is killed, so is that one.

torchrun starts each rank as ``python -u forked.py PROGRAM ARGS`` (helpers.torchrun_command):
the rank's program runs without the 4 CPU-seconds of importing torch again.

Usage: forked.py PROGRAM ARGS...
"""

import os
import signal
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/
import fork_server  # noqa: E402

proc = fork_server.Forked(sys.argv[1:], env=dict(os.environ), cwd=os.getcwd(), tie=True,
                          unbuffered=True)


def pass_on(sig: int, _frame) -> None:
    """Sends ``sig`` on to the forked process (a signal handler)."""
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass  # it has ended: its status is on its way


for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(sig, pass_on)
rc = proc.wait()
if rc < 0:
    signal.signal(-rc, signal.SIG_DFL)
    os.kill(os.getpid(), -rc)
sys.exit(rc)
