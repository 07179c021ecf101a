"""The training set's statistics (sections 2, 4.1): the per-pixel mean image and the
eigen-decomposition of the RGB covariance for PCA colour noise, computed once over all pixels in
float64 and cached with a fingerprint of the file list. See docs/data.md."""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from split_alexnet.data.dataset import check_dataset_root, find_classes, list_samples
from split_alexnet.data.images import SIZE, UnreadableImage, load_rgb256
from split_alexnet.data.pool import WorkerPool
from split_alexnet.utils.cli import Abort, Interrupted, UsageError
from split_alexnet.utils.fileio import atomic_write
from split_alexnet.utils.progress import Progress
from split_alexnet.utils.signals import StopOnSignal

STATS_VERSION = "split_alexnet-stats-v1"


@dataclass
class Stats:
    """The statistics of a training set, as :func:`load_stats` returns them."""


    mean: torch.Tensor      # (3, 256, 256) float32, RGB, 0-255
    eigval: torch.Tensor    # (3,) float32, descending
    eigvec: torch.Tensor    # (3, 3) float32, column i = eigenvector i
    fingerprint: str
    classes: list[str]


def fingerprint_files(root: Path, files: Sequence[Path]) -> str:
    """sha256 over (relative path, size, mtime_ns) of every file, plus the stats version."""
    h = hashlib.sha256(STATS_VERSION.encode())
    root = Path(root)
    for p in files:
        st = os.stat(p)
        h.update(f"\n{Path(p).relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}"
                 .encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def image_sums(paths: Sequence[str]):
    """Worker: exact float64 sums over the given images -> (image sum (256, 256, 3), RGB sum
    (3,), RGB outer-product sum (3, 3), images used, [(path, error)] of unreadable ones)."""
    img_sum = np.zeros((SIZE, SIZE, 3), np.float64)
    rgb_sum = np.zeros(3, np.float64)
    outer = np.zeros((3, 3), np.float64)
    n, bad = 0, []
    for p in paths:
        try:
            a = load_rgb256(p)                    # (256, 256, 3) uint8
        except UnreadableImage as e:
            bad.append((p, str(e)))
            continue
        x = a.reshape(-1, 3).astype(np.float64)  # (65536, 3)
        img_sum += a
        rgb_sum += x.sum(0)
        outer += x.T @ x
        n += 1
    return img_sum, rgb_sum, outer, n, bad


def compute_stats(root: Path, *, progress: bool = True, workers: int = 0,
                  chunk: int = 32) -> dict:
    """Compute the statistics of ``root/train`` (all pixels, float64) -> dict for savez.

    SIGTERM/SIGINT stop it within one chunk of ``chunk`` images
    (:class:`split_alexnet.utils.signals.StopOnSignal`): the workers are killed and
    :class:`split_alexnet.utils.cli.Interrupted` is raised (exit code 130)."""
    root = Path(root)
    check_dataset_root(root)
    classes = find_classes(root / "train")
    samples = list_samples(root / "train", classes)
    files = [Path(p) for p, _ in samples]
    fp = fingerprint_files(root / "train", files)
    chunks = [[str(p) for p in files[i:i + chunk]] for i in range(0, len(files), chunk)]
    img_sum = np.zeros((SIZE, SIZE, 3), np.float64)
    rgb_sum = np.zeros(3, np.float64)
    outer = np.zeros((3, 3), np.float64)
    n, bad = 0, []
    with StopOnSignal() as stop, WorkerPool(max(workers or 0, 0), stop) as pool, \
            Progress(len(files), "statistics", unit="img", enabled=progress) as bar:
        for s, r, o, m, b in pool.results(image_sums, chunks, ordered=True):
            img_sum += s
            rgb_sum += r
            outer += o
            n += m
            bad.extend(b)
            bar.update(m + len(b), extra=f"{len(bad)} unreadable" if bad else None)
    if stop:
        raise Interrupted(f"statistics stopped by {stop.name} after {bar.n} of {len(files)} "
                          f"images of {root / 'train'}; nothing was saved (they are computed "
                          f"again next time)", stop.signum)
    for p, msg in bad:
        print(f"warning: skipped unreadable image: {msg}", file=sys.stderr)
    if n == 0:
        raise UsageError(f"no readable training images in {root / 'train'}")
    npix = n * SIZE * SIZE
    mu = rgb_sum / npix
    cov = outer / npix - np.outer(mu, mu)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    # Sign convention (deterministic): the largest-magnitude entry of each vector is positive.
    signs = np.sign(eigvec[np.argmax(np.abs(eigvec), axis=0), np.arange(3)])
    eigvec = eigvec * np.where(signs == 0, 1.0, signs)
    mean = (img_sum / n).transpose(2, 0, 1)
    return {
        "mean": mean.astype(np.float32), "eigval": eigval.astype(np.float32),
        "eigvec": eigvec.astype(np.float32), "cov": cov, "rgb_mean": mu,
        "count": np.int64(n), "unreadable": np.int64(len(bad)),
        "fingerprint": np.str_(fp), "classes": np.array(classes, dtype=np.str_),
        "version": np.str_(STATS_VERSION),
    }


def save_stats(path: Path, arrays: dict) -> None:
    """Atomic ``np.savez`` (:func:`split_alexnet.utils.fileio.atomic_write`). The archive
    (about 0.8 MB) is built in memory and written with one ``write``: numpy 2.0's ``savez``
    leaves its zip file open when a write fails (a full disk), and closing it later, on a
    file already closed, prints a stray ``ValueError`` traceback after the one-line error."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, lambda f: f.write(buf.getbuffer()), fsync=False, private=False)


#: What a ``stats.npz`` holds and may be: member -> (shape, or None for any 1-D, kind).
STATS_FIELDS = {"mean": ((3, SIZE, SIZE), "f"), "eigval": ((3,), "f"), "eigvec": ((3, 3), "f"),
                "fingerprint": ((), "U"), "classes": (None, "U")}
#: The most bytes one member of a ``stats.npz`` may inflate to (the mean: 0.8 MB in float32,
#: 1.6 MB in float64), checked from the archive's directory before anything is inflated.
MAX_MEMBER_BYTES = 8 << 20


class StatsError(UsageError):
    """A ``stats.npz`` whose fields are not the statistics: one line naming the file and the
    field (exit 2)."""


def check_stats_archive(path: Path) -> None:
    """Before inflating anything: each member of the ``.npz`` (a zip archive) the statistics
    read declares at most :data:`MAX_MEMBER_BYTES`. A :class:`StatsError` otherwise; an
    archive that cannot be read propagates its own error."""
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            name = info.filename.removesuffix(".npy")
            if name in STATS_FIELDS and info.file_size > MAX_MEMBER_BYTES:
                raise StatsError(f"statistics file {path}: field {name} declares "
                                 f"{info.file_size:,} bytes (at most {MAX_MEMBER_BYTES:,}); "
                                 "delete the file to compute the statistics again")


def check_stats_fields(z, path: Path) -> None:
    """Every field the statistics use: its shape, kind and range (the mean within 0-255,
    every number finite). A :class:`StatsError` naming the first that is not."""
    for name, (shape, kind) in STATS_FIELDS.items():
        a = z[name] if name in z.files else None
        why = "missing" if a is None else \
            f"of dtype {a.dtype}" if a.dtype.kind != kind and not (kind == "f" and
                                                                    a.dtype.kind in "iu") else \
            f"of shape {a.shape}, not {shape}" if (a.shape != shape if shape is not None
                                                   else a.ndim != 1) else \
            "not finite (NaN or infinity)" if kind == "f" and not np.isfinite(a).all() else \
            "outside 0-255" if name == "mean" and (a.min() < 0 or a.max() > 255) else None
        if why:
            raise StatsError(f"statistics file {path}: field {name} is {why}; delete the file "
                             "to compute the statistics again")


def read_stats(path: Path) -> Stats:
    """The :class:`Stats` in a ``stats.npz`` file, every field checked first
    (:func:`check_stats_archive`, :func:`check_stats_fields`)."""
    check_stats_archive(path)
    with np.load(path, allow_pickle=False) as z:
        check_stats_fields(z, path)
        return Stats(mean=torch.from_numpy(z["mean"].astype(np.float32)),
                     eigval=torch.from_numpy(z["eigval"].astype(np.float32)),
                     eigvec=torch.from_numpy(z["eigvec"].astype(np.float32)),
                     fingerprint=str(z["fingerprint"]), classes=[str(c) for c in z["classes"]])


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "split_alexnet"


def stats_cache_path(root: Path) -> Path:
    """The fallback cache file for a read-only ``root``: keyed by its absolute path."""
    absroot = os.path.abspath(root)
    key = hashlib.sha256(absroot.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return _cache_dir() / "stats" / f"{Path(absroot).name or 'root'}-{key}.npz"


def _writable(directory: Path) -> bool:
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(tmp)
    return True


def _try_read(path: Path, fp: str) -> Stats | None:
    if not path.is_file():
        return None
    try:
        s = read_stats(path)
    except StatsError:  # well-formed, but not the statistics: said, never silently replaced
        raise
    except Exception:  # noqa: BLE001 - a damaged cache is recomputed
        return None
    return s if s.fingerprint == fp else None


def load_stats(root: Path, *, progress: bool = True, workers: int = 0) -> Stats:
    """The training statistics of ``root`` (prepared or not), computed on first use.

    Looked up in ``root/stats.npz`` then in the user cache (:func:`stats_cache_path`); used
    only if its fingerprint matches the current ``root/train`` file list, else recomputed and
    written to ``root/stats.npz`` (or the user cache if ``root`` is not writable). A failed
    write (full disk) is :class:`split_alexnet.utils.cli.Abort` (one line, exit 1)."""
    root = Path(root)
    check_dataset_root(root)
    classes = find_classes(root / "train")
    files = [Path(p) for p, _ in list_samples(root / "train", classes)]
    fp = fingerprint_files(root / "train", files)
    local, cached = root / "stats.npz", stats_cache_path(root)
    for path in (local, cached):
        s = _try_read(path, fp)
        if s is not None:
            return s
    arrays = compute_stats(root, progress=progress, workers=workers)
    target = local if _writable(root) else cached
    try:
        save_stats(target, arrays)
    except OSError as e:
        raise Abort(f"could not write the statistics {target}: {e.strerror or e}") from None
    return read_stats(target)
