"""Checkpoints that survive anything: atomic writes, a checksum, ``weights_only=True`` loads.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (nothing that
needs pickle's code execution), saved with ``torch.save``:

    model        layout-independent state (the collapsed layout's keys and shapes)
    optimizer    buffers keyed by parameter name, layout-independent (optim.py)
    schedule     the learning-rate schedule's state
    epoch, step  where training stands (step counts optimizer steps in total;
                 epoch_step is the position inside the epoch, for mid-epoch resume)
    rng          every random state that training draws from (CPU, each CUDA device)
    config       the full training config (a dict), classes, stats fingerprint, code version
    checksum     sha256 over every tensor's bytes and every value, recorded at save time

Written as: temporary file in the same folder, flush, fsync, rename over the target, fsync
the folder. A crash at any point leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

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
    import shutil
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


def check_compatible(payload: dict, *, arch: str, num_classes: int, path: Path | str) -> None:
    """A checkpoint of another architecture or class count: one error naming both."""
    have = (payload["config"].get("arch", "alexnet"), len(payload.get("classes", [])))
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
