"""The paper's offline step (section 2): every image -> central 256x256 patch, as JPEG.

``python -m split_alexnet.prepare SRC DST [--workers N] [--quality 90] [--classes N|FILE]
[--per-class M] [--val-per-class K] [--seed S]``

* SRC is one of (:func:`split_alexnet.data.imagenet.detect_layout`, which says what it found):
  the official ImageNet archives (streamed, not extracted), Kaggle's ``ILSVRC/Data/CLS-LOC``
  with its CSVs, ``train/<wnid>/`` + a flat ``val/`` with a label file, or class folders;
* reads ``SRC/train/<class>/...`` and ``SRC/val/<class>/...`` (any image format Pillow reads,
  nested folders allowed; or the equivalent from the other layouts), rescales the shorter
  side to 256 and keeps the central 256x256 patch (:func:`split_alexnet.data.images.load_rgb`,
  Pillow only, so the output depends on Pillow alone), and writes it as a JPEG to the mirror
  path under ``DST`` (``.jpg``/``.jpeg`` names are kept, other names get their suffix replaced
  by ``.jpg``: :func:`split_alexnet.data.prepare_tasks.out_name`);
* parallel (``--workers``, default: all cores), with a progress line on stderr; the worker
  tasks (:mod:`split_alexnet.data.prepare_tasks`) are a chunk of files, a chunk of validation
  images read at their offsets in the val tar, or one class tar streamed out of the train tar;
* resumable: each output is written to a hidden temp file (name ending in ``TMP_MARK``) and
  renamed into place (:func:`split_alexnet.utils.fileio.atomic_write`), existing outputs are
  skipped, and stray temp files of an interrupted run are removed;
* unreadable inputs are skipped and listed in ``DST/prepare_report.txt`` (and counted);
* ``DST/classes.json`` (wnid, index, name: :func:`split_alexnet.data.imagenet.read_class_metadata`)
  and ``DST/subset.json`` (the subset taken: :mod:`split_alexnet.data.subset`; a DST prepared
  with another subset is refused);
* finally the training statistics are computed into ``DST/stats.npz``
  (:func:`split_alexnet.data.stats.load_stats`), with the layout and subset added as metadata;
* guarded (docs/reliability.md, "Data, prepare and statistics"): bad flags, a DST that is not
  a writable folder or lies inside SRC, and unsafe archive members are refused before any
  work (one line, exit 2); a failed write (full disk) is one line and exit 1, what is written
  kept; SIGTERM/SIGINT stop it within one task (:mod:`split_alexnet.data.pool`), one line,
  exit 0, and a rerun continues.

Run it once at a time per DST. The output for a given input is deterministic (same Pillow),
so a resumed run gives a byte-identical tree.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

import split_alexnet.data.imagenet as inet
from split_alexnet.data.dataset import check_dataset_root, find_classes, list_samples
from split_alexnet.data.images import list_images, pixel_limit, report_skipped
from split_alexnet.data.pool import WorkerPool
from split_alexnet.data.prepare_tasks import (TMP_MARK, files_task, out_name, train_class_task,
                                             val_chunk_task)
from split_alexnet.data.stats import load_stats, save_stats
from split_alexnet.data.subset import (SUBSET_FILE, Subset, parse_classes_arg, pick,
                                      select_classes, split_val)
from split_alexnet.utils.cli import Abort, Interrupted, Parser, UsageError, run
from split_alexnet.utils.fileio import (atomic_write, check_output_dir, make_output_dir,
                                        write_json)
from split_alexnet.utils.progress import Progress
from split_alexnet.utils.signals import StopOnSignal

__all__ = ["TMP_MARK", "REPORT", "plan", "prepare", "main", "cli"]

REPORT = "prepare_report.txt"
SPLITS = ("train", "val")
KEPT = "what is prepared so far is kept: free some space and rerun the same command to continue"


def plan(src: Path, dst: Path) -> list[tuple[str, str]]:
    """``[(input path, output path)]`` for every image under SRC/train and SRC/val."""
    check_dataset_root(src)
    classes = find_classes(src / "train")
    jobs: list[tuple[str, str]] = []
    seen: dict[Path, Path] = {}
    for split in SPLITS:
        samples = list_samples(src / split, classes)
        for p, _ in samples:
            rel = Path(p).relative_to(src)
            out = out_name(rel)
            if out in seen:  # e.g. a.png and a.gif: keep the whole name
                out = rel.with_name(rel.name + ".jpg")
            seen[out] = rel
            jobs.append((p, str(dst / out)))
    return jobs


# ----------------------------------------------------------------------------- running the tasks

class _Runner(WorkerPool):
    """The :class:`split_alexnet.data.pool.WorkerPool` of ``workers`` processes that runs the
    worker tasks (none for 0 workers or a single task; they stop with ``stop``), summing their
    results into ``tally``."""

    def __init__(self, workers: int, stop: StopOnSignal) -> None:
        super().__init__(workers, stop)
        self.tally = {"images": 0, "existing": 0, "todo": 0, "failures": []}

    def add(self, res: dict) -> int:
        """Count one task's result (UsageError for a task that could not read its archive,
        Abort for one that could not write); returns the number of images it converted or
        found unreadable."""
        if res["error"]:
            raise UsageError(res["error"])
        if res["write_error"]:
            raise Abort(f"{res['write_error']}; {KEPT}")
        self.tally["failures"].extend(res["failures"])
        done = res["written"] + len(res["failures"])
        self.tally["todo"] += done
        return done


def _chunks(items: list, workers: int) -> list[list]:
    """``items`` in chunks of up to 64, at least 4 chunks per worker while there are enough."""
    n = max(1, min(64, len(items) // (4 * max(workers, 1))))
    return [items[i:i + n] for i in range(0, len(items), n)]


def _remove_stray_temps(dst: Path) -> int:
    n = 0
    for split in SPLITS:
        for dirpath, _, files in os.walk(dst / split):
            for f in files:
                if TMP_MARK in f:
                    os.unlink(os.path.join(dirpath, f))
                    n += 1
    return n


def _file_jobs(source: inet.Source, dst: Path, wnids: list[str],
               subset: Subset) -> list[tuple[str, str]]:
    """``[(input path, output path)]`` for the file layouts (folders, kaggle, flat-val),
    restricted to the selected classes and per-class subsets."""
    sel = set(wnids)
    groups: dict[tuple[str, str], list[tuple[str, str, str]]] = {}  # (split, wnid) -> jobs
    if source.layout == "folders":
        for p, o in plan(source.root, dst):
            rel_in = Path(p).relative_to(source.root)
            split, w = rel_in.parts[0], rel_in.parts[1]
            groups.setdefault((split, w), []).append((Path(*rel_in.parts[2:]).as_posix(), p, o))
    else:
        special: list[Path] = []
        for w in wnids:
            d = source.train_dir / w
            for p in list_images(d, special) if d.is_dir() else []:
                rel = p.relative_to(d)
                groups.setdefault(("train", w), []).append(
                    (rel.as_posix(), str(p), str(dst / "train" / w / out_name(rel))))
        report_skipped(source.train_dir, special)
        if source.layout == "classes":  # --val-fraction: the split, then any subset of it
            for w in wnids:
                g = groups.pop(("train", w), [])
                val = split_val([r for r, _, _ in g], subset.val_fraction, subset.seed, w)
                for r, p, o in g:
                    split = "val" if r in val else "train"
                    groups.setdefault((split, w), []).append(
                        (r, p, str(dst / split / w / out_name(Path(r)))))
        for p, w in source.val_files:
            groups.setdefault(("val", w), []).append(
                (p.name, str(p), str(dst / "val" / w / out_name(Path(p.name)))))
    jobs: list[tuple[str, str]] = []
    for split in SPLITS:
        m = subset.per_class if split == "train" else subset.val_per_class
        for w in wnids:
            g = groups.get((split, w), [])
            keep = pick([r for r, _, _ in g], m, subset.seed, w)
            jobs.extend((p, o) for r, p, o in g if r in keep)
    assert all(Path(o).relative_to(dst).parts[1] in sel for _, o in jobs)
    return jobs


def _run_file_jobs(runner: _Runner, jobs, src: Path, quality: int, progress: bool,
                   stray: int) -> None:
    todo = [(s, o, Path(s).relative_to(src).as_posix()) for s, o in jobs
            if not os.path.exists(o)]
    done_before = len(jobs) - len(todo)
    print(f"prepare: {len(jobs)} images, {done_before} already done, {len(todo)} to do"
          + (f", removed {stray} stray temp files" if stray else ""), file=sys.stderr)
    runner.tally.update(images=len(jobs), existing=done_before)
    tasks = [(c, quality) for c in _chunks(todo, runner.workers)]
    failures = runner.tally["failures"]
    with Progress(len(todo), "prepare", unit="img", enabled=progress) as bar:
        for res in runner.results(files_task, tasks):
            bar.update(runner.add(res), extra=f"{len(failures)} unreadable" if failures else None)


def _run_archives(runner: _Runner, source: inet.Source, dst: Path, wnids: list[str],
                  subset: Subset, quality: int, progress: bool, stray: int) -> None:
    """Stream the official archives: validation images in chunks (read at their offsets),
    then one task per class tar. Resumable: existing outputs are skipped."""
    sel = set(wnids)
    by_class: dict[str, list] = {}
    for it in source.val_members:
        if it[1] in sel:
            by_class.setdefault(it[1], []).append(it)
    val_items = []
    for w in wnids:
        g = by_class.get(w, [])
        keep = pick([it[0] for it in g], subset.val_per_class, subset.seed, w)
        val_items.extend(it for it in g if it[0] in keep)
    val_todo = [it for it in val_items
                if not (dst / "val" / it[1] / out_name(PurePosixPath(it[0]))).exists()]
    val_tasks = [(str(source.val_tar), c, str(dst), quality)
                 for c in _chunks(val_todo, runner.workers)]
    train_tasks = [(str(source.train_tar), w, *source.train_members[w], str(dst),
                    subset.per_class, subset.seed, quality) for w in wnids]
    print(f"prepare: {len(train_tasks)} class archives to stream; {len(val_items)} validation "
          f"images, {len(val_items) - len(val_todo)} already done"
          + (f"; removed {stray} stray temp files" if stray else ""), file=sys.stderr)
    tally = runner.tally
    tally.update(images=len(val_items), existing=len(val_items) - len(val_todo))
    runner.start()  # the workers' start-up is not in the rates below
    with Progress(len(val_todo), "prepare val", unit="img", enabled=progress) as bar:
        for res in runner.results(val_chunk_task, val_tasks):
            bar.update(runner.add(res))
    if runner.stop:
        return
    n_img = 0
    with Progress(len(train_tasks), "prepare train", unit="class", enabled=progress) as bar:
        for res in runner.results(train_class_task, train_tasks):
            n_img += runner.add(res)
            tally["images"] += res["images"]
            tally["existing"] += res["existing"]
            el = time.monotonic() - bar.start
            bar.update(1, extra=f"{n_img} img written, {n_img / max(el, 1e-9):.1f} img/s"
                       + (f", {len(tally['failures'])} unreadable" if tally["failures"] else ""))


# ----------------------------------------------------------------------------- the command

def _annotate_stats(dst: Path, extra: dict[str, str]) -> None:
    """Add string metadata (layout, subset) to DST/stats.npz; the fingerprint is unchanged
    (it already covers the train file list, hence the subset)."""
    p = dst / "stats.npz"
    if not p.is_file():
        return
    with np.load(p, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if all(k in arrays and str(arrays[k]) == v for k, v in extra.items()):
        return
    arrays.update({k: np.str_(v) for k, v in extra.items()})
    save_stats(p, arrays)


def _check_subset(dst: Path, record: dict) -> None:
    """UsageError if DST holds a ``subset.json`` that differs from ``record``."""
    old = dst / SUBSET_FILE
    if old.is_file():
        try:
            prev = json.loads(old.read_text(encoding="utf-8"))
        except ValueError:
            prev = None
        if prev != record:
            raise UsageError(f"{dst} was prepared with another subset ({old}: "
                             f"{json.dumps(prev)[:120]}); use a new DST")


def _write_report(dst: Path, src: Path, layout: str, n_images: int, failures: list) -> None:
    lines = [f"source: {src.resolve()}", f"layout: {layout}", f"images: {n_images}",
             f"prepared: {n_images - len(failures)}", f"unreadable: {len(failures)}"]
    lines += [f"UNREADABLE\t{s}\t{err}" for s, err in failures]
    text = "".join(line + "\n" for line in lines)
    atomic_write(dst / REPORT, lambda f: f.write(text.encode("utf-8")), fsync=False,
                 private=False)


def _check_args(src: Path, dst: Path, quality: int, workers: int,
                per_class: int | None, val_per_class: int | None,
                val_fraction: float | None = None) -> None:
    """UsageError (one line, exit 2) for a bad argument, before anything is read or written."""
    if not src.is_dir():
        raise UsageError(f"source folder not found: {src}")
    s, d = src.resolve(), dst.resolve()
    if s == d:
        raise UsageError("SRC and DST must be different folders")
    if s in d.parents:
        raise UsageError(f"DST {dst} is inside SRC {src}: the prepared copies would become part "
                         f"of the source; choose a DST outside SRC")
    for split in SPLITS:
        if s == d / split or d / split in s.parents:
            raise UsageError(f"SRC {src} is inside {dst / split}, where prepare writes its "
                             f"output; choose another DST")
    check_output_dir(dst, "DST")
    if not 1 <= quality <= 100:
        raise UsageError(f"--quality must be in 1..100, got {quality}")
    if workers < 0:
        raise UsageError(f"--workers must be >= 0, got {workers}")
    for flag, v in (("--per-class", per_class), ("--val-per-class", val_per_class)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise UsageError(f"--val-fraction must be between 0 and 1 (exclusive), got "
                         f"{val_fraction}")
    pixel_limit()  # a bad SPLIT_ALEXNET_MAX_PIXELS is refused here, not once per image


def _check_split(source: inet.Source, val_fraction: float | None) -> None:
    """--val-fraction splits one folder of class folders, and such a folder needs it."""
    if source.layout == "classes" and val_fraction is None:
        raise UsageError(f"{source.root} holds class folders but no train/ and val/: give "
                         "--val-fraction F to split each class into train/ and val/")
    if source.layout != "classes" and val_fraction is not None:
        raise UsageError(f"--val-fraction splits one folder of class folders; {source.root} "
                         f"holds {source.description}, with its own validation set")


@contextmanager
def _writes_kept_on_failure():
    """A failed write in this process (full disk, file too large): Abort, one line, exit 1."""
    try:
        yield
    except OSError as e:
        raise Abort(f"could not write {e.filename or 'the output'}: {e.strerror or e}; "
                    f"{KEPT}") from None


def _stopped(signame: str, what: str) -> None:
    print(f"prepare: stopped by {signame} {what}; what is prepared is kept: rerun the same "
          f"command to continue", file=sys.stderr)


def _convert(source: inet.Source, dst: Path, wnids: list[str], subset: Subset, record: dict,
             workers: int, quality: int, progress: bool, stop: StopOnSignal) -> dict:
    """Write the metadata and convert every selected image not yet in DST -> the summary."""
    t0 = time.monotonic()
    stray = _remove_stray_temps(dst)
    write_json(dst / SUBSET_FILE, record, indent=1, sort_keys=True, fsync=False)
    inet.write_class_metadata(dst, wnids, source.names, source.wnids)
    with _Runner(workers, stop) as runner:
        if source.layout == "archives":
            _run_archives(runner, source, dst, wnids, subset, quality, progress, stray)
        else:
            jobs = _file_jobs(source, dst, wnids, subset)
            _run_file_jobs(runner, jobs, source.root, quality, progress, stray)
    elapsed = time.monotonic() - t0
    tally = runner.tally
    failures = sorted(tally["failures"])
    n_todo = tally["todo"]
    return {"images": tally["images"], "written": n_todo - len(failures),
            "existing": tally["existing"], "unreadable": len(failures), "seconds": elapsed,
            "rate": n_todo / elapsed if elapsed > 0 else 0.0, "layout": source.layout,
            "classes": len(wnids), "failures": failures}


def _statistics(dst: Path, layout: str, record: dict, summary: dict, progress: bool,
                workers: int) -> dict:
    """Compute DST/stats.npz (with the layout and subset as metadata) -> the summary."""
    try:
        s = load_stats(dst, progress=progress, workers=workers)
    except Interrupted as e:
        name = signal.Signals(e.signum).name
        _stopped(name, "during the statistics (all images are prepared)")
        return {**summary, "interrupted": name}
    _annotate_stats(dst, {"layout": layout, "subset": json.dumps(record, sort_keys=True)})
    print(f"prepare: statistics in {dst / 'stats.npz'} (eigval {s.eigval.tolist()})",
          file=sys.stderr)
    return {**summary, "fingerprint": s.fingerprint}


def prepare(src: Path, dst: Path, *, workers: int | None = None, quality: int = 90,
            progress: bool = True, stats: bool = True, classes: int | str | None = None,
            per_class: int | None = None, val_per_class: int | None = None,
            seed: int = 0, val_fraction: float | None = None) -> dict:
    """Prepare SRC into DST (see the module docstring). Returns a summary dict.

    ``classes``: None, N (the first N sorted wnids) or a path to a wnid list file;
    ``per_class`` / ``val_per_class``: keep M train / K val images per class (chosen by
    ``seed``); ``val_fraction``: split a folder of class folders, F of each class to val
    (chosen by ``seed``). Bad arguments are refused before anything is written (UsageError); a failed
    write is Abort (exit 1), what is written kept. SIGTERM/SIGINT stop it within one task
    (what is written is kept, a rerun continues): the summary then has ``"interrupted"``
    (the signal's name)."""
    src, dst = Path(src), Path(dst)
    workers = (os.cpu_count() or 1) if workers is None else workers
    _check_args(src, dst, quality, workers, per_class, val_per_class, val_fraction)
    subset = Subset(classes, per_class, val_per_class, int(seed), val_fraction)
    with StopOnSignal() as stop:
        source = inet.detect_layout(src)
        _check_split(source, val_fraction)
        wnids = select_classes(source.wnids, subset.classes)
        record = subset.record(wnids)
        _check_subset(dst, record)
        print(f"prepare: found {source.description}", file=sys.stderr)
        make_output_dir(dst, "DST")
        if stop:
            _stopped(stop.name, "before converting any image")
            return {"interrupted": stop.name, "layout": source.layout}
        with _writes_kept_on_failure():
            summary = _convert(source, dst, wnids, subset, record, workers, quality, progress,
                               stop)
            failures = summary.pop("failures")
            if stop:
                _stopped(stop.name, "while converting")
                return {**summary, "interrupted": stop.name}
            _write_report(dst, src, source.layout, summary["images"], failures)
            print(f"prepare: wrote {summary['written']}, skipped {summary['existing']} "
                  f"existing, {len(failures)} unreadable (listed in {dst / REPORT}); "
                  f"{summary['seconds']:.1f} s, {summary['rate']:.1f} img/s with {workers} "
                  f"workers", file=sys.stderr)
            if stats:
                summary = _statistics(dst, source.layout, record, summary, progress, workers)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    ap = Parser(module="split_alexnet.prepare",
                description="Rescale to shorter side 256, keep the central 256x256 patch, "
                            "write JPEGs + stats.npz.")
    ap.add_argument("src", type=Path,
                    help="source: the official ImageNet archives, Kaggle's layout, or "
                         "train/<class>/* + val/<class>/* (see docs/data.md)")
    ap.add_argument("dst", type=Path, help="output root (mirror tree)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    ap.add_argument("--no-stats", action="store_true", help="skip computing DST/stats.npz")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    ap.add_argument("--classes", default=None, metavar="N|FILE",
                    help="subset: the first N wnids in sorted order, or a file listing wnids")
    ap.add_argument("--per-class", type=int, default=None, metavar="M",
                    help="subset: M training images per class (chosen by --seed)")
    ap.add_argument("--val-per-class", type=int, default=None, metavar="K",
                    help="subset: K validation images per class (default: all)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the per-class choice and of --val-fraction's split")
    ap.add_argument("--val-fraction", type=float, default=None, metavar="F",
                    help="SRC is one folder of class folders (no train/, val/): put F of each "
                         "class's images into DST/val, the rest into DST/train (recorded in "
                         "DST/subset.json)")
    a = ap.parse_args(argv)
    s = prepare(a.src, a.dst, workers=a.workers, quality=a.quality, progress=not a.quiet,
                stats=not a.no_stats, classes=parse_classes_arg(a.classes),
                per_class=a.per_class, val_per_class=a.val_per_class, seed=a.seed,
                val_fraction=a.val_fraction)
    if s.get("interrupted"):
        return 0
    return 1 if s["images"] and s["unreadable"] == s["images"] else 0


def cli() -> None:
    """The console command: ``main`` with one-line errors and exit codes."""
    sys.exit(run(main, "split_alexnet.prepare"))
