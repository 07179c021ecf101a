"""The checkpoint state of a run whose processes each hold part of the network: under
--parallel towers the two processes of pair 0 send their towers' weights and optimizer
buffers to rank 0, under --parallel hybrid every process sends its rows of fc6-fc8 (and rank
0 keeps the convolutional layers, the same in every process); rank 0 joins them into the
in-process network's state (the collapsed layout's keys, as every checkpoint holds). Each
rank's random state is kept under its replica's number. So every mode resumes every other's
checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.distributed as dist

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
    parts: list[Any] | None = [None] * t.ctx.world_size if t.is_main else None
    dist.gather_object(mine, parts, dst=0)
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


def replica_states(states: list[Any], t: "Trainer") -> dict[str, Any]:
    """Each process's random state (``states``, by rank), kept once per replica as
    ``rank{k}`` (an in-process run's process k is replica k): the two processes of a pair
    draw alike."""
    if t.ctx.tower is None:
        return {f"rank{r}": v for r, v in enumerate(states)}
    return {f"rank{r // 2}": v for r, v in enumerate(states) if r % 2 == 0}
