"""``bench comm``: the bytes each process sends per training step under each parallel mode,
computed from the real networks' shapes (nothing is run): ``--parallel pair`` (DDP across K
processes, each holding both towers), ``towers`` (K processes, a pair per replica: the links
of the paper's split plus DDP of each tower across the K/2 replicas) and ``hybrid`` with
each schedule (K processes: fc6-fc8 split by units, the convolutional layers' gradients
all-reduced).

``b`` is the images of one data replica per step: a process under pair and hybrid, a pair of
processes under towers. fp32 values (4 bytes). Collectives are counted as ring algorithms
send (NCCL's and gloo's ring): an all-reduce of N bytes sends 2 (K-1)/K N per process, an
all-gather or reduce-scatter whose whole tensor is N bytes (K-1)/K N, a broadcast or reduce
of N bytes (K-1)/K N on average (a pipelined chain). The batch sizes that --parallel hybrid
exchanges on the host (8 bytes per process per pass) are left out.
tests/test_hybrid.py checks the hybrid rows against the collectives a real run calls.

    python -m split_alexnet.bench comm --batch 128 --classes 1000
"""

from __future__ import annotations

import argparse

import torch

from split_alexnet.network.hybrid import HybridAlexNet
from split_alexnet.network.model import AlexNet, ModelConfig, count_parameters
from split_alexnet.network.towers import RankTower
from split_alexnet.tools.bench.towers import link_bytes
from split_alexnet.utils.flags import Number

FLOAT = 4  # bytes of an fp32 value
POOL5 = 9216  # fc6's input per image
KS = (2, 4, 8)
MODES = ("pair", "towers", "hybrid gather", "hybrid sequential")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", action=Number, kind=int, min=1, default=128,
                   help="Images per data replica per step, b (default: 128, the paper's)")
    p.add_argument("--classes", action=Number, kind=int, min=8, default=1000,
                   help="Units of fc8 (default: 1000); K = 2, 4, 8 must divide it")


def _ring_all_reduce(n_bytes: float, k: int) -> float:
    return 2 * (k - 1) / k * n_bytes


def sizes(classes: int) -> dict[str, int]:
    """Parameter counts of the whole network, its convolutional part, and each tower
    process's share (tower 0 holds fc8)."""
    with torch.device("meta"):
        whole = AlexNet(ModelConfig(num_classes=classes, init=None))
        conv = sum(p.numel() for p in HybridAlexNet(whole, parts=1).conv_parameters())
        split = whole.split()
        tower0 = count_parameters(RankTower.of(split, 0))
        tower1 = count_parameters(RankTower.of(split, 1))
    return {"whole": count_parameters(whole), "conv": conv, "tower0": tower0,
            "tower1": tower1}


def bytes_per_step(mode: str, k: int, b: int, classes: int) -> dict[str, float]:
    """What one process sends per training step under ``mode`` with ``k`` processes and
    ``b`` images per data replica: {"activities": ..., "gradients": ..., "total": ...} in
    bytes (for towers, tower 0's process, which also holds fc8's gradients)."""
    n = sizes(classes)
    if mode == "pair":
        act, grad = 0.0, _ring_all_reduce(n["whole"] * FLOAT, k)
    elif mode == "towers":
        if k % 2:
            raise ValueError("--parallel towers needs an even process count")
        links = link_bytes(b)  # every link, forward; as many bytes come back
        act = sum(r["bytes_forward"] + r["bytes_backward"] for r in links) / 2
        grad = _ring_all_reduce(n["tower0"] * FLOAT, k // 2)
    elif mode in ("hybrid gather", "hybrid sequential"):
        # gather: pool5 of all K*b images all-gathered, its gradient reduce-scattered;
        # sequential: each process's b images broadcast in turn, their gradient reduced to
        # it: K passes of b rows, the same bytes. Then fc6's and fc7's units gathered and
        # fc8's (the logits), each gradient reduce-scattered back.
        rows = k * b
        per_exchange = (POOL5 + 4096 + 4096 + classes) * rows * FLOAT
        act = 2 * (k - 1) / k * per_exchange
        if mode == "hybrid sequential":  # and each pass's labels, broadcast (int64)
            act += (k - 1) / k * rows * 8
        grad = _ring_all_reduce(n["conv"] * FLOAT, k)
    else:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    return {"activities": act, "gradients": grad, "total": act + grad}


def run(args: argparse.Namespace) -> list[dict]:
    """The table for K = 2, 4, 8: one row per (mode, K), printed and returned."""
    rows = []
    for k in KS:
        if args.classes % k:
            raise ValueError(f"--classes {args.classes}: fc8 must split across K = "
                             f"{', '.join(map(str, KS))} processes; give a multiple of 8")
        for mode in MODES:
            got = bytes_per_step(mode, k, args.batch, args.classes)
            rows.append({"bench": "comm", "mode": mode, "processes": k, "batch": args.batch,
                         "classes": args.classes, **{f"{key}_bytes": v
                                                     for key, v in got.items()}})
    print(f"bytes each process sends per training step, b = {args.batch} images per data "
          f"replica, {args.classes} classes, fp32, ring collectives (MB = 10^6 bytes)")
    print(f"  {'mode':<18} {'K':>2} {'activities':>11} {'gradients':>10} {'total':>9}")
    for r in rows:
        print(f"  {r['mode']:<18} {r['processes']:>2} {r['activities_bytes'] / 1e6:9.1f} MB "
              f"{r['gradients_bytes'] / 1e6:7.1f} MB {r['total_bytes'] / 1e6:6.1f} MB")
    return rows
