"""Train the 2012 AlexNet the paper's way (Krizhevsky et al., section 5).

    python -m split_alexnet.train --demo                                # generated data, 2 CPU cores, < 10 min
    python -m split_alexnet.train --data /data/ilsvrc12 --gpus 0,1      # the paper: one tower per GPU
    python -m split_alexnet.train --data /data/ilsvrc12 --gpus 0,0      # both towers on one GPU
    python -m split_alexnet.train --data /data/ilsvrc12 --gpus 0 --single-device   # collapsed layout
    python -m split_alexnet.train --data DIR --devices cpu,cpu --max-steps 20       # smoke run
    python -m split_alexnet.train --out runs/alexnet --resume           # continue from last.pt
    torchrun --nproc-per-node 4 -m split_alexnet.train --data DIR       # 2 pairs of GPUs, DDP

``main(argv)`` parses the flags and calls :func:`train`, which :func:`setup` s a
:class:`~split_alexnet.training.state.Trainer` (the run folder, data, model, optimizer) and
runs the epochs: ``loop.train_one_epoch``, ``loop.evaluate``, ``checkpoint.save``. SIGTERM and
SIGINT stop every phase within one batch (training, the per-epoch evaluation, the ten-crop
test): the run saves where that is meaningful, says so and exits 0. Every flag:
``python -m split_alexnet.train --help`` and docs/training.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

import split_alexnet.training.distributed as dist_util
from split_alexnet.data.dataset import (CropFolder, check_dataset_root, find_classes,
                                        holdout_indices, list_samples)
from split_alexnet.data.demo import make_demo_dataset
from split_alexnet.data.imagenet import read_class_metadata
from split_alexnet.data.stats import load_stats
from split_alexnet.network.parallelize import grad_scaler, parallelize
from split_alexnet.network.placement import build_model
from split_alexnet.training.checkpoint import last_checkpoint_name, resume, save
from split_alexnet.training.config import (PROG, TrainConfig, describe_preset, describe_recipe,
                                           parse_config)
from split_alexnet.training.finetune import prepare as prepare_fine_tuning
from split_alexnet.training.finetune import read_source
from split_alexnet.training.loader import train_loader, val_loader, worker_error
from split_alexnet.training.loop import evaluate, log_lr_drop, train_one_epoch
from split_alexnet.training.metrics import MetricsLog, Watchdog, write_curves
from split_alexnet.training.optim import LRSchedule, build_optimizer, set_lr
from split_alexnet.training.plan import plan
from split_alexnet.training.runfolder import (RunLock, check_run_flags, claim,
                                              delete_previous_run, temp_suffix)
from split_alexnet.training.state import Position, Trainer
from split_alexnet.training.tensorboard import TensorBoardLog
from split_alexnet.training.tensorboard import require as require_tensorboard
from split_alexnet.utils.cli import Abort, UsageError, run
from split_alexnet.utils.fileio import atomic_write


def check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {out} is not writable: {e.strerror or e}") from None


def setup(cfg: TrainConfig) -> Trainer:
    """Everything before the first step, in order: rank and devices (joining the process
    group under torchrun), the run folder (rank 0 takes its lock: ``runfolder.claim``), the
    data and its statistics, the model (seeded, built, placed, parallelized), the optimizer
    after it, and the resumed state. On an error the lock is released."""
    check_run_flags(cfg)
    if cfg.tensorboard:  # the optional package, before any work
        require_tensorboard()
    listed = None  # (classes, samples) of the training folder, listed once for both uses
    if cfg.holdout and cfg.data and (Path(cfg.data) / "train").is_dir():  # before any work
        classes = find_classes(Path(cfg.data) / "train")
        listed = classes, list_samples(Path(cfg.data) / "train", classes)
        check_holdout(cfg.holdout, [t for _, t in listed[1]], classes)
    ctx, devices = dist_util.setup(cfg)
    lock = None
    if ctx.rank == 0:
        check_out_dir(Path(cfg.out))
        lock = claim(Path(cfg.out), cfg)
    try:
        return build_trainer(cfg, ctx, devices, lock, listed)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def build_trainer(cfg: TrainConfig, ctx: dist_util.Context, devices, lock: RunLock | None,
                  listed: tuple[list[str], list[tuple[str, int]]] | None = None) -> Trainer:
    """:func:`setup` after the run folder: data, model, optimizer, resumed state. ``listed``:
    (classes, samples) of the training folder, if setup has listed it already."""
    is_main = ctx.rank == 0
    out = Path(cfg.out)
    if cfg.recipe != "paper" and is_main:
        print(f"recipe {cfg.recipe} (flags, TOML and --demo win):\n"
              + describe_recipe(cfg.recipe, cfg), file=sys.stderr)
    if cfg.demo:
        if is_main:
            print("demo preset (flags given on the command line win):\n" + describe_preset(),
                  file=sys.stderr)
            if not (Path(cfg.data) / "train").is_dir():
                print(f"generating the demo dataset in {cfg.data} ...", file=sys.stderr)
                make_demo_dataset(Path(cfg.data), seed=0)
        dist_util.barrier()
    if cfg.data is None:
        raise UsageError("--data DIR is required (a folder with train/ and val/), or --demo")
    root = Path(cfg.data)
    check_dataset_root(root)
    source = read_source(cfg)  # the --init-from checkpoint of a fresh run, checked up front
    stats = load_stats(root, progress=is_main, workers=cfg.workers) if is_main else None
    dist_util.barrier()
    if stats is None:
        stats = load_stats(root, progress=False)
    classes = list(stats.classes)
    train_set = CropFolder(root / "train", classes, mode="train", seed=cfg.seed, pca=cfg.pca,
                           strict=cfg.strict,
                           samples=listed[1] if listed and listed[0] == classes else None)
    train_set, holdout_set = split_holdout(train_set, cfg, is_main)
    batch = dist_util.local_batch_size(cfg, ctx)
    steps_per_epoch = len(train_set) // (batch * ctx.world_size)
    if steps_per_epoch < 1:
        raise UsageError(f"the training set has {len(train_set)} images, fewer than one "
                         f"batch of {batch * ctx.world_size}")

    # The model: seeded, built on the CPU and placed; then the fast paths and DDP, in
    # parallelize's fixed order; the optimizer last, over the placed parameters.
    model_cfg = replace(cfg.model, num_classes=len(classes))
    torch.manual_seed(cfg.seed)
    net = build_model(model_cfg, cfg.layout, devices)
    tuning = prepare_fine_tuning(net, cfg, model_cfg, source, classes, is_main=is_main)
    # The dropout stream, independent of the layout; each rank draws its own masks.
    torch.manual_seed(cfg.seed + 1 + 1_000_003 * ctx.rank)
    model = parallelize(net, devices, channels_last=cfg.channels_last,
                        ddp=ctx.world_size > 1, compile=cfg.compile,
                        cudnn_benchmark=True if cfg.cudnn_benchmark else None)
    metrics = MetricsLog(out, enabled=is_main)
    if cfg.tensorboard and is_main:  # the same records as TensorBoard events
        metrics.tensorboard = TensorBoardLog(out, resuming=bool(cfg.resume))
    t = Trainer(
        cfg=cfg, ctx=ctx, devices=devices, out=out, root=root, stats=stats, classes=classes,
        # wnid, index and human-readable name (from the devkit or Kaggle's mapping, when
        # prepare wrote classes.json), kept in every checkpoint
        class_meta=read_class_metadata(root), train_set=train_set,
        val_set=CropFolder(root / "val", classes, mode="center", seed=cfg.seed,
                           strict=cfg.strict),
        batch=batch, steps_per_epoch=steps_per_epoch, model_cfg=model_cfg, net=net, model=model,
        optimizer=build_optimizer(net, kind=cfg.optimizer, lr=cfg.lr,
                                  momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                  bias_lr_mult=cfg.bias_lr_mult, bias_decay=cfg.bias_decay,
                                  layer_lr_mult=tuning.layer_lr_mult),
        scaler=grad_scaler(devices[0], cfg.amp),
        schedule=LRSchedule(cfg.lr_schedule, cfg.lr, patience=cfg.plateau_patience,
                            max_drops=cfg.lr_drops, min_epochs=cfg.plateau_min_epochs,
                            threshold=cfg.plateau_threshold),
        metrics=metrics,
        watchdog=Watchdog(cfg.watchdog_steps, len(classes), metrics.log, enabled=is_main),
        pos=Position(last_save=time.monotonic()), lock=lock, holdout_set=holdout_set)
    if cfg.resume:
        resume(t, cfg.resume)
    elif is_main:
        if cfg.overwrite:
            delete_previous_run(out)
        text = json.dumps(cfg.to_dict(), indent=2) + "\n"
        try:
            atomic_write(out / "config.json", lambda f: f.write(text.encode()), private=False,
                         suffix=temp_suffix())
        except OSError as e:
            raise Abort(f"could not write {out / 'config.json'}: {e.strerror or e}") from None
        if tuning.record:
            metrics.log(tuning.record)
    if metrics.tensorboard is not None:
        metrics.tensorboard.start(t.pos.step if cfg.resume else None)
    return t


def check_holdout(per_class: int, targets: list[int], classes: list[str]) -> None:
    """--holdout N must leave every class at least one training image: else a
    :class:`UsageError` naming the smallest class."""
    counts = [0] * len(classes)
    for label in targets:
        counts[label] += 1
    small = min(range(len(counts)), key=counts.__getitem__)
    if per_class >= counts[small]:
        raise UsageError(f"--holdout {per_class}: the smallest class, {classes[small]!r}, has "
                         f"{counts[small]} training images; hold out fewer")


def split_holdout(train_set: CropFolder, cfg: TrainConfig, is_main: bool) \
        -> tuple[CropFolder, CropFolder | None]:
    """--holdout N: (the training set without N images of each class, those images as
    centre crops); without it (the training set, None). N at least the smallest class's
    count is a :class:`UsageError`."""
    if not cfg.holdout:
        return train_set, None
    check_holdout(cfg.holdout, train_set.targets, train_set.classes)
    held = set(holdout_indices(train_set.targets, cfg.holdout, cfg.seed))
    keep = [i for i in range(len(train_set)) if i not in held]
    if is_main:
        print(f"--holdout {cfg.holdout}: {len(held)} of {len(train_set)} training images held "
              f"out ({cfg.holdout} per class); training on {len(keep)}; the hold-out drives "
              "the schedule and best.pt", file=sys.stderr)
    return train_set.subset(keep), train_set.subset(sorted(held), mode="center")


def end_of_epoch(t: Trainer, why: str) -> dict:
    """The epoch's training is done (``why``: 'epoch', or 'max_steps' at its last step):
    evaluate the centre crop when due (every --eval-every epochs, the last epoch, and before a
    --max-steps stop), let the schedule see the error, save the epoch's checkpoints and redraw
    curves.png. Returns the evaluation ({} when there was none), or ``{"stopped": "signal"}``
    when a signal stopped the evaluation: the epoch then stays open at its last step, and the
    caller saves that (a resumed run repeats the evaluation)."""
    pos, cfg = t.pos, t.cfg
    epoch = pos.epoch + 1
    result: dict = {}
    best = False
    if epoch % cfg.eval_every == 0 or epoch == cfg.epochs or why == "max_steps":
        val = evaluate(t.eval_model, val_loader(t, False), t.stats, t.device,
                       progress=t.is_main, stop=t.stop)
        if dist_util.any_rank_flags([bool(val.pop("stopped", False))], t.ctx)[0]:
            return {"stopped": "signal"}
        result = {"epoch": epoch, "step": pos.step, **val}
        t.metrics.log({"kind": "val", **result, "lr": t.schedule.lr})
        if t.is_main:
            print(f"epoch {epoch}: val top-1 {val['top1_err']:.4f} top-5 "
                  f"{val['top5_err']:.4f} loss {val['loss']:.4f} (lr {t.schedule.lr:g})",
                  file=sys.stderr)
        drive = val
        if t.holdout_set is not None:  # the hold-out drives the schedule and best.pt
            drive = evaluate(t.eval_model, val_loader(t, False, t.holdout_set), t.stats,
                             t.device, progress=t.is_main, stop=t.stop)
            if dist_util.any_rank_flags([bool(drive.pop("stopped", False))], t.ctx)[0]:
                return {"stopped": "signal"}
            t.metrics.log({"kind": "holdout", "epoch": epoch, "step": pos.step, **drive,
                           "lr": t.schedule.lr})
            result["holdout"] = drive
            if t.is_main:
                print(f"epoch {epoch}: hold-out top-1 {drive['top1_err']:.4f} top-5 "
                      f"{drive['top5_err']:.4f} loss {drive['loss']:.4f}", file=sys.stderr)
        best = drive["top1_err"] < pos.best_top1
        pos.best_top1 = min(pos.best_top1, drive["top1_err"])
        old_lr = t.schedule.lr
        set_lr(t.optimizer, t.schedule.step(drive["top1_err"],
                                            epochs=epoch - t.schedule.epochs))
        if t.schedule.lr != old_lr:
            on = "hold-out" if t.holdout_set is not None else "val"
            log_lr_drop(t, old_lr, f"{t.schedule.reason} (on the {on} set)")
    pos.epoch, pos.epoch_step = epoch, 0
    save(t, epoch_end=True, best=best)
    if t.is_main:
        write_curves(t.out)
    return result


def stopped(t: Trainer, where: str, *, save_now: bool) -> dict:
    """A signal stopped the run (``where``: '' in training, or the phase): save when
    ``save_now`` (otherwise last.pt already holds this state), say so in one line, and return
    the result that ``main`` prints (exit 0)."""
    if save_now:
        save(t)
    if t.is_main:
        print(f"{PROG}: signal received{where}: saved {t.out / 'last.pt'} at step "
              f"{t.pos.step}; continue with --resume", file=sys.stderr)
    return {"stopped": "signal", "step": t.pos.step}


def train(cfg: TrainConfig) -> dict:
    """Train as ``cfg`` says and return the last evaluation (or why it stopped early): what
    ``main`` prints. The torchvision reference's shape: set up, then per epoch
    ``train_one_epoch``, evaluation and checkpoints, then the paper's ten-crop test."""
    cfg = cfg.validate()
    t: Trainer | None = None
    try:
        t = setup(cfg)
        pos = t.pos
        set_lr(t.optimizer, t.schedule.lr)
        if t.is_main:
            kind = f"{cfg.layout} on {', '.join(map(str, t.devices))}"
            print(f"training {cfg.model.arch} ({kind}), {len(t.classes)} classes, "
                  f"{len(t.train_set)} train / {len(t.val_set)} val images, batch "
                  f"{t.batch}x{t.ctx.world_size}, {t.steps_per_epoch} steps/epoch, "
                  f"out {t.out}", file=sys.stderr)
        result: dict = {}
        with t.stop:
            while pos.epoch < cfg.epochs:
                loader = train_loader(t)
                try:
                    why = train_one_epoch(t, loader, t.stop)
                except RuntimeError as e:  # a DataLoader worker died: one line, exit 1
                    raise worker_error(e, loader, step=pos.step + 1, epoch=pos.epoch + 1,
                                       last_checkpoint=last_checkpoint_name(t.out)) from None
                if why == "signal":
                    return stopped(t, "", save_now=True)
                if why == "max_steps" and pos.epoch_step < t.steps_per_epoch:
                    save(t)
                    return {"stopped": "max_steps", "step": pos.step}
                result = end_of_epoch(t, why)
                if result.get("stopped"):
                    return stopped(t, f" during the evaluation of epoch {pos.epoch + 1}",
                                   save_now=True)
                if why == "max_steps":
                    return {"stopped": "max_steps", **result}
                # A signal during the epoch's save: that save is the state to keep.
                if dist_util.any_rank_flags([bool(t.stop)], t.ctx)[0]:
                    return stopped(t, f" at the end of epoch {pos.epoch}", save_now=False)
            if cfg.ten_crop:
                val10 = evaluate(t.eval_model, val_loader(t, True), t.stats, t.device,
                                 ten_crop=True, progress=t.is_main, stop=t.stop)
                if dist_util.any_rank_flags([bool(val10.pop("stopped", False))], t.ctx)[0]:
                    if t.is_main:
                        print(f"{PROG}: signal received during the ten-crop test: the "
                              f"training is complete in {t.out / 'last.pt'} (step {pos.step}) "
                              "and the test did not finish; --resume runs it",
                              file=sys.stderr)
                    return {"stopped": "signal", "step": pos.step, **result}
                t.metrics.log({"kind": "val_ten_crop", "epoch": pos.epoch, "step": pos.step,
                               **val10})
                if t.is_main:
                    print(f"ten-crop: val top-1 {val10['top1_err']:.4f} top-5 "
                          f"{val10['top5_err']:.4f} loss {val10['loss']:.4f}",
                          file=sys.stderr)
                result = {**result, "ten_crop": val10}
        return result
    finally:
        if t is not None and t.lock is not None:
            t.lock.release()
        dist_util.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(argv)
    if cfg.print_recipe:
        print(f"recipe {cfg.recipe}:\n{describe_recipe(cfg.recipe, cfg)}")
        return 0
    if cfg.plan:
        print(plan(cfg.validate(), setup))
        return 0
    result = train(cfg)
    if dist_util.env_context().rank == 0:
        print(json.dumps(result), file=sys.stdout)
    return 0


def cli() -> None:
    """The console command: ``main`` with one-line errors and exit codes."""
    sys.exit(run(main, PROG))
