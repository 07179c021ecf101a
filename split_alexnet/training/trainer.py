"""Train the 2012 AlexNet the paper's way (Krizhevsky et al., section 5).

    python -m split_alexnet.train --demo                                # generated data, 2 CPU cores, < 10 min
    python -m split_alexnet.train --data /data/ilsvrc12 --gpus 0,1      # the paper: one tower per GPU
    python -m split_alexnet.train --data /data/ilsvrc12 --gpus 0,0      # both towers on one GPU
    python -m split_alexnet.train --data /data/ilsvrc12 --gpus 0 --single-device   # collapsed layout
    python -m split_alexnet.train --data DIR --devices cpu,cpu --max-steps 20       # smoke run
    python -m split_alexnet.train --out runs/alexnet --resume           # continue from last.pt
    torchrun --nproc-per-node 4 -m split_alexnet.train --data DIR       # 2 pairs of GPUs, DDP

Every flag: ``python -m split_alexnet.train --help`` and docs/training.md.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from split_alexnet import __version__
import split_alexnet.training.distributed as dist_util
from split_alexnet.training.checkpoint import (CheckpointError, check_compatible, copy_atomic, load_checkpoint,
                         rng_state, save_checkpoint, set_rng_state)
from split_alexnet.utils.cli import Abort, UsageError, run
from split_alexnet.training.config import TrainConfig, describe_preset, parse_config, resolve_devices
from split_alexnet.data.dataset import EpochSampler, CropFolder, check_dataset_root, make_loader
from split_alexnet.data.stats import load_stats
from split_alexnet.data.augment import finish_batch
from split_alexnet.network.parallelize import apply_fast_paths, autocast_context, grad_scaler, to_input_format
from split_alexnet.data.imagenet import read_class_metadata
from split_alexnet.network.model import build_model, layout_state_dict
from split_alexnet.training.optim import (LRSchedule, build_optimizer, load_named_optimizer_state,
                    named_optimizer_state, set_lr)
from split_alexnet.utils.plot import curves_png
from split_alexnet.utils.progress import Progress

PROG = "split_alexnet.train"


# ------------------------------------------------------------------------------ metrics


def topk_wrong(logits_or_probs: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """How many rows do not have their label among the k highest scores."""
    k = min(k, logits_or_probs.shape[1])
    top = logits_or_probs.topk(k, dim=1).indices
    return (top != labels[:, None]).all(dim=1).sum()


@torch.no_grad()
def evaluate(model: nn.Module, loader, stats, device: torch.device, *, ten_crop: bool = False,
             progress: bool = False) -> dict[str, float]:
    """Top-1 and top-5 error and loss over ``loader``; with ``ten_crop`` the softmax outputs
    of the ten crops are averaged (the paper), and the loss is that average's NLL.
    Under torch.distributed the sums are all-reduced, so each image counts exactly once."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # n, top1 wrong, top5 wrong, loss
    bar = Progress(len(loader), "eval (10 crops)" if ten_crop else "eval", unit="batch",
                   enabled=progress)
    for batch in loader:
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
    if n == 0:
        return {"n": 0, "top1_err": float("nan"), "top5_err": float("nan"), "loss": float("nan")}
    return {"n": int(n), "top1_err": w1 / n, "top5_err": w5 / n, "loss": loss / n}


# ------------------------------------------------------------------------------ run state


@dataclass
class RunState:
    epoch: int = 0          # the epoch in progress
    epoch_step: int = 0     # optimizer steps already taken in this epoch
    step: int = 0           # optimizer steps in total
    best_top1: float = float("inf")
    last_save: float = 0.0  # time.monotonic() of the last checkpoint


class StopRequested:
    """SIGTERM/SIGINT set a flag; the loop saves at the end of the current step and exits 0.
    A second signal exits at once (the last checkpoint stays as it was)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopRequested":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]

    def __bool__(self) -> bool:
        return self.signal is not None


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


class Run:
    """Everything one training process holds: model, optimizer, data, logs."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.ctx = dist_util.init(cfg)
        self.is_main = self.ctx.rank == 0
        self.out = Path(cfg.out)
        self.devices = dist_util.devices_for_rank(cfg, self.ctx) if self.ctx.world_size > 1 \
            else resolve_devices(cfg)
        self.device = self.devices[0]  # input, loss and fc8 live here
        if self.is_main:
            check_out_dir(self.out)
        if cfg.demo:
            if self.is_main:
                print("demo preset (flags given on the command line win):\n" +
                      describe_preset(), file=sys.stderr)
            self._make_demo_data()
        root = Path(cfg.data) if cfg.data else None
        if root is None:
            raise UsageError("--data DIR is required (a folder with train/ and val/), or --demo")
        check_dataset_root(root)
        self.root = root
        self.stats = load_stats(root, progress=self.is_main, workers=cfg.workers) \
            if self.is_main else None
        dist_util.barrier()
        if self.stats is None:
            self.stats = load_stats(root, progress=False)
        self.classes = list(self.stats.classes)
        # wnid, index and human-readable name (from the devkit or Kaggle's mapping, when
        # prepare wrote classes.json), kept in every checkpoint
        self.class_meta = read_class_metadata(root)
        self.train_set = CropFolder(root / "train", self.classes, mode="train", seed=cfg.seed,
                                     pca=cfg.pca, strict=cfg.strict)
        self.val_set = CropFolder(root / "val", self.classes, mode="center", seed=cfg.seed,
                                   strict=cfg.strict)
        self.batch = dist_util.local_batch_size(cfg, self.ctx)
        self.steps_per_epoch = len(self.train_set) // (self.batch * self.ctx.world_size)
        if self.steps_per_epoch < 1:
            raise UsageError(f"the training set has {len(self.train_set)} images, fewer than one "
                             f"batch of {self.batch * self.ctx.world_size}")

        # Model: seeded, built, placed; then the optimizer (after placement).
        torch.manual_seed(cfg.seed)
        model = build_model(arch=cfg.arch, layout=cfg.layout, devices=self.devices,
                            num_classes=len(self.classes), init=cfg.init, lrn=cfg.lrn,
                            activation=cfg.activation, pool=cfg.pool, dropout=cfg.dropout)
        # The dropout stream, independent of the layout; each rank draws its own masks.
        torch.manual_seed(cfg.seed + 1 + 1_000_003 * self.ctx.rank)
        self.raw_model = model
        # Fast paths (all off by default: fp32 eager is the faithful path; docs/benchmarks.md).
        apply_fast_paths(model, channels_last=cfg.channels_last,
                         cudnn_benchmark=True if cfg.cudnn_benchmark else None)
        self.model = apply_fast_paths(dist_util.wrap(model, self.ctx, self.devices),
                                      compile=cfg.compile)
        self.scaler = grad_scaler(self.device, cfg.amp)  # enabled only for fp16 on CUDA
        # Evaluation bypasses DDP (ranks may run different numbers of batches).
        self.eval_model = self.raw_model if self.ctx.world_size > 1 else self.model
        self.optimizer = build_optimizer(model, kind=cfg.optimizer, lr=cfg.lr,
                                         momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.schedule = LRSchedule(cfg.lr_schedule, cfg.lr, patience=cfg.plateau_patience,
                                   max_drops=cfg.lr_drops)
        self.state = RunState(last_save=time.monotonic())
        self.metrics_path = self.out / "metrics.jsonl"
        if cfg.resume:
            self._resume(cfg.resume)
        elif self.is_main:
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    # -------------------------------------------------------------------------- setup
    def _make_demo_data(self) -> None:
        from split_alexnet.data.demo import make_demo_dataset
        if self.cfg.data is None:
            self.cfg.data = str(self.out / "demo_data")
        root = Path(self.cfg.data)
        if self.is_main and not (root / "train").is_dir():
            print(f"generating the demo dataset in {root} ...", file=sys.stderr)
            make_demo_dataset(root, seed=0)
        dist_util.barrier()

    def _resume(self, spec: str) -> None:
        if self.is_main:  # half-written temporaries of a save that was killed (SIGKILL, OOM)
            for tmp in self.out.glob(".*.pt.*.tmp"):
                tmp.unlink(missing_ok=True)
        candidates = [Path(spec)] if spec != "auto" else \
            [self.out / "last.pt"] + sorted(self.out.glob("epoch_*.pt"), reverse=True)
        errors = []
        for path in candidates:
            try:
                ckpt = load_checkpoint(path)
                check_compatible(ckpt, arch=self.cfg.arch, num_classes=len(self.classes),
                                 path=path)
            except CheckpointError as e:
                errors.append(str(e))
                if self.is_main and spec == "auto" and path.exists():
                    print(f"{PROG}: warning: {e}; trying the previous checkpoint", file=sys.stderr)
                continue
            self._load(ckpt, path)
            return
        if spec == "auto" and not any(p.exists() for p in candidates):
            raise UsageError(f"--resume: no checkpoint in {self.out} (looked for last.pt and "
                             "epoch_*.pt)")
        raise UsageError(errors[-1] if errors else f"--resume: nothing usable at {spec}")

    def _load(self, ckpt: dict, path: Path) -> None:
        if ckpt.get("stats_fingerprint") != self.stats.fingerprint and self.is_main:
            print(f"{PROG}: warning: the dataset changed since {path} was written "
                  "(statistics fingerprint differs)", file=sys.stderr)
        self.raw_model.load_state_dict(ckpt["model"])
        load_named_optimizer_state(self.raw_model, self.optimizer, ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        set_lr(self.optimizer, self.schedule.lr)
        s = ckpt["progress"]
        self.state.epoch, self.state.epoch_step, self.state.step = \
            s["epoch"], s["epoch_step"], s["step"]
        self.state.best_top1 = s["best_top1"]
        rng = ckpt["rng"].get(f"rank{self.ctx.rank}", ckpt["rng"]["rank0"])
        set_rng_state(rng)
        if self.is_main:
            print(f"resumed from {path}: epoch {self.state.epoch}, step {self.state.step} "
                  f"(step {self.state.epoch_step} of the epoch)", file=sys.stderr)
            self.log({"kind": "resume", "step": self.state.step, "epoch": self.state.epoch,
                      "from": str(path)})

    # -------------------------------------------------------------------------- output
    def log(self, record: dict) -> None:
        if self.is_main:
            record = {"time": round(time.time(), 3), **record}
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def payload(self) -> dict:
        s = self.state
        rngs = dist_util.gather_objects(rng_state(self.devices), self.ctx)
        return {
            "model": layout_state_dict(self.raw_model),
            "optimizer": named_optimizer_state(self.raw_model, self.optimizer),
            "schedule": self.schedule.state_dict(),
            "progress": {"epoch": s.epoch, "epoch_step": s.epoch_step, "step": s.step,
                         "best_top1": s.best_top1},
            "rng": {f"rank{r}": v for r, v in enumerate(rngs)},
            "data_rng": "derived from (seed, epoch, index); sampler position = epoch_step",
            "config": self.cfg.to_dict(),
            "layout": self.cfg.layout,
            "classes": self.classes,
            "class_names": [c["name"] for c in self.class_meta],
            "class_metadata": self.class_meta,
            "stats_fingerprint": self.stats.fingerprint,
            "stats": {"mean": self.stats.mean, "eigval": self.stats.eigval,
                      "eigvec": self.stats.eigvec},
            "world_size": self.ctx.world_size,
            "code_version": code_version(),
            "torch_version": str(torch.__version__),
        }

    def save(self, *, epoch_end: bool = False, best: bool = False) -> None:
        payload = self.payload()  # every rank joins the RNG gather
        if not self.is_main:
            return
        extra = ([f"epoch_{self.state.epoch:03d}.pt"] if epoch_end else []) + \
            (["best.pt"] if best else [])
        target = self.out / "last.pt"
        try:
            save_checkpoint(target, payload)
            for name in extra:  # the same bytes: link (or copy) last.pt, then rename atomically
                copy_atomic(target, self.out / name)
        except OSError as e:
            raise Abort(f"could not write checkpoint in {self.out}: {e.strerror or e}; the "
                        "previous checkpoint is intact, stopping") from None
        if epoch_end and self.cfg.keep_last > 0:
            for old in sorted(self.out.glob("epoch_*.pt"))[:-self.cfg.keep_last]:
                old.unlink(missing_ok=True)
        self.state.last_save = time.monotonic()

    def plot(self) -> None:
        if not self.is_main:
            return
        train, val = {}, {}
        for line in self.metrics_path.read_text().splitlines():
            r = json.loads(line)
            if r["kind"] == "train":
                train[r["step"]] = r["top1_err"]
            elif r["kind"] == "val":
                val[r["step"]] = r["top1_err"]
        if train or val:
            curves_png(self.out / "curves.png",
                       [("train top-1 error (batch)", list(train), list(train.values())),
                        ("val top-1 error (centre crop)", list(val), list(val.values()))],
                       title=f"{self.out.name}: top-1 error", xlabel="step", ylabel="error",
                       ylim=(0.0, 1.0))

    # -------------------------------------------------------------------------- loops
    def train_loader(self):
        sampler = EpochSampler(len(self.train_set), epoch=self.state.epoch, seed=self.cfg.seed,
                               shuffle=True, rank=self.ctx.rank,
                               world_size=self.ctx.world_size, drop_last=True,
                               start=self.state.epoch_step * self.batch)
        return self._loader(self.train_set, self.batch, sampler)

    def _loader(self, ds, batch_size: int, sampler):
        loader = make_loader(ds, batch_size=batch_size, sampler=sampler,
                             workers=self.cfg.workers, pin_memory=self.device.type == "cuda")
        # The loader's own seed draw must not touch the global RNG (the dropout stream), or a
        # resumed run would draw different masks. Augmentation does not use it either: it is
        # derived from (seed, epoch, index) inside the dataset.
        loader.generator = torch.Generator().manual_seed(self.cfg.seed)
        return loader

    def val_loader(self, ten_crop: bool):
        ds = self.val_set if not ten_crop else CropFolder(
            self.root / "val", self.classes, mode="tencrop", seed=self.cfg.seed,
            strict=self.cfg.strict)
        sampler = EpochSampler(len(ds), shuffle=False, rank=self.ctx.rank,
                               world_size=self.ctx.world_size, drop_last=False)
        return self._loader(ds, max(1, self.batch // 10) if ten_crop else self.batch, sampler)

    def train_one_epoch(self, stop: StopRequested) -> str:
        """Returns 'epoch' at the end of the epoch, or 'max_steps' / 'signal' when stopped."""
        cfg, s = self.cfg, self.state
        self.model.train()
        loader = self.train_loader()
        self._train_iter = iter(loader)  # fit() names its files if a worker dies
        bar = Progress(self.steps_per_epoch, f"epoch {s.epoch + 1}/{cfg.epochs}", unit="step",
                       enabled=self.is_main)
        bar.n = s.epoch_step
        window = {"loss": 0.0, "wrong": 0, "n": 0, "t": time.monotonic()}
        skipped = 0
        for batch in self._train_iter:
            if s.epoch_step >= self.steps_per_epoch:
                break  # whole batches only: the permutation's remainder is dropped (drop_last)
            skipped += len(batch.get("skipped", []))
            if batch["label"].numel() == 0:
                continue
            x = finish_batch(batch, self.stats, self.device)                # (B, 3, 227, 227)
            y = batch["label"].to(self.device, non_blocking=True)
            x = to_input_format(x, self.cfg.channels_last)
            with autocast_context(self.devices, self.cfg.amp):
                logits = self.model(x)                                       # (B, classes)
                loss = F.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise Abort(f"loss is {loss_value} at step {s.step + 1} (epoch {s.epoch + 1}); "
                            f"stopping without saving. Last good checkpoint: "
                            f"{self.last_checkpoint_name()}")
            self.scaler.step(self.optimizer)  # plain optimizer.step() unless fp16 on CUDA
            self.scaler.update()
            s.step += 1
            s.epoch_step += 1
            window["loss"] += loss_value * y.numel()
            window["wrong"] += int(topk_wrong(logits.detach(), y, 1))
            window["n"] += y.numel()
            if s.step % cfg.log_interval == 0 or s.epoch_step == self.steps_per_epoch:
                dt = time.monotonic() - window["t"]
                rec = {"kind": "train", "step": s.step, "epoch": s.epoch + 1,
                       "loss": window["loss"] / window["n"],
                       "top1_err": window["wrong"] / window["n"], "lr": self.schedule.lr,
                       "images_per_s": window["n"] * self.ctx.world_size / max(dt, 1e-9)}
                self.log(rec)
                bar.extra = f"loss {rec['loss']:.3f} err {rec['top1_err']:.3f} " \
                            f"lr {rec['lr']:g} {rec['images_per_s']:.0f} img/s"
                window = {"loss": 0.0, "wrong": 0, "n": 0, "t": time.monotonic()}
            self.watchdog(loss_value)
            bar.update(1)
            if cfg.max_steps is not None and s.step >= cfg.max_steps:
                bar.close()
                return "max_steps"
            # Both decisions lead to collectives (saving gathers every rank's RNG state), so
            # every rank must take them together: one all-reduce of the two flags.
            stop_now, save_now = dist_util.any_rank_flags(
                [bool(stop), time.monotonic() - s.last_save > cfg.checkpoint_minutes * 60],
                self.ctx)
            if stop_now:
                bar.close()
                return "signal"
            if save_now:
                self.save()
        bar.close()
        if skipped and self.is_main:
            print(f"{PROG}: {skipped} unreadable training image(s) skipped this epoch",
                  file=sys.stderr)
        return "epoch"

    def watchdog(self, loss_value: float) -> None:
        """--watchdog-steps W: at step W, one warning line (not an abort) and a "watchdog"
        record if the training loss, averaged over the last min(50, W/2) steps, is not below
        chance, ln(classes), by more than 2% (docs/experiments.md)."""
        w, step = self.cfg.watchdog_steps, self.state.step
        if not w or step > w or len(self.classes) < 2:
            return
        recent = self.__dict__.setdefault("_watchdog_losses", [])
        recent.append(loss_value)
        del recent[:-max(1, min(50, w // 2))]
        chance = math.log(len(self.classes))
        mean = sum(recent) / len(recent)
        if step == w and self.is_main and mean > 0.98 * chance:
            print(f"{PROG}: warning: after {step} steps the training loss is still at chance "
                  f"(ln {len(self.classes)} = {chance:.3f}): mean of the last {len(recent)} "
                  f"steps {mean:.3f}; this run is not learning. Check --init (the paper's "
                  "biases of 1 stall small runs), the input scale and --lr; see "
                  "docs/experiments.md (init, input scale)", file=sys.stderr)
            self.log({"kind": "watchdog", "step": step, "loss": mean, "chance_loss": chance,
                      "window": len(recent)})

    def _loader_died(self, e: RuntimeError) -> BaseException:
        """A RuntimeError from a DataLoader worker that died (killed, out of memory, a crash
        in a decoder) -> Abort, one line naming the files that worker was reading (from
        DataLoader internals, best effort); any other RuntimeError is returned unchanged."""
        msg = (str(e).strip().splitlines() or [""])[0]
        if "DataLoader worker" not in msg:
            return e
        msg = msg.split(". Details are lost")[0].rstrip(". ")
        files: list[str] = []
        try:
            it = self._train_iter
            dead = {i for i, w in enumerate(it._workers) if not w.is_alive()}
            batches = list(it._index_sampler)  # task k = the k-th batch since the start
            for w in sorted(dead):  # a worker takes its tasks in order: the first one pending
                pending = [k for k, info in it._task_info.items() if info == (w,)]
                if pending:
                    files += [self.train_set.samples[i][0] for _, i in batches[min(pending)]]
        except Exception:  # noqa: BLE001 - the message is still useful without the files
            files = []
        where = f"; it was reading one of: {', '.join(files[:8])}" + \
            (f" (+{len(files) - 8} more)" if len(files) > 8 else "") if files else ""
        return Abort(f"{msg} at step {self.state.step + 1} (epoch {self.state.epoch + 1})"
                     f"{where}; rerun with --workers 0 to see the error. Last good "
                     f"checkpoint: {self.last_checkpoint_name()}")

    def last_checkpoint_name(self) -> str:
        last = self.out / "last.pt"
        return str(last) if last.exists() else "none yet"

    def fit(self) -> dict:
        cfg, s = self.cfg, self.state
        set_lr(self.optimizer, self.schedule.lr)
        if self.is_main:
            kind = f"{cfg.layout} on {', '.join(map(str, self.devices))}"
            print(f"training {cfg.arch} ({kind}), {len(self.classes)} classes, "
                  f"{len(self.train_set)} train / {len(self.val_set)} val images, batch "
                  f"{self.batch}x{self.ctx.world_size}, {self.steps_per_epoch} steps/epoch, "
                  f"out {self.out}", file=sys.stderr)
        result: dict = {}
        with StopRequested() as stop:
            while s.epoch < cfg.epochs:
                try:
                    why = self.train_one_epoch(stop)
                except RuntimeError as e:  # a DataLoader worker died: one line, exit 1
                    raise self._loader_died(e) from None
                finally:
                    self._train_iter = None  # frees the workers before saving
                if why == "signal":
                    self.save()
                    if self.is_main:
                        print(f"{PROG}: signal received: saved {self.out / 'last.pt'} at step "
                              f"{s.step}; continue with --resume", file=sys.stderr)
                    return {"stopped": "signal", "step": s.step}
                if why == "max_steps" and s.epoch_step < self.steps_per_epoch:
                    self.save()
                    return {"stopped": "max_steps", "step": s.step}
                # End of an epoch.
                s.epoch += 1
                s.epoch_step = 0
                best = False
                if s.epoch % cfg.eval_every == 0 or s.epoch == cfg.epochs or why == "max_steps":
                    val = evaluate(self.eval_model, self.val_loader(False), self.stats, self.device,
                                   progress=self.is_main)
                    result = {"epoch": s.epoch, "step": s.step, **val}
                    self.log({"kind": "val", **result, "lr": self.schedule.lr})
                    if self.is_main:
                        print(f"epoch {s.epoch}: val top-1 {val['top1_err']:.4f} top-5 "
                              f"{val['top5_err']:.4f} loss {val['loss']:.4f} "
                              f"(lr {self.schedule.lr:g})", file=sys.stderr)
                    best = val["top1_err"] < s.best_top1
                    s.best_top1 = min(s.best_top1, val["top1_err"])
                    set_lr(self.optimizer, self.schedule.step(val["top1_err"]))
                self.save(epoch_end=True, best=best)
                self.plot()
                if why == "max_steps":
                    return {"stopped": "max_steps", **result}
        if cfg.ten_crop:
            val10 = evaluate(self.eval_model, self.val_loader(True), self.stats, self.device,
                             ten_crop=True, progress=self.is_main)
            self.log({"kind": "val_ten_crop", "epoch": s.epoch, "step": s.step, **val10})
            if self.is_main:
                print(f"ten-crop: val top-1 {val10['top1_err']:.4f} top-5 "
                      f"{val10['top5_err']:.4f} loss {val10['loss']:.4f}", file=sys.stderr)
            result = {**result, "ten_crop": val10}
        return result


def check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {out} is not writable: {e.strerror or e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(argv)
    run_ = Run(cfg)
    try:
        result = run_.fit()
        if run_.is_main:
            print(json.dumps(result), file=sys.stdout)
    finally:
        dist_util.shutdown()
    return 0


def cli() -> None:
    """The console command: ``main`` with one-line errors and exit codes."""
    sys.exit(run(main, PROG))
