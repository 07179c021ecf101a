"""Krizhevsky's 2014 hybrid in this process (arXiv 1404.5997, as cuda-convnet2's MultiGPU.md
implements it): :class:`HybridAlexNet`, the whole convolutional part, trained data-parallel,
and 1/K of the output units of fc6, fc7 and fc8, trained model-parallel, with the exchanges
between the K processes as collectives that autograd runs backwards.

The convolutional layers hold about 4% of the parameters and do about 92% of the arithmetic
(``split_alexnet.network.flops``), so each of the K processes runs all of them on its own
share of the batch and the gradients are summed across processes (:meth:`reduce_conv_grads`).
The fully connected layers hold the rest of the parameters, so each process holds rows
``[r*n/K, (r+1)*n/K)`` of each one's weight (n = 4096, 4096, classes): the 2012 split of fc6
and fc7 between the towers is the case K = 2. The processes exchange activities, never the
fully connected layers' gradients:

* the input of fc6 (pool5, 9216 values per image) is gathered from every process
  (:func:`gather_rows`, schedule 'gather': all K*b images at once) or sent by one process to
  all (:func:`broadcast_rows`, schedule 'sequential': one process's b images at a time);
* the units of fc6 and fc7 are gathered across processes to form the next layer's input, and
  fc8's units to form the logits (:func:`gather_units`).

Each exchange's backward sends the gradients back the way the activities came: a gathered
tensor's gradient is summed across processes and each keeps its own part (a reduce-scatter);
a broadcast tensor's gradient is summed onto its sender (a reduce). Every process computes
the logits of all the images in a pass; the loss of a pass is the mean of the K processes'
losses (schedule 'gather': each over its own images, as under DDP; 'sequential': the same
loss in every process), so the logits' gather averages the K gradients it receives.

Same function: the weights are the collapsed layout's (``model.AlexNet``) with the fully
connected rows dealt out, and :meth:`HybridAlexNet.part_of` / the checkpoint's gather convert
between them. The arithmetic is not bitwise the one-process network's: a fully connected
layer sums K*b images in one product, where DDP sums K products of b (tolerances in
tests/test_hybrid.py). Dropout masks are drawn by the process that owns the units, from its
own generator: the same distribution as the other layouts, other draws.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from split_alexnet.network.model import AlexNet, _act, collapse_state_dict

#: The layers split by output units across the processes (their widths: :func:`fc_widths`).
FC_LAYERS = ("fc6", "fc7", "fc8")
#: --hybrid-schedule: how fc6-fc8 meet the K processes' images (docs/scaling.md).
HYBRID_SCHEDULES = ("gather", "sequential")


# The one-tensor gather and reduce-scatter: named ``*_single`` since torch 2.14, which
# deprecates the older ``*_tensor`` names that torch 2.4 to 2.13 have (same arguments).
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def fc_widths(num_classes: int) -> dict[str, int]:
    """Each fully connected layer's output units."""
    return {"fc6": 4096, "fc7": 4096, "fc8": num_classes}


def check_parts(parts: int, num_classes: int) -> None:
    """K processes must divide every fully connected layer's units: else a ValueError that
    names the layer."""
    for layer, width in fc_widths(num_classes).items():
        if width % parts:
            raise ValueError(f"{parts} processes cannot share {layer}'s {width} units "
                             f"equally; use a process count that divides {width}")


# ----------------------------------------------------------------------------- exchanges


class _GatherRows(torch.autograd.Function):
    """Forward: every process's (b, D) rows, stacked in rank order: (K*b, D). Backward: the
    gradient summed across processes, this process's rows kept (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Any, parts: int) -> Tensor:
        ctx.group, ctx.parts = group, parts
        out = x.new_empty((parts * x.shape[0], *x.shape[1:]))
        _all_gather(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.new_empty((grad.shape[0] // ctx.parts, *grad.shape[1:]))
        _reduce_scatter(out, grad.contiguous(), group=ctx.group)
        return out, None, None


class _GatherUnits(torch.autograd.Function):
    """Forward: every process's (n, u) units side by side in rank order: (n, K*u).
    Backward: the gradient summed across processes (divided by K with ``mean``), this
    process's units kept."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Any, parts: int, mean: bool) -> Tensor:
        ctx.group, ctx.parts, ctx.mean = group, parts, mean
        n, u = x.shape
        out = x.new_empty((parts * n, u))
        _all_gather(out, x.contiguous(), group=group)   # (K*n, u)
        return out.view(parts, n, u).transpose(0, 1).reshape(n, parts * u)  # (n, K*u)

    @staticmethod
    def backward(ctx, grad: Tensor):
        n, ku = grad.shape
        u = ku // ctx.parts
        full = grad.reshape(n, ctx.parts, u).transpose(0, 1).contiguous()  # (K, n, u)
        out = grad.new_empty((n, u))
        _reduce_scatter(out, full.view(ctx.parts * n, u), group=ctx.group)
        return (out / ctx.parts if ctx.mean else out), None, None, None


class _BroadcastRows(torch.autograd.Function):
    """Forward: ``received``, process ``src``'s rows, once their broadcast (``work``, started
    earlier by :func:`start_broadcast`) has arrived. ``x`` is process src's own tensor there,
    elsewhere a placeholder that requires grad, so that every process runs the backward.
    Backward: the gradient summed onto ``src`` (a reduce); the others get none."""

    @staticmethod
    def forward(ctx, x: Tensor, received: Tensor, work: Any, group: Any, src: int) -> Tensor:
        ctx.group, ctx.src = group, src
        work.wait()
        return received.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.reduce(grad, dist.get_global_rank(ctx.group, ctx.src), group=ctx.group)
        mine = dist.get_rank(ctx.group) == ctx.src
        return (grad if mine else None), None, None, None, None


def start_broadcast(t: Tensor, group: Any, src: int) -> Any:
    """Start sending process ``src``'s ``t`` into every process's ``t`` (same shape), without
    waiting: the returned work's ``wait()`` (in :func:`broadcast_rows`) ends it."""
    return dist.broadcast(t, dist.get_global_rank(group, src), group=group, async_op=True)


def gather_rows(x: Tensor, group: Any, parts: int) -> Tensor:
    return _GatherRows.apply(x, group, parts)


def gather_units(x: Tensor, group: Any, parts: int, *, mean: bool = False) -> Tensor:
    return _GatherUnits.apply(x, group, parts, mean)


def broadcast_rows(x: Tensor, received: Tensor, work: Any, group: Any, src: int) -> Tensor:
    return _BroadcastRows.apply(x, received, work, group, src)


# ----------------------------------------------------------------------------- the network


class HybridAlexNet(nn.Module):
    """Process ``rank`` of ``parts`` (K) under the hybrid scheme, cut from a whole collapsed
    network ``net`` (built and initialised alike in every process): its conv1 to conv5 (the
    modules themselves, in the collapsed layout: ``conv1.weight`` is (96, 3, 11, 11) as in
    every checkpoint) and a copy of rows ``[rank*n/K, (rank+1)*n/K)`` of fc6, fc7 and fc8
    under their own names (``fc6.weight`` is (4096/K, 9216)). ``group``: the K processes'
    process group; ``host_group``: a gloo group over the same processes for the batch sizes
    (CPU tensors, no device sync); both set before the first forward."""

    features = AlexNet.features  # conv1 to pool5: the collapsed layout's own code

    def __init__(self, net: AlexNet, *, rank: int = 0, parts: int = 1) -> None:
        super().__init__()
        self.cfg = cfg = net.cfg
        check_parts(parts, cfg.num_classes)
        if not 0 <= rank < parts:
            raise ValueError(f"rank must be in [0, {parts}), got {rank}")
        self.rank, self.parts = rank, parts
        for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "lrn"):
            setattr(self, name, getattr(net, name))
        for layer in FC_LAYERS:
            full: nn.Linear = getattr(net, layer)
            part = nn.utils.skip_init(nn.Linear, full.in_features, full.out_features // parts,
                                      device=full.weight.device, dtype=full.weight.dtype)
            with torch.no_grad():
                part.weight.copy_(full.weight[self.rows(layer)])
                part.bias.copy_(full.bias[self.rows(layer)])
            setattr(self, layer, part)
        self.group: Any = None
        self.host_group: Any = None
        self.ahead_group: Any = None
        self.train(net.training)

    def rows(self, layer: str) -> slice:
        """This process's rows of ``layer``'s collapsed weight and bias."""
        n = fc_widths(self.cfg.num_classes)[layer] // self.parts
        return slice(self.rank * n, (self.rank + 1) * n)

    def _dropout(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.cfg.dropout, self.training)

    def classifier(self, x: Tensor, *, mean: bool) -> Tensor:
        """fc6 to fc8 on ``x`` (n, 9216), the same rows in every process: the logits (n,
        classes) of all n images, in every process. ``mean``: the logits' gradient is the
        mean of the K processes' (see the module docstring)."""
        g, k, cfg = self.group, self.parts, self.cfg
        h = self._dropout(_act(self.fc6(x), cfg))                 # (n, 4096/K)
        h = gather_units(h, g, k)                                 # (n, 4096)
        h = self._dropout(_act(self.fc7(h), cfg))                 # (n, 4096/K)
        h = gather_units(h, g, k)                                 # (n, 4096)
        return gather_units(self.fc8(h), g, k, mean=mean)         # (n, classes)

    def sizes(self, b: int) -> list[int]:
        """Every process's batch size (they may differ: a batch without its unreadable
        images, an evaluation's last batches, none), exchanged over ``host_group``."""
        got = [torch.zeros((), dtype=torch.int64) for _ in range(self.parts)]
        dist.all_gather(got, torch.tensor(b, dtype=torch.int64), group=self.host_group)
        return [int(v) for v in got]

    def forward(self, x: Tensor) -> Tensor:
        """Schedule 'gather': this process's images ``x`` (b, 3, 227, 227); every process's
        pool5 gathered (padded with zero rows to the largest b, m), fc6-fc8 on all K*m rows;
        returns the logits of this process's images (b, classes). Every process calls it
        together, a process without images with an empty batch."""
        b = x.shape[0]
        m = max(self.sizes(b))
        # (no convolution of an empty batch: some CPU kernels divide by its size)
        h = self.features(x) if b else x.new_zeros((0, 9216))    # (b, 9216)
        h = F.pad(h, (0, 0, 0, m - b))                            # (m, 9216)
        h = gather_rows(h, self.group, self.parts)                # (K*m, 9216)
        logits = self.classifier(h, mean=True)                    # (K*m, classes)
        return logits[self.rank * m:self.rank * m + b]            # (b, classes)

    def conv_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.split(".")[0] not in FC_LAYERS]

    def fc_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.split(".")[0] in FC_LAYERS]

    def reduce_conv_grads(self, *, mean: bool) -> None:
        """Sum (``mean``: average) the convolutional layers' gradients across the K
        processes, as DDP does, in one flat all-reduce."""
        grads = [p.grad for p in self.conv_parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group)
        if mean:
            flat /= self.parts
        for g, v in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(v.view_as(g))

    # ------------------------------------------------------------------ state
    def part_of(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """This process's part of a whole network's state (collapsed or split keys):
        the convolutional entries whole, this process's rows of the fully connected ones."""
        named = collapse_state_dict(dict(state))
        out = {}
        for key, value in named.items():
            layer = key.split(".")[0]
            out[key] = value[self.rows(layer)] if layer in FC_LAYERS else value
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load this process's part of a whole network's state (a checkpoint's)."""
        return super().load_state_dict(self.part_of(state_dict), strict=strict, assign=assign)


def join_parts(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The whole network's state from every process's :meth:`HybridAlexNet.state_dict`-like
    dict, in rank order: the convolutional entries from the first, the fully connected rows
    concatenated."""
    whole = {}
    for key, value in parts[0].items():
        if key.split(".")[0] in FC_LAYERS:
            whole[key] = torch.cat([p[key].to(value.device) for p in parts], dim=0)
        else:
            whole[key] = value
    return whole

