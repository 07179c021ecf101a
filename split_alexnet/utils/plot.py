"""Line charts as PNG with Pillow alone (a core dependency), so every run gets its curves
without matplotlib. ``curves_png(path, series, ...)`` draws several named (x, y) series."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from split_alexnet.utils.fileio import atomic_write

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    out, v = [], start
    while v <= hi + 1e-9:
        out.append(round(v, 10))
        v += step
    return out


def curves_png(path: Path | str, series: Sequence[tuple[str, Sequence[float], Sequence[float]]],
               *, title: str = "", xlabel: str = "", ylabel: str = "",
               size: tuple[int, int] = (800, 500), ylim: tuple[float, float] | None = None,
               log_y: bool = False) -> None:
    """Write a PNG of ``series`` = [(label, xs, ys), ...] to ``path``; ``log_y``: the y axis
    in decades (every y must be above 0), its ticks labelled with the values."""
    if log_y:
        series = [(label, xs, [math.log10(y) for y in ys]) for label, xs, ys in series]
        ylim = None
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 70, 20, 40, 50
    pw, ph = w - left - right, h - top - bottom
    xs_all = [x for _, xs, _ in series for x in xs]
    ys_all = [y for _, _, ys in series for y in ys if y == y and abs(y) != float("inf")]
    x0, x1 = (min(xs_all), max(xs_all)) if xs_all else (0.0, 1.0)
    y0, y1 = ylim if ylim else ((min(ys_all), max(ys_all)) if ys_all else (0.0, 1.0))
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * pw, top + (1 - (y - y0) / (y1 - y0)) * ph)

    d.rectangle([left, top, left + pw, top + ph], outline="black")
    for t in _ticks(y0, y1):
        _, py = px(x0, t)
        d.line([left, py, left + pw, py], fill=(230, 230, 230))
        d.text((5, py - 6), f"{10 ** t:.2g}" if log_y else f"{t:g}", fill="black", font=font)
    for t in _ticks(x0, x1):
        qx, _ = px(t, y0)
        d.line([qx, top, qx, top + ph], fill=(230, 230, 230))
        d.text((qx - 10, top + ph + 5), f"{t:g}", fill="black", font=font)
    d.text((left, 10), title, fill="black", font=font)
    d.text((left + pw // 2 - 20, h - 20), xlabel, fill="black", font=font)
    d.text((5, top - 20), ylabel, fill="black", font=font)
    for i, (label, xs, ys) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        pts = [px(x, y) for x, y in zip(xs, ys) if y == y and abs(y) != float("inf")]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for p in pts if len(pts) < 60 else []:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
        ly = top + 10 + 14 * i
        d.line([left + pw - 150, ly + 6, left + pw - 130, ly + 6], fill=color, width=3)
        d.text((left + pw - 125, ly), label, fill="black", font=font)
    # The temporary's name ends in the writer's pid (as the trainer's do), so a clean-up can
    # tell a live writer's file from a dead one's.
    atomic_write(Path(path), lambda f: img.save(f, format="PNG"), private=False,
                 suffix=f".{os.getpid()}.tmp")
