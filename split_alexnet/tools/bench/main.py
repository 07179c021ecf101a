"""``python -m split_alexnet.bench [model|data|lrn|all] [--quick] [--json FILE] ...``.

* ``model``: train-step and inference images/s of the layouts and fast paths (bench/model.py)
* ``data``:  the input pipeline's images/s (bench/data.py)
* ``lrn``:   the LRN implementations and their share of a train step (bench/lrn.py)
* ``loop``:  the training loop's per-step overhead of reading the device (bench/loop.py)
* ``towers``: --parallel towers (a process per tower, torchrun) beside the in-process pair,
  on the CPU: images/s, their ratio, bytes per link per step (bench/towers.py)
* ``comm``:  the bytes each process sends per step under pair, towers and hybrid, at K = 2,
  4, 8 processes, computed from the networks' shapes (bench/comm.py)
* ``hybrid``: --parallel hybrid (both schedules) beside pair DDP at K = 2, on the CPU:
  images/s and their ratios (bench/hybrid.py)
* ``onnx``:  onnxruntime against the PyTorch forward, CPU inference (bench/onnx.py; the
  ``export`` extra)
* ``all``:   model, then lrn, then data; ``--json`` gets every row in one list

See docs/benchmarks.md for the columns and the numbers measured so far.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import split_alexnet.tools.bench.comm as comm
import split_alexnet.tools.bench.data as data
import split_alexnet.tools.bench.hybrid as hybrid
import split_alexnet.tools.bench.loop as loop
import split_alexnet.tools.bench.lrn as lrn
import split_alexnet.tools.bench.model as model
import split_alexnet.tools.bench.onnx as onnx_bench
import split_alexnet.tools.bench.towers as towers
from split_alexnet.utils.cli import Parser, run as cli_run
from split_alexnet.utils.fileio import write_json
from split_alexnet.utils.flags import WORKERS, Number, check_number, check_output

#: The integer flags that bench/data.py, bench/model.py and bench/lrn.py add, and their
#: ranges: checked here, before any benchmark runs.
NUMBERS = {"images": {"min": 1}, "threads": {"min": 1}, "batch_size": {"min": 1},
           "batch": {"min": 1}, "rounds": {"min": 1}}


def _save(path: str | None, rows: list[dict]) -> None:
    """The rows to ``--json`` FILE, if it was given."""
    if path:
        write_json(path, rows)


def _model(args: argparse.Namespace) -> list[dict]:
    """``model``: its rows (and ``--json`` unless it is part of ``all``)."""
    rows = model.run(args)
    if args.command == "model":
        _save(args.json, rows)
    return rows


def _lrn(args: argparse.Namespace) -> list[dict]:
    """``lrn``: its rows, marked ``bench: lrn`` (and ``--json`` unless it is part of
    ``all``, where lrn's own options are not on the parser and take their defaults)."""
    own = args if args.command == "lrn" else argparse.Namespace(quick=args.quick,
                                                                 threads=args.threads or 2)
    rows = [{**r, "bench": "lrn"} for r in lrn.run(own)]
    if args.command == "lrn":
        _save(args.json, rows)
    return rows


def _data(args: argparse.Namespace) -> list[dict]:
    """``data``: its results (its own ``--json`` layout); in ``all``, as rows."""
    if args.command == "data":  # its own JSON layout ({"data": {...}}), as before
        data.run(args)
        return []
    ns = argparse.Namespace(**{**vars(args), "json": None})
    out = data.run(ns)
    rows = []
    for set_name, d in out.get("decoders", {}).items():
        for dec, r in d["results"].items():
            rows.append({"kind": "data", "name": f"decode {set_name}: {dec}",
                         "images_per_s": r["rate"], "per": "core",
                         "mean_abs_err": r["mean_abs_err"]})
    for name, rate in out.get("pipeline", {}).items():
        rows.append({"kind": "data", "name": name, "images_per_s": rate,
                     "per": "total" if "DataLoader" in name else "core"})
    for r in rows:
        r["machine"] = out.get("machine")
    return rows


def _own(bench):
    """A benchmark that is only run on its own: its rows, and ``--json``."""
    def command(args: argparse.Namespace) -> list[dict]:
        rows = bench.run(args)
        _save(args.json, rows)
        return rows
    return command


def _all(args: argparse.Namespace) -> list[dict]:
    """``all``: model, then lrn, then data; ``--json`` gets every row in one list."""
    rows = _model(args) + _lrn(args) + _data(args)
    _save(args.json, rows)
    return rows


COMMANDS = {"model": _model, "data": _data, "lrn": _lrn, "loop": _own(loop),
            "towers": _own(towers), "comm": _own(comm), "hybrid": _own(hybrid),
            "onnx": _own(onnx_bench), "all": _all}
#: The benchmarks that add their own options to their sub-command's parser.
OWN_OPTIONS = {"lrn": lrn, "loop": loop, "towers": towers, "comm": comm, "hybrid": hybrid,
               "onnx": onnx_bench}


def build_parser() -> argparse.ArgumentParser:
    """The ``bench`` parser: one sub-command per benchmark, each with its own options."""
    ap = Parser(module="split_alexnet.bench",
                description="Benchmarks (see docs/benchmarks.md).")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        p = sub.add_parser(name)
        p.add_argument("--quick", action="store_true", help="small sizes, short timings")
        p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
        if name in ("data", "all"):
            p.add_argument("--workers", action=Number, **WORKERS, default=None,
                           help="DataLoader workers")
            data.add_arguments(p)
        if name in ("model", "all"):
            model.add_arguments(p)
        if name in OWN_OPTIONS:
            OWN_OPTIONS[name].add_arguments(p)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, check its numbers and output file, run the benchmark."""
    a = build_parser().parse_args(argv)
    given = vars(a)  # each sub-command has only some of NUMBERS
    for name, bounds in NUMBERS.items():
        # model's --steps is WARMUP,TIMED, checked by model itself
        if given.get(name) is not None and not (name == "steps" and a.command in ("model",
                                                                              "all")):
            check_number("--" + name.replace("_", "-"), given[name], **bounds)
    check_output("--json", a.json)
    COMMANDS[a.command](a)
    return 0


def cli() -> None:
    """The console command: ``main`` with one-line errors and exit codes."""
    sys.exit(cli_run(main, "split_alexnet.bench"))
