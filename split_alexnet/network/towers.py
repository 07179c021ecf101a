"""The paper's column split as one process per tower: :class:`RankTower`, one tower of
:class:`~split_alexnet.network.model.SplitAlexNet` in this process, its links to the other
tower's process as point-to-point collectives that autograd runs backwards.

The 2012 split is two-way tensor parallelism. In Megatron-LM's words, the layers that read
both towers (conv3, fc6, fc7) are column-parallel layers whose input is first all-gathered
across the two ranks (each rank computes its half of the output channels from the whole
input), the tower-local layers (conv1, conv2, conv4, conv5) are purely local, and fc8 is not
split: it lives with tower 0, which receives tower 1's fc7 output (a gather to one rank).

Every tensor crossing between the two processes goes through :meth:`RankTower._send`, the
same one send path as the in-process network, and is recorded in ``net.traffic`` with the same
entries (layer, towers, shape, bytes) on both ranks. The backward pass sends each gradient
back along the link it came from: :class:`_Exchange` (both ways) and :class:`_ToFc8` /
:class:`_FromTower1` (one way) are ``torch.autograd.Function`` s over the point-to-point
operations of ``torch.distributed`` (:class:`TowerLink`).

Same function, bit for bit: a rank computes exactly the in-process tower's calls, in the same
order. Dropout draws from this process's default generator; both ranks of a pair are seeded
alike and each draws the masks of both towers in tower order, keeping its own, so the masks
are the in-process network's (``_dropout``). Tower 1's process ends its forward at the send
to fc8; :meth:`RankTower.backward_from_fc8` runs its backward from the gradient tower 0 sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from split_alexnet.network.model import (ModelConfig, SplitAlexNet, Tower, Transfer, _act,
                                         _pool, check_input, initialise, layers_made,
                                         model_config, split_state_dict, transfer)


@dataclass(frozen=True)
class TowerLink:
    """This process's place in its pair: which tower it holds, the global rank of the other
    tower's process, the process group of the pair, and whether tensors go through host
    memory (``via_cpu``: gloo between GPUs, whose point-to-point ops take CPU tensors)."""

    tower: int
    peer: int
    group: Any
    via_cpu: bool = False

    def send(self, x: Tensor) -> None:
        dist.send(self._out(x), self.peer, group=self.group)

    def recv(self, like: Tensor) -> Tensor:
        got = self._buffer(like)
        dist.recv(got, self.peer, group=self.group)
        return got.to(like.device)

    def swap(self, x: Tensor) -> Tensor:
        """Send ``x`` to the peer and receive the peer's tensor of the same shape, at once."""
        got = self._buffer(x)
        ops = [dist.P2POp(dist.isend, self._out(x), self.peer, self.group),
               dist.P2POp(dist.irecv, got, self.peer, self.group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return got.to(x.device)

    def _out(self, x: Tensor) -> Tensor:
        return (x.cpu() if self.via_cpu else x).contiguous()

    def _buffer(self, like: Tensor) -> Tensor:
        return torch.empty(like.shape, dtype=like.dtype,
                           device="cpu" if self.via_cpu else like.device)


class _Exchange(torch.autograd.Function):
    """Forward: this tower's ``x`` to the peer, the peer's tensor back. Backward: the
    gradient of the received tensor to the peer, and the gradient the peer computed for
    ``x`` back (autograd adds it to ``x``'s local gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, link: TowerLink) -> Tensor:
        ctx.link = link
        return link.swap(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.link.swap(grad), None


class _ToFc8(torch.autograd.Function):
    """Tower 1's process: ``x`` (its fc7 output) to tower 0's process, which holds fc8. The
    output is an empty marker: :meth:`RankTower.backward_from_fc8` starts the backward there,
    and this node receives the gradient of ``x`` from tower 0's process."""

    @staticmethod
    def forward(ctx, x: Tensor, link: TowerLink) -> Tensor:
        ctx.link, ctx.like = link, x.detach()
        link.send(x)
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, _marker: Tensor):
        return ctx.link.recv(ctx.like), None


class _FromTower1(torch.autograd.Function):
    """Tower 0's process: tower 1's fc7 output, received; backward sends its gradient."""

    @staticmethod
    def forward(ctx, like: Tensor, link: TowerLink) -> Tensor:
        ctx.link = link
        return link.recv(like)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.link.send(grad)
        return None, None


class RankTower(nn.Module):
    """Tower ``tower`` of the paper's network in this process (and fc8 with tower 0), under
    the in-process network's parameter names (``towers.1.conv3.weight``, ``fc8.bias``): the
    state dicts of a pair's two processes together are a SplitAlexNet's.
    :func:`placement.place_tower` gives it its link and device."""

    def __init__(self, cfg: ModelConfig | int | None = None, *, tower: int = 0,
                 **fields) -> None:
        super().__init__()
        if tower not in (0, 1):
            raise ValueError(f"tower must be 0 or 1, got {tower!r}")
        self.cfg = cfg = model_config(cfg, **fields)
        self.tower = tower
        with layers_made():
            self.towers = nn.ModuleDict({str(tower): Tower(cfg)})
            self.fc8 = nn.Linear(4096, cfg.num_classes) if tower == 0 else None
        self.link: TowerLink | None = None
        self.traffic: list[Transfer] = []
        self._to_fc8: Tensor | None = None  # tower 1: the marker its backward starts from
        initialise(self, cfg)

    @classmethod
    def of(cls, net: SplitAlexNet, tower: int) -> "RankTower":
        """Tower ``tower`` (and fc8 for tower 0) of ``net``, with its weights (shared)."""
        out = cls(net.cfg, tower=tower, init=None)
        out.towers[str(tower)] = net.towers[tower]
        if tower == 0:
            out.fc8 = net.fc8
        return out.train(net.training)

    @property
    def own(self) -> Tower:
        return self.towers[str(self.tower)]

    @property
    def device(self) -> torch.device:
        return self.own.conv1.weight.device

    # The one place where tensors cross between towers -----------------------------------
    def _send(self, x: Tensor, layer: str) -> Tensor:
        """The other tower's tensor for ``layer``: this tower's ``x`` goes to it, its comes
        back (conv3, fc6, fc7, the LRN halo); both directions are recorded, as in-process."""
        link = self.link
        got = _Exchange.apply(x, link)
        for src in (1, 0):  # the in-process order: tower 1's to tower 0, then tower 0's
            self.traffic.append(Transfer(layer, src, 1 - src, f"rank{src}", f"rank{1 - src}",
                                         tuple(x.shape), x.numel() * x.element_size()))
        return got

    def _exchange(self, h: Tensor, layer: str) -> Tensor:
        """Both towers' ``h``, concatenated in tower order (0, 1)."""
        other = self._send(h, layer)
        return torch.cat([h, other] if self.tower == 0 else [other, h], dim=1)

    def _norm_pool(self, h: Tensor, layer: str) -> Tensor:
        """LRN and max-pooling; with lrn_span 'all' across the towers' boundary, as
        ``SplitAlexNet._norm_pool``: tower 0 gets tower 1's first ``hi`` channels, tower 1
        tower 0's last ``lo`` (the same count for an odd window: one exchange)."""
        t, cfg = self.own, self.cfg
        if cfg.lrn_span == "tower" or cfg.lrn == "off":
            return t.norm_pool(h)
        lo = t.lrn.size // 2
        hi = t.lrn.size - 1 - lo
        if lo != hi:
            raise ValueError(f"an LRN window of {t.lrn.size} channels has an uneven halo")
        if self.tower == 0:
            n = t.lrn(torch.cat([h, self._send(h[:, -lo:], layer)], dim=1))[:, :-hi]
        else:
            n = t.lrn(torch.cat([self._send(h[:, :hi], layer), h], dim=1))[:, lo:]
        return _pool(n, cfg)

    def _dropout(self, x: Tensor) -> Tensor:
        """Dropout with the in-process masks: both towers' masks drawn in tower order from
        this process's generator (seeded as the pair's), this tower's kept."""
        p, training = self.cfg.dropout, self.training
        if not training or p == 0:
            return x
        if self.tower == 1:
            F.dropout(torch.zeros_like(x), p, True)  # tower 0's draw
        out = F.dropout(x, p, True)
        if self.tower == 0:
            F.dropout(torch.zeros_like(x), p, True)  # tower 1's draw
        return out

    def forward(self, x: Tensor) -> Tensor | None:
        """Tower 0's process returns the logits; tower 1's returns None (its output went to
        fc8: call :meth:`backward_from_fc8` where tower 0's process calls backward)."""
        check_input(x)
        self.traffic = []
        t, cfg = self.own, self.cfg
        h = t.layer1(transfer(x, self.device))                    # (B, 48, 55, 55)
        h = self._norm_pool(h, "norm1")                           # (B, 48, 27, 27)
        h = t.layer2(h)                                           # (B, 128, 27, 27)
        h = self._norm_pool(h, "norm2")                           # (B, 128, 13, 13)
        h = t.layer3(self._exchange(h, "conv3"))                  # (B, 192, 13, 13)
        h = t.layer5(t.layer4(h))                                 # (B, 4608)
        h = self._exchange(h, "fc6")                              # (B, 9216)
        h = self._dropout(_act(t.fc6(h), cfg))                    # (B, 2048)
        h = self._exchange(h, "fc7")                              # (B, 4096)
        h = self._dropout(_act(t.fc7(h), cfg))                    # (B, 2048)
        self.traffic.append(Transfer("fc8", 1, 0, "rank1", "rank0", tuple(h.shape),
                                     h.numel() * h.element_size()))
        if self.tower == 1:
            self._to_fc8 = _ToFc8.apply(h, self.link)
            return None
        h = torch.cat([h, _FromTower1.apply(h, self.link)], dim=1)  # (B, 4096)
        return self.fc8(h)                                        # (B, num_classes)

    def backward_from_fc8(self) -> None:
        """Tower 1's process: the backward of the last forward, from the gradient of its fc7
        output that tower 0's process sends (tower 0's process calls ``loss.backward()``)."""
        marker, self._to_fc8 = self._to_fc8, None
        if marker is None:
            raise RuntimeError("backward_from_fc8 without a forward on tower 1")
        marker.backward()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load this process's part of a whole network's state: collapsed (checkpoint) or
        split keys; the other tower's entries (and fc8 on tower 1) are left out."""
        own = set(self.state_dict())
        named = split_state_dict(dict(state_dict))
        return super().load_state_dict({k: v for k, v in named.items() if k in own},
                                       strict=strict, assign=assign)
