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
import csv
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from split_alexnet.data.dataset import CropFolder, EpochSampler, find_classes, make_loader
from split_alexnet.network.placement import add_device_flags, build_model, resolve_devices
from split_alexnet.training.loop import evaluate
from split_alexnet.utils.checkpoint_file import CheckpointError, checkpoint_stats, model_config
from split_alexnet.utils.cli import Parser, UsageError, first_sentence, run
from split_alexnet.utils.fileio import check_output_dir, write_json
from split_alexnet.utils.weights_file import read_weights
from split_alexnet.utils.flags import WORKERS, Number, check_number, check_output

PROG = "split_alexnet.evaluate"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = Parser(module=PROG, description=first_sentence(__doc__))
    p.add_argument("--checkpoint", required=True,
                   help="a .pt file written by train or by split_alexnet.convert, or a "
                        ".safetensors file written by split_alexnet.export")
    p.add_argument("--data", required=True, help="dataset root with val/<class>/")
    p.add_argument("--split", default="val", help="subfolder to evaluate (default: val)")
    p.add_argument("--ten-crop", action="store_true", help="also the paper's ten-crop test")
    add_device_flags(p, default="paper")
    p.add_argument("--batch-size", action=Number, min=1, default=128,
                   help="images per forward (default 128)")
    p.add_argument("--workers", action=Number, **WORKERS, default=4,
                   help="DataLoader workers (default 4)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--per-class", metavar="DIR", default=None,
                   help="also write the centre crop's per-class top-1 errors and confusion "
                        "matrix: DIR/per_class.csv, DIR/confusion.csv, DIR/confusion.png")
    args = p.parse_args(argv)
    check_output("--json", args.json, {"--checkpoint": args.checkpoint})
    if args.per_class is not None:
        check_output_dir(Path(args.per_class), "--per-class")
    return args


def load_model(path: Path, *, gpus: str | None = None, devices: str | None = None,
               single_device: bool = False, default: str = "paper"
               ) -> tuple[nn.Module, dict, tuple[torch.device, ...]]:
    """Checkpoint -> (its network in eval mode on the devices the flags give, the checkpoint
    payload, those devices). ``default``: what no device flag means (``resolve_devices``)."""
    try:
        ckpt = read_weights(path)  # a checkpoint or a .safetensors weights file
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
                        progress: bool = True, per_class: Path | None = None) -> dict:
    """The centre-crop (and with ``ten_crop`` the ten-crop) results of a checkpoint on
    ``data/split``, with the layout and devices used: what ``--json`` writes. ``per_class``:
    a folder for the centre crop's per-class errors and confusion matrix
    (:func:`write_per_class`)."""
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
               "devices": [str(d) for d in devs], "classes": len(present),
               "checkpoint_classes": len(classes)}
    for mode in ["center"] + (["tencrop"] if ten_crop else []):
        ds = Relabelled(CropFolder(split_dir, present, mode=mode),
                        [classes.index(c) for c in present])
        bs = max(1, batch_size // 10) if mode == "tencrop" else batch_size
        loader = make_loader(ds, batch_size=bs, workers=workers,
                             sampler=EpochSampler(len(ds), shuffle=False, drop_last=False),
                             pin_memory=devs[0].type == "cuda")
        key = "ten_crop" if mode == "tencrop" else "center"
        conf = torch.zeros(len(classes), len(classes), dtype=torch.int64, device=devs[0]) \
            if per_class is not None and key == "center" else None
        results[key] = evaluate(model, loader, stats, devs[0], ten_crop=mode == "tencrop",
                                progress=progress, confusion=conf)
        if conf is not None:
            results["per_class"] = write_per_class(Path(per_class), conf.cpu(), classes,
                                                   present)
    return results


def write_per_class(out: Path, conf: torch.Tensor, classes: list[str],
                    present: list[str]) -> list[dict]:
    """``out/per_class.csv`` (class, images, top-1 error, the class it is most often taken
    for), ``out/confusion.csv`` (rows: the true class, columns: the prediction, over the
    classes evaluated) and ``out/confusion.png`` (each row scaled to its images, darker is
    more). Returns the per-class rows."""
    idx = [classes.index(c) for c in present]
    sub = conf[idx][:, idx]
    rows = []
    for i, c in enumerate(present):
        n, right = int(conf[idx[i]].sum()), int(conf[idx[i], idx[i]])
        wrong = conf[idx[i]].clone()
        wrong[idx[i]] = 0
        rows.append({"class": c, "images": n, "top1_err": (n - right) / n if n else None,
                     "confused_with": classes[int(wrong.argmax())] if int(wrong.sum()) else ""})
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "per_class.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "images", "top1_err", "confused_with"])
        w.writerows([[r["class"], r["images"], "" if r["top1_err"] is None else
                      f"{r['top1_err']:.6f}", r["confused_with"]] for r in rows])
    with open(out / "confusion.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *present])
        w.writerows([[c, *sub[i].tolist()] for i, c in enumerate(present)])
    cell = max(1, min(32, 800 // max(1, len(present))))
    frac = sub.double() / sub.sum(1, keepdim=True).clamp_min(1)
    pixels = (255 * (1 - frac)).round().to(torch.uint8).numpy()
    Image.fromarray(pixels, "L").resize((cell * len(present),) * 2, Image.NEAREST).save(
        out / "confusion.png")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = evaluate_checkpoint(
        Path(args.checkpoint), Path(args.data), split=args.split, ten_crop=args.ten_crop,
        gpus=args.gpus, devices=args.devices, single_device=args.single_device,
        batch_size=args.batch_size, workers=args.workers,
        per_class=None if args.per_class is None else Path(args.per_class))
    print(f"{'crop':<10} {'images':>7} {'top-1 err':>10} {'top-5 err':>10} {'loss':>8}")
    for key in ("center", "ten_crop"):
        if key in results:
            r = results[key]
            top5 = f"{r['top5_err']:>10.4f}" if results["checkpoint_classes"] > 5 else \
                f"{'-':>10}"  # with 5 classes or fewer every label is in the top 5
            print(f"{key:<10} {r['n']:>7} {r['top1_err']:>10.4f} {top5} {r['loss']:>8.4f}")
    if "per_class" in results:
        worst = sorted((r for r in results["per_class"] if r["images"]),
                       key=lambda r: -r["top1_err"])[:10]
        print(f"per class ({args.per_class}/per_class.csv, confusion.csv, confusion.png); "
              "the worst:")
        for r in worst:
            print(f"  {r['class']:<24} {r['images']:>6} images  top-1 err {r['top1_err']:.4f}"
                  + (f"  (most often taken for {r['confused_with']})" if r["confused_with"]
                     else ""))
    if args.json:
        write_json(args.json, results)
    return 0


def cli() -> None:
    """The console command: ``main`` with one-line errors and exit codes."""
    sys.exit(run(main, PROG))
