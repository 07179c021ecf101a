"""Measures one configuration of ``bench model``: builds the network and its step, times it,
and makes the result row (:class:`Row`, the one place the row's keys are made).

A configuration is (layout, mode, fast path). A step is timed between device
synchronisations (``torch.cuda.synchronize`` on every CUDA device the model uses, before and
after). Training step = the paper's optimizer (``build_optimizer`` -> PaperSGD; torchvision's
network: ``torch.optim.SGD`` with the same settings, :func:`optimizer_of`) +
cross-entropy on random ``(B, 3, 227, 227) * 60`` inputs and random labels, ``train()`` mode
(dropout on). Inference = ``eval()`` under ``torch.no_grad()``. Each row is set against a
matmul ceiling measured right after its timed steps, on its devices, in its compute dtype.
The columns are described in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
import torchvision
from torchvision.models import AlexNet as TorchvisionNet

from split_alexnet.network.flops import default_input_size, flops_per_step
from split_alexnet.network.model import ModelConfig
from split_alexnet.network.parallelize import (amp_dtype, autocast_context, grad_scaler,
                                               parallelize, to_input_format, unwrap)
from split_alexnet.network.placement import build_model
from split_alexnet.training.optim import build_optimizer

LAYOUTS = ("split", "split-one-device", "collapsed", "half", "torchvision")
FAST_PATH_TOKENS = ("fp32", "channels_last", "bf16", "fp16", "compile", "cudnn_benchmark")
ARCH_OF = {"split": "alexnet", "split-one-device": "alexnet", "collapsed": "alexnet",
           "half": "half", "torchvision": "torchvision"}

#: ``ceiling(device, dtype)``: the FLOP/s a row on ``device`` in ``dtype`` is set against.
Ceiling = Callable[[torch.device, torch.dtype], float]


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


def compute_dtype(fast_path: str) -> torch.dtype:
    """The dtype a fast path computes in: its autocast dtype, else float32."""
    return amp_dtype(parse_fast_path(fast_path)["amp"]) or torch.float32


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
    """The distinct devices a ``layout``'s network runs on (synchronised, ceilings summed)."""
    if layout == "split":
        return list(dict.fromkeys(devices))
    return [devices[0]]


def sync(devices) -> None:
    """Wait for the queued work of every CUDA device in ``devices``."""
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def device_name(d: torch.device) -> str:
    """The rows' ``device_name``: the GPU's name, or the CPU and its core count."""
    if d.type == "cuda":
        return torch.cuda.get_device_name(d)
    return f"cpu x{os.cpu_count()}"


# ----------------------------------------------------------------------------- memory
def _rss_bytes() -> int | None:
    """The process's resident set in bytes (None where /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _RssPeak:
    """Samples the process's resident set every 5 ms (CPU rows: no allocator statistics)."""

    def __init__(self) -> None:
        """Read the starting resident set (the thread starts on ``with``)."""
        self.base = _rss_bytes()
        self.peak = self.base or 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        """The sampling thread: keep the largest resident set seen until stopped."""
        while not self._stop.wait(0.005):
            r = _rss_bytes()
            if r is not None and r > self.peak:
                self.peak = r

    def __enter__(self) -> "_RssPeak":
        """Start sampling (not where the resident set cannot be read)."""
        if self.base is not None:
            self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        """Stop sampling."""
        self._stop.set()
        if self._t.is_alive():
            self._t.join()

    def growth(self) -> int | None:
        """Bytes the resident set grew by at its peak (None where it cannot be read)."""
        return None if self.base is None else self.peak - self.base


def _reset_peak_memory(devices) -> None:
    """Start the CUDA devices' peak-allocation counters afresh."""
    for d in devices:
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)


def _peak_memory(devices, rss: _RssPeak) -> dict:
    """The ``peak_mem`` column: each CUDA device's peak allocation, the resident set's growth
    for the CPU."""
    if not any(d.type == "cuda" for d in devices):
        return {"cpu (rss growth)": rss.growth()}
    mem = {str(d): torch.cuda.max_memory_allocated(d) for d in devices if d.type == "cuda"}
    if any(d.type == "cpu" for d in devices):
        mem["cpu (rss growth)"] = rss.growth()
    return mem


def _release(devices) -> None:
    """Give the memory of the networks just dropped back (Python objects, CUDA caches)."""
    gc.collect()
    for d in devices:
        if d.type == "cuda":
            torch.cuda.empty_cache()


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


# ----------------------------------------------------------------------------- the row
@dataclass
class Row:
    """One result row: a configuration, its timed steps and what they are set against.
    :meth:`to_dict` is the one place the row's keys are made; :meth:`add_round` pools a later
    round of the same configuration into it."""

    layout: str
    devices: str                   # both towers' devices for split, else the one device
    mode: str                      # "train" or "infer"
    batch_size: int
    fast_path: str
    times_s: list[float]           # every timed step
    flops: float                   # per step
    peak_flops: float              # the ceilings of the row's devices, summed (mean of rounds)
    bytes_between_towers: int | None
    peak_mem: dict | None          # None: not measured (the interleaved models coexist)
    warmup_s: float | None         # None: an interleaved row (its models warm up together)
    device_name: str
    tf32: dict[str, bool] = field(default_factory=dict)  # CUDA rows: the TF32 switches
    rounds: int = 1

    def add_round(self, other: "Row") -> None:
        """Pool ``other`` (the same configuration, measured in a later round) into this row:
        its timed steps join these, its ceiling joins the mean."""
        self.times_s = self.times_s + other.times_s
        self.peak_flops = (self.peak_flops * self.rounds + other.peak_flops) / (self.rounds + 1)
        self.rounds += 1

    def to_dict(self) -> dict:
        """The row as the table and ``--json`` have it (docs/benchmarks.md)."""
        b, med, best = self.batch_size, statistics.median(self.times_s), min(self.times_s)
        how = {"interleaved": True} if self.warmup_s is None else {"warmup_s": self.warmup_s}
        return {"layout": self.layout, "devices": self.devices, "mode": self.mode,
                "batch_size": b, "images_per_s": b / med, "fast_path": self.fast_path,
                "step_ms": med * 1e3, "min_step_ms": best * 1e3, "images_per_s_best": b / best,
                "steps": len(self.times_s), "times_s": list(self.times_s), **how,
                "gflop_per_image": self.flops / b / 1e9, "gflops": self.flops / med / 1e9,
                "peak_gflops": self.peak_flops / 1e9,
                "fraction_of_peak": self.flops / med / self.peak_flops,
                "bytes_between_towers": self.bytes_between_towers, "peak_mem": self.peak_mem,
                **self.tf32, "kind": "model", "rounds": self.rounds,
                "optimizer": optimizer_of(self.layout, self.mode),
                "torch": torch.__version__, "device_name": self.device_name}


def _tower_bytes(net: torch.nn.Module, mode: str) -> int | None:
    """Bytes that crossed between the towers in one step (None for a one-tower net): the
    split net records its forward transfers; a training step sends each gradient back too."""
    traffic = getattr(unwrap(net), "traffic", None)
    if not traffic:
        return None
    return sum(t.bytes for t in traffic) * (2 if mode == "train" else 1)


def _tf32_flags(devices) -> dict[str, bool]:
    """Whether fp32 convolutions / matmuls may use TF32 (CUDA rows only: empty otherwise)."""
    if not any(d.type == "cuda" for d in devices):
        return {}
    return {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def make_row(layout: str, mode: str, fast_path: str, devices, batch: int, times: list[float],
             net: torch.nn.Module, ceiling: Ceiling, *, warmup_s: float | None,
             peak_mem: dict | None) -> Row:
    """The row of one configuration's timed steps. Its ceiling is measured now (on each of
    the row's devices, in its compute dtype), after everything else about the row is read."""
    devs = layout_devices(layout, devices)
    shown = devices if layout == "split" else devs
    dtype = compute_dtype(fast_path)
    return Row(layout=layout, devices=",".join(map(str, shown)), mode=mode, batch_size=batch,
               fast_path=fast_path, times_s=times,
               flops=flops_per_step(ARCH_OF[layout], mode, batch),
               bytes_between_towers=_tower_bytes(net, mode), peak_mem=peak_mem,
               warmup_s=warmup_s, device_name=device_name(devices[0]),
               peak_flops=sum(ceiling(d, dtype) for d in devs))  # cpu,cpu: one (shared cores)


# ----------------------------------------------------------------------------- one config
def _built_step(layout: str, devices, fp: dict, mode: str, batch: int):
    """(network, one step) of ``layout`` with the fast paths ``fp``, on random inputs at the
    paper's scale, placed and wrapped by :func:`parallelize`."""
    devs = layout_devices(layout, devices)
    size = default_input_size(ARCH_OF[layout])
    net = parallelize(build(layout, devices), placement(layout, devices),
                      channels_last=fp["channels_last"], compile=fp["compile"],
                      cudnn_benchmark=True if fp["cudnn_benchmark"] else None)
    x = to_input_format(torch.randn(batch, 3, size, size, device=devs[0]) * 60,
                        fp["channels_last"])
    y = torch.randint(0, 1000, (batch,), device=devs[0])
    return net, _step_fn(net, mode, fp, x, y, devs)


def _step_fn(net, mode: str, fp: dict, x, y, devices) -> Callable[[], None]:
    """One inference forward, or one training step with the paper's optimizer, of ``net``
    on ``(x, y)`` under the fast path's autocast."""
    dtype = amp_dtype(fp["amp"])
    if mode == "infer":
        net.eval()

        def step():
            """One forward, no gradients."""
            with torch.no_grad(), autocast_context(devices, dtype):
                net(x)
        return step
    net.train()
    if isinstance(unwrap(net), TorchvisionNet):  # its own layer names: torch's SGD, same settings
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    else:
        opt = build_optimizer(unwrap(net))
    scaler = grad_scaler(devices[0], dtype)

    def step():
        """One optimizer step: forward, loss, backward, update."""
        opt.zero_grad(set_to_none=True)
        with autocast_context(devices, dtype):
            loss = F.cross_entropy(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return step


def optimizer_of(layout: str, mode: str) -> str | None:
    """The optimizer a training row steps with: the paper's update (``PaperSGD``) on this
    repository's networks; ``torch.optim.SGD`` (momentum 0.9, weight decay 5e-4, lr 0.01:
    the paper's settings) on torchvision's, whose layers have other names. None for
    inference."""
    if mode != "train":
        return None
    return "torch.optim.SGD" if layout == "torchvision" else "PaperSGD"


@contextlib.contextmanager
def _keeping_cudnn_benchmark() -> Iterator[None]:
    """Put ``torch.backends.cudnn.benchmark`` back as it was (a fast path may switch it on)."""
    old = torch.backends.cudnn.benchmark
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def _warm_up(step: Callable[[], None], devices, n: int) -> float:
    """Run ``n`` untimed steps; the seconds they took (torch.compile's compile time too)."""
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(devices)
    return time.perf_counter() - t0


def _timed(step: Callable[[], None], devices) -> float:
    """Seconds of one step, between device synchronisations."""
    sync(devices)
    t0 = time.perf_counter()
    step()
    sync(devices)
    return time.perf_counter() - t0


def measure(layout: str, mode: str, fast_path: str, devices, batch: int, warmup: int,
            steps: int, ceiling: Ceiling) -> Row:
    """One row. ``ceiling(device, dtype)`` is measured right after the timed steps (after the
    memory statistics are read), so that it sees the same machine load as the steps."""
    devs = layout_devices(layout, devices)
    _reset_peak_memory(devs)
    torch.manual_seed(0)
    with _RssPeak() as rss, _keeping_cudnn_benchmark():
        net, step = _built_step(layout, devices, parse_fast_path(fast_path), mode, batch)
        warmup_s = _warm_up(step, devs, warmup)
        times = [_timed(step, devs) for _ in range(steps)]
    row = make_row(layout, mode, fast_path, devices, batch, times, net, ceiling,
                   warmup_s=warmup_s, peak_mem=_peak_memory(devs, rss))
    row.tf32 = _tf32_flags(devs)  # fp32 convs use TF32 tensor cores if this is on
    del net, step
    _release(devs)
    return row


def interleaved(layout: str, mode: str, fast_paths: list[str], devices, batch: int,
                warmup: int, steps: int, ceiling: Ceiling) -> list[Row]:
    """A/B on a shared machine: every fast path of ``layout`` built at once, then one timed
    step of each in turn, ``steps`` times, so that load changes hit all of them alike. Peak
    memory is not reported (the models coexist)."""
    devs = layout_devices(layout, devices)
    built = {}
    with _keeping_cudnn_benchmark():
        for f in fast_paths:
            torch.manual_seed(0)
            built[f] = _built_step(layout, devices, parse_fast_path(f), mode, batch)
            _warm_up(built[f][1], devs, warmup)
        times: dict[str, list[float]] = {f: [] for f in built}
        for _ in range(steps):
            for f, (_, step) in built.items():
                times[f].append(_timed(step, devs))
    rows = [make_row(layout, mode, f, devices, batch, times[f], net, ceiling, warmup_s=None,
                     peak_mem=None) for f, (net, _) in built.items()]
    del built
    _release(devs)
    return rows
