"""SIGTERM during the evaluation, the ten-crop test and a save (docs/reliability.md,
guarantee 2).

``signalled``: real ``python -m split_alexnet.train`` processes with 2 loader workers on
``short_root`` (conftest.py), sent SIGTERM during the last epoch's evaluation and during the
ten-crop test, each continued with ``--resume``. And ``one_step`` (conftest.py) continued and
stopped by two signals during a save, and a second signal at every line of a save
(programs/interrupt_save.py).
"""

from __future__ import annotations

import json
import signal

import pytest

from helpers import (PROGRAMS, Segment, copy_run, error_lines, loader_workers, records,
                     run_python, running, temp_files)
from split_alexnet.utils.checkpoint_file import load_checkpoint


@pytest.fixture(scope="module")
def signalled(short_root, module_tmp):
    """Real processes with 2 loader workers, each sent SIGTERM once its log shows the phase:
    during the evaluation of epoch 1 (the last epoch), then resumed (the evaluation again,
    then the ten-crop test) during the ten-crop test, then resumed to the end."""
    out = module_tmp("signalled") / "run"
    flags = ("--epochs", "1", "--ten-crop", "--workers", "2", "--checkpoint-minutes", "30")
    rep: dict = {"out": out}

    def stop_during(name: str, phase: str, *extra) -> None:
        seg = Segment(short_root, out, name, *flags, *extra)
        seg.wait_for(lambda: phase in seg.err, poll=0.01)
        workers = loader_workers(seg.proc.pid)
        seg.proc.send_signal(signal.SIGTERM)
        rc = seg.finish()
        rep[name] = {"rc": rc, "err": seg.err, "workers": workers,
                     "alive": [w for w in workers if running(w)],
                     "records": records(out, torn_ok=True)[seg.n0:],
                     "progress": load_checkpoint(out / "last.pt")["progress"]}

    stop_during("evaluation", "eval: ")
    stop_during("ten_crop", "eval (10 crops): ", "--resume")
    seg = Segment(short_root, out, "finish", *flags, "--resume")
    rep["finish"] = {"rc": seg.finish(), "err": seg.err,
                     "records": records(out, torn_ok=True)[seg.n0:]}
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


@pytest.mark.parametrize("phase", ["evaluation", "ten_crop"])
def test_no_loader_worker_outlives_a_signalled_trainer(signalled, phase):
    """The evaluation's and the ten-crop test's (the training's: the chaos run,
    tests/test_reliability_chaos.py)."""
    ev = signalled[phase]
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


def test_a_second_signal_at_any_line_of_a_save_keeps_a_whole_checkpoint_and_the_process(
        tmp_path):
    """Where the signal of the test above lands is up to the machine; here it lands at each
    line of a save in turn (programs/interrupt_save.py). At the lines between the creation of
    torch's zip writer and torch.save's ``with``, the writer outlives the file and completes
    its archive from its destructor: into nothing (checkpoint_file._SaveStream), not into the
    closed file, whose error inside a C++ destructor would abort the process."""
    p = run_python(PROGRAMS / "interrupt_save.py", tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    sweep = json.loads(p.stdout)
    assert sweep["bad"] == [], sweep["bad"]
    assert sweep["lines"] > 300 and sweep["interrupted"] == sweep["lines"] - 1, sweep
    assert 0 < sweep["new"] < 50, sweep  # the last lines, after the rename, keep the new one
