"""``bench loop``: the training loop's own per-step overhead, from host syncs.

A step reads nothing back from the device; the loop reads each step's loss, its mistakes and
the weights' sum (the finiteness check) once per --log-interval (``training/loop.py``). Read
every step (``--log-interval 1``, what every step did before) that is one host sync and one
pass over the 61 M weights per step. This bench trains the real network with a real
:class:`~split_alexnet.training.trainer.Trainer` on a small generated set, alternating
between the two intervals in one run, and reports the median time per step of each and the
difference: the overhead that reading at log intervals removes.

    python -m split_alexnet.bench loop --steps 20 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from split_alexnet.data.demo import make_demo_dataset
from split_alexnet.training.options import parse_command
from split_alexnet.training.trainer import Trainer
from split_alexnet.utils.flags import Number


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", action=Number, kind=int, min=1, default=20,
                   help="Training steps per measurement (default: 20)")
    p.add_argument("--rounds", action=Number, kind=int, min=1, default=3,
                   help="Measurements of each interval, alternating (default: 3)")
    p.add_argument("--batch-size", action=Number, kind=int, min=1, default=4,
                   help="Images per step: small, so that the loop's overhead shows beside "
                        "the compute (default: 4)")
    p.add_argument("--interval", action=Number, kind=int, min=2, default=20,
                   help="The log interval compared with 1 (default: 20, the trainer's)")
    p.add_argument("--devices", default="cpu,cpu", help="The towers' devices (default: cpu,cpu).")


def _time_steps(t: Trainer, steps: int, interval: int) -> float:
    """Seconds per step over ``steps`` training steps read every ``interval`` steps."""
    t.cfg = t.cfg.with_settings(log_interval=interval, max_steps=t.pos.step + steps)
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
    start = time.perf_counter()
    while t.train_epoch().value == "epoch":
        t.pos.epoch, t.pos.epoch_step = t.pos.epoch + 1, 0
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
    return (time.perf_counter() - start) / steps


def run(args: argparse.Namespace) -> list[dict]:
    """Rows of (interval, median seconds per step, each measurement), and the overhead."""
    with tempfile.TemporaryDirectory(prefix="split_alexnet_bench_loop_") as tmp:
        root = make_demo_dataset(Path(tmp) / "data", classes=4, train_per_class=16,
                                 val_per_class=1, seed=0)
        cfg, cmd = parse_command(["--data", str(root), "--out", str(Path(tmp) / "run"),
                                  "--devices", args.devices, "--batch-size",
                                  str(args.batch_size), "--workers", "0", "--init", "caffe",
                                  "--epochs", "1000000", "--checkpoint-minutes", "1e9",
                                  "--watchdog-steps", "0", "--no-ten-crop"])
        t = Trainer.setup(cfg, cmd)
        try:
            t.watchdog.enabled = False
            _time_steps(t, 2, 1)  # warm-up: allocation, first-call costs
            times: dict[int, list[float]] = {1: [], args.interval: []}
            for _ in range(args.rounds):
                for interval in times:
                    times[interval].append(_time_steps(t, args.steps, interval))
        finally:
            t.close()
    rows = [{"bench": "loop", "log_interval": k, "s_per_step": statistics.median(v),
             "runs": v, "batch_size": args.batch_size, "devices": args.devices,
             "threads": torch.get_num_threads(), "torch": torch.__version__}
            for k, v in times.items()]
    every, interval = rows[0]["s_per_step"], rows[1]["s_per_step"]
    print(f"loop: batch {args.batch_size} on {args.devices}, {torch.get_num_threads()} "
          f"threads, median of {args.rounds} x {args.steps} steps")
    print(f"  read every step:       {every * 1e3:8.1f} ms/step")
    print(f"  read every {args.interval:3d} steps:  {interval * 1e3:8.1f} ms/step")
    print(f"  overhead removed:      {(every - interval) * 1e3:8.1f} ms/step "
          f"({(every - interval) / every:.1%} of a step read every step)")
    return rows
