"""Building a run's parts before its first step: the data (:func:`load_data`, with the
--holdout split) and the network with what trains it (:func:`build_learner`: seeded, built,
placed, fine-tuned, parallelized, then the optimizer over the placed parameters).
``Trainer.setup`` calls them in that order."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

import split_alexnet.training.distributed as dist_util
from split_alexnet.data.dataset import (CropFolder, check_dataset_root, find_classes,
                                        holdout_indices, list_samples)
from split_alexnet.data.imagenet import read_class_metadata
from split_alexnet.data.stats import load_stats
from split_alexnet.network.parallelize import grad_scaler, parallelize
from split_alexnet.network.placement import build_model
from split_alexnet.network.hybrid import FC_LAYERS, HybridAlexNet, check_parts
from split_alexnet.network.model import WEIGHT_LAYERS
from split_alexnet.network.towers import RankTower, TowerLink
from split_alexnet.training.config import TrainConfig
from split_alexnet.training.finetune import FineTuning, prepare
from split_alexnet.training.optim import LRSchedule, batch_lr_mult, build_optimizer
from split_alexnet.training.state import RunData
from split_alexnet.utils.cli import UsageError

Listing = tuple[list[str], list[tuple[str, int]]]  # (classes, samples) of a training folder


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


def list_for_holdout(cfg: TrainConfig) -> Listing | None:
    """With --holdout, before any other work: the training folder listed (once: the
    training set reuses it) and the hold-out checked against it. None without --holdout."""
    data = cfg.data.data
    if not (cfg.data.holdout and data and (Path(data) / "train").is_dir()):
        return None
    classes = find_classes(Path(data) / "train")
    samples = list_samples(Path(data) / "train", classes, strict=cfg.data.strict)
    check_holdout(cfg.data.holdout, [t for _, t in samples], classes)
    return classes, samples


def split_holdout(train_set: CropFolder, cfg: TrainConfig, is_main: bool) \
        -> tuple[CropFolder, CropFolder | None]:
    """--holdout N: (the training set without N images of each class, those images as
    centre crops); without it (the training set, None). N at least the smallest class's
    count is a :class:`UsageError`."""
    n = cfg.data.holdout
    if not n:
        return train_set, None
    check_holdout(n, train_set.targets, train_set.classes)
    held = set(holdout_indices(train_set.targets, n, cfg.runtime.seed))
    keep = [i for i in range(len(train_set)) if i not in held]
    if is_main:
        print(f"--holdout {n}: {len(held)} of {len(train_set)} training images held "
              f"out ({n} per class); training on {len(keep)}; the hold-out drives "
              "the schedule and best.pt", file=sys.stderr)
    return train_set.subset(keep), train_set.subset(sorted(held), mode="center")


def load_data(cfg: TrainConfig, ctx: dist_util.Context, listed: Listing | None) -> RunData:
    """The dataset: its statistics (computed once, by rank 0, while the others wait), the
    training set (without the hold-out), val, and this process's batch and steps per epoch."""
    if cfg.data.data is None:
        raise UsageError("--data DIR is required (a folder with train/ and val/), or --demo")
    is_main = ctx.rank == 0
    root = Path(cfg.data.data)
    check_dataset_root(root)
    stats = load_stats(root, progress=is_main, workers=cfg.data.workers) if is_main else None
    dist_util.barrier()
    if stats is None:
        stats = load_stats(root, progress=False)
    classes = list(stats.classes)
    if len(classes) < 2:
        raise UsageError(f"--data {root} has one class ({classes[0]!r} in train/): a "
                         "classifier needs at least two class folders")
    seed, strict = cfg.runtime.seed, cfg.data.strict
    train_set = CropFolder(root / "train", classes, mode="train", seed=seed, pca=cfg.data.pca,
                           strict=strict,
                           samples=listed[1] if listed and listed[0] == classes else None)
    train_set, holdout_set = split_holdout(train_set, cfg, is_main)
    batch = dist_util.local_batch_size(cfg, ctx)
    steps_per_epoch = len(train_set) // (batch * ctx.data_size)
    if steps_per_epoch < 1:
        most = len(train_set) // (ctx.data_size if cfg.optim.per_process_batch else 1)
        raise UsageError(f"the training set has {len(train_set)} images, fewer than one "
                         f"batch of {batch * ctx.data_size} (--batch-size "
                         f"{cfg.optim.batch_size}); give --batch-size N with N at most {most}")
    return RunData(
        root=root, stats=stats, classes=classes,
        # wnid, index and human-readable name (from the devkit or Kaggle's mapping, when
        # prepare wrote classes.json), kept in every checkpoint
        class_meta=read_class_metadata(root), train_set=train_set,
        val_set=CropFolder(root / "val", classes, mode="center", seed=seed, strict=strict),
        holdout_set=holdout_set, batch=batch, steps_per_epoch=steps_per_epoch)


@dataclass
class Learner:
    """The network and what trains it."""

    net: nn.Module                   # the network itself: checkpoints are its state
    model: nn.Module                 # what trains: parallelize(net) (DDP, compiled)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler     # enabled only for fp16 on CUDA
    schedule: LRSchedule
    tuning: FineTuning               # what --init-from and --freeze-through did


def layer_batches(cfg: TrainConfig, ctx: dist_util.Context, batch: int) -> dict[str, int]:
    """The images each layer's update sees: the global batch (``batch`` per replica), except
    the fully connected layers under --fc-updates each (one process's ``batch``)."""
    each = cfg.runtime.fc_updates == "each"
    return {layer: batch if each and layer in FC_LAYERS else batch * ctx.data_size
            for layer in WEIGHT_LAYERS}


def batch_lr_mults(cfg: TrainConfig, ctx: dist_util.Context, batch: int) -> dict[str, float]:
    """--lr-batch-rule: each layer's learning-rate multiplier for the batch it sees
    (:func:`layer_batches`); all 1 with 'off'."""
    o = cfg.optim
    return {layer: batch_lr_mult(o.lr_batch_rule, n, o.lr_batch_reference)
            for layer, n in layer_batches(cfg, ctx, batch).items()}


def describe_lr_batch_rule(cfg: TrainConfig, ctx: dist_util.Context, batch: int) -> str | None:
    """The line that says what --lr-batch-rule does to this run's learning rates (None when
    it is off): each distinct batch, its layers and their multiplier."""
    o = cfg.optim
    if o.lr_batch_rule == "off":
        return None
    batches, mults = layer_batches(cfg, ctx, batch), batch_lr_mults(cfg, ctx, batch)
    parts = []
    for n in dict.fromkeys(batches.values()):
        layers = [layer for layer in WEIGHT_LAYERS if batches[layer] == n]
        parts.append(f"{layers[0]}-{layers[-1]} see {n} images: lr x {mults[layers[0]]:.4g}")
    return (f"--lr-batch-rule {o.lr_batch_rule} (reference batch {o.lr_batch_reference}): "
            + "; ".join(parts))


def build_learner(cfg: TrainConfig, layout: str, ctx: dist_util.Context,
                  devices: tuple[torch.device, ...], source, classes: list[str],
                  batch: int = 0, *, resume: bool = False) -> Learner:
    """The model: seeded, built on the CPU and placed; the --init-from weights (``source``)
    and frozen layers; then the fast paths and DDP, in parallelize's fixed order; the
    optimizer last, over the placed parameters (each layer's learning rate times its
    --lr-batch-rule multiplier for ``batch`` images per replica).

    The weights are drawn only where they are used: not for a ``resume`` (the checkpoint's
    are loaded next), nor by a DDP replica other than data rank 0 (DDP gives every replica
    data rank 0's parameters and buffers when it is built): those networks are given memory
    only (``ModelConfig.init`` None, ``model.initialise``)."""
    rt, o, s = cfg.runtime, cfg.optim, cfg.schedule
    hybrid = rt.parallel == "hybrid"
    ddp = ctx.data_size > 1 and not hybrid
    drawn_elsewhere = resume or (ddp and ctx.data_rank > 0)
    model_cfg = replace(cfg.model, init=None) if drawn_elsewhere else cfg.model
    if hybrid:
        try:
            check_parts(ctx.world_size, len(classes))
        except ValueError as e:
            raise UsageError(f"--parallel hybrid: {e} (torchrun --nproc-per-node)") from None
    torch.manual_seed(rt.seed)
    if ctx.tower is None and not hybrid:
        net = build_model(model_cfg, layout, devices)
        tuning = prepare(net, cfg, source, classes, is_main=ctx.rank == 0)
    elif hybrid:  # the whole net built alike in every process, this process's part kept
        whole = build_model(model_cfg, "collapsed", ("cpu",))
        tuning = prepare(whole, cfg, source, classes, is_main=ctx.rank == 0)
        net = HybridAlexNet(whole, rank=ctx.rank, parts=ctx.world_size)
        net.group, net.host_group = ctx.group("hybrid"), dist_util.control_group()
        # the sequential schedule's broadcasts run ahead on a group of their own (every
        # process creates it, in the same order)
        net.ahead_group = torch.distributed.new_group(
            backend=torch.distributed.get_backend(net.group))
        del whole
    else:  # --parallel towers: the whole net built alike in both processes, one tower kept
        whole = build_model(model_cfg, "split", ("cpu", "cpu"))
        tuning = prepare(whole, cfg, source, classes, is_main=ctx.rank == 0)
        net = RankTower.of(whole, ctx.tower)
        net.link = TowerLink(ctx.tower, peer=ctx.rank ^ 1, group=ctx.group("tower"),
                             via_cpu=devices[0].type != "cpu" and
                             torch.distributed.get_backend() == "gloo")
        del whole
    # The dropout stream, independent of the layout; each replica draws its own masks (the
    # two processes of a pair are one replica: they draw alike).
    torch.manual_seed(rt.seed + 1 + 1_000_003 * ctx.data_rank)
    model = parallelize(net, devices, channels_last=rt.channels_last,
                        ddp=ddp, compile=rt.compile,
                        cudnn_benchmark=True if rt.cudnn_benchmark else None,
                        ddp_group=ctx.group("data") if ctx.tower is not None else None)
    lr_mult = batch_lr_mults(cfg, ctx, batch or o.batch_size // max(ctx.data_size, 1))
    lr_mult = {layer: m * (tuning.layer_lr_mult or {}).get(layer, 1.0) for layer, m in lr_mult.items()}
    optimizer = build_optimizer(net, kind=o.optimizer, lr=o.lr, momentum=o.momentum,
                                weight_decay=o.weight_decay, bias_lr_mult=o.bias_lr_mult,
                                bias_decay=o.bias_decay, layer_lr_mult=lr_mult)
    schedule = LRSchedule(s.lr_schedule, o.lr, patience=s.plateau_patience,
                          max_drops=s.lr_drops, min_epochs=s.plateau_min_epochs,
                          threshold=s.plateau_threshold)
    return Learner(net=net, model=model, optimizer=optimizer,
                   scaler=grad_scaler(devices[0], rt.amp), schedule=schedule, tuning=tuning)
