"""``bench towers``: the paper's two towers as two processes (``--parallel towers``, under
torchrun, the links as collectives) beside the same two towers in one process (``--parallel
pair``), training the real network on the CPU, in one run: images/s of each, their ratio, and
the bytes each link carries per step.

Each measurement is a real ``split_alexnet.train`` run of ``--steps`` steps on a small
generated set; the rounds alternate between the two, and the first records of each run
(start-up) are left out. The cores are shared alike: the one process uses ``--threads``
intra-op threads, each tower process ``--threads / 2``.

    python -m split_alexnet.bench towers --steps 8 --rounds 2 --batch-size 16
"""

from __future__ import annotations

import argparse
import statistics

import torch

from split_alexnet.network.model import INPUT_SIZE, SplitAlexNet
from split_alexnet.tools.bench.trainruns import ONE_PROCESS, TWO_PROCESSES, Mode, speeds
from split_alexnet.utils.flags import Number

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", action=Number, kind=int, min=3, default=8,
                   help="Training steps per run, the first two not timed (default: 8)")
    p.add_argument("--rounds", action=Number, kind=int, min=1, default=2,
                   help="Runs of each mode, alternating (default: 2)")
    p.add_argument("--batch-size", action=Number, kind=int, min=1, default=16,
                   help="Images per step (default: 16)")
    p.add_argument("--threads", action=Number, kind=int, min=1, default=2,
                   help="Intra-op threads in all (default: 2): the one process's, or half "
                        "each for the two tower processes")


def link_bytes(batch: int) -> list[dict]:
    """Bytes each link carries per training step at ``batch``: the forward's transfers, as
    ``net.traffic`` records them, and the same bytes back in the backward."""
    net = SplitAlexNet(10, init=None)
    with torch.no_grad():
        net(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE))
    rows: dict[tuple[str, int, int], int] = {}
    for tr in net.traffic:
        key = (tr.layer, tr.src, tr.dst)
        rows[key] = rows.get(key, 0) + tr.bytes * batch
    return [{"layer": layer, "forward": f"tower {src} -> tower {dst}", "bytes_forward": b,
             "bytes_backward": b} for (layer, src, dst), b in rows.items()]


def run(args: argparse.Namespace) -> list[dict]:
    """One row per mode (median images/s over the rounds, each round's figure) and one per
    link; prints the ratio towers / pair."""
    modes = {"pair": Mode(ONE_PROCESS, ["--devices", "cpu,cpu"], args.threads),
             "towers": Mode(TWO_PROCESSES, ["--parallel", "towers", "--devices", "cpu,cpu"],
                            max(1, args.threads // 2))}
    rows = [{"bench": "towers", "parallel": m, "images_per_s": statistics.median(v),
             "runs": v, "batch_size": args.batch_size, "threads": args.threads,
             "torch": torch.__version__} for m, v in speeds(modes, args, "towers").items()]
    links = [{"bench": "towers", "link": True, **row} for row in link_bytes(args.batch_size)]
    pair, towers = rows[0]["images_per_s"], rows[1]["images_per_s"]
    print(f"towers: batch {args.batch_size}, {args.threads} threads in all, median of "
          f"{args.rounds} runs of {args.steps} steps")
    print(f"  --parallel pair   (one process):      {pair:7.1f} img/s")
    print(f"  --parallel towers (a process a tower): {towers:7.1f} img/s")
    print(f"  towers / pair: {towers / pair:.2f}")
    total = 0
    for row in links:
        total += row["bytes_forward"] + row["bytes_backward"]
        print(f"  {row['layer']:>5} {row['forward']}: {row['bytes_forward'] / 2**20:6.2f} MiB "
              "forward, as many back")
    print(f"  per step, both directions: {total / 2**20:.1f} MiB")
    return rows + links
