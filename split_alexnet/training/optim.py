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

from split_alexnet.network.model import (WEIGHT_LAYERS, SplitAlexNet, cpu_snapshot,
                                         split_state_dict)
from split_alexnet.network.parallelize import unwrap
from split_alexnet.network.hybrid import HybridAlexNet
from split_alexnet.network.towers import RankTower

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


#: --lr-batch-rule: how a layer's learning rate follows the batch it sees (docs/scaling.md).
LR_BATCH_RULES = ("off", "sqrt", "linear")
#: --fc-updates: the fully connected layers update once per step, or after each of the K
#: passes of the hybrid's sequential schedule.
FC_UPDATES = ("once", "each")


def batch_lr_mult(rule: str, batch: int, reference: int) -> float:
    """The learning-rate multiplier of a layer that sees ``batch`` images per update, for
    an lr meant for ``reference``: 1 ('off'), sqrt(batch / reference) ('sqrt', Krizhevsky
    2014) or batch / reference ('linear', Goyal et al. 2017)."""
    if rule not in LR_BATCH_RULES:
        raise ValueError(f"rule must be one of {', '.join(LR_BATCH_RULES)}; got {rule!r}")
    k = batch / reference
    return {"off": 1.0, "sqrt": k ** 0.5, "linear": k}[rule]


def param_groups(net: nn.Module, *, layer_lr_mult: dict[str, float] | None = None,
                 bias_lr_mult: float = 1.0, bias_decay: bool = True,
                 weight_decay: float) -> list[dict]:
    """The optimizer's parameter groups: one per (layer, ``"weight"`` or ``"bias"``) that has
    trainable parameters, in network order (a split model's two towers share their layer's
    groups). Each group has ``params``, ``layer``, ``kind``, ``lr_mult`` (the layer's
    multiplier from ``layer_lr_mult``, default 1, times ``bias_lr_mult`` for biases) and
    ``weight_decay`` (0 for biases without ``bias_decay``). The paper: every multiplier 1 and
    decay on everything; Caffe's bvlc_alexnet: biases ``lr_mult 2, decay_mult 0``."""
    layer_lr_mult = dict(layer_lr_mult or {})
    unknown = set(layer_lr_mult) - set(WEIGHT_LAYERS)
    if unknown:
        raise ValueError(f"unknown layers {sorted(unknown)}; the layers are {', '.join(WEIGHT_LAYERS)}")
    found: dict[tuple[str, str], list[Tensor]] = {}
    for name, p in unwrap(net).named_parameters():
        if p.requires_grad:
            layer, kind = name.split(".")[-2:]  # "towers.0.conv1.weight" -> conv1, weight
            found.setdefault((layer, kind), []).append(p)
    groups = []
    for layer in WEIGHT_LAYERS:
        for kind in ("weight", "bias"):
            if (layer, kind) not in found:
                continue
            bias = kind == "bias"
            groups.append(dict(
                params=found.pop((layer, kind)), layer=layer, kind=kind,
                lr_mult=layer_lr_mult.get(layer, 1.0) * (bias_lr_mult if bias else 1.0),
                weight_decay=0.0 if bias and not bias_decay else weight_decay))
    if found:
        raise ValueError(f"parameters outside the known layers: {sorted(found)}")
    return groups


def build_optimizer(model: nn.Module, *, kind: str = "paper", lr: float = 0.01,
                    momentum: float = 0.9, weight_decay: float = 5e-4,
                    bias_lr_mult: float = 1.0, bias_decay: bool = True,
                    layer_lr_mult: dict[str, float] | None = None) -> torch.optim.Optimizer:
    """The optimizer over :func:`param_groups` (the paper's defaults: one learning rate and
    one decay for all parameters). Build it after placement; :func:`set_lr` applies each
    group's ``lr_mult``."""
    groups = param_groups(model, layer_lr_mult=layer_lr_mult, bias_lr_mult=bias_lr_mult,
                          bias_decay=bias_decay, weight_decay=weight_decay)
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
    if kind == "paper":
        return PaperSGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "torch":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {kind!r}")


SCHEDULES = ("plateau", "step:N", "step-iters:N")


class LRSchedule:
    """Divide the learning rate by 10, at most ``max_drops`` times (the paper: three).

    ``plateau`` (the paper, section 5): drop when the validation error has not improved for
    ``patience`` epochs in a row at the current rate. Patience counts epochs, not
    evaluations (an evaluation every 2 epochs that does not improve counts 2); an error
    improves only when it is below the best by more than ``threshold`` (relative: below
    best * (1 - threshold)); and the rate stays at least ``min_epochs`` epochs before it
    drops. ``step:N``: drop every N epochs.
    ``step-iters:N`` (Caffe's ``lr_policy: "step"``): the rate for the optimizer step with
    0-based index i is lr * factor ** (i // N), capped at ``max_drops`` divisions; call
    :meth:`at_step` before each step. Call :meth:`step` after each evaluation with its
    top-1 error and the epochs since the last call; it returns the learning rate for the
    next epoch, and :attr:`reason` says why the last drop happened.
    """

    def __init__(self, spec: str, lr: float, *, patience: int = 1, max_drops: int = 3,
                 factor: float = 0.1, min_epochs: int = 0, threshold: float = 0.0) -> None:
        self.spec, self.lr, self.patience, self.max_drops, self.factor = \
            spec, lr, patience, max_drops, factor
        self.min_epochs, self.threshold = min_epochs, threshold
        self.epochs_at_rate = 0
        self.reason = ""
        self.every_iters = step_iters(spec)
        self.every = None if self.every_iters else parse_schedule(spec)
        self.best = float("inf")
        self.bad_epochs = 0
        self.drops = 0
        self.epochs = 0

    def step(self, val_error: float, epochs: int = 1) -> float:
        """An evaluation's top-1 error, ``epochs`` epochs after the previous call."""
        before = self.epochs
        self.epochs += epochs
        self.epochs_at_rate += epochs
        if val_error < self.best * (1 - self.threshold):
            self.best, self.bad_epochs = val_error, 0
        else:
            self.bad_epochs += epochs
        if self.drops < self.max_drops and not self.every_iters:
            if self.every is None and self.bad_epochs >= self.patience \
                    and self.epochs_at_rate >= self.min_epochs:
                self._drop(f"plateau: top-1 error {val_error:.4f} has not improved on "
                           f"{self.best:.4f} (threshold {self.threshold:g}) for "
                           f"{self.bad_epochs} epochs (patience {self.patience}), "
                           f"{self.epochs_at_rate} epochs at this rate (minimum "
                           f"{self.min_epochs})")
            elif self.every is not None and self.epochs // self.every > before // self.every:
                self._drop(f"every {self.every} epochs (epoch {self.epochs})")
        return self.lr

    def at_step(self, done: int) -> bool:
        """``step-iters:N``: before the optimizer step that follows ``done`` steps, make the
        rate lr * factor ** min(done // N, max_drops). Returns whether the rate changed (then
        the caller applies :attr:`lr`); always False for the other schedules."""
        if not self.every_iters:
            return False
        changed = False
        while self.drops < min(done // self.every_iters, self.max_drops):
            self._drop()
            changed = True
        return changed

    def _drop(self, reason: str = "") -> None:
        self.lr *= self.factor
        self.drops += 1
        self.bad_epochs = 0
        self.epochs_at_rate = 0
        self.reason = reason or f"every {self.every_iters} steps"

    def state_dict(self) -> dict:
        return dict(lr=self.lr, best=self.best, bad_epochs=self.bad_epochs, drops=self.drops,
                    epochs=self.epochs, epochs_at_rate=self.epochs_at_rate)

    def load_state_dict(self, state: dict) -> None:
        for k in ("lr", "best", "bad_epochs", "drops", "epochs"):
            setattr(self, k, state[k])
        # Checkpoints from before the minimum stay: count every epoch at the current rate.
        self.epochs_at_rate = state.get("epochs_at_rate", state["epochs"])


def step_iters(spec: str) -> int | None:
    """'step-iters:N' -> N (optimizer steps between drops); any other spec -> None."""
    head, _, n = spec.partition(":")
    return int(n) if head == "step-iters" and n.isdigit() and int(n) > 0 else None


def parse_schedule(spec: str) -> int | None:
    """'plateau' -> None; 'step:N' -> N (epochs between drops); 'step-iters:N' -> None (it
    drops by steps: :func:`step_iters`)."""
    if spec == "plateau" or step_iters(spec):
        return None
    if spec.startswith("step:") and spec[5:].isdigit() and int(spec[5:]) > 0:
        return int(spec[5:])
    raise ValueError(f"--lr-schedule must be 'plateau', 'step:N' or 'step-iters:N' with N >= 1; "
                     f"got {spec!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The base learning rate ``lr``, times each group's ``lr_mult`` (1 where it has none)."""
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
                buffers.setdefault(key, {})[names[id(p)]] = value.detach()
    buffers = {k: cpu_snapshot(v, split=isinstance(model, SplitAlexNet))
               for k, v in buffers.items()}
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
        if isinstance(model, (SplitAlexNet, RankTower)):
            named = split_state_dict(named)
        if isinstance(model, RankTower):  # this process's tower (and fc8 with tower 0)
            named = {k: v for k, v in named.items() if k in set(dict(model.named_parameters()))}
        if isinstance(model, HybridAlexNet):  # this process's rows of fc6-fc8
            named = model.part_of(named)
        if set(named) != set(params):
            raise ValueError("optimizer state does not match this model's parameters")
        for name, value in named.items():
            p = params[name]
            optimizer.state[p][key] = value.to(device=p.device, dtype=p.dtype, copy=True)
    for group, saved in zip(optimizer.param_groups, state["groups"]):
        group.update(saved)
