"""--parallel towers: the paper's two towers as two processes (real torchrun, gloo, CPU) train
the same function as the two towers in one process, bit for bit, with dropout on; a
checkpoint of either resumes in the other; both processes record the in-process traffic.

Data: 3 classes x 4 training images, batch 6 (2 steps per epoch), 3 x 3 validation images.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import (CPU_PAIR, PROGRAMS, rank_reports, records, run_outputs, runs_argv,
                     stored, torchrun_command)
from split_alexnet.data.demo import make_demo_dataset
from split_alexnet.network.model import SplitAlexNet
from split_alexnet.network.placement import tower_rank_device
from split_alexnet.training.command import main as train_main
from split_alexnet.training.distributed import Context, check_parallel
from split_alexnet.training.options import parse_config
from split_alexnet.utils.cli import UsageError, run

DRIVER = PROGRAMS / "train_with_rank_report.py"
COMMON = ["--batch-size", "6", "--epochs", "1", "--workers", "0", "--log-interval", "1",
          "--init", "caffe", "--no-ten-crop", "--seed", "5"]
LRN_ALL = ["--lrn", "caffe", "--lrn-span", "all"]


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the torchrun worker of ``rank`` among ``launcher``'s children."""
    for d in Path("/proc").iterdir():
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            if f"RANK={rank}".encode() in (d / "environ").read_bytes().split(b"\0"):
                return int(d.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


#: The SIGTERM runs of :func:`tower_job`: (--parallel, when rank 1's process gets SIGTERM).
SIGTERM_RUNS = [("towers", "training"), ("hybrid", "training"), ("towers", "evaluation")]


@pytest.fixture(scope="module")
def tower_job(module_tmp):
    """One job of 2 processes (the driver's runs in turn) and the in-process runs around it:

    * the same two steps as towers and in one process; a towers run cut after step 1 and
      resumed in one process (with Caffe's LRN across the towers: the halo exchange), and an
      in-process run cut and resumed as towers;
    * the runs of SIGTERM_RUNS, each of 1000 epochs, stopped by a SIGTERM to rank 1's process
      alone, sent from here once the run has logged a step, or by the process to itself as the
      run's first evaluation begins.

    Returns the run folders by name, "base", and "sigterm": each SIGTERM run's output."""
    base = module_tmp("towers")
    data = make_demo_dataset(base / "data", classes=3, train_per_class=4, val_per_class=3,
                             seed=0)
    term_data = make_demo_dataset(base / "term_data", classes=4, train_per_class=4,
                                  val_per_class=3, seed=0)
    res = {"base": base}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each tower process: bitwise needs the same GEMM split

    def here(out: str, *extra: str) -> Path:
        assert run(train_main, "train", ["--data", str(data), "--out", str(base / out),
                                         *CPU_PAIR, *COMMON, *extra]) == 0
        return base / out

    def towers(out: str, *extra: str) -> list[str]:
        return ["--data", str(data), "--out", str(base / out), "--parallel", "towers",
                *CPU_PAIR, *COMMON, *extra]

    res["pair"] = here("pair", "--max-steps", "2")
    res["all_ref"] = here("all_ref", "--max-steps", "2", *LRN_ALL)
    here("p2t", "--max-steps", "1")
    runs = {"report_towers": towers("towers", "--max-steps", "2"),
            "report_t2p": towers("t2p", "--max-steps", "1", *LRN_ALL),
            "report_p2t": towers("p2t", "--max-steps", "2", "--resume")}  # in-process, cut
    term = {f"{mode}-{when}": [*(["--term-eval-rank", "1"] if when == "evaluation" else []),
                               "--data", term_data, "--out", base / f"{mode}-{when}",
                               "--parallel", mode, *CPU_PAIR, *COMMON, "--epochs", "1000",
                               "--checkpoint-minutes", "1e6"] for mode, when in SIGTERM_RUNS}
    cmd, env = torchrun_command(DRIVER, base, runs_argv({**runs, **term}))
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        for name in (f"{m}-{w}" for m, w in SIGTERM_RUNS if w == "training"):
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and job.poll() is None and \
                    not records(base / name, torn_ok=True):  # a step done
                time.sleep(0.2)
            pid = rank_pid(job.pid, 1)
            assert pid is not None
            os.kill(pid, signal.SIGTERM)
        out, err = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, err[-3000:]
    res["sigterm"] = run_outputs(out, err, term)
    res["towers"], res["p2t"] = base / "towers", base / "p2t"
    # a resume takes the run's settings: --parallel pair brings the towers into one process
    res["t2p"] = here("t2p", "--max-steps", "2", "--resume", "--parallel", "pair", *LRN_ALL)
    torch.set_num_threads(threads)
    return res


def assert_same_run(a: Path, b: Path) -> None:
    """Two run folders whose last.pt hold the same state, bit for bit."""
    x, y = stored(a / "last.pt"), stored(b / "last.pt")
    assert x["progress"] == y["progress"]
    for k, v in y["model"].items():
        assert torch.equal(x["model"][k], v), k
    for buf, named in y["optimizer"]["buffers"].items():
        for k, v in named.items():
            assert torch.equal(x["optimizer"]["buffers"][buf][k], v), (buf, k)
    assert x["optimizer"]["groups"] == y["optimizer"]["groups"]
    assert x["rng"].keys() == y["rng"].keys()
    for r in y["rng"]:
        assert torch.equal(x["rng"][r]["cpu"], y["rng"][r]["cpu"]), r


def test_towers_equal_the_in_process_pair_bit_for_bit(tower_job):
    """Two steps with dropout on (0.5): weights, momentum, random state and position."""
    assert stored(tower_job["towers"] / "last.pt")["progress"]["step"] == 2
    assert_same_run(tower_job["towers"], tower_job["pair"])
    rep = rank_reports(tower_job["base"] / "report_towers")
    assert rep[0]["saves"] >= 1 and rep[1]["saves"] == 0  # rank 0 writes, rank 1 sends
    assert rep[0]["params"] != rep[1]["params"]  # each holds its own tower


def test_both_processes_record_the_in_process_traffic(tower_job):
    rep = rank_reports(tower_job["base"] / "report_towers")
    assert rep[0]["traffic"] == rep[1]["traffic"]
    batch = rep[0]["traffic"][0][3][0]  # the last forward's batch (evaluation's last)
    net = SplitAlexNet(3, init=None).eval()
    with torch.no_grad():
        net(torch.zeros(batch, 3, 227, 227))
    assert rep[0]["traffic"] == [[t.layer, t.src, t.dst, list(t.shape), t.bytes]
                                 for t in net.traffic]
    assert [t[0] for t in rep[0]["traffic"]] == ["conv3", "conv3", "fc6", "fc6", "fc7", "fc7",
                                                  "fc8"]


def test_a_towers_run_resumes_in_process_and_back(tower_job):
    """Cut after step 1 in one layout, resumed in the other: the uninterrupted run's state.
    The first pair runs Caffe's LRN across the towers, whose halo the processes exchange."""
    assert_same_run(tower_job["t2p"], tower_job["all_ref"])
    assert_same_run(tower_job["p2t"], tower_job["pair"])
    rep = rank_reports(tower_job["base"] / "report_t2p")
    assert [t[0] for t in rep[0]["traffic"]][:4] == ["norm1", "norm1", "norm2", "norm2"]
    assert rep[0]["traffic"][0][3][1] == 2  # two channels of halo each way


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("ctx, argv, words", [
    (Context(), [], "start it with torchrun"),
    (Context(rank=0, world_size=3), [], "an even number of processes"),
    (Context(rank=0, world_size=2), ["--single-device"], "--single-device has one column"),
    (Context(rank=0, world_size=2), ["--arch", "half"], "--arch half has one column"),
])
def test_towers_settings_that_cannot_work_are_refused_up_front(ctx, argv, words):
    cfg = parse_config(["--parallel", "towers", *argv])
    with pytest.raises(UsageError, match=words):
        check_parallel(cfg, ctx)


def test_each_tower_process_takes_its_entry_of_the_device_list():
    assert tower_rank_device(None, "cpu,cpu", 1, 2) == torch.device("cpu")
    with pytest.raises(UsageError, match="names 2 device.* for the 4 processes"):
        tower_rank_device(None, "cpu,cpu", 0, 4)


def test_towers_without_torchrun_is_one_line_and_exit_2(tmp_path, capsys):
    rc = run(train_main, "train", ["--data", str(tmp_path), "--parallel", "towers",
                                   "--devices", "cpu,cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "start it with torchrun" in err[0], err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode, when", SIGTERM_RUNS)
def test_sigterm_to_one_tower_process_saves_once_and_every_process_exits_0(tower_job, mode,
                                                                           when):
    """SIGTERM to rank 1's process alone (tower 1; under --parallel hybrid, the second half
    of fc6-fc8), during training or as the epoch's evaluation begins (where each process
    evaluates its batches: a process that stopped alone would leave its peer waiting in the
    towers' exchange): the processes agree on the stop, rank 0 saves last.pt once, and
    every process's main ends with exit 0."""
    name = f"{mode}-{when}"
    base = tower_job["base"]
    out, err = base / name, tower_job["sigterm"][name]
    rep = rank_reports(base / name)
    assert rep[0]["rc"] == rep[1]["rc"] == 0, err[-3000:]
    assert rep[0]["saves"] >= 1 and rep[1]["saves"] == 0
    assert err.count("signal received") == 1, err[-3000:]
    if when == "evaluation":
        assert "signal received during the evaluation of epoch 1" in err, err[-3000:]
    step = stored(out / "last.pt")["progress"]["step"]
    assert step == max(r["step"] for r in records(out) if r["kind"] == "train")


def test_the_towers_bench_counts_the_links_bytes_as_the_docs_table():
    """docs/scaling.md: 234,496 bytes per image forward over the four links (fp32), as many
    back; fc8's link one way."""
    from split_alexnet.tools.bench.towers import link_bytes
    rows = link_bytes(128)
    assert sum(r["bytes_forward"] for r in rows) == 128 * 234_496 == 30_015_488
    assert all(r["bytes_backward"] == r["bytes_forward"] for r in rows)
    assert [(r["layer"], r["forward"]) for r in rows if r["layer"] == "fc8"] == \
        [("fc8", "tower 1 -> tower 0")]
