"""Data parallelism across processes and machines, from torch.distributed (not our code).

One process per GPU pair. Inside a process the paper's model parallelism splits the network
into two towers; across processes DistributedDataParallel all-reduces the gradients. Under
``torchrun`` (LOCAL_RANK, RANK, WORLD_SIZE set) process i takes GPUs (2i, 2i+1) of its node
by default, or the pairs given by ``--gpus`` (e.g. ``--gpus 0,1,2,3``: pair i is entries
2i and 2i+1). With ``--devices cpu,cpu`` every process trains on the CPU over gloo, so the
whole path is testable without GPUs. See docs/scaling.md.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .cli import UsageError
from .placement import parse_device, parse_devices


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1


_CTX = Context()


def env_context() -> Context:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    return Context(rank=int(os.environ.get("RANK", "0")), world_size=world,
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                   local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def devices_for_rank(cfg, ctx: Context) -> tuple[torch.device, ...]:
    """This process's devices under torchrun, with readable errors for bad settings."""
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        if cfg.devices is not None:  # e.g. cpu,cpu in every process (tests, CPU clusters)
            specs = [d for d in cfg.devices.split(",") if d.strip()]
            if cfg.single_device:
                return (parse_device(specs[0]),)
            return parse_devices(specs)
        if cfg.gpus is not None:
            ids = [g.strip() for g in cfg.gpus.split(",") if g.strip()]
        else:
            ids = [str(i) for i in range(n_gpu)]
        per = 1 if cfg.single_device else 2
        if not cfg.single_device and len(ids) % 2:
            raise UsageError(f"an odd number of GPUs ({len(ids)}) cannot form tower pairs; give "
                             "an even count with --gpus, or use --single-device")
        need = ctx.local_world_size * per
        if len(ids) < need:
            raise UsageError(
                f"{ctx.local_world_size} processes on this node need {need} GPUs "
                f"({'one' if per == 1 else 'a pair'} each) but {len(ids)} are available"
                f"{' (' + cfg.gpus + ')' if cfg.gpus else ''}")
        mine = ids[ctx.local_rank * per:(ctx.local_rank + 1) * per]
        specs = [f"cuda:{i}" for i in mine]
        return (parse_device(specs[0]),) if cfg.single_device else parse_devices(specs)
    except ValueError as e:
        raise UsageError(str(e)) from None


def local_batch_size(cfg, ctx: Context) -> int:
    """--batch-size is global by default (split across processes), or per process."""
    if cfg.per_process_batch or ctx.world_size == 1:
        return cfg.batch_size
    if cfg.batch_size % ctx.world_size:
        raise UsageError(f"global --batch-size {cfg.batch_size} does not divide among "
                         f"{ctx.world_size} processes; use a multiple of {ctx.world_size} or "
                         "--per-process-batch")
    return cfg.batch_size // ctx.world_size


def init(cfg) -> Context:
    """Join the process group when launched by torchrun; a no-op for one process."""
    global _CTX
    ctx = env_context()
    if ctx.world_size > 1 and not dist.is_initialized():
        devices = devices_for_rank(cfg, ctx)
        backend = cfg_backend(cfg, devices)
        if backend == "nccl":
            torch.cuda.set_device(devices[0])
        timeout = datetime.timedelta(seconds=float(os.environ.get("SPLIT_ALEXNET_DIST_TIMEOUT",
                                                                  "600")))
        dist.init_process_group(backend, timeout=timeout)
    _CTX = ctx
    return ctx


def cfg_backend(cfg, devices) -> str:
    backend = getattr(cfg, "backend", None) or os.environ.get("SPLIT_ALEXNET_BACKEND") or \
        ("nccl" if all(d.type == "cuda" for d in devices) else "gloo")
    if backend == "nccl" and any(d.type != "cuda" for d in devices):
        raise UsageError("the nccl backend needs CUDA devices; with CPU devices use gloo")
    return backend


def wrap(model: nn.Module, ctx: Context, devices) -> nn.Module:
    """DDP over a module that spans devices: device_ids=None, as the PyTorch docs require."""
    if ctx.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=None)


def all_reduce_sum(t: torch.Tensor) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" or t.device.type == "cpu":
            dist.all_reduce(t)
        else:  # gloo with an accelerator tensor
            c = t.cpu()
            dist.all_reduce(c)
            t.copy_(c)


def any_rank(flag: bool, ctx: Context) -> bool:
    """True on every rank when any rank's flag is set (a signal reached one of them)."""
    if ctx.world_size == 1 or not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return bool(t.item() > 0)


def gather_objects(obj: Any, ctx: Context) -> list[Any]:
    if ctx.world_size == 1 or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
