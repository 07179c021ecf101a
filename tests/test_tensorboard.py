"""--tensorboard: real training runs write events, read back with TensorBoard's own
EventAccumulator; a resume continues the stream without duplicated steps; without the
package the run stops with one line before any work."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from split_alexnet.training import command as T
from split_alexnet.utils.cli import run

BASE = ["--batch-size", "8", "--workers", "0", "--log-interval", "1", "--init", "caffe",
        "--no-ten-crop", "--seed", "3", "--devices", "cpu,cpu", "--epochs", "1",
        "--lr-schedule", "step-iters:2", "--tensorboard"]


def train(root, out, *extra) -> int:
    return run(T.main, "train", ["--data", str(root), "--out", str(out), *BASE, *extra])


def scalars(out: Path) -> dict[str, list[tuple[int, float, float]]]:
    """{tag: [(step, value, wall time)]} as TensorBoard reads OUT/tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    return {tag: [(e.step, e.value, e.wall_time) for e in ea.Scalars(tag)]
            for tag in ea.Tags()["scalars"]}


def records(out: Path, kind: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == kind}


def test_events_and_resumes_without_duplicated_steps(demo_root, tmp_path, capsys):
    """Run A, without --tensorboard, stops at step 2 (checkpoint). Run B resumes it with
    --tensorboard, writes A's records first, and stops at step 3. Run C resumes from A's
    checkpoint (step 2) again and ends the epoch (step 4, evaluation): B's step 3 came after
    C's checkpoint, C logs step 3 again, and the stream holds it once, C's."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    without = [a for a in BASE if a != "--tensorboard"]
    assert run(T.main, "train", ["--data", str(demo_root), "--out", str(out), *without,
                                 "--max-steps", "2"]) == 0
    assert not (out / "tensorboard").exists()
    shutil.copyfile(out / "last.pt", tmp_path / "step2.pt")
    assert train(demo_root, out, "--resume", "--max-steps", "3") == 0
    b = scalars(out)["train/loss"]
    assert [s for s, _, _ in b] == [1, 2, 3]
    assert train(demo_root, out, "--resume", str(tmp_path / "step2.pt")) == 0
    capsys.readouterr()
    got = scalars(out)
    assert {"train/loss", "train/top1_err", "train/lr", "train/images_per_s", "val/top1_err",
            "val/top5_err", "val/loss", "lr_drop"} <= set(got)
    for tag, events in got.items():
        steps = [s for s, _, _ in events]
        assert steps == sorted(set(steps)), (tag, steps)  # no step twice
    train_rec, val_rec = records(out, "train"), records(out, "val")  # the latest per step
    assert [s for s, _, _ in got["train/loss"]] == [1, 2, 3, 4]
    for step, value, when in got["train/loss"]:
        assert value == pytest.approx(train_rec[step]["loss"])
        assert when == pytest.approx(train_rec[step]["time"])
    assert got["train/loss"][2][2] > b[2][2]  # step 3 is C's, not B's
    assert [(s, v) for s, v, _ in got["val/top1_err"]] == \
        [(4, pytest.approx(val_rec[4]["top1_err"]))]
    drops = records(out, "lr_drop")
    assert drops and [(s, v) for s, v, _ in got["lr_drop"]] == \
        [(s, pytest.approx(r["new"])) for s, r in sorted(drops.items())]
    assert [(s, v) for s, v, _ in got["train/lr"]] == \
        [(s, pytest.approx(r["lr"])) for s, r in sorted(train_rec.items())]


def test_without_the_package_one_line_before_any_work(demo_root, tmp_path, capsys,
                                                      monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    out = tmp_path / "run"
    assert train(demo_root, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["train: error: --tensorboard needs the tensorboard package: pip install "
                   "'split_alexnet[tensorboard]' (or pip install tensorboard)"]
    assert not out.exists()
