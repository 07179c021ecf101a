"""Print the network per tower: layers, output shapes, parameters, device, traffic per image.

    python -m split_alexnet.summary                      # towers on cpu,cpu
    python -m split_alexnet.summary --gpus 0,1           # or any two devices: --devices cuda:0,cpu
    python -m split_alexnet.summary --checkpoint runs/alexnet/best.pt   # the network it holds
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch

from split_alexnet.network.model import INPUT_SIZE, TOWER_LAYERS, SplitAlexNet, count_parameters
from split_alexnet.network.placement import add_device_flags, place, resolve_devices
from split_alexnet.utils.cli import Parser, UsageError, first_sentence, run
from split_alexnet.utils.flags import Number

PROG = "split_alexnet.summary"

#: The most --classes the summary builds: fc8 is then 410M parameters (1.6 GB in memory).
MAX_CLASSES = 100_000


def summarize(net: SplitAlexNet) -> str:
    shapes: dict[tuple[str, int], tuple[int, ...]] = {}
    hooks = [getattr(net.towers[t], name).register_forward_hook(
        lambda m, i, o, key=(name, t): shapes.__setitem__(key, tuple(o.shape[1:])))
        for name in TOWER_LAYERS for t in (0, 1)]
    net.eval()
    with torch.no_grad():
        net(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE))
    for h in hooks:
        h.remove()
    lines = [f"SplitAlexNet: {count_parameters(net):,} parameters, input (B, 3, {INPUT_SIZE}, "
             f"{INPUT_SIZE})", ""]
    head = f"{'layer':<7}" + "".join(f"{'tower ' + str(t) + ' (' + str(net.devices[t]) + ')':<38}"
                                    for t in (0, 1))
    lines.append(head)
    for name in TOWER_LAYERS:
        row = f"{name:<7}"
        for t in (0, 1):
            mod = getattr(net.towers[t], name)
            n = sum(p.numel() for p in mod.parameters())
            row += f"{str(shapes[(name, t)]):<20}{n:>12,} params  "
        lines.append(row)
    fc8 = sum(p.numel() for p in net.fc8.parameters())
    lines.append(f"{'fc8':<7}{'(' + str(net.fc8.out_features) + ',)':<20}{fc8:>12,} params  "
                 f"(with tower 0, on {net.fc8.weight.device})")
    lines += ["", "cross-tower traffic per image (forward; the backward sends as much back):"]
    total = 0
    for t in net.traffic:
        lines.append(f"  into {t.layer:<5} tower {t.src} -> tower {t.dst}  "
                     f"{str(t.shape[1:]):<16} {t.bytes:>8,} bytes  ({t.src_device} -> {t.dst_device})")
        total += t.bytes
    lines.append(f"  total {total:,} bytes per image per forward pass")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = Parser(module=PROG, description=first_sentence(__doc__))
    add_device_flags(p, default="cpu", single_device=False)
    p.add_argument("--classes", action=Number, min=1, max=MAX_CLASSES, default=None,
                   help="units in fc8 (default 1000)")
    p.add_argument("--checkpoint", default=None,
                   help="summarise the network this checkpoint holds (its classes, its "
                        "settings, its weights), with the run's position")
    args = p.parse_args(argv)
    if args.checkpoint is None:
        devices = resolve_devices(args.gpus, args.devices, default="cpu")
        net = place(SplitAlexNet(args.classes or 1000, init=None), devices)
        print(summarize(net))
        return 0
    if args.classes is not None:
        raise UsageError("give --classes or --checkpoint (its network has its own classes), "
                         "not both")
    from split_alexnet.tools.evaluate import load_model  # the one checkpoint -> network path
    net, ckpt, _ = load_model(Path(args.checkpoint), gpus=args.gpus, devices=args.devices,
                              default="cpu")
    if not isinstance(net, SplitAlexNet):
        raise UsageError(f"{args.checkpoint} holds arch={ckpt['model_config'].get('arch')}, "
                         "a one-column network; summary shows the two towers")
    cfg = ckpt["model_config"]
    where = ckpt.get("progress") or {}
    at = f"; epoch {where['epoch']}, step {where['step']}" if where else ""
    print(f"{args.checkpoint}: {len(ckpt.get('classes', []))} classes; "
          + ", ".join(f"{k} {cfg[k]}" for k in ("init", "lrn", "lrn_span", "activation",
                                                "pool", "dropout") if k in cfg) + at)
    print(summarize(net))
    return 0


def cli() -> None:
    """The console command: ``main`` with one-line errors and exit codes."""
    sys.exit(run(main, PROG))
