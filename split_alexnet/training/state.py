"""What a training run holds and reports, as plain data: where it stands (:class:`Position`),
its data (:class:`RunData`), why it stopped (:class:`StopReason`) and what it returns
(:class:`TrainResult`). The :class:`~split_alexnet.training.trainer.Trainer` owns them (and
its stop flag, a :class:`~split_alexnet.utils.signals.StopOnSignal`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from split_alexnet.data.dataset import CropFolder
from split_alexnet.data.stats import Stats


@dataclass
class Position:
    """Where training stands; every field but ``last_save`` is saved in each checkpoint."""

    epoch: int = 0          # the epoch in progress (0-based: epochs finished)
    epoch_step: int = 0     # optimizer steps already taken in this epoch
    step: int = 0           # optimizer steps in total
    best_top1: float = float("inf")
    last_save: float = 0.0  # time.monotonic() of the last checkpoint


@dataclass
class RunData:
    """The run's data, as set up once: the images, their statistics and the batches."""

    root: Path                      # the dataset root
    stats: Stats                    # mean image and PCA statistics of train/
    classes: list[str]              # class folder names, in label order
    class_meta: list[dict]          # wnid, index and name of each class (checkpoints keep it)
    train_set: CropFolder           # random crops, flips and colour noise
    val_set: CropFolder             # centre crops
    holdout_set: CropFolder | None  # --holdout: training images held out, centre crops
    batch: int                      # images per step in this process
    steps_per_epoch: int


class StopReason(enum.Enum):
    """Why training stopped, or (``EPOCH``) that an epoch's steps are done."""

    EPOCH = "epoch"          # the epoch's last step: the run goes on
    MAX_STEPS = "max_steps"  # --max-steps reached (a checkpoint is saved)
    SIGNAL = "signal"        # SIGTERM or SIGINT (a checkpoint is saved; --resume continues)
    DONE = "done"            # every epoch trained


@dataclass
class TrainResult:
    """What a run ends with: why, at which step, and its last evaluations (None: none ran)."""

    stopped: StopReason
    step: int
    epoch: int
    val: dict | None = None         # the last centre-crop evaluation of val
    holdout: dict | None = None     # with --holdout: the last evaluation of the hold-out
    ten_crop: dict | None = None    # the paper's ten-crop test, at the end

    def to_json(self) -> dict:
        """The result as the trainer prints it (stdout, one JSON object)."""
        return {"stopped": self.stopped.value, "step": self.step, "epoch": self.epoch,
                "val": self.val, "holdout": self.holdout, "ten_crop": self.ten_crop}
