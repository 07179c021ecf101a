"""Fault injection: nothing is lost, and hostile input is refused (docs/reliability.md).

Training runs are few and tiny (the ``demo_root`` set: 32 train images, batch 8, 4 steps per
epoch, 2 epochs = 8 steps) but use the full-size network, so every checkpoint is ~450 MB.
Two module fixtures hold the expensive runs:

* ``reference``: one uninterrupted in-process run (8 steps).
* ``chaos``: the same run as real ``python -m split_alexnet.train`` processes with
  ``--checkpoint-minutes 0`` (last.pt after every step), interrupted five times - SIGKILL
  after a step drawn from a seeded RNG plus a random delay, SIGKILL while a checkpoint is being
  written, SIGKILL again, SIGINT to the whole process group (a Ctrl-C, with 2 loader workers),
  SIGTERM - each time continued with ``--resume``, then run to the end.

On the CPU every comparison with the reference is exact (``torch.equal``).

Further real processes: a one-step run (``one_step``) continued under ``RLIMIT_FSIZE`` (writes
fail with EFBIG, as on a full disk), with a torn metrics record, and stopped by two signals
during a save; and ``signalled``: SIGTERM during the last epoch's evaluation and during the
ten-crop test, with 2 loader workers, each continued with ``--resume``.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import split_alexnet.utils.checkpoint_file as C
import split_alexnet.data.dataset as D
import split_alexnet.training.loop as L
import split_alexnet.training.metrics as M
import split_alexnet.training.command as T
from split_alexnet.utils.checkpoint_file import CheckpointError, load_checkpoint
from split_alexnet.utils.cli import UsageError, run
from split_alexnet.tools.evaluate import main as evaluate_main

BASE = ["--batch-size", "8", "--epochs", "2", "--workers", "0", "--log-interval", "1",
        "--init", "caffe", "--no-ten-crop", "--seed", "3", "--devices", "cpu,cpu"]
TOTAL_STEPS = 8
REPO = Path(__file__).resolve().parents[1]


def train(root, out, *extra) -> int:
    return run(T.main, "train", ["--data", str(root), "--out", str(out), *BASE, *extra])


def records(out: Path) -> list[dict]:
    p = Path(out) / "metrics.jsonl"
    if not p.exists():
        return []
    lines = p.read_text().splitlines()
    out_ = []
    for ln in lines:
        try:
            out_.append(json.loads(ln))
        except json.JSONDecodeError:  # a line cut by SIGKILL
            pass
    return out_


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if "error:" in ln]


def temp_files(out: Path) -> list[Path]:
    return sorted(Path(out).glob(".*.tmp"))


def assert_same(a, b, what: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), what
        for k in a:
            assert_same(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), what
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what}[{i}]")
    else:
        assert a == b, what


# ----------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def reference(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train(demo_root, out) == 0
    return out


def _cmd(root, out, *extra) -> list[str]:
    return [sys.executable, "-m", "split_alexnet.train", "--data", str(root), "--out", str(out),
            *BASE, "--checkpoint-minutes", "0", *extra]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Segment:
    """One training process of the chaos run; its stderr goes to a file (no pipe to fill)."""

    def __init__(self, root, out: Path, name: str, *extra, session: bool = False) -> None:
        self.name, self.out = name, out
        self.err_path = out.parent / f"{name}.stderr"
        self.t0, self.n0 = time.monotonic(), len(records(out))
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(_cmd(root, out, *extra), stdout=subprocess.DEVNULL,
                                         stderr=err, env=_env(), cwd=REPO,
                                         start_new_session=session)

    def step(self) -> int:
        """The last step this process has logged (0 before its first)."""
        return max([r["step"] for r in records(self.out)[self.n0:] if r["kind"] == "train"],
                   default=0)

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def wait_for(self, pred, timeout: float = 600.0, poll: float = 0.02) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited early (rc {self.proc.returncode}):\n"
                                     f"{self.err[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"{self.name}: timed out waiting\n{self.err[-3000:]}")
            time.sleep(poll)

    def finish(self, timeout: float = 300.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def chaos(demo_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("chaos")
    out = base / "run"
    rng = random.Random(8)
    rep: dict = {"out": out, "events": []}

    def ckpt_step() -> int:
        return load_checkpoint(out / "last.pt")["progress"]["step"]

    def sigkill_after_a_random_step(name, *extra, first: int) -> None:
        target = min(TOTAL_STEPS - 1, first + rng.randint(0, 1))
        delay = rng.uniform(0.0, 1.5)
        seg = Segment(demo_root, out, name, *extra)
        seg.wait_for(lambda: (out / "last.pt").exists() and seg.step() >= target)
        time.sleep(delay)
        seg.proc.kill()
        seg.finish()
        rep["events"].append({"name": name, "how": "SIGKILL", "target": target,
                              "delay": round(delay, 2), "rc": seg.proc.returncode,
                              "logged": seg.step(), "ckpt": ckpt_step()})

    # A: a fresh run, SIGKILL after step 1 or 2 (+ up to 1.5 s).
    sigkill_after_a_random_step("A", first=1)

    # B: SIGKILL as soon as the first checkpoint write of the resumed run has begun.
    before, old_tmp = ckpt_step(), set(temp_files(out))
    seg = Segment(demo_root, out, "B", "--resume")
    fresh = []

    def writing() -> bool:
        fresh[:] = [p for p in out.glob(".last.pt.*.tmp") if p not in old_tmp]
        return bool(fresh)
    seg.wait_for(writing, poll=0.002)
    seg.proc.kill()
    seg.finish()
    rep["events"].append({"name": "B", "how": "SIGKILL mid-write", "rc": seg.proc.returncode,
                          "tmp_left": [p.name for p in fresh if p.exists()],
                          "ckpt_before": before, "ckpt": ckpt_step()})

    # C: SIGKILL again after a random step.
    sigkill_after_a_random_step("C", "--resume", first=ckpt_step() + 1)

    # D: a Ctrl-C: SIGINT to the whole process group, with 2 loader workers.
    target = min(TOTAL_STEPS - 2, ckpt_step() + rng.randint(1, 2))
    seg = Segment(demo_root, out, "D", "--resume", "--workers", "2", session=True)
    seg.wait_for(lambda: seg.step() >= target)
    seg.wait_for(lambda: len(_loader_workers(seg.proc.pid)) == 2)  # not between two loaders
    workers = _loader_workers(seg.proc.pid)
    os.killpg(seg.proc.pid, signal.SIGINT)
    rep["events"].append({"name": "D", "how": "SIGINT", "target": target, "rc": seg.finish(),
                          "logged": seg.step(), "ckpt": ckpt_step(), "err": seg.err,
                          "workers": workers, "alive": [w for w in workers if _running(w)]})

    # E: SIGTERM to the whole process group with 2 loader workers (a scheduler's preemption,
    # scancel, pkill -f: the workers get it too).
    target = min(TOTAL_STEPS - 1, ckpt_step() + 1)
    seg = Segment(demo_root, out, "E", "--resume", "--workers", "2", session=True)
    seg.wait_for(lambda: seg.step() >= target)
    seg.wait_for(lambda: len(_loader_workers(seg.proc.pid)) == 2)
    workers = _loader_workers(seg.proc.pid)
    os.killpg(seg.proc.pid, signal.SIGTERM)
    rep["events"].append({"name": "E", "how": "SIGTERM", "target": target, "rc": seg.finish(),
                          "logged": seg.step(), "ckpt": ckpt_step(), "err": seg.err,
                          "workers": workers, "alive": [w for w in workers if _running(w)]})

    # F: to the end.
    seg = Segment(demo_root, out, "F", "--resume")
    rep["final_rc"], rep["final_err"] = seg.finish(), seg.err
    print("chaos:", [{k: v for k, v in e.items() if k != "err"} for e in rep["events"]],
          file=sys.stderr)
    return rep


def test_sigkill_after_random_steps_leaves_a_loadable_checkpoint(chaos):
    for ev in (e for e in chaos["events"] if e["how"] == "SIGKILL"):
        assert ev["rc"] == -signal.SIGKILL, ev
        # The checkpoint on disk is a complete one (it loaded, checksum verified) of a step
        # that had finished, at most one behind the last logged step (its save was cut).
        assert ev["logged"] - 1 <= ev["ckpt"] <= ev["logged"], ev


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(chaos):
    (ev,) = [e for e in chaos["events"] if e["name"] == "B"]
    assert ev["rc"] == -signal.SIGKILL, ev
    assert ev["tmp_left"], "the kill did not land mid-write"  # the half-written temporary
    assert ev["ckpt"] == ev["ckpt_before"], ev                 # last.pt untouched


@pytest.mark.parametrize("name", ["D", "E"])
def test_sigint_and_sigterm_save_the_current_step_and_exit_0(chaos, name):
    (ev,) = [e for e in chaos["events"] if e["name"] == name]
    assert ev["rc"] == 0, ev["err"][-3000:]
    assert "signal received" in ev["err"] and "Traceback" not in ev["err"], ev["err"][-3000:]
    assert ev["ckpt"] == ev["logged"] >= ev["target"], ev  # saved at the step it stopped at
    assert f"at step {ev['ckpt']}; continue with --resume" in ev["err"]


def test_interrupted_run_ends_bitwise_identical_to_uninterrupted(chaos, reference):
    assert chaos["final_rc"] == 0, chaos["final_err"][-3000:]
    full = load_checkpoint(reference / "last.pt")
    resumed = load_checkpoint(chaos["out"] / "last.pt")
    assert resumed["progress"] == full["progress"]
    assert resumed["progress"]["step"] == TOTAL_STEPS
    for key in ("model", "optimizer", "schedule", "rng"):
        assert_same(full[key], resumed[key], key)
    # Every step the chaos run logged (repeated steps too) has the reference's loss, bit for
    # bit, and every evaluation the same numbers.
    ref = {(r["kind"], r["step"]): r for r in records(reference) if r["kind"] in ("train", "val")}
    got = [r for r in records(chaos["out"]) if r["kind"] in ("train", "val")]
    assert {(r["kind"], r["step"]) for r in got} == set(ref)
    for r in got:
        want = ref[(r["kind"], r["step"])]
        assert r["loss"] == want["loss"] and r["top1_err"] == want["top1_err"], (r, want)


def test_no_temporary_files_are_left_behind(chaos):
    # Killed saves leave .last.pt.*.tmp; --resume removes them (a preempted run must not fill
    # the disk with 450 MB leftovers).
    assert temp_files(chaos["out"]) == []


# ----------------------------------------------------------------------------- disk full


def test_disk_full_at_checkpoint_time_keeps_the_previous_checkpoint(demo_root, tmp_path,
                                                                   monkeypatch, capsys):
    real_save = C.torch.save
    saved = []

    def save(obj, f, *a, **k):
        saved.append((obj["progress"]["step"], obj["checksum"]))
        if len(saved) == 1:
            return real_save(obj, f, *a, **k)
        f.write(b"\0" * (4 << 20))  # part of a file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(C.torch, "save", save)
    out = tmp_path / "full"
    rc = train(demo_root, out, "--checkpoint-minutes", "0", "--max-steps", "3")
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


@pytest.fixture(scope="module")
def one_step(demo_root, tmp_path_factory):
    """A real run stopped after its first step: last.pt at step 1 of 4 in epoch 1."""
    out = tmp_path_factory.mktemp("one_step") / "run"
    assert train(demo_root, out, "--max-steps", "1") == 0
    return out


def copy_run(src: Path, dst: Path) -> Path:
    """A run folder to continue: checkpoints hard-linked (a save replaces, never edits, them),
    the records copied."""
    shutil.copytree(src, dst, copy_function=lambda a, b: (
        os.link if a.endswith(".pt") else shutil.copyfile)(a, b))
    return dst


def with_file_size_limit(root, out, nbytes: int, *extra) -> subprocess.CompletedProcess:
    """The trainer in a process whose writes past ``nbytes`` in any file fail with EFBIG
    (RLIMIT_FSIZE, SIGXFSZ ignored), as on a full disk. stderr is a pipe: no file."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return subprocess.run(_cmd(root, out, *extra), capture_output=True, text=True, env=_env(),
                          cwd=REPO, timeout=600, preexec_fn=limit)


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
    assert [r["step"] for r in records(out) if r["kind"] == "train"] == [1, 2]
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


@pytest.fixture(scope="module")
def short_root(tmp_path_factory):
    """One step per epoch (2 classes x 4 training images, batch 8) and 40 validation images:
    5 centre-crop batches, 40 ten-crop batches of one image."""
    from split_alexnet.data.demo import make_demo_dataset
    return make_demo_dataset(tmp_path_factory.mktemp("short"), classes=2, train_per_class=4,
                             val_per_class=20, seed=0)


def test_a_failed_curves_write_stops_with_one_line_after_the_checkpoint(short_root, tmp_path,
                                                                       capsys):
    out = tmp_path / "run"
    (out / "curves.png").mkdir(parents=True)  # the plot's rename onto it fails
    capsys.readouterr()
    assert run(T.main, "train", ["--data", str(short_root), "--out", str(out), *BASE,
                                 "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert error_lines(err) == [f"train: error: could not write {out / 'curves.png'}: Is a "
                                "directory; the checkpoints are untouched, stopping"], err
    progress = load_checkpoint(out / "last.pt")["progress"]  # the epoch's own checkpoint
    assert (progress["epoch"], progress["epoch_step"], progress["step"]) == (1, 0, 1)
    assert temp_files(out) == []


# ----------------------------------------------------------------------------- torn records


def test_a_torn_record_is_skipped_and_a_resumed_run_starts_a_new_line(one_step, demo_root,
                                                                      tmp_path, capsys):
    out = copy_run(one_step, tmp_path / "run")
    torn = '{"time": 1700000000.5, "kind": "train", "step": 2, "lo'  # power lost mid-write
    with open(out / "metrics.jsonl", "a") as f:
        f.write(torn)
    capsys.readouterr()
    # To the end of epoch 1: the evaluation, the epoch's checkpoint and curves.png.
    assert train(demo_root, out, "--resume", "--max-steps", "4") == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warned) == 1 and f"{out / 'metrics.jsonl'} ends in a torn record" in warned[0]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    n = lines.index(torn) + 1
    assert json.loads(lines[n])["kind"] == "resume"
    recs = M.read_records(out)
    assert capsys.readouterr().err.strip() == (
        f"warning: {out / 'metrics.jsonl'}: skipped 1 torn record(s) (line {n}), cut short "
        "by a crash or a full disk")
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["epoch"] for r in recs if r["kind"] == "val"] == [1]
    assert Image.open(out / "curves.png").size == (800, 500)


@pytest.mark.parametrize("lines, torn", [
    (['{"kind": "train", "step": 1}', '{"kind": "tr'], [2]),
    (['{"kind": "train", "step": 1}', '{"kind": "tr', '{"kind": "resume", "step": 1}',
      '{"kind": "train", "step": 2}', "\0\0\0\0"], [2, 5]),
    (['{"kind": "train", "step": 1}', '{"kind": "tr', '{"kind": "train", "step": 2}'], None),
])
def test_the_reader_skips_torn_records_and_nothing_else(tmp_path, capsys, lines, torn):
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    if torn is None:  # a damaged line inside the records: not a torn write
        with pytest.raises(UsageError, match=r"metrics.jsonl:2 is not valid JSON"):
            M.read_records(tmp_path)
        return
    recs = M.read_records(tmp_path)
    assert len(recs) == len(lines) - len(torn)
    assert f"skipped {len(torn)} torn record(s) (line {', '.join(map(str, torn))})" in \
        capsys.readouterr().err


# ----------------------------------------------------------------------------- signals


def _loader_workers(pid: int) -> list[int]:
    """The forked children of ``pid`` (DataLoader workers: the same command line)."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    found = []
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and (d / "cmdline").read_bytes() == cmdline:
                found.append(int(d.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _running(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def signalled(short_root, tmp_path_factory):
    """Real processes with 2 loader workers, each sent SIGTERM once its log shows the phase:
    during the evaluation of epoch 1 (the last epoch), then resumed (the evaluation again,
    then the ten-crop test) during the ten-crop test, then resumed to the end."""
    out = tmp_path_factory.mktemp("signalled") / "run"
    flags = ("--epochs", "1", "--ten-crop", "--workers", "2", "--checkpoint-minutes", "30")
    rep: dict = {"out": out}

    def stop_during(name: str, phase: str, *extra) -> None:
        seg = Segment(short_root, out, name, *flags, *extra)
        seg.wait_for(lambda: phase in seg.err, poll=0.01)
        workers = _loader_workers(seg.proc.pid)
        seg.proc.send_signal(signal.SIGTERM)
        rc = seg.finish()
        rep[name] = {"rc": rc, "err": seg.err, "workers": workers,
                     "alive": [w for w in workers if _running(w)],
                     "records": records(out)[seg.n0:],
                     "progress": load_checkpoint(out / "last.pt")["progress"]}

    stop_during("evaluation", "eval: ")
    stop_during("ten_crop", "eval (10 crops): ", "--resume")
    seg = Segment(short_root, out, "finish", *flags, "--resume")
    rep["finish"] = {"rc": seg.finish(), "err": seg.err, "records": records(out)[seg.n0:]}
    return rep


def test_sigterm_during_the_last_epochs_evaluation_saves_before_it_and_exits_0(signalled):
    ev = signalled["evaluation"]
    assert ev["rc"] == 0, ev["err"][-3000:]
    assert "signal received during the evaluation of epoch 1: saved " \
           f"{signalled['out'] / 'last.pt'} at step 1; continue with --resume" in ev["err"]
    assert "Traceback" not in ev["err"]
    assert [r["kind"] for r in ev["records"]] == ["train"]  # the evaluation did not finish
    # The epoch stays open at its last step: a resumed run evaluates it.
    assert ev["progress"] == {"epoch": 0, "epoch_step": 1, "step": 1,
                              "best_top1": float("inf")}


def test_a_resumed_run_repeats_the_interrupted_evaluation(signalled):
    recs = signalled["ten_crop"]["records"]
    assert [r["kind"] for r in recs] == ["resume", "val"], recs
    assert (recs[1]["epoch"], recs[1]["step"], recs[1]["n"]) == (1, 1, 40)


def test_sigterm_during_the_ten_crop_test_exits_0(signalled):
    ev = signalled["ten_crop"]
    assert ev["rc"] == 0, ev["err"][-3000:]
    assert "signal received during the ten-crop test: the training is complete in " \
           f"{signalled['out'] / 'last.pt'} (step 1) and the test did not finish; --resume " \
           "runs it" in ev["err"]
    assert "Traceback" not in ev["err"] and ev["progress"]["epoch"] == 1


def test_resume_after_a_stopped_ten_crop_test_runs_it(signalled):
    fin = signalled["finish"]
    assert fin["rc"] == 0, fin["err"][-3000:]
    assert [r["kind"] for r in fin["records"]] == ["resume", "val_ten_crop"]
    assert fin["records"][1]["n"] == 40


@pytest.mark.parametrize("phase", ["training", "training-sigterm", "evaluation", "ten_crop"])
def test_no_loader_worker_outlives_a_signalled_trainer(request, phase):
    if phase.startswith("training"):  # the chaos run's Ctrl-C, and its SIGTERM to the group
        name = "E" if phase == "training-sigterm" else "D"
        (ev,) = [e for e in request.getfixturevalue("chaos")["events"] if e["name"] == name]
    else:
        ev = request.getfixturevalue("signalled")[phase]
    assert len(ev["workers"]) == 2, ev["workers"]
    assert ev["alive"] == []


def test_a_second_signal_during_a_save_exits_130_keeping_the_previous_checkpoint(
        one_step, demo_root, tmp_path):
    out = copy_run(one_step, tmp_path / "run")
    before = load_checkpoint(out / "last.pt")["checksum"]
    seg = Segment(demo_root, out, "twice", "--resume", "--checkpoint-minutes", "30")
    seg.wait_for(lambda: seg.step() >= 2)
    seg.proc.send_signal(signal.SIGTERM)  # finish the step, save it, stop ...
    seg.wait_for(lambda: any(out.glob(".last.pt.*.tmp")), poll=0.002)
    seg.proc.send_signal(signal.SIGTERM)  # ... no: stop now
    assert seg.finish() == 130, seg.err[-3000:]
    (line,) = error_lines(seg.err)
    assert f"error: a second signal stopped the save of {out / 'last.pt'}: it was abandoned" \
        in line, line
    assert "Traceback" not in seg.err
    assert load_checkpoint(out / "last.pt")["checksum"] == before
    assert temp_files(out) == []


# ----------------------------------------------------------------------------- NaN / inf


def test_poisoned_batch_stops_naming_the_step_and_the_last_good_checkpoint(
        demo_root, tmp_path, monkeypatch, capsys):
    real_finish, real_checksum = L.finish_batch, C.checksum
    calls, sums = [0], {}

    def finish_batch(batch, stats, device, **kw):
        x = real_finish(batch, stats, device, **kw)
        if torch.is_grad_enabled():  # a training batch (evaluation runs under no_grad)
            calls[0] += 1
            if calls[0] == 3:
                x = torch.full_like(x, float("inf"))
        return x

    def checksum(payload):
        h = real_checksum(payload)
        sums.setdefault(payload["progress"]["step"], h)
        return h

    monkeypatch.setattr(L, "finish_batch", finish_batch)
    monkeypatch.setattr(C, "checksum", checksum)
    out = tmp_path / "poison"
    rc = train(demo_root, out, "--checkpoint-minutes", "0")
    err = capsys.readouterr().err
    assert rc == 1
    (line,) = error_lines(err)
    assert "loss is nan at step 3 (epoch 1)" in line, line
    assert f"Last good checkpoint: {out / 'last.pt'}" in line, line
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["progress"]["step"] == 2 and sorted(sums) == [1, 2]
    assert ckpt["checksum"] == sums[2]  # exactly step 2's state
    for t in ckpt["model"].values():
        assert torch.isfinite(t).all()


# ----------------------------------------------------------------------------- checkpoints


class _RunsCode:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _malicious(path: Path, marker: Path, how: str) -> Path:
    payload = {"format": C.FORMAT, "model": {"w": torch.zeros(2)}, "progress": {"step": 1},
               "x": _RunsCode(f"touch {marker}")}
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
    rc = train(demo_root, tmp_path / "o", "--resume", str(evil))
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


def test_bit_flips_and_truncation_are_detected(reference, demo_root, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    shutil.copyfile(reference / "last.pt", bad)
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


def test_a_consistent_file_with_changed_weights_fails_the_checksum(reference, tmp_path):
    """A well-formed zip whose contents differ from what was saved (silent corruption before
    the zip was written, an edited file): only the sha256 recorded at save time sees it."""
    ckpt = torch.load(reference / "last.pt", map_location="cpu", weights_only=True)
    ckpt["model"]["fc8.bias"][0] += 1e-6
    tampered = tmp_path / "tampered.pt"
    torch.save(ckpt, tampered)
    with pytest.raises(CheckpointError, match="corrupt: checksum mismatch"):
        load_checkpoint(tampered)


@pytest.mark.parametrize("what", ["arch", "classes"])
def test_a_checkpoint_of_another_model_names_both(reference, demo_root, tmp_path, capsys, what):
    from split_alexnet.data.demo import make_demo_dataset
    if what == "arch":
        root, extra, want = demo_root, ["--arch", "half", "--single-device"], ("half", 4)
    else:
        root = make_demo_dataset(tmp_path / "d3", classes=3, train_per_class=3,
                                 val_per_class=1, seed=0)
        extra, want = [], ("alexnet", 3)
    argv = ["--data", str(root), "--out", str(tmp_path / "o"), *BASE, *extra,
            "--resume", str(reference / "last.pt")]
    if what == "arch":
        argv.remove("--devices")
        argv.remove("cpu,cpu")
    capsys.readouterr()
    rc = run(T.main, "train", argv)
    err = capsys.readouterr().err
    assert rc == 2
    (line,) = error_lines(err)
    assert "holds arch=alexnet with 4 classes" in line, line
    assert f"needs arch={want[0]} with {want[1]} classes" in line, line


# ----------------------------------------------------------------------------- data


def _jpeg(seed: int, size=(256, 256), quality=90) -> bytes:
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _png(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def _png_bomb(w: int, h: int) -> bytes:
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _jpeg_bomb(w: int, h: int) -> bytes:
    data = bytearray(_jpeg(1, (64, 64)))
    i = data.index(b"\xff\xc0")  # SOF0: length(2) precision(1) height(2) width(2)
    data[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def _bmp_bomb(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "BMP")
    data = bytearray(buf.getvalue())
    data[18:26] = struct.pack("<ii", w, h)
    return bytes(data)


def _hostile_folder(d: Path) -> tuple[set[str], set[str], set[str]]:
    """Files that must load, that must be skipped, and fuzzed ones that may go either way."""
    d.mkdir(parents=True)
    rng = np.random.default_rng(5)
    good_jpeg = _jpeg(0)
    must_load = {
        "good1.jpg": good_jpeg, "good2.jpg": _jpeg(1, (300, 400)),
        "png_named.jpg": _png(),                        # wrong extension, a real image
        "jpeg_named.png": _jpeg(2, (100, 80)),
    }
    must_skip = {
        "zero.jpg": b"", "one_byte.jpg": b"\xff",
        "trunc_10.jpg": good_jpeg[:10], "trunc_third.jpg": good_jpeg[: len(good_jpeg) // 3],
        "header_then_random.jpg": b"\xff\xd8\xff\xe0" + rng.bytes(5000),
        "header_only_random.jpeg": b"\xff\xd8\xff" + rng.bytes(20),
        "png_header_random.png": b"\x89PNG\r\n\x1a\n" + rng.bytes(3000),
        "bomb.png": _png_bomb(100_000, 100_000),
        "bomb.jpg": _jpeg_bomb(65_000, 65_000),
        "bomb.bmp": _bmp_bomb(100_000, 100_000),
        "text.jpg": b"this is not an image\n" * 50,
        "html.png": b"<!doctype html><html><body>404 Not Found</body></html>",
        "zip.gif": b"PK\x03\x04" + rng.bytes(500),
        "elf.webp": b"\x7fELF" + rng.bytes(2000),
        "random.bmp": rng.bytes(4096), "random.tiff": b"II*\x00" + rng.bytes(1000),
    }
    fuzzed = {}
    for k in range(16):  # seeded mutations of a valid JPEG (both decoders see these)
        data = bytearray(good_jpeg)
        for _ in range(int(rng.integers(1, 20))):
            data[int(rng.integers(2, len(data)))] = int(rng.integers(0, 256))
        if k % 4 == 3:
            data = data[: int(rng.integers(100, len(data)))]
        fuzzed[f"fuzz_{k:02d}.jpg"] = bytes(data)
    for name, data in {**must_load, **must_skip, **fuzzed}.items():
        (d / name).write_bytes(data)
    names = lambda group: {str(d / n) for n in group}  # noqa: E731
    return names(must_load), names(must_skip), names(fuzzed)


def test_hostile_image_files_never_crash_or_hang_the_loader(tmp_path):
    must_load, must_skip, fuzzed = _hostile_folder(tmp_path / "train" / "a")
    ds = D.CropFolder(tmp_path / "train", ["a"], mode="train", seed=0)
    assert len(ds) == len(must_load) + len(must_skip) + len(fuzzed)
    loader = D.make_loader(ds, batch_size=4, sampler=D.EpochSampler(len(ds), shuffle=False),
                           workers=2)
    loader.timeout = 60  # a worker stuck on one file fails the test instead of hanging it
    t0 = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert time.monotonic() - t0 < 120
    skipped = {p for b in batches for p in b["skipped"]}
    loaded = sum(len(b["label"]) for b in batches)
    assert loaded + len(skipped) == len(ds)       # every file accounted for
    assert must_skip <= skipped, sorted(must_skip - skipped)
    assert not must_load & skipped, sorted(must_load & skipped)
    for b in batches:
        assert b["image"].shape[1:] == (3, 227, 227) and b["image"].dtype == torch.uint8


def test_training_over_hostile_files_skips_and_counts_them(tmp_path, capsys):
    """The same files inside a training set, end to end (statistics, 2 loader workers, one
    epoch): the run completes and says how many images it skipped."""
    from split_alexnet.data.demo import make_demo_dataset
    root = make_demo_dataset(tmp_path / "d", classes=2, train_per_class=4, val_per_class=1,
                             seed=0)
    cls = D.find_classes(root / "train")[0]
    _, must_skip, _ = _hostile_folder(tmp_path / "bad")
    for p in map(Path, must_skip):
        shutil.copyfile(p, root / "train" / cls / p.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = run(T.main, "train", ["--data", str(root), "--out", str(tmp_path / "o"), *BASE,
                                   "--epochs", "1", "--workers", "2"])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    assert f"{len(must_skip)} unreadable training image(s) skipped this epoch" in err
    assert err.count("warning: skipped unreadable image") == len(must_skip)  # statistics
    assert load_checkpoint(tmp_path / "o" / "last.pt")["progress"]["epoch"] == 1


def _first_epoch_batches(root: Path) -> list[list[str]]:
    classes = D.find_classes(root / "train")
    samples = D.list_samples(root / "train", classes)
    keys = list(D.EpochSampler(len(samples), epoch=0, seed=3, shuffle=True))
    return [[samples[i][0] for _, i in keys[k:k + 8]] for k in range(0, len(keys), 8)]


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_a_dead_loader_worker_is_one_line_naming_the_file(demo_root, tmp_path, monkeypatch,
                                                          capsys, how):
    batches = _first_epoch_batches(demo_root)
    victim = batches[1][-1]  # the last file of batch 2 (worker 1's first task)
    real = D.CropFolder.__getitem__

    def getitem(self, key):
        i = int(key[1]) if isinstance(key, (tuple, list)) else int(key)
        if self.samples[i][0] == victim and torch.utils.data.get_worker_info() is not None:
            if how == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, key)

    monkeypatch.setattr(D.CropFolder, "__getitem__", getitem)
    t0 = time.monotonic()
    rc = train(demo_root, tmp_path / "o", "--workers", "2", "--max-steps", "3")
    assert time.monotonic() - t0 < 120
    err = capsys.readouterr().err
    assert rc == 1, err[-3000:]
    (line,) = error_lines(err)
    assert "DataLoader worker" in line and victim in line, line
    assert all(f in line for f in batches[1]) and batches[3][0] not in line, line
    assert "rerun with --workers 0" in line and "Traceback" not in err, line
