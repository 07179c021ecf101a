"""The shared pieces in ``split_alexnet/utils``: the one signal handler, the one
``Interrupted``, the checkpoint file format without training code and the one JSON writer.

Real signals to this process, real subprocesses and real files; no mocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest

from helpers import run_python
from split_alexnet.utils.cli import Interrupted, run
from split_alexnet.utils.fileio import atomic_write, write_json
from split_alexnet.utils.signals import StopOnSignal


main_thread_only = pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                      reason="signal handlers can be set in the main thread only")


# ----------------------------------------------------------------------------- signals


@main_thread_only
def test_the_first_signal_asks_to_stop_and_a_second_stops_at_once():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with StopOnSignal() as stop:
        assert not stop and stop.name == "" and not stop.forced
        signal.raise_signal(signal.SIGTERM)
        assert stop and stop.signum == signal.SIGTERM and stop.name == "SIGTERM"
        assert not stop.forced
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert stop.forced and stop.name == "SIGTERM"  # the first signal is the one named
    assert {sig: signal.getsignal(sig) for sig in before} == before  # handlers restored
    assert stop  # the request outlives the block


@main_thread_only
def test_nested_stops_restore_the_outer_handler():
    with StopOnSignal() as outer:
        with StopOnSignal() as inner:
            signal.raise_signal(signal.SIGINT)
        assert inner and not outer
        signal.raise_signal(signal.SIGINT)
        assert outer and not outer.forced


def test_outside_the_main_thread_nothing_is_installed():
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def body():
        with StopOnSignal() as stop:
            seen.append(signal.getsignal(signal.SIGTERM))
        seen.append(bool(stop))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [before, False]


def test_interrupted_is_one_line_and_exit_130_whichever_the_signal(capsys):
    for sig in (signal.SIGTERM, signal.SIGINT, None):
        def main(argv):
            raise Interrupted("statistics stopped by a signal", sig)

        assert run(main, "split_alexnet.x", []) == 130
        assert capsys.readouterr().err == "split_alexnet.x: error: statistics stopped by a " \
                                          "signal\n"


# ----------------------------------------------------------------------------- checkpoint files


def modules_after(code: str) -> list[str]:
    """The modules loaded in a fresh interpreter after running ``code``."""
    p = run_python("-c", f"import sys\n{code}\nprint('\\n'.join(sorted(sys.modules)))",
                   timeout=120, fresh=True)
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


def test_the_checkpoint_file_format_imports_no_training_code():
    """What the tools read and write checkpoints with stands apart from training: importing
    it (in a fresh interpreter) loads no module of ``split_alexnet.training``."""
    loaded = modules_after("import split_alexnet.utils.checkpoint_file as f\n"
                           "assert callable(f.load_checkpoint) and callable(f.save_checkpoint)")
    assert "split_alexnet.utils.checkpoint_file" in loaded and "split_alexnet.network.model" \
        in loaded, loaded  # the probe saw the package's modules
    assert [m for m in loaded if m.startswith("split_alexnet.training")] == []


def test_the_trainer_starts_without_torchvision_or_torchs_compiler():
    """Importing the trainer (in a fresh interpreter) imports neither torchvision nor
    torch._dynamo: together about a second of every process's start on 2 CPU cores. The JPEG
    decoder imports torchvision at the first JPEG, the LRN kernels' loader the compiler only
    where torch.compile already did."""
    loaded = modules_after("import split_alexnet.training.command")
    assert "split_alexnet.network.lrn" in loaded and "split_alexnet.data.images" in loaded
    assert [m for m in loaded if m.split(".")[0] == "torchvision" or
            m.startswith("torch._dynamo")] == []


# ----------------------------------------------------------------------------- JSON


def test_write_json_replaces_the_file_whole_with_the_permissions_of_open(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_json(path, {"b": 1, "a": ["é", 0.5]})
    assert path.read_text(encoding="utf-8") == \
        '{\n  "b": 1,\n  "a": [\n    "é",\n    0.5\n  ]\n}\n'  # indent 2, as given, UTF-8
    write_json(path, {"b": 1, "a": Path("x")}, indent=None, sort_keys=True, fsync=False)
    assert path.read_text(encoding="utf-8") == '{"a": "x", "b": 1}\n'  # str() for a Path
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]  # no temporary left


# ----------------------------------------------------------------------------- the tools' parsers

TOOLS = {"train": [], "evaluate": [], "predict": [], "visualize": ["curves"], "compare": [],
         "summary": [], "experiments": [], "prepare": [], "demo-data": [], "bench": ["model"],
         "convert": ["caffe"]}


def launcher(tmp_path: Path, tool: str) -> Path:
    """A console command named split-alexnet-TOOL: a small launcher that runs the tool's
    ``python -m`` module."""
    module = {"train": "split_alexnet.train", "demo-data": "split_alexnet.demo_data"}.get(
        tool, f"split_alexnet.{tool}")
    exe = tmp_path / f"split-alexnet-{tool}"
    exe.write_text(f"#!{sys.executable}\nimport runpy\n"
                   f"runpy.run_module({module!r}, run_name='__main__')\n")
    exe.chmod(0o755)
    return exe


def as_typed(exe: Path, argv: list[str], capsys) -> tuple[int, str, str]:
    """What ``exe argv`` does, run here: the launcher's code with sys.argv as the console
    gives it (its exit code, stdout, stderr)."""
    capsys.readouterr()
    saved = sys.argv
    sys.argv = [str(exe), *argv]
    try:
        with warnings.catch_warnings():  # the module may be imported here already (another
            # test file on this worker): runpy says so, and runs it as __main__ all the same
            warnings.filterwarnings("ignore", "'split_alexnet.* found in sys.modules",
                                    RuntimeWarning)
            exec(compile(exe.read_text(), str(exe), "exec"), {"__name__": "__main__"})
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = saved
    out, err = capsys.readouterr()
    return code, out, err


def test_every_tool_names_itself_as_typed_and_suggests_the_flag_meant(tmp_path, capsys):
    """Run as the console command (a link named split-alexnet-TOOL to a small launcher): the
    usage line names it; a misspelt or abbreviated flag is one line with "did you mean".
    Each launcher runs in this process, with sys.argv as the console sets it (one runs as its
    own process: test_a_console_command_is_named_as_typed_in_its_own_process)."""
    for tool, sub in TOOLS.items():
        code, out, err = as_typed(launcher(tmp_path, tool), [*sub, "--help"], capsys)
        assert code == 0, (tool, err)
        assert out.startswith(f"usage: split-alexnet-{tool}"), (tool, out[:200])
        assert "python -m" not in out.split("\n")[0]
        assert "3.4028234663852886e+38" not in out
        words = {"evaluate": "the paper's ten crops with averaged softmax.",
                 "demo-data": "training images per class", "compare": "a run folder"}
        assert words.get(tool, "") in " ".join(out.split()), (tool, out)
    for argv, words in ((["--batchsize", "40"], "did you mean --batch-size?"),
                        (["--device", "cpu,cpu"], "did you mean --devices?"),
                        (["--max-step", "3"], "did you mean --max-steps?")):
        code, _, err = as_typed(tmp_path / "split-alexnet-train", argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert lines[0].startswith("split-alexnet-train: error: unrecognized arguments: ")
        assert words in lines[0], lines[0]


def test_a_console_command_is_named_as_typed_in_its_own_process(tmp_path):
    """The launcher as its own process: the name it was started by in its one error line,
    exit 2."""
    from helpers import child_env
    p = subprocess.run([str(launcher(tmp_path, "train")), "--batchsize", "40"],
                       capture_output=True, text=True, env=child_env(), timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("split-alexnet-train: error: unrecognized arguments: ")
    assert "did you mean --batch-size?" in lines[0], lines[0]


def _resident_pages(path: Path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages in all), by mincore(2) over a mapping."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as m:
        n = (len(m) + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * n)()
        buf = ctypes.c_char.from_buffer(m)
        try:
            assert libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(len(m)),
                                vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            del buf  # the mapping closes only without exported buffers
        return sum(v & 1 for v in vec), n


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here")
def test_an_uncached_write_leaves_the_page_cache(tmp_path):
    """atomic_write(uncached=True), as checkpoints are written: the file's pages are dropped
    from the page cache once on disk; a plain write leaves them there."""
    data = os.urandom(8 << 20)
    write_file = lambda f: f.write(data)  # noqa: E731
    atomic_write(tmp_path / "cached.bin", write_file)
    atomic_write(tmp_path / "uncached.bin", write_file, uncached=True)
    assert (tmp_path / "uncached.bin").read_bytes() == data
    mounts = [ln.split() for ln in Path("/proc/mounts").read_text().splitlines()]
    fs = max((m for m in mounts if str(tmp_path).startswith(m[1])), key=lambda m: len(m[1]))[2]
    if fs in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is on {fs}: its pages are the file itself")
    cached, n = _resident_pages(tmp_path / "cached.bin")
    assert cached == n, f"{cached} of {n} pages of a plain write cached"
    atomic_write(tmp_path / "uncached.bin", write_file, uncached=True)
    dropped, n = _resident_pages(tmp_path / "uncached.bin")
    assert dropped == 0, f"{dropped} of {n} pages still cached"
