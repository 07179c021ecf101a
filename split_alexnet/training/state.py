"""What one training process holds (:class:`Trainer`), where it stands (:class:`Position`)
and whether it was asked to stop (:class:`StopRequested`): state only. ``trainer.setup``
fills it; the loops (``loop.py``) and the checkpoints (``checkpoint.py``) read and advance
it."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from split_alexnet.data.dataset import CropFolder
from split_alexnet.data.stats import Stats
from split_alexnet.network.model import ModelConfig
from split_alexnet.training.config import TrainConfig
from split_alexnet.training.distributed import Context
from split_alexnet.training.metrics import MetricsLog, Watchdog
from split_alexnet.training.optim import LRSchedule
from split_alexnet.training.runfolder import RunLock
from split_alexnet.utils.cli import Abort


@dataclass
class Position:
    """Where training stands; every field but ``last_save`` is saved in each checkpoint."""

    epoch: int = 0          # the epoch in progress
    epoch_step: int = 0     # optimizer steps already taken in this epoch
    step: int = 0           # optimizer steps in total
    best_top1: float = float("inf")
    last_save: float = 0.0  # time.monotonic() of the last checkpoint


class StopRequested:
    """SIGTERM/SIGINT, while entered: the first sets the flag (true from then on), and the
    loops stop within one batch, the run saves where that is meaningful and exits 0. A second
    raises KeyboardInterrupt at once (exit 130); a save it cuts short is abandoned and the
    previous checkpoint stays (``checkpoint.save`` then raises :class:`Interrupted`)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.count = 0  # signals received
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopRequested":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._old.clear()

    def __bool__(self) -> bool:
        return self.signal is not None

    @property
    def forced(self) -> bool:
        """A second signal arrived: stop now, without saving."""
        return self.count > 1


class Interrupted(Abort):
    """A second signal cut a save short: one line, exit code 130 (as for Ctrl-C)."""

    code = 130


@dataclass
class Trainer:
    """Everything one training process holds: config, rank, data, model, optimizer, logs."""

    cfg: TrainConfig                # validated
    ctx: Context                    # rank and world size (world size 1 without torchrun)
    devices: tuple[torch.device, ...]  # the towers' two devices, or one (single-device)
    out: Path                       # the run folder
    root: Path                      # the dataset root
    stats: Stats                    # mean image and PCA statistics of train/
    classes: list[str]              # class folder names, in label order
    class_meta: list[dict]          # wnid, index and name of each class (checkpoints keep it)
    train_set: CropFolder           # random crops, flips and colour noise
    val_set: CropFolder             # centre crops
    batch: int                      # images per step in this process
    steps_per_epoch: int
    model_cfg: ModelConfig          # the network, with num_classes from the data
    net: nn.Module                  # the network itself: checkpoints are its state
    model: nn.Module                # what trains: parallelize(net) (DDP, compiled)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler    # enabled only for fp16 on CUDA
    schedule: LRSchedule
    metrics: MetricsLog             # OUT/metrics.jsonl (rank 0 only)
    watchdog: Watchdog
    pos: Position = field(default_factory=Position)
    stop: StopRequested = field(default_factory=StopRequested)  # entered by trainer.train
    lock: RunLock | None = None     # OUT/train.lock, held on rank 0 for the whole run

    @property
    def device(self) -> torch.device:
        """Where the input, the loss and fc8 live: the first device."""
        return self.devices[0]

    @property
    def is_main(self) -> bool:
        return self.ctx.rank == 0

    @property
    def eval_model(self) -> nn.Module:
        """What evaluation runs: ``model`` in one process (compiled, with --compile); under
        torchrun the network itself, eager, outside DDP (ranks may run different numbers of
        validation batches, which DDP's forward would wait on)."""
        return self.net if self.ctx.world_size > 1 else self.model
