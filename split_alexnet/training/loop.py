"""The loops: :func:`train_one_epoch` (one training step's path: batch -> ``finish_batch`` ->
model -> loss -> backward -> optimizer -> metrics) and :func:`evaluate`, the one evaluation
that training and ``split_alexnet.evaluate`` share."""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import split_alexnet.training.distributed as dist_util
from split_alexnet.data.augment import finish_batch
from split_alexnet.network.parallelize import autocast_context, to_input_format
from split_alexnet.training.checkpoint import last_checkpoint_name, save
from split_alexnet.training.config import PROG
from split_alexnet.training.optim import set_lr
from split_alexnet.training.state import Trainer
from split_alexnet.utils.cli import Abort
from split_alexnet.utils.progress import Progress


def topk_wrong(logits_or_probs: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """How many rows do not have their label among the k highest scores."""
    k = min(k, logits_or_probs.shape[1])
    top = logits_or_probs.topk(k, dim=1).indices
    return (top != labels[:, None]).all(dim=1).sum()


@torch.no_grad()
def evaluate(model: nn.Module, loader, stats, device: torch.device, *, ten_crop: bool = False,
             progress: bool = False, stop=None) -> dict[str, float]:
    """Top-1 and top-5 error and loss over ``loader``; with ``ten_crop`` the softmax outputs
    of the ten crops are averaged (the paper), and the loss is that average's NLL.
    Under torch.distributed the sums are all-reduced, so each image counts exactly once.

    ``stop`` (e.g. the trainer's :class:`~split_alexnet.utils.signals.StopOnSignal`): once
    it is true the loop ends after the batch in progress, and the result, over the images
    seen so far, has ``"stopped": True``. The all-reduce still runs, so under torchrun every
    rank must then agree on the stop (``distributed.any_rank_flags``)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # n, top1 wrong, top5 wrong, loss
    bar = Progress(len(loader), "eval (10 crops)" if ten_crop else "eval", unit="batch",
                   enabled=progress)
    stopped = False
    for batch in loader:
        if stop:
            stopped = True
            break
        if batch["label"].numel() == 0:
            continue
        x = finish_batch(batch, stats, device)
        y = batch["label"].to(device, non_blocking=True)
        if ten_crop:
            b = x.shape[0]
            logits = model(x.flatten(0, 1))                                   # (B*10, C)
            probs = logits.float().softmax(1).view(b, 10, -1).mean(1)         # (B, C)
            loss = F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="sum")
            scores = probs
        else:
            scores = model(x).float()                                         # (B, C)
            loss = F.cross_entropy(scores, y, reduction="sum")
        sums += torch.stack([torch.tensor(float(y.numel()), device=device, dtype=torch.float64),
                             topk_wrong(scores, y, 1).double(), topk_wrong(scores, y, 5).double(),
                             loss.double()])
        bar.update(1)
    bar.close()
    dist_util.all_reduce_sum(sums)
    model.train(was_training)
    n, w1, w5, loss = sums.tolist()
    result = {"n": 0, "top1_err": float("nan"), "top5_err": float("nan"),
              "loss": float("nan")} if n == 0 else \
        {"n": int(n), "top1_err": w1 / n, "top5_err": w5 / n, "loss": loss / n}
    return {**result, "stopped": True} if stopped else result


def weight_sum(net: nn.Module, device: torch.device) -> torch.Tensor:
    """The sum of every parameter, a scalar on ``device``, without a host sync: finite exactly
    when every parameter is (a NaN or an infinity anywhere carries into the sum; finite
    float32 weights would need a sum beyond 3e38 to overflow). One read of the weights."""
    return torch.stack([p.detach().sum().to(device) for p in net.parameters()]).sum()


class Diverged(Abort):
    """The run diverged: a non-finite loss, or weights an update made non-finite (exit 1)."""


def check_finite_step(t: Trainer, loss: torch.Tensor) -> float:
    """After an optimizer step: its loss, read together with the sum of the weights it left
    in one host sync. A non-finite loss, or finite loss but non-finite weights, stops the run
    (:class:`Diverged`, exit 1) before anything is saved, naming the last good checkpoint."""
    pos = t.pos
    loss_value, weights = torch.stack([loss.detach().float(),
                                       weight_sum(t.net, t.device).float()]).tolist()
    where = f"at step {pos.step + 1} (epoch {pos.epoch + 1}); stopping without saving. Last " \
            f"good checkpoint: {last_checkpoint_name(t.out)}"
    if not math.isfinite(loss_value):
        raise Diverged(f"loss is {loss_value} {where}")
    if not math.isfinite(weights):
        raise Diverged(f"the weights became non-finite (their sum is {weights}) in the update "
                    f"{where}")
    return loss_value


def log_lr_drop(t: Trainer, old: float, reason: str) -> None:
    """A division of the learning rate: an "lr_drop" record (step, epoch, old, new, reason)
    and a log line with the reason."""
    rec = {"kind": "lr_drop", "step": t.pos.step, "epoch": t.pos.epoch + 1, "old": old,
           "new": t.schedule.lr, "reason": reason}
    t.metrics.log(rec)
    if t.is_main:
        print(f"{PROG}: learning rate {old:g} -> {t.schedule.lr:g} at step {t.pos.step} "
              f"(epoch {t.pos.epoch + 1}): {reason}", file=sys.stderr)


class _Window:
    """Sums over the steps since the last "train" record."""

    def __init__(self) -> None:
        self.loss, self.wrong, self.n, self.t = 0.0, 0, 0, time.monotonic()


def train_one_epoch(t: Trainer, loader, stop) -> str:
    """Train on ``loader`` from the trainer's position to the end of the epoch. Returns
    'epoch' at the end of the epoch, or 'max_steps' / 'signal' when stopped earlier (``stop``
    is true once SIGTERM or SIGINT arrived). Saves ``last.pt`` every --checkpoint-minutes."""
    cfg, pos = t.cfg, t.pos
    t.model.train()
    bar = Progress(t.steps_per_epoch, f"epoch {pos.epoch + 1}/{cfg.epochs}", unit="step",
                   enabled=t.is_main)
    bar.n = pos.epoch_step
    window = _Window()
    skipped = 0
    for batch in loader:
        if pos.epoch_step >= t.steps_per_epoch:
            break  # whole batches only: the permutation's remainder is dropped (drop_last)
        skipped += len(batch.get("skipped", []))
        if batch["label"].numel() == 0:
            continue
        # One step: the batch on the first device, the forward (and loss) under autocast
        # (off by default), backward, the paper's update.
        x = finish_batch(batch, t.stats, t.device)                          # (B, 3, 227, 227)
        y = batch["label"].to(t.device, non_blocking=True)
        x = to_input_format(x, cfg.channels_last)
        with autocast_context(t.devices, cfg.amp):
            logits = t.model(x)                                              # (B, classes)
            loss = F.cross_entropy(logits, y)
        t.optimizer.zero_grad(set_to_none=True)
        old_lr = t.schedule.lr
        if t.schedule.at_step(pos.step):  # step-iters:N only (Caffe's step policy)
            set_lr(t.optimizer, t.schedule.lr)
            log_lr_drop(t, old_lr, t.schedule.reason)
        t.scaler.scale(loss).backward()
        t.scaler.step(t.optimizer)  # plain optimizer.step() unless fp16 on CUDA
        t.scaler.update()
        loss_value = check_finite_step(t, loss)
        pos.step += 1
        pos.epoch_step += 1
        # What the step measured: a "train" record every --log-interval steps.
        window.loss += loss_value * y.numel()
        window.wrong += int(topk_wrong(logits.detach(), y, 1))
        window.n += y.numel()
        if pos.step % cfg.log_interval == 0 or pos.epoch_step == t.steps_per_epoch:
            dt = time.monotonic() - window.t
            rec = {"kind": "train", "step": pos.step, "epoch": pos.epoch + 1,
                   "loss": window.loss / window.n, "top1_err": window.wrong / window.n,
                   "lr": t.schedule.lr,
                   "images_per_s": window.n * t.ctx.world_size / max(dt, 1e-9)}
            t.metrics.log(rec)
            bar.extra = f"loss {rec['loss']:.3f} err {rec['top1_err']:.3f} " \
                        f"lr {rec['lr']:g} {rec['images_per_s']:.0f} img/s"
            window = _Window()
        t.watchdog.observe(pos.step, loss_value)
        bar.update(1)
        if cfg.max_steps is not None and pos.step >= cfg.max_steps:
            bar.close()
            return "max_steps"
        # Both decisions lead to collectives (saving gathers every rank's RNG state), so
        # every rank must take them together: one all-reduce of the two flags.
        stop_now, save_now = dist_util.any_rank_flags(
            [bool(stop), time.monotonic() - pos.last_save > cfg.checkpoint_minutes * 60],
            t.ctx)
        if stop_now:
            bar.close()
            return "signal"
        if save_now:
            save(t)
    bar.close()
    if skipped and t.is_main:
        print(f"{PROG}: {skipped} unreadable training image(s) skipped this epoch",
              file=sys.stderr)
    return "epoch"
