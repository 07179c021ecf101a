"""--plan: what a training run will do (steps, schedule, checkpoints, disk, memory, wall time),
measured from a few real steps in a scratch folder, without writing anything into --out."""

from __future__ import annotations

import math
import resource
import statistics
import tempfile
from pathlib import Path

import torch

from split_alexnet.network.hybrid import HybridAlexNet
from split_alexnet.network.model import collapsed_shapes
from split_alexnet.network.towers import RankTower
from split_alexnet.training.config import TrainConfig
from split_alexnet.training.metrics import read_records
from split_alexnet.training.optim import parse_schedule, step_iters
from split_alexnet.training.options import Command
from split_alexnet.training.trainer import Trainer
from split_alexnet.utils.cli import UsageError

#: Untimed steps first (allocation, autotuning), then --plan-steps timed ones.
WARMUP_STEPS = 1


def schedule_text(cfg: TrainConfig, steps_per_epoch: int, total: int) -> str:
    """The learning-rate schedule as the config defines it, in words."""
    s, lr = cfg.schedule, cfg.optim.lr
    spec, drops = s.lr_schedule, s.lr_drops
    every_steps = step_iters(spec)
    if every_steps:
        at = [every_steps * k for k in range(1, drops + 1) if every_steps * k < total]
        return (f"lr {lr:g}, / 10 every {every_steps} steps, at most {drops} times: "
                f"drops before steps {', '.join(str(s + 1) for s in at) or 'none'}")
    every = parse_schedule(spec)
    if every is not None:
        at = [every * k for k in range(1, drops + 1) if every * k < s.epochs]
        return (f"lr {lr:g}, / 10 every {every} epochs, at most {drops} times: after "
                f"epochs {', '.join(map(str, at)) or 'none'}")
    on = "the hold-out" if cfg.data.holdout else "val"
    return (f"lr {lr:g}, / 10 when {on} top-1 error has not improved (by more than "
            f"{s.plateau_threshold:g} relative) for {s.plateau_patience} epochs, at least "
            f"{s.plateau_min_epochs} epochs at each rate, at most {drops} times (evaluation "
            f"every {s.eval_every} epochs)")


def state_bytes(t) -> tuple[int, int]:
    """(bytes of the parameters, bytes of the optimizer's per-parameter state) of the whole
    network, as a checkpoint holds them: a process under --parallel towers or hybrid holds
    part of it, so its own bytes are scaled to the whole network's parameter count."""
    mine = sum(p.numel() for p in t.net.parameters())
    params = sum(p.numel() * p.element_size() for p in t.net.parameters())
    opt = sum(v.numel() * v.element_size() for st in t.optimizer.state.values()
              for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    if isinstance(t.net, (RankTower, HybridAlexNet)):
        whole = sum(math.prod(s) for s in collapsed_shapes(len(t.data.classes)).values())
        params, opt = params * whole // mine, opt * whole // mine
    return params, opt


def plan(cfg: TrainConfig, cmd: Command) -> str:
    """The plan of ``cfg``'s run, from a real :class:`Trainer` set up in a scratch folder,
    that trains ``WARMUP_STEPS + cmd.plan_steps`` steps. Nothing is written into the run's
    --out."""
    data = cfg.data.data
    if data is None or not (Path(data) / "train").is_dir():
        raise UsageError("--plan needs an existing dataset: give --data DIR (with --demo, run "
                         "--demo once first: it generates OUT/demo_data)")
    steps = WARMUP_STEPS + cmd.plan_steps
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with tempfile.TemporaryDirectory(prefix="split_alexnet_plan_") as scratch:
        probe = cfg.with_settings(out=scratch, max_steps=steps, log_interval=1,
                                  watchdog_steps=0, checkpoint_minutes=1e9)
        t = Trainer.setup(probe)
        try:
            if t.devices[0].type == "cuda":
                for d in set(t.devices):
                    torch.cuda.reset_peak_memory_stats(d)
            with t.stop:
                t.train_epoch()
            # rank 0 writes the records (under torchrun each process has its own scratch)
            recs = [r for r in read_records(scratch) if r["kind"] == "train"] \
                if t.is_main else []
            params, opt = state_bytes(t)
            if t.devices[0].type == "cuda":
                memory = ", ".join(f"{d}: {torch.cuda.max_memory_allocated(d) / 2**30:.2f} GiB"
                                   for d in sorted(set(t.devices), key=str))
                memory += " (torch.cuda.max_memory_allocated)"
            else:
                grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
                memory = (f"{grown / 2**20:.2f} GiB (CPU: growth of this process's peak "
                          "resident set size over setup and the steps)")
            per_epoch = t.data.steps_per_epoch
            n_train, images = len(t.data.train_set), t.data.batch * t.ctx.data_size
        finally:
            t.close()
    secs = [images / r["images_per_s"] for r in recs[WARMUP_STEPS:] if r["images_per_s"] > 0]
    s, c = cfg.schedule, cfg.checkpoint
    total = per_epoch * s.epochs
    if s.max_steps is not None:
        total = min(total, s.max_steps)
    ckpt = params + opt
    kept = c.keep_last if c.keep_last else s.epochs
    n_files = 1 + min(kept, s.epochs)  # last.pt and the kept epoch checkpoints, full size
    disk = n_files * ckpt + params     # and best.pt: the weights alone
    lines = [
        f"plan for {c.out} (nothing written there):",
        f"  training images: {n_train}; steps per epoch: {per_epoch}; epochs: {s.epochs}; "
        f"total steps: {total}" + (f" (--max-steps {s.max_steps})"
                                   if s.max_steps is not None else ""),
        f"  schedule: {schedule_text(cfg, per_epoch, total)}",
        f"  checkpoints: last.pt every {c.checkpoint_minutes:g} minutes and at each epoch's "
        f"end, epoch_NNN.pt each epoch (keeping {c.keep_last or 'all'}), best.pt",
        f"  checkpoint size: {ckpt / 2**20:.0f} MiB ({params / 2**20:.0f} MiB parameters + "
        f"{opt / 2**20:.0f} MiB optimizer state); at most {n_files} such files and "
        f"best.pt (parameters only): {disk / 2**30:.2f} GiB",
        f"  memory per process: {memory}",
    ]
    if secs:
        med, lo, hi = statistics.median(secs), min(secs), max(secs)
        lines.append(
            f"  step time over {len(secs)} timed steps (after {WARMUP_STEPS} warm-up) on "
            f"{', '.join(map(str, t.devices))}: median {med:.3f} s (min {lo:.3f}, max {hi:.3f})")
        lines.append(
            f"  projected training time for {total} steps: {_hours(med * total)} (min "
            f"{_hours(lo * total)}, max {_hours(hi * total)}; evaluations not included)")
    return "\n".join(lines)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h"
