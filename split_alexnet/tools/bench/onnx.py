"""onnxruntime against PyTorch on the CPU: ``python -m split_alexnet.bench onnx`` (needs the
``export`` extra).

The network (a checkpoint's with ``--checkpoint``, else the paper's init with 1000 classes)
is exported as ``split_alexnet.export`` exports it, checked (max |ONNX - PyTorch| relative
to the largest logit, on a batch of 3), and both run inference on the same batch of
227x227 inputs with the same number of threads (``--threads``, default 1: torch intra-op,
onnxruntime intra-op): onnxruntime's session (CPUExecutionProvider, its default graph
optimisations) and the PyTorch forward of the collapsed ``AlexNet`` in eval mode under
``no_grad``. Rounds are interleaved (ORT, then PyTorch); the fastest round of each gives
its images/s (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

from split_alexnet.network.model import AlexNet
from split_alexnet.tools import onnx_export as oe


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="a checkpoint or .safetensors file (default: the "
                                        "paper's init, 1000 classes)")
    p.add_argument("--batch", type=int, default=None, help="images per forward (default 16, "
                                                           "4 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds of each (default "
                                                            "5, 2 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="threads of each (default 1)")


def run(args: argparse.Namespace) -> list[dict]:
    if args.checkpoint:
        from split_alexnet.tools.export import network
        from split_alexnet.utils.weights_file import CheckpointError, read_weights
        from split_alexnet.utils.cli import UsageError
        try:
            net = network(read_weights(Path(args.checkpoint)))
        except CheckpointError as e:
            raise UsageError(str(e)) from None
        name = str(args.checkpoint)
    else:
        torch.manual_seed(0)
        net, name = AlexNet(1000).eval(), "AlexNet(1000), paper init"
    batch = args.batch or (4 if args.quick else 16)
    rounds = args.rounds or (2 if args.quick else 5)
    data = oe.onnx_bytes(net)
    check = oe.check(data, net)
    speed = oe.speed(data, net, batch=batch, rounds=rounds, threads=args.threads)
    row = {"kind": "onnx", "name": name, "batch": batch, "threads": args.threads,
           "rounds": rounds, "opset": oe.OPSET,
           "onnxruntime_images_per_s": speed["onnxruntime_images_per_s"],
           "pytorch_images_per_s": speed["pytorch_images_per_s"],
           "max_abs_err": check["max_abs"], "max_rel_err": check["relative"],
           "machine": {"cpus": os.cpu_count(),
                       "cpu": platform.processor() or platform.machine(),
                       "torch": str(torch.__version__), "onnxruntime": check["onnxruntime"]}}
    ratio = row["onnxruntime_images_per_s"] / row["pytorch_images_per_s"]
    print(f"{name}: batch {batch}, {args.threads} thread(s), fastest of {rounds} rounds; "
          f"torch {torch.__version__}, onnxruntime {check['onnxruntime']}, "
          f"{os.cpu_count()} CPUs")
    print(f"  onnxruntime {row['onnxruntime_images_per_s']:8.2f} img/s")
    print(f"  pytorch     {row['pytorch_images_per_s']:8.2f} img/s   (onnxruntime / pytorch "
          f"{ratio:.2f})")
    print(f"  max |ONNX - PyTorch| {check['max_abs']:.2e} = {check['relative']:.2e} of the "
          f"largest logit (batch {check['batch']})")
    return [row]
