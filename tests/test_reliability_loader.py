"""The training loader over hostile files, and a dead loader worker (docs/reliability.md):
empty, truncated, fuzzed and mislabelled files, decompression bombs of three formats and
things that are not images are skipped and counted, never crash or hang a worker; a worker
that dies is one line naming the files it held.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import BASE, CPU_PAIR, error_lines, png_chunk, stored, train
from split_alexnet.data.dataset import (CropFolder, EpochSampler, find_classes, list_samples,
                                        make_loader)
from split_alexnet.data.demo import make_demo_dataset
from split_alexnet.training.command import main as train_main
from split_alexnet.utils.cli import run


def _jpeg(seed: int, size=(256, 256), quality=90) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _png(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def _png_bomb(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + \
        png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b"")


def _jpeg_bomb(w: int, h: int) -> bytes:
    data = bytearray(_jpeg(1, (64, 64)))
    i = data.index(b"\xff\xc0")  # SOF0: length(2) precision(1) height(2) width(2)
    data[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def _bmp_bomb(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "BMP")
    data = bytearray(buf.getvalue())
    data[18:26] = struct.pack("<ii", w, h)
    return bytes(data)


def _hostile_folder(d: Path) -> tuple[set[str], set[str], set[str]]:
    """Files that must load, that must be skipped, and fuzzed ones that may go either way."""
    d.mkdir(parents=True)
    rng = np.random.default_rng(5)
    good_jpeg = _jpeg(0)
    must_load = {
        "good1.jpg": good_jpeg, "good2.jpg": _jpeg(1, (300, 400)),
        "png_named.jpg": _png(),                        # wrong extension, a real image
        "jpeg_named.png": _jpeg(2, (100, 80)),
    }
    must_skip = {
        "zero.jpg": b"", "one_byte.jpg": b"\xff",
        "trunc_10.jpg": good_jpeg[:10], "trunc_third.jpg": good_jpeg[: len(good_jpeg) // 3],
        "header_then_random.jpg": b"\xff\xd8\xff\xe0" + rng.bytes(5000),
        "header_only_random.jpeg": b"\xff\xd8\xff" + rng.bytes(20),
        "png_header_random.png": b"\x89PNG\r\n\x1a\n" + rng.bytes(3000),
        "bomb.png": _png_bomb(100_000, 100_000),
        "bomb.jpg": _jpeg_bomb(65_000, 65_000),
        "bomb.bmp": _bmp_bomb(100_000, 100_000),
        "text.jpg": b"this is not an image\n" * 50,
        "html.png": b"<!doctype html><html><body>404 Not Found</body></html>",
        "zip.gif": b"PK\x03\x04" + rng.bytes(500),
        "elf.webp": b"\x7fELF" + rng.bytes(2000),
        "random.bmp": rng.bytes(4096), "random.tiff": b"II*\x00" + rng.bytes(1000),
    }
    fuzzed = {}
    for k in range(16):  # seeded mutations of a valid JPEG (both decoders see these)
        data = bytearray(good_jpeg)
        for _ in range(int(rng.integers(1, 20))):
            data[int(rng.integers(2, len(data)))] = int(rng.integers(0, 256))
        if k % 4 == 3:
            data = data[: int(rng.integers(100, len(data)))]
        fuzzed[f"fuzz_{k:02d}.jpg"] = bytes(data)
    for name, data in {**must_load, **must_skip, **fuzzed}.items():
        (d / name).write_bytes(data)
    names = lambda group: {str(d / n) for n in group}  # noqa: E731
    return names(must_load), names(must_skip), names(fuzzed)


def test_hostile_image_files_never_crash_or_hang_the_loader(tmp_path):
    must_load, must_skip, fuzzed = _hostile_folder(tmp_path / "train" / "a")
    ds = CropFolder(tmp_path / "train", ["a"], mode="train", seed=0)
    assert len(ds) == len(must_load) + len(must_skip) + len(fuzzed)
    loader = make_loader(ds, batch_size=4, sampler=EpochSampler(len(ds), shuffle=False),
                         workers=2)
    loader.timeout = 60  # a worker stuck on one file fails the test instead of hanging it
    t0 = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert time.monotonic() - t0 < 120
    skipped = {p for b in batches for p in b["skipped"]}
    loaded = sum(len(b["label"]) for b in batches)
    assert loaded + len(skipped) == len(ds)       # every file accounted for
    assert must_skip <= skipped, sorted(must_skip - skipped)
    assert not must_load & skipped, sorted(must_load & skipped)
    for b in batches:
        assert b["image"].shape[1:] == (3, 227, 227) and b["image"].dtype == torch.uint8


def test_training_over_hostile_files_skips_and_counts_them(tmp_path, capsys):
    """The same files inside a training set, end to end (statistics, 2 loader workers, one
    epoch): the run completes and says how many images it skipped."""
    root = make_demo_dataset(tmp_path / "d", classes=2, train_per_class=4, val_per_class=1,
                             seed=0)
    cls = find_classes(root / "train")[0]
    _, must_skip, _ = _hostile_folder(tmp_path / "bad")
    for p in map(Path, must_skip):
        shutil.copyfile(p, root / "train" / cls / p.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = run(train_main, "train", ["--data", str(root), "--out", str(tmp_path / "o"),
                                       *BASE, *CPU_PAIR, "--epochs", "1", "--workers", "2"])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    assert f"{len(must_skip)} unreadable training image(s) skipped this epoch" in err
    assert err.count("warning: skipped unreadable image") == len(must_skip)  # statistics
    assert stored(tmp_path / "o" / "last.pt")["progress"]["epoch"] == 1


def _first_epoch_batches(root: Path) -> list[list[str]]:
    classes = find_classes(root / "train")
    samples = list_samples(root / "train", classes)
    keys = list(EpochSampler(len(samples), epoch=0, seed=3, shuffle=True))
    return [[samples[i][0] for _, i in keys[k:k + 8]] for k in range(0, len(keys), 8)]


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_a_dead_loader_worker_is_one_line_naming_the_file(demo_root, tmp_path, monkeypatch,
                                                          capsys, how):
    batches = _first_epoch_batches(demo_root)
    victim = batches[1][-1]  # the last file of batch 2 (worker 1's first task)
    real = CropFolder.__getitem__

    def getitem(self, key):
        i = int(key[1]) if isinstance(key, (tuple, list)) else int(key)
        if self.samples[i][0] == victim and torch.utils.data.get_worker_info() is not None:
            if how == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, key)

    monkeypatch.setattr(CropFolder, "__getitem__", getitem)
    t0 = time.monotonic()
    rc = train(demo_root, tmp_path / "o", *CPU_PAIR, "--workers", "2", "--max-steps", "3")
    assert time.monotonic() - t0 < 120
    err = capsys.readouterr().err
    assert rc == 1, err[-3000:]
    (line,) = error_lines(err)
    assert "DataLoader worker" in line and victim in line, line
    assert all(f in line for f in batches[1]) and batches[3][0] not in line, line
    assert "rerun with --workers 0" in line and "Traceback" not in err, line
