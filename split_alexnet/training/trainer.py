"""The :class:`Trainer`, which owns one training run of the 2012 AlexNet (Krizhevsky et al.,
section 5): set up, the epochs, evaluation and the schedule, saving and stopping.

    t = Trainer.setup(parse_command(argv)[0])   # or train(cfg): setup, fit, clean up
    result = t.fit()

A run is :meth:`Trainer.setup` (devices, run folder, data, model, optimizer, resumed state),
then :meth:`Trainer.fit`: per epoch :meth:`Trainer.train_epoch` (``loop.train_epoch``) and
:meth:`Trainer.evaluate_and_schedule`, then the paper's ten-crop test; it returns a
:class:`TrainResult`. SIGTERM and SIGINT stop every phase within one batch (training, the
per-epoch evaluation, the ten-crop test): the run saves where that is meaningful and says
so. The command around it: ``training/command.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

import split_alexnet.training.distributed as dist_util
from split_alexnet.data.demo import demo_unfinished, make_demo_dataset
from split_alexnet.network.placement import layout_of
from split_alexnet.training import checkpoint, loop
from split_alexnet.training.config import PROG, TrainConfig
from split_alexnet.training.finetune import read_source
from split_alexnet.training.loader import train_loader, val_loader, worker_error
from split_alexnet.training.metrics import (DivergenceAlarm, MetricsLog, Watchdog,
                                            read_records, write_curves)
from split_alexnet.training.optim import set_lr
from split_alexnet.training.options import Command
from split_alexnet.training.runfolder import (RunLock, check_apart, check_overwrite_keeps,
                                              claim, missing_folders, remove_created,
                                              start_fresh, write_config)
from split_alexnet.training.setup import (build_learner, describe_lr_batch_rule,
                                          list_for_holdout, load_data)
from split_alexnet.training.state import Position, RunData, StopReason, TrainResult
from split_alexnet.training.tensorboard import TensorBoardLog
from split_alexnet.training.tensorboard import require as require_tensorboard
from split_alexnet.utils.fileio import check_output_dir, make_output_dir
from split_alexnet.utils.signals import StopOnSignal


def ensure_demo_data(cfg: TrainConfig, ctx: dist_util.Context) -> None:
    """--demo: rank 0 generates the demo dataset where --data points when it is missing or
    its generation was cut short (it finishes it); every rank waits for it."""
    data = Path(cfg.data.data)
    if ctx.rank == 0 and demo_unfinished(data):
        print(f"generating the demo dataset in {data} ...", file=sys.stderr)
        make_demo_dataset(data, seed=0)
    dist_util.barrier()


class Trainer:
    """One training process's run: its settings, rank and devices, data, network and
    optimizer, logs, position and stop flag. :meth:`setup` builds it; :meth:`fit` runs it."""

    def __init__(self, cfg: TrainConfig, ctx: dist_util.Context,
                 devices: tuple[torch.device, ...], data: RunData, learner, lock: RunLock | None):
        self.cfg = cfg                  # checked, with the data's class count
        self.ctx = ctx                  # rank and world size (world size 1 without torchrun)
        self.devices = devices          # the towers' two devices, or one (collapsed)
        self.data = data
        self.net: nn.Module = learner.net
        self.model: nn.Module = learner.model
        self.optimizer = learner.optimizer
        self.scaler = learner.scaler
        self.schedule = learner.schedule
        self.metrics = MetricsLog(self.out, enabled=self.is_main)
        self.watchdog = Watchdog(cfg.logging.watchdog_steps, len(data.classes), self.metrics.log,
                                 enabled=self.is_main)
        self.alarm = DivergenceAlarm(cfg, len(data.classes), self.metrics.log,
                                     enabled=self.is_main, replicas=ctx.data_size)
        self.pos = Position(last_save=time.monotonic())
        self.stop = StopOnSignal()      # entered by fit()
        self.lock = lock                # OUT/train.lock, held on rank 0 for the whole run

    # ------------------------------------------------------------------ set up
    @classmethod
    def setup(cls, cfg: TrainConfig, cmd: Command | None = None) -> "Trainer":
        """Everything before the first step, in order: the up-front checks, rank and devices
        (joining the process group under torchrun), the run folder (rank 0 takes its lock),
        the data and its statistics, the model (seeded, built, placed, parallelized), the
        optimizer after it, and the resumed state or the new run's config.json. On an error
        the lock is released, and a run folder this start created is removed."""
        cmd = cmd or Command()
        if cfg.logging.tensorboard:  # the optional package, before any work
            require_tensorboard()
        out = Path(cfg.checkpoint.out)
        if cmd.overwrite:
            check_overwrite_keeps(out, cfg.finetune.init_from)
        check_apart(out, cfg.data.data, demo=cmd.demo)
        listed = list_for_holdout(cfg)  # before any work
        ctx, devices = dist_util.setup(cfg)
        lock, created = None, []
        try:
            if ctx.rank == 0:
                check_output_dir(out, "--out")
                created = missing_folders(out)
                make_output_dir(out, "--out")
                lock = claim(out, resume=bool(cmd.resume), overwrite=cmd.overwrite)
            if cmd.demo:
                ensure_demo_data(cfg, ctx)
            source = read_source(cfg, resume=bool(cmd.resume))  # checked before the data
            data = load_data(cfg, ctx, listed)
            cfg = cfg.with_classes(len(data.classes))  # the one place the count is set
            learner = build_learner(cfg, layout_of(cfg.model.arch, cfg.runtime.single_device),
                                    ctx, devices, source, data.classes, data.batch,
                                    resume=bool(cmd.resume))
            rule = describe_lr_batch_rule(cfg, ctx, data.batch)
            if rule and ctx.rank == 0:  # never silent: what the rule did to the rates
                print(f"{PROG}: {rule}", file=sys.stderr)
            t = cls(cfg, ctx, devices, data, learner, lock)
            if cfg.logging.tensorboard and t.is_main:  # the same records as TensorBoard events
                t.metrics.tensorboard = TensorBoardLog(t.out, resuming=bool(cmd.resume))
            if cmd.resume:
                checkpoint.resume(t, cmd.resume, cmd.resume_lr)
                if t.is_main:  # the settings as now started: what the next --resume takes
                    write_config(t.out, cfg)
            elif t.is_main:
                start_fresh(t.out, cfg, overwrite=cmd.overwrite)
                if learner.tuning.record:
                    t.metrics.log(learner.tuning.record)
            if t.metrics.tensorboard is not None:
                t.metrics.tensorboard.start(t.pos.step if cmd.resume else None)
            return t
        except BaseException:
            if lock is not None:
                lock.release()
            remove_created(out, created)  # a refused start leaves nothing behind
            raise

    # ------------------------------------------------------------------ state
    @property
    def out(self) -> Path:
        return Path(self.cfg.checkpoint.out)

    @property
    def layout(self) -> str:
        return layout_of(self.cfg.model.arch, self.cfg.runtime.single_device)

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

    def save(self, *, epoch_end: bool = False, best: bool = False) -> None:
        """OUT/last.pt (and the epoch's and best checkpoints): ``checkpoint.save``."""
        checkpoint.save(self, epoch_end=epoch_end, best=best)

    def last_checkpoint(self) -> str:
        return checkpoint.last_checkpoint_name(self.out)

    # ------------------------------------------------------------------ the run
    def train_epoch(self) -> StopReason:
        """Train from the position to the epoch's end (EPOCH), or to --max-steps or a
        signal; a DataLoader worker that dies is one line naming its files (exit 1)."""
        loader = train_loader(self)
        try:
            return loop.train_epoch(self, loader)
        except RuntimeError as e:
            raise worker_error(e, loader, step=self.pos.step + 1, epoch=self.pos.epoch + 1,
                               last_checkpoint=self.last_checkpoint()) from None

    def evaluate(self, kind: str, ten_crop: bool = False, dataset=None) -> dict | None:
        """Evaluate (centre crops of val, of ``dataset``, or val's ten crops), agree across
        ranks whether a signal stopped it, and if not record it as ``kind`` and print it.
        Returns the result, or None when a signal stopped it."""
        epoch = self.pos.epoch + (kind != "val_ten_crop")  # the epoch it closes, or the last
        result = loop.evaluate(self.eval_model, val_loader(self, ten_crop, dataset),
                               self.data.stats, self.device, ten_crop=ten_crop,
                               progress=self.is_main, stop=self.stop,
                               lockstep=self.ctx if self.ctx.spans_processes else None)
        if dist_util.any_rank_flags([bool(result.pop("stopped", False))], self.ctx)[0]:
            return None
        pos = self.pos
        self.metrics.log({"kind": kind, "epoch": epoch, "step": pos.step, **result,
                          **({"lr": self.schedule.lr} if kind != "val_ten_crop" else {})})
        if self.is_main:
            where = {"val": f"epoch {epoch}: val", "holdout": f"epoch {epoch}: hold-out",
                     "val_ten_crop": "ten-crop: val"}[kind]
            lr = f" (lr {self.schedule.lr:g})" if kind == "val" else ""
            top5 = f" top-5 {result['top5_err']:.4f}" if len(self.data.classes) > 5 else ""
            print(f"{where} top-1 {result['top1_err']:.4f}{top5} "
                  f"loss {result['loss']:.4f}{lr}", file=sys.stderr)
        return result

    def evaluate_and_schedule(self, reason: StopReason, result: TrainResult) -> bool:
        """The epoch's training is done (``reason``: EPOCH, or MAX_STEPS at its last step):
        evaluate the centre crop when due (every --eval-every epochs, the last epoch, and
        before a --max-steps stop), let the schedule see the error (the hold-out's, with
        --holdout), save the epoch's checkpoints and redraw curves.png. Records the
        evaluations in ``result``. False when a signal stopped the evaluation: the epoch then
        stays open at its last step (a resumed run repeats the evaluation)."""
        pos, s = self.pos, self.cfg.schedule
        epoch = pos.epoch + 1
        best = False
        if epoch % s.eval_every == 0 or epoch == s.epochs or reason is StopReason.MAX_STEPS:
            val = self.evaluate("val")
            if val is None:
                return False
            result.val, drive = val, val
            if self.data.holdout_set is not None:  # the hold-out drives schedule and best.pt
                drive = self.evaluate("holdout", dataset=self.data.holdout_set)
                if drive is None:
                    return False
                result.holdout = drive
            best = drive["top1_err"] < pos.best_top1
            pos.best_top1 = min(pos.best_top1, drive["top1_err"])
            old_lr = self.schedule.lr
            set_lr(self.optimizer, self.schedule.step(drive["top1_err"],
                                                      epochs=epoch - self.schedule.epochs))
            if self.schedule.lr != old_lr:
                on = "hold-out" if self.data.holdout_set is not None else "val"
                loop.log_lr_drop(self, old_lr, f"{self.schedule.reason} (on the {on} set)")
        pos.epoch, pos.epoch_step = epoch, 0
        self.save(epoch_end=True, best=best)
        if self.is_main:
            write_curves(self.out)
        return True

    def fit(self) -> TrainResult:
        """Train as the config says: per epoch train and evaluate, then the paper's ten-crop
        test. Returns why it stopped, where, and the last evaluations."""
        pos, s = self.pos, self.cfg.schedule
        result = TrainResult(StopReason.DONE, pos.step, pos.epoch)
        set_lr(self.optimizer, self.schedule.lr)
        done = self.finished()  # --max-steps is checked before a step too
        if done:
            if self.is_main:
                print(f"{PROG}: nothing to do: {done}", file=sys.stderr)
            return TrainResult(StopReason.DONE, pos.step, pos.epoch)
        if self.is_main:
            d = self.data
            print(f"training {self.cfg.model.arch} ({self.layout} on "
                  f"{', '.join(map(str, self.devices))}), {len(d.classes)} classes, "
                  f"{len(d.train_set)} train / {len(d.val_set)} val images, batch "
                  f"{d.batch}x{self.ctx.data_size}, {d.steps_per_epoch} steps/epoch, "
                  f"out {self.out}", file=sys.stderr)
        with self.stop:
            while pos.epoch < s.epochs:
                reason = self.train_epoch()
                if reason is StopReason.SIGNAL:
                    return self._stopped(result, "", save_now=True)
                if reason is StopReason.MAX_STEPS and pos.epoch_step < self.data.steps_per_epoch:
                    self.save()
                    return self._ended(result, StopReason.MAX_STEPS)
                if not self.evaluate_and_schedule(reason, result):
                    return self._stopped(result, f" during the evaluation of epoch {pos.epoch + 1}",
                                         save_now=True)
                if reason is StopReason.MAX_STEPS:
                    return self._ended(result, StopReason.MAX_STEPS)
                # A signal during the epoch's save: that save is the state to keep.
                if dist_util.any_rank_flags([bool(self.stop)], self.ctx)[0]:
                    return self._stopped(result, f" at the end of epoch {pos.epoch}",
                                         save_now=False)
            if self.cfg.schedule.ten_crop:
                result.ten_crop = self.evaluate("val_ten_crop", ten_crop=True)
                if result.ten_crop is None:
                    if self.is_main:
                        print(f"{PROG}: signal received during the ten-crop test: the "
                              f"training is complete in {self.out / 'last.pt'} (step "
                              f"{pos.step}) and the test did not finish; --resume runs it",
                              file=sys.stderr)
                    return self._ended(result, StopReason.SIGNAL)
        return self._ended(result, StopReason.DONE)

    def finished(self) -> str | None:
        """Why a resumed run has nothing left to do (all its epochs and its ten-crop test
        done, or --max-steps reached), in words; None while it has work."""
        pos, s = self.pos, self.cfg.schedule
        if s.max_steps is not None and pos.step >= s.max_steps:
            return (f"the run in {self.out} is at step {pos.step}, --max-steps {s.max_steps}; "
                    "give a larger --max-steps to continue it")  # at or past it: no step
        if pos.epoch < s.epochs or pos.epoch_step:
            return None
        tested = any(r.get("kind") == "val_ten_crop" and r.get("step") == pos.step
                     for r in read_records(self.out, missing_ok=True, warn=False))
        if s.ten_crop and not tested:
            return None  # the ten-crop test is still to run
        return (f"the run in {self.out} has trained its {s.epochs} epochs (step {pos.step})"
                f"{' and run the ten-crop test' if s.ten_crop else ''}; give a larger "
                "--epochs to continue it")

    def _ended(self, result: TrainResult, reason: StopReason) -> TrainResult:
        result.stopped, result.step, result.epoch = reason, self.pos.step, self.pos.epoch
        return result

    def _stopped(self, result: TrainResult, where: str, *, save_now: bool) -> TrainResult:
        """A signal stopped the run (``where``: '' in training, or the phase): save when
        ``save_now`` (otherwise last.pt already holds this state) and say so in one line."""
        if save_now:
            self.save()
        if self.is_main:
            print(f"{PROG}: signal received{where}: saved {self.out / 'last.pt'} at step "
                  f"{self.pos.step}; continue with --resume", file=sys.stderr)
        return self._ended(result, StopReason.SIGNAL)

    def close(self) -> None:
        """Release the run folder's lock."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def train(cfg: TrainConfig, cmd: Command | None = None) -> TrainResult:
    """Set up a :class:`Trainer` for ``cfg`` and run it; the process group is left and the
    run folder unlocked however it ends."""
    t: Trainer | None = None
    try:
        t = Trainer.setup(cfg, cmd)
        return t.fit()
    except RuntimeError as e:  # a peer rank gone: one line naming it, not a traceback
        lost = dist_util.lost_peer(e)
        if lost is None:
            raise
        raise lost from None
    finally:
        if t is not None:
            t.close()
        dist_util.shutdown()
