"""A full disk stops training with one line and keeps the previous checkpoint
(docs/reliability.md).

Once by a ``torch.save`` that fails with ENOSPC part-way (in this process), then for real:
``one_step`` (conftest.py) continued by a ``python -m split_alexnet.train`` process under
``RLIMIT_FSIZE`` (writes fail with EFBIG, as on a full disk) at checkpoint time and at the
next metrics record, and a curves plot whose rename fails after the epoch's checkpoint.
"""

from __future__ import annotations

import errno
import os
import subprocess

from helpers import (BASE, CPU_PAIR, copy_run, error_lines, records, run_python, temp_files,
                     train, train_args)
from split_alexnet.training import checkpoint
from split_alexnet.utils.checkpoint_file import load_checkpoint
from split_alexnet.training.command import main as train_main
from split_alexnet.utils.cli import run


def with_file_size_limit(root, out, nbytes: int, *extra) -> subprocess.CompletedProcess:
    """The trainer in a process whose writes past ``nbytes`` in any file fail with EFBIG
    (RLIMIT_FSIZE, SIGXFSZ ignored), as on a full disk. stderr is a pipe: no file."""
    return run_python(*train_args(root, out, *CPU_PAIR, "--checkpoint-minutes", "0", *extra),
                      timeout=600, fsize=nbytes)


def test_disk_full_at_checkpoint_time_keeps_the_previous_checkpoint(demo_root, tmp_path,
                                                                   monkeypatch, capsys):
    real_save = checkpoint.torch.save
    saved = []

    def save(obj, f, *a, **k):
        saved.append((obj["progress"]["step"], obj["checksum"]))
        if len(saved) == 1:
            return real_save(obj, f, *a, **k)
        f.write(b"\0" * (4 << 20))  # part of a file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", save)
    out = tmp_path / "full"
    rc = train(demo_root, out, *CPU_PAIR, "--checkpoint-minutes", "0", "--max-steps", "3")
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 1
    (line,) = error_lines(err)
    assert "could not write checkpoint in" in line and "No space left on device" in line
    assert "previous checkpoint is intact" in line and "Traceback" not in err
    assert [s for s, _ in saved] == [1, 2]  # stopped at the failed save, no step 3
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["progress"]["step"] == 1 and ckpt["checksum"] == saved[0][1]
    assert temp_files(out) == []


def test_a_real_full_disk_at_checkpoint_time_keeps_the_previous_checkpoint(one_step, demo_root,
                                                                          tmp_path):
    out = copy_run(one_step, tmp_path / "run")
    before = load_checkpoint(out / "last.pt")["checksum"]
    # A checkpoint is ~450 MB: the first save of the resumed run (step 2) fails.
    p = with_file_size_limit(demo_root, out, 64 << 20, "--resume", "--max-steps", "3")
    assert p.returncode == 1, p.stderr[-3000:]
    assert error_lines(p.stderr) == [
        f"split_alexnet.train: error: could not write checkpoint in {out}: File too large; "
        "the previous checkpoint is intact, stopping"], p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["checksum"] == before and ckpt["progress"]["step"] == 1
    assert [r["step"] for r in records(out, torn_ok=True) if r["kind"] == "train"] == [1, 2]
    assert temp_files(out) == []


def test_a_real_full_disk_for_the_records_stops_with_one_line(one_step, demo_root, tmp_path):
    out = copy_run(one_step, tmp_path / "run")
    before = load_checkpoint(out / "last.pt")["checksum"]
    size = (out / "metrics.jsonl").stat().st_size  # the next record (the resume's) fails
    p = with_file_size_limit(demo_root, out, size, "--resume", "--max-steps", "3")
    assert p.returncode == 1, p.stderr[-3000:]
    assert error_lines(p.stderr) == [
        f"split_alexnet.train: error: could not write {out / 'metrics.jsonl'}: File too "
        "large; the checkpoints are untouched, stopping"], p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert load_checkpoint(out / "last.pt")["checksum"] == before
    assert (out / "metrics.jsonl").stat().st_size == size


def test_a_failed_curves_write_stops_with_one_line_after_the_checkpoint(short_root, tmp_path,
                                                                       capsys):
    out = tmp_path / "run"
    (out / "curves.png").mkdir(parents=True)  # the plot's rename onto it fails
    capsys.readouterr()
    assert run(train_main, "train", ["--data", str(short_root), "--out", str(out), *BASE,
                                     *CPU_PAIR, "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert error_lines(err) == [f"train: error: could not write {out / 'curves.png'}: Is a "
                                "directory; the checkpoints are untouched, stopping"], err
    progress = load_checkpoint(out / "last.pt")["progress"]  # the epoch's own checkpoint
    assert (progress["epoch"], progress["epoch_step"], progress["step"]) == (1, 0, 1)
    assert temp_files(out) == []
