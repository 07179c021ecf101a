"""Hostile and damaged checkpoints are refused, never run and never half-used
(docs/reliability.md): pickles that would run code, flipped bits, truncation, edited weights,
and a checkpoint of another model. The real checkpoint is ``one_step``'s (conftest.py).
"""

from __future__ import annotations

import os
import pickle
import shutil
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import BASE, CPU_PAIR, RunsCode, error_lines, train
from split_alexnet.data.demo import make_demo_dataset
from split_alexnet.tools.evaluate import main as evaluate_main
from split_alexnet.utils.checkpoint_file import FORMAT, CheckpointError, load_checkpoint
from split_alexnet.training.command import main as train_main
from split_alexnet.utils.cli import run


def _malicious(path: Path, marker: Path, how: str) -> Path:
    payload = {"format": FORMAT, "model": {"w": torch.zeros(2)}, "progress": {"step": 1},
               "x": RunsCode(marker)}
    if how == "pickle":
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    elif how == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(payload, path, pickle_protocol=int(how[-1]))
    return path


@pytest.mark.parametrize("how", ["zip-proto2", "zip-proto4", "legacy", "pickle"])
def test_a_checkpoint_that_would_run_code_is_refused_and_never_run(tmp_path, how):
    # The file really is hostile: an unsafe load runs it.
    control = tmp_path / "CONTROL"
    ctrl = _malicious(tmp_path / "control.pt", control, how)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.load(ctrl, weights_only=False)
        except RuntimeError:  # a bare pickle: the code ran, then "invalid magic number"
            pass
    assert control.exists()
    marker = tmp_path / "MARKER"
    evil = _malicious(tmp_path / "evil.pt", marker, how)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_train_and_evaluate_refuse_a_hostile_checkpoint(demo_root, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = _malicious(tmp_path / "evil.pt", marker, "zip-proto2")
    capsys.readouterr()
    rc = train(demo_root, tmp_path / "o", *CPU_PAIR, "--resume", str(evil))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(error_lines("\n".join(err))) == 1, err
    assert "cannot be loaded safely (weights_only=True)" in error_lines("\n".join(err))[0]
    rc = run(evaluate_main, "evaluate", ["--checkpoint", str(evil), "--data", str(demo_root),
                                         "--workers", "0", "--devices", "cpu,cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot be loaded safely" in err[0], err
    assert not marker.exists()


def _largest_tensor_record(path: Path) -> tuple[int, int]:
    """(offset in the file, size) of the biggest tensor's bytes inside the zip."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_bit_flips_and_truncation_are_detected(one_step, demo_root, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    shutil.copyfile(one_step / "last.pt", bad)
    size = bad.stat().st_size
    # One flipped byte in the middle of a weight tensor (the zip's CRC or our checksum).
    offset, n = _largest_tensor_record(bad)
    with open(bad, "r+b") as f:
        f.seek(offset + n // 2)
        b = f.read(1)
        f.seek(offset + n // 2)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(CheckpointError, match=r"checksum mismatch|cannot be loaded safely"):
        load_checkpoint(bad)
    rc = run(evaluate_main, "evaluate", ["--checkpoint", str(bad), "--data", str(demo_root),
                                         "--workers", "0", "--devices", "cpu,cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(bad) in err[0], err
    # Truncated anywhere (a crash mid-copy, a full disk), down to empty.
    for keep in (size - 100, size // 2, 1000, 0):
        os.truncate(bad, keep)
        with pytest.raises(CheckpointError, match=str(bad)):
            load_checkpoint(bad)


def test_a_consistent_file_with_changed_weights_fails_the_checksum(one_step, tmp_path):
    """A well-formed zip whose contents differ from what was saved (silent corruption before
    the zip was written, an edited file): only the checksum recorded at save time sees it,
    down to one flipped bit of the 61 M weights (CRC-32 catches every such flip)."""
    ckpt = torch.load(one_step / "last.pt", map_location="cpu", weights_only=True)
    ckpt["model"]["fc8.bias"][0] += 1e-6
    tampered = tmp_path / "tampered.pt"
    torch.save(ckpt, tampered)
    with pytest.raises(CheckpointError, match="corrupt: checksum mismatch"):
        load_checkpoint(tampered)
    ckpt = torch.load(one_step / "last.pt", map_location="cpu", weights_only=True)
    ckpt["model"]["fc6.weight"].view(-1).view(torch.int32)[12_345_678] ^= 1 << 7
    torch.save(ckpt, tampered)
    with pytest.raises(CheckpointError, match="corrupt: checksum mismatch"):
        load_checkpoint(tampered)


def test_a_checkpoint_of_another_format_version_is_refused_naming_both(one_step, tmp_path):
    ckpt = torch.load(one_step / "last.pt", map_location="cpu", weights_only=True)
    old = tmp_path / "v1.pt"
    torch.save(dict(ckpt, format="split_alexnet/checkpoint-v1"), old)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(old)
    assert str(e.value) == (f"{old} is a split_alexnet checkpoint of format "
                            "'split_alexnet/checkpoint-v1', which this version does not read "
                            f"(it reads {FORMAT!r}); write it again with this version")


@pytest.mark.parametrize("what", ["arch", "classes"])
def test_a_checkpoint_of_another_model_names_both(one_step, demo_root, tmp_path, capsys, what):
    if what == "arch":
        root, extra, want = demo_root, ["--arch", "half", "--single-device"], ("half", 4)
    else:
        root = make_demo_dataset(tmp_path / "d3", classes=3, train_per_class=3,
                                 val_per_class=1, seed=0)
        extra, want = [], ("alexnet", 3)
    argv = ["--data", str(root), "--out", str(tmp_path / "o"), *BASE, *CPU_PAIR, *extra,
            "--resume", str(one_step / "last.pt")]
    if what == "arch":
        argv.remove("--devices")
        argv.remove("cpu,cpu")
    capsys.readouterr()
    rc = run(train_main, "train", argv)
    err = capsys.readouterr().err
    assert rc == 2
    (line,) = error_lines(err)
    if what == "arch":  # a setting given that differs from the run's: refused naming it
        assert "--resume: --arch half (the run: alexnet)" in line, line
        return
    assert "holds arch=alexnet with 4 classes" in line, line
    assert f"needs arch={want[0]} with {want[1]} classes" in line, line
