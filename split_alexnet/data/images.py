"""Decoding any image file into the paper's 256x256 RGB uint8 form (section 2).

One function, :func:`load_rgb256`, is used both by the offline ``prepare`` step and by the
on-the-fly loader for unprepared folders, so a prepared and an unprepared dataset see the same
pixels up to the JPEG re-encoding of ``prepare``:

* the shorter side is rescaled to 256 and the central 256x256 patch is kept. This is done in
  one resampling step: the central square of the source (side = shorter side, exact fractional
  centre) is resized to 256x256 with Pillow's antialiased bicubic filter (``Image.resize(...,
  box=...)``). Tiny images (shorter side < 256) are upscaled the same way;
* big JPEGs are first decoded at a reduced DCT scale with ``Image.draft`` so that the decoded
  image is still at least ``DRAFT_MIN`` = 512 px on its shorter side (2x the target, so the
  final antialiased resize still averages several source pixels; see docs/data.md for the
  measured speed and the error against a full decode);
* EXIF orientation is applied (``ImageOps.exif_transpose``);
* grayscale (``L``, ``1``), ``CMYK`` (including Adobe-inverted CMYK JPEGs, which Pillow
  handles), ``YCbCr``, ``LAB``, ``HSV`` -> RGB by Pillow's ``convert``; images with alpha
  (``RGBA``, ``LA``, palette PNGs with transparency) are composited over white; 16-bit and
  32-bit integer grayscale (``I;16``, ``I``) are scaled to 0-255 (value / 257, i.e. the high
  byte rounded) rather than clipped; float (``F``) images are clipped to 0-255.

Any failure to read (not an image, empty, truncated, corrupt, a decompression bomb over
Pillow's ``Image.MAX_IMAGE_PIXELS`` protection) raises :class:`UnreadableImage` naming the path.
This module needs only numpy and Pillow (no torch), so ``prepare`` workers stay light.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from split_alexnet.utils.cli import UsageError

__all__ = ["SIZE", "IMG_EXTENSIONS", "UnreadableImage", "is_image_file", "load_rgb256",
           "to_rgb", "resize_center", "image_sums", "list_images"]

SIZE = 256
DRAFT_MIN = 2 * SIZE
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm", ".pbm", ".jfif")
RESAMPLE = Image.Resampling.BICUBIC


class UnreadableImage(UsageError):
    """An image file that cannot be decoded (its path is in the message)."""


def is_image_file(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith(IMG_EXTENSIONS)


def _composite_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        return _composite_white(img)
    if mode == "P":
        if "transparency" in img.info or img.palette is not None and img.palette.mode == "RGBA":
            return _composite_white(img)
        return img.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.float64)
        maxval = 65535.0 if (mode.startswith("I;16") or a.max(initial=0) > 255) else 255.0
        a = np.clip(np.rint(a * (255.0 / maxval)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        a = np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return img.convert("RGB")


def resize_center(img: Image.Image, size: int = SIZE) -> Image.Image:
    """Shorter side -> ``size``, keep the central ``size`` x ``size`` patch, in one resize."""
    w, h = img.size
    s = min(w, h)
    x0, y0 = (w - s) / 2.0, (h - s) / 2.0
    if w == h == size:
        return img
    return img.resize((size, size), RESAMPLE, box=(x0, y0, x0 + s, y0 + s))


_TVIO: object = None


def _torchvision_io():
    """``torchvision.io`` if it imports, else False (cached)."""
    global _TVIO
    if _TVIO is None:
        try:
            import torch
            from torchvision import io as tvio
            _TVIO = (torch, tvio)
        except Exception:  # noqa: BLE001 - no torchvision: Pillow only
            _TVIO = False
    return _TVIO


def _decode_jpeg_tv(data: bytes, size: int, draft: bool) -> np.ndarray | None:
    """Fast path for prepared (size x size) plain RGB/grayscale JPEGs: torchvision's
    libjpeg-turbo decoder (~2x Pillow, bit-identical output here; docs/data.md).
    None -> use Pillow."""
    with Image.open(io.BytesIO(data)) as im:   # header only; runs Pillow's bomb check
        if im.format != "JPEG" or im.mode not in ("RGB", "L"):
            return None
        if im.size != (size, size):
            return None  # full-size input: Pillow's decode + resize is faster (docs/data.md)
    tv = _torchvision_io()
    if not tv:
        return None
    torch, tvio = tv
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its codecs (moving to TorchCodec) and warns on every
            # call; we use decode_jpeg only with a Pillow fallback, so silence that warning.
            warnings.simplefilter("ignore", DeprecationWarning)
            t = tvio.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                 mode=tvio.ImageReadMode.RGB, apply_exif_orientation=True)
    except Exception:  # noqa: BLE001 - let Pillow decide (and name the error)
        return None
    a = t.permute(1, 2, 0).numpy()
    if a.shape[:2] == (size, size):
        return np.ascontiguousarray(a)
    return np.asarray(resize_center(Image.fromarray(np.ascontiguousarray(a), "RGB"), size))


def load_rgb256(path: str | os.PathLike, *, draft: bool = True, size: int = SIZE,
                decoder: str = "auto") -> np.ndarray:
    """Decode ``path`` -> (size, size, 3) uint8 RGB array, or raise :class:`UnreadableImage`.

    ``decoder="auto"``: torchvision's JPEG decoder for already-prepared (size x size) plain
    RGB/grayscale JPEGs, Pillow for everything else; ``"pillow"``: Pillow only."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        out = None
        if decoder == "auto" and data[:3] == b"\xff\xd8\xff":
            out = _decode_jpeg_tv(data, size, draft)
        if out is None:
            with Image.open(io.BytesIO(data)) as im:
                if draft and im.format == "JPEG" and min(im.size) >= 2 * DRAFT_MIN:
                    # Both requested sides >= DRAFT_MIN, so the shorter side stays >= DRAFT_MIN
                    # whatever the EXIF rotation.
                    im.draft("RGB", (DRAFT_MIN, DRAFT_MIN))
                im.load()
                img = ImageOps.exif_transpose(im)
                img = to_rgb(img)
                if min(img.size) < 1:
                    raise ValueError("zero-size image")
                out = np.asarray(resize_center(img, size))
    except UnreadableImage:
        raise
    except Exception as e:  # noqa: BLE001 - any decode failure (incl. DecompressionBombError)
        msg = "not a recognised image file" if isinstance(e, UnidentifiedImageError) else str(e)
        raise UnreadableImage(f"cannot read image {path}: {type(e).__name__}: {msg}") from None
    if out.shape != (size, size, 3) or out.dtype != np.uint8:
        raise UnreadableImage(f"cannot read image {path}: decoded to {out.shape} {out.dtype}")
    return out


def image_sums(paths: Sequence[str]):
    """Exact float64 sums over the given images: image sum, RGB sum, RGB outer products."""
    img_sum = np.zeros((SIZE, SIZE, 3), np.float64)
    rgb_sum = np.zeros(3, np.float64)
    outer = np.zeros((3, 3), np.float64)
    n, bad = 0, []
    for p in paths:
        try:
            a = load_rgb256(p)
        except UnreadableImage as e:
            bad.append((p, str(e)))
            continue
        x = a.reshape(-1, 3).astype(np.float64)
        img_sum += a
        rgb_sum += x.sum(0)
        outer += x.T @ x
        n += 1
    return img_sum, rgb_sum, outer, n, bad


def list_images(directory: Path) -> list[Path]:
    """All image files under ``directory`` (recursive), sorted by relative path."""
    out = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for f in filenames:
            if is_image_file(f) and not f.startswith("."):
                out.append(Path(dirpath) / f)
    out.sort(key=lambda p: p.relative_to(directory).as_posix())
    return out
