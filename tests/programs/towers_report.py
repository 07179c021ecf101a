"""``split_alexnet.train`` under torchrun, plus what only each rank can see, as JSON in
``$REPORT/rank<R>.json``: the traffic its network recorded in its last forward pass, how many
checkpoints it wrote, and a digest of its parameters. Run by tests/test_towers.py."""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

import split_alexnet.training.checkpoint as checkpoint
from split_alexnet.training.command import main
from split_alexnet.training.trainer import Trainer
from split_alexnet.utils.cli import run

rank = int(os.environ.get("RANK", "0"))
report = {"rank": rank, "saves": 0}
trainers = []
_setup, _save = Trainer.setup, checkpoint.save_checkpoint


def setup(cls, *args):
    trainers.append(_setup(*args))
    return trainers[-1]


def save_checkpoint(*args, **kwargs):
    report["saves"] += 1
    return _save(*args, **kwargs)


Trainer.setup = classmethod(setup)
checkpoint.save_checkpoint = save_checkpoint
rc = run(main, "split_alexnet.train")
if rc == 0:
    net = trainers[-1].net
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    report["params"] = h.hexdigest()
    report["traffic"] = [[t.layer, t.src, t.dst, list(t.shape), t.bytes] for t in net.traffic]
    Path(os.environ["REPORT"], f"rank{rank}.json").write_text(json.dumps(report))
sys.exit(rc)
