"""``split_alexnet.train``'s main under torchrun, plus a report of what only the ranks see:
each rank that ends its main writes $REPORT/rank<R>.json with its exit code, how many
checkpoints it saved, the RNG state it resumed with and the one its checkpoint held for each
rank, and (if the run succeeded) a digest of its parameters after training and the traffic
its network recorded in its last forward pass. DIE_RANK=R: rank R exits with code 3 right
after joining the process group; STOP_RANK=R: rank R stops itself (SIGSTOP) before its
second step, and a watcher SIGKILLs it once torchrun asks it to stop (SIGTERM);
TERM_EVAL_RANK=R: rank R sends itself SIGTERM as its first evaluation begins (a signal that
reaches one process while the processes evaluate).

Usage: torchrun ... train_with_rank_report.py TRAIN-FLAGS... (run by tests/test_distributed.py,
tests/test_distributed_failures.py, tests/test_finetune.py::test_frozen_layers_under_ddp and
tests/test_towers.py through helpers.torchrun)
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

import split_alexnet.training.checkpoint as checkpoint
import split_alexnet.training.setup as setup_module
from split_alexnet.training.command import main
from split_alexnet.training.trainer import Trainer
from split_alexnet.utils.cli import run

rank = int(os.environ.get("RANK", "0"))
report = {"rank": rank, "saves": 0}
out = Path(os.environ["REPORT"]) / f"rank{rank}.json"
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


Trainer.setup = classmethod(setup)
checkpoint.restore, checkpoint.save_checkpoint = restore, save_checkpoint
if os.environ.get("DIE_RANK") == str(rank):  # this rank dies after joining the group
    def parallelize(*a, **k):
        """Exits with code 3 instead of placing the model."""
        os._exit(3)
    setup_module.parallelize = parallelize
if os.environ.get("STOP_RANK") == str(rank):  # this rank stops (SIGSTOP) at its 2nd step
    import signal
    import subprocess

    import split_alexnet.training.loop as loop_module
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
if os.environ.get("TERM_EVAL_RANK") == str(rank):  # SIGTERM to itself as it evaluates
    import signal

    import split_alexnet.training.loop as loop_module
    _evaluate = loop_module.evaluate

    def evaluate(*a, **k):
        """The evaluation, begun with a SIGTERM to this process."""
        os.kill(os.getpid(), signal.SIGTERM)
        return _evaluate(*a, **k)
    loop_module.evaluate = evaluate
rc = run(main, "split_alexnet.train")
report["rc"] = rc
if rc == 0:  # the parameters after training
    net = trainers[-1].net
    report["params"] = digest(net.state_dict())
    report["traffic"] = [[t.layer, t.src, t.dst, list(t.shape), t.bytes]
                         for t in getattr(net, "traffic", [])]
out.write_text(json.dumps(report))
sys.exit(rc)
