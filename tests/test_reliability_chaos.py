"""A run interrupted five times ends bitwise identical to an uninterrupted one
(docs/reliability.md, guarantee 1).

``chaos``: the demo run (32 train images, batch 8, 4 steps per epoch, 2 epochs = 8 steps, the
full-size network: every checkpoint is ~450 MB) as real ``python -m split_alexnet.train``
processes with ``--checkpoint-minutes 0`` (last.pt after every step), interrupted five times -
SIGKILL after a step drawn from a seeded RNG plus a random delay, SIGKILL while a checkpoint
is being written, SIGKILL again, SIGINT to the whole process group (a Ctrl-C, with 2 loader
workers), SIGTERM - each time continued with ``--resume``, then run to the end. It is
compared with ``reference`` (conftest.py), the same run uninterrupted in this process: on the
CPU every comparison is exact (``torch.equal``).
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time

import pytest
import torch

from helpers import Segment, loader_workers, records, running, stored, temp_files
from split_alexnet.utils.checkpoint_file import load_checkpoint

TOTAL_STEPS = 8


def assert_same(a, b, what: str) -> None:
    """a == b, tensors by ``torch.equal``, through nested dicts, lists and tuples."""
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


@pytest.fixture(scope="module")
def chaos(demo_root, module_tmp):
    base = module_tmp("chaos")
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
    seg.wait_for(lambda: len(loader_workers(seg.proc.pid)) == 2)  # not between two loaders
    workers = loader_workers(seg.proc.pid)
    os.killpg(seg.proc.pid, signal.SIGINT)
    rep["events"].append({"name": "D", "how": "SIGINT", "target": target, "rc": seg.finish(),
                          "logged": seg.step(), "ckpt": ckpt_step(), "err": seg.err,
                          "workers": workers, "alive": [w for w in workers if running(w)]})

    # E: SIGTERM to the whole process group with 2 loader workers (a scheduler's preemption,
    # scancel, pkill -f: the workers get it too).
    target = min(TOTAL_STEPS - 1, ckpt_step() + 1)
    seg = Segment(demo_root, out, "E", "--resume", "--workers", "2", session=True)
    seg.wait_for(lambda: seg.step() >= target)
    seg.wait_for(lambda: len(loader_workers(seg.proc.pid)) == 2)
    workers = loader_workers(seg.proc.pid)
    os.killpg(seg.proc.pid, signal.SIGTERM)
    rep["events"].append({"name": "E", "how": "SIGTERM", "target": target, "rc": seg.finish(),
                          "logged": seg.step(), "ckpt": ckpt_step(), "err": seg.err,
                          "workers": workers, "alive": [w for w in workers if running(w)]})

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
    full = stored(reference / "last.pt")
    resumed = stored(chaos["out"] / "last.pt")
    assert resumed["progress"] == full["progress"]
    assert resumed["progress"]["step"] == TOTAL_STEPS
    for key in ("model", "optimizer", "schedule", "rng"):
        assert_same(full[key], resumed[key], key)
    # Every step the chaos run logged (repeated steps too) has the reference's loss, bit for
    # bit, and every evaluation the same numbers.
    ref = {(r["kind"], r["step"]): r for r in records(reference, torn_ok=True)
           if r["kind"] in ("train", "val")}
    got = [r for r in records(chaos["out"], torn_ok=True) if r["kind"] in ("train", "val")]
    assert {(r["kind"], r["step"]) for r in got} == set(ref)
    for r in got:
        want = ref[(r["kind"], r["step"])]
        assert r["loss"] == want["loss"] and r["top1_err"] == want["top1_err"], (r, want)


def test_no_temporary_files_are_left_behind(chaos):
    # Killed saves leave .last.pt.*.tmp; --resume removes them (a preempted run must not fill
    # the disk with 450 MB leftovers).
    assert temp_files(chaos["out"]) == []


@pytest.mark.parametrize("phase", ["training", "training-sigterm"])
def test_no_loader_worker_outlives_a_signalled_trainer(chaos, phase):
    """The chaos run's Ctrl-C, and its SIGTERM to the group (the evaluation and the ten-crop
    test: tests/test_reliability_signals.py)."""
    name = "E" if phase == "training-sigterm" else "D"
    (ev,) = [e for e in chaos["events"] if e["name"] == name]
    assert len(ev["workers"]) == 2, ev["workers"]
    assert ev["alive"] == []
