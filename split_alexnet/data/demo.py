"""A small, learnable, generated CropFolder for demos and tests (numpy + Pillow only).

``python -m split_alexnet.demo_data DIR [--classes 10] [--train-per-class 100]
[--val-per-class 20] [--seed 0]`` writes ``DIR/train/<class>/*.jpg`` and ``DIR/val/<class>/*.jpg``
(256x256 JPEGs). Each class is a shape or texture (circle, square, triangle, star, cross,
stripes_h, stripes_v, checkerboard, ring, dots, then hexagon, stripes_diag for up to 12) drawn
with a random foreground colour on a random gradient background, at a random scale, position
and rotation, so colour alone does not give the label. Every image is a pure function of
(seed, split, class, index): the same seed gives byte-identical files.
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from split_alexnet.utils.cli import Abort, Parser, UsageError, run
from split_alexnet.utils.fileio import atomic_write, check_output_dir, write_json

__all__ = ["SHAPES", "make_demo_dataset", "demo_unfinished", "draw_image", "main"]

SHAPES = ("circle", "square", "triangle", "star", "cross", "stripes_h", "stripes_v",
          "checkerboard", "ring", "dots", "hexagon", "stripes_diag")
S = 256
QUALITY = 90
#: Present from the first image written to the last: a generation that did not finish.
PARTIAL = "demo.partial"


def demo_unfinished(root) -> bool:
    """Whether ``root`` needs the demo set generated: no ``train/`` yet, or a generation
    that was cut short (``demo.partial`` left)."""
    return not (Path(root) / "train").is_dir() or (Path(root) / PARTIAL).exists()



def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], np.ndarray]:
    bg = rng.integers(0, 256, 3)
    while True:
        fg = rng.integers(0, 256, 3)
        if np.abs(fg - bg).sum() >= 200:
            return tuple(int(v) for v in fg), bg


def _background(rng: np.random.Generator, bg: np.ndarray) -> Image.Image:
    theta = rng.uniform(0, 2 * math.pi)
    amp = rng.uniform(0, 40)
    ramp = (np.cos(theta) * np.arange(S)[None, :] + np.sin(theta) * np.arange(S)[:, None]) / S
    a = bg[None, None, :] + amp * (ramp - ramp.mean())[:, :, None]
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def _polygon(cx: float, cy: float, radii: Sequence[float], rot: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [(cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
            for k, r in enumerate(radii)]


def draw_image(kind: str, rng: np.random.Generator) -> Image.Image:
    """One 256x256 RGB image of class ``kind``."""
    fg, bg = _colours(rng)
    img = _background(rng, bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.18, 0.36) * S                      # shape "radius"
    m = r + 16
    cx, cy = rng.uniform(m, S - m), rng.uniform(m, S - m)
    rot = rng.uniform(0, 2 * math.pi)
    if kind == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif kind == "ring":
        w = max(4, int(r * rng.uniform(0.2, 0.35)))
        d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fg, width=w)
    elif kind == "square":
        d.polygon(_polygon(cx, cy, [r] * 4, rot), fill=fg)
    elif kind == "triangle":
        d.polygon(_polygon(cx, cy, [r * 1.1] * 3, rot), fill=fg)
    elif kind == "hexagon":
        d.polygon(_polygon(cx, cy, [r] * 6, rot), fill=fg)
    elif kind == "star":
        d.polygon(_polygon(cx, cy, [r * 1.1, r * 0.42] * 5, rot), fill=fg)
    elif kind == "cross":
        w = r * rng.uniform(0.25, 0.4)
        c, s = math.cos(rot), math.sin(rot)
        for (ux, uy) in ((c, s), (-s, c)):
            vx, vy = -uy, ux
            d.polygon([(cx + ux * r + vx * w, cy + uy * r + vy * w),
                       (cx + ux * r - vx * w, cy + uy * r - vy * w),
                       (cx - ux * r - vx * w, cy - uy * r - vy * w),
                       (cx - ux * r + vx * w, cy - uy * r + vy * w)], fill=fg)
    else:  # textures over a large random rectangle
        w, h = rng.uniform(0.6, 1.0) * S, rng.uniform(0.6, 1.0) * S
        x0, y0 = rng.uniform(0, S - w), rng.uniform(0, S - h)
        x1, y1 = x0 + w, y0 + h
        p = int(rng.integers(12, 36))                    # period in pixels
        ph = int(rng.integers(0, p))
        if kind == "stripes_h":
            for y in range(int(y0) - ph, int(y1), p):
                if min(y + p // 2, y1) > max(y, y0):
                    d.rectangle((x0, max(y, y0), x1, min(y + p // 2, y1)), fill=fg)
        elif kind == "stripes_v":
            for x in range(int(x0) - ph, int(x1), p):
                if min(x + p // 2, x1) > max(x, x0):
                    d.rectangle((max(x, x0), y0, min(x + p // 2, x1), y1), fill=fg)
        elif kind == "stripes_diag":
            mask = Image.new("L", (S, S), 0)
            md = ImageDraw.Draw(mask)
            sign = 1 if rng.random() < 0.5 else -1
            for k in range(-2 * S, 2 * S, p):
                o = k + ph
                md.polygon([(o, 0), (o + p // 2, 0), (o + p // 2 + sign * S, S), (o + sign * S, S)],
                           fill=255)
            box = Image.new("L", (S, S), 0)
            ImageDraw.Draw(box).rectangle((x0, y0, x1, y1), fill=255)
            mask = Image.fromarray(np.minimum(np.asarray(mask), np.asarray(box)))
            img.paste(Image.new("RGB", (S, S), fg), (0, 0), mask)
        elif kind == "checkerboard":
            for i, y in enumerate(range(int(y0), int(y1), p)):
                for j, x in enumerate(range(int(x0), int(x1), p)):
                    if (i + j) % 2 == 0 and x < x1 and y < y1:
                        d.rectangle((x, y, min(x + p - 1, x1), min(y + p - 1, y1)), fill=fg)
        elif kind == "dots":
            rad = p * rng.uniform(0.2, 0.3)
            for y in range(int(y0) + p // 2, int(y1), p):
                for x in range(int(x0) + p // 2, int(x1), p):
                    d.ellipse((x - rad, y - rad, x + rad, y + rad), fill=fg)
        else:
            raise ValueError(f"unknown demo class {kind!r}")
    return img


def make_demo_dataset(root, *, classes: int = 10, train_per_class: int = 100,
                      val_per_class: int = 20, seed: int = 0) -> Path:
    """Write the demo CropFolder under ``root`` and return ``root`` as a Path.

    If ``root/demo.json`` records the same parameters and all files exist, nothing is
    rewritten (so ``train --demo`` can call this every time). ``root/demo.partial`` is
    written before the first image and removed after ``demo.json``, the last file: a
    generation cut short (SIGKILL) leaves it, and the next call finishes the set
    (:func:`demo_unfinished`). Bad arguments (a ``root`` that
    is not a writable folder, a negative seed, ...) are UsageError; a failed write (full
    disk) is Abort (one line, exit 1), the files written before it complete."""
    if not 1 <= classes <= len(SHAPES):
        raise UsageError(f"--classes must be between 1 and {len(SHAPES)}, got {classes}")
    if train_per_class < 1 or val_per_class < 1:
        raise UsageError("--train-per-class and --val-per-class must be >= 1")
    if seed < 0:
        raise UsageError(f"--seed must be >= 0, got {seed}")
    root = Path(root)
    params = {"classes": classes, "train_per_class": train_per_class,
              "val_per_class": val_per_class, "seed": seed, "version": 1}
    names = SHAPES[:classes]
    plan = []
    for split_idx, (split, count) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for kind in names:
            for j in range(count):
                plan.append((split_idx, kind, j, root / split / kind / f"{kind}_{j:04d}.jpg"))
    marker = root / "demo.json"
    try:
        if marker.is_file() and json.loads(marker.read_text()) == params \
                and all(p.is_file() for *_, p in plan):
            try:
                (root / PARTIAL).unlink(missing_ok=True)  # a cut after the last file
            except OSError:
                pass
            return root
    except (OSError, ValueError):
        pass
    check_output_dir(root, "demo data folder")  # only now: a complete one may be read-only
    try:
        write_json(root / PARTIAL, params, indent=None, sort_keys=True, fsync=False)
        for split_idx, kind, j, path in plan:
            rng = np.random.default_rng([seed, split_idx, SHAPES.index(kind), j])
            buf = io.BytesIO()  # encoded in memory: Pillow ignores short writes to a file
            draw_image(kind, rng).save(buf, "JPEG", quality=QUALITY)
            atomic_write(path, lambda f: f.write(buf.getvalue()), fsync=False, private=False)
        write_json(marker, params, indent=None, sort_keys=True, fsync=False)
        (root / PARTIAL).unlink()
    except OSError as e:  # full disk, file too large: the files written so far are complete
        raise Abort(f"could not write {e.filename or root}: {e.strerror or e}") from None
    return root


def main(argv: Sequence[str] | None = None) -> int:
    ap = Parser(module="split_alexnet.demo_data",
                description="Write a small generated, learnable CropFolder.")
    ap.add_argument("dir", type=Path, help="output folder (train/ and val/ are created)")
    ap.add_argument("--classes", type=int, default=10, help=f"number of classes (1-{len(SHAPES)})")
    ap.add_argument("--train-per-class", type=int, default=100,
                    help="training images per class (default 100)")
    ap.add_argument("--val-per-class", type=int, default=20,
                    help="validation images per class (default 20)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seeds every drawn image: the same seed writes the same files "
                         "(default 0)")
    a = ap.parse_args(argv)
    root = make_demo_dataset(a.dir, classes=a.classes, train_per_class=a.train_per_class,
                             val_per_class=a.val_per_class, seed=a.seed)
    n = a.classes * (a.train_per_class + a.val_per_class)
    print(f"wrote {n} images ({a.classes} classes) to {root}")
    return 0


def cli() -> None:
    """The console command: ``main`` with one-line errors and exit codes."""
    sys.exit(run(main, "split_alexnet.demo_data"))
