"""Image files: which files are images, and decoding any of them into the paper's 256x256 RGB
uint8 form (section 2).

One function, :func:`load_rgb`, decodes a file path or the encoded bytes of an archive member;
it is used by the offline ``prepare`` step (files and archives alike), by the statistics and by
the on-the-fly loader for unprepared folders, so every path sees the same pixels (up to the
JPEG re-encoding of ``prepare``):

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

Decoders (``decoder=``): ``"pillow"`` decodes everything with Pillow. ``"auto"`` (the default)
sends already-prepared (256x256) plain RGB/grayscale JPEGs to ``torchvision.io.decode_jpeg``
(libjpeg-turbo, bit-identical to Pillow there and faster) and everything else to Pillow.
torchvision is an optional speed-up of this module: when it is missing, has no image codecs,
or deprecates them (torchvision >= 0.29 moves image decoding to TorchCodec and warns on every
call), ``"auto"`` is Pillow for everything. That is decided once per process, at the first
JPEG: from torchvision's version (read from its metadata; 0.29 or later is not imported at
all), then by decoding a tiny JPEG with the warnings recorded (:func:`_tv_usable`), so no
deprecation warning reaches the user.

Only regular files are data: :func:`list_images` lists regular files (after resolving
symlinks) and returns FIFOs, devices, sockets and dangling links apart, never opened; a path
given to :func:`load_rgb` that is not a regular file is refused the same way. An image whose
header declares more than :func:`pixel_limit` pixels (default :data:`MAX_PIXELS` =
89,478,485, about 89.5 megapixels, a 268 MB RGB decode; the environment variable
``SPLIT_ALEXNET_MAX_PIXELS`` changes it, up to Pillow's own hard limit of twice
``PIL.Image.MAX_IMAGE_PIXELS``) is refused before any pixel is decoded. Any failure to read
(not a regular file, not an image, empty, truncated, corrupt, over the pixel limit) raises
:class:`UnreadableImage` naming the image.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import re
import stat
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from split_alexnet.utils.cli import UsageError

__all__ = ["SIZE", "IMG_EXTENSIONS", "DECODERS", "MAX_PIXELS", "PIXELS_ENV", "UnreadableImage",
           "is_image_file", "pixel_limit", "file_kind", "load_rgb", "load_rgb256", "to_rgb",
           "resize_center", "list_images", "report_skipped"]

SIZE = 256
DRAFT_MIN = 2 * SIZE
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm", ".pbm", ".jfif")
DECODERS = ("auto", "pillow")
RESAMPLE = Image.Resampling.BICUBIC
JPEG_MAGIC = b"\xff\xd8\xff"
MAX_PIXELS = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS: 2**30 bytes / 4 / 3 channels
PIXELS_ENV = "SPLIT_ALEXNET_MAX_PIXELS"

ImageSource = str | os.PathLike | bytes | bytearray | memoryview


class UnreadableImage(UsageError):
    """An image file that cannot be decoded (its path is in the message)."""


class _TooLarge(ValueError):
    """An image over the pixel limit: its declared size, or a file larger than any image
    within it (:func:`max_file_bytes`)."""


class _NotRegular(ValueError):
    """A path that is not a regular file (a FIFO, a device, a socket, a folder)."""


def is_image_file(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith(IMG_EXTENSIONS)


def pixel_limit() -> int:
    """The largest width x height decoded: ``$SPLIT_ALEXNET_MAX_PIXELS`` if set, else
    :data:`MAX_PIXELS`. UsageError for a value that is not a positive integer."""
    raw = os.environ.get(PIXELS_ENV, "").strip()
    if not raw:
        return MAX_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"{PIXELS_ENV} must be a positive integer (pixels), got {raw!r}")
    return value


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words (``"regular file"``, ``"FIFO"``, ...)."""
    for test, kind in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "folder"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return "special file"


def list_images(directory: Path, skipped: list[Path] | None = None,
                unscanned: list[tuple[Path, str]] | None = None) -> list[Path]:
    """All image files under ``directory`` (recursive), sorted by relative path.

    Only regular files (after resolving symlinks) are listed; an entry with an image name that
    is a FIFO, a device, a socket or a dangling symlink is appended to ``skipped`` (when
    given) and never opened. Symlinked folders are not followed. A folder that cannot be
    scanned (no permission, a path too long) is appended with its reason to ``unscanned``
    when given, else counted in one warning line (:func:`report_unscanned`): never dropped
    in silence."""
    directory = Path(directory)
    out: list[Path] = []
    todo = [directory]
    lost: list[tuple[Path, str]] = [] if unscanned is None else unscanned
    while todo:
        d = todo.pop()
        try:
            entries = list(os.scandir(d))
        except FileNotFoundError:  # vanished since it was listed
            continue
        except OSError as e:
            lost.append((Path(d), e.strerror or type(e).__name__))
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    todo.append(Path(e.path))
                    continue
                if e.is_dir() or not is_image_file(e.name) or e.name.startswith("."):
                    continue
                regular = e.is_file()  # follows symlinks: False for a dangling one
            except OSError:  # cannot even be looked at: not data either
                regular = False
            if regular:
                out.append(Path(e.path))
            elif skipped is not None:
                skipped.append(Path(e.path))
    out.sort(key=lambda p: p.relative_to(directory).as_posix())
    if unscanned is None:
        report_unscanned(directory, lost)
    return out


def report_unscanned(where: Path, lost: list[tuple[Path, str]], *, strict: bool = False) -> None:
    """One line for the folders :func:`list_images` could not scan: a warning on stderr, or
    with ``strict`` a :class:`UsageError`."""
    if not lost:
        return
    def short(p: Path) -> str:  # relative, and at most 60 characters: paths may be huge
        rel = Path(p).relative_to(where).as_posix() if Path(p).is_relative_to(where) else str(p)
        return rel if len(rel) <= 60 else f"{rel[:28]}...{rel[-28:]}"
    names = ", ".join(f"{short(p)} ({why})" for p, why in sorted(lost)[:2]) + \
        (" ..." if len(lost) > 2 else "")
    text = f"{len(lost)} folder(s) under {where} could not be scanned: {names}"
    if strict:
        raise UsageError(f"{text}; --strict stops on them")
    print(f"warning: {text}; their images are left out", file=sys.stderr)


def report_skipped(where: Path, skipped: list[Path]) -> None:
    """One line on stderr counting the non-regular entries :func:`list_images` set aside."""
    if skipped:
        names = ", ".join(Path(p).relative_to(where).as_posix() for p in sorted(skipped)[:3])
        print(f"warning: skipped {len(skipped)} entries under {where} that are not regular files "
              f"(FIFOs, devices, sockets or dangling links): {names}"
              + (" ..." if len(skipped) > 3 else ""), file=sys.stderr)


# ----------------------------------------------------------------------------- Pillow

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


def _check_pixels(im: Image.Image, limit: int) -> None:
    """Refuse a declared size over ``limit`` pixels (only the header has been read)."""
    w, h = im.size
    if w * h > limit:
        raise _TooLarge(f"{w}x{h} = {w * h:,} pixels is over the limit of {limit:,} pixels "
                        f"(set {PIXELS_ENV} to allow more)")


def _decode_pillow(data: bytes, size: int, draft: bool, limit: int = MAX_PIXELS) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:   # header only: nothing is decoded yet
        _check_pixels(im, limit)
        if draft and im.format == "JPEG" and min(im.size) >= 2 * DRAFT_MIN:
            # Both requested sides >= DRAFT_MIN, so the shorter side stays >= DRAFT_MIN
            # whatever the EXIF rotation.
            im.draft("RGB", (DRAFT_MIN, DRAFT_MIN))
        im.load()
        img = to_rgb(ImageOps.exif_transpose(im))
        if min(img.size) < 1:
            raise ValueError("zero-size image")
        return np.asarray(resize_center(img, size))


# ----------------------------------------------------------------------------- torchvision

Decode = Callable[[bytes], torch.Tensor]


def tv_io():
    """``torchvision.io``, or None where it is not installed or does not load. Imported at the
    first JPEG, not with this module: importing torchvision imports torch's compiler (about a
    second of every process's start, measured on 2 CPU cores), which a process that decodes
    no JPEG, or where torchvision's decoder is not used, need not pay."""
    try:  # optional: the fast decoder of prepared JPEGs (see the module docstring)
        from torchvision import io as tvio
    except Exception:  # noqa: BLE001 - not installed, or a build that does not load: Pillow only
        return None
    return tvio


def _tv_decode(data: bytes) -> torch.Tensor:
    """torchvision's libjpeg-turbo decoder: JPEG bytes -> (3, H, W) uint8, EXIF applied."""
    tvio = tv_io()
    return tvio.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                            mode=tvio.ImageReadMode.RGB, apply_exif_orientation=True)


def _tv_usable(decode: Decode) -> bool:
    """Whether ``decode`` decodes a tiny JPEG without error and without a DeprecationWarning
    (torchvision >= 0.29 warns on every call: its image codecs move to TorchCodec)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, "JPEG")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            t = decode(buf.getvalue())
        except Exception:  # noqa: BLE001 - a build without image codecs: Pillow only
            return False
    if any(issubclass(w.category, DeprecationWarning) for w in caught):
        return False
    return tuple(t.shape) == (3, 16, 16)


_tv_state: dict[str, Decode | None] = {}


def tv_deprecates_codecs() -> bool:
    """Whether the installed torchvision is 0.29 or later, whose image decoders warn of their
    deprecation on every call (read from its metadata: torchvision is not imported)."""
    try:
        version = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return False
    found = re.match(r"(\d+)\.(\d+)", version)
    return found is not None and tuple(map(int, found.groups())) >= (0, 29)


def _tv_decoder() -> Decode | None:
    """The torchvision JPEG decoder if it is usable here (checked once per process: not tried
    at all from torchvision 0.29 on), else None."""
    if "decode" not in _tv_state:
        usable = (not tv_deprecates_codecs() and tv_io() is not None
                  and _tv_usable(_tv_decode))
        _tv_state["decode"] = _tv_decode if usable else None
    return _tv_state["decode"]


def _decode_tv(data: bytes, size: int, decode: Decode,
               limit: int = MAX_PIXELS) -> np.ndarray | None:
    """Fast path for prepared (size x size) plain RGB/grayscale JPEGs (~2x Pillow, bit-identical
    output; docs/data.md). None -> use Pillow."""
    with Image.open(io.BytesIO(data)) as im:   # header only; runs Pillow's bomb check
        _check_pixels(im, limit)
        if im.format != "JPEG" or im.mode not in ("RGB", "L"):
            return None
        if im.size != (size, size):
            return None  # full-size input: Pillow's decode + resize is faster (docs/data.md)
    try:
        t = decode(data)
    except Exception:  # noqa: BLE001 - let Pillow decide (and name the error)
        return None
    a = np.ascontiguousarray(t.permute(1, 2, 0).numpy())  # (H, W, 3)
    if a.shape[:2] == (size, size):
        return a
    return np.asarray(resize_center(Image.fromarray(a, "RGB"), size))


# ----------------------------------------------------------------------------- the decoder

def max_file_bytes(limit: int) -> int:
    """The largest image file read for a pixel limit of ``limit``: 8 bytes per pixel (16-bit
    RGBA, uncompressed) plus 1 MiB of headers and metadata. No image within the limit is
    larger; a larger file is refused by its size, before a byte of it is read."""
    return 8 * limit + (1 << 20)


def _read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of a regular file (after resolving symlinks) of at most
    :func:`max_file_bytes` (``limit``), checked on the opened file before reading;
    :class:`_NotRegular` for anything else, checked before opening and again on the opened
    file (non-blocking open, so a FIFO that appears in between cannot block), and
    :class:`_TooLarge` for a larger file."""
    kind = file_kind(os.stat(path).st_mode)
    if kind == "regular file":
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            kind = file_kind(st.st_mode)
            if kind == "regular file":
                if st.st_size > max_file_bytes(limit):
                    raise _TooLarge(f"the file holds {st.st_size:,} bytes, more than any image "
                                    f"within the limit of {limit:,} pixels "
                                    f"({max_file_bytes(limit):,} bytes)")
                return f.read(max_file_bytes(limit) + 1)
    raise _NotRegular(f"not a regular file (a {kind})")


def load_rgb(source: ImageSource, *, name: str | None = None, size: int = SIZE,
             draft: bool = True, decoder: str = "auto",
             max_pixels: int | None = None) -> np.ndarray:
    """Decode ``source`` (a file path, or the encoded bytes of an image) -> (size, size, 3)
    uint8 RGB array, or raise :class:`UnreadableImage` naming ``name`` (default: the path).

    The bytes of a file decode to exactly what its path does. ``decoder``: ``"auto"`` or
    ``"pillow"`` (see the module docstring); ``draft``: allow the reduced-scale JPEG decode;
    ``max_pixels``: the pixel limit (default :func:`pixel_limit`). A path that is not a
    regular file is refused without reading it."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    limit = pixel_limit() if max_pixels is None else max_pixels
    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    label = name if name is not None else ("image bytes" if is_bytes else os.fspath(source))
    try:
        data = bytes(source) if is_bytes else _read_regular(source, limit)
        out = None
        decode = _tv_decoder() if decoder == "auto" and data[:3] == JPEG_MAGIC else None
        if decode is not None:
            out = _decode_tv(data, size, decode, limit)
        if out is None:
            out = _decode_pillow(data, size, draft, limit)
    except (_TooLarge, _NotRegular) as e:
        raise UnreadableImage(f"cannot read image {label}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any decode failure (incl. DecompressionBombError)
        msg = "not a recognised image file" if isinstance(e, UnidentifiedImageError) else str(e)
        raise UnreadableImage(f"cannot read image {label}: {type(e).__name__}: {msg}") from None
    if out.shape != (size, size, 3) or out.dtype != np.uint8:
        raise UnreadableImage(f"cannot read image {label}: decoded to {out.shape} {out.dtype}")
    return out


def load_rgb256(path: str | os.PathLike, *, draft: bool = True, size: int = SIZE,
                decoder: str = "auto") -> np.ndarray:
    """:func:`load_rgb` of a file: ``path`` -> (size, size, 3) uint8 RGB array."""
    return load_rgb(path, size=size, draft=draft, decoder=decoder)
