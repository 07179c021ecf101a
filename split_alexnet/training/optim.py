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

from split_alexnet.network.model import SplitAlexNet, collapse_state_dict, split_state_dict
from split_alexnet.network.parallelize import unwrap

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
                    momentum: float = 0.9, weight_decay: float = 5e-4,
                    groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """One learning rate for all parameters, as in the paper. Build it after placement.
    Frozen parameters (``requires_grad`` False) are left out. ``groups``: parameter groups
    instead (fine-tuning: one per layer, each with an ``lr_mult`` for :func:`set_lr`)."""
    params = groups if groups is not None else [p for p in model.parameters()
                                                if p.requires_grad]
    if kind == "paper":
        return PaperSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "torch":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {kind!r}")


SCHEDULES = ("plateau", "step:N")


class LRSchedule:
    """Divide the learning rate by 10, at most ``max_drops`` times (the paper: three).

    ``plateau`` (the paper, section 5): drop when the validation error has not improved for
    ``patience`` epochs in a row at the current rate. ``step:N``: drop every N epochs.
    Call :meth:`step` once per epoch with that epoch's validation top-1 error; it returns the
    learning rate for the next epoch.
    """

    def __init__(self, spec: str, lr: float, *, patience: int = 1, max_drops: int = 3,
                 factor: float = 0.1) -> None:
        self.spec, self.lr, self.patience, self.max_drops, self.factor = \
            spec, lr, patience, max_drops, factor
        self.every = parse_schedule(spec)
        self.best = float("inf")
        self.bad_epochs = 0
        self.drops = 0
        self.epochs = 0

    def step(self, val_error: float) -> float:
        self.epochs += 1
        if val_error < self.best:
            self.best, self.bad_epochs = val_error, 0
        else:
            self.bad_epochs += 1
        if self.drops < self.max_drops:
            if self.every is None and self.bad_epochs >= self.patience:
                self._drop()
            elif self.every is not None and self.epochs % self.every == 0:
                self._drop()
        return self.lr

    def _drop(self) -> None:
        self.lr *= self.factor
        self.drops += 1
        self.bad_epochs = 0

    def state_dict(self) -> dict:
        return dict(lr=self.lr, best=self.best, bad_epochs=self.bad_epochs, drops=self.drops,
                    epochs=self.epochs)

    def load_state_dict(self, state: dict) -> None:
        for k in ("lr", "best", "bad_epochs", "drops", "epochs"):
            setattr(self, k, state[k])


def parse_schedule(spec: str) -> int | None:
    """'plateau' -> None; 'step:N' -> N (epochs between drops)."""
    if spec == "plateau":
        return None
    if spec.startswith("step:") and spec[5:].isdigit() and int(spec[5:]) > 0:
        return int(spec[5:])
    raise ValueError(f"--lr-schedule must be 'plateau' or 'step:N' with N >= 1; got {spec!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """``lr`` for every group, times the group's ``lr_mult`` where it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by the collapsed layout's parameter names (layout-independent),
    on the CPU: {buffer name: {param name: tensor}} plus the hyper-parameters."""
    model = unwrap(model)
    names = {id(p): n for n, p in model.named_parameters()}
    buffers: dict[str, dict[str, Tensor]] = {}
    for p, st in optimizer.state.items():
        for key, value in st.items():
            if isinstance(value, Tensor) and value.shape == p.shape:
                buffers.setdefault(key, {})[names[id(p)]] = value.detach().to("cpu", copy=True)
    if isinstance(model, SplitAlexNet):
        buffers = {k: collapse_state_dict(v) for k, v in buffers.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"buffers": buffers, "groups": groups}


def load_named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                               state: dict) -> None:
    """Inverse of :func:`named_optimizer_state`, into either layout (frozen parameters hold
    no state)."""
    model = unwrap(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for key, named in state["buffers"].items():
        named = dict(named)
        if isinstance(model, SplitAlexNet):
            named = split_state_dict(named)
        if set(named) != set(params):
            raise ValueError("optimizer state does not match this model's parameters")
        for name, value in named.items():
            p = params[name]
            optimizer.state[p][key] = value.to(device=p.device, dtype=p.dtype, copy=True)
    for group, saved in zip(optimizer.param_groups, state["groups"]):
        group.update(saved)
