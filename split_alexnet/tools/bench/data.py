"""``python -m split_alexnet.bench data``: decode + augment throughput of the input pipeline.

Generates JPEGs with photo-like content (smooth random fields plus fine grain, JPEG quality 90)
in a temp folder: prepared 256x256 images and unprepared 500x375 (ImageNet-typical) and
1600x1200 (large) ones. Then, in this one process with one torch thread (i.e. per worker/core):

* every available decoder turns each file into the 256x256 RGB uint8 patch (shorter side 256,
  central crop); the rate and the error against the reference (full Pillow decode + bicubic
  antialiased resize, no draft) are reported;
* the real training item (:class:`split_alexnet.data.dataset.CropFolder`, random crop + flip + PCA draw)
  is timed on the prepared and unprepared folders - the number the 400 img/s/core target is
  about;
* a :class:`torch.utils.data.DataLoader` with ``--workers`` workers is timed end to end.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, features
from torchvision.transforms.v2 import functional as F

from split_alexnet.data.dataset import CropFolder, EpochSampler, make_loader
from split_alexnet.data.images import SIZE, load_rgb256, resize_center, to_rgb
from split_alexnet.utils.fileio import write_json

try:  # deprecated since torchvision 0.29 (moving to TorchCodec): measured while it exists
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
except ImportError:
    decode_jpeg = None

__all__ = ["run", "add_arguments", "make_photo_like", "DECODERS"]


def make_photo_like(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A smooth random colour field plus fine grain: JPEG sizes near real photos."""
    small = rng.integers(0, 256, (max(2, h // 48), max(2, w // 48), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), np.int16)
    grain = rng.normal(0, 10, (h, w, 1))
    return Image.fromarray(np.clip(img + grain, 0, 255).astype(np.uint8), "RGB")


def _write_set(d: Path, n: int, w: int, h: int, seed: int) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = d / f"img_{i:04d}.jpg"
        make_photo_like(rng, w, h).save(p, "JPEG", quality=90)
        paths.append(str(p))
    return paths


def _tv_decode(path: str) -> np.ndarray:
    """torchvision's decoder and resize, for comparison (``load_rgb256`` decides whether it
    uses torchvision's decoder; this row measures it regardless)."""
    if decode_jpeg is None:
        raise RuntimeError("torchvision.io.decode_jpeg is not available")
    with warnings.catch_warnings():
        # torchvision >= 0.29 warns on every call; this row measures the deprecated decoder on
        # purpose, so its warning is expected here and not shown
        warnings.simplefilter("ignore", DeprecationWarning)
        t = decode_jpeg(read_file(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    _, h, w = t.shape
    if (h, w) != (SIZE, SIZE):
        s = min(h, w)
        y0, x0 = (h - s) // 2, (w - s) // 2
        t = F.resize(t[:, y0:y0 + s, x0:x0 + s], [SIZE, SIZE],
                     interpolation=F.InterpolationMode.BICUBIC, antialias=True)
    return t.permute(1, 2, 0).numpy()


def _pil_plain(path: str) -> np.ndarray:
    """Pillow, no draft, no EXIF handling: the lower bound of Pillow's cost."""
    with Image.open(path) as im:
        return np.asarray(resize_center(to_rgb(im.convert("RGB"))))


DECODERS = {
    "pillow (full decode)": lambda p: load_rgb256(p, draft=False, decoder="pillow"),
    "pillow + draft": lambda p: load_rgb256(p, draft=True, decoder="pillow"),
    "pillow bare (no EXIF)": _pil_plain,
    "torchvision.io.decode_jpeg": _tv_decode,
    "auto (used)": lambda p: load_rgb256(p),
}


def _rate(fn, paths: list[str], min_time: float, rounds: int = 3) -> float:
    """Best of ``rounds`` timed passes (the machine may be shared: best = least disturbed)."""
    fn(paths[0])  # warm up
    best = 0.0
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        while True:
            for p in paths:
                fn(p)
                n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time / rounds:
                break
        best = max(best, n / dt)
    return best


def _dataset_rate(split_dir: Path, min_time: float) -> float:
    ds = CropFolder(split_dir, ["c"], mode="train")
    epoch = [0]

    def item(i):
        ds[(epoch[0], i)]
    return _rate(item, list(range(len(ds))), min_time)


def _loader_rate(split_dir: Path, workers: int, batches: int) -> float:
    ds = CropFolder(split_dir, ["c"], mode="train")

    class Repeat(torch.utils.data.Sampler):
        def __iter__(self):
            for e in range(10 ** 6):
                yield from EpochSampler(len(ds), epoch=e)

    loader = make_loader(ds, batch_size=32, sampler=Repeat(), workers=workers)
    it = iter(loader)
    next(it)  # start-up not timed
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t0
    del it
    return batches * 32 / dt


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--images", type=int, default=None, help="images per set (default 200, quick 40)")


def run(args: argparse.Namespace) -> dict:
    quick = bool(getattr(args, "quick", False))
    workers = getattr(args, "workers", None)
    workers = min(os.cpu_count() or 1, 4) if workers is None else workers
    n = getattr(args, "images", None) or (40 if quick else 200)
    min_time = 0.5 if quick else 2.0
    torch.set_num_threads(1)
    out: dict = {"machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                             "pillow": Image.__version__,
                             "libjpeg_turbo": features.check_feature("libjpeg_turbo"),
                             "torch": torch.__version__},
                 "decoders": {}, "pipeline": {}}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = Path(tmp)
        sets = {
            "prepared 256x256": _write_set(tmp / "p256" / "c", n, 256, 256, 1),
            "unprepared 500x375": _write_set(tmp / "u500" / "c", n, 500, 375, 2),
            "unprepared 1600x1200": _write_set(tmp / "u1600" / "c", max(8, n // 8), 1600, 1200, 3),
        }
        for sname, paths in sets.items():
            kb = np.mean([os.path.getsize(p) for p in paths]) / 1024
            ref = [load_rgb256(p, draft=False, decoder="pillow").astype(np.int16) for p in paths[:8]]
            print(f"\n{sname}  ({len(paths)} files, mean {kb:.0f} KiB)")
            print(f"  {'decoder':30s} {'img/s/core':>10s} {'mean|err|':>9s} {'max|err|':>8s}")
            res = {}
            for dname, fn in DECODERS.items():
                try:
                    rate = _rate(fn, paths, min_time)
                    errs = [np.abs(fn(p).astype(np.int16) - r) for p, r in zip(paths, ref)]
                except Exception as e:  # noqa: BLE001 - a decoder that is not available here
                    print(f"  {dname:30s} unavailable: {e}")
                    continue
                mean_err = float(np.mean([e.mean() for e in errs]))
                max_err = int(max(e.max() for e in errs))
                res[dname] = {"rate": rate, "mean_abs_err": mean_err, "max_abs_err": max_err}
                print(f"  {dname:30s} {rate:10.0f} {mean_err:9.3f} {max_err:8d}")
            out["decoders"][sname] = {"files": len(paths), "mean_kib": kb, "results": res}
        print("\ntraining item (CropFolder train mode: decode + crop + flip + PCA draw + tensor)")
        for sname, d in (("prepared 256x256", "p256"), ("unprepared 500x375", "u500"),
                         ("unprepared 1600x1200", "u1600")):
            r = _dataset_rate(tmp / d, min_time)
            out["pipeline"][f"item {sname}"] = r
            print(f"  {sname:30s} {r:8.0f} img/s per core")
        if workers > 0:
            r = _loader_rate(tmp / "p256", workers, 10 if quick else 40)
            out["pipeline"][f"DataLoader prepared 256x256, {workers} workers"] = r
            print(f"  DataLoader, prepared, {workers} workers, batch 32: {r:8.0f} img/s total")
    if getattr(args, "json", None):
        write_json(args.json, {"data": out})
    return out
