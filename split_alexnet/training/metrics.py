"""metrics.jsonl, a run's record of what it measured: the one writer (the trainer's) and the
one reader (compare, experiments, visualize, and the trainer's own curves.png), and the
:class:`Watchdog` that reads the training loss as it goes.

One JSON object per line, each with a ``kind``: ``train`` (per --log-interval: step, epoch,
loss, top1_err, lr, images_per_s), ``val`` (per evaluation: step, epoch, n, top1_err,
top5_err, loss, lr), ``val_ten_crop``, ``watchdog`` and ``resume``; the writer adds ``time``.
A resumed run appends, so a step can appear more than once: :func:`by_step` keeps the latest.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

from split_alexnet.training.config import PROG
from split_alexnet.utils.cli import UsageError
from split_alexnet.utils.plot import curves_png

FILENAME = "metrics.jsonl"


class MetricsLog:
    """Appends records to ``run_dir/metrics.jsonl``, stamped with the time. Disabled (every
    rank but 0 under torchrun) it writes nothing."""

    def __init__(self, run_dir: Path | str, *, enabled: bool = True) -> None:
        self.path = Path(run_dir) / FILENAME
        self.enabled = enabled

    def log(self, record: dict) -> None:
        if self.enabled:
            line = json.dumps({"time": round(time.time(), 3), **record}) + "\n"
            with open(self.path, "a") as f:
                f.write(line)  # one write per record: a crash loses at most the last line


def read_records(run_dir: Path | str, *, missing_ok: bool = False) -> list[dict]:
    """Every record of ``run_dir/metrics.jsonl``, in order. A missing file is a
    :class:`UsageError` (or ``[]`` with ``missing_ok``), and so is a line that is not JSON."""
    path = Path(run_dir) / FILENAME
    if not path.is_file():
        if missing_ok:
            return []
        raise UsageError(f"{run_dir} is not a run folder (no {FILENAME})")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise UsageError(f"{path}:{n} is not valid JSON") from None
    return records


def by_step(records: list[dict]) -> dict[str, dict[int, dict]]:
    """{kind: {step: record}} of the records that have a step; a step logged again (after a
    resume) keeps its latest record."""
    out: dict[str, dict[int, dict]] = {}
    for r in records:
        if "step" in r:
            out.setdefault(r["kind"], {})[r["step"]] = r
    return out


def write_curves(run_dir: Path | str) -> None:
    """``run_dir/curves.png``: train (per log interval) and validation (per epoch) top-1 error
    against step, from the run's own records."""
    run_dir = Path(run_dir)
    steps = by_step(read_records(run_dir))
    train = {s: r["top1_err"] for s, r in steps.get("train", {}).items()}
    val = {s: r["top1_err"] for s, r in steps.get("val", {}).items()}
    if train or val:
        curves_png(run_dir / "curves.png",
                   [("train top-1 error (batch)", list(train), list(train.values())),
                    ("val top-1 error (centre crop)", list(val), list(val.values()))],
                   title=f"{run_dir.name}: top-1 error", xlabel="step", ylabel="error",
                   ylim=(0.0, 1.0))


class Watchdog:
    """--watchdog-steps W: at step W, one warning line (not an abort) and a "watchdog"
    record if the training loss, averaged over the last min(50, W/2) steps, is not below
    chance, ln(classes), by more than 2% (docs/experiments.md). W = 0 disables it."""

    def __init__(self, steps: int, num_classes: int, log: Callable[[dict], None], *,
                 enabled: bool = True) -> None:
        self.steps, self.num_classes, self.log, self.enabled = steps, num_classes, log, enabled
        self.recent: list[float] = []

    def observe(self, step: int, loss: float) -> None:
        """Call after every optimizer step with its (total) step number and loss."""
        w = self.steps
        if not w or step > w or self.num_classes < 2:
            return
        self.recent.append(loss)
        del self.recent[:-max(1, min(50, w // 2))]
        chance = math.log(self.num_classes)
        mean = sum(self.recent) / len(self.recent)
        if step == w and self.enabled and mean > 0.98 * chance:
            print(f"{PROG}: warning: after {step} steps the training loss is still at chance "
                  f"(ln {self.num_classes} = {chance:.3f}): mean of the last {len(self.recent)} "
                  f"steps {mean:.3f}; this run is not learning. Check --init (the paper's "
                  "biases of 1 stall small runs), the input scale and --lr; see "
                  "docs/experiments.md (init, input scale)", file=sys.stderr)
            self.log({"kind": "watchdog", "step": step, "loss": mean, "chance_loss": chance,
                      "window": len(self.recent)})
