"""Distributed jobs that go wrong: a rank that dies or stops answering, a loss that
diverges on some rank, a rank whose whole batch is unreadable. Real torch.distributed
processes (gloo, CPU) through the real launcher and ``split_alexnet.train``'s main, wrapped
by tests/programs/train_with_rank_report.py (what only the ranks see); the jobs that end
normally: tests/test_distributed.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import DIST_FLAGS as COMMON
from helpers import (BASE, PROGRAMS, REPO, rank_reports, records, stored, torchrun,
                     torchrun_runs)
from split_alexnet.data.dataset import EpochSampler, find_classes, list_samples
from split_alexnet.data.demo import make_demo_dataset

DRIVER = PROGRAMS / "train_with_rank_report.py"


@pytest.fixture(scope="module")
def data(module_tmp):
    """3 classes x 4 training images (global batch 6: 2 steps per epoch), 3 x 3 validation
    images."""
    return make_demo_dataset(module_tmp("dist") / "data", classes=3,
                             train_per_class=4, val_per_class=3, seed=0)


def lose_rank_1(data, base: Path, how: str):
    """A job whose rank 1 dies after joining the group (``how="dies"``), or stops (SIGSTOP)
    before its second step (``"stops"``), with a collective timeout of 10 s: (process,
    seconds)."""
    env = {"DIE_RANK" if how == "dies" else "STOP_RANK": "1",
           "SPLIT_ALEXNET_DIST_TIMEOUT": "10"}
    return torchrun(DRIVER, base / f"report_{how}",
                    ["--data", str(data), "--out", str(base / how), *COMMON],
                    env_extra=env, timeout=180)


@pytest.fixture(scope="module")
def rank_1_dies(data, module_tmp):
    """The job whose rank 1 dies (:func:`lose_rank_1`), for the two tests that judge it."""
    return lose_rank_1(data, module_tmp("dies"), "dies")


@pytest.mark.slow
def test_a_dead_rank_stops_the_job_quickly(rank_1_dies):
    """Rank 1 dies right after joining the group; rank 0 must not hang."""
    p, dt = rank_1_dies
    assert p.returncode != 0
    assert dt < 90, f"took {dt:.0f} s"
    # torchrun names the root cause: rank 1, our exit code 3.
    root = p.stderr[p.stderr.index("Root Cause"):]
    assert re.search(r"rank\s*:\s*1\b", root) and re.search(r"exitcode\s*:\s*3\b", root), root


@pytest.fixture(scope="module")
def three_runs(demo_root, module_tmp):
    """One job of 2 processes, three runs in turn (:func:`helpers.torchrun_runs`): the
    divergence of test_stop_on_divergence_stops_every_rank_together under --parallel pair
    and under --parallel towers, then the run of
    test_a_rank_whose_whole_batch_is_unreadable_stays_in_step: (process, each run's output,
    the folder of each run's folder and reports)."""
    base = module_tmp("job")
    data = make_demo_dataset(base / "data", classes=3, train_per_class=4, val_per_class=3,
                             seed=0)
    classes = find_classes(data / "train")
    samples = list_samples(data / "train", classes)
    first = EpochSampler(len(samples), epoch=0, seed=5, rank=1, world_size=2).indices()[:3]
    for i in first:  # rank 1's first batch: 3 unreadable files (real ones, garbage bytes)
        Path(samples[i][0]).write_bytes(b"not an image at all")
    runs = {f"report_{parallel}": [
        "--data", demo_root, "--out", base / parallel, *BASE, "--devices", "cpu,cpu",
        "--parallel", parallel, "--lr", "0.3", "--max-steps", "4", "--stop-on-divergence",
        "--checkpoint-minutes", "0"] for parallel in ("pair", "towers")}
    runs["report_unreadable"] = ["--data", data, "--out", base / "unreadable", *COMMON]
    p, text = torchrun_runs(DRIVER, base, runs, timeout=400)
    assert p.returncode == 1, f"rc {p.returncode}\n{p.stderr[-3000:]}"  # the divergences'
    return p, text, base


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["pair", "towers"])
def test_stop_on_divergence_stops_every_rank_together(three_runs, parallel):
    """--lr 0.3 with --stop-on-divergence on the 4-class set (as test_finite's one process):
    the loss leaves 3 x ln 4 within 4 steps. Every rank judges the same loss, the highest of
    the replicas' (under --parallel towers tower 1's process holds none), so every rank
    stops with exit 1 at the same step: rank 0 says so in one line, nothing is saved after
    the last good last.pt (saved every step: --checkpoint-minutes 0)."""
    _, text, base = three_runs
    out, err = base / parallel, text[f"report_{parallel}"]
    reports = rank_reports(base / f"report_{parallel}")
    assert reports[0]["seconds"] < 150, reports[0]["seconds"]
    # Both ranks ended their main with exit 1 (neither was left to torchrun to stop).
    assert {r: rep["rc"] for r, rep in reports.items()} == {0: 1, 1: 1}, err[-3000:]
    (line,) = [ln for ln in err.splitlines() if "split_alexnet.train: error:" in ln]
    assert "error: the training loss diverged: " in line, line
    assert ("(the highest of 2 replicas')" in line) == (parallel == "pair"), line
    assert f"the last good checkpoint: {out / 'last.pt'}" in line, line
    assert "DIVERGENCE:" not in err
    assert f'File "{REPO / "split_alexnet"}' not in err, err[-3000:]
    (rec,) = [r for r in records(out) if r["kind"] == "divergence"]
    assert rec["loss"] > rec["bound"]
    assert stored(out / "last.pt")["progress"]["step"] == rec["step"] - 1
    assert sorted(p.name for p in out.glob("*.pt")) == ["last.pt"]


@pytest.mark.slow
def test_a_rank_whose_whole_batch_is_unreadable_stays_in_step(three_runs):
    """Rank 1's first batch is 3 unreadable files (real ones, garbage bytes): every rank skips
    that step together, and the run ends, exit 0, the ranks holding the same parameters."""
    _, _, base = three_runs
    reports = rank_reports(base / "report_unreadable")
    assert reports[0]["rc"] == reports[1]["rc"] == 0
    assert reports[0]["params"] == reports[1]["params"]
    assert [r["step"] for r in records(base / "unreadable") if r["kind"] == "train"] == [1]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["dies", "stops"])
def test_a_lost_peer_ends_the_job_with_one_line_naming_the_rank(data, tmp_path, request, how):
    """Rank 1 dies after joining the group, or stops (SIGSTOP) before its second step: the
    job ends within the collective timeout, rank 0 saying so in one line naming rank 1 (or,
    when torchrun stops rank 0 first, torchrun's report naming rank 1)."""
    p, dt = request.getfixturevalue("rank_1_dies") if how == "dies" else \
        lose_rank_1(data, tmp_path, how)
    assert p.returncode != 0 and dt < 120, f"rc {p.returncode}, {dt:.0f} s"
    lines = [ln for ln in p.stderr.splitlines() if "split_alexnet.train: error:" in ln]
    # A silent peer: rank 0 reaches the timeout and says who. A dead one: torchrun may stop
    # rank 0 (SIGTERM) before its collective fails; its report names rank 1 then.
    assert len(lines) == (1 if how == "stops" else len(lines)) <= 1, p.stderr[-3000:]
    assert all("rank 0: rank 1 of the job died or stopped answering" in ln for ln in lines)
    if not lines:
        assert re.search(r"rank\s*:\s*1\b", p.stderr[p.stderr.index("Root Cause"):])
    # No traceback through the trainer's code on any rank (torchrun's own report stays).
    assert f'File "{REPO / "split_alexnet"}' not in p.stderr, p.stderr[-3000:]
