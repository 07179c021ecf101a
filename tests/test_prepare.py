"""The offline prepare step (resumable, parallel, reports unreadable files) and demo data."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from helpers import run_python
import split_alexnet.data.dataset as D
import split_alexnet.data.stats as DS
from split_alexnet.data.demo import main as demo_main
from split_alexnet.data.demo import make_demo_dataset
from split_alexnet.data.prepare import REPORT, TMP_MARK, prepare
from split_alexnet.data.prepare import main as prepare_main
from split_alexnet.data.prepare_tasks import out_name
from split_alexnet.utils.cli import run
from split_alexnet.utils.fileio import atomic_write


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".npz"}


@pytest.fixture
def src(tmp_path):
    rng = np.random.default_rng(0)
    s = tmp_path / "src"
    for split, n in (("train", 5), ("val", 2)):
        for c in ("cat", "dog"):
            d = s / split / c
            d.mkdir(parents=True)
            for k in range(n):
                w, h = [(500, 375), (300, 400), (120, 90), (256, 256), (640, 480)][k]
                a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                fmt = "PNG" if k == 1 else "JPEG"
                Image.fromarray(a).save(d / f"{c}{k}.{'png' if k == 1 else 'JPEG'}", fmt)
    (s / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    (s / "train" / "dog" / "notes.txt").write_text("ignored: not an image extension")
    return s


def test_prepare_outputs_report_and_resume(src, tmp_path):
    dst = tmp_path / "dst"
    s1 = prepare(src, dst, workers=2, progress=False)
    assert s1["images"] == 15 and s1["unreadable"] == 1 and s1["written"] == 14
    outs = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.*")
                  if p.suffix.lower() in (".jpg", ".jpeg"))
    assert "train/cat/cat1.jpg" in outs and "train/cat/cat0.JPEG" in outs and len(outs) == 14
    for p in dst.rglob("*.JPEG"):
        with Image.open(p) as im:
            assert im.size == (256, 256) and im.format == "JPEG" and im.mode == "RGB"
    report = (dst / REPORT).read_text()
    assert "unreadable: 1" in report and "train/cat/broken.jpg" in report
    before = tree(dst)
    stats1 = np.load(dst / "stats.npz")
    # interrupt: remove some outputs, leave a stray temp file, rerun
    (dst / "train" / "cat" / "cat0.JPEG").unlink()
    (dst / "val" / "dog" / "dog1.jpg").unlink()
    (dst / "train" / "dog" / f".dog2.JPEG{TMP_MARK}12345").write_bytes(b"partial")
    s2 = prepare(src, dst, workers=0, progress=False)
    assert s2["written"] == 2 and s2["existing"] == 12 and s2["unreadable"] == 1
    assert tree(dst) == before  # byte-identical, stray temp gone
    stats2 = np.load(dst / "stats.npz")
    for k in ("mean", "eigval", "eigvec", "classes", "count"):
        np.testing.assert_array_equal(stats1[k], stats2[k])
    # the two rewritten files have new mtimes: the fingerprint notices and stats were redone
    assert str(stats1["fingerprint"]) != str(stats2["fingerprint"])
    st = DS.load_stats(dst, progress=False)
    assert st.classes == ["cat", "dog"] and st.mean.shape == (3, 256, 256)
    # prepared pixels = the on-the-fly pixels up to JPEG re-encoding
    from split_alexnet.data.images import load_rgb256
    a = load_rgb256(src / "train" / "dog" / "dog4.JPEG").astype(int)
    b = load_rgb256(dst / "train" / "dog" / "dog4.JPEG").astype(int)
    assert np.abs(a - b).mean() < 12


def test_prepare_cli_missing_src(tmp_path, capsys):
    """(The command as its own process: test_val_fraction_splits_one_folder_of_classes_
    stratified_and_by_seed.)"""
    rc = run(prepare_main, "split_alexnet.prepare", [str(tmp_path / "missing"),
                                                     str(tmp_path / "out")])
    assert rc == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "missing" in lines[0] and "Traceback" not in lines[0]


def test_prepare_cli_missing_val(tmp_path, capsys):
    (tmp_path / "s" / "train" / "a").mkdir(parents=True)
    rc = run(prepare_main, "split_alexnet.prepare", [str(tmp_path / "s"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "val" in err and len(err.strip().splitlines()) == 1


def single_folder(tmp_path: Path, counts=(10, 7)) -> Path:
    """One folder of class folders (no train/ or val/), small PNGs."""
    rng = np.random.default_rng(1)
    root = tmp_path / "one"
    for c, n in zip(("ant", "bee"), counts):
        (root / c).mkdir(parents=True)
        for k in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(
                root / c / f"{c}{k}.png")
    return root


def test_val_fraction_splits_one_folder_of_classes_stratified_and_by_seed(tmp_path, capsys):
    one = single_folder(tmp_path)
    # Without --val-fraction: prepare and train each say what to do, in one line.
    r = run_python("-m", "split_alexnet.prepare", one, tmp_path / "no", "--workers", "1")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"split_alexnet.prepare: error: {one} holds class folders but no train/ and val/: give "
        "--val-fraction F to split each class into train/ and val/"], r.stderr
    with pytest.raises(Exception, match="split-alexnet-prepare .* --val-fraction 0.1"):
        D.check_dataset_root(one)

    def prepare_cli(*argv) -> tuple[int, str]:
        """The command's main as its console runs it: exit code and stderr."""
        capsys.readouterr()
        rc = run(prepare_main, "split_alexnet.prepare", [str(a) for a in argv])
        return rc, capsys.readouterr().err

    rc, err = prepare_cli(one, tmp_path / "a", "--workers", "1", "--val-fraction", "0.3",
                          "--seed", "4", "--quiet")
    assert rc == 0, err
    a = tmp_path / "a"
    names = {s: {c: sorted(p.name for p in (a / s / c).iterdir()) for c in ("ant", "bee")}
             for s in ("train", "val")}
    assert [len(names["val"][c]) for c in ("ant", "bee")] == [3, 2]  # round(0.3 n) per class
    assert [len(names["train"][c]) for c in ("ant", "bee")] == [7, 5]
    assert not set(names["val"]["ant"]) & set(names["train"]["ant"])
    assert json.loads((a / "subset.json").read_text())["val_fraction"] == 0.3
    assert json.loads((a / "subset.json").read_text())["seed"] == 4
    D.check_dataset_root(a)  # a dataset the trainer takes
    # The same seed gives the same split; another seed another one.
    prepare(one, tmp_path / "b", workers=1, progress=False, stats=False, val_fraction=0.3,
            seed=4)
    prepare(one, tmp_path / "c", workers=1, progress=False, stats=False, val_fraction=0.3,
            seed=5)
    assert tree(tmp_path / "b").keys() == {k for k in tree(a)} - {"stats.npz"}
    assert tree(tmp_path / "c").keys() != tree(tmp_path / "b").keys()
    for bad, words in (("1", "--val-fraction must be between 0 and 1"),
                       ("0", "--val-fraction must be between 0 and 1")):
        rc, err = prepare_cli(one, tmp_path / "d", "--val-fraction", bad)
        assert rc == 2 and words in err, err
    two = tmp_path / "two"  # a source with its own val/ is not split again
    (two / "train" / "a").mkdir(parents=True)
    (two / "val" / "a").mkdir(parents=True)
    rc, err = prepare_cli(two, tmp_path / "e", "--val-fraction", "0.2")
    assert rc == 2 and "with its own validation set" in err, err


def test_demo_data_deterministic(tmp_path):
    a = make_demo_dataset(tmp_path / "a", classes=10, train_per_class=3, val_per_class=1, seed=5)
    b = make_demo_dataset(tmp_path / "b", classes=10, train_per_class=3, val_per_class=1, seed=5)
    c = make_demo_dataset(tmp_path / "c", classes=10, train_per_class=3, val_per_class=1, seed=6)
    ta, tb, tc = tree(a), tree(b), tree(c)
    assert ta == tb and len(ta) == 10 * 4 + 1
    assert ta.keys() == tc.keys() and ta != tc
    assert len(D.find_classes(a / "train")) == 10
    with Image.open(next(a.rglob("*.jpg"))) as im:
        assert im.size == (256, 256) and im.format == "JPEG"


def test_demo_data_cli(tmp_path):
    assert run(demo_main, "split_alexnet.demo_data", [str(tmp_path / "d"), "--classes", "2",
                                                      "--train-per-class", "2",
                                                      "--val-per-class", "1"]) == 0
    assert len(list((tmp_path / "d").rglob("*.jpg"))) == 6
    r = run_python("-m", "split_alexnet.demo_data", str(tmp_path / "d"), "--classes", "99")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_out_name_for_paths_and_archive_members():
    assert out_name(Path("train/a/x.JPEG")) == Path("train/a/x.JPEG")
    assert out_name(Path("train/a/x.png")) == Path("train/a/x.jpg")
    assert out_name(PurePosixPath("sub/y.jpeg")) == PurePosixPath("sub/y.jpeg")
    assert str(out_name(PurePosixPath("sub/z.tar.gif"))) == "sub/z.tar.jpg"


def test_outputs_are_atomic_and_have_plain_file_permissions(src, tmp_path):
    # a temporary file is a hidden sibling whose name ends in TMP_MARK (what a rerun removes)
    seen = []
    atomic_write(tmp_path / "o" / "a.jpg", lambda f: seen.extend(os.listdir(tmp_path / "o")),
                 fsync=False, suffix=TMP_MARK, private=False)
    assert len(seen) == 1 and seen[0].startswith(".a.jpg.") and seen[0].endswith(TMP_MARK)
    assert os.listdir(tmp_path / "o") == ["a.jpg"]
    # everything prepare writes gets the permissions of open(): 0o666 minus the umask
    dst = tmp_path / "dst"
    prepare(src, dst, workers=0, progress=False)
    umask = os.umask(0)
    os.umask(umask)
    files = [dst / REPORT, dst / "classes.json", dst / "subset.json", dst / "stats.npz",
             dst / "train" / "cat" / "cat0.JPEG", dst / "val" / "dog" / "dog1.jpg"]
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == \
        {f.name: 0o666 & ~umask for f in files}
