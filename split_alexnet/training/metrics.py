"""metrics.jsonl, a run's record of what it measured: the one writer (the trainer's) and the
one reader (compare, experiments, visualize, and the trainer's own curves.png), and the
two readers of the training loss as it goes: the :class:`Watchdog` (still at chance) and the
:class:`DivergenceAlarm` (far above it, or not finite).

One JSON object per line, each with a ``kind``: ``train`` (per --log-interval: step, epoch,
loss, top1_err, lr, images_per_s), ``val`` (per evaluation: step, epoch, n, top1_err,
top5_err, loss, lr), ``val_ten_crop``, ``watchdog``, ``divergence`` (step, epoch, loss, bound, reason), ``resume`` and ``lr_change`` (step, epoch,
old, new: --resume-lr); the writer adds ``time``. A resumed run appends, so a step can appear
more than once: :func:`by_step` keeps the latest.

A crash or a full disk can cut the last record short (a torn line). The reader skips a torn
line with one warning: the last line, or one that a resumed run's ``resume`` record follows
(a resumed run starts its records on a new line). Any other line that is not JSON is an
error. A failed write stops the run (:class:`Abort`, exit 1); the checkpoints are untouched.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

from split_alexnet.training.config import PROG, TrainConfig
from split_alexnet.utils.cli import Abort, UsageError
from split_alexnet.utils.fileio import open_own_file
from split_alexnet.utils.plot import curves_png

FILENAME = "metrics.jsonl"


class MetricsLog:
    """Appends records to ``run_dir/metrics.jsonl``, stamped with the time. Disabled (every
    rank but 0 under torchrun) it writes nothing. Its first record starts on a new line when
    the file ends in a torn one (with a warning). A ``metrics.jsonl`` that is a symbolic link
or not a regular file is refused (:class:`UsageError`) before anything is appended."""

    def __init__(self, run_dir: Path | str, *, enabled: bool = True) -> None:
        self.path = Path(run_dir) / FILENAME
        self.enabled = enabled
        self._tail_checked = False
        self.tensorboard = None  # --tensorboard: a tensorboard.TensorBoardLog of the records

    def _line_start(self) -> str:
        """'' if the file is missing, empty or ends a line; else a newline (and a warning)."""
        self._tail_checked = True
        try:
            with os.fdopen(open_own_file(self.path, os.O_RDONLY), "rb") as f:
                f.seek(0, 2)
                if f.tell() == 0:
                    return ""
                f.seek(-1, 2)
                if f.read(1) == b"\n":
                    return ""
        except FileNotFoundError:
            return ""
        print(f"{PROG}: warning: {self.path} ends in a torn record (cut short by a crash or a "
              "full disk); readers skip it, and this run's records start on a new line",
              file=sys.stderr)
        return "\n"

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        line = json.dumps(record) + "\n"
        try:
            if not self._tail_checked:
                line = self._line_start() + line
            fd = open_own_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            with os.fdopen(fd, "a") as f:
                f.write(line)  # one write per record: a crash loses at most the last line
        except OSError as e:
            raise Abort(f"could not write {self.path}: {e.strerror or e}; the checkpoints are "
                        "untouched, stopping") from None
        if self.tensorboard is not None:
            self.tensorboard.log(record)


def read_records(run_dir: Path | str, *, missing_ok: bool = False,
                 warn: bool = True) -> list[dict]:
    """Every record of ``run_dir/metrics.jsonl``, in order. A missing file is a
    :class:`UsageError` (or ``[]`` with ``missing_ok``). A torn line (the last line, or one a
    ``resume`` record follows) is skipped, with one warning line on stderr unless ``warn`` is
    false; any other line that is not JSON is a :class:`UsageError`."""
    path = Path(run_dir) / FILENAME
    if not path.is_file():
        if missing_ok:
            return []
        raise UsageError(f"{run_dir} is not a run folder (no {FILENAME})")
    records: list[dict] = []
    torn: list[int] = []
    pending = 0  # the number of a line that is not JSON, until the next record judges it
    for n, line in enumerate(path.read_bytes().decode(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if pending and not (isinstance(record, dict) and record.get("kind") == "resume"):
            raise UsageError(f"{path}:{pending} is not valid JSON")
        if pending:
            torn.append(pending)
            pending = 0
        if record is None:
            pending = n
        else:
            records.append(record)
    torn += [pending] if pending else []
    if torn and warn:
        print(f"warning: {path}: skipped {len(torn)} torn record(s) (line "
              f"{', '.join(map(str, torn))}), cut short by a crash or a full disk",
              file=sys.stderr)
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
    against step, from the run's own records (torn ones skipped silently: ``MetricsLog``
    warned). Records it cannot read are a warning, never the end of the run; a failure to
    write the file is an :class:`Abort` (exit 1)."""
    run_dir = Path(run_dir)
    try:
        steps = by_step(read_records(run_dir, warn=False))
    except UsageError as e:
        print(f"{PROG}: warning: curves.png not drawn: {e}", file=sys.stderr)
        return
    train = {s: r["top1_err"] for s, r in steps.get("train", {}).items()}
    val = {s: r["top1_err"] for s, r in steps.get("val", {}).items()}
    if not (train or val):
        return
    try:
        curves_png(run_dir / "curves.png",
                   [("train top-1 error (batch)", list(train), list(train.values())),
                    ("val top-1 error (centre crop)", list(val), list(val.values()))],
                   title=f"{run_dir.name}: top-1 error", xlabel="step", ylabel="error",
                   ylim=(0.0, 1.0))
    except OSError as e:
        raise Abort(f"could not write {run_dir / 'curves.png'}: {e.strerror or e}; the "
                    "checkpoints are untouched, stopping") from None


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
                  f"steps {mean:.3f}; this run is not learning. Try --recipe bvlc (Caffe's "
                  "bvlc_alexnet: biases 0.1, the recipe with a published result) or check "
                  "--init (the paper's biases of 1 stall small runs), the input scale and "
                  "--lr; see docs/experiments.md (init, input scale)", file=sys.stderr)
            self.log({"kind": "watchdog", "step": step, "loss": mean, "chance_loss": chance,
                      "window": len(self.recent)})


#: The divergence rule: a log window's mean training loss above this many times chance,
#: ln(classes). A run that learns stays below chance after its first steps; cross-entropy
#: three times chance means the network is confidently wrong: its weights are blowing up.
DIVERGENCE_X_CHANCE = 3.0


class Diverged(Abort):
    """The run diverged and stops: a non-finite loss or weight, or (with
    --stop-on-divergence) a loss far above chance. Exit 1; nothing newer is saved."""


def divergence_advice(lr: float, cfg: TrainConfig) -> str:
    """What to try when a run diverges at rate ``lr``: a smaller --lr, and the recipe and
    initialisation with a published result where the run has others."""
    tries = [f"a smaller --lr (e.g. {lr / 10:g})"]
    if cfg.recipe != "bvlc":
        tries.append("--recipe bvlc (Caffe's recipe with a published result)")
    if cfg.model.init != "caffe":
        tries.append("--init caffe (biases 0.1)")
    return f"try {', '.join(tries[:-1]) + ' or ' if len(tries) > 1 else ''}{tries[-1]} " \
           "(docs/training.md, \"Divergence\")"


class DivergenceAlarm:
    """Reads each log window's mean training loss: above :data:`DIVERGENCE_X_CHANCE` x
    ln(classes) it prints one loud line with what to try and writes a ``divergence`` record,
    once until the loss comes back below the bound; with ``stop`` (--stop-on-divergence) it
    raises :class:`Diverged` instead of letting the run go on. Non-finite values are the
    loop's (:func:`nonfinite`): the run cannot go on from those.

    Under torchrun every process observes the same loss at the same step, the highest of the
    ``replicas``' own window means (``StepWindow.read``), so every process decides alike and
    they all stop together; only the ``enabled`` one (rank 0) prints and records it, and the
    others' :class:`Diverged` is quiet."""

    def __init__(self, cfg: TrainConfig, num_classes: int, log: Callable[[dict], None], *,
                 enabled: bool = True, replicas: int = 1) -> None:
        self.bound = DIVERGENCE_X_CHANCE * math.log(num_classes) if num_classes > 1 else None
        self.cfg, self.log, self.enabled, self.replicas = cfg, log, enabled, replicas
        self.stop = cfg.logging.stop_on_divergence
        self.raised = False

    def observe(self, steps: range, epoch: int, loss: float, lr: float, last: str) -> None:
        """A log window of ``steps`` (in ``epoch``, counted from 1) with mean ``loss`` (under
        torchrun the highest of the replicas'); ``last``: the last good checkpoint, for the
        message."""
        if self.bound is None or loss <= self.bound:
            self.raised = False
            return
        if self.raised and not self.stop:
            return
        self.raised = True
        where = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
        of = f" (the highest of {self.replicas} replicas')" if self.replicas > 1 else ""
        what = (f"the training loss diverged: {loss:.4g}{of} over {where} (epoch {epoch}) is "
                f"above 3 x ln(classes) = {self.bound:.3f}; {divergence_advice(lr, self.cfg)}")
        self.log({"kind": "divergence", "step": steps[-1], "epoch": epoch, "loss": loss,
                  "bound": self.bound, "reason": "loss above 3 x chance"})
        if self.stop:
            stop = Diverged(f"{what}. Stopping (--stop-on-divergence) without saving; the "
                            f"last good checkpoint: {last}")
            stop.quiet = not self.enabled  # rank 0 says it for the job
            raise stop
        if self.enabled:
            print(f"{PROG}: DIVERGENCE: {what}; --stop-on-divergence stops such a run",
                  file=sys.stderr)
