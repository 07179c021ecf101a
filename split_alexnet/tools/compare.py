"""Compare two training runs (e.g. split vs --single-device with one seed) step by step.

    python -m split_alexnet.compare runs/split runs/single --out compare.png

Prints the settings in which the runs differ (their config.json), both runs' train loss and
validation errors side by side at the steps they share, the largest difference of each, and
writes a PNG of the curves. Runs logged at different --log-interval are compared at each
epoch's last step, which every run logs. A record it cannot read (not
an object, a train or val record without an integer step or a finite value) stops it with
one line naming the record.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Sequence

from split_alexnet.training.metrics import FILENAME, read_records
from split_alexnet.utils.cli import Parser, first_sentence, UsageError, run
from split_alexnet.utils.flags import Number, check_output
from split_alexnet.utils.plot import curves_png

PROG = "split_alexnet.compare"

#: What is compared: (record kind, field).
FIELDS = (("train", "loss"), ("val", "top1_err"), ("val", "top5_err"))


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def comparable(run_dir: Path | str) -> dict[tuple[str, str], dict[int, float]]:
    """{(kind, field): {step: value}} of a run's records for each of :data:`FIELDS` (a step
    logged again after a resume keeps its latest value). A train or val record that is not
    an object with an integer step and finite values is a :class:`UsageError` naming it."""
    out: dict[tuple[str, str], dict[int, float]] = {kf: {} for kf in FIELDS}
    where = Path(run_dir) / FILENAME
    for i, r in enumerate(read_records(run_dir), 1):
        if not isinstance(r, dict):
            raise UsageError(f"{where}: record {i} is not a JSON object: {str(r)[:60]}")
        kind = r.get("kind")
        wanted = [f for k, f in FIELDS if k == kind]
        if not wanted:
            continue
        step = r.get("step")
        bad = next((f for f in wanted if not _number(r.get(f))), None)
        if not isinstance(step, int) or isinstance(step, bool) or bad:
            what = f"{bad} = {r.get(bad)!r}" if bad else f"step = {step!r}"
            raise UsageError(f"{where}: record {i} ({kind}) has {what}; compare needs an "
                             "integer step and finite numbers")
        for f in wanted:
            out[(kind, f)][step] = float(r[f])
        if kind == "train" and isinstance(r.get("epoch"), int):
            last = out.setdefault(("epoch_end", "step"), {})
            last[r["epoch"]] = max(last.get(r["epoch"], 0), step)
    return out


def per_epoch(m: dict) -> dict[int, float]:
    """The train loss of a run's last record in each epoch, by step: what two runs with
    different --log-interval share (every run logs at each epoch's last step)."""
    loss = m[("train", "loss")]
    return {s: loss[s] for s in m.get(("epoch_end", "step"), {}).values() if s in loss}


def settings_table(dirs: Sequence[str]) -> list[tuple[str, str, str]]:
    """(flag, run a's value, run b's) for each setting in which the runs' config.json
    differ (none when either run has no readable config.json)."""
    cfgs = []
    for d in dirs:
        try:
            cfg = json.loads((Path(d) / "config.json").read_text())
        except (OSError, ValueError):
            return []
        cfgs.append(cfg if isinstance(cfg, dict) else {})
    a, b = cfgs
    return [("--" + k.replace("_", "-"), str(a.get(k, "-")), str(b.get(k, "-")))
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in ("out",)]


def main(argv: Sequence[str] | None = None) -> int:
    p = Parser(module=PROG, description=first_sentence(__doc__))
    p.add_argument("run_a", help="a run folder (its metrics.jsonl and config.json)")
    p.add_argument("run_b", help="the run folder to compare it with")
    p.add_argument("--out", default=None, help="PNG of both runs' curves (default: none)")
    p.add_argument("--rows", action=Number, min=1, default=20,
                   help="at most this many table rows")
    args = p.parse_args(argv)
    check_output("--out", args.out)
    a, b = comparable(args.run_a), comparable(args.run_b)
    name_a, name_b = Path(args.run_a).name, Path(args.run_b).name
    differ = settings_table([args.run_a, args.run_b])
    if differ:
        wa = max(len(name_a), *(len(v) for _, v, _ in differ))
        print(f"settings that differ:\n  {'flag':<22} {name_a:<{wa}} {name_b}")
        for flag, va, vb in differ:
            print(f"  {flag:<22} {va:<{wa}} {vb}")
    by_epoch = any(f == "--log-interval" for f, _, _ in differ)
    if by_epoch:
        a[("train", "loss")], b[("train", "loss")] = per_epoch(a), per_epoch(b)
        print("the runs log at different --log-interval: the train loss is compared at each "
              "epoch's last step")
    report = {}
    for kind, field in FIELDS:
        ra, rb = a[(kind, field)], b[(kind, field)]
        common = sorted(set(ra) & set(rb))
        if not common:
            continue
        diffs = [(abs(ra[s] - rb[s]), s) for s in common]
        worst, at = max(diffs)
        report[f"{kind} {field}"] = (worst, at, len(common))
        print(f"{kind} {field}: {len(common)} shared steps, largest difference {worst:.3g} "
              f"at step {at}")
        if kind == "train":
            stride = max(1, len(common) // args.rows)
            print(f"  {'step':>7} {name_a[:14]:>14} {name_b[:14]:>14} {'diff':>10}")
            for s in common[::stride]:
                print(f"  {s:>7} {ra[s]:>14.6f} {rb[s]:>14.6f} {ra[s] - rb[s]:>10.3g}")
    if not report:
        raise UsageError("the two runs share no logged steps")
    if args.out:
        series = [(f"{name} train loss", list(m[("train", "loss")]),
                   list(m[("train", "loss")].values())) for name, m in ((name_a, a), (name_b, b))]
        curves_png(args.out, series, title="train loss", xlabel="step", ylabel="loss")
        print(f"wrote {args.out}")
    return 0


def cli() -> None:
    """The console command: ``main`` with one-line errors and exit codes."""
    sys.exit(run(main, PROG))
