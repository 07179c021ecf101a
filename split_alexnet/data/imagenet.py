"""ImageNet as users have it: which layout ``SRC`` holds (the official archives, Kaggle's
layout, or class folders), what its archives contain, and its class metadata.

:func:`detect_layout` looks at ``SRC`` and returns a :class:`Source` for one of

* ``"archives"`` - the official files from image-net.org in ``SRC``:
  ``ILSVRC2012_img_train.tar`` (a tar of 1000 per-class tars ``<wnid>.tar``),
  ``ILSVRC2012_img_val.tar`` (50,000 flat ``ILSVRC2012_val_%08d.JPEG``) and
  ``ILSVRC2012_devkit_t12.tar.gz`` (class names and the validation ground truth:
  :func:`parse_devkit` reads its ``data/meta.mat`` with ``scipy.io.loadmat``, scipy being
  the optional dependency ``split_alexnet[imagenet]``). Only the tar headers are read here:
  the :class:`Source` lists where each class tar and each validation image lies
  (``TarInfo.offset_data``), and ``prepare``'s workers stream them from there.
* ``"kaggle"`` - Kaggle's ``SRC/ILSVRC/Data/CLS-LOC/{train/<wnid>/*, val/*}`` with
  ``SRC/LOC_val_solution.csv`` and ``SRC/LOC_synset_mapping.txt``. The same reader handles any
  ``SRC/train/<wnid>/`` + flat ``SRC/val/`` whose labels come from a ``LOC_val_solution.csv``
  or an ``ILSVRC2012_devkit_t12.tar.gz`` lying in ``SRC`` (``"flat-val"``).
* ``"folders"`` - ``SRC/train/<class>/`` and ``SRC/val/<class>/`` (the original prepare).
* ``"classes"`` - one folder of class folders, ``SRC/<class>/``, without train/ and val/:
  prepare splits it with ``--val-fraction`` (``subset.split_val``).

Every layout prepares to the same tree (``DST/{train,val}/<wnid>/<name>``, byte-identical
JPEGs) plus ``DST/classes.json`` (:func:`write_class_metadata`, :func:`read_class_metadata`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from split_alexnet.data.dataset import check_dataset_root, find_classes
from split_alexnet.data.images import is_image_file, report_skipped
from split_alexnet.data.members import member_rel, safe_rel
from split_alexnet.utils.cli import UsageError
from split_alexnet.utils.fileio import write_json

__all__ = ["TRAIN_TAR", "VAL_TAR", "DEVKIT", "KAGGLE_SOLUTION", "KAGGLE_MAPPING", "CLASSES_FILE",
           "Source", "detect_layout", "parse_devkit", "read_kaggle_solution",
           "read_synset_mapping", "read_class_metadata", "write_class_metadata"]

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_META = "ILSVRC2012_devkit_t12/data/meta.mat"
DEVKIT_TRUTH = "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"
KAGGLE_DATA = ("ILSVRC", "Data", "CLS-LOC")
KAGGLE_SOLUTION = "LOC_val_solution.csv"
KAGGLE_MAPPING = "LOC_synset_mapping.txt"
CLASSES_FILE = "classes.json"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG$", re.IGNORECASE)
WNID = re.compile(r"n\d{8}$")


# ----------------------------------------------------------------------------- small helpers

# ----------------------------------------------------------------------------- metadata files

def read_synset_mapping(path: Path) -> dict[str, str]:
    """``LOC_synset_mapping.txt`` / ``synset_words.txt``: ``"<wnid> <name>"`` per line."""
    out: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    for k, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not WNID.match(wnid):
            raise UsageError(f"{path} line {k}: expected '<wnid> <name>', got {line[:60]!r}")
        out[wnid] = name.strip()
    if not out:
        raise UsageError(f"{path} lists no classes")
    return out


def read_kaggle_solution(path: Path) -> dict[str, str]:
    """``LOC_val_solution.csv`` -> {ImageId: wnid} (first token of PredictionString)."""
    path = Path(path)
    out: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"cannot read {path}: {e}") from None
    if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
        raise UsageError(f"{path}: expected the header 'ImageId,PredictionString'")
    for k, row in enumerate(rows[1:], 2):
        if not row or not "".join(row).strip():
            continue
        tokens = row[1].split() if len(row) > 1 else []
        if len(row) < 2 or not tokens or not WNID.match(tokens[0]):
            raise UsageError(f"{path} line {k}: expected 'ImageId,<wnid> ...', got "
                             f"{','.join(row)[:60]!r}")
        img = row[0].strip()
        if img in out:
            raise UsageError(f"{path} line {k}: image {img} is listed twice")
        out[img] = tokens[0]
    if not out:
        raise UsageError(f"{path} has no rows")
    return out


def parse_devkit(path: Path) -> tuple[dict[str, str], list[str]]:
    """``ILSVRC2012_devkit_t12.tar.gz`` -> ({wnid: name} for the 1000 leaf synsets, the wnid of
    each validation image in ILSVRC2012_val order).

    ``data/meta.mat`` (read with ``scipy.io.loadmat``) lists the synsets: the leaves
    (``num_children == 0``) are the classes, ``ILSVRC2012_ID`` -> ``WNID``, ``words``;
    ``data/ILSVRC2012_validation_ground_truth.txt`` holds the ILSVRC2012_ID of validation image
    1, 2, ... The official file's md5 is not checked (the structure and the ground-truth count
    are), so a devkit repacked with the same content works too."""
    path = Path(path)
    try:
        import scipy.io  # optional dependency (split_alexnet[imagenet]): only the devkit needs it
    except ImportError:
        raise UsageError(f"reading {path.name} needs scipy: pip install 'split_alexnet[imagenet]' "
                         f"(or pip install scipy)") from None
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as t:
            for m in t:
                rel = member_rel(m, path)
                if rel in (DEVKIT_META, DEVKIT_TRUTH):
                    files[rel] = t.extractfile(m).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise UsageError(f"cannot read devkit {path}: {type(e).__name__}: {e} "
                         f"(truncated or corrupt download?)") from None
    try:
        missing = [n for n in (DEVKIT_META, DEVKIT_TRUTH) if n not in files]
        if missing:
            raise KeyError(f"no member {missing[0]}")
        synsets = scipy.io.loadmat(io.BytesIO(files[DEVKIT_META]), squeeze_me=True)["synsets"]
        leaves = [s for s in np.atleast_1d(synsets) if int(s["num_children"]) == 0]
        wnid_of = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
        names = {str(s["WNID"]): str(s["words"]) for s in leaves}
        val_wnids = [wnid_of[int(v)] for v in files[DEVKIT_TRUTH].decode("ascii").split()]
    except (KeyError, ValueError, IndexError, TypeError, scipy.io.matlab.MatReadError) as e:
        raise UsageError(f"{path} is not a usable ILSVRC2012 devkit (expected "
                         f"ILSVRC2012_devkit_t12/data/meta.mat and "
                         f"data/ILSVRC2012_validation_ground_truth.txt): "
                         f"{type(e).__name__}: {e}") from None
    return names, val_wnids


def write_class_metadata(dst: Path, wnids: Sequence[str], names: dict[str, str],
                         all_wnids: Sequence[str] | None = None) -> list[dict]:
    """Write ``dst/classes.json``: one row per class in label order (sorted wnids):
    ``{"index", "wnid", "name", "source_index"}`` (``source_index``: position among all
    classes of the source, = ``index`` unless a class subset was taken)."""
    full = {w: i for i, w in enumerate(sorted(all_wnids if all_wnids is not None else wnids))}
    rows = [{"index": i, "wnid": w, "name": names.get(w, w), "source_index": full[w]}
            for i, w in enumerate(sorted(wnids))]
    write_json(Path(dst) / CLASSES_FILE, {"version": 1, "classes": rows}, indent=1,
               sort_keys=True, fsync=False)
    return rows


def read_class_metadata(root: Path) -> list[dict]:
    """The classes of a (prepared) dataset root, in label order: a list of
    ``{"index": int, "wnid": str, "name": str, "source_index": int}``.

    From ``root/classes.json`` (written by ``prepare``); its wnids must be the class folders of
    ``root/train`` (else UsageError). Without the file: the sorted class folders of
    ``root/train``, with the folder name as ``name``."""
    root = Path(root)
    f = root / CLASSES_FILE
    folders = None
    if (root / "train").is_dir():
        folders = sorted(e.name for e in os.scandir(root / "train")
                         if e.is_dir() and not e.name.startswith("."))
    if not f.is_file():
        if not folders:
            raise UsageError(f"no {CLASSES_FILE} and no class folders in {root / 'train'}")
        return [{"index": i, "wnid": w, "name": w, "source_index": i}
                for i, w in enumerate(folders)]
    try:
        rows = json.loads(f.read_text(encoding="utf-8"))["classes"]
        rows = [{"index": int(r["index"]), "wnid": str(r["wnid"]), "name": str(r["name"]),
                 "source_index": int(r.get("source_index", r["index"]))} for r in rows]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"cannot read {f}: {type(e).__name__}: {e}") from None
    if [r["index"] for r in rows] != list(range(len(rows))):
        raise UsageError(f"{f}: indices are not 0..{len(rows) - 1} in order")
    if folders is not None and [r["wnid"] for r in rows] != folders:
        raise UsageError(f"{f} does not match the class folders of {root / 'train'} "
                         f"({len(rows)} vs {len(folders)} classes): prepared with another "
                         f"subset?")
    return rows


# ----------------------------------------------------------------------------- layouts

@dataclass
class Source:
    """What :func:`detect_layout` found. ``wnids``: all classes (sorted); ``names``: wnid ->
    human-readable name. Layout-specific: ``train_tar``/``val_tar``/``train_members``
    (wnid -> (offset_data, size) of its class tar)/``val_members`` ((name, wnid, offset_data,
    size)) for archives; ``train_dir``/``val_files`` ((path, wnid)) for kaggle/flat-val."""

    layout: str
    root: Path
    description: str
    wnids: list[str]
    names: dict[str, str]
    train_tar: Path | None = None
    val_tar: Path | None = None
    train_members: dict[str, tuple[int, int]] = field(default_factory=dict)
    val_members: list[tuple[str, str, int, int]] = field(default_factory=list)
    train_dir: Path | None = None
    val_files: list[tuple[Path, str]] = field(default_factory=list)


def _has_class_folders(d: Path) -> bool:
    return d.is_dir() and any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(d))


def _flat_images(d: Path, report: bool = False) -> list[Path]:
    """The image files directly in ``d``: regular files only (after resolving symlinks);
    ``report``: count the others in one line (:func:`report_skipped`)."""
    files, special = [], []
    for e in os.scandir(d):
        if is_image_file(e.name) and not e.name.startswith(".") and not e.is_dir():
            (files if e.is_file() else special).append(Path(e.path))
    if report:
        report_skipped(d, special)
    return sorted(files, key=lambda p: p.name)


def detect_layout(src: Path) -> Source:
    """Recognise SRC's layout (see the module docstring) and read its class metadata and
    validation labels. UsageError (one line) for anything missing or inconsistent."""
    src = Path(src)
    if not src.is_dir():
        raise UsageError(f"source folder not found: {src}")
    official = [n for n in (TRAIN_TAR, VAL_TAR, DEVKIT) if (src / n).exists()]
    if TRAIN_TAR in official or VAL_TAR in official:
        missing = [n for n in (TRAIN_TAR, VAL_TAR, DEVKIT) if n not in official]
        if missing:
            raise UsageError(f"official ImageNet archives in {src}: missing {', '.join(missing)} "
                             f"(need {TRAIN_TAR}, {VAL_TAR} and {DEVKIT})")
        return _archives(src)
    kaggle = src.joinpath(*KAGGLE_DATA)
    if kaggle.is_dir():
        for n in (KAGGLE_SOLUTION, KAGGLE_MAPPING):
            if not (src / n).is_file():
                raise UsageError(f"Kaggle layout ({kaggle}) but {n} is missing from {src}")
        return _flat_val(src, kaggle / "train", kaggle / "val", src / KAGGLE_SOLUTION,
                         src / KAGGLE_MAPPING, layout="kaggle")
    if (src / "val").is_dir() and not _has_class_folders(src / "val") \
            and _flat_images(src / "val"):
        labels = [p for p in (src / KAGGLE_SOLUTION, src / DEVKIT) if p.is_file()]
        if not labels:
            raise UsageError(f"{src / 'val'} holds images but no class folders: put "
                             f"{KAGGLE_SOLUTION} or {DEVKIT} into {src} to sort them")
        mapping = src / KAGGLE_MAPPING
        return _flat_val(src, src / "train", src / "val", labels[0],
                         mapping if mapping.is_file() else None, layout="flat-val")
    if not (src / "train").is_dir() and not (src / "val").is_dir() and _has_class_folders(src):
        wnids = find_classes(src)
        return Source("classes", src, f"one folder of class folders ({src}/<class>)", wnids,
                      {w: w for w in wnids}, train_dir=src)
    return _folders(src)


def _folders(src: Path) -> Source:
    check_dataset_root(src)
    wnids = find_classes(src / "train")
    names: dict[str, str] = {}
    for cand in (src / KAGGLE_MAPPING, src / "synset_words.txt"):
        if cand.is_file():
            names = read_synset_mapping(cand)
            break
    else:
        if (src / CLASSES_FILE).is_file():
            try:
                names = {r["wnid"]: r["name"] for r in read_class_metadata(src)}
            except UsageError:
                names = {}
    return Source("folders", src, f"class folders ({src}/train/<class>, {src}/val/<class>)",
                  wnids, {w: names.get(w, w) for w in wnids})


def _flat_val(src: Path, train: Path, val: Path, labels: Path, mapping: Path | None,
              layout: str) -> Source:
    wnids = find_classes(train)
    if not val.is_dir():
        raise UsageError(f"validation folder not found: {val}")
    if labels.name == DEVKIT:
        names, val_wnids = parse_devkit(labels)
        files = _flat_images(val, report=True)
        by_idx = _val_index(files, lambda p: p.name, val_wnids, labels, val)
        val_files = [(p, by_idx[p.name]) for p in files]
    else:
        names = read_synset_mapping(mapping) if mapping is not None else {}
        sol = read_kaggle_solution(labels)
        files = _flat_images(val, report=True)
        have = {p.stem: p for p in files}
        unknown = sorted(set(sol) - set(have))
        if unknown:
            raise UsageError(f"{labels} names {len(unknown)} images that are not in {val}: "
                             f"{', '.join(unknown[:3])}" + (" ..." if len(unknown) > 3 else ""))
        unlabeled = sorted(set(have) - set(sol))
        if unlabeled:
            raise UsageError(f"{len(unlabeled)} images in {val} have no row in {labels}: "
                             f"{', '.join(unlabeled[:3])}" + (" ..." if len(unlabeled) > 3 else ""))
        val_files = [(have[i], sol[i]) for i in sorted(sol)]
    if names:
        unknown = sorted(set(wnids) - set(names))
        if unknown:
            raise UsageError(f"class folders of {train} not in the class list "
                             f"({mapping or labels}): {', '.join(unknown[:5])}")
    bad = sorted({w for _, w in val_files} - set(wnids))
    if bad:
        raise UsageError(f"{labels} labels validation images with wnids that have no training "
                         f"folder in {train}: {', '.join(bad[:5])}"
                         + (" ..." if len(bad) > 5 else ""))
    what = ("Kaggle ImageNet (ILSVRC/Data/CLS-LOC, LOC_val_solution.csv, LOC_synset_mapping.txt)"
            if layout == "kaggle" else f"train folders + flat val folder labelled by {labels.name}")
    return Source(layout, src, f"{what} in {src}", wnids, {w: names.get(w, w) for w in wnids},
                  train_dir=train, val_files=val_files)


def _val_index(items, name_of, val_wnids: list[str], devkit: Path, where) -> dict[str, str]:
    """{name: wnid} for ILSVRC2012_val_%08d names, checked against the devkit ground truth."""
    out = {}
    if len(items) != len(val_wnids):
        raise UsageError(f"devkit {devkit.name} has {len(val_wnids)} validation labels but "
                         f"{where} holds {len(items)} images: devkit and validation images do "
                         f"not match")
    for it in items:
        name = name_of(it)
        m = VAL_NAME.search(name)
        if not m or not 1 <= int(m.group(1)) <= len(val_wnids):
            raise UsageError(f"{where}: {name} is not an ILSVRC2012_val_<1..{len(val_wnids)}>"
                             f".JPEG name, so the devkit ground truth cannot label it")
        out[name] = val_wnids[int(m.group(1)) - 1]
    return out


def _list_tar(path: Path) -> list[tarfile.TarInfo]:
    """The regular-file members of an uncompressed tar (headers only; data is seeked over),
    checked to be complete and safe (:func:`member_rel`). UsageError naming ``path`` for a
    truncated, corrupt or hostile archive."""
    size = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as t:
            members = t.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UsageError(f"cannot read archive {path}: {type(e).__name__}: {e} "
                         f"(truncated or corrupt download?)") from None
    for m in members:
        member_rel(m, path)
        if m.isfile() and m.offset_data + m.size > size:
            raise UsageError(f"archive {path} is truncated: member {m.name} needs bytes up to "
                             f"{m.offset_data + m.size} but the file has {size} "
                             f"(incomplete download?)")
    return [m for m in members if m.isfile()]


def _archives(src: Path) -> Source:
    names, val_wnids = parse_devkit(src / DEVKIT)
    wnids = sorted(names)
    train_tar, val_tar = src / TRAIN_TAR, src / VAL_TAR
    train_members: dict[str, tuple[int, int]] = {}
    for m in _list_tar(train_tar):
        rel = safe_rel(m.name)
        w = PurePosixPath(rel).name[:-4] if rel and rel.endswith(".tar") else None
        if w not in names:
            raise UsageError(f"{train_tar}: unexpected member {m.name} (expected <wnid>.tar for "
                             f"the devkit's classes)")
        train_members[w] = (m.offset_data, m.size)
    missing = sorted(set(wnids) - set(train_members))
    if missing:
        raise UsageError(f"{train_tar} has {len(train_members)} class archives but the devkit "
                         f"lists {len(wnids)} classes (missing {', '.join(missing[:3])}"
                         + (" ..." if len(missing) > 3 else "") + "): truncated download?")
    vmem = [m for m in _list_tar(val_tar) if is_image_file(m.name)]
    by_name = _val_index(vmem, lambda m: m.name, val_wnids, src / DEVKIT, val_tar)
    val_members = sorted(((PurePosixPath(m.name).name, by_name[m.name], m.offset_data, m.size)
                          for m in vmem), key=lambda r: r[0])
    return Source("archives", src, f"official ImageNet archives ({TRAIN_TAR}, {VAL_TAR}, "
                  f"{DEVKIT}) in {src}", wnids, names, train_tar=train_tar, val_tar=val_tar,
                  train_members=train_members, val_members=val_members)
