"""The dataset, sampler and loader: ``root/<split>/<class>/*`` images served as the paper's
uint8 crops (random 227 crop and flip, centre, or ten crops), with randomness a pure function
of ``(seed, epoch, index)``, data-parallel sharding and mid-epoch resume. See docs/data.md."""

from __future__ import annotations

import copy
import hashlib
import os
import signal
import struct
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from split_alexnet.data.images import (SIZE, UnreadableImage, list_images, load_rgb256,
                                       report_skipped, report_unscanned)
from split_alexnet.utils.cli import UsageError

CROP = 227                   # the network's input side (section 4.1; 55x55 after conv1)
CENTER = (SIZE - CROP) // 2  # 14: top and left of the centre crop
PCA_STD = 0.1                # standard deviation of the colour-noise draw alpha (section 4.1)
MODES = ("train", "center", "tencrop")
PCA_MODES = ("paper", "paper-255", "sqrt", "off")
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


_reported: set[tuple[str, ...]] = set()


def list_samples(split_dir: Path, classes: Sequence[str],
                 skipped: list[Path] | None = None, *,
                 strict: bool = False) -> list[tuple[str, int]]:
    """``[(path, label)]`` sorted by class then relative path; UsageError for a missing or
    empty class folder, or a class folder that is not in ``classes``.

    Only regular files are samples (:func:`split_alexnet.data.images.list_images`): FIFOs,
    devices, sockets and dangling links are left out, appended to ``skipped`` (when given)
    and counted in one line on stderr (once per process for the same set); so are folders
    that cannot be scanned, which with ``strict`` are a :class:`UsageError`."""
    split_dir = Path(split_dir)
    special: list[Path] = []
    present = set(find_classes(split_dir))
    extra = sorted(present - set(classes))
    if extra:
        raise UsageError(f"{split_dir} has class folders that are not in the class list "
                         f"(the training classes): {', '.join(extra[:5])}"
                         + (" ..." if len(extra) > 5 else ""))
    samples: list[tuple[str, int]] = []
    lost: list[tuple[Path, str]] = []  # folders that could not be scanned
    for label, c in enumerate(classes):
        d = split_dir / c
        if not d.is_dir():
            raise UsageError(f"class folder missing: {d}")
        n_special = len(special)
        files = list_images(d, special, lost)
        if not files:
            extra = len(special) - n_special
            raise UsageError(f"empty class folder (no image files): {d}" + (
                f" ({extra} entries that are not regular files)" if extra else ""))
        samples.extend((str(p), label) for p in files)
    key = (str(split_dir), *map(str, special), *(str(p) for p, _ in lost))
    if strict:
        report_unscanned(split_dir, lost, strict=True)
    if (special or lost) and key not in _reported:
        _reported.add(key)
        report_skipped(split_dir, special)
        report_unscanned(split_dir, lost)
    if skipped is not None:
        skipped.extend(special)
    return samples


def check_dataset_root(root: Path) -> None:
    """UsageError with a clear message if ``root``, ``root/train`` or ``root/val`` is missing
    or has no class folders."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"dataset folder not found: {root}")
    if not (root / "train").is_dir() and not (root / "val").is_dir() and any(
            e.is_dir() and not e.name.startswith(".") for e in os.scandir(root)):
        raise UsageError(f"{root} holds class folders but no train/ and val/: split it with "
                         f"split-alexnet-prepare {root} DST --val-fraction 0.1, then use DST")
    for split in ("train", "val"):
        find_classes(root / split)


# ----------------------------------------------------------------------------- dataset

def holdout_indices(targets: Sequence[int], per_class: int, seed: int) -> list[int]:
    """``per_class`` sample indices of every class, drawn from ``seed`` alone (the same on
    every rank and on resume), sorted: the held-out images of --holdout."""
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    held = []
    for c in sorted(by_class):
        g = torch.Generator().manual_seed(item_seed(seed, 0x401D, c))
        order = torch.randperm(len(by_class[c]), generator=g)[:per_class].tolist()
        held += [by_class[c][k] for k in order]
    return sorted(held)


def item_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of the integers ``parts`` (blake2b)."""
    h = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def tencrop_offsets() -> list[tuple[int, int, bool]]:
    """``(top, left, flip)`` of the ten crops, in :data:`TENCROP_ORDER`."""
    m = SIZE - CROP
    base = [(0, 0), (0, m), (m, 0), (m, m), (CENTER, CENTER)]
    return [(t, l, False) for t, l in base] + [(t, l, True) for t, l in base]


class CropFolder(Dataset):
    """``split_dir/<class>/<images>`` -> dict items of uint8 crops (see docs/data.md).

    ``mode``: ``"train"`` (random 227 crop + flip with p=0.5 + a PCA draw),
    ``"center"`` (the 227 centre crop at (14, 14)), ``"tencrop"`` ((10, 3, 227, 227) in
    :data:`TENCROP_ORDER`). ``pca``: one of :data:`PCA_MODES` (see
    :func:`split_alexnet.data.augment.pca_noise`). The item's ``alpha`` is the raw draw
    alpha ~ N(0, 0.1) (zeros when off or in evaluation) and its ``pca`` says the reading;
    :func:`split_alexnet.data.augment.finish_batch` applies the scale. ``skipped``: the
    entries of the folder that are not regular files (never opened). Key: ``i`` or
    ``(epoch, i)``; the crop/flip/alpha are drawn from
    ``torch.Generator().manual_seed(item_seed(seed, epoch, i))``.
    """

    def __init__(self, split_dir: Path, classes: list[str], *, mode: str = "train",
                 seed: int = 0, pca: str = "paper", strict: bool = False,
                 samples: list[tuple[str, int]] | None = None) -> None:
        if mode not in MODES:
            raise UsageError(f"mode must be one of {MODES}, got {mode!r}")
        if pca not in PCA_MODES:
            raise UsageError(f"pca must be one of {PCA_MODES}, got {pca!r}")
        self.split_dir = Path(split_dir)
        self.classes = list(classes)
        self.mode, self.seed, self.pca, self.strict = mode, int(seed), pca, strict
        self.skipped: list[Path] = []  # entries that are not regular files (never opened)
        # ``samples``: list_samples(split_dir, classes) made already (the trainer's up-front
        # --holdout check), so that a folder of a million images is not listed twice
        self.samples = list(samples) if samples is not None else \
            list_samples(self.split_dir, self.classes, self.skipped, strict=strict)
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices: Sequence[int], *, mode: str | None = None) -> "CropFolder":
        """A copy holding only the samples at ``indices`` (in that order), in ``mode`` (default:
        this one's); its items are numbered from 0, so their draws are its own."""
        out = copy.copy(self)
        out.samples = [self.samples[i] for i in indices]
        out.targets = [t for _, t in out.samples]
        out.mode = mode or self.mode
        return out

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
    """Stack the readable items; unreadable ones (``ok`` False) are dropped, named in one
    warning line on stderr once per file (per process) and listed in ``batch["skipped"]``."""
    good = [it for it in items if it["ok"]]
    skipped = [it["path"] for it in items if not it["ok"]]
    for p in skipped:
        if p not in _warned:
            _warned.add(p)
            print(f"warning: skipping unreadable image: {p}", file=sys.stderr)
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
    # A SIGTERM to the whole process group (scancel, a preemption, pkill -f) reaches the
    # workers too. They leave it to the main process, which stops at the batch's end, saves
    # and shuts them down; a worker killed by it would end the run in an error mid-step. (A
    # worker whose main process is gone exits by itself: torch's watchdog.)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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
