"""What one training process holds (:class:`Trainer`), where it stands (:class:`Position`)
and whether it was asked to stop (its ``stop``, a
:class:`~split_alexnet.utils.signals.StopOnSignal`): state only. ``trainer.setup``
fills it; the loops (``loop.py``) and the checkpoints (``checkpoint.py``) read and advance
it."""

from __future__ import annotations

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
from split_alexnet.utils.signals import StopOnSignal


@dataclass
class Position:
    """Where training stands; every field but ``last_save`` is saved in each checkpoint."""

    epoch: int = 0          # the epoch in progress
    epoch_step: int = 0     # optimizer steps already taken in this epoch
    step: int = 0           # optimizer steps in total
    best_top1: float = float("inf")
    last_save: float = 0.0  # time.monotonic() of the last checkpoint


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
    stop: StopOnSignal = field(default_factory=StopOnSignal)  # entered by trainer.train
    lock: RunLock | None = None     # OUT/train.lock, held on rank 0 for the whole run
    holdout_set: CropFolder | None = None  # --holdout: training images held out, centre crops

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
