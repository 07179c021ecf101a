"""The run folder (--out) holds one run and belongs to one trainer: its lock, the guard
against starting a run over another, the clean-up of temporaries whose writer is gone, and
the settings a resumed run must share with its checkpoint.

* Lock: rank 0 holds an advisory ``fcntl.flock`` on ``OUT/train.lock`` for the whole run; the
  file names the holder (pid and host). A second trainer on the folder, with or without
  --resume, is refused naming that pid. The kernel drops the lock when the holder exits,
  however it exits (SIGKILL included). A forked child (a DataLoader worker) closes its copy
  of the descriptor at fork, so a worker that outlives a killed trainer for a few seconds
  does not keep the folder locked. A ``train.lock`` that is a symbolic link or not a
  regular file is refused before anything is written (``fileio.open_own_file``).
* Fresh start: without --resume, an --out that holds a run (``config.json``,
  ``metrics.jsonl`` or a checkpoint) is refused before any work; with ``--overwrite`` that run
  is deleted once the new one is set up, before its first write (:func:`start_fresh`, which
  then writes the run's ``config.json``).
* Temporaries: every temporary file the trainer writes ends in ``.<pid>.tmp``
  (:func:`temp_suffix`). A --resume deletes those whose writer is no longer alive, and the
  pid-less ``.*.pt.*.tmp`` of older versions (it holds the lock: no trainer writes them).
* Resume's settings: a --resume takes the run's own settings (:func:`saved_settings`:
  ``OUT/config.json``, the settings as last started, or a checkpoint's) and applies the
  flags given over them (:func:`settings_for_resume`): one that defines the run and differs
  is refused naming the flag.
* Same run: every setting that defines the run (its field's metadata ``run``:
  ``training/config.py``) and the class list must equal the checkpoint's
  (:func:`check_same_run`); the others may differ on resume.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import stat
import sys
from pathlib import Path
from typing import Any

from split_alexnet.training.config import FLAGS, PROG, TrainConfig, check_value, flag_name
from split_alexnet.training.recipes import FINETUNE_PRESET, recipe_settings
from split_alexnet.utils.checkpoint_file import (CheckpointError, check_training_state,
                                                 load_checkpoint)
from split_alexnet.utils.cli import Abort, UsageError
from split_alexnet.utils.fileio import check_own_file, open_own_file, write_json

LOCK_NAME = "train.lock"
#: The files that mean an --out holds a run (with ``epoch_NNN.pt``).
RUN_FILES = ("config.json", "metrics.jsonl", "last.pt", "best.pt")
#: An epoch's checkpoint, ``epoch_NNN.pt``: its epoch number, at least 3 digits.
EPOCH_NAME = re.compile(r"epoch_(\d+)\.pt")
#: Drawn from a run's files; ``--overwrite`` deletes it with them.
DERIVED_FILES = ("curves.png",)
#: The files a run writes in place (appends to), besides the lock: never through a link.
APPENDED_FILES = ("metrics.jsonl",)

_HELD: set[int] = set()  # descriptors of the run locks this process holds


def _close_in_child() -> None:
    """After a fork: close the child's copies of the lock descriptors, without unlocking (an
    flock belongs to the open file, which the parent still holds)."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """The advisory lock on ``OUT/train.lock``: :meth:`acquire` or a one-line
    :class:`UsageError` naming the holder; :meth:`release` (or the process's exit) drops it."""

    def __init__(self, out: Path | str) -> None:
        self.path = Path(out) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        out = self.path.parent
        try:
            fd = open_own_file(self.path, os.O_RDWR | os.O_CREAT)
        except OSError as e:
            raise UsageError(f"--out {out}: cannot open {self.path}: {e.strerror or e}") \
                from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
            os.close(fd)
            raise UsageError(f"--out {out} is in use by another trainer ({holder}, which "
                             f"holds {self.path}); wait for it to end, or give another "
                             "--out") from None
        except OSError as e:  # a file system without locks
            os.close(fd)
            print(f"{PROG}: warning: cannot lock {self.path} ({e.strerror or e}); nothing "
                  "stops a second trainer from using this --out", file=sys.stderr)
            return self
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError:  # a full disk: the lock holds all the same, unnamed
            pass
        self.fd = fd
        _HELD.add(fd)
        return self

    def release(self) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.close(self.fd)  # closing the only descriptor drops the lock
            self.fd = None


def check_apart(out: Path, data: str | Path | None, *, demo: bool = False) -> None:
    """Before any work: --out and --data never inside each other (after symbolic links),
    or one :class:`UsageError`. A run folder inside the data would have its files read as
    data (``curves.png`` in ``DATA/train/CLASS`` becomes a training image); data inside the
    run folder mixes what the run owns with what it reads. The one exception is the demo's
    own generated set, ``OUT/demo_data`` with ``--demo``."""
    if not data:
        return
    o, d = Path(out).resolve(), Path(data).resolve()
    if o == d or o.is_relative_to(d):
        raise UsageError(f"--out {out} is inside --data {data}: the run's files would be read "
                         "as data; give an --out outside it")
    if d.is_relative_to(o) and not (demo and d == o / "demo_data"):
        raise UsageError(f"--data {data} is inside --out {out}: a run folder holds only its "
                         "run; give a --data outside it")


def missing_folders(out: Path) -> list[Path]:
    """``out`` and those of its parents that do not exist yet, deepest first: what creating
    it creates, and what :func:`remove_created` removes when the start is refused."""
    missing, p = [], Path(out).absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def remove_created(out: Path, created: list[Path]) -> None:
    """A refused start leaves nothing behind: when it created ``out`` (``created``, from
    :func:`missing_folders`), delete the lock file it made and each created folder left
    empty (call it after the lock is released)."""
    if not created:
        return
    try:
        (Path(out) / LOCK_NAME).unlink(missing_ok=True)
        for d in created:
            d.rmdir()
    except OSError:  # a folder the start filled (the demo's data): it stays
        pass


def epoch_checkpoints(out: Path) -> list[Path]:
    """The run's ``epoch_NNN.pt`` in ``out``, oldest first: ordered by the epoch number in
    the name (``epoch_999.pt`` before ``epoch_1000.pt``), the one order of every listing,
    pruning and fallback. Files that only look alike (``epoch_x.pt``) are not the run's."""
    found = [(int(m.group(1)), p) for p in Path(out).glob("epoch_*.pt")
             if (m := EPOCH_NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def run_files(out: Path) -> list[Path]:
    """The files of a run that ``out`` holds, if any."""
    return [out / n for n in RUN_FILES if (out / n).exists()] + epoch_checkpoints(out)


def claim(out: Path, *, resume: bool, overwrite: bool) -> RunLock:
    """Rank 0, before any work: take the lock; then, unless resuming or overwriting, refuse
    an ``out`` that holds a run. Returns the held lock."""
    lock = RunLock(out).acquire()
    try:
        for name in APPENDED_FILES:
            check_own_file(out / name)
    except UsageError:
        lock.release()
        raise
    found = [] if resume or overwrite else run_files(out)
    if found:
        lock.release()
        how = "continue it with --resume, or start over with --overwrite (deletes it)" \
            if any(p.suffix == ".pt" for p in found) else \
            "it has no checkpoint to continue from: start over with --overwrite (deletes it)"
        raise UsageError(f"--out {out} already holds a run "
                         f"({', '.join(p.name for p in found)}); {how}, or give another --out")
    return lock


def check_overwrite_keeps(out: Path, source: str | Path | None) -> None:
    """--overwrite, before any work: the run it deletes must not hold the checkpoint the new
    run starts from (``--init-from``, after symbolic links), which would be loaded and then
    deleted. Else one :class:`UsageError`."""
    if source is None:
        return
    doomed = {p.resolve() for p in run_files(out) + [out / n for n in DERIVED_FILES]}
    if Path(source).resolve() in doomed:
        raise UsageError(f"--init-from {source} is a file of the run in --out {out}, which "
                         f"--overwrite deletes; copy it out of {out} first, or give another "
                         "--out")


def delete_previous_run(out: Path) -> None:
    """--overwrite, once the new run is set up (so that a typo in another flag deletes
    nothing): delete the run files and curves.png that ``out`` holds, and say so."""
    found = run_files(out)
    for p in found + [out / n for n in DERIVED_FILES]:
        try:
            p.unlink(missing_ok=True)
        except OSError as e:
            raise UsageError(f"--overwrite: cannot delete {p}: {e.strerror or e}") from None
    if found:
        print(f"{PROG}: --overwrite: deleted the previous run in {out} "
              f"({', '.join(p.name for p in found)})", file=sys.stderr)


def start_fresh(out: Path, cfg: TrainConfig, *, overwrite: bool) -> None:
    """A new run, once it is set up: delete the previous one (``overwrite``), then write the
    run's settings, flat, to ``OUT/config.json``."""
    if overwrite:
        delete_previous_run(out)
    write_config(out, cfg)


def write_config(out: Path, cfg: TrainConfig) -> None:
    """``OUT/config.json``: the run's settings as this start uses them, flat (a file
    ``--config`` reads, and what the next ``--resume`` starts from)."""
    try:
        write_json(out / "config.json", cfg.to_dict(), suffix=temp_suffix())
    except OSError as e:
        raise Abort(f"could not write {out / 'config.json'}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------- temporaries


def temp_suffix() -> str:
    """How every temporary file the trainer writes ends: with its pid, so that a later run
    can tell whether the writer is gone."""
    return f".{os.getpid()}.tmp"


def writer_pid(name: str) -> int | None:
    """The pid in a temporary file's name ``.<target>.<random>.<pid>.tmp``, if it has one."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-1] == "tmp" and parts[-2].isdigit() and int(parts[-2]) > 0:
        return int(parts[-2])
    return None


def alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale_temps(out: Path) -> list[Path]:
    """Delete the temporaries in ``out`` whose writer is gone: ``.*.<pid>.tmp`` of a pid
    that is not alive, and the pid-less ``.*.pt.*.tmp`` of older versions. Only regular
    files: a folder or a link named like one is not a temporary of the trainer's, and stays.
    Call it holding the lock. Returns the deleted files."""
    gone = []
    for p in sorted(Path(out).glob(".*.tmp")):
        if not stat.S_ISREG(p.lstat().st_mode):
            continue
        pid = writer_pid(p.name)
        if (".pt." in p.name if pid is None else pid != os.getpid() and not alive(pid)):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


# ----------------------------------------------------------------------------- the same run


def _show(value: Any) -> str:
    if value is None:  # an optional setting left out (--freeze-through, --init-from)
        return "not set"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_differences(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """Each setting that defines the run in which ``cfg`` differs from a checkpoint's flat
    settings (its ``config`` and ``model_config``): ``--lr 0.02 (the run: 0.01)``. A setting
    the checkpoint lacks counts as a difference."""
    return [f"{flag_name(k)} {_show(v)} (the run: {_show(saved.get(k, '(none)'))})"
            for k, v in cfg.run_settings().items() if k not in saved or saved[k] != v]


def class_difference(saved: list[str], classes: list[str]) -> str | None:
    """How the data's class list (names in label order) differs from the run's, if it does."""
    if saved == classes:
        return None
    i = next((i for i, (a, b) in enumerate(zip(saved, classes)) if a != b),
             min(len(saved), len(classes)))
    have = repr(classes[i]) if i < len(classes) else "missing"
    had = repr(saved[i]) if i < len(saved) else "missing"
    return f"the classes (label {i} is {have} in the data, {had} in the run)"


def _table(ckpt: dict, key: str) -> dict:
    value = ckpt.get(key)
    return value if isinstance(value, dict) else {}


def check_same_run(ckpt: dict, cfg: TrainConfig, classes: list[str], path: Path) -> None:
    """A resume continues the checkpoint's run: every setting that defines the run, and the
    classes in their order, must be the checkpoint's. Otherwise one :class:`UsageError`
    listing each difference."""
    saved = {**_table(ckpt, "config"), **_table(ckpt, "model_config")}
    diffs = run_differences(saved, cfg)
    classes_differ = class_difference(list(ckpt.get("classes", [])), classes)
    if classes_differ:
        diffs.append(classes_differ)
    if diffs:
        lr_hint = "; to change the learning rate give --resume-lr LR" \
            if any(d.startswith("--lr ") for d in diffs) else ""
        raise UsageError(f"--resume: {path} holds another run: {', '.join(diffs)}; leave "
                         f"these flags out (--resume takes the run's settings){lr_hint}")


def check_resumable(ckpt: dict, path: Path) -> None:
    """A checkpoint that --resume can continue: one with training state, not converted
    weights. Else one :class:`UsageError`."""
    if "optimizer" not in ckpt or "progress" not in ckpt:
        what = "converted weights" if "source" in ckpt else "weights"
        raise UsageError(f"--resume: {path} holds {what} without training state (no "
                         f"optimizer, schedule or position); start a run from them with "
                         f"--init-from {path}")


# ----------------------------------------------------------------------------- resume's settings

#: Where the towers run: given on resume, these replace the run's as a group (a run on --gpus
#: resumed with --devices cpu,cpu is not a run with both).
DEVICE_SETTINGS = ("gpus", "devices", "single_device")


def _read_config_json(path: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # a damaged config.json: the checkpoints hold the settings too
    return raw if isinstance(raw, dict) else None


def saved_settings(out: Path, spec: str) -> tuple[dict[str, Any], Path]:
    """The flat settings of the run that ``--resume spec`` continues, and the file they come
    from: for 'auto', ``OUT/config.json`` (the run's settings as last started), or without
    a readable one the newest checkpoint that loads; for a path, that checkpoint's
    ``config`` and ``model_config``. Nothing to read is one :class:`UsageError`."""
    if spec == "auto":
        found = _read_config_json(out / "config.json")
        if found is not None:
            return found, out / "config.json"
        candidates = [out / "last.pt"] + sorted(out.glob("epoch_*.pt"), reverse=True)
        candidates = [p for p in candidates if p.exists()]
        if not candidates:
            raise UsageError(f"--resume: no checkpoint in {out} (looked for last.pt and "
                             "epoch_*.pt)")
    else:
        candidates = [Path(spec)]
    error = ""
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
            check_resumable(ckpt, path)
            check_training_state(ckpt, path)  # every field, before the settings are read
        except CheckpointError as e:
            error = str(e)
            continue
        return {**_table(ckpt, "config"), **_table(ckpt, "model_config")}, path
    raise UsageError(error)


def settings_for_resume(saved: dict[str, Any], given: dict[str, Any], where: Path) \
        -> dict[str, Any]:
    """A resume's flat settings: the run's (``saved``, read from ``where``) with the settings
    ``given`` (TOML file, command line) applied over them. A given setting that defines the
    run (metadata ``run``) and differs from the run's is one :class:`UsageError` naming every
    such flag."""
    run = {k: v for k, v in saved.items() if k in FLAGS}
    # --max-steps is where one invocation stops (a smoke run, a cut): a resume runs on to
    # --epochs unless given one again; a recipe's own limit (bvlc's max_iter) stays.
    run["max_steps"] = recipe_settings(str(run.get("recipe", "paper"))).get("max_steps")
    if any(k in given for k in DEVICE_SETTINGS):
        for k in DEVICE_SETTINGS:
            run.pop(k, None)
    try:
        now = TrainConfig.from_flat(run).to_dict()
    except UsageError as e:
        raise UsageError(f"--resume: the settings in {where} are not usable: {e}") from None
    refused = []
    for k, v in given.items():
        v = check_value(k, v)
        if v != now[k] and FLAGS[k][1].metadata.get("run", True):
            refused.append((k, f"{flag_name(k)} {_show(v)} (the run: {_show(now[k])})"))
    if refused:
        names = [k for k, _ in refused]
        lr_hint = "; to change the learning rate give --resume-lr LR" if "lr" in names else ""
        tuned = ""
        if now.get("init_from") is not None and set(names) & set(FINETUNE_PRESET):
            tuned = ("; the run is fine-tuned: --resume keeps the values its --finetune and "
                     "flags set, give none of them again")
        raise UsageError(f"--resume: {', '.join(i for _, i in refused)}: these settings "
                         f"define the run in {where.parent} and cannot change on resume; "
                         f"leave them out (--resume takes the run's own){lr_hint}{tuned}")
    return {**now, **given}


def changed_settings(ckpt: dict, cfg: TrainConfig) -> list[str]:
    """The settings a resume changes (those a resume may change), against the checkpoint's:
    ``--epochs 20 (the run: 14)``."""
    saved = {**_table(ckpt, "config"), **_table(ckpt, "model_config")}
    return [f"{flag_name(k)} {_show(v)} (the run: {_show(saved[k])})"
            for k, v in cfg.to_dict().items()
            if k in saved and saved[k] != v and not FLAGS[k][1].metadata.get("run", True)]
