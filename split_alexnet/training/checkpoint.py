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

Written as: temporary file in the same folder (``.last.pt.<random>.<pid>.tmp``), flush,
fsync, rename over the target, fsync the folder. A crash at any point leaves either the old or
the new file, never half of one; a failed write (a full disk) or a second signal leaves the
old one and one line. A checkpoint whose weights, optimizer buffers or statistics are not
finite is never written.

Loaded (:func:`load_checkpoint`) in an order that allocates nothing a file merely declares:
the zip archive's directory first (every record stored, as ``torch.save`` writes them, and
their sizes adding up to no more than the file), then ``torch.load(weights_only=True,
mmap=True)`` (tensors stay in the mapped file), every tensor's shape against what the network
the checkpoint declares needs, the checksum, and finally that every value is finite.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

import split_alexnet.training.distributed as dist_util
from split_alexnet import __version__
from split_alexnet.data.images import SIZE
from split_alexnet.data.stats import Stats
from split_alexnet.network.model import (ARCHS, TOWER_LAYERS, AlexNet, HalfAlexNet, layers_through,
                                         ModelConfig, layout_state_dict)
from split_alexnet.training.config import PROG
from split_alexnet.training.optim import (load_named_optimizer_state, named_optimizer_state,
                                          set_lr)
from split_alexnet.training.runfolder import check_same_run, remove_stale_temps, temp_suffix
from split_alexnet.training.state import Trainer
from split_alexnet.utils.cli import Abort, Interrupted, UsageError
from split_alexnet.utils.fileio import atomic_write

FORMAT = "split_alexnet/checkpoint-v1"

#: The shapes of a checkpoint's training-set statistics (``stats``).
STATS_SHAPES = {"mean": (3, SIZE, SIZE), "eigval": (3,), "eigvec": (3, 3)}


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
    bad = nonfinite(payload)
    if bad:
        raise Abort(f"not writing {path}: {bad} is not finite (NaN or infinity); the previous "
                    "checkpoint is intact")
    payload = dict(payload, format=FORMAT)
    payload["checksum"] = checksum(payload)
    atomic_write(Path(path), lambda f: torch.save(payload, f), suffix=temp_suffix())


def load_checkpoint(path: Path) -> dict:
    """Load with ``weights_only=True`` (never runs code), allocating nothing the file merely
    declares, and check it as the module docstring says: a :class:`CheckpointError` for a
    file that is not a checkpoint of this project, is unsafe, corrupt, or not finite."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    check_archive(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle with code, a foreign or corrupt file
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely "
                              f"(weights_only=True): {_refusal(e)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a split_alexnet checkpoint")
    check_shapes(payload, path)
    if payload.get("checksum") != checksum(payload):
        raise CheckpointError(f"checkpoint {path} is corrupt: checksum mismatch")
    bad = nonfinite(payload)
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite values ({bad}): the weights "
                              "of a diverged run, not usable")
    return payload


def _refusal(e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in words that never suggest
    loading it another way."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text:
        named = re.search(r"GLOBAL ([\w.]+)", text)
        what = (f"it names {named.group(1)}, which no checkpoint of this project holds"
                if named else "it holds more than the tensors, numbers and strings of a "
                              "checkpoint of this project")
        return f"it is not a checkpoint of this project, or it is unsafe: {what}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [type(e).__name__]
    return lines[0][:200]


def check_archive(path: Path) -> None:
    """The file is a zip archive as ``torch.save`` writes it: every record stored, none
    compressed (a compressed record of a few MB can inflate to GBs), and the records' sizes
    adding up to no more than the file. Loading then allocates at most the file's size."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            records = z.infolist()
    except Exception as e:  # not a zip archive, truncated, a broken directory
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely (weights_only=True): "
                              f"it is truncated or not a checkpoint of this project (not a zip "
                              f"archive: {e})") from None
    for r in records:
        if r.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"checkpoint {path} is not a checkpoint of this project: its record "
                f"{r.filename} is compressed ({r.compress_size:,} bytes that would inflate to "
                f"{r.file_size:,}); torch.save never compresses")
    declared = sum(r.file_size for r in records)
    if declared > size:
        raise CheckpointError(f"checkpoint {path} is corrupt: its records declare {declared:,} "
                              f"bytes but the file holds {size:,}")


def _tables(payload: dict) -> dict[str, Any]:
    """The tables of tensors the tools use, by name: "model", "stats" and each optimizer
    buffer ("optimizer velocity"); converted checkpoints have no optimizer."""
    opt = payload.get("optimizer", {})
    buffers = opt.get("buffers", {}) if isinstance(opt, dict) else None
    if not isinstance(buffers, dict):
        return {"model": payload.get("model"), "stats": payload.get("stats"), "optimizer": None}
    return {"model": payload.get("model"), "stats": payload.get("stats"),
            **{f"optimizer {k}": v for k, v in buffers.items()}}


def _declared_network(payload: dict, path: Path | str) -> tuple[str, int]:
    """(arch, classes) of the network a checkpoint declares, as :func:`model_config` reads
    them (the shapes depend on nothing else), with one class name per output."""
    saved = payload.get("model_config")
    if not isinstance(saved, dict):  # written before model_config existed
        flat = payload.get("config")
        saved = {"arch": flat.get("arch", "alexnet") if isinstance(flat, dict) else None,
                 "num_classes": len(payload.get("classes") or [])}
    arch, n = saved.get("arch", "alexnet"), saved.get("num_classes")
    classes = payload.get("classes")
    if arch not in ARCHS or not isinstance(n, int) or isinstance(n, bool) or n < 1 or \
            not isinstance(classes, (list, tuple)) or len(classes) != n:
        raise CheckpointError(f"checkpoint {path} declares no usable network (arch={arch!r}, "
                              f"{n!r} outputs, {len(classes or [])} class names)")
    return arch, n


def frozen_in(payload: dict) -> tuple[str, ...]:
    """The layers a checkpoint's run kept fixed (its --freeze-through layer and those before
    it): they have no optimizer buffers."""
    flat = payload.get("config")
    last = flat.get("freeze_through") if isinstance(flat, dict) else None
    return layers_through(last) if last in TOWER_LAYERS else ()


def check_shapes(payload: dict, path: Path | str) -> None:
    """Every tensor of the weights, the optimizer's buffers and the statistics has the shape
    that the network the checkpoint declares needs, and nothing is missing or extra: a
    :class:`CheckpointError` naming the first tensor that is not."""
    arch, num_classes = _declared_network(payload, path)
    with torch.device("meta"):  # shapes only: nothing is allocated
        net = (HalfAlexNet if arch == "half" else AlexNet)(num_classes, init=None)
    params = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    what = f"arch={arch} with {num_classes} classes"
    frozen = frozen_in(payload)
    for table, tensors in _tables(payload).items():
        want = STATS_SHAPES if table == "stats" else params
        if not isinstance(tensors, dict):
            raise CheckpointError(f"checkpoint {path} has no table of {table} tensors")
        extra = sorted(set(tensors) - set(want)) if table != "stats" else []
        if extra:
            raise CheckpointError(f"checkpoint {path} holds {table} {extra[0]}, which {what} "
                                  "does not have")
        for name, shape in want.items():
            t = tensors.get(name)
            if t is None and table.startswith("optimizer") and name.split(".")[0] in frozen:
                continue  # a frozen parameter has no optimizer state
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = "nothing" if t is None else \
                    f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise CheckpointError(f"checkpoint {path}: {table} {name} is {got}, but {what} "
                                      f"needs shape {shape}")


def nonfinite(payload: dict) -> str | None:
    """The first tensor of the weights, the optimizer's buffers or the statistics that holds
    a NaN or an infinity ("model conv1.weight"), or None."""
    for table, tensors in _tables(payload).items():
        for name, t in (tensors or {}).items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not _finite(t):
                return f"{table} {name}"
    return None


def _finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite. A NaN or an infinity anywhere makes the sum
    non-finite, so a finite sum settles it in one pass without a bool copy (the 61 M
    parameters: 0.014 s against 0.37 s element-wise, one CPU thread); only a non-finite sum,
    which finite values can also give by overflow, is decided element by element."""
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


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
    if epoch_end and t.cfg.keep_last > 0:
        for old in sorted(t.out.glob("epoch_*.pt"))[:-t.cfg.keep_last]:
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


def resume(t: Trainer, spec: str) -> None:
    """--resume: 'auto' loads OUT/last.pt, falling back to the newest good epoch checkpoint
    (with a warning); a path loads that file. A file that cannot be used, or one of another
    run (``runfolder.check_same_run``), is one :class:`UsageError` line."""
    if t.is_main:  # half-written temporaries of a save that was killed (SIGKILL, OOM)
        remove_stale_temps(t.out)
    candidates = [Path(spec)] if spec != "auto" else \
        [t.out / "last.pt"] + sorted(t.out.glob("epoch_*.pt"), reverse=True)
    errors = []
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
            check_resumable(ckpt, path)
            check_compatible(ckpt, arch=t.model_cfg.arch, num_classes=len(t.classes), path=path)
        except CheckpointError as e:
            errors.append(str(e))
            if t.is_main and spec == "auto" and path.exists():
                print(f"{PROG}: warning: {e}; trying the previous checkpoint", file=sys.stderr)
            continue
        check_same_run(ckpt, t.cfg, t.classes, path)
        restore(t, ckpt, path)
        return
    if spec == "auto" and not any(p.exists() for p in candidates):
        raise UsageError(f"--resume: no checkpoint in {t.out} (looked for last.pt and "
                         "epoch_*.pt)")
    raise UsageError(errors[-1] if errors else f"--resume: nothing usable at {spec}")


def check_resumable(ckpt: dict, path: Path) -> None:
    """A checkpoint that --resume can continue: one with training state, not converted
    weights. Else one :class:`UsageError`."""
    if "optimizer" not in ckpt or "progress" not in ckpt:
        what = "converted weights" if "source" in ckpt else "weights"
        raise UsageError(f"--resume: {path} holds {what} without training state (no "
                         f"optimizer, schedule or position); start a run from them with "
                         f"--init-from {path}")


def restore(t: Trainer, ckpt: dict, path: Path) -> None:
    """Put a loaded checkpoint's state into the trainer: weights, optimizer, schedule,
    position and this rank's RNG states; then --resume-lr, recorded as an "lr_change"."""
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
    new_lr, old_lr = t.cfg.resume_lr, t.schedule.lr
    if new_lr is not None and new_lr != old_lr:
        t.schedule.lr = new_lr
        set_lr(t.optimizer, new_lr)
        if t.is_main:
            print(f"--resume-lr: the learning rate is now {new_lr:g} (the checkpoint's: "
                  f"{old_lr:g})", file=sys.stderr)
            t.metrics.log({"kind": "lr_change", "step": t.pos.step, "epoch": t.pos.epoch,
                           "old": old_lr, "new": new_lr})
