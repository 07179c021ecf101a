"""The checkpoint file format: what a checkpoint file holds, written atomically with a
checksum and read back safely and checked. Every tool and the trainer read and write
checkpoints with it, and it imports no training code (``training/checkpoint.py`` builds a
run's checkpoints on it).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (nothing that
needs pickle's code execution), saved with ``torch.save``. Every checkpoint holds:

    format       :data:`FORMAT`
    model        layout-independent state (the collapsed layout's keys and shapes)
    model_config the network (``ModelConfig`` as a dict, num_classes included): the tools
                 rebuild the model from it (:func:`model_config`); a file without it is refused
    classes      the class folder names (wnids), in label order; class_names, class_metadata
    stats        the training set's mean image and colour statistics (:data:`STATS_SHAPES`),
                 stats_fingerprint their fingerprint (:func:`checkpoint_stats`)
    code_version, torch_version   what wrote it (:func:`code_version`)
    checksum     recorded at save time (:func:`checksum`): a sha256 over every key and value,
                 where a tensor stands for its dtype, its shape and the CRC-32 of its bytes

A training run's checkpoint adds its training state (optimizer buffers, schedule, progress,
RNG states, the flat ``config``: ``training/checkpoint.py``); converted weights add
``source`` (``tools/convert.py``).

Written (:func:`save_checkpoint`) as: temporary file in the same folder, flush, fsync, drop
its pages from the page cache (``fileio.atomic_write``'s ``uncached``), rename over the
target, fsync the folder. The zip records carry no CRC-32 where torch allows it
(2.6 and later): the checksum covers every byte already, torch.load does not verify the CRC,
and computing it took most of a save's time (:func:`_torch_save`); ``unzip -t`` therefore
reports the records as damaged. A crash at any point leaves either the old or the new
file, never half of one; a failed write (a full disk) leaves the old one. A checkpoint whose
weights, optimizer buffers or statistics are not finite is never written.

Loaded (:func:`load_checkpoint`) in an order that allocates nothing a file merely declares:
the zip archive's directory first (every record stored, as ``torch.save`` writes them, and
their sizes adding up to no more than the file), then ``torch.load(weights_only=True,
mmap=True)`` (tensors stay in the mapped file), every tensor's shape against what the network
the checkpoint declares needs, the checksum, and finally that every value is finite.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import re
import subprocess
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from split_alexnet import __version__
from split_alexnet.data.images import SIZE
from split_alexnet.data.stats import Stats
from split_alexnet.network.model import (ARCHS, TOWER_LAYERS, AlexNet, HalfAlexNet, ModelConfig,
                                         layers_through)
from split_alexnet.utils.cli import Abort
from split_alexnet.utils.fileio import atomic_write

#: Version 2: the checksum reads a tensor's bytes through CRC-32 (:func:`checksum`); version 1
#: hashed them with sha256, twice as slow.
FORMAT = "split_alexnet/checkpoint-v2"

#: The shapes of a checkpoint's training-set statistics (``stats``).
STATS_SHAPES = {"mean": (3, SIZE, SIZE), "eigval": (3,), "eigvec": (3, 3)}


class CheckpointError(Exception):
    """A checkpoint file that cannot be used (missing, truncated, corrupt, foreign)."""


def _digest(obj: Any, h: "hashlib._Hash", crcs: dict[int, int] | None) -> None:
    if isinstance(obj, torch.Tensor):
        crc = None if crcs is None else crcs.get(id(obj))
        if crc is None:
            t = obj.detach().cpu().contiguous()  # the raw bytes, no copy of a CPU tensor
            crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else 0
            if crcs is not None:
                crcs[id(obj)] = crc
        h.update(f"T{obj.dtype}{tuple(obj.shape)}:{crc:08x}".encode())
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _digest(obj[k], h, crcs)
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for v in obj:
            _digest(v, h, crcs)
    else:
        h.update(repr(obj).encode())


def checksum(payload: dict, crcs: dict[int, int] | None = None) -> str:
    """A sha256 (hex) over every key and value of ``payload`` but "checksum", in key order;
    a tensor enters as its dtype, its shape and the CRC-32 of its bytes. CRC-32 catches what
    the checksum is for, a file changed by accident (every burst of up to 32 flipped bits,
    and other damage but for a chance of 2**-32), at twice sha256's speed on this project's
    machines (docs/benchmarks.md); a deliberate edit defeats any checksum stored in the file
    itself. ``crcs`` (by ``id`` of the tensor, for tensors alive for its whole use) keeps the
    CRCs of one save for the next: best.pt's weights are last.pt's."""
    h = hashlib.sha256()
    _digest({k: v for k, v in payload.items() if k != "checksum"}, h, crcs)
    return h.hexdigest()


try:  # torch >= 2.6: torch.save's settings
    from torch.utils.serialization import config as _serialization_config
except ImportError:
    _serialization_config = None


class _SaveStream:
    """The file as ``torch.save`` writes to it, until the save ends: after that its writes go
    nowhere. torch's zip writer completes its archive when it is destroyed, if ``torch.save``
    did not get to it; an exception raised between the writer's creation and torch.save's
    ``with`` (a second signal's, whose handler raises wherever Python next checks) keeps the
    writer alive in its traceback until after the file is closed, and that late write would
    raise inside a C++ destructor and abort the process (exit -6 instead of the one line)."""

    def __init__(self, f) -> None:
        self.write, self.flush, self.seek = f.write, f.flush, f.seek  # no call in between

    def end(self) -> None:
        """Every later write is dropped (the file is complete, or abandoned)."""
        self.write, self.flush, self.seek = len, _nothing, _nothing


def _nothing(*args) -> None:
    """The writes, flushes and seeks of a save that has ended."""


def _torch_save(payload: dict, f) -> None:
    """``torch.save`` into ``f`` through a :class:`_SaveStream`, without the zip records'
    CRC-32 where torch has the switch (``torch.utils.serialization.config.save.compute_crc32``,
    torch 2.6 and later): a training checkpoint's 465 MiB of tensors in 0.40 s instead of
    0.81 s (docs/benchmarks.md)."""
    stream = _SaveStream(f)
    save = getattr(_serialization_config, "save", None)
    crc = save is not None and hasattr(save, "compute_crc32")
    before = save.compute_crc32 if crc else None
    try:
        if crc:
            save.compute_crc32 = False
        torch.save(payload, stream)
    finally:
        stream.end()
        if crc:
            save.compute_crc32 = before


def save_checkpoint(path: Path, payload: dict, *, suffix: str = ".tmp",
                    crcs: dict[int, int] | None = None) -> None:
    """Checksum, then stream into a temporary file and rename: a failure (disk full) never
    touches the previous checkpoint. ``suffix`` ends the temporary file's name (the trainer's
    name its writer: ``runfolder.temp_suffix``); ``crcs``: :func:`checksum`'s."""
    bad = nonfinite(payload)
    if bad:
        raise Abort(f"not writing {path}: {bad} is not finite (NaN or infinity); the previous "
                    "checkpoint is intact")
    payload = dict(payload, format=FORMAT)
    payload["checksum"] = checksum(payload, crcs)
    atomic_write(Path(path), lambda f: _torch_save(payload, f), suffix=suffix, uncached=True)


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
        found = payload.get("format") if isinstance(payload, dict) else None
        raise CheckpointError(other_version(found, path, FORMAT, "checkpoint") or
                              f"{path} is not a split_alexnet checkpoint")
    check_shapes(payload, path)
    if payload.get("checksum") != checksum(payload):
        raise CheckpointError(f"checkpoint {path} is corrupt: checksum mismatch")
    bad = nonfinite(payload)
    if bad:
        raise CheckpointError(f"checkpoint {path} holds non-finite values ({bad}): the weights "
                              "of a diverged run, not usable")
    return payload


def other_version(found: Any, path: Path | str, current: str, kind: str) -> str | None:
    """Why a file of format ``found`` is refused, if ``found`` is another version of this
    project's format ``current`` (both named); None if it is not this project's at all."""
    family = current.rsplit("-v", 1)[0] + "-v"
    if isinstance(found, str) and found.startswith(family):
        return (f"{path} is a split_alexnet {kind} of format {found!r}, which this version does "
                f"not read (it reads {current!r}); write it again with this version")
    return None


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


def _saved_model_config(payload: dict, path: Path | str | None = None) -> dict:
    """The checkpoint's ``model_config`` dict; a :class:`CheckpointError` if it has none."""
    saved = payload.get("model_config")
    if not isinstance(saved, dict):
        what = "the checkpoint" if path is None else f"checkpoint {path}"
        raise CheckpointError(f"{what} has no model_config: it does not say which network it "
                              "holds")
    return saved


def _declared_network(payload: dict, path: Path | str) -> tuple[str, int]:
    """(arch, classes) of the network a checkpoint declares, as :func:`model_config` reads
    them (the shapes depend on nothing else), with one class name per output."""
    saved = _saved_model_config(payload, path)
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
    """The network a checkpoint holds: its ``model_config`` (a :class:`CheckpointError` if it
    has none or it does not make a ``ModelConfig``)."""
    try:
        return ModelConfig(**_saved_model_config(payload))
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


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


# ----------------------------------------------------------------------------- training state


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _rate(v) -> bool:  # an error rate, or inf before the first evaluation
    return isinstance(v, (int, float)) and not isinstance(v, bool) and \
        (0 <= v <= 1 or v == float("inf"))


#: The training state's fields: (table, key) -> (what it must be, the check). A check of
#: None (the table itself) needs a dict.
_FIELDS = {
    ("progress", "epoch"): ("a count (an integer >= 0)", _count),
    ("progress", "step"): ("a count (an integer >= 0)", _count),
    ("progress", "epoch_step"): ("a count (an integer >= 0)", _count),
    ("progress", "best_top1"): ("an error rate in [0, 1] (or inf)", _rate),
    ("schedule", "lr"): ("a finite number > 0", lambda v: isinstance(v, (int, float)) and
                         not isinstance(v, bool) and 0 < v < float("inf")),
    ("schedule", "best"): ("an error rate in [0, 1] (or inf)", _rate),
    ("schedule", "bad_epochs"): ("a count (an integer >= 0)", _count),
    ("schedule", "drops"): ("a count (an integer >= 0)", _count),
    ("schedule", "epochs"): ("a count (an integer >= 0)", _count),
}


def check_training_state(ckpt: dict, path: Path) -> None:
    """Every field of a run's training state before any of it is used: ``progress``,
    ``schedule``, ``rng`` (per rank, uint8 generator states), the optimizer's groups and the
    flat ``config``. A :class:`CheckpointError`, ``checkpoint P: FIELD is ...``, for the first
    field that is missing or of another type, shape or range."""
    def bad(field: str, what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {field} is missing or not {what}")
    for table in ("progress", "schedule", "rng", "config", "optimizer"):
        if not isinstance(ckpt.get(table), dict):
            raise bad(table, "a table (dict)")
    for (table, key), (what, ok) in _FIELDS.items():
        if key not in ckpt[table] or not ok(ckpt[table][key]):
            raise bad(f"{table}.{key}", what)
    if "epochs_at_rate" in ckpt["schedule"] and not _count(ckpt["schedule"]["epochs_at_rate"]):
        raise bad("schedule.epochs_at_rate", "a count (an integer >= 0)")
    cpu_state = torch.get_rng_state().shape
    if "rank0" not in ckpt["rng"]:
        raise bad("rng.rank0", "a table of random states")
    for rank, states in ckpt["rng"].items():
        if not isinstance(states, dict) or "cpu" not in states:
            raise bad(f"rng.{rank}", "a table of random states with 'cpu'")
        for dev, st in states.items():
            if not (isinstance(st, torch.Tensor) and st.dtype == torch.uint8 and st.dim() == 1
                    and (dev != "cpu" or st.shape == cpu_state)):
                raise bad(f"rng.{rank}.{dev}", "a generator state (a 1-D uint8 tensor"
                          + (f" of {cpu_state[0]} bytes)" if dev == "cpu" else ")"))
    groups = ckpt["optimizer"].get("groups")
    simple = (int, float, bool, str, type(None))
    if not isinstance(groups, list) or not all(
            isinstance(g, dict) and "params" not in g and all(
                isinstance(v, simple) or (isinstance(v, (list, tuple)) and
                                          all(isinstance(x, simple) for x in v))
                for v in g.values()) for g in groups):
        raise bad("optimizer.groups", "a list of hyper-parameter tables")
