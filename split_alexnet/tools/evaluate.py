"""Evaluate a checkpoint: top-1 / top-5 error and loss, centre crop and (optionally) the
paper's ten crops with averaged softmax. A checkpoint of either layout runs in either layout.

    python -m split_alexnet.evaluate --checkpoint runs/alexnet/best.pt --data /data/ilsvrc12 --gpus 0,1 --ten-crop
    python -m split_alexnet.evaluate --checkpoint runs/demo/last.pt --data runs/demo/demo_data --single-device
    python -m split_alexnet.evaluate --checkpoint C --data DIR --devices cpu,cpu --json results.json

The network is rebuilt from the checkpoint's model config; the mean image and colour
statistics come from the checkpoint too (the training set's), so ``--data`` needs only
``val/<class>/``; class folders are matched to the checkpoint by name, and may be a subset of
its classes (each image is still scored over all of them). A checkpoint converted
from Caffe's bvlc_alexnet (``split_alexnet.convert``) evaluates the same way: its published
protocol is the centre 227 crop of the 256x256 image minus the mean image, as here, and its
1000 classes are the ILSVRC-2012 wnids, which name the class folders of a prepared ImageNet.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from split_alexnet.data.dataset import CropFolder, EpochSampler, find_classes, make_loader
from split_alexnet.network.placement import add_device_flags, build_model, resolve_devices
from split_alexnet.training.loop import evaluate
from split_alexnet.utils.checkpoint_file import (CheckpointError, checkpoint_stats,
                                                 load_checkpoint, model_config)
from split_alexnet.utils.cli import UsageError, run
from split_alexnet.utils.fileio import write_json
from split_alexnet.utils.flags import WORKERS, Number, check_number, check_output

PROG = "split_alexnet.evaluate"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a .pt file written by train or by split_alexnet.convert")
    p.add_argument("--data", required=True, help="dataset root with val/<class>/")
    p.add_argument("--split", default="val", help="subfolder to evaluate (default: val)")
    p.add_argument("--ten-crop", action="store_true", help="also the paper's ten-crop test")
    add_device_flags(p, default="paper")
    p.add_argument("--batch-size", action=Number, min=1, default=128,
                   help="images per forward (default 128)")
    p.add_argument("--workers", action=Number, **WORKERS, default=4,
                   help="DataLoader workers (default 4)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    check_output("--json", args.json, {"--checkpoint": args.checkpoint})
    return args


def load_model(path: Path, *, gpus: str | None = None, devices: str | None = None,
               single_device: bool = False, default: str = "paper"
               ) -> tuple[nn.Module, dict, tuple[torch.device, ...]]:
    """Checkpoint -> (its network in eval mode on the devices the flags give, the checkpoint
    payload, those devices). ``default``: what no device flag means (``resolve_devices``)."""
    try:
        ckpt = load_checkpoint(path)
        cfg = model_config(ckpt)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    devs = resolve_devices(gpus, devices, single_device or cfg.arch == "half", default=default)
    layout = "collapsed" if len(devs) == 1 else "split"
    try:
        model = build_model(replace(cfg, init=None), layout, devs)  # weights: the checkpoint's
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError) as e:  # a build error; keys or shapes that do not fit
        raise UsageError(f"checkpoint {path}: its network cannot be built from its model "
                         f"configuration ({cfg.arch}, {cfg.num_classes} classes): "
                         f"{_one_line(e)}") from None
    return model.eval(), ckpt, devs


def _one_line(e: Exception) -> str:
    """An error of ``load_state_dict`` (a line per kind of problem, each listing every key) as
    one line naming the first keys of each kind."""
    parts = []
    for line in str(e).splitlines():
        line = line.strip().rstrip(".")
        if line.startswith("Error(s) in loading state_dict"):
            continue
        keys = re.findall(r'"([^"]+)"', line)
        if len(keys) > 3:
            line = f"{line.split(':')[0]}: {', '.join(keys[:3])} and {len(keys) - 3} more"
        if line:
            parts.append(line.replace('"', ""))
    return "; ".join(parts) or type(e).__name__


class Relabelled(Dataset):
    """``dataset`` with each item's label replaced by ``labels[label]``: the checkpoint's
    index of the class, when only some of its classes have folders."""

    def __init__(self, dataset: CropFolder, labels: Sequence[int]) -> None:
        self.dataset, self.labels = dataset, list(labels)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> dict:
        item = self.dataset[key]
        return {**item, "label": self.labels[item["label"]]}


def evaluate_checkpoint(path: Path, data: Path, *, split: str = "val", ten_crop: bool = False,
                        gpus: str | None = None, devices: str | None = None,
                        single_device: bool = False, batch_size: int = 128, workers: int = 4,
                        progress: bool = True) -> dict:
    """The centre-crop (and with ``ten_crop`` the ten-crop) results of a checkpoint on
    ``data/split``, with the layout and devices used: what ``--json`` writes."""
    check_number("--batch-size", batch_size, min=1)
    check_number("--workers", workers, **WORKERS)
    model, ckpt, devs = load_model(Path(path), gpus=gpus, devices=devices,
                                   single_device=single_device)
    split_dir = Path(data) / split
    classes = list(ckpt["classes"])
    found = set(find_classes(split_dir))
    unknown = sorted(found - set(classes))
    if unknown:
        raise UsageError(f"{split_dir} has class folders the checkpoint does not know: "
                         f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    present = [c for c in classes if c in found]  # all of them, or a subset (of ImageNet's)
    stats = checkpoint_stats(ckpt)
    results = {"checkpoint": str(path), "layout": "collapsed" if len(devs) == 1 else "split",
               "devices": [str(d) for d in devs], "classes": len(present)}
    for mode in ["center"] + (["tencrop"] if ten_crop else []):
        ds = Relabelled(CropFolder(split_dir, present, mode=mode),
                        [classes.index(c) for c in present])
        bs = max(1, batch_size // 10) if mode == "tencrop" else batch_size
        loader = make_loader(ds, batch_size=bs, workers=workers,
                             sampler=EpochSampler(len(ds), shuffle=False, drop_last=False),
                             pin_memory=devs[0].type == "cuda")
        key = "ten_crop" if mode == "tencrop" else "center"
        results[key] = evaluate(model, loader, stats, devs[0], ten_crop=mode == "tencrop",
                                progress=progress)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = evaluate_checkpoint(
        Path(args.checkpoint), Path(args.data), split=args.split, ten_crop=args.ten_crop,
        gpus=args.gpus, devices=args.devices, single_device=args.single_device,
        batch_size=args.batch_size, workers=args.workers)
    print(f"{'crop':<10} {'images':>7} {'top-1 err':>10} {'top-5 err':>10} {'loss':>8}")
    for key in ("center", "ten_crop"):
        if key in results:
            r = results[key]
            print(f"{key:<10} {r['n']:>7} {r['top1_err']:>10.4f} {r['top5_err']:>10.4f} "
                  f"{r['loss']:>8.4f}")
    if args.json:
        write_json(args.json, results)
    return 0


def cli() -> None:
    """The console command: ``main`` with one-line errors and exit codes."""
    sys.exit(run(main, PROG))
