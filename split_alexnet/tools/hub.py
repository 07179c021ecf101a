"""What ``hubconf.py`` (the repository root) builds: the network in either layout, on the
devices given, from ModelConfig fields or from a weights file (docs/deploy.md, torch.hub).

:func:`build` is the one builder behind the hub entries ``alexnet`` (collapsed) and
``split_alexnet`` (two towers). With ``weights`` (a checkpoint or a ``.safetensors`` file,
read by ``utils.weights_file.read_weights``) the network is the file's: a ModelConfig field
given as well must agree with it (``init`` is ignored: the weights are loaded), and the
returned network carries ``classes``, ``class_names`` and ``mean_image`` (the training
set's (3, 256, 256) mean, raw 0-255 RGB; the input is the centre 227 crop of the image minus
the same crop of it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import nn

from split_alexnet.network.model import ModelConfig
from split_alexnet.network.placement import build_model
from split_alexnet.utils.weights_file import (CheckpointError, checkpoint_stats, model_config,
                                            read_weights)

#: The ModelConfig fields the entries take as keywords.
FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def build(layout: str, devices: str | Sequence[str | torch.device] | torch.device,
          weights: str | None = None, **fields: Any) -> nn.Module:
    """The network in ``layout`` ('collapsed' or 'split') on ``devices`` (one device, or
    two for 'split': "cpu,cpu", ("cuda:0", "cuda:1")), initialised by ``init`` (default
    'paper') or holding the weights of the file ``weights``. A bad argument is a
    ``ValueError`` naming it."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise TypeError(f"unknown argument(s) {', '.join(unknown)}; the network's are "
                        f"{', '.join(FIELDS)}")
    if isinstance(devices, torch.device):
        devices = (devices,)
    if weights is None:
        if layout == "split" and fields.get("arch") == "half":
            raise ValueError("arch 'half' is one column: use the 'alexnet' entry")
        return build_model(ModelConfig(**fields), layout, devices)
    try:
        payload = read_weights(weights)
        cfg = model_config(payload)
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    for name, value in fields.items():
        if name != "init" and getattr(cfg, name) != value:
            raise ValueError(f"{weights} holds a network with {name}={getattr(cfg, name)!r}, "
                             f"not {value!r}: leave {name} out to take the file's")
    if layout == "split" and cfg.arch == "half":
        raise ValueError(f"{weights} holds arch 'half', one column: use the 'alexnet' entry")
    net = build_model(replace(cfg, init=None), layout, devices)
    net.load_state_dict(payload["model"])
    net.classes = [str(c) for c in payload["classes"]]
    names = payload.get("class_names")
    net.class_names = [str(n) for n in names] if isinstance(names, (list, tuple)) and \
        len(names) == len(net.classes) else list(net.classes)
    net.mean_image = checkpoint_stats(payload).mean.float()
    return net
