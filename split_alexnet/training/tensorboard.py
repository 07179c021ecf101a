"""--tensorboard: the run's records also as TensorBoard events, in OUT/tensorboard.

The events are the records of ``metrics.jsonl`` (``metrics.MetricsLog`` hands each record it
writes to :class:`TensorBoardLog`), at their step and wall time, as scalars:

    train/loss, train/top1_err, train/lr, train/images_per_s    every --log-interval steps
    val/top1_err, val/top5_err, val/loss                        every evaluation
    holdout/...                                                  with --holdout
    val_ten_crop/top1_err, val_ten_crop/top5_err, val_ten_crop/loss
    lr_drop    the new learning rate, at the step of each division (with the reason as text)
    lr_change  the new learning rate of --resume-lr

``tensorboard --logdir OUT/tensorboard`` shows them. The ``tensorboard`` package is optional
(``pip install 'split_alexnet[tensorboard]'``): asked for without it, the run stops with one
line before any work (:func:`require`).

One event stream per run folder. A fresh run removes the event files of a run that is no
longer there (``--overwrite``). A resumed run continues the stream: its writer starts with
``purge_step`` at the checkpoint's step + 1, so that readers drop what the interrupted run
logged after the checkpoint (the resumed run logs those steps again), and a record that
``metrics.jsonl`` already held at or before the checkpoint's step is not written twice. If
the folder holds no events yet (the run trained without --tensorboard until now), the
records up to the checkpoint's step are written first, from ``metrics.jsonl``.
"""

from __future__ import annotations

import atexit
from pathlib import Path

from split_alexnet.training.metrics import by_step, read_records
from split_alexnet.utils.cli import Abort, UsageError

DIRNAME = "tensorboard"
#: The record kinds written, and their scalar fields.
SCALARS = {"train": ("loss", "top1_err", "lr", "images_per_s"),
           "val": ("top1_err", "top5_err", "loss"),
           "holdout": ("top1_err", "top5_err", "loss"),
           "val_ten_crop": ("top1_err", "top5_err", "loss"),
           "lr_drop": ("new",), "lr_change": ("new",)}
_EVENTS = "events.out.tfevents.*"


def require() -> None:
    """One line (exit code 2) unless the ``tensorboard`` package can be imported."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install "
                         "'split_alexnet[tensorboard]' (or pip install tensorboard)") from None


def tag(kind: str, key: str) -> str:
    return kind if kind in ("lr_drop", "lr_change") else f"{kind}/{key}"


class TensorBoardLog:
    """Writes the records it is given as events in ``out/tensorboard``. Records given before
    :meth:`start` wait for it (the resume decides where the stream continues)."""

    def __init__(self, out: Path | str, *, resuming: bool) -> None:
        require()
        self.dir = Path(out) / DIRNAME
        self.writer = None
        self._pending: list[dict] = []
        self._seen: set[tuple[str, int]] = set()
        # What the run logged before this process: read now, before a resume adds to it.
        self._history = _read_history(Path(out)) if resuming else []

    def start(self, resumed_step: int | None) -> None:
        """Open the stream: fresh (``None``), or continuing a run resumed at that step."""
        from torch.utils.tensorboard import SummaryWriter
        old = sorted(self.dir.glob(_EVENTS)) if self.dir.is_dir() else []
        try:
            if resumed_step is None:
                for p in old:  # a previous run's events: its files are gone (--overwrite)
                    p.unlink()
                self.writer = SummaryWriter(str(self.dir))
            else:
                self.writer = SummaryWriter(str(self.dir), purge_step=resumed_step + 1)
                earlier = [r for r in self._history if r["step"] <= resumed_step]
                self._seen = {(r["kind"], r["step"]) for r in earlier}
                if not old:  # no events yet: the run's records so far come first
                    for r in earlier:
                        self._write(r)
        except OSError as e:
            raise Abort(f"--tensorboard: cannot write {self.dir}: {e.strerror or e}") from None
        atexit.register(self.close)
        pending, self._pending = self._pending, []
        for record in pending:
            self.log(record)

    def log(self, record: dict) -> None:
        """Write ``record`` (a metrics.jsonl record, with its ``time``) if it has scalars."""
        if self.writer is None:
            self._pending.append(record)
            return
        kind, step = record.get("kind"), record.get("step")
        if kind not in SCALARS or not isinstance(step, int) or (kind, step) in self._seen:
            return
        self._seen.add((kind, step))
        try:
            self._write(record)
            self.writer.flush()
        except OSError as e:
            raise Abort(f"could not write {self.dir}: {e.strerror or e}; the checkpoints are "
                        "untouched, stopping") from None

    def _write(self, record: dict) -> None:
        kind, step, when = record["kind"], record["step"], record.get("time")
        for key in SCALARS[kind]:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag(kind, key), value, step, walltime=when)
        if kind == "lr_drop" and record.get("reason"):
            self.writer.add_text("lr_drop/reason", f"{record.get('old'):g} -> "
                                 f"{record.get('new'):g}: {record['reason']}", step,
                                 walltime=when)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _read_history(out: Path) -> list[dict]:
    """The records of ``out/metrics.jsonl`` that become events, the latest for each kind and
    step, in step order."""
    steps = by_step(read_records(out, missing_ok=True, warn=False))
    rows = [r for kind, by in steps.items() if kind in SCALARS for r in by.values()
            if isinstance(r.get("step"), int)]
    return sorted(rows, key=lambda r: r["step"])
