"""``bench hybrid``: --parallel hybrid (schedule 'gather', and 'sequential' with
--fc-updates each) beside --parallel pair DDP, K = 2 processes under torchrun, training the
real network on the CPU, in one run: images/s of each and their ratios to pair.

Each measurement is a real ``split_alexnet.train`` run of ``--steps`` steps on a small
generated set; the rounds alternate between the modes, and the first two records of each run
(start-up) are left out. Each process uses ``--threads / 2`` intra-op threads.

    python -m split_alexnet.bench hybrid --steps 8 --rounds 2 --batch-size 16
"""

from __future__ import annotations

import argparse
import statistics

import torch

from split_alexnet.tools.bench.trainruns import TWO_PROCESSES, Mode, speeds
from split_alexnet.utils.flags import Number

#: The modes, as the flags that select them.
MODES = {"pair": ["--parallel", "pair"],
         "hybrid gather": ["--parallel", "hybrid"],
         "hybrid sequential": ["--parallel", "hybrid", "--hybrid-schedule", "sequential",
                               "--fc-updates", "each"]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", action=Number, kind=int, min=3, default=8,
                   help="Training steps per run, the first two not timed (default: 8)")
    p.add_argument("--rounds", action=Number, kind=int, min=1, default=2,
                   help="Runs of each mode, alternating (default: 2)")
    p.add_argument("--batch-size", action=Number, kind=int, min=2, default=16,
                   help="Images per step in all, split across the 2 processes (default: 16)")
    p.add_argument("--threads", action=Number, kind=int, min=2, default=2,
                   help="Intra-op threads in all, half per process (default: 2)")


def run(args: argparse.Namespace) -> list[dict]:
    """One row per mode (median images/s over the rounds, each round's figure); prints each
    mode's ratio to pair."""
    modes = {name: Mode(TWO_PROCESSES, [*flags, "--devices", "cpu,cpu"],
                        max(1, args.threads // 2)) for name, flags in MODES.items()}
    rows = [{"bench": "hybrid", "mode": m, "processes": 2, "images_per_s": statistics.median(v),
             "runs": v, "batch_size": args.batch_size, "threads": args.threads,
             "torch": torch.__version__} for m, v in speeds(modes, args, "hybrid").items()]
    pair = rows[0]["images_per_s"]
    print(f"hybrid: 2 processes, batch {args.batch_size} in all, {args.threads} threads in "
          f"all, median of {args.rounds} runs of {args.steps} steps")
    for row in rows:
        print(f"  {row['mode']:<18} {row['images_per_s']:7.1f} img/s  "
              f"/ pair {row['images_per_s'] / pair:.2f}")
    return rows
