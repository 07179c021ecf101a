"""Data parallelism across processes and machines, from torch.distributed (not our code).

One process per GPU pair. Inside a process the paper's model parallelism splits the network
into two towers; across processes DistributedDataParallel all-reduces the gradients. Under
``torchrun`` (LOCAL_RANK, RANK, WORLD_SIZE set) process i takes GPUs (2i, 2i+1) of its node
by default, or the pairs given by ``--gpus`` (e.g. ``--gpus 0,1,2,3``: pair i is entries
2i and 2i+1). ``--single-device`` gives each process one GPU (plain DDP). With
``--devices cpu,cpu`` every process trains on the CPU over gloo, so the whole path is
testable without GPUs. See docs/scaling.md.

What each rank does, and why:

* data: :class:`split_alexnet.data.EpochSampler` shards by rank (rank r takes perm[r::world]
  of the epoch's permutation, the same length on every rank). The trainer builds a fresh
  sampler for every epoch with that epoch number (and the mid-epoch start position), which is
  what ``DistributedSampler.set_epoch`` does: every epoch is a new permutation, identical on
  every rank. Evaluation uses ``shuffle=False``: rank r takes range(r, n, world), no padding,
  so the all-reduced sums count every validation image exactly once.
* batch: ``--batch-size`` is global (split across the processes; it must divide) unless
  ``--per-process-batch``. Learning rate: with a fixed global batch keep the paper's 0.01;
  with a per-process batch the global batch is world x batch, and the linear scaling rule
  (Goyal et al. 2017: lr x k for a k times larger batch, with warm-up) is the usual starting
  point. Nothing is scaled automatically.
* output: only rank 0 writes logs, plots and checkpoints; every rank joins the gather of the
  RNG states (one per rank) and every rank resumes from the same file.
* dropout: each rank draws its own dropout stream (seeded from the seed and the rank).
* failures: the process group has a timeout (``SPLIT_ALEXNET_DIST_TIMEOUT`` seconds, default
  600) so a rank whose peers died stops with an error instead of hanging; under torchrun the
  agent also tears the group down as soon as one worker exits with an error. Set-up waits
  (rank 0 computing dataset statistics) use a separate gloo group with a long timeout
  (``SPLIT_ALEXNET_SETUP_TIMEOUT``, default 86400 s).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from split_alexnet.network.placement import layout_of, resolve_devices, tower_rank_device
from split_alexnet.utils.cli import Abort, UsageError

BACKENDS = ("auto", "nccl", "gloo")
#: How the processes share the work (--parallel; docs/scaling.md): ``pair``, both towers in
#: each process and DDP across processes; ``towers``, one process per tower on a data x tower
#: mesh; ``hybrid``, Krizhevsky's 2014 scheme on a one-dimensional mesh of K processes (the
#: convolutional layers data-parallel, the fully connected ones split by units).
PARALLEL = ("pair", "towers", "hybrid")


@dataclass(frozen=True)
class Context:
    """This process's place in the job. ``data_rank`` / ``data_size``: its replica among the
    data-parallel ones (the rank and world size, except under --parallel towers, where both
    processes of a pair are one replica); ``tower``: the tower it holds under --parallel
    towers (None: both, in this process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    data_rank: int = -1         # -1: the rank (a process is a replica)
    data_size: int = -1         # -1: the world size
    tower: int | None = None
    mesh: Any = None            # --parallel towers: the (data, tower) DeviceMesh; hybrid: (hybrid,)

    def __post_init__(self) -> None:
        if self.data_rank < 0:
            object.__setattr__(self, "data_rank", self.rank)
        if self.data_size < 0:
            object.__setattr__(self, "data_size", self.world_size)

    @property
    def spans_processes(self) -> bool:
        """Whether the network is spread over the processes (--parallel towers or hybrid:
        its forward exchanges activations between them), not whole in each of them."""
        return self.mesh is not None

    def group(self, dim: str) -> Any:
        """The process group of mesh dimension ``dim`` ('data' or 'tower'; 'hybrid')."""
        return self.mesh.get_group(dim)


def control_group() -> Any:
    """The gloo group of every process, for small host-side exchanges (CPU tensors: no
    device stream waits for them); None without torchrun."""
    return _CONTROL_GROUP


_SETUP_GROUP: Any = None  # a gloo group with a long timeout, for set-up barriers
_CONTROL_GROUP: Any = None  # a gloo group for the step loop's flags: CPU tensors, no GPU sync


def env_context() -> Context:
    """Rank and world from the variables torchrun (or SLURM + torchrun) sets."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return Context()
        rank = int(os.environ.get("RANK", "0"))
        ctx = Context(rank=rank, world_size=world,
                      local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                      local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    except ValueError:
        raise UsageError("WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers "
                         "(they are set by torchrun)") from None
    if not (0 <= ctx.rank < ctx.world_size and 0 <= ctx.local_rank < ctx.local_world_size):
        raise UsageError(f"inconsistent torchrun environment: RANK={ctx.rank} "
                         f"WORLD_SIZE={ctx.world_size} LOCAL_RANK={ctx.local_rank} "
                         f"LOCAL_WORLD_SIZE={ctx.local_world_size}")
    return ctx


def local_batch_size(cfg, ctx: Context) -> int:
    """--batch-size is global by default (split across processes), or per process."""
    o, n = cfg.optim, ctx.data_size
    if o.per_process_batch or n == 1:
        return o.batch_size
    if o.batch_size % n:
        what = f"{n} tower pairs" if ctx.tower is not None else f"{n} processes"
        raise UsageError(f"global --batch-size {o.batch_size} does not divide among {what}; "
                         f"use a multiple of {n} or --per-process-batch")
    return o.batch_size // n


def resolve_backend(backend: str, devices: Sequence[torch.device]) -> str:
    """--backend 'auto' is nccl when every device is a CUDA device, gloo otherwise."""
    if backend == "auto":
        backend = "nccl" if all(d.type == "cuda" for d in devices) else "gloo"
    if backend == "nccl" and any(d.type != "cuda" for d in devices):
        raise UsageError("the nccl backend needs CUDA devices but this process has "
                         f"{', '.join(map(str, devices))}; use --backend gloo (or auto)")
    return backend


def _seconds(var: str, default: float) -> datetime.timedelta:
    raw = os.environ.get(var, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise UsageError(f"{var} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise UsageError(f"{var} must be > 0, got {raw!r}")
    return datetime.timedelta(seconds=value)


def check_parallel(cfg, ctx: Context) -> None:
    """--parallel towers needs torchrun with an even number of processes, and the paper's
    two-tower network in the split layout; --parallel hybrid needs torchrun (K >= 2
    processes), the two-tower network, and for its sequential schedule no fp16 scaler and no
    compile: else one :class:`UsageError` line, before any network traffic. (That K divides
    the fully connected layers' units is checked once the class count is known.)"""
    rt, mode = cfg.runtime, cfg.runtime.parallel
    if mode == "pair":
        return
    if ctx.world_size == 1:
        what = "one process per tower" if mode == "towers" else \
            "K >= 2 processes, the convolutions data-parallel and fc6-fc8 split across them"
        raise UsageError(f"--parallel {mode} runs {what}: start it with torchrun "
                         f"(torchrun --nproc-per-node 2 -m split_alexnet.train --parallel "
                         f"{mode} ...), or give --parallel pair for both towers in this "
                         f"process")
    if mode == "towers" and ctx.world_size % 2:
        raise UsageError(f"--parallel towers needs an even number of processes (a pair per "
                         f"replica); torchrun started {ctx.world_size}")
    if cfg.model.arch == "half" or (mode == "towers" and rt.single_device):
        what = "--single-device" if rt.single_device else "--arch half"
        raise UsageError(f"--parallel {mode} splits the paper's two-tower network across "
                         f"processes; {what} has one column: use --parallel pair")
    if mode == "hybrid" and rt.compile:
        raise UsageError("--parallel hybrid runs eager: its exchanges are collectives inside "
                         "autograd; drop --compile")
    if mode == "hybrid" and rt.hybrid_schedule == "sequential" and rt.amp == "fp16":
        raise UsageError("--hybrid-schedule sequential updates several times per step, which "
                         "a GradScaler cannot follow: use --amp bf16 or off, or --hybrid-"
                         "schedule gather")


def setup(cfg) -> tuple[Context, tuple[torch.device, ...]]:
    """This process's rank and devices (``placement.resolve_devices`` with the config's
    device flags; without any, the paper's two GPUs; under --parallel towers one device,
    ``placement.tower_rank_device``). Under torchrun every up-front check (devices,
    backend, batch split) runs before any network traffic, then the process joins the group
    (and with --parallel towers builds the data x tower mesh); for one process nothing is
    joined."""
    global _SETUP_GROUP, _CONTROL_GROUP
    ctx = env_context()
    rt = cfg.runtime
    check_parallel(cfg, ctx)
    towers = rt.parallel == "towers"
    if rt.parallel in ("towers", "hybrid"):  # one device per process
        devices: tuple[torch.device, ...] = (tower_rank_device(
            rt.gpus, rt.devices, ctx.local_rank, ctx.local_world_size, rt.parallel),)
    if towers:
        ctx = replace(ctx, data_rank=ctx.rank // 2, data_size=ctx.world_size // 2,
                      tower=ctx.rank % 2)
    elif rt.parallel == "pair":
        devices = resolve_devices(rt.gpus, rt.devices, layout_of(cfg.model.arch,
                                                                 rt.single_device)
                                  == "collapsed", default="paper",
                                  torchrun=(ctx.local_rank, ctx.local_world_size)
                                  if ctx.world_size > 1 else None)
    backend = resolve_backend(rt.backend, devices)
    if ctx.world_size > 1 and not dist.is_initialized():
        local_batch_size(cfg, ctx)
        timeout = _seconds("SPLIT_ALEXNET_DIST_TIMEOUT", 600.0)
        setup_timeout = _seconds("SPLIT_ALEXNET_SETUP_TIMEOUT", 86400.0)
        if backend == "nccl":
            torch.cuda.set_device(devices[0])
        dist.init_process_group(backend, timeout=timeout)
        _SETUP_GROUP = dist.new_group(backend="gloo", timeout=setup_timeout)
        _CONTROL_GROUP = dist.new_group(backend="gloo", timeout=timeout)
    if towers:
        # rank = 2 * data_rank + tower: the pair's two processes are neighbours
        mesh = init_device_mesh("cuda" if backend == "nccl" else "cpu", (ctx.data_size, 2),
                                mesh_dim_names=("data", "tower"))
        ctx = replace(ctx, mesh=mesh)
    elif rt.parallel == "hybrid":  # every process a data replica and a part of fc6-fc8
        ctx = replace(ctx, mesh=init_device_mesh("cuda" if backend == "nccl" else "cpu",
                                                 (ctx.world_size,),
                                                 mesh_dim_names=("hybrid",)))
    return ctx, devices


def all_reduce_sum(t: torch.Tensor) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" or t.device.type == "cpu":
            dist.all_reduce(t)
        else:  # gloo with an accelerator tensor
            c = t.cpu()
            dist.all_reduce(c)
            t.copy_(c)


def any_rank_flags(flags: Sequence[bool], ctx: Context) -> list[bool]:
    """Each flag, True on every rank when it is set on any rank, in one all-reduce (a signal
    reached one rank; one rank's clock says it is time to checkpoint). Decisions that lead to
    collectives (saving gathers the RNG states) must agree on every rank, or the ranks
    deadlock. Every rank must call it at the same point. The flags travel as a CPU tensor over
    a gloo group: no GPU stream waits for them."""
    if ctx.world_size == 1 or not dist.is_initialized():
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags])
    dist.all_reduce(t, group=_CONTROL_GROUP)
    return [bool(v > 0) for v in t.tolist()]


def max_over_ranks(values: Sequence[float], ctx: Context) -> list[float]:
    """Each value's maximum over every rank, in one all-reduce: a flag sent as 1.0 or 0.0 is
    set on any rank; a rank's own training loss becomes the highest of the job's (a rank
    without one sends -inf). Every rank must call it at the same point, and then holds the
    same values, so that a decision taken from them is the same on every rank. The values
    travel as a CPU float64 tensor over the control gloo group: no GPU stream waits."""
    if ctx.world_size == 1 or not dist.is_initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return t.tolist()


def gather_objects(obj: Any, ctx: Context) -> list[Any]:
    if ctx.world_size == 1 or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank, with the long set-up timeout (rank 0 may be computing the dataset
    statistics or writing the demo data meanwhile)."""
    if dist.is_initialized():
        if _SETUP_GROUP is not None:
            dist.barrier(group=_SETUP_GROUP)
        else:
            dist.barrier()


def shutdown() -> None:
    global _SETUP_GROUP, _CONTROL_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _SETUP_GROUP = _CONTROL_GROUP = None


#: Words of the errors a collective raises when a peer is gone or silent (gloo, NCCL).
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "timed out",
              "Timed out", "Broken pipe", "NCCL communicator was aborted")


def lost_peer(e: BaseException) -> Abort | None:
    """Under torchrun, the one-line :class:`Abort` (exit 1) for a collective that failed
    because another rank died or stopped answering (the process group's timeout): it names
    this rank and, with two ranks, the other one. None for any other error."""
    ctx = env_context()
    if ctx.world_size == 1 or not isinstance(e, RuntimeError) or not (
            isinstance(e, dist.DistError) or any(w in str(e) for w in _PEER_LOST)):
        return None
    peer = f"rank {1 - ctx.rank}" if ctx.world_size == 2 else "another rank"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return Abort(f"rank {ctx.rank}: {peer} of the job died or stopped answering (a collective "
                 f"failed: {first}); this rank stops too, the checkpoints are untouched")
