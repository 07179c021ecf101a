"""Data parallelism over the two-tower model: real torch.distributed processes (gloo, CPU).

Every multi-process run goes through the real launcher (``python -m torch.distributed.run
--standalone --nproc-per-node 2``) and the real ``split_alexnet.train`` main, with
``--devices cpu,cpu`` in each process. A small driver (tests/programs/train_with_rank_report.py)
wraps the main to record what only the ranks themselves can see: a digest of each rank's
parameters after training, how many checkpoints each rank wrote, and the RNG state each rank
resumed with. (Jobs that go wrong: tests/test_distributed_failures.py.)

The runs are shared by several tests (module fixture): each costs ~20 s on 2 busy cores.
Data: 3 classes x 5 training images with ``--holdout 1`` in every run (3 held out, which do
not divide among 2 ranks: 2 + 1; 12 trained on: global batch 6 = 3 per rank, 2 steps per
epoch) and 3 x 3 = 9 validation images, which do not divide either (5 + 4).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from helpers import DIST_FLAGS as COMMON
from helpers import PROGRAMS, REPO, rank_reports, records, stored, torchrun, torchrun_runs
from split_alexnet.data.demo import make_demo_dataset
from split_alexnet.utils.cli import run
from split_alexnet.training.command import main as train_main

DRIVER = PROGRAMS / "train_with_rank_report.py"
LAUNCH = REPO / "launch"
N_VAL = 9
#: The flags of every run here: the distributed tests' flags, and a hold-out of one image per
#: class, checked under torchrun by test_holdout_under_torchrun_counts_each_image_once.
FLAGS = [*COMMON, "--holdout", "1"]


@pytest.fixture(scope="module")
def dist_runs(module_tmp):
    base = module_tmp("dist")
    data = make_demo_dataset(base / "data", classes=3, train_per_class=5, val_per_class=3,
                             seed=0)
    res = {"base": base, "data": data, "times": {}}

    def flags(out_name, *extra):
        return ["--data", str(data), "--out", str(base / out_name), *FLAGS, *extra]

    # One job of 2 ranks: uninterrupted (2 steps, evaluation, checkpoint); the same cut after
    # step 1 (mid-epoch); and that checkpoint resumed into a folder of its own.
    t0 = time.monotonic()
    p, res["stderr"] = torchrun_runs(DRIVER, base, {
        "report_ddp": flags("ddp"),
        "report_cut1": flags("cut", "--max-steps", "1"),
        "report_cut": flags("resumed", "--resume", base / "cut" / "last.pt")})
    assert p.returncode == 0, f"rc {p.returncode}\n{p.stderr[-4000:]}"
    res["times"]["ddp, cut and resumed"] = time.monotonic() - t0
    res["ddp"], res["resumed"] = base / "ddp", base / "resumed"
    res["cut_ckpt"] = stored(base / "cut" / "last.pt")

    def ddp(out_name, *extra, nproc=2):
        out = base / out_name
        p, dt = torchrun(DRIVER, base / f"report_{out_name}", flags(out_name, *extra),
                         nproc=nproc, timeout=300)
        assert p.returncode == 0, f"{out_name}: rc {p.returncode}\n{p.stderr[-4000:]}"
        res["times"][out_name] = dt
        return out

    # The same two replicas as 4 processes, a tower each (--parallel towers).
    res["towers4"] = ddp("towers4", "--parallel", "towers", "--devices", "cpu,cpu,cpu,cpu",
                         nproc=4)
    # One process, the same global batches.
    t0 = time.monotonic()
    res["single"] = base / "single"
    assert run(train_main, "train", ["--data", str(data), "--out", str(res["single"]),
                                     *FLAGS]) == 0
    res["times"]["single"] = time.monotonic() - t0
    print("run times (s):", {k: round(v, 1) for k, v in res["times"].items()}, file=sys.stderr)
    return res


# ------------------------------------------------------------------------------ training


def test_ranks_hold_identical_parameters(dist_runs):
    rep = rank_reports(dist_runs["base"] / "report_ddp")
    assert set(rep) == {0, 1}
    assert rep[0]["params"] == rep[1]["params"]


def test_only_data_rank_0_draws_the_weights(dist_runs):
    """DDP gives every replica data rank 0's parameters when it is built, so the other
    replicas make their network without drawing it, and a resume draws on no rank (the
    checkpoint's weights are loaded); test_ranks_hold_identical_parameters and
    test_ddp_equals_one_process_on_the_same_global_batches show the weights are still the
    seed's on every rank."""
    def inits(report: str) -> dict[int, int]:
        return {r: rep["inits"] for r, rep in rank_reports(dist_runs["base"] / report).items()}
    assert inits("report_ddp") == {0: 1, 1: 0}
    assert inits("report_cut") == {0: 0, 1: 0}  # the resumed run
    # --parallel towers: rank = 2 * data rank + tower; both towers of replica 0 draw
    assert inits("report_towers4") == {0: 1, 1: 1, 2: 0, 3: 0}


def test_ddp_equals_one_process_on_the_same_global_batches(dist_runs):
    """EpochSampler: rank r takes perm[r::2] in consecutive chunks of 3, so step k's union over
    the ranks is perm[6k:6k+6], exactly what one process with batch 6 takes. DDP averages the
    two ranks' mean gradients = the mean over the 6 images. Dropout is off (the masks would
    differ); augmentation is a pure function of (seed, epoch, index), the same in both."""
    ddp = stored(dist_runs["ddp"] / "last.pt")
    one = stored(dist_runs["single"] / "last.pt")
    assert ddp["progress"]["step"] == one["progress"]["step"] == 2
    assert ddp["world_size"] == 2 and one["world_size"] == 1
    for k, v in one["model"].items():
        torch.testing.assert_close(ddp["model"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    for buf, named in one["optimizer"]["buffers"].items():  # momentum
        for k, v in named.items():
            torch.testing.assert_close(ddp["optimizer"]["buffers"][buf][k], v, rtol=1e-4,
                                       atol=1e-6, msg=f"{buf} {k}")
    # Each rank logs only its own shard's training loss, so compare the evaluation, which
    # covers the whole validation set on both sides.
    v_ddp = [r for r in records(dist_runs["ddp"]) if r["kind"] == "val"][-1]
    v_one = [r for r in records(dist_runs["single"]) if r["kind"] == "val"][-1]
    assert v_ddp["n"] == v_one["n"] == N_VAL
    assert v_ddp["top1_err"] == pytest.approx(v_one["top1_err"])
    assert v_ddp["loss"] == pytest.approx(v_one["loss"], rel=1e-4)


def test_only_rank_0_writes(dist_runs):
    rep = rank_reports(dist_runs["base"] / "report_ddp")
    # rank 0 writes last.pt and best.pt (the weights without the optimizer's state)
    assert rep[0]["saves"] == 2 and rep[1]["saves"] == 0
    out = dist_runs["ddp"]
    kinds = [r["kind"] for r in records(out)]
    # one line per event, not one per rank
    assert kinds == ["train", "train", "val", "holdout"]
    assert sorted(p.name for p in out.iterdir()) == \
        ["best.pt", "config.json", "curves.png", "epoch_001.pt", "last.pt", "metrics.jsonl",
         "train.lock"]


def test_evaluation_counts_every_image_once(dist_runs):
    # 9 images over 2 ranks: 5 + 4, no padding, sums all-reduced.
    for out in (dist_runs["ddp"], dist_runs["resumed"]):
        (val,) = [r for r in records(out) if r["kind"] == "val"]
        assert val["n"] == N_VAL


def test_resume_under_torchrun_equals_uninterrupted(dist_runs):
    cut = dist_runs["cut_ckpt"]
    assert cut["progress"]["step"] == 1 and cut["progress"]["epoch_step"] == 1
    assert set(cut["rng"]) == {"rank0", "rank1"}  # one RNG state per rank
    assert not torch.equal(cut["rng"]["rank0"]["cpu"], cut["rng"]["rank1"]["cpu"])
    rep = rank_reports(dist_runs["base"] / "report_cut")
    for r in (0, 1):  # every rank loaded the same file, and its own RNG state from it
        assert rep[r]["resumed_rng"] == rep[r]["ckpt_rng"][f"rank{r}"]
    assert rep[0]["params"] == rep[1]["params"]
    assert rep[0]["params"] == rank_reports(dist_runs["base"] / "report_ddp")[0]["params"]
    a = stored(dist_runs["ddp"] / "last.pt")
    b = stored(dist_runs["resumed"] / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["progress"] == b["progress"]


def test_towers_over_two_pairs_equal_ddp_over_pairs(dist_runs):
    """4 processes under --parallel towers (2 replicas of a tower pair, DDP among the
    processes holding the same tower) train exactly what 2 DDP processes of both towers do."""
    a = stored(dist_runs["towers4"] / "last.pt")
    b = stored(dist_runs["ddp"] / "last.pt")
    assert a["progress"] == b["progress"] and a["world_size"] == b["world_size"] == 2
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    for buf, named in b["optimizer"]["buffers"].items():
        for k, v in named.items():
            assert torch.equal(a["optimizer"]["buffers"][buf][k], v), (buf, k)
    assert set(a["rng"]) == set(b["rng"]) == {"rank0", "rank1"}  # one per replica
    for r in b["rng"]:
        assert torch.equal(a["rng"][r]["cpu"], b["rng"][r]["cpu"]), r
    (va,) = [r for r in records(dist_runs["towers4"]) if r["kind"] == "val"]
    (vb,) = [r for r in records(dist_runs["ddp"]) if r["kind"] == "val"]
    assert va["n"] == vb["n"] == N_VAL and va["loss"] == vb["loss"]


DIST_ENV = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}


@pytest.mark.parametrize("argv, words", [
    (["--gpus", "0,1,2"], "odd number of GPUs"),
    (["--gpus", "0,1"], "need 4 GPUs"),
    (["--gpus", "0,1,2,3"], "no CUDA device"),
    (["--gpus", "0,0,1,1"], "names a GPU twice"),
    (["--devices", "cpu,cpu", "--batch-size", "7"], "does not divide among 2 processes"),
    (["--devices", "cpu,cpu", "--backend", "nccl"], "nccl backend needs CUDA devices"),
    (["--devices", "cpu,cpu", "--backend", "mpi"], "--backend must be one of"),
])
def test_bad_settings_fail_up_front(monkeypatch, capsys, tmp_path, argv, words):
    for k, v in DIST_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on GPU machines
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    import torch.distributed as dist
    monkeypatch.setattr(dist, "init_process_group",
                        lambda *a, **k: pytest.fail("reached init_process_group"))
    rc = run(train_main, "split_alexnet.train", ["--out", str(tmp_path), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1, err
    assert err[0].startswith("split_alexnet.train: error: ") and words in err[0], err


def test_per_process_batch_allows_any_size(monkeypatch):
    import split_alexnet.training.distributed as d
    from split_alexnet.network.placement import resolve_devices
    from split_alexnet.training.options import parse_config

    def devices_for_rank(cfg, ctx):  # what distributed.setup asks placement for
        rt = cfg.runtime
        return resolve_devices(rt.gpus, rt.devices, rt.single_device,
                               torchrun=(ctx.local_rank, ctx.local_world_size))

    ctx = d.Context(rank=1, world_size=4, local_rank=1, local_world_size=4)
    assert d.local_batch_size(parse_config(["--batch-size", "128"]), ctx) == 32
    assert d.local_batch_size(parse_config(["--batch-size", "7", "--per-process-batch"]),
                              ctx) == 7
    cfg = parse_config(["--gpus", "0,1,2,3,4,5,6,7", "--single-device"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert devices_for_rank(cfg, ctx) == (torch.device("cuda", 1),)
    cfg = parse_config(["--gpus", "0,1,2,3,4,5,6,7"])
    assert devices_for_rank(cfg, ctx) == (torch.device("cuda", 2), torch.device("cuda", 3))
    cfg = parse_config([])  # default: every visible GPU, a pair per local rank
    assert devices_for_rank(cfg, ctx) == (torch.device("cuda", 2), torch.device("cuda", 3))
    assert d.resolve_backend(cfg.runtime.backend, devices_for_rank(cfg, ctx)) == "nccl"
    assert d.resolve_backend(parse_config(["--devices", "cpu,cpu"]).runtime.backend,
                             (torch.device("cpu"),) * 2) == "gloo"


# ------------------------------------------------------------------------------ launch scripts


@pytest.fixture
def script_env(tmp_path):
    """A clean environment with stub nvidia-smi (8 GPUs) and scontrol on PATH."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "nvidia-smi").write_text("#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do "
                                     "echo \"GPU $i: Stub (UUID: GPU-$i)\"; done\n")
    (bin_ / "scontrol").write_text("#!/bin/sh\n[ \"$1 $2\" = \"show hostnames\" ] || exit 1\n"
                                   "echo gpu-node-017; echo gpu-node-018\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("NGPU", "GPUS", "GPUS_PER_NODE",
                                                        "CUDA_VISIBLE_DEVICES", "MASTER_ADDR",
                                                        "MASTER_PORT", "TORCHRUN", "PYTHON")}
    env.update(PATH=f"{bin_}{os.pathsep}{env['PATH']}", DRY_RUN="1")
    return env


def sh(script: str, env: dict, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], env={**env, **extra},
                          capture_output=True, text=True, timeout=30)


def test_launch_one_pair(script_env):
    p = sh("train_node.sh", script_env, "--data", "/d", NGPU="2")  # 1 node x 2 GPUs
    assert p.stdout.strip() == \
        "torchrun --standalone --nproc-per-node 1 -m split_alexnet.train --data /d"


def test_launch_one_node_of_8(script_env):
    p = sh("train_node.sh", script_env, "--data", "/data/in", "--out", "runs/x")  # nvidia-smi
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == ("torchrun --standalone --nproc-per-node 4 -m split_alexnet.train "
                                "--data /data/in --out runs/x")
    p = sh("train_node.sh", script_env, "--single-device", "--data", "/d")
    assert p.stdout.strip() == ("torchrun --standalone --nproc-per-node 8 -m split_alexnet.train "
                                "--single-device --data /d")
    p = sh("train_node.sh", script_env, "--data", "/d", CUDA_VISIBLE_DEVICES="4,5,6,7")
    assert "--nproc-per-node 2 " in p.stdout
    for mode in (["--parallel", "hybrid"], ["--parallel=hybrid"], ["--parallel", "towers"]):
        p = sh("train_node.sh", script_env, *mode, "--data", "/d")
        assert p.stdout.strip() == ("torchrun --standalone --nproc-per-node 8 -m "
                                    f"split_alexnet.train {' '.join(mode)} --data /d")


def test_launch_two_nodes_of_8(script_env):
    slurm = dict(SLURM_JOB_NODELIST="gpu-node-[017-018]", SLURM_NNODES="2", SLURM_JOB_ID="4242",
                 SLURM_GPUS_ON_NODE="8")
    p = sh("train_multinode.slurm", script_env, "--data", "/shared/in", **slurm)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == (
        "srun --nodes 2 --ntasks-per-node 1 --kill-on-bad-exit=1 torchrun --nnodes 2 "
        "--nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint gpu-node-017:29500 "
        "--rdzv-id 4242 -m split_alexnet.train --data /shared/in")
    p = sh("train_multinode.slurm", script_env, "--data", "/d", **slurm, MASTER_PORT="31000",
           GPUS_PER_NODE="4")
    assert "--nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint gpu-node-017:31000" in p.stdout


@pytest.mark.parametrize("script, env", [
    ("train_node.sh", {"NGPU": "7"}),
    ("train_node.sh", {"NGPU": "1"}),
    ("train_multinode.slurm", {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2",
                               "GPUS_PER_NODE": "3"}),
    ("train_multinode.slurm", {}),  # not inside a SLURM job
    ("train_node.sh", {"NGPU": "two"}),
])
def test_launch_bad_settings(script_env, script, env):
    p = sh(script, script_env, "--data", "/d", **env)
    assert p.returncode == 2
    assert p.stdout == "" and len(p.stderr.strip().splitlines()) == 1 and "error" in p.stderr


def test_launch_slurm_copy_finds_helpers_in_submit_dir(script_env, tmp_path):
    """sbatch runs a copy of the script from a spool folder: the helpers come from
    $SLURM_SUBMIT_DIR/launch, and without them the job stops with one error line."""
    spool = tmp_path / "spool"
    spool.mkdir()
    script = spool / "slurm_script"
    shutil.copy2(LAUNCH / "train_multinode.slurm", script)
    slurm = dict(SLURM_JOB_NODELIST="gpu-node-[017-018]", SLURM_NNODES="2", SLURM_JOB_ID="7",
                 SLURM_GPUS_ON_NODE="8")
    env = {**script_env, **slurm}
    p = subprocess.run(["bash", str(script), "--data", "/d"], cwd=spool, capture_output=True,
                       text=True, timeout=30, env={**env, "SLURM_SUBMIT_DIR": str(REPO)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == (
        "srun --nodes 2 --ntasks-per-node 1 --kill-on-bad-exit=1 torchrun --nnodes 2 "
        "--nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint gpu-node-017:29500 "
        "--rdzv-id 7 -m split_alexnet.train --data /d")
    p = subprocess.run(["bash", str(script), "--data", "/d"], cwd=spool, capture_output=True,
                       text=True, timeout=30, env={**env, "SLURM_SUBMIT_DIR": str(spool)})
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1
    assert "launch/common.sh" in p.stderr and "repository root" in p.stderr


def test_launch_puts_the_checkout_on_pythonpath(script_env, tmp_path):
    """The launched command imports this checkout's package (the helpers set PYTHONPATH)."""
    probe = tmp_path / "torchrun"
    probe.write_text("#!/bin/sh\nprintf '%s' \"$PYTHONPATH\"\n")
    probe.chmod(0o755)
    env = {**script_env, "DRY_RUN": "0", "TORCHRUN": str(probe), "PYTHONPATH": "/elsewhere"}
    p = sh("train_node.sh", env, "--data", "/d", NGPU="2")
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"{REPO}:/elsewhere"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_launch_scripts_pass_shellcheck():
    p = subprocess.run(["shellcheck", "-s", "bash", *(str(f) for f in sorted(LAUNCH.iterdir()))],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout


def test_holdout_under_torchrun_counts_each_image_once(dist_runs):
    """--holdout 1 on 3 classes x 5 training images: 3 held out (2 + 1 over the ranks), 12
    trained on; the hold-out's error equals one process's on the same split."""
    assert dist_runs["stderr"]["report_ddp"].count(
        "--holdout 1: 3 of 15 training images held out") == 1  # rank 0 only
    (hold,) = [r for r in records(dist_runs["ddp"]) if r["kind"] == "holdout"]
    (hold1,) = [r for r in records(dist_runs["single"]) if r["kind"] == "holdout"]
    assert hold["n"] == hold1["n"] == 3 and hold["step"] == hold1["step"] == 2
    assert hold["top1_err"] == hold1["top1_err"]
    assert hold["loss"] == pytest.approx(hold1["loss"], rel=1e-4)
    (val,) = [r for r in records(dist_runs["ddp"]) if r["kind"] == "val"]
    assert val["n"] == N_VAL
