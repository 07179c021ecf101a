"""The run folder belongs to one run and one trainer (docs/reliability.md, "The run folder"):
the lock, the refused fresh start, --overwrite, the clean-up of temporaries, and a resume that
must be the same run (docs/training.md, "Resume: the same run"), with --resume-lr.

Most cases are refused before any work; the others share ``one_step`` (conftest.py), a real
run of one step of the full-size network on the ``demo_root`` set (last.pt at step 1 of 4 in
epoch 1), copied per test (checkpoints hard-linked, the rest copied).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers import (BASE, CPU_PAIR, REPO, copy_run, error_lines, records, start_python, stored,
                     train, train_args)
from split_alexnet.training.config import FLAGS, TrainConfig
from split_alexnet.training.options import COMMAND_FLAGS
from split_alexnet.training.runfolder import RunLock
from split_alexnet.training.command import main as train_main
from split_alexnet.utils.cli import run


def one_error(capsys) -> str:
    """The one line the last run printed on stderr (asserting it was one line)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def fingerprint(out: Path) -> tuple:
    """What must not change when a trainer is refused: the checkpoint's file (a save
    replaces it with a new inode) and the bytes of the records."""
    st = (out / "last.pt").stat()
    return st.st_ino, st.st_size, st.st_mtime_ns, (out / "metrics.jsonl").read_bytes()


# ----------------------------------------------------------------------------- one trainer


def test_a_second_trainer_is_refused_naming_the_live_ones_pid(demo_root, tmp_path, capsys):
    out = tmp_path / "live"
    log = tmp_path / "live.stderr"
    args = train_args(demo_root, out, *CPU_PAIR, "--epochs", "50", "--workers", "2")
    with open(log, "w") as err:
        proc = start_python(args, stderr=err)
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").exists():  # training, with its 2 loader workers
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        # A --resume beside it (which would delete its half-written temporaries), a fresh
        # start and --overwrite: each refused before any work, naming the holder.
        for extra in (["--resume"], [], ["--overwrite"]):
            capsys.readouterr()
            assert train(demo_root, out, *CPU_PAIR, *extra, "--max-steps", "1") == 2, extra
            line = one_error(capsys)
            assert f"--out {out} is in use by another trainer (pid {proc.pid} on " in line, line
            assert str(out / "train.lock") in line
        assert proc.poll() is None  # the live trainer never noticed
        # SIGKILL: the kernel drops the lock at once, although the forked loader workers
        # (which inherited the descriptor) may live on for a few seconds.
        proc.kill()
        proc.wait(timeout=60)
        RunLock(out).acquire().release()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("held", ["config.json", "metrics.jsonl", "epoch_001.pt", "the run"])
def test_a_fresh_start_in_a_folder_that_holds_a_run_is_refused(one_step, demo_root, tmp_path,
                                                                capsys, held):
    if held == "the run":
        out = copy_run(one_step, tmp_path / "run")
    else:
        out = tmp_path / "run"
        out.mkdir()
        if held.endswith(".pt"):
            os.link(one_step / "last.pt", out / held)
        else:
            shutil.copyfile(one_step / held, out / held)
    before = sorted(p.name for p in out.iterdir() if p.name != "train.lock")
    sums = fingerprint(out) if held == "the run" else None
    capsys.readouterr()
    assert train(demo_root, out, *CPU_PAIR, "--max-steps", "1") == 2
    line = one_error(capsys)
    assert f"--out {out} already holds a run (" in line and "--overwrite (deletes it)" in line
    if held in ("config.json", "metrics.jsonl"):
        assert "it has no checkpoint to continue from" in line, line
    else:
        assert "continue it with --resume" in line, line
    assert sorted(p.name for p in out.iterdir() if p.name != "train.lock") == before
    if sums is not None:
        assert fingerprint(out) == sums


def test_overwrite_deletes_the_previous_run_and_starts_a_new_one(one_step, demo_root,
                                                                tmp_path, capsys):
    out = copy_run(one_step, tmp_path / "run")
    for name in ("best.pt", "epoch_001.pt"):
        os.link(one_step / "last.pt", out / name)
    (out / "curves.png").write_bytes(b"an old plot")
    old = records(out)[0]
    # A mistake in another flag: refused before the old run is deleted.
    sums = fingerprint(out)
    assert run(train_main, "train", ["--data", str(tmp_path / "typo"), "--out", str(out),
                                     *BASE, *CPU_PAIR, "--overwrite"]) == 2
    assert fingerprint(out) == sums and (out / "best.pt").exists()
    capsys.readouterr()
    assert train(demo_root, out, *CPU_PAIR, "--overwrite", "--max-steps", "1",
                 "--seed", "4") == 0
    err = capsys.readouterr().err
    assert f"--overwrite: deleted the previous run in {out} (config.json, metrics.jsonl, " \
           "last.pt, best.pt, epoch_001.pt)" in err
    assert not any((out / n).exists() for n in ("best.pt", "epoch_001.pt", "curves.png"))
    (rec,) = records(out)
    assert rec["kind"] == "train" and rec["step"] == 1 and rec["time"] > old["time"]
    assert rec["loss"] != old["loss"]  # the new run (seed 4), not the old one
    assert json.loads((out / "config.json").read_text())["seed"] == 4
    assert stored(out / "last.pt")["config"]["seed"] == 4


@pytest.mark.parametrize("extra, words", [
    (["--resume", "--overwrite"], "give --resume (continue the run in --out) or --overwrite"),
    (["--resume-lr", "0.1"], "--resume-lr sets the learning rate of a resumed run: it needs "
                             "--resume"),
    (["--resume", "--resume-lr", "nan"], "--resume-lr must be a finite number, got nan"),
    (["--resume", "--resume-lr", "0"], "--resume-lr must be greater than 0"),
])
def test_run_folder_flags_that_cannot_go_together(one_step, demo_root, tmp_path, capsys,
                                                  extra, words):
    out = copy_run(one_step, tmp_path / "run")
    sums = fingerprint(out)
    capsys.readouterr()
    assert train(demo_root, out, *CPU_PAIR, *extra, "--max-steps", "2") == 2
    assert words in one_error(capsys)
    assert fingerprint(out) == sums


# ----------------------------------------------------------------------------- the same run


def test_every_setting_either_defines_the_run_or_may_change_on_resume():
    run_settings = TrainConfig().run_settings()
    assert set(run_settings) == {k for k, (_, f) in FLAGS.items() if f.metadata.get("run", True)}
    assert set(FLAGS) == set(TrainConfig().to_dict())
    text = (REPO / "docs" / "training.md").read_text()
    section = text[text.index("### Resume: the same run"):]
    section = section[:section.index("\n## ")]
    table = section[section.index("| must match"):section.index("Everything else may change")]
    rest = section[section.index("Everything else may change"):]
    for name in FLAGS:
        where = table if name in run_settings else rest
        assert f"`--{name.replace('_', '-')}" in where, name
    for name in COMMAND_FLAGS:
        assert f"`--{name.replace('_', '-')}" in rest, name


def test_a_resume_with_other_settings_is_refused_listing_each(one_step, demo_root, tmp_path,
                                                               capsys):
    out = copy_run(one_step, tmp_path / "run")
    sums = fingerprint(out)
    changed = {"--lr": ("0.02", "0.01"), "--batch-size": ("4", "8"),
               "--pool": ("2/2", "3/2"), "--dropout": ("0.3", "0.5"),
               "--activation": ("tanh", "relu"), "--optimizer": ("torch", "paper"),
               "--pca": ("off", "paper"), "--seed": ("4", "3"),
               "--lr-schedule": ("step:2", "plateau"), "--weight-decay": ("0.001", "0.0005")}
    argv = [x for flag, (new, _) in changed.items() for x in (flag, new)]
    capsys.readouterr()
    assert train(demo_root, out, *CPU_PAIR, "--resume", *argv, "--max-steps", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err  # refused before any other work
    line = err[0]
    assert line.startswith("train: error: --resume: --batch-size 4 (the run: 8), "), line
    for flag, (new, old) in changed.items():
        assert f"{flag} {new} (the run: {old})" in line, (flag, line)
    assert f"these settings define the run in {out} and cannot change on resume" in line
    assert "to change the learning rate give --resume-lr LR" in line
    assert fingerprint(out) == sums  # refused before anything was written


def test_resume_takes_the_runs_settings_and_applies_the_flags_given(one_step, tmp_path,
                                                                    capsys):
    """The run was made with --batch-size 8 on a set of 32 images; a resume that gives only
    --out (not --data, the batch or anything else) continues it with its own settings, where
    the default batch of 128 would not fit the set."""
    out = copy_run(one_step, tmp_path / "run")
    capsys.readouterr()
    assert run(train_main, "train", ["--out", str(out), "--resume", "--max-steps", "2",
                                     "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert f"resumed from {out / 'last.pt'} at step 1, step 1 of epoch 1\n--resume: the " \
           f"run's settings, changed: --workers 1 (the run: 0), --max-steps 2 (the run: 1), " \
           f"--out {out} (the run: {one_step})\n" in err, err
    assert "error" not in err
    ckpt = stored(out / "last.pt")
    assert ckpt["progress"]["step"] == 2
    first = json.loads((one_step / "config.json").read_text())
    now = json.loads((out / "config.json").read_text())  # as last started: the next resume's
    assert ckpt["config"]["batch_size"] == 8 and ckpt["config"]["data"] == first["data"]
    assert now == {**first, "max_steps": 2, "workers": 1, "out": str(out)}


def test_config_reads_a_runs_config_json(one_step, tmp_path):
    """--config OUT/config.json starts a run with another run's settings."""
    from split_alexnet.training.options import parse_command
    cfg, _ = parse_command(["--config", str(one_step / "config.json"), "--out",
                            str(tmp_path / "again"), "--seed", "5"])
    saved = json.loads((one_step / "config.json").read_text())
    assert cfg.to_dict() == {**saved, "out": str(tmp_path / "again"), "seed": 5}


def test_a_resume_on_renamed_classes_is_refused(one_step, demo_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(demo_root, root, copy_function=os.link,
                    ignore=shutil.ignore_patterns("stats.npz"))
    first = sorted(p.name for p in (root / "train").iterdir())[0]
    for split in ("train", "val"):  # the same count, but label 0 is now another class
        (root / split / first).rename(root / split / "zz_renamed")
    out = copy_run(one_step, tmp_path / "run")
    sums = fingerprint(out)
    capsys.readouterr()
    assert run(train_main, "train", ["--data", str(root), "--out", str(out), *BASE, *CPU_PAIR,
                                     "--resume", "--max-steps", "2"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    second = sorted(p.name for p in (demo_root / "train").iterdir())[1]
    assert f"the classes (label 0 is '{second}' in the data, '{first}' in the run)" in line, line
    assert fingerprint(out) == sums


@pytest.fixture(scope="module")
def resumed(one_step, demo_root, module_tmp):
    """one_step continued for one step with --resume-lr and every kind of setting that may
    change, in a folder with leftover temporaries of a dead writer, of a live one, and of an
    older version (no pid)."""
    out = copy_run(one_step, module_tmp("resumed") / "run")
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "300"])
    temps = {"dead": out / f".last.pt.ab12cd34.{dead.pid}.tmp",
             "live": out / f".last.pt.ef56ab78.{live.pid}.tmp",
             "legacy": out / ".epoch_001.pt.deadbeef.tmp",
             "other": out / ".notes.txt.tmp"}
    for p in temps.values():
        p.write_bytes(b"half a checkpoint")
    try:
        rc = train(demo_root, out, *CPU_PAIR, "--resume", "--resume-lr", "0.005",
                   "--max-steps", "2", "--epochs", "3", "--single-device", "--workers", "1",
                   "--log-interval", "2", "--checkpoint-minutes", "5", "--keep-last", "1",
                   "--eval-every", "2", "--watchdog-steps", "0", "--ten-crop")
    finally:
        live.kill()
        live.wait()
    return {"rc": rc, "out": out, "temps": temps,
            "records": records(out)}


def test_resume_may_change_the_listed_settings(resumed):
    assert resumed["rc"] == 0
    ckpt = stored(resumed["out"] / "last.pt")
    assert ckpt["progress"]["step"] == 2 and ckpt["layout"] == "collapsed"


def test_resume_lr_changes_the_rate_and_records_it(resumed):
    assert resumed["rc"] == 0
    kinds = [r["kind"] for r in resumed["records"]]
    assert kinds == ["train", "resume", "lr_change", "train"], kinds
    change = resumed["records"][2]
    assert {k: change[k] for k in ("step", "epoch", "old", "new")} == \
        {"step": 1, "epoch": 0, "old": 0.01, "new": 0.005}
    assert resumed["records"][3]["step"] == 2 and resumed["records"][3]["lr"] == 0.005
    ckpt = stored(resumed["out"] / "last.pt")
    assert ckpt["schedule"]["lr"] == 0.005
    # One group per (layer, weights or biases), every multiplier 1: all at the new rate.
    assert [g["lr"] for g in ckpt["optimizer"]["groups"]] == [0.005] * 16
    assert ckpt["config"]["lr"] == 0.01 and "resume_lr" not in ckpt["config"]


def test_resume_removes_only_temporaries_whose_writer_is_gone(resumed):
    temps = resumed["temps"]
    assert not temps["dead"].exists() and not temps["legacy"].exists()
    assert temps["live"].exists()   # its writer is alive: not ours to delete
    assert temps["other"].exists()  # not a checkpoint's, and no pid: someone else's file


def test_a_resume_with_nothing_left_to_do_says_so(one_step, demo_root, tmp_path, capsys):
    """--max-steps is not taken from the run (it ran to step 1 with --max-steps 1; a resume
    runs on unless given one again); a resume at its --max-steps trains nothing and says so."""
    out = copy_run(one_step, tmp_path / "run")
    before = [r for r in records(out) if r["kind"] == "train"]
    capsys.readouterr()
    assert train(demo_root, out, *CPU_PAIR, "--resume", "--max-steps", "1") == 0
    err = capsys.readouterr().err
    assert f"nothing to do: the run in {out} is at step 1, --max-steps 1; give a larger " \
           "--max-steps to continue it" in err, err
    assert "training alexnet" not in err
    assert [r for r in records(out) if r["kind"] == "train"] == before


def test_a_one_class_dataset_is_refused(tmp_path, capsys):
    from split_alexnet.data.demo import make_demo_dataset
    root = make_demo_dataset(tmp_path / "one", classes=1, train_per_class=4, val_per_class=1,
                             seed=0)
    capsys.readouterr()
    assert train(root, tmp_path / "run", *CPU_PAIR) == 2
    err = capsys.readouterr().err
    assert f"train: error: --data {root} has one class ('circle' in train/): a classifier " \
           "needs at least two class folders" in err, err
    assert "Traceback" not in err and not (tmp_path / "run" / "config.json").exists()
