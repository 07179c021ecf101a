"""ImageNet layouts: official archives (streamed), Kaggle, flat val, class folders -> one tree.

Tiny fakes of each layout are built from the same source images (3 classes x 3 train, 4 val):
real tar files with the official names and nesting, a devkit .tar.gz whose data/meta.mat is
written with scipy.io.savemat in the structure of the official one (read back with
scipy.io.loadmat by imagenet.parse_devkit), and Kaggle's CSV and mapping.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import split_alexnet.data.imagenet as inet
from helpers import run_main
from split_alexnet.utils.cli import UsageError
from split_alexnet.data.prepare import TMP_MARK, prepare
from split_alexnet.data.prepare import main as prepare_main
from split_alexnet.data.subset import SUBSET_FILE

NAMES = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
         "n01484850": "great white shark, white shark, man-eater"}
WNIDS = sorted(NAMES)
ILSVRC_ID = {"n01484850": 1, "n01440764": 2, "n01443537": 3}  # devkit order != sorted order
VAL_LABELS = ["n01443537", "n01440764", "n01484850", "n01443537"]  # ILSVRC2012_val_1..4


def _have_scipy() -> bool:
    try:
        import scipy.io  # noqa: F401
        return True
    except ImportError:
        return False


needs_scipy = pytest.mark.skipif(not _have_scipy(),
                                 reason="scipy not installed (pip install scipy): the devkit's "
                                        "meta.mat cannot be written or read")


def jpeg_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix.lower() == ".jpeg"}


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w") as t:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return b.getvalue()


def _meta_mat() -> bytes:
    import scipy.io as sio
    fields = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
              "wordnet_height", "num_train_images")
    rows = [(ILSVRC_ID[w], w, NAMES[w], "a fish", 0, np.zeros((0,)), 0, 3) for w in WNIDS]
    rows.append((4, "n00000001", "fish", "a non-leaf synset", 3, np.array([1.0, 2.0, 3.0]), 1,
                 0))
    arr = np.zeros((len(rows), 1), dtype=[(f, "O") for f in fields])
    for i, r in enumerate(rows):
        for f, v in zip(fields, r):
            arr[i, 0][f] = v
    b = io.BytesIO()
    sio.savemat(b, {"synsets": arr})
    return b.getvalue()


def make_devkit(path: Path, labels=VAL_LABELS) -> None:
    gt = "".join(f"{ILSVRC_ID[w]}\n" for w in labels).encode()
    with tarfile.open(path, "w:gz") as t:
        for name, data in (("ILSVRC2012_devkit_t12/data/meta.mat", _meta_mat()),
                           ("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
                            gt)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))


@pytest.fixture(scope="module")
def images():
    """{("train", wnid, name) or ("val", wnid, name): encoded bytes} - the source images."""
    rng = np.random.default_rng(0)
    out = {}
    sizes = [(160, 120), (120, 200), (300, 260)]
    for w in WNIDS:
        for k in range(3):
            wd, ht = sizes[k]
            a = rng.integers(0, 256, (ht, wd, 3), dtype=np.uint8)
            b = io.BytesIO()
            # ImageNet has a PNG named .JPEG: Pillow reads by content
            Image.fromarray(a).save(b, "PNG" if (w, k) == (WNIDS[1], 2) else "JPEG", quality=90)
            out[("train", w, f"{w}_{k + 1}.JPEG")] = b.getvalue()
    for i, w in enumerate(VAL_LABELS, 1):
        a = rng.integers(0, 256, (100 + 10 * i, 140, 3), dtype=np.uint8)
        b = io.BytesIO()
        Image.fromarray(a).save(b, "JPEG", quality=90)
        out[("val", w, f"ILSVRC2012_val_{i:08d}.JPEG")] = b.getvalue()
    return out


def _write(p: Path, data: bytes) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def make_folders(root: Path, images) -> Path:
    for (split, w, name), data in images.items():
        _write(root / split / w / name, data)
    return root


def make_archives(root: Path, images, labels=VAL_LABELS) -> Path:
    root.mkdir(parents=True)
    inner = {f"{w}.tar": _tar_bytes({n: d for (s, ww, n), d in images.items()
                                     if s == "train" and ww == w}) for w in WNIDS}
    (root / inet.TRAIN_TAR).write_bytes(_tar_bytes(inner))
    (root / inet.VAL_TAR).write_bytes(_tar_bytes({n: d for (s, _, n), d in images.items()
                                                  if s == "val"}))
    make_devkit(root / inet.DEVKIT, labels)
    return root


def make_kaggle(root: Path, images) -> Path:
    base = root.joinpath(*inet.KAGGLE_DATA)
    rows = ["ImageId,PredictionString"]
    for (split, w, name), data in images.items():
        if split == "train":
            _write(base / "train" / w / name, data)
        else:
            _write(base / "val" / name, data)
            rows.append(f"{name[:-5]},{w} 10 20 30 40 {w} 1 2 3 4")
    (root / inet.KAGGLE_SOLUTION).write_text("\n".join(rows) + "\n")
    (root / inet.KAGGLE_MAPPING).write_text("".join(f"{w} {NAMES[w]}\n" for w in WNIDS))
    return root


@pytest.fixture(scope="module")
def reference(images, module_tmp):
    """The foldered copy, prepared: (dst, jpeg tree)."""
    base = module_tmp("ref")
    dst = base / "dst"
    prepare(make_folders(base / "src", images), dst, workers=0, progress=False)
    return dst, jpeg_tree(dst)


def test_reference_tree(reference):
    dst, ref = reference
    assert len(ref) == 13
    for (i, w) in enumerate(VAL_LABELS, 1):  # val images land in their classes
        assert f"val/{w}/ILSVRC2012_val_{i:08d}.JPEG" in ref
    with Image.open(dst / "train" / WNIDS[0] / f"{WNIDS[0]}_1.JPEG") as im:
        assert im.size == (256, 256)
    # no names for a plain foldered copy: the folder name stands in
    assert [r["wnid"] for r in inet.read_class_metadata(dst)] == WNIDS


@needs_scipy
def test_archives_stream_to_the_same_tree(images, reference, tmp_path, capsys):
    src = make_archives(tmp_path / "src", images)
    dst = tmp_path / "dst"
    s = prepare(src, dst, workers=2, progress=False, stats=False)  # workers: streamed in a pool
    err = capsys.readouterr().err
    assert "found official ImageNet archives" in err
    assert s["layout"] == "archives" and s["images"] == 13 and s["written"] == 13
    assert jpeg_tree(dst) == reference[1]  # same names, byte-identical JPEGs
    meta = inet.read_class_metadata(dst)
    assert meta == [{"index": i, "wnid": w, "name": NAMES[w], "source_index": i}
                    for i, w in enumerate(WNIDS)]


def test_kaggle_to_the_same_tree(images, reference, tmp_path, capsys):
    src = make_kaggle(tmp_path / "src", images)
    dst = tmp_path / "dst"
    s = prepare(src, dst, workers=0, progress=False)
    assert "found Kaggle ImageNet" in capsys.readouterr().err and s["layout"] == "kaggle"
    assert jpeg_tree(dst) == reference[1]
    a, b = np.load(dst / "stats.npz"), np.load(reference[0] / "stats.npz")
    for k in ("mean", "eigval", "eigvec", "count", "classes"):
        np.testing.assert_array_equal(a[k], b[k])
    assert str(a["layout"]) == "kaggle" and json.loads(str(a["subset"]))["classes"] is None
    assert [r["name"] for r in inet.read_class_metadata(dst)] == [NAMES[w] for w in WNIDS]


@needs_scipy
def test_flat_val_with_devkit_or_csv(images, reference, tmp_path):
    src = make_folders(tmp_path / "src", {k: v for k, v in images.items() if k[0] == "train"})
    for (split, _, name), data in images.items():
        if split == "val":
            _write(src / "val" / name, data)
    make_devkit(src / inet.DEVKIT)
    s = prepare(src, tmp_path / "d1", workers=0, progress=False, stats=False)
    assert s["layout"] == "flat-val" and jpeg_tree(tmp_path / "d1") == reference[1]
    (src / inet.DEVKIT).unlink()
    with pytest.raises(UsageError, match="no class folders"):
        prepare(src, tmp_path / "d2", workers=0, progress=False, stats=False)
    k = make_kaggle(tmp_path / "k", images)
    os.replace(k / inet.KAGGLE_SOLUTION, src / inet.KAGGLE_SOLUTION)
    prepare(src, tmp_path / "d2", workers=0, progress=False, stats=False)
    assert jpeg_tree(tmp_path / "d2") == reference[1]


@needs_scipy
def test_subsets_deterministic_and_recorded(images, tmp_path):
    arch = make_archives(tmp_path / "a", images)
    kag = make_kaggle(tmp_path / "k", images)
    kw = dict(workers=0, progress=False, stats=False, classes=2, per_class=2, seed=7)
    prepare(arch, tmp_path / "d1", **kw)
    prepare(arch, tmp_path / "d2", **kw)
    prepare(kag, tmp_path / "d3", **kw)
    t1 = jpeg_tree(tmp_path / "d1")
    assert t1 == jpeg_tree(tmp_path / "d2") == jpeg_tree(tmp_path / "d3")
    assert sorted({k.split("/")[1] for k in t1}) == WNIDS[:2]
    assert sum(k.startswith("train/") for k in t1) == 4
    assert sum(k.startswith("val/") for k in t1) == 3  # all val images of the 2 classes
    rec = json.loads((tmp_path / "d1" / SUBSET_FILE).read_text())
    assert rec == {"classes": 2, "wnids": WNIDS[:2], "per_class": 2, "val_per_class": None,
                   "seed": 7}
    meta = inet.read_class_metadata(tmp_path / "d1")
    assert [(r["index"], r["source_index"]) for r in meta] == [(0, 0), (1, 1)]
    # a smaller M is contained in a larger one; another seed may pick others
    prepare(arch, tmp_path / "d4", **{**kw, "per_class": 1})
    assert set(jpeg_tree(tmp_path / "d4")) <= set(t1)
    # a list file of wnids; the last class alone
    lst = tmp_path / "wnids.txt"
    lst.write_text(f"# one class\n{WNIDS[2]}\n")
    prepare(arch, tmp_path / "d5", workers=0, progress=False, stats=False, classes=str(lst),
            val_per_class=1)
    t5 = jpeg_tree(tmp_path / "d5")
    assert {k.split("/")[1] for k in t5} == {WNIDS[2]} and len(t5) == 4
    meta = inet.read_class_metadata(tmp_path / "d5")
    assert meta == [{"index": 0, "wnid": WNIDS[2], "name": NAMES[WNIDS[2]], "source_index": 2}]
    # the same DST with another subset is refused
    with pytest.raises(UsageError, match="another subset"):
        prepare(arch, tmp_path / "d1", **{**kw, "seed": 8})
    with pytest.raises(UsageError, match="--classes"):
        prepare(arch, tmp_path / "d6", workers=0, progress=False, classes=4)


@needs_scipy
def test_archives_resume_after_interruption(images, tmp_path):
    src = make_archives(tmp_path / "src", images)
    dst = tmp_path / "dst"
    prepare(src, dst, workers=0, progress=False, stats=False)
    before = jpeg_tree(dst)
    (dst / "train" / WNIDS[0] / f"{WNIDS[0]}_2.JPEG").unlink()
    (dst / "val" / VAL_LABELS[0] / "ILSVRC2012_val_00000001.JPEG").unlink()
    (dst / "train" / WNIDS[1] / f".x.JPEG{TMP_MARK}999").write_bytes(b"partial")
    s = prepare(src, dst, workers=0, progress=False, stats=False)
    assert s["written"] == 2 and s["existing"] == 11
    assert jpeg_tree(dst) == before
    assert not list(dst.rglob(f"*{TMP_MARK}*"))


@needs_scipy
def test_truncated_train_tar_cli(images, tmp_path, capsys):
    """(The command's main as its console runs it; its own process: tests/test_prepare.py.)"""
    src = make_archives(tmp_path / "src", images)
    p = src / inet.TRAIN_TAR
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    rc, _, err = run_main(prepare_main, "split_alexnet.prepare", [src, tmp_path / "dst",
                                                                  "--quiet"], capsys)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and inet.TRAIN_TAR in lines[0] and "truncated" in lines[0]


@needs_scipy
def test_archive_errors(images, tmp_path):
    src = make_archives(tmp_path / "src", images)
    kw = dict(workers=0, progress=False, stats=False)
    # truncated val tar, in the middle of an image
    v = src / inet.VAL_TAR
    full = v.read_bytes()
    v.write_bytes(full[:1500])
    with pytest.raises(UsageError, match=inet.VAL_TAR):
        prepare(src, tmp_path / "d", **kw)
    v.write_bytes(full)
    # a class tar cut short inside an intact train tar: named when streaming reaches it
    t = src / inet.TRAIN_TAR
    good_train = t.read_bytes()
    inner = {f"{w}.tar": _tar_bytes({n: d for (s, ww, n), d in images.items()
                                     if s == "train" and ww == w}) for w in WNIDS}
    inner[f"{WNIDS[1]}.tar"] = inner[f"{WNIDS[1]}.tar"][:3000]
    t.write_bytes(_tar_bytes(inner))
    with pytest.raises(UsageError, match=f"{WNIDS[1]}.tar in .*{inet.TRAIN_TAR}.*truncated"):
        prepare(src, tmp_path / "d", **kw)
    t.write_bytes(good_train)
    # devkit that does not match the val archive
    make_devkit(src / inet.DEVKIT, VAL_LABELS + VAL_LABELS[:1])
    with pytest.raises(UsageError, match="5 validation labels.*4 images.*do not match"):
        prepare(src, tmp_path / "d", **kw)
    # truncated devkit
    dk = src / inet.DEVKIT
    dk.write_bytes(dk.read_bytes()[:200])
    with pytest.raises(UsageError, match="devkit"):
        prepare(src, tmp_path / "d", **kw)
    # missing archive
    dk.unlink()
    with pytest.raises(UsageError, match=f"missing {inet.DEVKIT}"):
        prepare(src, tmp_path / "d", **kw)


def test_devkit_without_scipy(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # import scipy.io -> ImportError
    (tmp_path / inet.DEVKIT).write_bytes(b"")
    with pytest.raises(UsageError, match="pip install scipy") as e:
        inet.parse_devkit(tmp_path / inet.DEVKIT)
    assert "pip install 'split_alexnet[imagenet]'" in str(e.value)


@needs_scipy
def test_parse_devkit_reads_leaf_synsets_and_ground_truth(tmp_path):
    make_devkit(tmp_path / inet.DEVKIT)
    names, val_wnids = inet.parse_devkit(tmp_path / inet.DEVKIT)
    assert names == NAMES  # the leaves only: the non-leaf synset n00000001 is left out
    assert val_wnids == VAL_LABELS
    # a devkit without data/meta.mat is named as not usable
    with tarfile.open(tmp_path / "other.tar.gz", "w:gz") as t:
        data = b"1\n"
        ti = tarfile.TarInfo("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt")
        ti.size = len(data)
        t.addfile(ti, io.BytesIO(data))
    with pytest.raises(UsageError, match="not a usable ILSVRC2012 devkit.*meta.mat"):
        inet.parse_devkit(tmp_path / "other.tar.gz")


def test_kaggle_errors(images, tmp_path):
    src = make_kaggle(tmp_path / "src", images)
    sol = src / inet.KAGGLE_SOLUTION
    good = sol.read_text()
    kw = dict(workers=0, progress=False, stats=False)
    sol.write_text(good + "ILSVRC2012_val_00000099,n01440764 1 2 3 4\n")
    with pytest.raises(UsageError, match="not in .*ILSVRC2012_val_00000099"):
        prepare(src, tmp_path / "d", **kw)
    sol.write_text(good.replace(f"{VAL_LABELS[2]} 10", "n09999999 10"))
    with pytest.raises(UsageError, match="n09999999"):
        prepare(src, tmp_path / "d", **kw)
    sol.write_text("\n".join(good.splitlines()[:-1]) + "\n")
    with pytest.raises(UsageError, match="no row in"):
        prepare(src, tmp_path / "d", **kw)
    sol.unlink()
    with pytest.raises(UsageError, match=inet.KAGGLE_SOLUTION):
        prepare(src, tmp_path / "d", **kw)


def test_read_class_metadata_checks_folders(demo_root, tmp_path):
    meta = inet.read_class_metadata(demo_root)  # no classes.json: folder names
    assert [r["index"] for r in meta] == [0, 1, 2, 3] and meta[0]["name"] == meta[0]["wnid"]
    root = tmp_path / "r"
    for w in WNIDS:
        (root / "train" / w).mkdir(parents=True)
    inet.write_class_metadata(root, WNIDS[:2], NAMES)
    with pytest.raises(UsageError, match="does not match"):
        inet.read_class_metadata(root)


# ----------------------------------------------------------------------------- hostile archives

def _member(name: str, kind: str = "file", data: bytes = b"payload\n",
            link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    ti = tarfile.TarInfo(name)
    ti.type = {"file": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
               "chardev": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
    if kind == "file":
        ti.size = len(data)
        return ti, data
    ti.linkname = link
    ti.devmajor, ti.devminor = (1, 5) if kind == "chardev" else (0, 0)
    return ti, None


def _write_tar(path: Path, members, mode: str = "w") -> None:
    with tarfile.open(path, mode) as t:
        for ti, data in members:
            t.addfile(ti, io.BytesIO(data) if data is not None else None)


def _regular_members(path: Path) -> list:
    with tarfile.open(path) as t:
        return [(m, t.extractfile(m).read()) for m in t.getmembers()]


def _snapshot(root: Path, skip: Path) -> set[str]:
    """Every path under ``root`` (links not followed), except those under ``skip``."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        out.update(os.path.join(dirpath, n) for n in dirnames + filenames)
    return out


def _hostile_cases(tmp_path: Path) -> dict[str, tuple]:
    """name -> (member name, kind, link target): what no ImageNet archive holds."""
    return {"dotdot": ("../../escaped.txt", "file", ""),
            "absolute": (str(tmp_path / "outside" / "abs.txt"), "file", ""),
            "symlink": ("ILSVRC2012_devkit_t12/data/link", "symlink", "/etc/passwd"),
            "hardlink": ("ILSVRC2012_devkit_t12/data/hard", "hardlink",
                         "ILSVRC2012_devkit_t12/data/meta.mat"),
            "chardev": ("ILSVRC2012_devkit_t12/data/dev", "chardev", ""),
            "fifo": ("ILSVRC2012_devkit_t12/data/fifo", "fifo", "")}


def _check_refused(src: Path, dst: Path, name: str, archive: str, tmp_path: Path) -> None:
    before = _snapshot(tmp_path, dst)
    with pytest.raises(UsageError) as e:
        prepare(src, dst, workers=0, progress=False, stats=False)
    msg = str(e.value)
    assert msg.startswith(f"unsafe member {name!r} in ") and archive in msg and "\n" not in msg
    assert _snapshot(tmp_path, dst) == before  # nothing written outside DST
    assert not (tmp_path / "outside").exists() and not (tmp_path / "escaped.txt").exists()


@needs_scipy
@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "hardlink", "chardev", "fifo"])
def test_hostile_devkit_member_is_refused_and_nothing_escapes(images, tmp_path, case):
    src = make_archives(tmp_path / "src", images)
    name, kind, link = _hostile_cases(tmp_path)[case]
    members = _regular_members(src / inet.DEVKIT)
    _write_tar(src / inet.DEVKIT, [_member(name, kind, link=link)] + members, "w:gz")
    dst = tmp_path / "dst"
    _check_refused(src, dst, name, inet.DEVKIT, tmp_path)
    assert not dst.exists()  # refused before anything is written


@needs_scipy
@pytest.mark.parametrize("case", ["dotdot", "symlink"])
def test_hostile_val_member_is_refused(images, tmp_path, case):
    src = make_archives(tmp_path / "src", images)
    members = _regular_members(src / inet.VAL_TAR)
    if case == "dotdot":  # a name that still says ILSVRC2012_val_00000001.JPEG at its end
        members[0][0].name = "../../ILSVRC2012_val_00000001.JPEG"
        name = members[0][0].name
    else:
        name = "ILSVRC2012_val_00000009.JPEG"
        members.append(_member(name, "symlink", link="/etc/passwd"))
    _write_tar(src / inet.VAL_TAR, members)
    _check_refused(src, tmp_path / "dst", name, inet.VAL_TAR, tmp_path)


@needs_scipy
@pytest.mark.parametrize("case", ["inner-dotdot", "inner-absolute", "inner-symlink",
                                  "outer-symlink"])
def test_hostile_train_member_is_refused(images, tmp_path, case):
    src = make_archives(tmp_path / "src", images)
    inner = {w: [_member(n, data=d) for (s, ww, n), d in images.items()
                 if s == "train" and ww == w] for w in WNIDS}
    outer_extra = []
    name = {"inner-dotdot": "../../../escaped.JPEG",
            "inner-absolute": str(tmp_path / "outside" / "abs.JPEG"),
            "inner-symlink": "x.JPEG", "outer-symlink": "n09999999.tar"}[case]
    if case == "outer-symlink":
        outer_extra.append(_member(name, "symlink", link="/etc/passwd"))
    else:
        inner[WNIDS[1]].append(_member(name, "symlink" if case == "inner-symlink" else "file",
                                       link="/etc/passwd"))
    outer = []
    for w in WNIDS:
        b = io.BytesIO()
        with tarfile.open(fileobj=b, mode="w") as t:
            for ti, data in inner[w]:
                t.addfile(ti, io.BytesIO(data) if data is not None else None)
        outer.append(_member(f"{w}.tar", data=b.getvalue()))
    _write_tar(src / inet.TRAIN_TAR, outer + outer_extra)
    where = inet.TRAIN_TAR if case == "outer-symlink" else f"{WNIDS[1]}.tar"
    _check_refused(src, tmp_path / "dst", name, where, tmp_path)


@needs_scipy
def test_hostile_archive_cli_is_one_line_exit_2(images, tmp_path, capsys):
    src = make_archives(tmp_path / "src", images)
    members = _regular_members(src / inet.DEVKIT)
    _write_tar(src / inet.DEVKIT, members + [_member("../../escaped.txt")], "w:gz")
    rc, _, err = run_main(prepare_main, "split_alexnet.prepare", [src, tmp_path / "dst",
                                                                  "--quiet"], capsys)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert lines == [f"split_alexnet.prepare: error: unsafe member '../../escaped.txt' in "
                     f"{src / inet.DEVKIT}: a '..' component; refused (nothing is extracted "
                     f"from it)"]
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "dst").exists()
