"""Helpers shared by the test files: inputs and data sets, the trainer's flags and calls,
child processes, run folders and their records. Import what a test uses:
``from helpers import BASE, train``. The shared fixtures are in conftest.py.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

import fork_server
from split_alexnet.data.demo import make_demo_dataset
from split_alexnet.network.model import INPUT_SIZE
from split_alexnet.training.command import main as train_main
from split_alexnet.utils.cli import run

#: The repository root (this checkout).
REPO = Path(__file__).resolve().parents[1]
#: Python programs the tests run as child processes, one per file.
PROGRAMS = REPO / "tests" / "programs"

#: The training flags of the short runs: 2 epochs of batch 8, no loader workers, Caffe's
#: initialisation, centre crop only, seed 3. The layout (``CPU_PAIR``, ``--single-device``)
#: and anything else a test needs follow at the call.
BASE = ["--batch-size", "8", "--epochs", "2", "--workers", "0", "--log-interval", "1",
        "--init", "caffe", "--no-ten-crop", "--seed", "3"]
#: The two towers on two CPU devices: the paper's split layout without GPUs.
CPU_PAIR = ["--devices", "cpu,cpu"]

#: The flags of the small torchrun jobs of tests/test_distributed*.py: the pair on cpu,cpu in
#: each process, a global batch of 6, one epoch, seed 5, no dropout (its masks differ between
#: the ranks and one process).
DIST_FLAGS = ["--devices", "cpu,cpu", "--batch-size", "6", "--epochs", "1", "--workers", "0",
              "--log-interval", "1", "--init", "caffe", "--no-ten-crop", "--seed", "5",
              "--dropout", "0"]

#: Variables of torch.distributed that must not leak from this process into a torchrun job.
DIST_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "OMP_NUM_THREADS")


# ----------------------------------------------------------------------------- inputs, data


def paper_images(n: int, *, size: int = INPUT_SIZE, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, 3, size, size) random inputs at the paper's scale (0-255 RGB minus the mean: std 60)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, size, size, generator=g) * 60).to(dtype)


# At batch 8 an epoch of repeated_tiny_set is ``copies`` steps over the same 8 images, and the
# set's statistics are those of the 8: runs of many steps and few epochs (an epoch's end writes
# a full-size checkpoint).
def repeated_tiny_set(path: Path, copies: int) -> Path:
    """The demo's 2 classes x 4 training images (seed 1), each in ``copies`` hard-linked files."""
    root = make_demo_dataset(path, classes=2, train_per_class=4, val_per_class=2, seed=1)
    for image in sorted((root / "train").glob("*/*.jpg")):
        for k in range(1, copies):
            os.link(image, image.with_name(f"{image.stem}_copy{k}{image.suffix}"))
    return root


# ----------------------------------------------------------------------------- the trainer


def train(root, out, *extra) -> int:
    """Runs the trainer's main here on ``root`` into ``out`` with BASE, then ``extra``: its rc."""
    return run(train_main, "train", ["--data", str(root), "--out", str(out), *BASE,
                                     *map(str, extra)])


def run_main(main, prog: str, argv, capsys) -> tuple[int, str, str]:
    """A command's ``main`` run here as its console command runs it (:func:`run`: one-line
    errors and exit codes), ``argv`` as strings: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = run(main, prog, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def train_args(root, out, *extra) -> list[str]:
    """``-m split_alexnet.train`` on ``root`` into ``out`` with BASE, then ``extra``: the
    arguments of :func:`start_python` and :func:`run_python`."""
    return ["-m", "split_alexnet.train", "--data", str(root), "--out", str(out), *BASE,
            *map(str, extra)]


# ----------------------------------------------------------------------------- child processes

#: Whether every child process starts from a fresh interpreter (pytest --fresh-interpreters)
#: instead of being forked from the preloaded one (fork_server.py).
FRESH = {"interpreters": False}


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with this checkout first on PYTHONPATH, plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def start_python(args, *, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=None,
                 cwd=REPO, session: bool = False, fsize: int | None = None):
    """``python *args`` (``-m module ...`` or ``PROGRAM ...``) in a process of its own, as
    ``subprocess.Popen`` starts it (stdout and stderr: DEVNULL, None or a file; ``session``:
    a session of its own; ``fsize``: :func:`file_size_limit`): forked from the interpreter of
    fork_server.py that has imported torch once, or, with ``--fresh-interpreters``, a new
    one."""
    args, env = [str(a) for a in args], child_env() if env is None else env
    if FRESH["interpreters"]:
        return subprocess.Popen([sys.executable, *args], stdout=stdout, stderr=stderr,
                                env=env, cwd=cwd, start_new_session=session,
                                preexec_fn=_preexec(fsize))
    return fork_server.Forked(args, env=env, cwd=cwd, stdout=stdout, stderr=stderr,
                              session=session, fsize=fsize)


def run_python(*args, env=None, cwd=REPO, timeout: float = 300, fsize: int | None = None,
               preexec=None, fresh: bool = False) -> subprocess.CompletedProcess:
    """Runs ``python *args`` (:func:`start_python`), capturing its text. A fresh interpreter
    with ``fresh`` (a test of what an interpreter imports, or of another ``sys.path``) or
    ``preexec`` (a function run in the new process before Python starts)."""
    args, env = [str(a) for a in args], child_env() if env is None else env
    if FRESH["interpreters"] or fresh or preexec is not None:
        return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True,
                              text=True, timeout=timeout, env=env,
                              preexec_fn=_preexec(fsize, preexec))
    return fork_server.run(args, env=env, cwd=cwd, timeout=timeout, fsize=fsize)


def _preexec(fsize: int | None, then=None):
    """The preexec_fn of a fresh interpreter: the file-size limit ``fsize`` (None: none),
    then ``then``; None when there is nothing to do."""
    if fsize is None:
        return then
    limit = file_size_limit(fsize)
    return limit if then is None else lambda: (limit(), then())


def file_size_limit(nbytes: int):
    """A preexec_fn: writes past ``nbytes`` in a file fail with EFBIG, as on a full disk
    (:func:`fork_server.limit_file_size`)."""
    return functools.partial(fork_server.limit_file_size, nbytes)


def torchrun_command(program: Path, report: Path, args, *, env_extra=None,
                     nproc=2) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run ``program`` on ``nproc`` ranks under torchrun
    ($REPORT=report, one torch thread each, a collective timeout of 60 s), each rank forked
    by programs/forked.py (or, with ``--fresh-interpreters``, a new interpreter)."""
    report.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in child_env().items() if k not in DIST_VARS}
    env.update(REPORT=str(report), OMP_NUM_THREADS="1", SPLIT_ALEXNET_DIST_TIMEOUT="60")
    env.update(env_extra or {})
    ranks = [str(program)]
    if not FRESH["interpreters"]:  # each rank forked from the preloaded interpreter
        ranks, env["FORK_SERVER"] = [str(PROGRAMS / "forked.py"), *ranks], fork_server.server()
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            str(nproc), *ranks, *map(str, args)], env


def torchrun(program: Path, report: Path, args, *, env_extra=None, timeout=240, nproc=2):
    """Runs ``program`` on ``nproc`` ranks under torchrun (:func:`torchrun_command`):
    (process, seconds)."""
    cmd, env = torchrun_command(program, report, args, env_extra=env_extra, nproc=nproc)
    t0 = time.monotonic()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return p, time.monotonic() - t0


def runs_argv(runs: dict[str, list]) -> list[str]:
    """The arguments of programs/train_with_rank_report.py for the trainer runs ``runs``
    (report folder name: the driver's options of the run and its flags), in order."""
    argv: list[str] = []
    for name, flags in runs.items():
        argv += [*(["--then"] if argv else []), "--report", name, *map(str, flags)]
    return argv


def run_outputs(stdout: str, stderr: str, names) -> dict[str, str]:
    """Each run's part of a job's output (rank 0 begins run NAME with ``== run NAME``): its
    stdout and its stderr, by name."""
    text = {}
    for name in names:
        parts = [stream.split(f"== run {name}\n", 1) for stream in (stdout, stderr)]
        text[name] = "".join(part[1].split("== run ", 1)[0] if len(part) == 2 else ""
                             for part in parts)
    return text


def torchrun_runs(program: Path, report: Path, runs: dict[str, list], *, timeout=300,
                  nproc=2) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """The trainer runs ``runs`` (:func:`runs_argv`) in turn in one torchrun job of
    programs/train_with_rank_report.py (``report/NAME`` holds run NAME's reports): (the job's
    process, each run's output, :func:`run_outputs`)."""
    p, _ = torchrun(program, report, runs_argv(runs), timeout=timeout, nproc=nproc)
    return p, run_outputs(p.stdout, p.stderr, runs)


def rank_reports(report: Path) -> dict[int, dict]:
    """The reports of programs/train_with_rank_report.py in ``report``, by rank."""
    return {int(f.stem[len("rank"):]): json.loads(f.read_text())
            for f in sorted(report.glob("rank*.json"))}


def loader_workers(pid: int) -> list[int]:
    """The forked children of ``pid`` (DataLoader workers: the same command line)."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    found = []
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and (d / "cmdline").read_bytes() == cmdline:
                found.append(int(d.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


class Segment:
    """A trainer process on ``out`` (cpu,cpu, a save every step), stderr to a file (no pipe)."""

    def __init__(self, root, out: Path, name: str, *extra, session: bool = False) -> None:
        self.name, self.out = name, out
        self.err_path = out.parent / f"{name}.stderr"
        self.t0, self.n0 = time.monotonic(), len(records(out, torn_ok=True))
        args = train_args(root, out, *CPU_PAIR, "--checkpoint-minutes", "0", *extra)
        with open(self.err_path, "w") as err:
            self.proc = start_python(args, stderr=err, session=session)

    def step(self) -> int:
        """The last step this process has logged (0 before its first)."""
        return max([r["step"] for r in records(self.out, torn_ok=True)[self.n0:]
                    if r["kind"] == "train"], default=0)

    @property
    def err(self) -> str:
        """What the process has written on stderr so far."""
        return self.err_path.read_text()

    def wait_for(self, pred, timeout: float = 600.0, poll: float = 0.02) -> None:
        """Polls until ``pred()``; fails if the process exits first or time runs out."""
        deadline = time.monotonic() + timeout
        while not pred():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited early (rc {self.proc.returncode}):\n"
                                     f"{self.err[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"{self.name}: timed out waiting\n{self.err[-3000:]}")
            time.sleep(poll)

    def finish(self, timeout: float = 300.0) -> int:
        """The process's exit code, once it has exited (killed after ``timeout`` seconds)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


# ----------------------------------------------------------------------------- run folders


def stored(path) -> dict:
    """A checkpoint's contents, for a test that compares them: read as ``torch.load`` reads
    them (``weights_only``, memory-mapped: only the tensors the test touches are read), without
    ``load_checkpoint``'s checks (checksum, shapes, finiteness: half a second per file), which
    every resume and tool runs on every file and tests/test_reliability_checkpoints.py tests.
    A test whose claim is that a file is a valid checkpoint loads it with ``load_checkpoint``."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def records(out, *, torn_ok: bool = False) -> list[dict]:
    """The records in ``out``/metrics.jsonl; ``torn_ok``: cut-short lines skipped, no file = []."""
    p = Path(out) / "metrics.jsonl"
    if torn_ok and not p.exists():
        return []
    found = []
    for line in p.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            if not torn_ok:
                raise
    return found


def write_records(out: Path, recs: list[dict]) -> Path:
    """The run folder ``out`` (created if need be) with ``recs`` as its metrics.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return out


def error_lines(err: str) -> list[str]:
    """The lines of ``err`` that report an error."""
    return [ln for ln in err.splitlines() if "error:" in ln]


def temp_files(out) -> list[Path]:
    """The temporaries (``.*.tmp``) in the run folder ``out``."""
    return sorted(Path(out).glob(".*.tmp"))


def copy_run(src: Path, dst: Path) -> Path:
    """Copies a run folder to continue: checkpoints hard-linked (saves replace them)."""
    shutil.copytree(src, dst, copy_function=lambda a, b: (
        os.link if a.endswith(".pt") else shutil.copyfile)(a, b))
    return dst


# ----------------------------------------------------------------------------- files


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data and CRC."""
    return struct.pack(">I", len(data)) + kind + data + \
        struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


class RunsCode:
    """Unpickled, it runs ``touch marker``: the payload of a hostile checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
