"""Evaluate a checkpoint: top-1 / top-5 error and loss, centre crop and (optionally) the
paper's ten crops with averaged softmax. A checkpoint of either layout runs in either layout.

    python -m split_alexnet.evaluate --checkpoint runs/alexnet/best.pt --data /data/ilsvrc12 --gpus 0,1 --ten-crop
    python -m split_alexnet.evaluate --checkpoint runs/demo/last.pt --data runs/demo/demo_data --single-device
    python -m split_alexnet.evaluate --checkpoint C --data DIR --devices cpu,cpu --json results.json

The mean image and colour statistics come from the checkpoint (the training set's), so
``--data`` needs only ``val/<class>/``; class folders are matched to the checkpoint by name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from split_alexnet.training.checkpoint import CheckpointError, load_checkpoint
from split_alexnet.utils.cli import UsageError, run
from split_alexnet.training.config import TrainConfig, resolve_devices
from split_alexnet.data.dataset import EpochSampler, CropFolder, find_classes, make_loader
from split_alexnet.data.stats import Stats
from split_alexnet.network.model import build_model

PROG = "split_alexnet.evaluate"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a .pt file written by train")
    p.add_argument("--data", required=True, help="dataset root with val/<class>/")
    p.add_argument("--split", default="val", help="subfolder to evaluate (default: val)")
    p.add_argument("--ten-crop", action="store_true", help="also the paper's ten-crop test")
    p.add_argument("--gpus", help="GPU indices for the two towers, e.g. 0,1")
    p.add_argument("--devices", help="any two devices for the towers, e.g. cpu,cpu")
    p.add_argument("--single-device", action="store_true", help="the collapsed layout")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward (default 128)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers (default 4)")
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args(argv)


def load_model(path: Path, *, gpus=None, devices=None, single_device=False):
    """Checkpoint -> (model in the requested layout, checkpoint payload, devices)."""
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    saved = ckpt["config"]
    cfg = TrainConfig(gpus=gpus, devices=devices,
                      single_device=single_device or saved.get("arch") == "half")
    devs = resolve_devices(cfg)
    model = build_model(arch=saved.get("arch", "alexnet"), layout=cfg.layout, devices=devs,
                        num_classes=len(ckpt["classes"]), init=None, lrn=saved["lrn"],
                        activation=saved["activation"], pool=saved["pool"],
                        dropout=saved["dropout"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt, devs


def main(argv: Sequence[str] | None = None) -> int:
    from split_alexnet.training.trainer import evaluate  # the same function training uses
    args = parse_args(argv)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    model, ckpt, devs = load_model(Path(args.checkpoint), gpus=args.gpus, devices=args.devices,
                                   single_device=args.single_device)
    split_dir = Path(args.data) / args.split
    classes = list(ckpt["classes"])
    unknown = sorted(set(find_classes(split_dir)) - set(classes))
    if unknown:
        raise UsageError(f"{split_dir} has class folders the checkpoint does not know: "
                         f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    st = ckpt["stats"]
    stats = Stats(mean=st["mean"], eigval=st["eigval"], eigvec=st["eigvec"],
                  fingerprint=ckpt["stats_fingerprint"], classes=classes)
    results = {"checkpoint": str(args.checkpoint), "layout": "collapsed" if len(devs) == 1
               else "split", "devices": [str(d) for d in devs]}
    for mode in ["center"] + (["tencrop"] if args.ten_crop else []):
        ds = CropFolder(split_dir, classes, mode=mode)
        bs = max(1, args.batch_size // 10) if mode == "tencrop" else args.batch_size
        loader = make_loader(ds, batch_size=bs, workers=args.workers,
                             sampler=EpochSampler(len(ds), shuffle=False, drop_last=False),
                             pin_memory=devs[0].type == "cuda")
        key = "ten_crop" if mode == "tencrop" else "center"
        results[key] = evaluate(model, loader, stats, devs[0], ten_crop=mode == "tencrop",
                                progress=True)
    print(f"{'crop':<10} {'images':>7} {'top-1 err':>10} {'top-5 err':>10} {'loss':>8}")
    for key in ("center", "ten_crop"):
        if key in results:
            r = results[key]
            print(f"{key:<10} {r['n']:>7} {r['top1_err']:>10.4f} {r['top5_err']:>10.4f} "
                  f"{r['loss']:>8.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def cli() -> None:
    """The console command: ``main`` with one-line errors and exit codes."""
    sys.exit(run(main, PROG))
