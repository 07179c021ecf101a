"""The loops: :func:`train_epoch` (one training step's path: batch -> ``finish_batch`` ->
model -> loss -> backward -> optimizer) and :func:`evaluate`, the one evaluation that
training and ``split_alexnet.evaluate`` share.

Host syncs: a step queues its work and never waits for the device. Its loss and error count
stay on the device (:class:`StepWindow`) until the window is read: at every
--log-interval, at the epoch's end and before every save (and at steps 1, 2, 4, ... before
the first interval, so that the log shows the first losses). That one read (one host sync)
checks every step's loss and the weights for NaN and infinity, so a diverged run is caught
within one log interval, and nothing non-finite is ever saved. The watchdog sees each
step's loss then too, and the divergence alarm each window's mean (under torchrun the
highest of the processes', so that they all stop together).
"""

from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

import split_alexnet.training.distributed as dist_util
from split_alexnet.data.augment import finish_batch
from split_alexnet.network.hybrid import HybridAlexNet
from split_alexnet.network.model import INPUT_SIZE
from split_alexnet.network.parallelize import autocast_context, to_input_format
from split_alexnet.training.config import PROG
from split_alexnet.training.hybrid_step import sequential_step
from split_alexnet.training.metrics import Diverged, divergence_advice
from split_alexnet.training.optim import set_lr
from split_alexnet.training.state import StopReason
from split_alexnet.utils.progress import Progress

if TYPE_CHECKING:  # the trainer imports this module
    from split_alexnet.training.trainer import Trainer


def topk_wrong(logits_or_probs: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """How many rows do not have their label among the k highest scores."""
    k = min(k, logits_or_probs.shape[1])
    top = logits_or_probs.topk(k, dim=1).indices
    return (top != labels[:, None]).all(dim=1).sum()


def in_lockstep(loader, stop, ctx: dist_util.Context):
    """``loader``'s batches, then None while another process still has batches: every
    process takes the same number of turns (a model whose forward is a collective, --parallel
    towers or hybrid, needs every process in every call: a process that left the loop alone,
    on a signal, would leave its peer waiting in the model's exchange). Each turn the
    processes agree on whether any has a batch left and whether ``stop`` (a signal) is set
    anywhere: one CPU all-reduce.
    The generator's return value is True when a signal ended it, False when every process
    ran out of batches."""
    it = iter(loader)
    while True:
        batch = next(it, None)
        more, stopping = dist_util.any_rank_flags([batch is not None, bool(stop)], ctx)
        if stopping:
            return True
        if not more:
            return False
        yield batch


@torch.no_grad()
def evaluate(model: nn.Module, loader, stats, device: torch.device, *, ten_crop: bool = False,
             progress: bool = False, stop=None,
             confusion: torch.Tensor | None = None,
             lockstep: dist_util.Context | None = None) -> dict[str, float]:
    """Top-1 and top-5 error and loss over ``loader``; with ``ten_crop`` the softmax outputs
    of the ten crops are averaged (the paper), and the loss is that average's NLL.
    Under torch.distributed the sums are all-reduced, so each image counts exactly once.

    ``stop`` (e.g. the trainer's :class:`~split_alexnet.utils.signals.StopOnSignal`): once
    it is true the loop ends after the batch in progress, and the result, over the images
    seen so far, has ``"stopped": True``. ``confusion`` (classes x classes, int64, on
    ``device``): each image adds 1 at (its label, its top-1 prediction). The all-reduce still
    runs, so under torchrun every rank must then agree on the stop
    (``distributed.any_rank_flags``). ``lockstep`` (the context of a --parallel towers or
    hybrid run): every process calls the model the same number of times
    (:func:`in_lockstep`), with an empty batch once its share is done, and the processes
    agree on the stop."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # n, top1 wrong, top5 wrong, loss
    bar = Progress(len(loader), "eval (10 crops)" if ten_crop else "eval", unit="batch",
                   enabled=progress)
    stopped = False
    turns = in_lockstep(loader, stop, lockstep) if lockstep is not None else iter(loader)
    while True:
        try:
            batch = next(turns)
        except StopIteration as end:
            stopped = bool(end.value)
            break
        if stop and lockstep is None:
            stopped = True
            break
        if batch is None or batch["label"].numel() == 0:
            if lockstep is not None:  # an empty turn: the model's collectives still run
                model(torch.empty((0, 3, INPUT_SIZE, INPUT_SIZE), device=device))
            continue
        x = finish_batch(batch, stats, device)
        y = batch["label"].to(device, non_blocking=True)
        if ten_crop:
            b = x.shape[0]
            logits = model(x.flatten(0, 1))                                   # (B*10, C)
            if logits is None:  # tower 1's process: its pair's tower 0 counts the batch
                bar.update(1)
                continue
            probs = logits.float().softmax(1).view(b, 10, -1).mean(1)         # (B, C)
            loss = F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="sum")
            scores = probs
        else:
            logits = model(x)                                                 # (B, C)
            if logits is None:
                bar.update(1)
                continue
            scores = logits.float()
            loss = F.cross_entropy(scores, y, reduction="sum")
        if confusion is not None:
            confusion.index_put_((y, scores.argmax(1)), torch.ones_like(y), accumulate=True)
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


class StepWindow:
    """The steps since the last read, kept on the device: each step's loss (one float32
    scalar each) and the sum of top-1 mistakes. :meth:`read` fetches them, and the weights'
    sum, in one host sync."""

    def __init__(self, first_step: int) -> None:
        self.first_step = first_step   # the step number of the window's first step
        self.losses: list[torch.Tensor] = []
        self.counts: list[int] = []    # each step's images (a batch may skip unreadable ones)
        self.wrong: torch.Tensor | None = None
        self.t = time.monotonic()

    def add(self, loss: torch.Tensor | None, logits: torch.Tensor | None,
            labels: torch.Tensor) -> None:
        """A finished step: its loss and mistakes, still on the device (None: this process
        holds no loss, tower 1's under --parallel towers)."""
        self.counts.append(labels.numel())
        if loss is None or logits is None:
            return
        self.losses.append(loss.detach().float())
        wrong = topk_wrong(logits.detach(), labels, 1)
        self.wrong = wrong if self.wrong is None else self.wrong + wrong

    def read(self, t: "Trainer") -> tuple[list[float], float, float, float]:
        """(each step's loss, top-1 mistakes, the weights' sum, the window's mean loss judged
        by the divergence alarm), in one host sync. A non-finite loss, or finite losses but
        non-finite weights, stops the run (:class:`Diverged`, exit 1) before anything is
        saved, naming the step and the last good checkpoint. Every process decides together,
        from one all-reduce (``distributed.max_over_ranks``) of its flag and its window's mean
        loss, so that no process goes on alone: the mean returned is the highest of every
        process's (-inf from a process without the loss, tower 1's under --parallel towers),
        the same on every rank."""
        wrong = self.wrong if self.wrong is not None else torch.zeros((), device=t.device)
        *losses, mistakes, weights = torch.stack(
            [*[v.to(t.device) for v in self.losses], wrong.float(),
             weight_sum(t.net, t.device).float()]).tolist()
        steps = range(self.first_step, self.first_step + len(self.counts))
        last = f"Last good checkpoint: {t.last_checkpoint()}"
        epoch, advice = t.pos.epoch + 1, divergence_advice(t.schedule.lr, t.cfg)
        why = None
        for step, value in zip(steps, losses):
            if not math.isfinite(value):
                _diverged(t, step, value, "non-finite loss")
                why = (f"loss is {value} at step {step} (epoch {epoch}); stopping without "
                       f"saving; {advice}. {last}")
                break
        if why is None and not math.isfinite(weights):
            when = f"the update at step {steps[-1]}" if len(steps) == 1 else \
                f"the updates of steps {steps[0]}-{steps[-1]}"
            _diverged(t, steps[-1], None, "non-finite weights")
            why = (f"the weights became non-finite (their sum is {weights}) in {when} "
                   f"(epoch {epoch}); stopping without saving; {advice}. {last}")
        mean = self.mean(losses) if losses and why is None else -math.inf
        flag, worst = dist_util.max_over_ranks([1.0 if why else 0.0, mean], t.ctx)
        if flag:
            raise Diverged(why or f"another process diverged by step {steps[-1]} (epoch "
                                  f"{epoch}); stopping without saving. {last}")
        return losses, mistakes, weights, worst

    def mean(self, losses: list[float]) -> float:
        """The window's mean loss over its images (``losses``: each step's, as read)."""
        return sum(v * n for v, n in zip(losses, self.counts)) / sum(self.counts)


def _diverged(t: "Trainer", step: int, loss: float | None, reason: str) -> None:
    """The "divergence" record of a non-finite value (the loss as text: JSON has no NaN)."""
    t.metrics.log({"kind": "divergence", "step": step, "epoch": t.pos.epoch + 1,
                   "loss": None if loss is None else str(loss), "reason": reason})


def log_lr_drop(t: "Trainer", old: float, reason: str) -> None:
    """A division of the learning rate: an "lr_drop" record (step, epoch, old, new, reason)
    and a log line with the reason."""
    rec = {"kind": "lr_drop", "step": t.pos.step, "epoch": t.pos.epoch + 1, "old": old,
           "new": t.schedule.lr, "reason": reason}
    t.metrics.log(rec)
    if t.is_main:
        print(f"{PROG}: learning rate {old:g} -> {t.schedule.lr:g} at step {t.pos.step} "
              f"(epoch {t.pos.epoch + 1}): {reason}", file=sys.stderr)


def close_window(t: "Trainer", window: StepWindow, bar: Progress) -> StepWindow:
    """Read the window (one host sync, checking every value), feed the watchdog each step's
    loss, write a "train" record and the progress line, and let the divergence alarm judge
    the window; return a new, empty window. Under torchrun every process reads its window at
    the same step, so the alarm, given the same loss everywhere, stops every process alike."""
    if window.counts:
        losses, mistakes, _, worst = window.read(t)
        if losses:  # a process with the loss (not tower 1's under --parallel towers)
            images = sum(window.counts)
            dt = time.monotonic() - window.t
            rec = {"kind": "train", "step": t.pos.step, "epoch": t.pos.epoch + 1,
                   "loss": window.mean(losses), "top1_err": mistakes / images,
                   "lr": t.schedule.lr,
                   "images_per_s": images * t.ctx.data_size / max(dt, 1e-9)}
            t.metrics.log(rec)
            bar.extra = f"loss {rec['loss']:.3f} err {rec['top1_err']:.3f} " \
                        f"lr {rec['lr']:g} {rec['images_per_s']:.0f} img/s"
            for i, loss in enumerate(losses):
                t.watchdog.observe(window.first_step + i, loss)
        t.alarm.observe(range(window.first_step, t.pos.step + 1), t.pos.epoch + 1,
                        worst, t.schedule.lr, t.last_checkpoint())
    return StepWindow(t.pos.step + 1)


def first_steps(step: int, log_every: int) -> bool:
    """Before the first log interval, the window is also read at steps 1, 2, 4, 8, ...: the
    log shows the first losses early, at a handful of extra host syncs per run."""
    return step < log_every and step & (step - 1) == 0


def train_step(t: "Trainer", batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step on ``batch``, queued without a host sync: the batch on the first
    device, the forward (and loss) under autocast (off by default), backward, the paper's
    update. Returns (loss, logits, labels), still on the device; under --parallel towers the
    process of tower 1 has no logits and no loss (None, None, labels): its backward starts
    from the gradient fc8's process sends back. Under --parallel hybrid the convolutional
    gradients are summed across the processes before the update, and the sequential schedule
    takes its own step (``hybrid_step.sequential_step``)."""
    x = finish_batch(batch, t.data.stats, t.device)                     # (B, 3, 227, 227)
    y = batch["label"].to(t.device, non_blocking=True)
    x = to_input_format(x, t.cfg.runtime.channels_last)
    t.optimizer.zero_grad(set_to_none=True)
    old_lr = t.schedule.lr
    if t.schedule.at_step(t.pos.step):  # step-iters:N only (Caffe's step policy)
        set_lr(t.optimizer, t.schedule.lr)
        log_lr_drop(t, old_lr, t.schedule.reason)
    rt = t.cfg.runtime
    if rt.parallel == "hybrid" and rt.hybrid_schedule == "sequential":
        with autocast_context(t.devices, rt.amp):
            loss, logits = sequential_step(t.net, t.optimizer, x, y, rt.fc_updates)
        return loss, logits, y
    with autocast_context(t.devices, rt.amp):
        logits = t.model(x)                                              # (B, classes)
        loss = None if logits is None else F.cross_entropy(logits, y)
    if loss is None:
        t.net.backward_from_fc8()
    else:
        t.scaler.scale(loss).backward()
    if isinstance(t.net, HybridAlexNet):  # the logits' gather already averaged: a sum here
        t.net.reduce_conv_grads(mean=False)
    t.scaler.step(t.optimizer)  # plain optimizer.step() unless fp16 on CUDA
    t.scaler.update()
    return loss, logits, y


def train_epoch(t: "Trainer", loader) -> StopReason:
    """Train on ``loader`` from the trainer's position to the end of the epoch. Returns
    EPOCH at its end, or MAX_STEPS / SIGNAL when stopped earlier. Saves ``last.pt`` every
    --checkpoint-minutes; reads the device only to log and before saving (module docstring)."""
    cfg, pos, log_every = t.cfg, t.pos, t.cfg.logging.log_interval
    t.model.train()
    bar = Progress(t.data.steps_per_epoch, f"epoch {pos.epoch + 1}/{cfg.schedule.epochs}",
                   unit="step", enabled=t.is_main)
    bar.n = pos.epoch_step
    window = StepWindow(pos.step + 1)
    skipped = 0
    reason = StopReason.EPOCH
    for batch in loader:
        if pos.epoch_step >= t.data.steps_per_epoch:
            break  # whole batches only: the permutation's remainder is dropped (drop_last)
        skipped += len(batch.get("skipped", []))
        # A batch of unreadable images only: skipped. Under DDP every rank skips it together
        # (a rank that skipped alone would pair its next step's all-reduce with the others'
        # current one, and the ranks would fall out of step): one all-reduce of the flag.
        if dist_util.any_rank_flags([batch["label"].numel() == 0], t.ctx)[0]:
            continue
        window.add(*train_step(t, batch))
        pos.step += 1
        pos.epoch_step += 1
        if pos.step % log_every == 0 or pos.epoch_step == t.data.steps_per_epoch or \
                first_steps(pos.step, log_every):
            window = close_window(t, window, bar)
        bar.update(1)
        if cfg.schedule.max_steps is not None and pos.step >= cfg.schedule.max_steps:
            reason = StopReason.MAX_STEPS
            break
        # Both decisions lead to collectives (saving gathers every rank's RNG state), so
        # every rank must take them together: one all-reduce of the two flags (on the CPU).
        stop_now, save_now = dist_util.any_rank_flags(
            [bool(t.stop), time.monotonic() - pos.last_save
             > cfg.checkpoint.checkpoint_minutes * 60], t.ctx)
        if stop_now:
            reason = StopReason.SIGNAL
            break
        if save_now:
            window = close_window(t, window, bar)  # never save an unchecked step
            t.save()
    close_window(t, window, bar)
    bar.close()
    if skipped and t.is_main:
        print(f"{PROG}: {skipped} unreadable training image(s) skipped this epoch",
              file=sys.stderr)
    return reason
