"""The data side under hostile conditions, for real: full disks (``RLIMIT_FSIZE``), FIFOs,
devices, sockets and dangling links in a dataset, images over the pixel limit, SIGTERM/SIGINT
during prepare and the statistics (no worker outlives its parent), and bad flags of prepare and
demo_data. Hostile archives are in tests/test_imagenet.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import PROGRAMS, REPO, child_env, png_chunk, run_python
from split_alexnet.data.demo import main as demo_main
from split_alexnet.data.demo import make_demo_dataset
from split_alexnet.data.images import (MAX_PIXELS, PIXELS_ENV, UnreadableImage, load_rgb,
                                       pixel_limit)
from split_alexnet.data.prepare import prepare
from split_alexnet.data.prepare import main as prepare_main
from split_alexnet.data.pool import WorkerPool
from split_alexnet.data.prepare_tasks import write_jpeg
from split_alexnet.utils.cli import Abort, UsageError, run

TAG = "SPLIT_ALEXNET_TEST_TAG"   # marks every process a test starts (found in /proc/*/environ)
AS_LIMIT = 8 << 30               # address-space cap of the subprocesses: a runaway read fails


# ----------------------------------------------------------------------------- helpers

def _tagged(tag: str) -> list[int]:
    """Pids of live (non-zombie) processes whose environment holds ``TAG=tag``."""
    needle = f"{TAG}={tag}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0") and \
                    ") Z" not in (d / "stat").read_text():
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def _survivors(tag: str, timeout: float = 10.0) -> list[int]:
    """The tagged processes still alive after up to ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while (left := _tagged(tag)) and time.monotonic() < end:
        time.sleep(0.1)
    return left


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the process ended (rc {proc.returncode}) before the signal"
        assert time.monotonic() < end, "timed out waiting for the work to start"
        time.sleep(0.05)


def _as_limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def _jpegs(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def _temps(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if p.is_file()]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            if p.is_file() else (-1, 0) for p in root.rglob("*")}


# ----------------------------------------------------------------------------- full disks

LIMIT = 24 << 10  # the flat images' outputs fit (~2 KiB), the noise images' (~55 KiB) do not


@pytest.fixture(scope="module")
def mixed(module_tmp):
    """(SRC, prepared reference tree): class ``flat`` (small outputs), ``noise`` (big ones)."""
    base = module_tmp("mixed")
    rng = np.random.default_rng(0)
    src = base / "src"
    draw = {"flat": lambda k: np.full((240, 320, 3), (40 * k, 90, 200), np.uint8),
            "noise": lambda k: rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)}
    for split, c, k in [(s, c, k) for s, n in (("train", 8), ("val", 2)) for c in draw
                        for k in range(n)]:
        (src / split / c).mkdir(parents=True, exist_ok=True)
        Image.fromarray(draw[c](k)).save(src / split / c / f"{c}{k}.png")
    prepare(src, base / "ref", workers=0, progress=False, stats=False)
    ref = _jpegs(base / "ref")
    sizes = {c: [len(b) for k, b in ref.items() if f"/{c}/" in k] for c in ("flat", "noise")}
    assert max(sizes["flat"]) < LIMIT < min(sizes["noise"])
    return src, ref


def test_full_disk_while_converting_is_one_line_and_resumable(mixed, tmp_path):
    src, ref = mixed
    dst = tmp_path / "dst"
    r = run_python("-m", "split_alexnet.prepare", src, dst, "--workers", "2", "--no-stats",
                   "--quiet", fsize=LIMIT)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"split_alexnet\.prepare: error: could not write \S+/noise/noise\d\.jpg: "
                        r"File too large; what is prepared so far is kept: free some space and "
                        r"rerun the same command to continue", last), last
    got = _jpegs(dst)
    assert got and all(ref[k] == v for k, v in got.items())  # every output is whole
    assert all("/flat/" in k for k in got)
    # with room again the same command continues where it stopped
    s = prepare(src, dst, workers=0, progress=False, stats=False)
    assert s["existing"] == len(got) and s["written"] == len(ref) - len(got)
    assert _jpegs(dst) == ref and not _temps(dst)


def test_full_disk_at_statistics_time_keeps_the_images(mixed, tmp_path):
    src, ref = mixed
    dst = tmp_path / "dst"
    r = run_python("-m", "split_alexnet.prepare", src, dst, "--workers", "0", "--quiet",
                   fsize=256 << 10)  # images fit, the 0.8 MB mean image does not
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"split_alexnet.prepare: error: could not write the statistics {dst / 'stats.npz'}: "
        f"File too large")
    assert "Traceback" not in r.stderr
    assert _jpegs(dst) == ref and not (dst / "stats.npz").exists() and not _temps(dst)
    s = prepare(src, dst, workers=0, progress=False)
    assert s["existing"] == len(ref) and (dst / "stats.npz").is_file()


def test_full_disk_for_demo_data_is_one_line(tmp_path):
    d = tmp_path / "demo"
    r = run_python("-m", "split_alexnet.demo_data", d, "--classes", "2", "--train-per-class",
                   "2", "--val-per-class", "1", fsize=2 << 10)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"split_alexnet.demo_data: error: could not write "
        f"{d / 'train' / 'circle' / 'circle_0000.jpg'}: File too large"]
    assert not _temps(d)


# ----------------------------------------------------------------------------- special files

def test_fifos_devices_sockets_and_dangling_links_are_skipped_never_opened(tmp_path,
                                                                           monkeypatch):
    root = make_demo_dataset(tmp_path / "root", classes=2, train_per_class=3, val_per_class=1)
    d = root / "train" / "circle"
    os.mkfifo(d / "fifo.jpg")                       # opening it would block forever
    os.symlink("/dev/zero", d / "zero.jpg")         # reading it would never end
    os.symlink(d / "missing.jpg", d / "dangling.jpg")
    monkeypatch.chdir(d)                            # a short relative name for bind()
    with socket.socket(socket.AF_UNIX) as sk:
        sk.bind("sock.jpg")
    special = ["fifo.jpg", "zero.jpg", "dangling.jpg", "sock.jpg"]
    r = run_python(PROGRAMS / "special_files.py", root, *[d / n for n in special],
                   timeout=180, preexec=_as_limit)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["classes"] == ["circle", "square"] and out["items"] == out["ok"] == 6
    assert out["skipped"] == sorted(special)
    warn = [line for line in r.stderr.splitlines() if "not regular files" in line]
    assert warn == [f"warning: skipped 4 entries under {root / 'train'} that are not regular "
                    f"files (FIFOs, devices, sockets or dangling links): circle/dangling.jpg, "
                    f"circle/fifo.jpg, circle/sock.jpg ..."]
    why = out["refused"]
    assert why["fifo.jpg"].endswith("fifo.jpg: not a regular file (a FIFO)")
    assert why["zero.jpg"].endswith("zero.jpg: not a regular file (a character device)")
    assert why["sock.jpg"].endswith("sock.jpg: not a regular file (a socket)")
    assert "FileNotFoundError" in why["dangling.jpg"]


# ----------------------------------------------------------------------------- pixel limit

def _bilevel_png(path: Path, w: int, h: int) -> Path:
    """A valid 1-bit white PNG of w x h pixels, compressed row by row (never held whole)."""
    row = b"\x00" + b"\xff" * ((w + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()

    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path):
    # 100 megapixels: between the limit and Pillow's own hard limit (2x), so Pillow alone
    # would decode it (a 400 MB decode for this 1-bit file of 13 KB)
    p = _bilevel_png(tmp_path / "big.png", 10_000, 10_000)
    assert p.stat().st_size < 100_000
    with Image.open(p) as im:
        assert im.size == (10_000, 10_000) and MAX_PIXELS < 10_000 ** 2 < 2 * MAX_PIXELS
    r = run_python(PROGRAMS / "load_image.py", p, timeout=180, preexec=_as_limit)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["error"] == (f"cannot read image {p}: 10000x10000 = 100,000,000 pixels is over "
                            f"the limit of 89,478,485 pixels (set SPLIT_ALEXNET_MAX_PIXELS to "
                            f"allow more)")
    assert out["grown_mb"] < 50 and out["seconds"] < 5


def test_pixel_limit_override_and_bad_values(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    Image.new("RGB", (2000, 1000), (9, 9, 9)).save(big)
    ok = tmp_path / "ok.png"
    Image.new("RGB", (1000, 1000), (9, 9, 9)).save(ok)
    monkeypatch.delenv(PIXELS_ENV, raising=False)
    assert pixel_limit() == MAX_PIXELS == 89_478_485
    assert load_rgb(big).shape == (256, 256, 3)
    monkeypatch.setenv(PIXELS_ENV, "1_000_000")
    assert pixel_limit() == 1_000_000
    with pytest.raises(UnreadableImage, match=r"2000x1000 = 2,000,000 pixels is over the "
                                              r"limit of 1,000,000 pixels"):
        load_rgb(big)
    assert load_rgb(ok).shape == (256, 256, 3)
    assert load_rgb(big, max_pixels=2_000_000).shape == (256, 256, 3)
    for bad in ("lots", "0", "-5", "1.5"):
        monkeypatch.setenv(PIXELS_ENV, bad)
        with pytest.raises(UsageError, match=f"SPLIT_ALEXNET_MAX_PIXELS must be a positive "
                                             f"integer \\(pixels\\), got '{re.escape(bad)}'"):
            load_rgb(ok)


def test_docs_state_the_pixel_limit_of_the_code():
    for doc in ("docs/reliability.md", "docs/data.md"):
        text = (REPO / doc).read_text()
        assert f"{MAX_PIXELS:,}" in text and PIXELS_ENV in text, doc
    assert "Image.MAX_IMAGE_PIXELS` x 2" not in (REPO / "docs/data.md").read_text()


# ----------------------------------------------------------------------------- signals

@pytest.fixture(scope="module")
def originals(module_tmp):
    """Four 500x375 noise JPEGs and the prepared bytes of each."""
    base = module_tmp("orig")
    rng = np.random.default_rng(1)
    out = []
    for k in range(4):
        p = base / f"o{k}.jpg"
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(p, quality=90)
        q = base / f"p{k}.jpg"
        write_jpeg(load_rgb(p, decoder="pillow"), q, 90)
        out.append((p, q, q.read_bytes()))
    return out


def _linked_tree(root: Path, files: list[Path], train: int, val: int) -> int:
    """root/{train,val}/{a,b}/<c><i>.jpg as hard links of ``files`` (i % 4); the image count."""
    n = 0
    for split, count in (("train", train), ("val", val)):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(count):
                os.link(files[i % len(files)], d / f"{c}{i:05d}.jpg")
                n += 1
    return n


def _start(args: list[str], err: Path, tag: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=child_env(**{TAG: tag}),
                            stdout=subprocess.DEVNULL, stderr=err.open("w"),
                            preexec_fn=_as_limit, **kw)


def test_sigterm_while_preparing_keeps_the_work_and_no_worker_survives(originals, tmp_path):
    src, dst, err, tag = tmp_path / "src", tmp_path / "dst", tmp_path / "err.txt", uuid.uuid4().hex
    total = _linked_tree(src, [p for p, _, _ in originals], 400, 5)
    p = _start(["split_alexnet.prepare", str(src), str(dst), "--workers", "2", "--no-stats"],
               err, tag)
    try:
        _wait_for(lambda: any(dst.glob("train/*/*.jpg")), p)
        p.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = p.wait(120)
        took = time.monotonic() - t0
    finally:
        p.kill()
    lines = err.read_text().splitlines()
    assert rc == 0, lines
    assert lines[-1] == ("prepare: stopped by SIGTERM while converting; what is prepared is kept: "
                         "rerun the same command to continue")
    assert took < 20
    assert _survivors(tag) == []
    done = _jpegs(dst)
    assert 0 < len(done) < total
    want = [b for _, _, b in originals]
    assert all(b == want[int(Path(k).stem[1:]) % 4] for k, b in done.items())  # all whole
    s = prepare(src, dst, workers=2, progress=False, stats=False)  # continues
    assert s["existing"] == len(done) and s["written"] == total - len(done)
    final = _jpegs(dst)
    assert len(final) == total and not _temps(dst)
    assert all(b == want[int(Path(k).stem[1:]) % 4] for k, b in final.items())


def test_ctrl_c_during_the_statistics_of_prepare_exits_0_and_no_worker_survives(originals,
                                                                               tmp_path):
    src, dst, err, tag = tmp_path / "src", tmp_path / "dst", tmp_path / "err.txt", uuid.uuid4().hex
    prepared = [q for _, q, _ in originals]
    total = _linked_tree(src, prepared, 1500, 5)
    _linked_tree(dst, prepared, 1500, 5)  # every image already prepared: straight to statistics
    p = _start(["split_alexnet.prepare", str(src), str(dst), "--workers", "2"], err, tag,
               start_new_session=True)
    try:
        _wait_for(lambda: "statistics: " in err.read_text(), p)
        os.killpg(p.pid, signal.SIGINT)  # what a Ctrl-C does: the whole process group
        rc = p.wait(120)
    finally:
        p.kill()
    lines = err.read_text().splitlines()
    assert rc == 0, lines
    assert f"prepare: {total} images, {total} already done, 0 to do" in lines
    assert lines[-1] == ("prepare: stopped by SIGINT during the statistics (all images are "
                         "prepared); what is prepared is kept: rerun the same command to continue")
    assert "Traceback" not in err.read_text()
    assert _survivors(tag) == []
    assert not (dst / "stats.npz").exists() and not _temps(dst)


def test_sigterm_during_the_statistics_of_train_exits_130_and_no_worker_survives(originals,
                                                                                tmp_path):
    root, err, tag = tmp_path / "root", tmp_path / "err.txt", uuid.uuid4().hex
    _linked_tree(root, [q for _, q, _ in originals], 1500, 2)
    p = _start(["split_alexnet.train", "--data", str(root), "--out", str(tmp_path / "run"),
                "--workers", "2", "--devices", "cpu,cpu"], err, tag)
    try:
        _wait_for(lambda: "statistics: " in err.read_text(), p)
        p.send_signal(signal.SIGTERM)
        rc = p.wait(120)
    finally:
        p.kill()
    lines = err.read_text().splitlines()
    assert rc == 130, lines  # Interrupted: 130 whichever the signal, as for Ctrl-C
    assert re.fullmatch(rf"split_alexnet\.train: error: statistics stopped by SIGTERM after "
                        rf"\d+ of 3000 images of {re.escape(str(root / 'train'))}; nothing was "
                        rf"saved \(they are computed again next time\)", lines[-1]), lines[-1]
    assert _survivors(tag) == []
    assert not (root / "stats.npz").exists()


# ----------------------------------------------------------------------------- bad flags

def _one_line_exit_2(main, prog: str, argv: list[str], capsys, fragment: str) -> None:
    rc = run(main, prog, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: ") and fragment in err[0], err


# command | case | flags | the message of the one line ({tmp}: the test's folder)
BAD_FLAGS = {(cmd, case): (flags.split(), message) for cmd, case, flags, message in (
    [field.strip() for field in row.split("|")] for row in """
prepare | dst-is-a-file |  | DST {tmp}/file is not a folder
prepare | dst-under-a-file |  | DST {tmp}/file/dst cannot be created: {tmp}/file is not a folder
prepare | dst-unwritable |  | DST /proc/self/dst cannot be created: /proc/self is not writable
prepare | dst-inside-src |  | DST {tmp}/src/prepared is inside SRC {tmp}/src: the prepared copies
prepare | src-inside-dst-train |  | SRC {tmp}/d/train/src is inside {tmp}/d/train, where
prepare | workers-negative | --workers -1 | --workers must be >= 0, got -1
prepare | quality-0 | --quality 0 | --quality must be in 1..100, got 0
prepare | quality-101 | --quality 101 | --quality must be in 1..100, got 101
prepare | per-class-0 | --per-class 0 | --per-class must be >= 1, got 0
prepare | val-per-class-negative | --val-per-class -2 | --val-per-class must be >= 1, got -2
prepare | classes-0 | --classes 0 | --classes must be in 1..2 (the source has 2 classes), got 0
prepare | classes-too-many | --classes 3 | --classes must be in 1..2
prepare | classes-no-file | --classes {tmp}/none.txt | not an integer and no such list file
prepare | classes-not-utf8 | --classes {tmp}/bin.txt | cannot read the list file
prepare | classes-empty-file | --classes {tmp}/empty.txt | names no classes
prepare | classes-unknown | --classes {tmp}/unknown.txt | not in the source: n00000001
prepare | pixel-limit-env |  | SPLIT_ALEXNET_MAX_PIXELS must be a positive integer
demo_data | dir-is-a-file |  | demo data folder {tmp}/file is not a folder
demo_data | dir-under-a-file |  | folder {tmp}/file/demo cannot be created: {tmp}/file is not
demo_data | dir-unwritable |  | folder /proc/self/demo cannot be created: /proc/self is not
demo_data | seed-negative | --seed -1 | --seed must be >= 0, got -1
demo_data | classes-0 | --classes 0 | --classes must be between 1 and 12, got 0
demo_data | classes-13 | --classes 13 | --classes must be between 1 and 12, got 13
demo_data | train-per-class-0 | --train-per-class 0 | must be >= 1
demo_data | val-per-class-negative | --val-per-class -1 | must be >= 1
""".strip().splitlines())}


@pytest.mark.parametrize("case", sorted(c for cmd, c in BAD_FLAGS if cmd == "prepare"))
def test_prepare_bad_flags_are_one_line_exit_2_before_any_work(case, tmp_path, capsys,
                                                             monkeypatch):
    flags, fragment = BAD_FLAGS["prepare", case]
    src = make_demo_dataset((tmp_path / "d" / "train" / "src" if case == "src-inside-dst-train"
                             else tmp_path / "src"), classes=2, train_per_class=1,
                            val_per_class=1)
    (tmp_path / "file").write_text("a file\n")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00n0144\x80\n")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    (tmp_path / "unknown.txt").write_text("n00000001\n")
    dst = {"dst-is-a-file": tmp_path / "file", "dst-under-a-file": tmp_path / "file" / "dst",
           "dst-unwritable": Path("/proc/self/dst"),
           "dst-inside-src": src / "prepared", "src-inside-dst-train": tmp_path / "d"}.get(
        case, tmp_path / "dst")
    if case == "pixel-limit-env":
        monkeypatch.setenv(PIXELS_ENV, "many")
    before = _snapshot(tmp_path)
    argv = [str(src), str(dst), "--workers", "0", "--quiet"] + [
        f.format(tmp=tmp_path) for f in flags]
    _one_line_exit_2(prepare_main, "split_alexnet.prepare", argv, capsys,
                     fragment.format(tmp=tmp_path))
    assert _snapshot(tmp_path) == before  # nothing read into DST, nothing written anywhere




@pytest.mark.parametrize("case", sorted(c for cmd, c in BAD_FLAGS if cmd == "demo_data"))
def test_demo_data_bad_flags_are_one_line_exit_2_before_any_work(case, tmp_path, capsys):
    flags, fragment = BAD_FLAGS["demo_data", case]
    (tmp_path / "file").write_text("a file\n")
    target = {"dir-is-a-file": tmp_path / "file", "dir-under-a-file": tmp_path / "file" / "demo",
              "dir-unwritable": Path("/proc/self/demo")}.get(case, tmp_path / "demo")
    before = _snapshot(tmp_path)
    _one_line_exit_2(demo_main, "split_alexnet.demo_data",
                     [str(target), "--train-per-class", "1", "--val-per-class", "1", *flags],
                     capsys, fragment.format(tmp=tmp_path))
    assert _snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- the worker pool

def test_a_dead_worker_is_one_line_and_a_task_error_is_re_raised():
    with pytest.raises(ValueError, match="invalid literal"):
        with WorkerPool(2) as pool:  # in order when asked, whichever worker finishes first
            assert list(pool.results(abs, list(range(-20, 0)), ordered=True)) == \
                list(range(20, 0, -1))
            list(pool.results(int, ["1", "x", "2"]))
    with pytest.raises(Abort, match=r"^a data worker process died \(exit code 3; out of memory\?"
                                    r"\); rerun with --workers 0 to see the error$"):
        with WorkerPool(1) as pool:
            list(pool.results(os._exit, [3, 3]))
    assert [p for p in multiprocessing.active_children() if p.is_alive()] == []
