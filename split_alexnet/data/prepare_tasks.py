"""The worker tasks of ``prepare``: decode images (files, or members streamed out of the
ImageNet archives) to the paper's 256x256 patch and write them as JPEGs, atomically.

Each task returns ``{"images", "written", "existing", "failures", "error", "write_error"}``:
``failures`` lists ``(label, message)`` of unreadable images (skipped, reported), ``error`` is
a message for an archive that cannot be read or holds an unsafe member (the run stops, exit
2), ``write_error`` one for an output that could not be written (the run stops, exit 1).
Decoding is Pillow only (:func:`split_alexnet.data.images.load_rgb` with
``decoder="pillow"``), so the prepared bytes depend on Pillow alone and every layout gives the
same tree.
"""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from pathlib import Path, PurePath, PurePosixPath

import numpy as np
from PIL import Image

from split_alexnet.data.images import UnreadableImage, is_image_file, load_rgb
from split_alexnet.data.members import member_rel
from split_alexnet.data.subset import pick
from split_alexnet.utils.cli import UsageError
from split_alexnet.utils.fileio import atomic_write

__all__ = ["TMP_MARK", "out_name", "jpeg_bytes", "write_jpeg", "files_task", "train_class_task",
           "val_chunk_task"]

TMP_MARK = ".prepare-tmp"  # ends the name of every temporary output file


def out_name(rel: PurePath) -> PurePath:
    """The output name of input ``rel``: kept for ``.jpg``/``.jpeg``, else suffix -> ``.jpg``."""
    return rel if rel.suffix.lower() in (".jpg", ".jpeg") else rel.with_suffix(".jpg")


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    """``img`` encoded as a JPEG, in memory.

    Encoding into a file object that has a file descriptor lets Pillow write to the descriptor
    itself, and it ignores short writes: at a full disk (or the file size limit) the file is
    silently truncated. Python's own writes of the encoded bytes raise instead."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_jpeg(a: np.ndarray, out: str | os.PathLike, quality: int) -> None:
    """Write the (256, 256, 3) uint8 array ``a`` as a JPEG to ``out`` atomically (hidden temp
    file ending in :data:`TMP_MARK` + rename), creating the folder; a failed write is an
    OSError and leaves nothing behind."""
    data = jpeg_bytes(Image.fromarray(a, "RGB"), quality)
    atomic_write(out, lambda f: f.write(data), fsync=False, suffix=TMP_MARK, private=False)


def _result(images: int) -> dict:
    return {"images": images, "written": 0, "existing": 0, "failures": [], "error": None,
            "write_error": None}


def _convert(source: str | bytes, label: str, out: Path, quality: int, res: dict,
             name: str | None = None) -> None:
    """Decode one image (a path, or an archive member's bytes named ``name`` in errors) to the
    256x256 crop and write it; an unreadable image goes to ``res["failures"]`` as ``label``,
    a failed write to ``res["write_error"]`` (after which the task must stop)."""
    try:
        a = load_rgb(source, name=name, decoder="pillow")
    except UnreadableImage as e:
        res["failures"].append((label, str(e)))
        return
    try:
        write_jpeg(a, out, quality)
    except OSError as e:  # full disk, file too large, I/O error: the task stops here
        res["write_error"] = f"could not write {e.filename or out}: {e.strerror or e}"
        return
    res["written"] += 1


def files_task(task: tuple) -> dict:
    """Worker: convert image files. ``task = ([(input path, output path, label), ...],
    quality)``; ``label`` (the path relative to SRC) names a failure in the report."""
    items, quality = task
    res = _result(len(items))
    for src, out, label in items:
        _convert(src, label, Path(out), quality, res)
        if res["write_error"]:
            break
    return res


class _Slice(io.RawIOBase):
    """Read-only seekable view of bytes [offset, offset + size) of an open file."""

    def __init__(self, f, offset: int, size: int) -> None:
        self.f, self.offset, self.size, self.pos = f, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.size - self.pos))
        if n == 0:
            return 0
        self.f.seek(self.offset + self.pos)
        data = self.f.read(n)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


def train_class_task(task: tuple) -> dict:
    """Worker: stream one class tar out of the train tar, write its (selected) images.
    ``task = (train_tar, wnid, offset, size, dst, per_class, seed, quality)``."""
    tar_path, wnid, offset, size, dst, per_class, seed, quality = task
    res = _result(0)
    where = f"{Path(tar_path).name}/{wnid}.tar"
    try:
        with open(tar_path, "rb") as raw:
            fobj = io.BufferedReader(_Slice(raw, offset, size), 1 << 18)
            with tarfile.open(fileobj=fobj, mode="r:") as inner:
                keep = None
                if per_class is not None:  # needs all names first (headers only)
                    names = (member_rel(m, where) for m in inner.getmembers())
                    keep = pick(sorted(r for r in names if r and is_image_file(r)),
                                per_class, seed, wnid)
                for m in inner:  # one sequential pass over the class tar
                    rel = member_rel(m, where)
                    if not rel or not is_image_file(rel) or (keep is not None and rel not in keep):
                        continue
                    res["images"] += 1
                    out = Path(dst) / "train" / wnid / out_name(PurePosixPath(rel))
                    if out.exists():
                        res["existing"] += 1
                        continue
                    data = inner.extractfile(m).read()
                    if len(data) != m.size:
                        raise tarfile.ReadError("unexpected end of data")
                    label = f"{where}/{rel}"
                    _convert(data, label, out, quality, res, name=label)
                    if res["write_error"]:
                        break
    except UsageError as e:  # a hostile member
        res["error"] = str(e)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        res["error"] = (f"cannot read {where} in {tar_path}: {type(e).__name__}: {e} "
                        f"(truncated or corrupt archive?)")
    return res


def val_chunk_task(task: tuple) -> dict:
    """Worker: read validation images at their offsets in the val tar and write them.
    ``task = (val_tar, [(name, wnid, offset, size), ...], dst, quality)``."""
    tar_path, items, dst, quality = task
    res = _result(len(items))
    try:
        f = open(tar_path, "rb")
    except OSError as e:
        res["error"] = f"cannot read archive {tar_path}: {e.strerror or e}"
        return res
    with f:
        for name, wnid, off, size in items:
            out = Path(dst) / "val" / wnid / out_name(PurePosixPath(name))
            if out.exists():
                res["existing"] += 1
                continue
            try:
                f.seek(off)
                data = f.read(size)
            except OSError as e:
                res["error"] = f"cannot read archive {tar_path} at {name}: {e.strerror or e}"
                return res
            if len(data) != size:
                res["error"] = (f"archive {tar_path} is truncated at {name} "
                                f"(incomplete download?)")
                return res
            label = f"{Path(tar_path).name}/{name}"
            _convert(data, label, out, quality, res, name=label)
            if res["write_error"]:
                break
    return res
