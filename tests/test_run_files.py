"""The files a run writes belong to it (docs/reliability.md, "Run files are the run's
own"): none is written through a symbolic link, no tool's output is one of its inputs, the
run folder and the data never hold each other, epoch checkpoints go by their number, a
resume at --max-steps trains nothing, a checkpoint's fields are checked, and interrupted
work is finished.

The refusals come before any work, with one line and exit 2; the cases that continue a run
work on a copy of ``one_step`` (conftest.py).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from helpers import CPU_PAIR, copy_run, records, start_python, stored, train
from split_alexnet.tools.evaluate import main as evaluate_main
from split_alexnet.training.command import main as train_main
from split_alexnet.utils.checkpoint_file import load_checkpoint, save_checkpoint
from split_alexnet.utils.cli import run


def one_error(capsys) -> str:
    """The one line the last run printed on stderr (asserting it was one line)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# ----------------------------------------------------------------------------- no symlinks


@pytest.mark.parametrize("holds_a_run", [False, True])
def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_untouched(
        one_step, demo_root, tmp_path, capsys, holds_a_run):
    out = copy_run(one_step, tmp_path / "run") if holds_a_run else tmp_path / "run"
    out.mkdir(exist_ok=True)
    (out / "train.lock").unlink(missing_ok=True)
    victim = tmp_path / "precious.txt"
    victim.write_text("do not touch\n")
    (out / "train.lock").symlink_to(victim)
    capsys.readouterr()
    assert train(demo_root, out, *CPU_PAIR, "--max-steps", "1") == 2
    line = one_error(capsys)
    assert f"{out / 'train.lock'} is a symbolic link" in line, line
    assert victim.read_text() == "do not touch\n"
    assert (out / "train.lock").is_symlink()


def test_a_lock_file_that_is_a_fifo_is_refused_without_hanging(demo_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / "train.lock")
    capsys.readouterr()
    assert train(demo_root, out, *CPU_PAIR, "--max-steps", "1") == 2
    assert f"{out / 'train.lock'} is not a regular file" in one_error(capsys)


@pytest.mark.parametrize("dangling", [False, True])
def test_records_are_never_appended_through_a_symlink(one_step, demo_root, tmp_path, capsys,
                                                       dangling):
    victim = tmp_path / "elsewhere.jsonl"
    if dangling:  # a fresh start: the link points at nothing yet
        out = tmp_path / "run"
        out.mkdir()
        extra = []
    else:  # --resume appends its records
        out = copy_run(one_step, tmp_path / "run")
        os.replace(out / "metrics.jsonl", victim)
        extra = ["--resume"]
    before = victim.read_bytes() if victim.exists() else None
    (out / "metrics.jsonl").symlink_to(victim)
    last = (out / "last.pt").stat() if not dangling else None
    capsys.readouterr()
    assert train(demo_root, out, *CPU_PAIR, "--max-steps", "2", *extra) == 2
    assert f"{out / 'metrics.jsonl'} is a symbolic link" in one_error(capsys)
    assert (victim.read_bytes() if victim.exists() else None) == before
    if last is not None:  # nothing trained: the checkpoint is the same file
        assert (out / "last.pt").stat().st_mtime_ns == last.st_mtime_ns
    else:
        assert not (out / "last.pt").exists()


# ----------------------------------------------------------------------------- outputs, inputs


@pytest.mark.parametrize("via_link", [False, True])
def test_overwrite_refuses_to_start_from_a_checkpoint_it_would_delete(one_step, demo_root,
                                                                      tmp_path, capsys,
                                                                      via_link):
    out = copy_run(one_step, tmp_path / "run")
    os.link(out / "last.pt", out / "best.pt")
    source = out / "best.pt"
    if via_link:  # a link elsewhere that points into the run
        source = tmp_path / "start.pt"
        source.symlink_to(out / "best.pt")
    capsys.readouterr()
    assert train(demo_root, out, *CPU_PAIR, "--overwrite", "--init-from", source,
                 "--max-steps", "1") == 2
    line = one_error(capsys)
    assert f"--init-from {source} is a file of the run in --out {out}, which --overwrite " \
           "deletes" in line, line
    assert load_checkpoint(out / "best.pt")["progress"]["step"] == 1  # still there
    assert (out / "last.pt").exists() and (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("same", ["path", "symlink", "hard link"])
def test_evaluate_refuses_to_write_its_json_over_the_checkpoint(one_step, demo_root, tmp_path,
                                                                capsys, same):
    ckpt = tmp_path / "c.pt"
    os.link(one_step / "last.pt", ckpt)
    json_path = {"path": ckpt, "symlink": tmp_path / "r.json",
                 "hard link": tmp_path / "h.json"}[same]
    if same == "symlink":
        json_path.symlink_to(ckpt)
    elif same == "hard link":
        os.link(ckpt, json_path)
    before = ckpt.read_bytes()
    capsys.readouterr()
    assert run(evaluate_main, "evaluate", ["--checkpoint", str(ckpt), "--data", str(demo_root),
                                           "--devices", "cpu,cpu", "--workers", "0",
                                           "--json", str(json_path)]) == 2
    line = one_error(capsys)
    assert f"--json {json_path} is --checkpoint {ckpt}, an input of this command" in line
    assert ckpt.read_bytes() == before


# ----------------------------------------------------------------------------- out and data


@pytest.mark.parametrize("where", ["out in data", "data in out", "the same"])
def test_out_and_data_inside_each_other_are_refused_before_anything_is_made(
        demo_root, tmp_path, capsys, where):
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    if where == "out in data":  # the run's curves.png would be a training image of class 0
        out = data / "train" / sorted(os.listdir(data / "train"))[0] / "run"
    elif where == "data in out":
        out, data = tmp_path, data
    else:
        out = data
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert train(data, out, *CPU_PAIR, "--max-steps", "1") == 2
    line = one_error(capsys)
    assert ("is inside --data" if where != "data in out" else "is inside --out") in line, line
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing made


def test_a_refused_start_leaves_no_folder_behind(demo_root, tmp_path, capsys):
    out = tmp_path / "new" / "run"  # neither folder exists yet
    capsys.readouterr()
    assert train(tmp_path / "no-such-data", out, *CPU_PAIR, "--max-steps", "1") == 2
    one_error(capsys)
    assert not (tmp_path / "new").exists()
    # A folder that existed keeps what it held, and no more than a lock file.
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine\n")
    assert train(tmp_path / "no-such-data", out, *CPU_PAIR, "--max-steps", "1") == 2
    assert sorted(p.name for p in out.iterdir()) in (["notes.txt"], ["notes.txt", "train.lock"])


# ----------------------------------------------------------------------------- epoch order


def epoch_links(out: Path, *epochs: int) -> None:
    """``epoch_NNN.pt`` for each epoch, hard links of ``out``/last.pt."""
    for e in epochs:
        os.link(out / "last.pt", out / f"epoch_{e:03d}.pt")


def test_keep_last_prunes_by_epoch_number_not_by_name(one_step, demo_root, tmp_path, capsys):
    out = copy_run(one_step, tmp_path / "run")
    epoch_links(out, 998, 999, 1000, 1001)
    # The resumed run ends epoch 1 (epoch_001.pt) and keeps the two highest epoch numbers.
    assert train(demo_root, out, *CPU_PAIR, "--resume", "--epochs", "1",
                 "--keep-last", "2") == 0
    assert sorted(p.name for p in out.glob("epoch_*.pt")) == ["epoch_1000.pt", "epoch_1001.pt"]


def test_the_resume_fallback_and_the_listing_go_by_epoch_number(one_step, demo_root, tmp_path,
                                                                capsys):
    out = copy_run(one_step, tmp_path / "run")
    epoch_links(out, 999, 1002)
    (out / "epoch_x.pt").write_bytes(b"not the run's")
    # The listing of a refused fresh start, oldest first.
    capsys.readouterr()
    assert train(demo_root, out, *CPU_PAIR, "--max-steps", "1") == 2
    assert "last.pt, epoch_999.pt, epoch_1002.pt)" in one_error(capsys)
    # A damaged last.pt: --resume falls back to the newest epoch, 1002.
    (out / "last.pt").unlink()
    (out / "last.pt").write_bytes(b"truncated")
    assert train(demo_root, out, *CPU_PAIR, "--resume", "--max-steps", "2") == 0
    err = capsys.readouterr().err
    assert f"resumed from {out / 'epoch_1002.pt'}" in err, err


# ----------------------------------------------------------------------------- --max-steps


@pytest.mark.parametrize("max_steps", [1, 2])
def test_a_run_at_or_past_max_steps_trains_nothing_and_says_so(one_step, demo_root, tmp_path,
                                                               capsys, max_steps):
    out = copy_run(one_step, tmp_path / "run")
    if max_steps == 2:  # a run past it: continued to step 2, then asked for 1
        assert train(demo_root, out, *CPU_PAIR, "--resume", "--max-steps", "2") == 0
        max_steps = 1
    step = stored(out / "last.pt")["progress"]["step"]
    last = (out / "last.pt").stat().st_mtime_ns
    n = len(records(out))
    for _ in range(2):  # every call: no step
        capsys.readouterr()
        assert train(demo_root, out, *CPU_PAIR, "--resume", "--max-steps", max_steps) == 0
        assert f"nothing to do: the run in {out} is at step {step}, --max-steps {max_steps}; " \
               "give a larger --max-steps" in capsys.readouterr().err
    assert (out / "last.pt").stat().st_mtime_ns == last
    assert [r["kind"] for r in records(out)[n:]] == ["resume", "resume"]


# ----------------------------------------------------------------------------- checkpoint fields


def _drop_best(c):
    del c["progress"]["best_top1"]


@pytest.mark.parametrize("field, change", [
    ("progress.best_top1", _drop_best),
    ("progress.epoch_step", lambda c: c["progress"].update(epoch_step=-3)),
    ("rng.rank0.cpu", lambda c: c["rng"]["rank0"].update(cpu=c["rng"]["rank0"]["cpu"].float())),
    ("rng.rank0.cpu", lambda c: c["rng"]["rank0"].update(cpu=c["rng"]["rank0"]["cpu"][:100])),
    ("schedule", lambda c: c.update(schedule=["junk"])),
    ("schedule.lr", lambda c: c["schedule"].update(lr="fast")),
    ("config", lambda c: c.update(config="abc")),
    ("optimizer.groups", lambda c: c["optimizer"].update(groups=[{"params": [1]}])),
])
def test_a_checkpoint_field_of_the_wrong_type_or_range_is_one_line_naming_it(
        one_step, demo_root, tmp_path, capsys, field, change):
    ckpt = dict(load_checkpoint(one_step / "last.pt"))
    ckpt = {k: dict(v) if isinstance(v, dict) else v for k, v in ckpt.items()}
    ckpt["rng"] = {r: dict(v) for r, v in ckpt["rng"].items()}
    change(ckpt)
    bad = tmp_path / "bad.pt"
    save_checkpoint(bad, ckpt)  # a valid checksum over the changed fields
    out = copy_run(one_step, tmp_path / "run")
    capsys.readouterr()
    assert train(demo_root, out, *CPU_PAIR, "--resume", bad, "--max-steps", "2") == 2
    line = one_error(capsys)
    assert f"checkpoint {bad}: {field} is" in line, line


# ----------------------------------------------------------------------------- interrupted work


def test_a_folder_named_like_a_stale_temporary_does_not_stop_a_resume(one_step, demo_root,
                                                                      tmp_path, capsys):
    out = copy_run(one_step, tmp_path / "run")
    odd = out / ".last.pt.x.999999.tmp"
    odd.mkdir()
    (odd / "inside").write_text("not the trainer's\n")
    assert train(demo_root, out, *CPU_PAIR, "--resume", "--max-steps", "2") == 0
    assert (odd / "inside").read_text() == "not the trainer's\n"
    assert stored(out / "last.pt")["progress"]["step"] == 2


def test_demo_data_cut_short_by_sigkill_is_finished_by_the_next_run(tmp_path, capsys):
    out = tmp_path / "demo"
    data = out / "demo_data"
    args = ["--demo", "--out", str(out), "--max-steps", "1", "--workers", "0", "--no-ten-crop"]
    proc = start_python(["-m", "split_alexnet.train", *args])
    try:
        deadline = time.monotonic() + 300
        while len(list(data.glob("train/*/*.jpg"))) < 50:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert not (data / "val").exists() and not (data / "demo.json").exists()
    capsys.readouterr()
    assert run(train_main, "split_alexnet.train", args) == 0  # the same command, here
    assert "generating the demo dataset" in capsys.readouterr().err
    assert len(list(data.glob("val/*/*.jpg"))) == 200 and (data / "demo.json").is_file()
    assert not (data / "demo.partial").exists()


# ----------------------------------------------------------------------------- thread count


def test_a_resume_with_the_same_thread_count_is_bitwise_and_another_warns(demo_root, tmp_path,
                                                                         capsys):
    before = torch.get_num_threads()

    def run_to(out: Path, *extra, threads: int = 2) -> str:
        torch.set_num_threads(threads)  # as OMP_NUM_THREADS would start a process with
        try:
            capsys.readouterr()
            assert train(demo_root, out, *CPU_PAIR, *extra) == 0
        finally:
            torch.set_num_threads(before)
        return capsys.readouterr().err

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_to(whole, "--max-steps", "2")
    run_to(cut, "--max-steps", "1")
    assert "thread" not in run_to(cut, "--resume", "--max-steps", "2")  # 2 threads, as the run
    a, b = stored(whole / "last.pt"), stored(cut / "last.pt")
    assert a["threads"] == b["threads"] == 2
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    # Another thread count: the run goes on, and says it is not bitwise.
    err = run_to(cut, "--resume", "--max-steps", "3", threads=1)
    assert "this process uses 1 intra-op thread(s), the run 2 (" in err
