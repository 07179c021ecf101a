"""Every input is checked before it is used, and read within bounds (docs/reliability.md,
"Inputs are checked and bounded"): the fields of DATA/stats.npz, the size of an image file
before it is read, a --config file's kind and size and the paths it gives, folders that
cannot be scanned; predict opens the checkpoint first, streams its images and prints names
with their control characters escaped.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from helpers import CPU_PAIR, PROGRAMS, run_main, run_python, train
from split_alexnet.data.dataset import list_samples
from split_alexnet.data.stats import load_stats
from split_alexnet.tools.predict import main as predict_main
from split_alexnet.training.command import main as train_main
from split_alexnet.utils.checkpoint_file import load_checkpoint, save_checkpoint
from split_alexnet.utils.cli import run


def one_error(capsys) -> str:
    """The one line the last run printed on stderr (asserting it was one line)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# ----------------------------------------------------------------------------- stats.npz


def _inflating_mean(path, arrays) -> None:
    """``arrays`` as a .npz whose mean is 1 GiB of zeros, deflated to about 1 MB."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, a in arrays.items():
            if name != "mean":
                with z.open(f"{name}.npy", "w") as f:
                    np.lib.format.write_array(f, np.asanyarray(a))
        with z.open("mean.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f4", "fortran_order": False, "shape": (4, 8192, 8192)})
            chunk = bytes(1 << 20)
            for _ in range(1024):
                f.write(chunk)


@pytest.mark.parametrize("case, words", [
    ("small mean", "field mean is of shape (3, 8, 8), not (3, 256, 256)"),
    ("nan mean", "field mean is not finite (NaN or infinity)"),
    ("mean above 255", "field mean is outside 0-255"),
    ("text eigval", "field eigval is of dtype <U3"),
    ("no eigvec", "field eigvec is missing"),
    ("1 GiB mean", "field mean declares 1,073,741,952 bytes"),
])
def test_a_stats_file_with_a_bad_field_is_one_line_naming_it(demo_root, tmp_path, capsys, case,
                                                             words):
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    load_stats(data, progress=False)  # the real file, with the data's fingerprint
    with np.load(data / "stats.npz") as z:
        arrays = {k: z[k] for k in z.files}
    if case == "1 GiB mean":
        _inflating_mean(data / "stats.npz", arrays)
        assert (data / "stats.npz").stat().st_size < 2 << 20
    else:
        if case == "small mean":
            arrays["mean"] = arrays["mean"][:, :8, :8]
        elif case == "nan mean":
            arrays["mean"][1, 2, 3] = np.nan
        elif case == "mean above 255":
            arrays["mean"][0, 0, 0] = 300
        elif case == "text eigval":
            arrays["eigval"] = np.array(["abc"] * 3)
        else:
            del arrays["eigvec"]
        np.savez(data / "stats.npz", **arrays)
    capsys.readouterr()
    assert train(data, tmp_path / "run", *CPU_PAIR, "--max-steps", "1") == 2
    line = one_error(capsys)
    assert f"statistics file {data / 'stats.npz'}: {words}" in line, line


# ----------------------------------------------------------------------------- bounded reads


def test_an_image_file_larger_than_any_allowed_image_is_refused_unread(tmp_path):
    big = tmp_path / "huge.jpg"  # a JPEG's first bytes, then a 2 GB hole (sparse: no disk)
    with open(big, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0" + bytes(60))
        f.truncate(2 << 30)
    p = run_python(PROGRAMS / "load_image.py", big, timeout=120)
    report = json.loads(p.stdout)
    assert f"cannot read image {big}: the file holds 2,147,483,648 bytes, more than any " \
           "image within the limit of 89,478,485 pixels" in report["error"], report
    assert report["grown_mb"] < 100 and report["seconds"] < 5, report


@pytest.mark.parametrize("case, words", [
    ("/dev/zero", "is not a regular file"),
    ("fifo", "is not a regular file"),
    ("2 MB", "holds 2,097,152 bytes, more than the 1,048,576 it may"),
    ("empty out", "out must be a non-empty string without NUL characters, got ''"),
    ("NUL in out", "out must be a non-empty string without NUL characters, got 'a\\x00b'"),
])
def test_a_config_file_is_read_only_if_regular_and_small_and_its_paths_are_checked(
        tmp_path, capsys, monkeypatch, case, words):
    """The files that a read would never finish (/dev/zero, a FIFO nobody writes) are given to
    the command in its own process (a timeout ends it); the others to its main here."""
    path = tmp_path / "run.toml"
    if case == "/dev/zero":
        path = "/dev/zero"
    elif case == "fifo":
        os.mkfifo(path)  # nobody writes it: a read would wait for ever
    elif case == "2 MB":
        path.write_bytes(b"#" * (2 << 20))
    else:
        path.write_text('out = ""\n' if case == "empty out" else 'out = "a\\u0000b"\n')
    argv = ["--config", path, "--max-steps", "1"]
    if case in ("/dev/zero", "fifo"):
        p = run_python("-m", "split_alexnet.train", *argv, cwd=tmp_path, timeout=120)
        rc, err = p.returncode, p.stderr
    else:
        monkeypatch.chdir(tmp_path)
        rc, _, err = run_main(train_main, "split_alexnet.train", argv, capsys)
    assert rc == 2 and err.strip().splitlines() == [
        f"split_alexnet.train: error: config file {path}{':' if 'out' in case else ''} "
        f"{words}"], err
    assert sorted(os.listdir(tmp_path)) == (["run.toml"] if case != "/dev/zero" else [])


# ----------------------------------------------------------------------------- predict


def _predict(*args) -> int:
    return run(predict_main, "predict", [*map(str, args), "--single-device"])


def test_predict_opens_the_checkpoint_before_decoding_any_image(tmp_path, capsys):
    bad_ckpt, bad_image = tmp_path / "c.pt", tmp_path / "x.jpg"
    bad_ckpt.write_bytes(b"not a checkpoint")
    bad_image.write_bytes(b"not an image")
    assert _predict(bad_image, "--checkpoint", bad_ckpt) == 2
    assert f"checkpoint {bad_ckpt} cannot be loaded" in one_error(capsys)


def test_predict_streams_its_images_batch_by_batch(one_step, demo_root, tmp_path, capsys):
    good = sorted((demo_root / "val").glob("*/*.jpg"))[:3]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff broken")
    capsys.readouterr()
    assert _predict(*good, bad, "--checkpoint", one_step / "last.pt", "--batch-size", "2",
                    "--top", "1") == 2
    out, err = capsys.readouterr()
    # The first batch was predicted and printed before the second was read.
    assert [ln for ln in out.splitlines() if not ln.startswith(" ")] == [str(p) for p in good[:2]]
    assert err.strip().splitlines() == [f"predict: error: cannot read image {bad}: "
                                        + err.split(f"{bad}: ", 1)[1].strip()]


def test_predict_escapes_control_characters_in_class_names(one_step, demo_root, tmp_path,
                                                           capsys):
    ckpt = dict(load_checkpoint(one_step / "last.pt"))
    hostile = ["\x1b[2J\x1b[31mred", "two\nlines", "back\rspace", "fine"]
    ckpt["class_names"] = hostile
    path = tmp_path / "names.pt"
    save_checkpoint(path, ckpt)
    image = sorted((demo_root / "val").glob("*/*.jpg"))[0]
    capsys.readouterr()
    assert _predict(image, "--checkpoint", path, "--top", "4") == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and len(out.splitlines()) == 5, out
    for shown in ("\\x1b[2J\\x1b[31mred", "two\\nlines", "back\\rspace", "fine"):
        assert shown in out, out


# ----------------------------------------------------------------------------- folders


def _too_deep(folder: Path, image: Path) -> Path:
    """A chain of folders under ``folder`` whose path passes PATH_MAX (4096), an image at its
    end: made through folder descriptors, as no path can name it. Returns its first folder."""
    name = "d" * 250
    fd = os.open(folder, os.O_RDONLY)
    try:
        for _ in range(18):
            os.mkdir(name, dir_fd=fd)
            nxt = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        with open(os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(image.read_bytes())
    finally:
        os.close(fd)
    return folder / name


def test_a_folder_that_cannot_be_scanned_is_counted_or_fatal_with_strict(demo_root, tmp_path,
                                                                         capsys):
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    cls = sorted((data / "train").iterdir())[0]
    _too_deep(cls, sorted(cls.glob("*.jpg"))[0])
    capsys.readouterr()
    samples = list_samples(data / "train", sorted(p.name for p in (data / "train").iterdir()))
    assert len(samples) == 32  # the deep image is not listed, and that is said
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"warning: 1 folder(s) under {data / 'train'} could not be scanned: ") \
        and "(File name too long)" in lines[0], lines
    assert train(data, tmp_path / "run", *CPU_PAIR, "--max-steps", "1", "--strict") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and [ln for ln in err.splitlines() if "error:" in ln] == [
        f"train: error: 1 folder(s) under {data / 'train'} could not be scanned: "
        f"{(cls.name + '/' + 'd' * 60)[:28]}...{'d' * 28} (File name too long); --strict "
        "stops on them"], err
