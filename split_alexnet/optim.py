"""The paper's update rule (section 5), with the learning rate inside the velocity:

    v <- momentum * v - weight_decay * lr * w - lr * dL/dw
    w <- w + v

``torch.optim.SGD`` keeps the learning rate outside the velocity (v <- m v + g + wd w;
w <- w - lr v). The two agree while the rate is constant and differ for a while after each
division by 10: with the paper's form the momentum carries the old, larger steps on. Caffe
and cuda-convnet2 use the paper's form. ``build_optimizer(kind="torch")`` is the documented
switch (docs/fidelity.md).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

OPTIMIZERS = ("paper", "torch")


class PaperSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay exactly as in Krizhevsky et al. 2012, section 5."""

    def __init__(self, params: Iterable[Tensor], lr: float = 0.01, momentum: float = 0.9,
                 weight_decay: float = 5e-4) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be >= 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p)
                v = state["velocity"]
                v.mul_(m).add_(p, alpha=-wd * lr).add_(p.grad, alpha=-lr)
                p.add_(v)
        return loss


def build_optimizer(model: nn.Module, *, kind: str = "paper", lr: float = 0.01,
                    momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    """One learning rate for all parameters, as in the paper. Build it after placement."""
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "paper":
        return PaperSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "torch":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {kind!r}")
