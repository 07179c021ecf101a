"""One training step of --parallel hybrid's network in each schedule, on fixed random
images, under torchrun: schedule 'gather' (the trainer's step: forward, loss, backward, the
convolutional gradients summed, the update) and 'sequential' with --fc-updates once and each
(``hybrid_step.sequential_step``, as the trainer calls it). Rank 0 writes the whole network's
state after each variant to $REPORT/hybrid_K<K>.pt, with the bytes this process sent per step
through the collectives (counted as ring algorithms send, as bench comm counts them: the
exchanges of fc6-fc8 and the convolutional gradients; the host-side batch sizes are not
counted); tests/test_hybrid.py computes the same steps in one process and compares.

Usage: torchrun --nproc-per-node N hybrid_steps.py K:CLASSES:BATCH_PER_PROCESS... (K <= N)
"""

import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import split_alexnet.network.hybrid as hybrid_module
from split_alexnet.network.hybrid import FC_LAYERS, HybridAlexNet, join_parts
from split_alexnet.network.model import AlexNet, ModelConfig
from split_alexnet.training.hybrid_step import sequential_step
from split_alexnet.training.optim import build_optimizer

STEPS = 1  # tests/test_hybrid.py's docstring says why not more
SENT = [0.0]  # bytes this process sent through the counted collectives


def counted(fn, whole_arg: int, factor: float):
    """``fn`` (a collective) that adds factor * (K-1)/K * (bytes of its argument number
    ``whole_arg``, the whole tensor) to SENT: what a ring algorithm sends per process."""
    def call(*args, **kwargs):
        k = dist.get_world_size(kwargs.get("group"))
        t = args[whole_arg]
        SENT[0] += factor * (k - 1) / k * t.numel() * t.element_size()
        return fn(*args, **kwargs)
    return call


def count_collectives() -> None:
    """Count what the hybrid's collectives send, from here on (in this process only)."""
    hybrid_module._all_gather = counted(hybrid_module._all_gather, 0, 1)       # the output
    hybrid_module._reduce_scatter = counted(hybrid_module._reduce_scatter, 1, 1)  # the input
    dist.broadcast = counted(dist.broadcast, 0, 1)
    dist.reduce = counted(dist.reduce, 0, 1)
    dist.all_reduce = counted(dist.all_reduce, 0, 2)


def inputs(classes: int, k: int, b: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s global batch (K*b images and labels), the same in every process."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(k * b, 3, 227, 227, generator=g) * 60, \
        torch.randint(0, classes, (k * b,), generator=g)


def steps(classes: int, b: int, group, host, ahead) -> dict:
    """Each variant's steps on the processes of ``group`` (K of them): the whole
    network's state after them, and the bytes this process sent per step."""
    rank, k = dist.get_rank(group), dist.get_world_size(group)
    results = {}
    torch.manual_seed(0)  # the same initial network in every process and variant
    start = AlexNet(ModelConfig(num_classes=classes, dropout=0.0, init="caffe"))
    for variant in ("gather", "sequential-once", "sequential-each"):
        net = HybridAlexNet(copy.deepcopy(start), rank=rank, parts=k)
        net.group, net.host_group, net.ahead_group = group, host, ahead
        opt = build_optimizer(net, lr=0.01)
        SENT[0] = 0.0
        for step in range(STEPS):
            x, y = inputs(classes, k, b, step)
            x, y = x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]
            opt.zero_grad(set_to_none=True)
            if variant == "gather":
                F.cross_entropy(net(x), y).backward()
                net.reduce_conv_grads(mean=False)
                opt.step()
            else:
                sequential_step(net, opt, x, y, variant.split("-")[1])
        results[f"{variant} bytes"] = torch.tensor(SENT[0] / STEPS, dtype=torch.float64)
        # rank 0 joins the processes' rows of fc6-fc8 to its own convolutional layers
        mine = {n: v.detach() for n, v in net.state_dict().items()
                if rank == 0 or n.split(".")[0] in FC_LAYERS}
        parts = [None] * k if rank == 0 else None
        dist.gather_object(mine, parts, dst=0, group=group)
        if rank == 0:
            results[variant] = join_parts(parts)
    return results


def main() -> None:
    """One job for every K:CLASSES:BATCH given: the first K processes run it, the others
    wait (each K in groups of its own, created by every process in the same order)."""
    specs = [tuple(int(v) for v in spec.split(":")) for spec in sys.argv[1:]]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world_rank = dist.get_rank()
    count_collectives()
    for k, classes, b in specs:
        ranks = list(range(k))
        group, host, ahead = (dist.new_group(ranks, backend="gloo") for _ in range(3))
        if world_rank < k:
            results = steps(classes, b, group, host, ahead)
            if world_rank == 0:
                torch.save(results, Path(os.environ["REPORT"]) / f"hybrid_K{k}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
