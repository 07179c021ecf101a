"""Compare two training runs (e.g. split vs --single-device with one seed) step by step.

    python -m split_alexnet.compare runs/split runs/single --out compare.png

Prints both runs' train loss and validation errors side by side at the steps they share,
the largest difference of each, and writes a PNG of the curves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from split_alexnet.training.metrics import by_step, read_records
from split_alexnet.utils.cli import UsageError, run
from split_alexnet.utils.plot import curves_png

PROG = "split_alexnet.compare"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0])
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--out", default=None, help="PNG of both runs' curves (default: none)")
    p.add_argument("--rows", type=int, default=20, help="at most this many table rows")
    args = p.parse_args(argv)
    a, b = by_step(read_records(args.run_a)), by_step(read_records(args.run_b))
    name_a, name_b = Path(args.run_a).name, Path(args.run_b).name
    report = {}
    for kind, field in (("train", "loss"), ("val", "top1_err"), ("val", "top5_err")):
        ra, rb = a.get(kind, {}), b.get(kind, {})
        common = sorted(set(ra) & set(rb))
        if not common:
            continue
        diffs = [(abs(ra[s][field] - rb[s][field]), s) for s in common]
        worst, at = max(diffs)
        report[f"{kind} {field}"] = (worst, at, len(common))
        print(f"{kind} {field}: {len(common)} shared steps, largest difference {worst:.3g} "
              f"at step {at}")
        if kind == "train":
            stride = max(1, len(common) // args.rows)
            print(f"  {'step':>7} {name_a[:14]:>14} {name_b[:14]:>14} {'diff':>10}")
            for s in common[::stride]:
                print(f"  {s:>7} {ra[s][field]:>14.6f} {rb[s][field]:>14.6f} "
                      f"{ra[s][field] - rb[s][field]:>10.3g}")
    if not report:
        raise UsageError("the two runs share no logged steps")
    if args.out:
        series = []
        for name, m in ((name_a, a), (name_b, b)):
            tr = m.get("train", {})
            series.append((f"{name} train loss", list(tr), [r["loss"] for r in tr.values()]))
        curves_png(args.out, series, title="train loss", xlabel="step", ylabel="loss")
        print(f"wrote {args.out}")
    return 0


def cli() -> None:
    """The console command: ``main`` with one-line errors and exit codes."""
    sys.exit(run(main, PROG))
