"""``python -m split_alexnet.bench model``: train-step and inference throughput of the layouts.

One row per (layout, mode, fast path): the median of the timed steps after the warm-up steps,
set against a matmul ceiling measured in the same run on the same device (a square GEMM in
the row's compute dtype, median of several), as ``fraction_of_peak``. Columns are described
in docs/benchmarks.md.

This module reads the options once (:class:`Options`), plans the rows, runs them (every
configuration once per ``--rounds`` round, or ``--interleave``'s A/B groups) and prints the
table; bench/timing.py builds, times and makes the row of one configuration.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from split_alexnet.network.placement import add_device_flags, resolve_devices
from split_alexnet.tools.bench.timing import (FAST_PATH_TOKENS, LAYOUTS, Ceiling, Row,
                                              compute_dtype, interleaved, layout_devices,
                                              matmul_ceiling, measure, parse_fast_path)
from split_alexnet.utils.cli import UsageError
from split_alexnet.utils.fileio import write_json


# ----------------------------------------------------------------------------- options
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``model`` options (``--quick`` and ``--json`` come from bench/main.py)."""
    add_device_flags(p, default="fit", single_device=False)
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step (default 128 on CUDA, 32 on CPU, 8 with --quick)")
    p.add_argument("--layouts", default=None, help=argparse.SUPPRESS)  # e.g. collapsed,split
    p.add_argument("--fast-paths", default=None,
                   help="extra rows: LAYOUT:PATH[+PATH],... e.g. collapsed:bf16,split:channels_last "
                        f"(tokens {', '.join(FAST_PATH_TOKENS)}); 'none' for fp32 rows only")
    p.add_argument("--modes", default="train,infer", help=argparse.SUPPRESS)
    p.add_argument("--steps", default=None, help=argparse.SUPPRESS)  # WARMUP,TIMED
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--interleave", action="store_true",
                   help="A/B mode: per layout, build fp32 and its fast paths together and "
                        "alternate their timed steps (no fp32-only layouts, no memory column)")
    p.add_argument("--rounds", type=int, default=None,
                   help="repeat every configuration this many times, interleaved, and pool the "
                        "timed steps (for a shared machine; default 1)")


@dataclass(frozen=True)
class Options:
    """What one ``bench model`` run measures, and how: the command line read once
    (:func:`read_options`), the defaults that depend on the devices filled in."""

    devices: tuple[torch.device, torch.device]
    quick: bool
    batch: int
    warmup: int                          # untimed steps per row
    timed: int                           # timed steps per row (and round)
    layouts: tuple[str, ...]             # measured in fp32
    extra: tuple[tuple[str, str], ...]   # (layout, fast path) measured besides
    modes: tuple[str, ...]
    threads: int | None
    interleave: bool
    rounds: int
    partial_json: str | None             # rewritten after every row (``model --json``)

    @property
    def cuda(self) -> bool:
        """Whether a tower is on a GPU (the defaults and the ceiling's size follow it)."""
        return any(d.type == "cuda" for d in self.devices)

    def configs(self) -> list[tuple[str, str, str]]:
        """(layout, mode, fast path) of every row: the fp32 layouts, then the fast paths."""
        return ([(lay, m, "fp32") for lay in self.layouts for m in self.modes]
                + [(lay, m, f) for lay, f in self.extra for m in self.modes])

    def groups(self) -> list[tuple[str, list[str]]]:
        """``--interleave``: (layout, fp32 and its fast paths) per layout with fast paths."""
        return [(lay, ["fp32"] + [f for lay2, f in self.extra if lay2 == lay])
                for lay in dict.fromkeys(lay for lay, _ in self.extra)]


def read_options(args: argparse.Namespace) -> Options:
    """The parsed ``bench model`` (or ``bench all``) command line as :class:`Options`; a
    :class:`UsageError` for a bad value."""
    devices = resolve_devices(args.gpus, args.devices, default="fit")
    cuda = any(d.type == "cuda" for d in devices)
    batch = args.batch_size or (8 if args.quick else 128 if cuda else 32)
    if batch < 1:
        raise UsageError("--batch-size must be at least 1")
    warmup, timed = _step_counts(args.steps, args.quick, cuda)
    layouts, extra = default_plan(devices, args.quick)
    if args.layouts:
        layouts, extra = _only_layouts(args.layouts, extra)
    if args.fast_paths is not None:
        extra = _parse_fast_paths(args.fast_paths)
    for _, f in extra:
        try:
            parse_fast_path(f)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return Options(devices=tuple(devices), quick=args.quick, batch=batch, warmup=warmup,
                   timed=timed, layouts=tuple(layouts), extra=tuple(extra),
                   modes=tuple(m for m in args.modes.split(",") if m), threads=args.threads,
                   interleave=args.interleave, rounds=max(1, args.rounds or 1),
                   partial_json=args.json if args.command == "model" else None)


def _step_counts(spec: str | None, quick: bool, cuda: bool) -> tuple[int, int]:
    """``--steps WARMUP,TIMED``, or the defaults for the machine and ``--quick``."""
    if spec:
        warmup, timed = (int(s) for s in str(spec).split(","))
    else:
        warmup, timed = (2, 3) if quick else ((5, 20) if cuda else (2, 5))
    if timed < 1 or warmup < 0:
        raise UsageError("--steps WARMUP,TIMED needs WARMUP >= 0 and TIMED >= 1")
    return warmup, timed


def _only_layouts(spec: str, extra: list[tuple[str, str]]):
    """``--layouts a,b``: those layouts, and the planned fast paths of those layouts only."""
    layouts = [s for s in spec.split(",") if s]
    bad = [lay for lay in layouts if lay not in LAYOUTS]
    if bad:
        raise UsageError(f"--layouts: unknown {bad}; use {', '.join(LAYOUTS)}")
    return layouts, [(lay, f) for lay, f in extra if lay in layouts]


def _parse_fast_paths(spec: str) -> list[tuple[str, str]]:
    """``--fast-paths LAYOUT:PATH,...`` as (layout, fast path) pairs; ``none``: no pairs."""
    if spec == "none":
        return []
    extra = []
    for item in spec.split(","):
        lay, _, f = item.partition(":")
        if lay not in LAYOUTS or not f:
            raise UsageError(f"--fast-paths item {item!r}: use LAYOUT:PATH, LAYOUT one of "
                             f"{', '.join(LAYOUTS)}")
        extra.append((lay, f))
    return extra


def default_plan(devices, quick: bool) -> tuple[list[str], list[tuple[str, str]]]:
    """(layouts measured in fp32, [(layout, fast path)] measured besides)."""
    cuda = devices[0].type == "cuda"
    layouts = list(LAYOUTS)
    if devices[0] == devices[1]:
        layouts.remove("split-one-device")  # the same thing as split
    if quick:
        layouts = [lay for lay in layouts if lay in ("split", "collapsed", "torchvision")]
    if cuda:
        fps = ["channels_last", "bf16"] if quick else [
            "channels_last", "bf16", "fp16", "cudnn_benchmark", "channels_last+bf16",
            "channels_last+bf16+cudnn_benchmark"]
        extra = [(lay, f) for lay in ("collapsed", "split") for f in fps]
        if not quick:  # last: the slowest to set up (compile time), the first to lose
            extra += [("collapsed", "compile"), ("split", "compile")]
    else:
        fps = ["channels_last", "bf16"] if quick else ["channels_last", "bf16",
                                                        "channels_last+bf16"]
        extra = [("collapsed", f) for f in fps]
        if not quick:
            extra += [("split", "bf16"), ("split", "channels_last")]
    return layouts, extra


# ----------------------------------------------------------------------------- ceiling
def ceiling_of(opts: Options) -> Ceiling:
    """The matmul ceiling the rows are set against: a square GEMM in the row's compute
    dtype (8192 on CUDA, 2048 on the CPU, 1024 for ``--quick`` on the CPU), measured next to
    every row, as the load on a shared machine drifts."""
    n = 1024 if (opts.quick and not opts.cuda) else (8192 if opts.cuda else 2048)
    reps = 3 if opts.quick else 5

    def ceiling(d: torch.device, dt: torch.dtype) -> float:
        """FLOP/s of the GEMM on ``d`` in ``dt`` (at most 2048 on the CPU)."""
        return matmul_ceiling(d, dt, n if d.type == "cuda" else min(n, 2048), reps)
    return ceiling


def first_ceilings(opts: Options, ceiling: Ceiling) -> dict:
    """A first reading of every (device, dtype) ceiling the rows will use."""
    ceilings: dict = {}
    for lay, _, f in opts.configs():
        dt = compute_dtype(f)
        for d in layout_devices(lay, opts.devices):
            if (d, dt) not in ceilings:
                ceilings[(d, dt)] = ceiling(d, dt)
    return ceilings


def print_header(opts: Options, ceilings: dict) -> None:
    """The run's settings and the first ceilings, on stderr."""
    d0, d1 = opts.devices
    print(f"bench model: torch {torch.__version__}, devices {d0},{d1}, batch {opts.batch}, "
          f"{opts.warmup} warm-up + {opts.timed} timed steps (median), threads "
          f"{torch.get_num_threads()}", file=sys.stderr)
    tf32 = "on" if torch.backends.cuda.matmul.allow_tf32 else "off"
    for (d, dt), c in ceilings.items():
        line = f"  matmul ceiling {d} {str(dt).replace('torch.', '')}: {c / 1e9:.1f} GFLOP/s"
        print(line + (f" (TF32 matmul {tf32})" if d.type == "cuda" else ""), file=sys.stderr)


# ----------------------------------------------------------------------------- running
def run(args: argparse.Namespace) -> list[dict]:
    """``bench model``: measure every row the options ask for (in rounds, or as
    ``--interleave``'s A/B groups), print the table, and return the rows."""
    opts = read_options(args)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    ceiling = ceiling_of(opts)
    print_header(opts, first_ceilings(opts, ceiling))
    rows = run_interleaved(opts, ceiling) if opts.interleave else run_rounds(opts, ceiling)
    print_table(rows)
    return rows


def run_interleaved(opts: Options, ceiling: Ceiling) -> list[dict]:
    """``--interleave``: one A/B group per (layout with fast paths, mode)."""
    rows = []
    for lay, fps in opts.groups():
        for m in opts.modes:
            for row in interleaved(lay, m, fps, opts.devices, opts.batch, opts.warmup,
                                   opts.timed, ceiling):
                rows.append(row.to_dict())
                _progress(rows[-1], f"(best {rows[-1]['images_per_s_best']:.1f}; interleaved)")
    return rows


def run_rounds(opts: Options, ceiling: Ceiling) -> list[dict]:
    """Every configuration once per round (drift hits all alike), the rounds' timed steps
    pooled per configuration; ``--json`` of ``model`` is rewritten after every row, so that
    a killed run keeps the rows measured so far."""
    pooled: dict[tuple[str, str, str], Row] = {}
    for _ in range(opts.rounds):
        for config in opts.configs():
            row = _measure_or_say(config, opts, ceiling)
            if row is None:
                continue
            if config in pooled:
                pooled[config].add_round(row)
            else:
                pooled[config] = row
            if opts.partial_json:
                write_json(opts.partial_json, [r.to_dict() for r in pooled.values()])
            d = pooled[config].to_dict()
            _progress(d, f"({d['fraction_of_peak']:.2f} of peak)")
    return [r.to_dict() for r in pooled.values()]


def _measure_or_say(config: tuple[str, str, str], opts: Options, ceiling: Ceiling) -> Row | None:
    """:func:`measure` one configuration; a failure is one line on stderr and None (one
    failing fast path must not end the run)."""
    lay, m, f = config
    try:
        return measure(lay, m, f, opts.devices, opts.batch, opts.warmup, opts.timed, ceiling)
    except Exception as e:  # noqa: BLE001
        print(f"bench model: {lay} {m} {f} failed: {type(e).__name__}: {e}".splitlines()[0],
              file=sys.stderr)
        return None


def _progress(row: dict, note: str) -> None:
    """One measured row on stderr, as it comes."""
    print(f"  {row['layout']:16s} {row['mode']:5s} {row['fast_path']:36s} "
          f"{row['images_per_s']:9.1f} img/s {note}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- table
TABLE = [("layout", "layout"), ("devices", "devices"), ("mode", "mode"),
         ("fast_path", "fast path"), ("batch_size", "batch"), ("images_per_s", "img/s"),
         ("images_per_s_best", "best img/s"),
         ("step_ms", "step ms"), ("gflops", "GFLOP/s"), ("fraction_of_peak", "of peak"),
         ("bytes_between_towers", "tower bytes/step"), ("peak_mem", "peak mem"),
         ("optimizer", "optimizer")]


def _fmt(v) -> str:
    """A table cell: '-' for None, 3 decimals below 10, MiB per device for memory."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, dict):
        return " ".join(f"{k}={_fmt_bytes(b)}" for k, b in v.items())
    return str(v)


def _fmt_bytes(b) -> str:
    """Bytes as MiB ('-' for None)."""
    if b is None:
        return "-"
    return f"{b / 2**20:.0f}MiB" if b >= 10 * 2**20 else f"{b / 2**20:.2f}MiB"


def print_table(rows: list[dict], file=None) -> None:
    """The rows as an aligned table (stdout unless ``file``)."""
    file = sys.stdout if file is None else file
    cells = [[_fmt_bytes(r.get(k)) if k == "bytes_between_towers" else _fmt(r.get(k))
              for k, _ in TABLE] for r in rows]
    heads = [h for _, h in TABLE]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    print("  ".join(h.ljust(w) for h, w in zip(heads, widths)), file=file)
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)), file=file)


__all__ = ["run", "add_arguments", "read_options", "Options", "measure", "matmul_ceiling",
           "LAYOUTS", "parse_fast_path"]
