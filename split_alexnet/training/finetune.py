"""Fine-tuning: a run that starts from another checkpoint's weights instead of random ones.

    python -m split_alexnet.train --data MYFOLDERS --init-from caffe_alexnet.pt --finetune
    python -m split_alexnet.train --data MYFOLDERS --init-from runs/a/best.pt \
        --freeze-through conv5 --lr-mult-new 10

* ``--init-from CKPT``: any checkpoint of this repository (written by training, in either
  layout, or by ``split_alexnet.convert``; or a ``.safetensors`` weights file written by
  ``split_alexnet.export``) whose network computes the same kind of function
  (arch, pooling and activation must match; a different LRN reading is loaded with a warning).
  Every layer is loaded, except the re-initialised ones: fc8 unless the source has the run's
  classes (the same class names in the same order: another count, or the same count of other
  classes, means fc8's rows answer other questions), and the layers of ``--reinit``. A re-initialised layer keeps the values this run's
  ``--init`` and ``--seed`` drew for it, so a fine-tuned run and a run from scratch with the
  same seed start fc8 alike, and see the same batches in the same order.
* ``--freeze-through LAYER``: that layer and every earlier one get ``requires_grad=False``
  before DDP wraps the network and before the optimizer is built: no gradient, no update, no
  weight decay, no momentum buffer, and nothing for DDP to all-reduce.
* ``--lr-mult-new M``: the optimizer holds one parameter group per layer and kind
  (``optim.param_groups``: ``layer``, ``kind``, ``lr_mult``); the re-initialised layers'
  groups get multiplier M (times ``--bias-lr-mult`` for their biases) and
  ``optim.set_lr`` sets each group's rate to the schedule's rate times its multiplier. The
  groups, multipliers included, are saved in every checkpoint, so ``--resume`` restores them
  without reading the ``--init-from`` file again.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from split_alexnet.network.model import (WEIGHT_LAYERS, ModelConfig,
                                         layout_state_dict)
from split_alexnet.training.config import PROG, TrainConfig
from split_alexnet.utils.checkpoint_file import CheckpointError, model_config
from split_alexnet.utils.weights_file import read_weights
from split_alexnet.utils.cli import UsageError

#: ModelConfig fields that must agree between the source checkpoint and the run.
SAME_FUNCTION = ("arch", "pool", "activation")


@dataclass
class FineTuning:
    """What :func:`prepare` did to the network, for the rest of the set-up."""

    frozen: tuple[str, ...] = ()
    reinit: tuple[str, ...] = ()
    layer_lr_mult: dict[str, float] | None = None
    """For ``build_optimizer``: the re-initialised layers' learning-rate multiplier."""
    record: dict | None = None
    """The metrics.jsonl record of the loading (a fresh run with --init-from)."""


def layer_of(param_name: str) -> str:
    """'towers.1.conv3.weight' -> 'conv3'."""
    return param_name.split(".")[-2]


def freeze(net: nn.Module, layers: tuple[str, ...]) -> None:
    """``requires_grad=False`` on every parameter of ``layers`` (both towers' halves)."""
    for name, p in net.named_parameters():
        if layer_of(name) in layers:
            p.requires_grad_(False)


def read_source(cfg: TrainConfig, *, resume: bool) -> tuple[dict, ModelConfig] | None:
    """The --init-from checkpoint of a fresh run and its network (None: nothing to read),
    refused with one line when it cannot be loaded or computes another kind of function than
    the run's. Called before any other work, so that a bad file fails up front."""
    path = cfg.finetune.init_from
    if path is None or resume:
        return None
    try:
        ckpt = read_weights(Path(path))  # a checkpoint or a .safetensors weights file
        src = model_config(ckpt)
    except CheckpointError as e:
        raise UsageError(f"--init-from: {e}") from None
    for name in SAME_FUNCTION:
        have, want = getattr(src, name), getattr(cfg.model, name)
        if have != want:
            raise UsageError(f"--init-from {path} holds a network with --{name} {have}, this "
                             f"run builds --{name} {want}: give --{name} {have} to fine-tune it")
    return ckpt, src


def load_weights(net: nn.Module, ckpt: dict, reinit: tuple[str, ...], path: str) -> list[str]:
    """Put the source's parameters into ``net`` (either layout), except those of ``reinit``,
    which keep their freshly initialised values. Returns the loaded layers."""
    state = layout_state_dict(net)  # the run's own initial values, collapsed keys
    source = ckpt["model"]
    loaded = set()
    for key, value in state.items():
        layer = key.split(".")[0]
        if layer in reinit:
            continue
        got = source.get(key)
        if got is None or tuple(got.shape) != tuple(value.shape):
            shape = "missing" if got is None else "x".join(map(str, got.shape))
            raise UsageError(f"--init-from {path}: {key} is {shape}, this run's network needs "
                             f"{'x'.join(map(str, value.shape))} (re-initialise it with "
                             f"--reinit {layer})")
        state[key] = got
        loaded.add(layer)
    net.load_state_dict(state)
    return [layer for layer in WEIGHT_LAYERS if layer in loaded]


def _span(layers) -> str:
    layers = list(layers)
    return "none" if not layers else layers[0] if len(layers) == 1 else \
        f"{layers[0]}-{layers[-1]}" if len(layers) > 2 else ", ".join(layers)


def prepare(net: nn.Module, cfg: TrainConfig, source: tuple[dict, ModelConfig] | None,
            classes: list[str], *, is_main: bool = True) -> FineTuning:
    """Before DDP and the optimizer: load the --init-from weights (``source``, from
    :func:`read_source`: a fresh run only; fc8 is re-initialised unless the source has this
    run's ``classes``, in this order), freeze the --freeze-through layers, and give the
    optimizer its groups (with --init-from)."""
    ft, model_cfg = cfg.finetune, cfg.model
    frozen = ft.frozen_layers
    if source is None:  # no --init-from, or --resume: the optimizer's groups and their
        freeze(net, frozen)  # multipliers come from the checkpoint
        return FineTuning(frozen=frozen)
    ckpt, src = source
    reinit = set(ft.reinit_layers)
    same_classes = [str(c) for c in ckpt.get("classes", [])] == [str(c) for c in classes]
    if not same_classes:  # another count, or fc8's rows mean other classes
        reinit.add("fc8")
    reinit = tuple(layer for layer in WEIGHT_LAYERS if layer in reinit)
    loaded = load_weights(net, ckpt, reinit, ft.init_from)
    freeze(net, frozen)
    if is_main:
        if (src.lrn, src.lrn_span) != (model_cfg.lrn, model_cfg.lrn_span):
            print(f"{PROG}: warning: {ft.init_from} was trained with --lrn {src.lrn} "
                  f"--lrn-span {src.lrn_span}, this run normalises with --lrn {model_cfg.lrn} "
                  f"--lrn-span {model_cfg.lrn_span}: give those flags to keep the loaded "
                  "layers' function", file=sys.stderr)
        here = "the same classes" if same_classes else "other classes"
        print(f"fine-tuning from {ft.init_from} ({src.num_classes} classes; "
              f"{model_cfg.num_classes} here, {here}): loaded {_span(loaded)}; re-initialised "
              f"{_span(reinit)} by --init {model_cfg.init}; frozen {_span(frozen)}; learning "
              f"rate x{ft.lr_mult_new:g} for the re-initialised layers", file=sys.stderr)
    record = {"kind": "init_from", "from": str(ft.init_from), "checksum": ckpt["checksum"],
              "source_classes": src.num_classes, "loaded": loaded, "reinit": list(reinit),
              "frozen": list(frozen), "lr_mult_new": ft.lr_mult_new}
    return FineTuning(frozen=frozen, reinit=reinit, record=record,
                      layer_lr_mult={layer: ft.lr_mult_new for layer in reinit})
