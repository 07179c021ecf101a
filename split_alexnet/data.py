"""The input pipeline of the paper (sections 2 and 4.1): folders, statistics, augmentation.

* :func:`load_stats` - the training set's per-pixel mean image and the eigen-decomposition of
  the 3x3 RGB covariance (for PCA colour noise), computed once over all pixels in float64 and
  cached in ``stats.npz`` with a fingerprint of the file list.
* :class:`ImageFolder` - ``root/<split>/<class>/*`` images as 256x256 RGB uint8 (prepared or
  not), cropped/flipped in the worker and returned as uint8 tensors. Randomness is a pure
  function of ``(seed, epoch, index)``.
* :class:`EpochSampler`, :func:`make_loader`, :func:`collate` - data-parallel sharding,
  mid-epoch resume, skipping unreadable files.
* :func:`finish_batch` - on the training device: float, minus the (cropped, flipped) mean image,
  plus PCA colour noise. Output is in raw 0-255 units (no /255, no std), as in the paper.

See docs/data.md.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
import multiprocessing as mp
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .cli import UsageError
from .fileio import atomic_write
from .images import SIZE, UnreadableImage, image_sums, list_images, load_rgb256
from .progress import Progress

__all__ = [
    "CROP", "SIZE", "PCA_STD", "Stats", "UnreadableImage", "find_classes", "check_dataset_root",
    "list_samples", "fingerprint_files", "compute_stats", "save_stats", "read_stats",
    "stats_cache_path", "load_stats", "ImageFolder", "TENCROP_ORDER", "tencrop_offsets",
    "collate", "EpochSampler", "make_loader", "finish_batch", "pca_noise", "mean_crops",
    "item_seed",
]

CROP = 227
PCA_STD = 0.1
CENTER = (SIZE - CROP) // 2  # 14
STATS_VERSION = "split_alexnet-stats-v1"
MODES = ("train", "center", "tencrop")
PCA_MODES = ("paper", "paper-255", "sqrt", "off")
def _mp_context():
    """forkserver where available (one fresh server imports the package - which imports torch -
    once; workers are forked from it cheaply and safely), else spawn."""
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


TENCROP_ORDER = ("TL", "TR", "BL", "BR", "C", "flip TL", "flip TR", "flip BL", "flip BR", "flip C")


# ----------------------------------------------------------------------------- folders

def find_classes(split_dir: Path) -> list[str]:
    """Sorted class-folder names of ``split_dir``; UsageError if it is missing or has none."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise UsageError(f"dataset split folder not found: {split_dir} "
                         f"(expected <root>/train/<class>/* and <root>/val/<class>/*)")
    classes = sorted(e.name for e in os.scandir(split_dir)
                     if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UsageError(f"no class folders in {split_dir} "
                         f"(expected {split_dir}/<class>/<image files>)")
    return classes


def list_samples(split_dir: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    """``[(path, label)]`` sorted by class then relative path; UsageError for a missing or
    empty class folder, or a class folder that is not in ``classes``."""
    split_dir = Path(split_dir)
    present = set(find_classes(split_dir))
    extra = sorted(present - set(classes))
    if extra:
        raise UsageError(f"{split_dir} has class folders that are not in the class list "
                         f"(the training classes): {', '.join(extra[:5])}"
                         + (" ..." if len(extra) > 5 else ""))
    samples: list[tuple[str, int]] = []
    for label, c in enumerate(classes):
        d = split_dir / c
        if not d.is_dir():
            raise UsageError(f"class folder missing: {d}")
        files = list_images(d)
        if not files:
            raise UsageError(f"empty class folder (no image files): {d}")
        samples.extend((str(p), label) for p in files)
    return samples


def check_dataset_root(root: Path) -> None:
    """UsageError with a clear message if ``root``, ``root/train`` or ``root/val`` is missing
    or has no class folders."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"dataset folder not found: {root}")
    for split in ("train", "val"):
        find_classes(root / split)


# ----------------------------------------------------------------------------- statistics

@dataclass
class Stats:
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


def compute_stats(root: Path, *, progress: bool = True, workers: int = 0,
                  chunk: int = 32) -> dict:
    """Compute the statistics of ``root/train`` (all pixels, float64) -> dict for savez."""
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
    with Progress(len(files), "statistics", unit="img", enabled=progress) as bar:
        def add(res, k):
            nonlocal img_sum, rgb_sum, outer, n
            s, r, o, m, b = res
            img_sum += s
            rgb_sum += r
            outer += o
            n += m
            bad.extend(b)
            bar.update(k, extra=f"{len(bad)} unreadable" if bad else None)
        if workers and workers > 0 and len(chunks) > 1:
            with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context()) as ex:
                for c, res in zip(chunks, ex.map(image_sums, chunks)):
                    add(res, len(c))
        else:
            for c in chunks:
                add(image_sums(c), len(c))
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
    """Atomic ``np.savez`` (temp file + rename)."""
    atomic_write(path, lambda f: np.savez(f, **arrays), fsync=False)


def read_stats(path: Path) -> Stats:
    with np.load(path, allow_pickle=False) as z:
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
    except Exception:  # noqa: BLE001 - a damaged cache is recomputed
        return None
    return s if s.fingerprint == fp else None


def load_stats(root: Path, *, progress: bool = True, workers: int = 0) -> Stats:
    """The training statistics of ``root`` (prepared or not), computed on first use.

    Looked up in ``root/stats.npz`` then in the user cache (:func:`stats_cache_path`); used
    only if its fingerprint matches the current ``root/train`` file list, else recomputed and
    written to ``root/stats.npz`` (or the user cache if ``root`` is not writable)."""
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
    save_stats(target, arrays)
    return read_stats(target)


# ----------------------------------------------------------------------------- dataset

def item_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of the integers ``parts`` (blake2b)."""
    h = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def tencrop_offsets() -> list[tuple[int, int, bool]]:
    """``(top, left, flip)`` of the ten crops, in :data:`TENCROP_ORDER`."""
    m = SIZE - CROP
    base = [(0, 0), (0, m), (m, 0), (m, m), (CENTER, CENTER)]
    return [(t, l, False) for t, l in base] + [(t, l, True) for t, l in base]


class ImageFolder(Dataset):
    """``split_dir/<class>/<images>`` -> dict items of uint8 crops (see docs/data.md).

    ``mode``: ``"train"`` (random 227 crop + flip with p=0.5 + a PCA draw),
    ``"center"`` (the 227 centre crop at (14, 14)), ``"tencrop"`` ((10, 3, 227, 227) in
    :data:`TENCROP_ORDER`). ``pca``: ``"paper"`` (noise eigvec @ (alpha * eigval)), ``"sqrt"``
    (alpha * sqrt(eigval), Krizhevsky's released code), ``"off"``. The item's ``alpha`` is the
    raw draw alpha ~ N(0, 0.1) (zeros when off or in evaluation) and its ``pca`` says the
    reading; :func:`finish_batch` applies the scale. Key: ``i`` or ``(epoch, i)``; the
    crop/flip/alpha are drawn from ``torch.Generator().manual_seed(item_seed(seed, epoch, i))``.
    """

    def __init__(self, split_dir: Path, classes: list[str], *, mode: str = "train",
                 seed: int = 0, pca: str = "paper", strict: bool = False) -> None:
        if mode not in MODES:
            raise UsageError(f"mode must be one of {MODES}, got {mode!r}")
        if pca not in PCA_MODES:
            raise UsageError(f"pca must be one of {PCA_MODES}, got {pca!r}")
        self.split_dir = Path(split_dir)
        self.classes = list(classes)
        self.mode, self.seed, self.pca, self.strict = mode, int(seed), pca, strict
        self.samples = list_samples(self.split_dir, self.classes)
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def draw(self, epoch: int, i: int) -> tuple[int, int, bool, torch.Tensor]:
        """The train-mode (top, left, flip, alpha) of item ``i`` in ``epoch``."""
        g = torch.Generator().manual_seed(item_seed(self.seed, epoch, i))
        tl = torch.randint(0, SIZE - CROP + 1, (2,), generator=g)
        flip = bool(torch.rand((), generator=g) < 0.5)
        alpha = torch.randn(3, generator=g) * PCA_STD
        if self.pca == "off":
            alpha = torch.zeros(3)
        return int(tl[0]), int(tl[1]), flip, alpha.float()

    def __getitem__(self, key) -> dict:
        if isinstance(key, (tuple, list)):
            epoch, i = int(key[0]), int(key[1])
        else:
            epoch, i = 0, int(key)
        path, label = self.samples[i]
        if self.mode == "train":
            top, left, flip, alpha = self.draw(epoch, i)
        else:
            top, left, flip, alpha = CENTER, CENTER, False, torch.zeros(3)
        shape = (10, 3, CROP, CROP) if self.mode == "tencrop" else (3, CROP, CROP)
        item = {"label": label, "index": i, "top": top, "left": left, "flip": flip,
                "alpha": alpha, "pca": self.pca, "path": path}
        try:
            a = load_rgb256(path)
        except UnreadableImage:
            if self.strict:
                raise
            return {"image": torch.zeros(shape, dtype=torch.uint8), "ok": False, **item}
        if self.mode == "tencrop":
            crops = []
            for t, l, f in tencrop_offsets():
                c = a[t:t + CROP, l:l + CROP]
                crops.append(c[:, ::-1] if f else c)
            img = torch.from_numpy(np.ascontiguousarray(np.stack(crops).transpose(0, 3, 1, 2)))
        else:
            c = a[top:top + CROP, left:left + CROP]
            if flip:
                c = c[:, ::-1]
            img = torch.from_numpy(np.ascontiguousarray(c.transpose(2, 0, 1)))
        return {"image": img, "ok": True, **item}


# ----------------------------------------------------------------------------- batching

_warned: set[str] = set()


def collate(items: list[dict]) -> dict:
    """Stack the readable items; unreadable ones (``ok`` False) are dropped, warned about once
    per file (per process) and listed in ``batch["skipped"]``."""
    good = [it for it in items if it["ok"]]
    skipped = [it["path"] for it in items if not it["ok"]]
    for p in skipped:
        if p not in _warned:
            _warned.add(p)
            warnings.warn(f"skipping unreadable image: {p}", RuntimeWarning, stacklevel=2)
    if good:
        image = torch.stack([it["image"] for it in good])
    else:
        image = torch.zeros((0,) + tuple(items[0]["image"].shape), dtype=torch.uint8)

    def col(key, dtype):
        return torch.tensor([it[key] for it in good], dtype=dtype)
    pcas = {it["pca"] for it in items}
    if len(pcas) > 1:
        raise ValueError(f"mixed pca modes in one batch: {sorted(pcas)}")
    return {
        "image": image, "label": col("label", torch.int64), "index": col("index", torch.int64),
        "top": col("top", torch.int64), "left": col("left", torch.int64),
        "flip": col("flip", torch.bool),
        "alpha": (torch.stack([it["alpha"] for it in good]).float() if good
                  else torch.zeros((0, 3))),
        "pca": pcas.pop() if pcas else "paper", "skipped": skipped,
    }


class EpochSampler(Sampler):
    """Yields (epoch, i) keys. shuffle=True: permutation of range(n) from a torch.Generator
    seeded by (seed, epoch); sharded for data parallel: rank r takes perm[r::world_size],
    truncated to the same length on every rank (n // world_size) when drop_last=True.
    shuffle=False (evaluation): range(r, n, world_size) with no padding and no truncation
    (every item exactly once over all ranks). ``start`` skips the first ``start`` keys of this
    rank's sequence (mid-epoch resume)."""

    def __init__(self, n: int, *, epoch: int = 0, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True,
                 start: int = 0) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} / world_size {world_size}")
        if start < 0:
            raise ValueError("start must be >= 0")
        self.n, self.epoch, self.seed, self.shuffle = int(n), int(epoch), int(seed), shuffle
        self.rank, self.world_size, self.drop_last, self.start = rank, world_size, drop_last, start

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def indices(self) -> list[int]:
        """This rank's full index sequence for the epoch (before ``start``)."""
        if not self.shuffle:
            return list(range(self.rank, self.n, self.world_size))
        g = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, -1))
        perm = torch.randperm(self.n, generator=g).tolist()
        mine = perm[self.rank::self.world_size]
        if self.drop_last:
            mine = mine[: self.n // self.world_size]
        return mine

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self.indices()[self.start:]:
            yield (self.epoch, i)

    def __len__(self) -> int:
        if not self.shuffle:
            full = len(range(self.rank, self.n, self.world_size))
        elif self.drop_last:
            full = self.n // self.world_size
        else:
            full = len(range(self.rank, self.n, self.world_size))
        return max(0, full - self.start)


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


def make_loader(dataset, *, batch_size: int, sampler, workers: int,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader with :func:`collate`, one torch thread per worker, no persistent workers.
    ``pin_memory`` is ignored (False) when CUDA is not available."""
    pin = bool(pin_memory and torch.cuda.is_available())
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate, pin_memory=pin, drop_last=False,
                      persistent_workers=False,
                      worker_init_fn=_worker_init if workers > 0 else None,
                      prefetch_factor=4 if workers > 0 else None)


# ----------------------------------------------------------------------------- device side

_mean_cache: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _device_stats(stats: Stats, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(mean, ten mean crops, eigval, eigvec) on ``device``, cached per (stats, device)."""
    key = (id(stats), stats.fingerprint, str(device))
    hit = _mean_cache.get(key)
    if hit is None or hit[4] is not stats.mean:
        if len(_mean_cache) > 8:
            _mean_cache.clear()
        mean = stats.mean.to(device=device, dtype=torch.float32)
        tencrop = torch.stack([_crop(mean, t, l, f) for t, l, f in tencrop_offsets()])
        hit = (mean, tencrop, stats.eigval.to(device, torch.float32),
               stats.eigvec.to(device, torch.float32), stats.mean)
        _mean_cache[key] = hit
    return hit


def _crop(x: torch.Tensor, top: int, left: int, flip: bool) -> torch.Tensor:
    c = x[..., top:top + CROP, left:left + CROP]
    return c.flip(-1) if flip else c


def mean_crops(mean: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
               flip: torch.Tensor) -> torch.Tensor:
    """(B, 3, 227, 227): ``mean`` (3, 256, 256) cropped at each (top, left), flipped where
    ``flip`` - the same region and reflection as each training crop."""
    ar = torch.arange(CROP, device=mean.device)
    rows = top.to(mean.device)[:, None] + ar                       # (B, 227)
    cols = left.to(mean.device)[:, None] + torch.where(flip.to(mean.device)[:, None],
                                                       CROP - 1 - ar, ar)  # (B, 227)
    out = mean[:, rows[:, :, None], cols[:, None, :]]              # (3, B, 227, 227)
    return out.permute(1, 0, 2, 3)


def pca_noise(alpha: torch.Tensor, eigval: torch.Tensor, eigvec: torch.Tensor,
              pca: str = "paper") -> torch.Tensor:
    """(B, 3) RGB offsets in 0-255 units, ``eigvec @ (alpha * scale)`` with ``scale``:

    * ``"paper"``: the eigenvalues of the covariance of RGB values on the [0, 1] scale
      (``eigval / 255**2``), the offset then expressed in 0-255 units (``* 255``), i.e.
      ``eigval / 255``. The paper does not state its pixel scale; this is the reading whose
      eigenvalues match the published ImageNet ones (0.2175, 0.0188, 0.0045) and gives a
      noise of ~5 grey levels on ImageNet.
    * ``"paper-255"``: the formula with 0-255 eigenvalues taken literally (noise ~1400 levels
      on ImageNet, which drowns the image; kept so the choice is visible and testable).
    * ``"sqrt"``: ``sqrt(eigval)``, the reading of Krizhevsky's released code (~12 levels).
    """
    if pca == "off":
        return torch.zeros_like(alpha)
    if pca == "paper":
        scale = eigval / 255.0
    elif pca == "paper-255":
        scale = eigval
    else:
        scale = eigval.clamp_min(0).sqrt()
    return (alpha * scale) @ eigvec.T


def finish_batch(batch: dict, stats: Stats, device: torch.device | str, *,
                 dtype=torch.float32) -> torch.Tensor:
    """On ``device``: ``image.float() - mean crop (+ PCA noise in train batches)``.

    Train batches (``image`` (B,3,227,227)) subtract the mean image cropped at each item's
    (top, left) and flipped where it was flipped, then add
    ``eigvec @ (alpha * eigval)`` (``pca="paper"``) or ``eigvec @ (alpha * sqrt(eigval))``
    (``"sqrt"``) to every pixel. Centre batches have top=left=14 and alpha=0 so the same
    code applies. Ten-crop batches ((B,10,3,227,227)) subtract the ten matching mean crops.
    Raw 0-255 scale, no division."""
    device = torch.device(device)
    mean, mean10, eigval, eigvec, _ = _device_stats(stats, device)
    img = batch["image"]
    nb = device.type == "cuda" and img.is_pinned()
    x = img.to(device, non_blocking=nb).to(torch.float32)
    if x.dim() == 5:
        x = x - mean10
    else:
        x = x - mean_crops(mean, batch["top"], batch["left"], batch["flip"])
        alpha = batch["alpha"]
        if alpha.numel() and bool(alpha.any()):
            noise = pca_noise(alpha.to(device, non_blocking=nb).float(),
                              eigval, eigvec, batch.get("pca", "paper"))
            x = x + noise[:, :, None, None]
    return x if dtype == torch.float32 else x.to(dtype)
