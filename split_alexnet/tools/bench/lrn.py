"""LRN benchmark: ``python -m split_alexnet.bench lrn [--quick]`` (or ``python -m split_alexnet.tools.bench.lrn``).

Rows (dicts, also printed as a table):

All times are the fastest of several repetitions (the machine may be shared), except where a
median is named.

* ``copy``: the machine's copy bandwidth, ``y.copy_(x)`` on a big float32 tensor
  (bytes = read + write).
* ``lrn``: the LRN alone, forward + backward, for each implementation, on the two maps of the
  collapsed AlexNet (conv1: (B, 96, 55, 55), conv2: (B, 256, 27, 27), each as two 48/128-channel
  towers via ``groups=2``). ``GB/s`` counts the bytes an ideal fused kernel must move: forward
  reads x and writes y, backward reads x and dy and writes dx: 5 x numel x itemsize.
  ``torch-nn`` is ``torch.nn.LocalResponseNorm`` applied per tower (for comparison).
* ``net``: the AlexNet train step (SGD momentum, cross-entropy, 227x227 input) at batch 32
  with LRN off / reference / fused, images/s, and LRN's share of the step
  ``1 - t(off) / t(with LRN)``, on ``split_alexnet.network.model.AlexNet`` (the collapsed
  layout). The implementation is switched by setting ``impl`` on every LocalResponseNorm
  module of the net. Configurations are timed in interleaved rounds (drift and other load hit
  all alike); the share is given from the fastest step (least disturbed by other processes),
  from the median, and from the process CPU time (all threads; less sensitive to waiting for a
  busy core); img/s is from the fastest step.

Threads are set explicitly (``--threads``, default 2) for torch intra-op and inter-op.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from split_alexnet.utils.cli import Parser, first_sentence
from split_alexnet.network.lrn import LocalResponseNorm
from split_alexnet.network.model import AlexNet

IMPLS = ("torch-nn", "reference", "function", "cpp")


def _time(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)  # least disturbed by other processes on a shared machine


def copy_bandwidth(numel: int, reps: int) -> dict:
    x = torch.randn(numel)
    y = torch.empty_like(x)
    t = _time(lambda: y.copy_(x), reps, warmup=2)
    return {"kind": "copy", "name": f"y.copy_(x) {numel * 4 / 2**20:.0f} MiB", "ms": t * 1e3,
            "GB/s": 2 * numel * 4 / t / 1e9}


def _lrn_fn(impl: str, groups: int):
    if impl == "torch-nn":
        m = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)  # the paper's formula
        return lambda x: torch.cat([m(p) for p in x.chunk(groups, 1)], 1)
    return LocalResponseNorm(5, 1e-4, 0.75, 2.0, reading="paper", impl=impl, groups=groups)


def lrn_rows(batch: int, reps: int, impls, copy_gbs: float) -> list[dict]:
    rows = []
    for name, shape in (("conv1 maps", (batch, 96, 55, 55)), ("conv2 maps", (batch, 256, 27, 27))):
        x0 = torch.relu(torch.randn(shape) * 20)  # post-ReLU, roughly the net's scale
        g = torch.randn(shape)
        nbytes = 5 * x0.numel() * x0.element_size()
        for impl in impls:
            f = _lrn_fn(impl, 2)
            x = x0.clone().requires_grad_(True)

            def fwd():
                with torch.no_grad():
                    f(x)

            def fwdbwd():
                x.grad = None
                f(x).backward(g)

            tf = _time(fwd, reps)
            tfb = _time(fwdbwd, reps)
            gbs = nbytes / tfb / 1e9
            rows.append({"kind": "lrn", "name": f"{name} {tuple(shape)} groups=2", "impl": impl,
                         "fwd ms": tf * 1e3, "fwd+bwd ms": tfb * 1e3, "GB/s": gbs,
                         "% of copy": 100 * gbs / copy_gbs})
    return rows


# ----------------------------------------------------------------------------- network
MODEL_NAME = "split_alexnet.network.model.AlexNet"  # the "model" column of the rows


def _set_impl(net: nn.Module, impl: str) -> int:
    n = 0
    for m in net.modules():
        if isinstance(m, LocalResponseNorm):
            m.impl = impl
            n += 1
    return n


def net_rows(batch: int, rounds: int, impls) -> list[dict]:
    torch.manual_seed(0)
    configs = [("off", "off", None)] + [(f"paper/{i}", "paper", i) for i in impls]
    nets, steps = {}, {}
    x = torch.randn(batch, 3, 227, 227) * 60
    y = torch.randint(0, 1000, (batch,))
    for label, reading, impl in configs:
        net = AlexNet(1000, lrn=reading)
        if impl is not None and _set_impl(net, impl) == 0:
            print(f"bench lrn: no LocalResponseNorm modules found in {MODEL_NAME}", file=sys.stderr)
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)

        def step(net=net, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()

        nets[label] = net
        steps[label] = step
        step()  # warm-up (also builds the C++ kernel if needed)
    times = {label: [] for label, _, _ in configs}
    cpu = {label: [] for label, _, _ in configs}
    for _ in range(rounds):  # interleaved: drift hits all configurations alike
        for label in times:
            c0, t0 = time.process_time(), time.perf_counter()
            steps[label]()
            times[label].append(time.perf_counter() - t0)
            cpu[label].append(time.process_time() - c0)
    t_off_min, t_off_med = min(times["off"]), statistics.median(times["off"])
    c_off = min(cpu["off"])
    rows = []
    for label, ts in times.items():
        t_min, t_med, c_min = min(ts), statistics.median(ts), min(cpu[label])
        off = label == "off"
        rows.append({"kind": "net", "name": f"train step b{batch}", "model": MODEL_NAME, "impl": label,
                     "rounds": len(ts), "min ms": t_min * 1e3, "median ms": t_med * 1e3,
                     "cpu ms (min)": c_min * 1e3, "img/s": batch / t_min,
                     "LRN share % (min)": 0.0 if off else 100 * (1 - t_off_min / t_min),
                     "LRN share % (median)": 0.0 if off else 100 * (1 - t_off_med / t_med),
                     "LRN share % (cpu)": 0.0 if off else 100 * (1 - c_off / c_min)})
    return rows


def print_table(rows: list[dict]) -> None:
    """One table per row kind (copy / lrn / net)."""
    kinds = list(dict.fromkeys(r.get("kind", "") for r in rows))
    for kind in kinds:
        part = [r for r in rows if r.get("kind", "") == kind]
        keys: list[str] = []
        for r in part:
            keys += [k for k in r if k not in keys]
        cells = [[_fmt(r.get(k, "")) for k in keys] for r in part]
        widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
        print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
        for c in cells:
            print("  ".join(v.ljust(w) for v, w in zip(c, widths)))
        print()


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``lrn`` options; ``--quick`` only if the caller's parser lacks it."""
    if "--quick" not in p._option_string_actions:
        p.add_argument("--quick", action="store_true", help="fewer repetitions (about a minute)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--impls", default=",".join(IMPLS),
                   help=f"LRN implementations for the LRN-alone rows (of {IMPLS + ('compile',)})")
    p.add_argument("--net-impls", default="reference,cpp",
                   help="LRN implementations for the train-step rows (besides 'off')")
    p.add_argument("--no-net", action="store_true", help="skip the train-step rows")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds of train steps (default 12, --quick 4)")


def run(args) -> list[dict]:
    threads = getattr(args, "threads", 2) or 2
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set once in this process
        pass
    quick = getattr(args, "quick", False)
    batch = getattr(args, "batch", 32)
    impls = [i for i in getattr(args, "impls", ",".join(IMPLS)).split(",") if i]
    net_impls = [i for i in getattr(args, "net_impls", "reference,cpp").split(",") if i]
    rows = [copy_bandwidth(2**24 if quick else 2**26, 5 if quick else 10)]
    rows[0]["threads"] = threads
    rows += lrn_rows(batch, 3 if quick else 7, impls, rows[0]["GB/s"])
    if not getattr(args, "no_net", False):
        rows += net_rows(batch, getattr(args, "rounds", None) or (4 if quick else 12), net_impls)
    print_table(rows)
    return rows


def main(argv=None) -> None:
    p = Parser(module="split_alexnet.tools.bench.lrn", description=first_sentence(__doc__))
    add_arguments(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
