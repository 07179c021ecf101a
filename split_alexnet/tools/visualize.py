"""What a trained network learned: the paper's Figures 3 and 4, and training curves.

    python -m split_alexnet.visualize kernels --checkpoint C --out kernels.png
    python -m split_alexnet.visualize retrieval --checkpoint C --data DIR --out retrieval.png
    python -m split_alexnet.visualize curves runs/a runs/b --out curves.png

* ``kernels`` (Figure 3): the 96 conv1 kernels, tower 0's 48 in a block above tower 1's 48,
  each contrast-normalised on its own (min-max to 0-255) and enlarged by pixel repetition, and
  a colourfulness figure per tower (:func:`colourfulness`) printed on stdout.
* ``retrieval`` (Figure 4): query images from ``val/`` (first column), each with the training
  images whose fc7 features (4096-d, post-ReLU, eval mode) are nearest in Euclidean distance.
* ``curves``: training and validation error against step for one or more run folders.

Pillow only (a core dependency): no matplotlib needed. Every image written is at most
:data:`MAX_PIXELS`, checked from the flags before any work. See docs/visualize.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from split_alexnet.network.placement import add_device_flags
from split_alexnet.tools.evaluate import load_model
from split_alexnet.tools.retrieval import RetrievalLayout, retrieval_image, retrieve
from split_alexnet.training.metrics import by_step, read_records
from split_alexnet.utils.checkpoint_file import CheckpointError, model_config
from split_alexnet.utils.cli import Parser, UsageError, first_sentence, run
from split_alexnet.utils.weights_file import read_weights
from split_alexnet.utils.fileio import atomic_write
from split_alexnet.utils.flags import WORKERS, Number, check_output
from split_alexnet.utils.plot import curves_png

PROG = "split_alexnet.visualize"

#: The largest image any command writes: 50 megapixels (150 MB of RGB while it is drawn).
MAX_PIXELS = 50_000_000

__all__ = ["KernelGrid", "normalise_kernels", "colourfulness", "tower_colourfulness",
           "kernel_image", "RetrievalLayout", "retrieve", "retrieval_image", "curve_series",
           "main"]


# ----------------------------------------------------------------------------- Figure 3

def normalise_kernels(weight: torch.Tensor) -> torch.Tensor:
    """(N, 3, h, w) -> the same shape in [0, 1], each kernel min-max scaled on its own over
    all of its values (all three colours together, so colour balance is kept). A constant
    kernel becomes mid-grey (0.5)."""
    w = weight.detach().to("cpu", torch.float64)
    flat = w.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    span = (hi - lo)[:, None, None, None]
    out = (w - lo[:, None, None, None]) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, out, torch.full_like(out, 0.5))


def colourfulness(weight: torch.Tensor) -> torch.Tensor:
    """Chroma of each kernel (N,): after :func:`normalise_kernels`, the standard deviation
    across the R, G, B values of each pixel (population std), averaged over the kernel's
    pixels. 0 for a grey kernel (R = G = B everywhere); at most sqrt(2)/3 = 0.471 (every pixel
    a pure primary or secondary colour at full contrast)."""
    return normalise_kernels(weight).std(dim=1, unbiased=False).mean(dim=(1, 2))


def tower_colourfulness(weight: torch.Tensor, towers: int = 2) -> list[float]:
    """Mean :func:`colourfulness` of each tower's kernels (tower 0's are the first
    ``N / towers`` kernels, as in the collapsed layout)."""
    c = colourfulness(weight)
    return [float(part.mean()) for part in c.chunk(towers)]


@dataclass(frozen=True)
class KernelGrid:
    """Where each kernel goes in the Figure 3 image.

    Each tower's kernels fill a block of ``rows`` x ``cols`` cells in row-major order; tower
    blocks are stacked top to bottom (tower 0 on top), with a black band of ``sep`` pixels
    between them, and above each block a band of ``label`` pixels naming its tower and
    kernels. A cell is ``k * scale`` pixels square; cells are ``gap`` pixels apart and
    ``gap`` from the block's edge; the background is white."""

    n: int = 96
    towers: int = 2
    cols: int = 16
    scale: int = 4
    k: int = 11
    gap: int = 2
    sep: int = 4
    label: int = 14  # a band above each block naming its tower

    @property
    def per_tower(self) -> int:
        return self.n // self.towers

    @property
    def rows(self) -> int:
        return -(-self.per_tower // self.cols)

    @property
    def cell(self) -> int:
        return self.k * self.scale

    @property
    def block(self) -> tuple[int, int]:
        return (self.cols * self.cell + (self.cols + 1) * self.gap,
                self.rows * self.cell + (self.rows + 1) * self.gap)

    @property
    def size(self) -> tuple[int, int]:
        bw, bh = self.block
        return bw, self.towers * (self.label + bh) + (self.towers - 1) * self.sep

    def top(self, t: int) -> int:
        """The first pixel row of tower ``t``'s block (below its label band)."""
        return t * (self.label + self.block[1] + self.sep) + self.label

    def box(self, i: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of kernel ``i`` (end-exclusive)."""
        t, j = divmod(i, self.per_tower)
        r, c = divmod(j, self.cols)
        x0 = self.gap + c * (self.cell + self.gap)
        y0 = self.top(t) + self.gap + r * (self.cell + self.gap)
        return x0, y0, x0 + self.cell, y0 + self.cell


def kernel_image(weight: torch.Tensor, *, towers: int = 2, cols: int = 16,
                 scale: int = 4) -> tuple[Image.Image, KernelGrid]:
    """The Figure 3 image of conv1 ``weight`` (N, 3, k, k) and its :class:`KernelGrid`."""
    n, _, k, _ = weight.shape
    grid = KernelGrid(n=n, towers=towers, cols=min(cols, n // towers), scale=scale, k=k)
    w, h = grid.size
    canvas = np.full((h, w, 3), 255, np.uint8)
    bh = grid.block[1]
    for t in range(1, towers):
        y = grid.top(t - 1) + bh
        canvas[y:y + grid.sep] = 0
    pix = (normalise_kernels(weight) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    for i in range(n):
        x0, y0, x1, y1 = grid.box(i)
        big = pix[i].transpose(1, 2, 0).repeat(scale, axis=0).repeat(scale, axis=1)
        canvas[y0:y1, x0:x1] = big
    img = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(img)
    for t in range(towers):
        lo, hi = t * grid.per_tower, (t + 1) * grid.per_tower - 1
        text = f"tower {t}: kernels {lo}-{hi}" if towers > 1 else f"kernels {lo}-{hi}"
        draw.text((grid.gap, grid.top(t) - grid.label + 1), text, fill=(0, 0, 0))
    return img, grid


def _conv1_weight(ckpt: dict) -> torch.Tensor:
    try:
        return ckpt["model"]["conv1.weight"].float()
    except KeyError:
        raise UsageError("the checkpoint has no conv1.weight") from None


def check_image_size(size: tuple[int, int], flags: str) -> None:
    """An image of ``size`` (width, height) that ``flags`` ask for is at most
    :data:`MAX_PIXELS`, or a :class:`UsageError`."""
    w, h = size
    if w * h > MAX_PIXELS:
        raise UsageError(f"{flags} ask for a {w:,}x{h:,} px image; images are limited to "
                         f"{MAX_PIXELS:,} pixels")


def cmd_kernels(args: argparse.Namespace) -> int:
    _image_format(args.out, {"--checkpoint": args.checkpoint})
    # The largest grid the flags can give (the two-tower net's 96 kernels of 11x11).
    check_image_size(KernelGrid(cols=min(args.cols, 48), scale=args.scale).size,
                     f"--cols {args.cols} --scale {args.scale}")
    try:
        ckpt = read_weights(Path(args.checkpoint))
        towers = 1 if model_config(ckpt).arch == "half" else 2
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    weight = _conv1_weight(ckpt)
    img, grid = kernel_image(weight, towers=towers, cols=args.cols, scale=args.scale)
    _save(img, args.out)
    chroma = colourfulness(weight)
    print(f"{args.out}: {grid.size[0]}x{grid.size[1]} px; {grid.n} conv1 kernels "
          f"{grid.k}x{grid.k}, {towers} block(s) of {grid.rows} rows x {grid.cols}, x{grid.scale}")
    print("colourfulness (mean over kernels of the per-pixel std across R,G,B after per-kernel "
          "min-max normalisation; 0 = grey, max 0.471)")
    for t, part in enumerate(chroma.chunk(towers)):
        lo = t * grid.per_tower
        print(f"  tower {t} (kernels {lo}-{lo + grid.per_tower - 1}): mean {part.mean():.4f}  "
              f"median {part.median():.4f}  kernels over 0.1: {int((part > 0.1).sum())}"
              f"/{part.numel()}")
    return 0


# ----------------------------------------------------------------------------- Figure 4

def cmd_retrieval(args: argparse.Namespace) -> int:
    _image_format(args.out, {"--checkpoint": args.checkpoint})
    check_image_size(RetrievalLayout(args.queries, args.neighbours, tile=args.tile).size,
                     f"--queries {args.queries} --neighbours {args.neighbours} --tile "
                     f"{args.tile}")
    model, ckpt, devs = load_model(Path(args.checkpoint), gpus=args.gpus, devices=args.devices,
                                   single_device=args.single_device, default="collapse")
    results = retrieve(model, ckpt, Path(args.data), devs[0], queries=args.queries,
                       neighbours=args.neighbours, batch_size=args.batch_size,
                       workers=args.workers, max_train=args.max_train)
    img, lay = retrieval_image(results, args.neighbours, tile=args.tile)
    _save(img, args.out)
    same = sum(n["label"] == r["label"] for r in results for n in r["neighbours"])
    total = sum(len(r["neighbours"]) for r in results)
    for r in results:
        print(f"{r['path']} [{r['label']}]")
        for n in r["neighbours"]:
            print(f"  {n['distance']:12.4f}  {n['path']} [{n['label']}]")
    print(f"{args.out}: {lay.size[0]}x{lay.size[1]} px; {same}/{total} neighbours share the "
          f"query's class")
    return 0


# ----------------------------------------------------------------------------- curves

_LABELS = {"train": "train (batches)", "val": "val (centre crop)",
           "val_ten_crop": "val (ten crops)"}


def curve_series(run_dirs: Sequence[Path | str], metric: str = "top1_err"
                 ) -> list[tuple[str, list[float], list[float]]]:
    """[(label, steps, values)] of ``metric`` for each run's train, val and val_ten_crop
    records (metrics.jsonl), in that order; runs are named by their folder."""
    names = [Path(r).resolve().name or str(r) for r in run_dirs]
    if len(set(names)) < len(names):
        names = [str(r) for r in run_dirs]
    series = []
    for run_dir, name in zip(run_dirs, names):
        recs = by_step(read_records(run_dir))
        found = False
        for kind, label in _LABELS.items():
            pts = sorted((s, r[metric]) for s, r in recs.get(kind, {}).items()
                         if isinstance(r.get(metric), (int, float)))
            if pts:
                found = True
                series.append((f"{name}: {label}" if len(run_dirs) > 1 else label,
                               [float(s) for s, _ in pts], [float(v) for _, v in pts]))
        if not found:
            raise UsageError(f"{run_dir}/metrics.jsonl has no train or val records with "
                             f"{metric!r}")
    return series


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size takes WIDTHxHEIGHT, e.g. 800x500; got {text!r}") from None
    if w < 200 or h < 150:
        raise UsageError(f"--size must be at least 200x150, got {text}")
    check_image_size((w, h), f"--size {text}")
    return w, h


def cmd_curves(args: argparse.Namespace) -> int:
    size = _parse_size(args.size)
    _image_format(args.out)
    series = curve_series(args.runs, args.metric)
    err = args.metric.endswith("_err")
    what = {"top1_err": "top-1 error", "top5_err": "top-5 error", "loss": "loss",
            "lr": "learning rate"}[args.metric]
    if args.log_y:
        bad = next(((label, y) for label, _, ys in series for y in ys if not y > 0), None)
        if bad:
            raise UsageError(f"--log-y needs values above 0; {bad[0]} has {bad[1]:g}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    curves_png(args.out, series, title=f"{what}: " + ", ".join(Path(r).name for r in args.runs),
               xlabel="step", ylabel=what + (" (log scale)" if args.log_y else ""), size=size,
               ylim=(0.0, 1.0) if err else None, log_y=args.log_y)
    for label, xs, ys in series:
        print(f"  {label}: {len(xs)} points, last {ys[-1]:.4f} at step {xs[-1]:g}")
    print(f"{args.out}: {size[0]}x{size[1]} px")
    return 0


# ----------------------------------------------------------------------------- CLI

def _image_format(out: str | Path, inputs: dict | None = None) -> str:
    """The image format of ``--out`` (its suffix; PNG without one), after checking that the
    file can be written: a :class:`UsageError` before any work otherwise."""
    check_output("--out", out, inputs)
    out, formats = Path(out), Image.registered_extensions()
    if out.suffix and out.suffix.lower() not in formats:
        raise UsageError(f"cannot write {out}: unknown file extension: {out.suffix}")
    return formats.get(out.suffix.lower(), "PNG")


def _save(img: Image.Image, out: str | Path) -> None:
    """Write ``img`` atomically, in the format of ``out``'s suffix (PNG without one)."""
    fmt = _image_format(out)
    try:
        atomic_write(out, lambda f: img.save(f, format=fmt), private=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot write {out}: {e}") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = Parser(module=PROG, description=first_sentence(__doc__))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    k = sub.add_parser("kernels", help="Figure 3: the conv1 kernels of both towers")
    k.add_argument("--checkpoint", required=True,
                   help="a .pt file written by train or by split_alexnet.convert, or a "
                        ".safetensors file written by split_alexnet.export")
    k.add_argument("--out", required=True, help="PNG to write")
    k.add_argument("--cols", action=Number, min=1, default=16, help="kernels per row (default "
                   "16: two blocks of 3 rows x 16)")
    k.add_argument("--scale", action=Number, min=1, default=4,
                   help="pixel repetition (default 4)")
    k.set_defaults(func=cmd_kernels)

    r = sub.add_parser("retrieval", help="Figure 4: nearest training images in fc7 space")
    r.add_argument("--checkpoint", required=True,
                   help="a .pt file written by train or by split_alexnet.convert, or a "
                        ".safetensors file written by split_alexnet.export")
    r.add_argument("--data", required=True, help="dataset root with train/ and val/")
    r.add_argument("--out", required=True, help="PNG to write")
    r.add_argument("--queries", action=Number, min=1, default=5,
                   help="val images to query (default 5)")
    r.add_argument("--neighbours", action=Number, min=1, default=6,
                   help="neighbours each (default 6)")
    r.add_argument("--max-train", action=Number, min=1,
                   help="search an evenly spread subset of train/")
    r.add_argument("--tile", action=Number, min=16, default=112,
                   help="thumbnail size in px (default 112)")
    r.add_argument("--batch-size", action=Number, min=1, default=64,
                   help="images per forward (default 64)")
    r.add_argument("--workers", action=Number, **WORKERS, default=2,
                   help="DataLoader workers (default 2)")
    add_device_flags(r, default="collapse")
    r.set_defaults(func=cmd_retrieval)

    c = sub.add_parser("curves", help="training and validation error curves")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders with metrics.jsonl")
    c.add_argument("--out", required=True, help="PNG to write")
    c.add_argument("--metric", default="top1_err", choices=("top1_err", "top5_err", "loss", "lr"),
                   help="what to plot (default top1_err; train records have no top5_err; lr: "
                        "the learning rate of the train and val records)")
    c.add_argument("--log-y", action="store_true",
                   help="a logarithmic y axis (loss, lr: values above 0)")
    c.add_argument("--size", default="800x500", help="WIDTHxHEIGHT in px (default 800x500)")
    c.set_defaults(func=cmd_curves)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return args.func(args)


def cli() -> None:
    """The console command: ``main`` with one-line errors and exit codes."""
    sys.exit(run(main, PROG))
