"""The training run's data loaders, and the one-line report when a loader worker dies.

A fresh :class:`EpochSampler` every epoch (at the trainer's position inside it) and one seed
for the loader's own draws. The training set is wrapped in a :class:`ReadingLog`: each worker
writes, in memory shared with the trainer, which sample it is reading, so that when one dies
(killed, out of memory, a crash in a decoder) :func:`worker_error` names the batch it was
reading, from public information only (``torch.utils.data.get_worker_info``, the worker pids
in torch's message, the sampler's order).
"""

from __future__ import annotations

import multiprocessing
import os
import re
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from split_alexnet.data.dataset import CropFolder, EpochSampler, make_loader
from split_alexnet.utils.cli import Abort

if TYPE_CHECKING:  # the trainer imports this module
    from split_alexnet.training.trainer import Trainer


class ReadingLog(Dataset):
    """``dataset``, item for item; in a DataLoader worker each item first records (the
    worker's pid, the item's index) in shared memory, one slot per worker."""

    def __init__(self, dataset: CropFolder, workers: int) -> None:
        self.dataset = dataset
        self.slots = multiprocessing.Array("q", [-1] * 2 * max(1, workers), lock=False)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        info = get_worker_info()
        if info is not None:
            index = key[1] if isinstance(key, (tuple, list)) else key  # (epoch, i) or i
            self.slots[2 * info.id:2 * info.id + 2] = [os.getpid(), int(index)]
        return self.dataset[key]

    def reading(self) -> dict[int, int]:
        """{worker pid: index of the item it read last} for every worker that read one."""
        s = self.slots
        return {s[i]: s[i + 1] for i in range(0, len(s), 2) if s[i] > 0}


def _loader(t: "Trainer", ds: Dataset, batch_size: int, sampler: EpochSampler) -> DataLoader:
    loader = make_loader(ds, batch_size=batch_size, sampler=sampler, workers=t.cfg.data.workers,
                         pin_memory=t.device.type == "cuda")
    # The loader's own seed draw must not touch the global RNG (the dropout stream), or a
    # resumed run would draw different masks. Augmentation does not use it either: it is
    # derived from (seed, epoch, index) inside the dataset.
    loader.generator = torch.Generator().manual_seed(t.cfg.runtime.seed)
    return loader


def train_loader(t: "Trainer") -> DataLoader:
    """This rank's training batches for the epoch in progress, from its position on."""
    d = t.data
    sampler = EpochSampler(len(d.train_set), epoch=t.pos.epoch, seed=t.cfg.runtime.seed,
                           shuffle=True, rank=t.ctx.data_rank, world_size=t.ctx.data_size,
                           drop_last=True, start=t.pos.epoch_step * d.batch)
    return _loader(t, ReadingLog(d.train_set, t.cfg.data.workers), d.batch, sampler)


def val_loader(t: "Trainer", ten_crop: bool, dataset: CropFolder | None = None) -> DataLoader:
    """This rank's share of the validation set (every image once over all ranks): centre
    crops, or the paper's ten crops (a tenth of the batch size); or of ``dataset`` (the
    --holdout images), centre crops."""
    d = t.data
    ds = dataset if dataset is not None else d.val_set if not ten_crop else CropFolder(
        d.root / "val", d.classes, mode="tencrop", seed=t.cfg.runtime.seed,
        strict=t.cfg.data.strict)
    sampler = EpochSampler(len(ds), shuffle=False, rank=t.ctx.data_rank,
                           world_size=t.ctx.data_size, drop_last=False)
    return _loader(t, ds, max(1, d.batch // 10) if ten_crop else d.batch, sampler)


def dead_worker_files(message: str, loader: DataLoader) -> list[str]:
    """The files of the batch that the worker(s) named in torch's ``message`` ("DataLoader
    worker (pid 123) ...") were reading; every worker's batch if no pid matches."""
    log, sampler, size = loader.dataset, loader.sampler, loader.batch_size
    if not isinstance(log, ReadingLog) or not isinstance(sampler, EpochSampler):
        return []
    reading = log.reading()
    named = re.search(r"\(pids?(?:\(s\))? ([\d, ]+)\)", message)
    pids = {int(p) for p in re.findall(r"\d+", named.group(1))} if named else set()
    indices = [i for pid, i in reading.items() if pid in pids] or list(reading.values())
    order = sampler.indices()[sampler.start:]
    where = {i: k for k, i in enumerate(order)}
    batches = sorted({where[i] // size for i in indices if i in where})
    samples = log.dataset.samples
    return [samples[i][0] for b in batches for i in order[b * size:(b + 1) * size]]


def worker_error(e: RuntimeError, loader: DataLoader, *, step: int, epoch: int,
                 last_checkpoint: str) -> BaseException:
    """A RuntimeError from a DataLoader worker that died -> :class:`Abort`, one line naming
    the files it was reading; any other RuntimeError is returned unchanged."""
    msg = (str(e).strip().splitlines() or [""])[0]
    if "DataLoader worker" not in msg:
        return e
    files = dead_worker_files(msg, loader)
    msg = msg.split(". Details are lost")[0].rstrip(". ")
    where = f"; it was reading one of: {', '.join(files[:8])}" + \
        (f" (+{len(files) - 8} more)" if len(files) > 8 else "") if files else ""
    return Abort(f"{msg} at step {step} (epoch {epoch}){where}; rerun with --workers 0 to see "
                 f"the error. Last good checkpoint: {last_checkpoint}")
