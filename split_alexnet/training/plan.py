"""--plan: what a training run will do (steps, schedule, checkpoints, disk, memory, wall time),
measured from a few real steps in a scratch folder, without writing anything into --out."""

from __future__ import annotations

import resource
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from split_alexnet.training.config import TrainConfig
from split_alexnet.training.loader import train_loader
from split_alexnet.training.loop import train_one_epoch
from split_alexnet.training.metrics import read_records
from split_alexnet.training.optim import parse_schedule, step_iters
from split_alexnet.training.state import Trainer
from split_alexnet.utils.cli import UsageError

#: Untimed steps first (allocation, autotuning), then --plan-steps timed ones.
WARMUP_STEPS = 1


def schedule_text(cfg: TrainConfig, steps_per_epoch: int, total: int) -> str:
    """The learning-rate schedule as the config defines it, in words."""
    spec, drops = cfg.lr_schedule, cfg.lr_drops
    every_steps = step_iters(spec)
    if every_steps:
        at = [every_steps * k for k in range(1, drops + 1) if every_steps * k < total]
        return (f"lr {cfg.lr:g}, / 10 every {every_steps} steps, at most {drops} times: "
                f"drops before steps {', '.join(str(s + 1) for s in at) or 'none'}")
    every = parse_schedule(spec)
    if every is not None:
        at = [every * k for k in range(1, drops + 1) if every * k < cfg.epochs]
        return (f"lr {cfg.lr:g}, / 10 every {every} epochs, at most {drops} times: after "
                f"epochs {', '.join(map(str, at)) or 'none'}")
    on = "the hold-out" if cfg.holdout else "val"
    return (f"lr {cfg.lr:g}, / 10 when {on} top-1 error has not improved (by more than "
            f"{cfg.plateau_threshold:g} relative) for {cfg.plateau_patience} epochs, at least "
            f"{cfg.plateau_min_epochs} epochs at each rate, at most {drops} times (evaluation "
            f"every {cfg.eval_every} epochs)")


def state_bytes(t) -> tuple[int, int]:
    """(bytes of the parameters, bytes of the optimizer's per-parameter state)."""
    params = sum(p.numel() * p.element_size() for p in t.net.parameters())
    opt = sum(v.numel() * v.element_size() for st in t.optimizer.state.values()
              for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return params, opt


def plan(cfg: TrainConfig, setup: Callable[[TrainConfig], Trainer]) -> str:
    """The plan of ``cfg``'s run, from a real trainer built by ``setup`` (the trainer's) in a
    scratch folder, that trains ``WARMUP_STEPS + cfg.plan_steps`` steps. Nothing is written into
    ``cfg.out``."""
    if cfg.resume:
        raise UsageError("--plan plans a new run; leave out --resume")
    if cfg.data is None or not (Path(cfg.data) / "train").is_dir():
        raise UsageError("--plan needs an existing dataset: give --data DIR (with --demo, run "
                         "--demo once first: it generates OUT/demo_data)")
    steps = WARMUP_STEPS + cfg.plan_steps
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with tempfile.TemporaryDirectory(prefix="split_alexnet_plan_") as scratch:
        probe = replace(cfg, out=scratch, overwrite=False, max_steps=steps, log_interval=1,
                        watchdog_steps=0, checkpoint_minutes=1e9)
        t = setup(probe)
        try:
            if t.devices[0].type == "cuda":
                for d in set(t.devices):
                    torch.cuda.reset_peak_memory_stats(d)
            with t.stop:
                train_one_epoch(t, train_loader(t), t.stop)
            recs = [r for r in read_records(scratch) if r["kind"] == "train"]
            params, opt = state_bytes(t)
            if t.devices[0].type == "cuda":
                memory = ", ".join(f"{d}: {torch.cuda.max_memory_allocated(d) / 2**30:.2f} GiB"
                                   for d in sorted(set(t.devices), key=str))
                memory += " (torch.cuda.max_memory_allocated)"
            else:
                grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
                memory = (f"{grown / 2**20:.2f} GiB (CPU: growth of this process's peak "
                          "resident set size over setup and the steps)")
            per_epoch = t.steps_per_epoch
            n_train, images = len(t.train_set), t.batch * t.ctx.world_size
        finally:
            if t.lock is not None:
                t.lock.release()
    secs = [images / r["images_per_s"] for r in recs[WARMUP_STEPS:] if r["images_per_s"] > 0]
    total = per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    ckpt = params + opt
    kept = cfg.keep_last if cfg.keep_last else cfg.epochs
    n_files = 2 + min(kept, cfg.epochs)  # last.pt, best.pt and the kept epoch checkpoints
    lines = [
        f"plan for {cfg.out} (nothing written there):",
        f"  training images: {n_train}; steps per epoch: {per_epoch}; epochs: {cfg.epochs}; "
        f"total steps: {total}" + (f" (--max-steps {cfg.max_steps})"
                                   if cfg.max_steps is not None else ""),
        f"  schedule: {schedule_text(cfg, per_epoch, total)}",
        f"  checkpoints: last.pt every {cfg.checkpoint_minutes:g} minutes and at each epoch's "
        f"end, epoch_NNN.pt each epoch (keeping {cfg.keep_last or 'all'}), best.pt",
        f"  checkpoint size: {ckpt / 2**20:.0f} MiB ({params / 2**20:.0f} MiB parameters + "
        f"{opt / 2**20:.0f} MiB optimizer state); at most {n_files} files: "
        f"{n_files * ckpt / 2**30:.2f} GiB",
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
