"""The paper's offline step (section 2): every image -> central 256x256 patch, as JPEG.

``python -m split_alexnet.prepare SRC DST [--workers N] [--quality 90]``

* reads ``SRC/train/<class>/...`` and ``SRC/val/<class>/...`` (any image format Pillow reads,
  nested folders allowed), rescales the shorter side to 256 and keeps the central 256x256
  patch (:func:`split_alexnet.images.load_rgb256`), and writes it as a JPEG to the mirror path
  under ``DST`` (``.jpg``/``.jpeg`` names are kept, other names get their suffix replaced
  by ``.jpg``);
* parallel (``--workers``, default: all cores), with a progress line on stderr;
* resumable: each output is written to a hidden temp file and renamed into place, existing
  outputs are skipped, and stray temp files of an interrupted run are removed;
* unreadable inputs are skipped and listed in ``DST/prepare_report.txt`` (and counted);
* finally the training statistics are computed into ``DST/stats.npz``
  (:func:`split_alexnet.data.load_stats`).

Run it once at a time per DST. The output for a given input is deterministic (same Pillow),
so a resumed run gives a byte-identical tree.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import multiprocessing as mp
from pathlib import Path
from typing import Sequence

from PIL import Image

from .cli import UsageError, run
from .images import UnreadableImage, list_images, load_rgb256

__all__ = ["TMP_MARK", "REPORT", "plan", "prepare", "main"]

TMP_MARK = ".prepare-tmp"
REPORT = "prepare_report.txt"
SPLITS = ("train", "val")


def _mp_context():
    """forkserver where available (one fresh server imports the package - which imports torch -
    once; workers are forked from it cheaply and safely), else spawn."""
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def _out_name(rel: Path) -> Path:
    return rel if rel.suffix.lower() in (".jpg", ".jpeg") else rel.with_suffix(".jpg")


def plan(src: Path, dst: Path) -> list[tuple[str, str]]:
    """``[(input path, output path)]`` for every image under SRC/train and SRC/val."""
    from .data import check_dataset_root, find_classes, list_samples
    check_dataset_root(src)
    classes = find_classes(src / "train")
    jobs: list[tuple[str, str]] = []
    seen: dict[Path, Path] = {}
    for split in SPLITS:
        samples = list_samples(src / split, classes)
        for p, _ in samples:
            rel = Path(p).relative_to(src)
            out = _out_name(rel)
            if out in seen:  # e.g. a.png and a.gif: keep the whole name
                out = rel.with_name(rel.name + ".jpg")
            seen[out] = rel
            jobs.append((p, str(dst / out)))
    return jobs


def _convert(job: tuple[str, str, int]) -> tuple[str, str | None]:
    """Worker: decode, crop, write atomically. Returns (input, error message or None)."""
    src, out, quality = job
    try:
        a = load_rgb256(src, decoder="pillow")  # light workers: no torch import
    except UnreadableImage as e:
        return src, str(e)
    outp = Path(out)
    outp.parent.mkdir(parents=True, exist_ok=True)
    tmp = outp.with_name(f".{outp.name}{TMP_MARK}{os.getpid()}")
    try:
        Image.fromarray(a, "RGB").save(tmp, "JPEG", quality=quality)
        os.replace(tmp, outp)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return src, None


def _remove_stray_temps(dst: Path) -> int:
    n = 0
    for split in SPLITS:
        for dirpath, _, files in os.walk(dst / split):
            for f in files:
                if TMP_MARK in f:
                    os.unlink(os.path.join(dirpath, f))
                    n += 1
    return n


def prepare(src: Path, dst: Path, *, workers: int | None = None, quality: int = 90,
            progress: bool = True, stats: bool = True) -> dict:
    """Prepare SRC into DST (see the module docstring). Returns a summary dict."""
    from .data import load_stats
    from .progress import Progress
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise UsageError(f"source folder not found: {src}")
    if src.resolve() == dst.resolve():
        raise UsageError("SRC and DST must be different folders")
    if not 1 <= quality <= 100:
        raise UsageError(f"--quality must be in 1..100, got {quality}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 0:
        raise UsageError("--workers must be >= 0")
    jobs = plan(src, dst)
    dst.mkdir(parents=True, exist_ok=True)
    stray = _remove_stray_temps(dst)
    todo = [(s, o, quality) for s, o in jobs if not os.path.exists(o)]
    done_before = len(jobs) - len(todo)
    print(f"prepare: {len(jobs)} images, {done_before} already done, {len(todo)} to do"
          + (f", removed {stray} stray temp files" if stray else ""), file=sys.stderr)
    failures: list[tuple[str, str]] = []
    t0 = time.monotonic()
    with Progress(len(todo), "prepare", unit="img", enabled=progress) as bar:
        def handle(res):
            s, err = res
            if err is not None:
                failures.append((s, err))
            bar.update(1, extra=f"{len(failures)} unreadable" if failures else None)
        if workers > 0 and len(todo) > 1:
            with _mp_context().Pool(workers) as pool:
                for res in pool.imap_unordered(_convert, todo, chunksize=16):
                    handle(res)
        else:
            for job in todo:
                handle(_convert(job))
    elapsed = time.monotonic() - t0
    failures.sort()
    written = len(todo) - len(failures)
    with open(dst / REPORT, "w", encoding="utf-8") as f:
        f.write(f"source: {src.resolve()}\n")
        f.write(f"images: {len(jobs)}\nprepared: {len(jobs) - len(failures)}\n"
                f"unreadable: {len(failures)}\n")
        for s, err in failures:
            f.write(f"UNREADABLE\t{Path(s).relative_to(src).as_posix()}\t{err}\n")
    rate = len(todo) / elapsed if elapsed > 0 else 0.0
    print(f"prepare: wrote {written}, skipped {done_before} existing, {len(failures)} unreadable "
          f"(listed in {dst / REPORT}); {elapsed:.1f} s, {rate:.1f} img/s with {workers} workers",
          file=sys.stderr)
    summary = {"images": len(jobs), "written": written, "existing": done_before,
               "unreadable": len(failures), "seconds": elapsed, "rate": rate}
    if stats:
        s = load_stats(dst, progress=progress, workers=workers)
        summary["fingerprint"] = s.fingerprint
        print(f"prepare: statistics in {dst / 'stats.npz'} (eigval {s.eigval.tolist()})",
              file=sys.stderr)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m split_alexnet.prepare",
                                 description="Rescale to shorter side 256, keep the central "
                                             "256x256 patch, write JPEGs + stats.npz.")
    ap.add_argument("src", type=Path, help="source root with train/<class>/* and val/<class>/*")
    ap.add_argument("dst", type=Path, help="output root (mirror tree)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    ap.add_argument("--no-stats", action="store_true", help="skip computing DST/stats.npz")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    a = ap.parse_args(argv)
    s = prepare(a.src, a.dst, workers=a.workers, quality=a.quality, progress=not a.quiet,
                stats=not a.no_stats)
    return 1 if s["images"] and s["unreadable"] == s["images"] else 0


if __name__ == "__main__":
    raise SystemExit(run(main, "split_alexnet.prepare"))
