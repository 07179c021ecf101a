"""Timing real training runs for the benchmarks that compare ways of running the trainer
(``bench towers``, ``bench hybrid``): each run is ``split_alexnet.train`` on a small generated
set, started in one process or under torchrun; its speed is the median images/s of its
"train" records after the first two (start-up left out), and the rounds alternate between
the modes."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from split_alexnet.data.demo import make_demo_dataset

#: The trainer in one process, and under torchrun as two processes on this machine.
ONE_PROCESS = [sys.executable, "-m", "split_alexnet.train"]
TWO_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", "2", "-m", "split_alexnet.train"]


@dataclass(frozen=True)
class Mode:
    """One way of running the trainer: how it is started, the flags that select the mode,
    and the intra-op threads of each process."""

    command: list[str]
    flags: list[str]
    threads: int


def _images_per_s(name: str, mode: Mode, root: Path, out: Path,
                  args: argparse.Namespace) -> float:
    """Images/s of one run of ``mode``."""
    flags = ["--data", str(root), "--out", str(out), "--batch-size", str(args.batch_size),
             "--max-steps", str(args.steps), "--epochs", "1000", "--workers", "0",
             "--log-interval", "1", "--init", "caffe", "--no-ten-crop", "--watchdog-steps", "0",
             "--checkpoint-minutes", "1e9", "--eval-every", "1000"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = str(mode.threads)
    p = subprocess.run([*mode.command, *flags, *mode.flags], env=env, capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{name} run failed ({p.returncode}): {p.stderr[-2000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median([r["images_per_s"] for r in recs if r["kind"] == "train"][2:])


def speeds(modes: dict[str, Mode], args: argparse.Namespace,
           bench: str) -> dict[str, list[float]]:
    """Each mode's images/s in each of ``args.rounds`` rounds (``args.steps`` steps of
    ``args.batch_size`` images per run), on one generated set of 4 classes."""
    out: dict[str, list[float]] = {name: [] for name in modes}
    with tempfile.TemporaryDirectory(prefix=f"split_alexnet_bench_{bench}_") as tmp:
        per_class = max(4, args.batch_size * (args.steps + 1) // 4)
        root = make_demo_dataset(Path(tmp) / "data", classes=4, train_per_class=per_class,
                                 val_per_class=1, seed=0)
        for r in range(args.rounds):
            for name, mode in modes.items():
                run_dir = Path(tmp) / f"{name.replace(' ', '_')}{r}"
                out[name].append(_images_per_s(name, mode, root, run_dir, args))
    return out
