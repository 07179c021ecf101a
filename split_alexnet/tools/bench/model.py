"""``python -m split_alexnet.bench model``: train-step and inference throughput of the layouts.

One row per (layout, mode, fast path). A step is timed between device synchronisations
(``torch.cuda.synchronize`` on every CUDA device the model uses, before and after); the
figure is the median of the timed steps after the warm-up steps. Columns are described in
docs/benchmarks.md. Training step = the paper's optimizer (``build_optimizer`` -> PaperSGD)
+ cross-entropy on random ``(B, 3, 227, 227) * 60`` inputs and random labels, ``train()``
mode (dropout on). Inference = ``eval()`` under ``torch.no_grad()``.

Each figure is set against a matmul ceiling measured in the same run on the same device (a
square GEMM in the row's compute dtype, median of several), as ``fraction_of_peak``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision

from split_alexnet.network.flops import flops_per_step
from split_alexnet.network.model import ModelConfig
from split_alexnet.network.parallelize import (amp_dtype, autocast_context, grad_scaler,
                                               parallelize, to_input_format, unwrap)
from split_alexnet.network.placement import add_device_flags, build_model, resolve_devices
from split_alexnet.training.optim import build_optimizer
from split_alexnet.utils.cli import UsageError
from split_alexnet.utils.fileio import atomic_write

LAYOUTS = ("split", "split-one-device", "collapsed", "half", "torchvision")
FAST_PATH_TOKENS = ("fp32", "channels_last", "bf16", "fp16", "compile", "cudnn_benchmark")
ARCH_OF = {"split": "alexnet", "split-one-device": "alexnet", "collapsed": "alexnet",
           "half": "half", "torchvision": "torchvision"}


# ----------------------------------------------------------------------------- setup
def parse_fast_path(spec: str) -> dict:
    """'channels_last+bf16' -> {'channels_last': True, 'amp': 'bf16', ...}."""
    toks = [t.strip().replace("-", "_") for t in spec.split("+") if t.strip()]
    bad = [t for t in toks if t not in FAST_PATH_TOKENS]
    if bad or not toks:
        raise ValueError(f"fast path {spec!r}: use tokens {', '.join(FAST_PATH_TOKENS)} joined "
                         "by '+' (e.g. channels_last+bf16)")
    amp = [t for t in toks if t in ("bf16", "fp16")]
    if len(amp) > 1:
        raise ValueError(f"fast path {spec!r}: bf16 and fp16 are exclusive")
    return {"channels_last": "channels_last" in toks, "amp": amp[0] if amp else "off",
            "compile": "compile" in toks, "cudnn_benchmark": "cudnn_benchmark" in toks}


def placement(layout: str, devices: tuple[torch.device, torch.device]) -> tuple[torch.device, ...]:
    """The devices a bench ``layout``'s network is placed on."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    if layout == "split":
        return devices
    return (devices[0], devices[0]) if layout == "split-one-device" else (devices[0],)


def build(layout: str, devices: tuple[torch.device, torch.device]) -> torch.nn.Module:
    """The network of a bench ``layout`` (1000 classes, the paper's init), placed."""
    where = placement(layout, devices)
    if layout == "torchvision":
        return torchvision.models.alexnet(weights=None).to(where[0])
    return build_model(ModelConfig(arch=ARCH_OF[layout]),
                       "split" if len(where) == 2 else "collapsed", where)


def layout_devices(layout: str, devices) -> list[torch.device]:
    if layout == "split":
        return list(dict.fromkeys(devices))
    return [devices[0]]


def sync(devices) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


# ----------------------------------------------------------------------------- memory
def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _RssPeak:
    """Samples the process's resident set every 5 ms (CPU rows: no allocator statistics)."""

    def __init__(self) -> None:
        self.base = _rss_bytes()
        self.peak = self.base or 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            r = _rss_bytes()
            if r is not None and r > self.peak:
                self.peak = r

    def __enter__(self) -> "_RssPeak":
        if self.base is not None:
            self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._t.is_alive():
            self._t.join()

    def growth(self) -> int | None:
        return None if self.base is None else self.peak - self.base


# ----------------------------------------------------------------------------- ceiling
def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """FLOP/s of an n x n x n GEMM (median of ``reps``) on ``device`` in ``dtype``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = a @ b
    ts = []
    for _ in range(reps + 1):
        sync([device])
        t0 = time.perf_counter()
        torch.matmul(a, b, out=c)
        sync([device])
        ts.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(ts[1:])


# ----------------------------------------------------------------------------- one config
def _built_step(layout: str, devices, fp: dict, mode: str, batch: int, size: int):
    """(network, one timed step) of ``layout`` with the fast paths ``fp``, on random inputs at
    the paper's scale, placed and wrapped by :func:`parallelize`."""
    devs = layout_devices(layout, devices)
    net = parallelize(build(layout, devices), placement(layout, devices),
                      channels_last=fp["channels_last"], compile=fp["compile"],
                      cudnn_benchmark=True if fp["cudnn_benchmark"] else None)
    x = to_input_format(torch.randn(batch, 3, size, size, device=devs[0]) * 60,
                        fp["channels_last"])
    y = torch.randint(0, 1000, (batch,), device=devs[0])
    return net, _step_fn(net, mode, fp, x, y, devs)


def _step_fn(net, mode: str, fp: dict, x, y, devices) -> Callable[[], None]:
    dtype = amp_dtype(fp["amp"])
    if mode == "infer":
        net.eval()

        def step():
            with torch.no_grad(), autocast_context(devices, dtype):
                net(x)
        return step
    net.train()
    opt = build_optimizer(unwrap(net))
    scaler = grad_scaler(devices[0], dtype)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast_context(devices, dtype):
            loss = F.cross_entropy(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return step


def measure(layout: str, mode: str, fast_path: str, devices, batch: int, warmup: int,
            steps: int, ceiling: Callable[[torch.device, torch.dtype], float]) -> dict:
    """One row. ``ceiling(device, dtype)`` is measured right after the timed steps (after the
    memory statistics are read), so that it sees the same machine load as the steps."""
    fp = parse_fast_path(fast_path)
    devs = layout_devices(layout, devices)
    arch = ARCH_OF[layout]
    size = 224 if arch == "torchvision" else 227
    for d in devs:
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)
    old_bench = torch.backends.cudnn.benchmark
    torch.manual_seed(0)
    with _RssPeak() as rss:
        net, step = _built_step(layout, devices, fp, mode, batch, size)
        t_compile = time.perf_counter()
        for _ in range(warmup):
            step()
        sync(devs)
        t_compile = time.perf_counter() - t_compile
        times = []
        for _ in range(steps):
            sync(devs)
            t0 = time.perf_counter()
            step()
            sync(devs)
            times.append(time.perf_counter() - t0)
    torch.backends.cudnn.benchmark = old_bench
    med = statistics.median(times)
    flops = flops_per_step(arch, mode, batch)
    traffic = getattr(unwrap(net), "traffic", None)
    between = None
    if layout in ("split", "split-one-device") and traffic:
        between = sum(t.bytes for t in traffic) * (2 if mode == "train" else 1)
    if any(d.type == "cuda" for d in devs):
        mem = {str(d): torch.cuda.max_memory_allocated(d) for d in devs if d.type == "cuda"}
        if any(d.type == "cpu" for d in devs):
            mem["cpu (rss growth)"] = rss.growth()
    else:
        mem = {"cpu (rss growth)": rss.growth()}
    cdtype = amp_dtype(fp["amp"]) or torch.float32
    peak = sum(ceiling(d, cdtype) for d in devs)  # cpu,cpu: one ceiling (shared cores)
    row = {"layout": layout, "devices": ",".join(map(str, devs if layout != "split" else devices)),
           "mode": mode, "batch_size": batch, "images_per_s": batch / med,
           "fast_path": fast_path, "step_ms": med * 1e3, "min_step_ms": min(times) * 1e3,
           "images_per_s_best": batch / min(times),
           "steps": len(times), "times_s": times, "warmup_s": t_compile,
           "gflop_per_image": flops / batch / 1e9, "gflops": flops / med / 1e9,
           "peak_gflops": peak / 1e9, "fraction_of_peak": flops / med / peak,
           "bytes_between_towers": between, "peak_mem": mem}
    if any(d.type == "cuda" for d in devs):  # fp32 convs use TF32 tensor cores if this is on
        row["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        row["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    del net, step
    gc.collect()
    for d in devs:
        if d.type == "cuda":
            torch.cuda.empty_cache()
    return row


def interleaved(layout: str, mode: str, fast_paths: list[str], devices, batch: int,
                warmup: int, steps: int, ceiling) -> list[dict]:
    """A/B on a shared machine: every fast path of ``layout`` built at once, then one timed
    step of each in turn, ``steps`` times, so that load changes hit all of them alike. Peak
    memory is not reported (the models coexist)."""
    devs = layout_devices(layout, devices)
    arch = ARCH_OF[layout]
    size = 224 if arch == "torchvision" else 227
    old_bench = torch.backends.cudnn.benchmark
    fns, keep = {}, []
    for f in fast_paths:
        fp = parse_fast_path(f)
        torch.manual_seed(0)
        net, fns[f] = _built_step(layout, devices, fp, mode, batch, size)
        keep.append((f, net))
        for _ in range(warmup):
            fns[f]()
    times: dict = {f: [] for f in fns}
    for _ in range(steps):
        for f, step in fns.items():
            sync(devs)
            t0 = time.perf_counter()
            step()
            sync(devs)
            times[f].append(time.perf_counter() - t0)
    torch.backends.cudnn.benchmark = old_bench
    flops = flops_per_step(arch, mode, batch)
    between = {f: sum(t.bytes for t in getattr(unwrap(net), "traffic", []) or [])
               * (2 if mode == "train" else 1) or None for f, net in keep}
    rows = []
    for f, ts in times.items():
        med = statistics.median(ts)
        peak = sum(ceiling(d, amp_dtype(parse_fast_path(f)["amp"]) or torch.float32)
                   for d in devs)
        rows.append({"layout": layout, "devices": ",".join(map(str, devs if layout != "split"
                                                             else devices)),
                     "mode": mode, "batch_size": batch, "images_per_s": batch / med,
                     "fast_path": f, "step_ms": med * 1e3, "min_step_ms": min(ts) * 1e3,
                     "images_per_s_best": batch / min(ts), "steps": len(ts), "times_s": ts,
                     "interleaved": True, "gflop_per_image": flops / batch / 1e9,
                     "gflops": flops / med / 1e9, "peak_gflops": peak / 1e9,
                     "fraction_of_peak": flops / med / peak, "bytes_between_towers": between[f],
                     "peak_mem": None})
    del keep, fns
    gc.collect()
    return rows


# ----------------------------------------------------------------------------- plans
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


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, dict):
        return " ".join(f"{k}={_fmt_bytes(b)}" for k, b in v.items())
    return str(v)


def _fmt_bytes(b) -> str:
    if b is None:
        return "-"
    return f"{b / 2**20:.0f}MiB" if b >= 10 * 2**20 else f"{b / 2**20:.2f}MiB"


TABLE = [("layout", "layout"), ("devices", "devices"), ("mode", "mode"),
         ("fast_path", "fast path"), ("batch_size", "batch"), ("images_per_s", "img/s"),
         ("images_per_s_best", "best img/s"),
         ("step_ms", "step ms"), ("gflops", "GFLOP/s"), ("fraction_of_peak", "of peak"),
         ("bytes_between_towers", "tower bytes/step"), ("peak_mem", "peak mem")]


def print_table(rows: list[dict], file=None) -> None:
    file = sys.stdout if file is None else file
    cells = [[_fmt_bytes(r.get(k)) if k == "bytes_between_towers" else _fmt(r.get(k))
              for k, _ in TABLE] for r in rows]
    heads = [h for _, h in TABLE]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    print("  ".join(h.ljust(w) for h, w in zip(heads, widths)), file=file)
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)), file=file)


# ----------------------------------------------------------------------------- entry
def add_arguments(p: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace) -> list[dict]:
    quick = bool(getattr(args, "quick", False))
    devices = resolve_devices(getattr(args, "gpus", None), getattr(args, "devices", None),
                              default="fit")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    cuda = devices[0].type == "cuda" or devices[1].type == "cuda"
    batch = getattr(args, "batch_size", None) or (8 if quick else 128 if cuda else 32)
    if batch < 1:
        raise UsageError("--batch-size must be at least 1")
    steps = getattr(args, "steps", None)
    if steps:
        warmup, timed = (int(s) for s in str(steps).split(","))
    else:
        warmup, timed = (2, 3) if quick else ((5, 20) if cuda else (2, 5))
    if timed < 1 or warmup < 0:
        raise UsageError("--steps WARMUP,TIMED needs WARMUP >= 0 and TIMED >= 1")
    layouts, extra = default_plan(devices, quick)
    if getattr(args, "layouts", None):
        layouts = [s for s in args.layouts.split(",") if s]
        extra = [(lay, f) for lay, f in extra if lay in layouts]
        bad = [lay for lay in layouts if lay not in LAYOUTS]
        if bad:
            raise UsageError(f"--layouts: unknown {bad}; use {', '.join(LAYOUTS)}")
    fps_arg = getattr(args, "fast_paths", None)
    if fps_arg is not None:
        extra = []
        if fps_arg != "none":
            for item in fps_arg.split(","):
                lay, _, f = item.partition(":")
                if lay not in LAYOUTS or not f:
                    raise UsageError(f"--fast-paths item {item!r}: use LAYOUT:PATH, LAYOUT one of "
                                     f"{', '.join(LAYOUTS)}")
                extra.append((lay, f))
    for _, f in extra:
        try:
            parse_fast_path(f)
        except ValueError as e:
            raise UsageError(str(e)) from None
    modes = [m for m in getattr(args, "modes", "train,infer").split(",") if m]
    configs = [(lay, m, "fp32") for lay in layouts for m in modes] + \
              [(lay, m, f) for lay, f in extra for m in modes]

    # Ceiling: a square GEMM in the row's compute dtype, measured next to every row (the
    # load on a shared machine drifts); the figures printed here are a first reading.
    n = 1024 if (quick and not cuda) else (8192 if cuda else 2048)
    reps = 3 if quick else 5

    def ceiling(d: torch.device, dt: torch.dtype) -> float:
        return matmul_ceiling(d, dt, n if d.type == "cuda" else min(n, 2048), reps)

    ceilings: dict = {}
    for lay, _, f in configs:
        dt = amp_dtype(parse_fast_path(f)["amp"]) or torch.float32
        for d in layout_devices(lay, devices):
            if (d, dt) not in ceilings:
                ceilings[(d, dt)] = ceiling(d, dt)
    print(f"bench model: torch {torch.__version__}, devices {devices[0]},{devices[1]}, batch "
          f"{batch}, {warmup} warm-up + {timed} timed steps (median), threads "
          f"{torch.get_num_threads()}", file=sys.stderr)
    for (d, dt), c in ceilings.items():
        print(f"  matmul ceiling {d} {str(dt).replace('torch.', '')}: {c / 1e9:.1f} GFLOP/s "
              f"(TF32 matmul {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'})"
              if d.type == "cuda" else
              f"  matmul ceiling {d} {str(dt).replace('torch.', '')}: {c / 1e9:.1f} GFLOP/s",
              file=sys.stderr)
    if getattr(args, "interleave", False):  # A/B mode: one group per (layout, mode)
        rows = []
        for lay in dict.fromkeys([lay for lay, _ in extra]):
            fps = ["fp32"] + [f for lay2, f in extra if lay2 == lay]
            for m in modes:
                for r in interleaved(lay, m, fps, devices, batch, warmup, timed, ceiling):
                    r.update(kind="model", rounds=1, torch=torch.__version__,
                             device_name=_device_name(devices[0]))
                    rows.append(r)
                    print(f"  {lay:16s} {m:5s} {r['fast_path']:36s} {r['images_per_s']:9.1f} "
                          f"img/s (best {r['images_per_s_best']:.1f}; interleaved)",
                          file=sys.stderr, flush=True)
        print_table(rows)
        return rows
    rounds = max(1, int(getattr(args, "rounds", None) or 1))
    by_config: dict = {}
    for rnd in range(rounds):  # rounds: every config once per round; drift hits all alike
        for lay, m, f in configs:
            try:
                r = measure(lay, m, f, devices, batch, warmup, timed, ceiling)
            except Exception as e:  # noqa: BLE001 - one failing fast path must not end the run
                print(f"bench model: {lay} {m} {f} failed: {type(e).__name__}: {e}".splitlines()[0],
                      file=sys.stderr)
                continue
            prev = by_config.get((lay, m, f))
            if prev is not None:  # pool the timed steps of all rounds: median of them all
                times = prev["times_s"] + r["times_s"]
                med = statistics.median(times)
                prev.update(times_s=times, steps=len(times), step_ms=med * 1e3,
                            min_step_ms=min(times) * 1e3, images_per_s=batch / med,
                            images_per_s_best=batch / min(times),
                            gflops=prev["gflops"] * prev["step_ms"] / (med * 1e3), rounds=rnd + 1,
                            peak_gflops=(prev["peak_gflops"] * rnd + r["peak_gflops"]) / (rnd + 1))
                prev["fraction_of_peak"] = prev["gflops"] / prev["peak_gflops"]
                r = prev
            else:
                r.update(kind="model", rounds=1, torch=torch.__version__,
                         device_name=_device_name(devices[0]))
                by_config[(lay, m, f)] = r
            rows = list(by_config.values())
            if getattr(args, "command", "model") == "model" and getattr(args, "json", None):
                _write_partial(args.json, rows)  # a killed run keeps the rows measured so far
            print(f"  {lay:16s} {m:5s} {f:36s} {r['images_per_s']:9.1f} img/s "
                  f"({r['fraction_of_peak']:.2f} of peak)", file=sys.stderr, flush=True)
    rows = list(by_config.values())
    print_table(rows)
    return rows


def _write_partial(path: str, rows: list[dict]) -> None:
    text = json.dumps(rows, indent=2, default=str) + "\n"
    atomic_write(Path(path), lambda f: f.write(text.encode()), private=False)


def _device_name(d: torch.device) -> str:
    if d.type == "cuda":
        return torch.cuda.get_device_name(d)
    return f"cpu x{os.cpu_count()}"


__all__ = ["run", "add_arguments", "measure", "matmul_ceiling", "LAYOUTS", "parse_fast_path"]
