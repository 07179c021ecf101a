"""A training run's checkpoints: what a run saves (:func:`payload`, :func:`save`) and how it
continues from one (:func:`resume`, :func:`restore`), in the file format of
:mod:`split_alexnet.utils.checkpoint_file` (atomic writes, a checksum, ``weights_only=True``
loads, every shape and value checked).

A run's checkpoint holds, beside what every checkpoint holds (the weights, ``model_config``,
the classes, the statistics, the versions, the checksum):

    optimizer    buffers keyed by parameter name, layout-independent (optim.py)
    schedule     the learning-rate schedule's state
    progress     epoch, step, epoch_step and best_top1: where training stands (step counts
                 optimizer steps in total; epoch_step is the position inside the epoch, for
                 mid-epoch resume)
    rng          every random state that training draws from (CPU, each CUDA device), per rank
    threads      the intra-op thread count (a resume with another warns: not bitwise)
    config       the full training config (a flat dict of every setting)
    layout, world_size   how the run was laid out

Saved as ``OUT/last.pt`` (temporary files named by :func:`runfolder.temp_suffix`, so that a
later --resume can remove those of a killed writer), with ``epoch_NNN.pt`` as a link or copy
of it; ``best.pt`` is written apart, without the optimizer state and RNG states (a file to
evaluate and fine-tune from, half the size). A failed write (a full disk) or a second signal
leaves the previous checkpoint and one line.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import split_alexnet.training.distributed as dist_util
from split_alexnet.network.model import layout_state_dict
from split_alexnet.training.config import PROG
from split_alexnet.training.optim import (load_named_optimizer_state, named_optimizer_state,
                                          set_lr)
from split_alexnet.training.runfolder import (changed_settings, check_resumable, check_same_run,
                                              epoch_checkpoints, remove_stale_temps,
                                              temp_suffix)
from split_alexnet.training.towerstate import gather_state, replica_states
from split_alexnet.utils.checkpoint_file import (CheckpointError, check_compatible,
                                                 check_training_state, code_version,
                                                 load_checkpoint, save_checkpoint)
from split_alexnet.utils.cli import Abort, Interrupted, UsageError

if TYPE_CHECKING:  # the trainer imports this module
    from split_alexnet.training.trainer import Trainer


def copy_atomic(src: Path, dst: Path) -> None:
    """Make ``dst`` hold ``src``'s bytes, atomically: a hard link where the filesystem allows
    (no second write of hundreds of MB; replacing ``src`` later leaves ``dst`` alone), else a
    copy; either way via a temporary name and a rename."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}{temp_suffix()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)


def rng_state(devices) -> dict:
    """Every random state training draws from: the CPU's, and each CUDA device's in use."""
    state = {"cpu": torch.get_rng_state()}
    for d in sorted({torch.device(d) for d in devices if torch.device(d).type == "cuda"},
                    key=str):
        state[str(d)] = torch.cuda.get_rng_state(d)
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    for key, value in state.items():
        if key.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state(value, torch.device(key))


def payload(t: "Trainer") -> dict:
    """Everything a run needs to continue exactly (see the module docstring). Every rank
    must call it: the RNG states of all ranks are gathered."""
    pos, d = t.pos, t.data
    rngs = replica_states(dist_util.gather_objects(rng_state(t.devices), t.ctx), t)
    if not t.ctx.spans_processes:
        model, optimizer = layout_state_dict(t.net), named_optimizer_state(t.net, t.optimizer)
    else:  # --parallel towers or hybrid: the processes send their parts to rank 0
        model, optimizer = gather_state(t)
    return {
        "model": model,
        "optimizer": optimizer,
        "schedule": t.schedule.state_dict(),
        "progress": {"epoch": pos.epoch, "epoch_step": pos.epoch_step, "step": pos.step,
                     "best_top1": pos.best_top1},
        "rng": rngs,
        "data_rng": "derived from (seed, epoch, index); sampler position = epoch_step",
        "config": t.cfg.to_dict(with_model=False),
        "model_config": dataclasses.asdict(t.cfg.model),
        "layout": t.layout,
        "classes": d.classes,
        "class_names": [c["name"] for c in d.class_meta],
        "class_metadata": d.class_meta,
        "stats_fingerprint": d.stats.fingerprint,
        "stats": {"mean": d.stats.mean, "eigval": d.stats.eigval, "eigvec": d.stats.eigvec},
        "world_size": t.ctx.data_size,
        # the CPU sums' order: a resume is bitwise only at the same thread count
        "threads": torch.get_num_threads(),
        "code_version": code_version(),
        "torch_version": str(torch.__version__),
    }


#: What only a resume reads; best.pt leaves it out (half the size: the velocity is as large
#: as the weights).
RESUME_ONLY = ("optimizer", "rng")


def save(t: "Trainer", *, epoch_end: bool = False, best: bool = False) -> None:
    """OUT/last.pt, and at an epoch's end OUT/epoch_NNN.pt (the last --keep-last of them) and,
    for a new best validation error, OUT/best.pt. Every rank calls it; rank 0 writes."""
    data = payload(t)  # every rank joins the RNG gather
    if not t.is_main:
        return
    extra = [f"epoch_{t.pos.epoch:03d}.pt"] if epoch_end else []
    target = t.out / "last.pt"
    crcs: dict[int, int] = {}  # best.pt's checksum reuses the CRCs of last.pt's weights
    try:
        save_checkpoint(target, data, suffix=temp_suffix(), crcs=crcs)
        for name in extra:  # the same bytes: link (or copy) last.pt, then rename atomically
            copy_atomic(target, t.out / name)
        if best:  # for evaluation and --init-from: the weights without what resumes
            save_checkpoint(t.out / "best.pt", {k: v for k, v in data.items()
                                                if k not in RESUME_ONLY},
                            suffix=temp_suffix(), crcs=crcs)
    except (OSError, RuntimeError, KeyboardInterrupt) as e:
        if t.stop.forced:  # a second signal, wherever it landed (torch reports it in a write
            # callback as a RuntimeError)
            raise Interrupted(f"a second signal stopped the save of {target}: it was "
                              "abandoned, and the folder holds the last complete checkpoint "
                              f"({last_checkpoint_name(t.out)})") from None
        if isinstance(e, KeyboardInterrupt):
            raise
        raise Abort(f"could not write checkpoint in {t.out}: {write_failure(e)}; the "
                    "previous checkpoint is intact, stopping") from None
    keep = t.cfg.checkpoint.keep_last
    if epoch_end and keep > 0:
        for old in epoch_checkpoints(t.out)[:-keep]:
            old.unlink(missing_ok=True)
    t.pos.last_save = time.monotonic()


def write_failure(e: BaseException) -> str:
    """Why a write failed, in a few words: the OSError's text. torch.save reports a failed
    write (a full disk: ENOSPC, EFBIG) as ``RuntimeError: [enforce fail at
    inline_container.cc] ... unexpected pos``, with the OSError as its context."""
    cause = e.__context__ if isinstance(e, RuntimeError) and \
        isinstance(e.__context__, OSError) else e
    if isinstance(cause, OSError):
        return cause.strerror or str(cause)
    return (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]


def last_checkpoint_name(out: Path) -> str:
    last = out / "last.pt"
    return str(last) if last.exists() else "none yet"


def resume(t: "Trainer", spec: str, resume_lr: float | None = None) -> None:
    """--resume: 'auto' loads OUT/last.pt, falling back to the newest good epoch checkpoint
    (with a warning); a path loads that file. A file that cannot be used, or one of another
    run (``runfolder.check_same_run``), is one :class:`UsageError` line."""
    if t.is_main:  # half-written temporaries of a save that was killed (SIGKILL, OOM)
        remove_stale_temps(t.out)
    candidates = [Path(spec)] if spec != "auto" else \
        [t.out / "last.pt"] + epoch_checkpoints(t.out)[::-1]
    errors = []
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
            check_resumable(ckpt, path)
            check_training_state(ckpt, path)
            check_compatible(ckpt, arch=t.cfg.model.arch, num_classes=len(t.data.classes),
                             path=path)
        except CheckpointError as e:
            errors.append(str(e))
            if t.is_main and spec == "auto" and path.exists():
                print(f"{PROG}: warning: {e}; trying the previous checkpoint", file=sys.stderr)
            continue
        check_same_run(ckpt, t.cfg, t.data.classes, path)
        restore(t, ckpt, path, resume_lr)
        return
    if spec == "auto" and not any(p.exists() for p in candidates):
        raise UsageError(f"--resume: no checkpoint in {t.out} (looked for last.pt and "
                         "epoch_*.pt)")
    raise UsageError(errors[-1] if errors else f"--resume: nothing usable at {spec}")


def restore(t: "Trainer", ckpt: dict, path: Path, resume_lr: float | None = None) -> None:
    """Put a loaded checkpoint's state into the trainer: weights, optimizer, schedule,
    position and this rank's RNG states; then --resume-lr, recorded as an "lr_change"."""
    if ckpt.get("stats_fingerprint") != t.data.stats.fingerprint and t.is_main:
        print(f"{PROG}: warning: the dataset changed since {path} was written "
              "(statistics fingerprint differs)", file=sys.stderr)
    saved_threads = ckpt.get("threads")
    if isinstance(saved_threads, int) and saved_threads != torch.get_num_threads() \
            and t.is_main and any(torch.device(d).type == "cpu" for d in t.devices):
        print(f"{PROG}: warning: this process uses {torch.get_num_threads()} intra-op "
              f"thread(s), the run {saved_threads} ({path}): the CPU's sums run in another "
              "order, so the continuation is not bitwise identical to an uninterrupted run "
              f"(give OMP_NUM_THREADS={saved_threads} for that)", file=sys.stderr)
    t.net.load_state_dict(ckpt["model"])
    load_named_optimizer_state(t.net, t.optimizer, ckpt["optimizer"])
    t.schedule.load_state_dict(ckpt["schedule"])
    set_lr(t.optimizer, t.schedule.lr)
    s = ckpt["progress"]
    t.pos.epoch, t.pos.epoch_step, t.pos.step = s["epoch"], s["epoch_step"], s["step"]
    t.pos.best_top1 = s["best_top1"]
    set_rng_state(ckpt["rng"].get(f"rank{t.ctx.data_rank}", ckpt["rng"]["rank0"]))
    if t.is_main:
        pos = t.pos  # epochs counted from 1, as the progress line counts them
        where = f"the end of epoch {pos.epoch}" if pos.epoch_step == 0 and pos.epoch else \
            f"step {pos.epoch_step} of epoch {pos.epoch + 1}"
        print(f"resumed from {path} at step {pos.step}, {where}", file=sys.stderr)
        changed = changed_settings(ckpt, t.cfg)
        if changed:
            print(f"--resume: the run's settings, changed: {', '.join(changed)}",
                  file=sys.stderr)
        t.metrics.log({"kind": "resume", "step": t.pos.step, "epoch": t.pos.epoch,
                       "from": str(path)})
    new_lr, old_lr = resume_lr, t.schedule.lr
    if new_lr is not None and new_lr != old_lr:
        t.schedule.lr = new_lr
        set_lr(t.optimizer, new_lr)
        if t.is_main:
            print(f"--resume-lr: the learning rate is now {new_lr:g} (the checkpoint's: "
                  f"{old_lr:g})", file=sys.stderr)
            t.metrics.log({"kind": "lr_change", "step": t.pos.step, "epoch": t.pos.epoch,
                           "old": old_lr, "new": new_lr})
