"""``split_alexnet.train``'s main under torchrun, plus a report of what only the ranks see:
each rank that ends its main writes $REPORT/rank<R>.json with its exit code, how many
checkpoints it saved, how many networks it drew the weights of, how long its main took, the
RNG state it resumed with and the one its checkpoint held for each rank, and (if the run
succeeded) a digest of its parameters after training and the traffic its network recorded in
its last forward pass. DIE_RANK=R: rank R
exits with code 3 right after joining the process group; STOP_RANK=R: rank R stops itself
(SIGSTOP) before its second step, and a watcher SIGKILLs it once torchrun asks it to stop
(SIGTERM); TERM_EVAL_RANK=R: rank R sends itself SIGTERM as its first evaluation begins (a
signal that reaches one process while the processes evaluate).

Several runs in one job: ``--report NAME TRAIN-FLAGS... --then --report NAME2 ...`` runs the
trainer's main once per segment (``--term-eval-rank R`` before a segment's flags: that run's
TERM_EVAL_RANK), in order, in the same processes (each run joins a process group of its own,
on its own prefix of torchrun's store, and leaves it, as a job of its own would); run NAME's
reports go to $REPORT/NAME/, and each run begins with the line ``== run NAME`` on rank 0's
stdout and stderr. The job's exit code is the first non-zero one of its runs. A run so
joined saves the start of torchrun (its imports: about 2 CPU-seconds on the test machines)
and of its processes (each forked from the test's preloaded interpreter, programs/forked.py;
about 4 CPU-seconds each from a fresh one).

Usage: torchrun ... train_with_rank_report.py TRAIN-FLAGS... (run by tests/test_distributed.py,
tests/test_distributed_failures.py, tests/test_finetune.py::test_frozen_layers_under_ddp,
tests/test_hybrid.py and tests/test_towers.py through helpers.torchrun and
helpers.torchrun_runs)
"""

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import split_alexnet.network.model as model_module
import split_alexnet.training.checkpoint as checkpoint
import split_alexnet.training.loop as loop_module
import split_alexnet.training.setup as setup_module
from split_alexnet.training.command import main
from split_alexnet.training.trainer import Trainer
from split_alexnet.utils.cli import run

rank = int(os.environ.get("RANK", "0"))


def new_report() -> dict:
    """A run's report before it starts: its counters at zero."""
    return {"rank": rank, "saves": 0, "inits": 0}


report = new_report()
trainers = []


def digest(tensors) -> str:
    """sha256 over the names and bytes of ``tensors`` (a dict), in name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                 .tobytes())
    return h.hexdigest()


_setup, _restore, _save = Trainer.setup, checkpoint.restore, checkpoint.save_checkpoint
_init_weights = model_module.init_weights_


def setup(cls, *args):
    """The trainer's setup, keeping the trainer it builds."""
    trainers.append(_setup(*args))
    return trainers[-1]


def restore(t, ckpt, path, *rest):
    """The resume, recording the RNG state it restored and the states the file held."""
    _restore(t, ckpt, path, *rest)
    report["resumed_rng"] = digest({"cpu": torch.get_rng_state()})
    report["ckpt_rng"] = {k: digest({"cpu": v["cpu"]}) for k, v in ckpt["rng"].items()}


def save_checkpoint(*a, **k):
    """The checkpoint writer, counting its calls on this rank."""
    report["saves"] += 1
    return _save(*a, **k)


def init_weights_(*a, **k):
    """The networks' initialisation, counting its calls on this rank."""
    report["inits"] += 1
    return _init_weights(*a, **k)


Trainer.setup = classmethod(setup)
checkpoint.restore, checkpoint.save_checkpoint = restore, save_checkpoint
model_module.init_weights_ = init_weights_
if os.environ.get("DIE_RANK") == str(rank):  # this rank dies after joining the group
    def parallelize(*a, **k):
        """Exits with code 3 instead of placing the model."""
        os._exit(3)
    setup_module.parallelize = parallelize
if os.environ.get("STOP_RANK") == str(rank):  # this rank stops (SIGSTOP) at its 2nd step
    import subprocess

    _step = loop_module.train_step

    # A stopped process keeps torchrun's SIGTERM pending: the agent SIGKILLs it after its
    # grace period (30 s). This watcher does it as soon as the SIGTERM is pending.
    REAPER = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
pid, term = int(sys.argv[1]), 1 << (signal.SIGTERM - 1)
while True:
    try:
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        break
    pending = [int(ln.split()[1], 16) for ln in status.splitlines()
               if ln.startswith(("SigPnd:", "ShdPnd:"))]
    if any(p & term for p in pending):
        os.kill(pid, signal.SIGKILL)
        break
    time.sleep(0.1)
"""

    def train_step(t, batch):
        """The training step; at step 2 the process stops itself, as a hung peer."""
        if t.pos.step == 1:
            subprocess.Popen([sys.executable, "-c", REAPER, str(os.getpid())])
            os.kill(os.getpid(), signal.SIGSTOP)
        return _step(t, batch)
    loop_module.train_step = train_step
term_eval_rank = [os.environ.get("TERM_EVAL_RANK")]  # this run's; a run's option sets it
_evaluate = loop_module.evaluate


def evaluate(*a, **k):
    """The evaluation, begun with a SIGTERM to this process where this run asks for it."""
    if term_eval_rank[0] == str(rank):
        os.kill(os.getpid(), signal.SIGTERM)
    return _evaluate(*a, **k)


loop_module.evaluate = evaluate


def segments(argv: list[str]) -> list[tuple[str | None, str | None, list[str]]]:
    """The runs of ``argv``, split at --then: (report folder name or None, the rank to send
    itself SIGTERM as the run's first evaluation begins or None, trainer flags)."""
    runs, cur = [], []
    for a in [*argv, "--then"]:
        if a != "--then":
            cur.append(a)
            continue
        options = {"--report": None, "--term-eval-rank": term_eval_rank[0]}
        while cur[:1] and cur[0] in options:
            options[cur[0]], cur = cur[1], cur[2:]
        runs.append((options["--report"], options["--term-eval-rank"], cur))
        cur = []
    return runs


_init_process_group, _store, _run_index = dist.init_process_group, [], [0]


def init_process_group(backend=None, **kwargs):
    """torchrun's process group, on this run's prefix of torchrun's store: a group joined
    again after an earlier run's group was destroyed must not meet that run's keys."""
    return _init_process_group(
        backend, store=dist.PrefixStore(f"run{_run_index[0]}/", _store[0]),
        rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), **kwargs)


def wait_for_every_rank(index: int) -> None:
    """Returns once every rank has ended run ``index`` (on torchrun's store: no process group
    is left between two runs), as the end of a job ensures: a run may read what the one
    before wrote."""
    key, world = f"run{index}/ended", int(os.environ["WORLD_SIZE"])
    _store[0].add(key, 1)
    while _store[0].add(key, 0) < world:
        time.sleep(0.05)


runs = segments(sys.argv[1:])
if len(runs) > 1:
    dist.init_process_group = init_process_group
    _store.append(next(dist.rendezvous("env://"))[0])
first_failure = 0
for index, (name, term_eval_rank[0], argv) in enumerate(runs):
    _run_index[0] = index
    report = new_report()
    folder = Path(os.environ["REPORT"]) / (name or "")
    folder.mkdir(parents=True, exist_ok=True)
    if name and rank == 0:
        print(f"== run {name}", flush=True)
        print(f"== run {name}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    rc = run(main, "split_alexnet.train", argv)
    report["rc"], report["seconds"] = rc, time.monotonic() - t0
    if rc == 0:  # the parameters after training
        net = trainers[-1].net
        report["params"] = digest(net.state_dict())
        report["traffic"] = [[t.layer, t.src, t.dst, list(t.shape), t.bytes]
                             for t in getattr(net, "traffic", [])]
    (folder / f"rank{rank}.json").write_text(json.dumps(report))
    first_failure = first_failure or rc
    if len(runs) > 1:
        wait_for_every_rank(index)
sys.exit(first_failure)
