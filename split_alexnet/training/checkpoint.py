"""Checkpoints: what a training run saves and resumes from (:func:`payload`, :func:`save`,
:func:`resume`), in files that survive anything: atomic writes, a checksum,
``weights_only=True`` loads.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (nothing that
needs pickle's code execution), saved with ``torch.save``:

    model        layout-independent state (the collapsed layout's keys and shapes)
    optimizer    buffers keyed by parameter name, layout-independent (optim.py)
    schedule     the learning-rate schedule's state
    epoch, step  where training stands (step counts optimizer steps in total;
                 epoch_step is the position inside the epoch, for mid-epoch resume)
    rng          every random state that training draws from (CPU, each CUDA device)
    config       the full training config (a flat dict of every setting), classes, class
                 names, stats and their fingerprint, code and torch versions
    model_config the network (``ModelConfig`` as a dict, num_classes included): the tools
                 rebuild the model from it (:func:`model_config`)
    checksum     sha256 over every tensor's bytes and every value, recorded at save time

Written as: temporary file in the same folder, flush, fsync, rename over the target, fsync
the folder. A crash at any point leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import split_alexnet.training.distributed as dist_util
from split_alexnet import __version__
from split_alexnet.data.stats import Stats
from split_alexnet.network.model import ModelConfig, layout_state_dict
from split_alexnet.training.config import FINE_TUNING_FLAGS, PROG, TrainConfig, flag_name
from split_alexnet.training.optim import (load_named_optimizer_state, named_optimizer_state,
                                          set_lr)
from split_alexnet.training.state import Trainer
from split_alexnet.utils.cli import Abort, UsageError
from split_alexnet.utils.fileio import atomic_write

FORMAT = "split_alexnet/checkpoint-v1"


class CheckpointError(Exception):
    """A checkpoint file that cannot be used (missing, truncated, corrupt, foreign)."""


def _digest(obj: Any, h: "hashlib._Hash") -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, no copy
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for v in obj:
            _digest(v, h)
    else:
        h.update(repr(obj).encode())


def checksum(payload: dict) -> str:
    h = hashlib.sha256()
    _digest({k: v for k, v in payload.items() if k != "checksum"}, h)
    return h.hexdigest()


def copy_atomic(src: Path, dst: Path) -> None:
    """Make ``dst`` hold ``src``'s bytes, atomically: a hard link where the filesystem allows
    (no second write of hundreds of MB; replacing ``src`` later leaves ``dst`` alone), else a
    copy; either way via a temporary name and a rename."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)


def save_checkpoint(path: Path, payload: dict) -> None:
    """Checksum, then stream into a temporary file and rename: a failure (disk full) never
    touches the previous checkpoint."""
    payload = dict(payload, format=FORMAT)
    payload["checksum"] = checksum(payload)
    atomic_write(Path(path), lambda f: torch.save(payload, f))


def load_checkpoint(path: Path) -> dict:
    """Load with ``weights_only=True`` (never runs code) and verify the checksum."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code, plain garbage
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        why = next((ln for ln in lines if "WeightsUnpickler error" in ln), lines[0])
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely "
                              f"(weights_only=True): {why[:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a split_alexnet checkpoint")
    if payload.get("checksum") != checksum(payload):
        raise CheckpointError(f"checkpoint {path} is corrupt: checksum mismatch")
    return payload


def model_config(payload: dict) -> ModelConfig:
    """The network a checkpoint holds: its ``model_config``, or for a checkpoint written
    before that key existed, the same fields of its flat ``config`` and its class count."""
    saved = payload.get("model_config")
    if saved is None:
        flat = payload.get("config", {})
        saved = {f.name: flat[f.name] for f in dataclasses.fields(ModelConfig) if f.name in flat}
        saved["num_classes"] = len(payload.get("classes", []))
    try:
        return ModelConfig(**saved)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's model configuration is not usable: {e}") \
            from None


def checkpoint_stats(payload: dict) -> Stats:
    """The training set's mean image and colour statistics stored in a checkpoint."""
    st = payload["stats"]
    return Stats(mean=st["mean"], eigval=st["eigval"], eigvec=st["eigvec"],
                 fingerprint=str(payload.get("stats_fingerprint", "")),
                 classes=list(payload["classes"]))


def check_compatible(payload: dict, *, arch: str, num_classes: int, path: Path | str) -> None:
    """A checkpoint of another architecture or class count: one error naming both."""
    have = (model_config(payload).arch, len(payload.get("classes", [])))
    want = (arch, num_classes)
    if have != want:
        raise CheckpointError(
            f"checkpoint {path} holds arch={have[0]} with {have[1]} classes, but this run "
            f"needs arch={want[0]} with {want[1]} classes")


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


# ----------------------------------------------------------------------------- a training run


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def payload(t: Trainer) -> dict:
    """Everything a run needs to continue exactly (see the module docstring). Every rank
    must call it: the RNG states of all ranks are gathered."""
    pos = t.pos
    rngs = dist_util.gather_objects(rng_state(t.devices), t.ctx)
    return {
        "model": layout_state_dict(t.net),
        "optimizer": named_optimizer_state(t.net, t.optimizer),
        "schedule": t.schedule.state_dict(),
        "progress": {"epoch": pos.epoch, "epoch_step": pos.epoch_step, "step": pos.step,
                     "best_top1": pos.best_top1},
        "rng": {f"rank{r}": v for r, v in enumerate(rngs)},
        "data_rng": "derived from (seed, epoch, index); sampler position = epoch_step",
        "config": t.cfg.to_dict(),
        "model_config": dataclasses.asdict(t.model_cfg),
        "layout": t.cfg.layout,
        "classes": t.classes,
        "class_names": [c["name"] for c in t.class_meta],
        "class_metadata": t.class_meta,
        "stats_fingerprint": t.stats.fingerprint,
        "stats": {"mean": t.stats.mean, "eigval": t.stats.eigval, "eigvec": t.stats.eigvec},
        "world_size": t.ctx.world_size,
        "code_version": code_version(),
        "torch_version": str(torch.__version__),
    }


def save(t: Trainer, *, epoch_end: bool = False, best: bool = False) -> None:
    """OUT/last.pt, and at an epoch's end OUT/epoch_NNN.pt (the last --keep-last of them) and,
    for a new best validation error, OUT/best.pt. Every rank calls it; rank 0 writes."""
    data = payload(t)  # every rank joins the RNG gather
    if not t.is_main:
        return
    extra = ([f"epoch_{t.pos.epoch:03d}.pt"] if epoch_end else []) + \
        (["best.pt"] if best else [])
    target = t.out / "last.pt"
    try:
        save_checkpoint(target, data)
        for name in extra:  # the same bytes: link (or copy) last.pt, then rename atomically
            copy_atomic(target, t.out / name)
    except OSError as e:
        raise Abort(f"could not write checkpoint in {t.out}: {e.strerror or e}; the "
                    "previous checkpoint is intact, stopping") from None
    if epoch_end and t.cfg.keep_last > 0:
        for old in sorted(t.out.glob("epoch_*.pt"))[:-t.cfg.keep_last]:
            old.unlink(missing_ok=True)
    t.pos.last_save = time.monotonic()


def last_checkpoint_name(out: Path) -> str:
    last = out / "last.pt"
    return str(last) if last.exists() else "none yet"


def resume(t: Trainer, spec: str) -> None:
    """--resume: 'auto' loads OUT/last.pt, falling back to the newest good epoch checkpoint
    (with a warning); a path loads that file. A file that cannot be used is one
    :class:`UsageError` line."""
    if t.is_main:  # half-written temporaries of a save that was killed (SIGKILL, OOM)
        for tmp in t.out.glob(".*.pt.*.tmp"):
            tmp.unlink(missing_ok=True)
    candidates = [Path(spec)] if spec != "auto" else \
        [t.out / "last.pt"] + sorted(t.out.glob("epoch_*.pt"), reverse=True)
    errors = []
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
            check_resumable(ckpt, t.cfg, path)
            check_compatible(ckpt, arch=t.model_cfg.arch, num_classes=len(t.classes), path=path)
        except CheckpointError as e:
            errors.append(str(e))
            if t.is_main and spec == "auto" and path.exists():
                print(f"{PROG}: warning: {e}; trying the previous checkpoint", file=sys.stderr)
            continue
        restore(t, ckpt, path)
        return
    if spec == "auto" and not any(p.exists() for p in candidates):
        raise UsageError(f"--resume: no checkpoint in {t.out} (looked for last.pt and "
                         "epoch_*.pt)")
    raise UsageError(errors[-1] if errors else f"--resume: nothing usable at {spec}")


def check_resumable(ckpt: dict, cfg: TrainConfig, path: Path) -> None:
    """A checkpoint that --resume can continue: one with training state (not converted
    weights), written with this run's fine-tuning settings. Else one :class:`UsageError`."""
    if "optimizer" not in ckpt or "progress" not in ckpt:
        what = "converted weights" if "source" in ckpt else "weights"
        raise UsageError(f"--resume: {path} holds {what} without training state (no "
                         f"optimizer, schedule or position); start a run from them with "
                         f"--init-from {path}")
    saved, default = ckpt.get("config", {}), TrainConfig().to_dict()
    for name in FINE_TUNING_FLAGS:
        was, now = saved.get(name, default[name]), getattr(cfg, name)
        # --init-from is not read again: only whether the run had one must agree
        same = (was is None) == (now is None) if name == "init_from" else was == now
        if not same:
            raise UsageError(f"--resume: {path} was written with {flag_name(name)} "
                             f"{'unset' if was is None else was}, this run has "
                             f"{'it unset' if now is None else now}: give the run's "
                             "fine-tuning flags again")


def restore(t: Trainer, ckpt: dict, path: Path) -> None:
    """Put a loaded checkpoint's state into the trainer: weights, optimizer, schedule,
    position and this rank's RNG states."""
    if ckpt.get("stats_fingerprint") != t.stats.fingerprint and t.is_main:
        print(f"{PROG}: warning: the dataset changed since {path} was written "
              "(statistics fingerprint differs)", file=sys.stderr)
    t.net.load_state_dict(ckpt["model"])
    load_named_optimizer_state(t.net, t.optimizer, ckpt["optimizer"])
    t.schedule.load_state_dict(ckpt["schedule"])
    set_lr(t.optimizer, t.schedule.lr)
    s = ckpt["progress"]
    t.pos.epoch, t.pos.epoch_step, t.pos.step = s["epoch"], s["epoch_step"], s["step"]
    t.pos.best_top1 = s["best_top1"]
    set_rng_state(ckpt["rng"].get(f"rank{t.ctx.rank}", ckpt["rng"]["rank0"]))
    if t.is_main:
        print(f"resumed from {path}: epoch {t.pos.epoch}, step {t.pos.step} "
              f"(step {t.pos.epoch_step} of the epoch)", file=sys.stderr)
        t.metrics.log({"kind": "resume", "step": t.pos.step, "epoch": t.pos.epoch,
                       "from": str(path)})
