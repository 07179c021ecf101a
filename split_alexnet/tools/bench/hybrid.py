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
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from split_alexnet.data.demo import make_demo_dataset
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


def _run(mode: str, root: Path, out: Path, args: argparse.Namespace) -> float:
    """Images/s of one training run in ``mode``: the median of its "train" records after
    the first two."""
    flags = ["--data", str(root), "--out", str(out), "--batch-size", str(args.batch_size),
             "--max-steps", str(args.steps), "--epochs", "1000", "--workers", "0",
             "--log-interval", "1", "--init", "caffe", "--no-ten-crop", "--watchdog-steps", "0",
             "--checkpoint-minutes", "1e9", "--eval-every", "1000", "--devices", "cpu,cpu"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = str(max(1, args.threads // 2))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "split_alexnet.train", *flags, *MODES[mode]]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{mode} run failed ({p.returncode}): {p.stderr[-2000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_s"] for r in recs if r["kind"] == "train"][2:]
    return statistics.median(speeds)


def run(args: argparse.Namespace) -> list[dict]:
    """One row per mode (median images/s over the rounds, each round's figure); prints each
    mode's ratio to pair."""
    speeds: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="split_alexnet_bench_hybrid_") as tmp:
        per_class = max(4, args.batch_size * (args.steps + 1) // 4)
        root = make_demo_dataset(Path(tmp) / "data", classes=4, train_per_class=per_class,
                                 val_per_class=1, seed=0)
        for r in range(args.rounds):
            for mode in MODES:
                out = Path(tmp) / f"{mode.replace(' ', '_')}{r}"
                speeds[mode].append(_run(mode, root, out, args))
    rows = [{"bench": "hybrid", "mode": m, "processes": 2, "images_per_s": statistics.median(v),
             "runs": v, "batch_size": args.batch_size, "threads": args.threads,
             "torch": torch.__version__} for m, v in speeds.items()]
    pair = rows[0]["images_per_s"]
    print(f"hybrid: 2 processes, batch {args.batch_size} in all, {args.threads} threads in "
          f"all, median of {args.rounds} runs of {args.steps} steps")
    for row in rows:
        print(f"  {row['mode']:<18} {row['images_per_s']:7.1f} img/s  "
              f"/ pair {row['images_per_s'] / pair:.2f}")
    return rows
