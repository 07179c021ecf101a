"""The checkpoint state of a run whose processes each hold part of the network: under
--parallel towers the two processes of pair 0 send their towers' weights and optimizer
buffers to rank 0, under --parallel hybrid every process sends its rows of fc6-fc8 (and rank
0 keeps the convolutional layers, the same in every process); rank 0 joins them into the
in-process network's state (the collapsed layout's keys, as every checkpoint holds). Each
rank's random state is kept under its replica's number. So every mode resumes every other's
checkpoints."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

import split_alexnet.training.distributed as dist_util

from split_alexnet.network.hybrid import HybridAlexNet, join_parts
from split_alexnet.network.model import collapse_state_dict, layout_state_dict
from split_alexnet.training.optim import named_optimizer_state

if TYPE_CHECKING:  # the trainer imports this module
    from split_alexnet.training.trainer import Trainer


def gather_state(t: "Trainer") -> tuple[dict | None, dict | None]:
    """Every process calls it; rank 0 gets (model state, optimizer state) of the whole
    network, layout-independent, the others (None, None)."""
    mine: dict[str, Any] = {}
    hybrid = isinstance(t.net, HybridAlexNet)
    if t.ctx.data_rank == 0 or hybrid:  # the other replicas hold the same weights
        mine = {"model": layout_state_dict(t.net),
                "optimizer": named_optimizer_state(t.net, t.optimizer)}
    parts = _gather_to_rank0(mine, t.ctx.rank, t.ctx.world_size)
    if parts is None:
        return None, None
    if hybrid:  # every process's rows of fc6-fc8, in rank order
        buffers = {key: join_parts([p["optimizer"]["buffers"][key] for p in parts])
                   for key in parts[0]["optimizer"]["buffers"]}
        return join_parts([p["model"] for p in parts]), \
            {"buffers": buffers, "groups": parts[0]["optimizer"]["groups"]}
    pair = [p for p in parts if p]  # the towers of pair 0: ranks 0 and 1
    model = collapse_state_dict({k: v for p in pair for k, v in p["model"].items()})
    buffers: dict[str, dict] = {}
    for p in pair:
        for key, named in p["optimizer"]["buffers"].items():
            buffers.setdefault(key, {}).update(named)
    groups = pair[0]["optimizer"]["groups"]  # tower 0's: every layer's, fc8's included
    return model, {"buffers": {k: collapse_state_dict(v) for k, v in buffers.items()},
                   "groups": groups}


def _gather_to_rank0(mine: dict[str, Any], rank: int, world: int) -> list[Any] | None:
    """Every process's ``{"model": {name: tensor}, "optimizer": {"buffers": {key: {name:
    tensor}}, "groups": [...]}}`` (or ``{}``) on rank 0, in rank order; None elsewhere.
    CPU tensors over the gloo control group: the names, shapes, dtypes and groups go as one
    small object, the values as one flat buffer per process and dtype, received in place
    (pickling hundreds of MB through ``gather_object`` took seconds per checkpoint)."""
    group = dist_util.control_group()
    tensors: list[tuple[tuple[str, ...], torch.Tensor]] = []
    if mine:
        tensors += [(("model", k), v) for k, v in mine["model"].items()]
        tensors += [(("buffers", key, k), v) for key, named in mine["optimizer"]["buffers"].items()
                    for k, v in named.items()]
    meta = ([(path, tuple(v.shape), v.dtype) for path, v in tensors],
            mine["optimizer"]["groups"] if mine else None)
    metas: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(meta, metas, dst=0, group=group)
    dtypes = sorted({v.dtype for _, v in tensors} if rank else (), key=str)
    for dtype in dtypes:  # a sender: one flat buffer per dtype, in its order
        dist.send(torch.cat([v.reshape(-1) for _, v in tensors if v.dtype == dtype]),
                  dst=0, group=group)
    if rank != 0:
        return None
    parts: list[Any] = [mine]
    for r in range(1, world):
        entries, groups = metas[r]
        values: dict[tuple[str, ...], torch.Tensor] = {}
        for dtype in sorted({d for *_, d in entries}, key=str):
            of = [(path, shape) for path, shape, d in entries if d == dtype]
            sizes = [math.prod(shape) for _, shape in of]
            flat = torch.empty(sum(sizes), dtype=dtype)
            dist.recv(flat, src=r, group=group)
            values.update({path: v.view(shape) for (path, shape), v
                           in zip(of, flat.split(sizes))})
        part: dict[str, Any] = {}
        if entries:
            buffers: dict[str, dict] = {}
            for path, _, _ in entries:
                if path[0] == "buffers":
                    buffers.setdefault(path[1], {})[path[2]] = values[path]
            part = {"model": {path[1]: values[path] for path, _, _ in entries
                              if path[0] == "model"},
                    "optimizer": {"buffers": buffers, "groups": groups}}
        parts.append(part)
    return parts


def replica_states(states: list[Any], t: "Trainer") -> dict[str, Any]:
    """Each process's random state (``states``, by rank), kept once per replica as
    ``rank{k}`` (an in-process run's process k is replica k): the two processes of a pair
    draw alike."""
    if t.ctx.tower is None:
        return {f"rank{r}": v for r, v in enumerate(states)}
    return {f"rank{r // 2}": v for r, v in enumerate(states) if r % 2 == 0}
